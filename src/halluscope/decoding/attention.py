"""Edits of pre-softmax attention scores, and reads of attention probabilities, through transformers'
attention-function interface.

Methods such as PAI and ClearSight change how much the text attends to image tokens; OPERA reads the last
layer's attention probabilities. halluscope registers one attention function, `halluscope_edit`, with
`AttentionInterface` (and sdpa's mask builder under the same name with `AttentionMaskInterface`), and switches
the language model's `_attn_implementation` to it inside `score_edit`. Layers the active edit does not name run
transformers' own sdpa function unchanged (eager attention if the model was loaded with it); named layers compute
softmax(q k^T * scale + mask) themselves, with the edit applied to the scores first and the probabilities shown
to the observer.

The decoding loop tells the edit which key columns hold image tokens before every forward (`set_columns`), in
the cache's own column layout, so an edit never relies on hard-coded offsets.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ATTENTION_NAME", "ScoreEdit", "editing", "score_edit", "set_columns"]

ATTENTION_NAME = "halluscope_edit"

#: (scores [batch, heads, queries, keys], image columns [batch, keys], system columns [batch, keys]) -> scores
EditFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: (probabilities [batch, heads, queries, keys], float32) -> None
ObserveFunction = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class ScoreEdit:
    """An edit of the pre-softmax scores of the decoder layers in `layers` (None: unchanged), and an observer
    shown their attention probabilities."""

    layers: frozenset[int]
    edit: EditFunction | None
    observe: ObserveFunction | None = None


class _State:
    edit: ScoreEdit | None = None
    image: torch.Tensor | None = None  # [rows, columns]: key columns holding image tokens
    system: torch.Tensor | None = None  # [rows, columns]: real columns before a row's first image token
    previous: str | None = None  # the implementation the layers the edit does not name keep


def editing() -> bool:
    """True inside `score_edit`: attention then depends on each row's image columns, not only on its tokens."""
    return _State.edit is not None


def set_columns(image_mask: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Record the key columns of the coming forward: image tokens, and the system/prompt text before them."""
    if _State.edit is None:
        return
    image = image_mask.bool()
    before_image = image.long().cumsum(-1) == 0
    _State.image = image
    _State.system = attention_mask.bool() & before_image & image.any(-1, keepdim=True)


def _causal(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    return torch.arange(keys, device=device)[None] <= torch.arange(queries, device=device)[:, None] + (keys - queries)


def _edited_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs):
    """The model's own attention, except in the layers the active `ScoreEdit` names: there eager attention with
    the edit applied to the scores, and the probabilities shown to its observer."""
    edit = _State.edit
    named = edit is not None and getattr(module, "layer_idx", None) in edit.layers and _State.image is not None
    if not named and _State.previous == "sdpa":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    n_keys = key.shape[2]
    if named and edit.edit is not None:
        scores = edit.edit(scores, _State.image[:, :n_keys], _State.system[:, :n_keys])
    if attention_mask is None:
        allowed = _causal(query.shape[2], n_keys, query.device)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :n_keys]
    else:
        allowed = attention_mask[..., :n_keys] == 0
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1, dtype=torch.float32)
    if named and edit.observe is not None:
        edit.observe(probs)
    return torch.matmul(probs.to(query.dtype), value).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register the attention function and its mask builder (idempotent; done on first use, not on import)."""
    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _edited_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def score_edit(vlm, edit: ScoreEdit) -> Iterator[None]:
    """Apply `edit` to the language model's attention for the body of the `with`; restored on exit."""
    _register()
    config = vlm.text_config
    previous = config._attn_implementation
    _State.edit, _State.image, _State.system, _State.previous = edit, None, None, previous
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _State.edit = _State.image = _State.system = None
