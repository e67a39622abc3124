"""The adversarial soft prefix: k vectors in the language model's embedding space, placed between the instruction
and the response, trained with the model frozen so that the model's hallucinated responses become likely although
the image is there ("visual neglect"). ALEAHallu then edits the located parameters to answer from the image even
under this prefix.

The vectors enter through a forward hook on the token embeddings: the batch holds k ordinary slot tokens
(`ResponseBatch.slots`) and the hook puts the vectors in place of their embeddings, so every family computes its
positions and image features as for any text. They start as the embeddings of k real tokens (drawn with the seed),
at the scale of real embeddings, which ALEAHallu's N(0, 1) start is not.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from halluscope.errors import InputError
from halluscope.images import ImageLike
from halluscope.training.alea.optimise import batch_of, optimise, steps_for, trainable_only
from halluscope.training.sequences import encode_responses, response_nll

__all__ = ["SoftPrefix", "initial_prefix", "inserted", "mean_nll", "train_prefix"]

Row = tuple[ImageLike, str, Sequence[int]]


class SoftPrefix(nn.Module):
    """k trainable vectors [k, hidden] and the k token ids whose slots they replace (and were started from)."""

    def __init__(self, vectors: torch.Tensor, slot_ids: list[int]) -> None:
        super().__init__()
        if vectors.dim() != 2 or vectors.shape[0] != len(slot_ids) or not slot_ids:
            raise InputError(f"a soft prefix needs [k, hidden] vectors and k slot ids with k >= 1; got vectors of "
                             f"shape {tuple(vectors.shape)} and {len(slot_ids)} ids")
        self.vectors = nn.Parameter(vectors.detach().clone())
        self.slot_ids = [int(i) for i in slot_ids]

    def __len__(self) -> int:
        return len(self.slot_ids)


def initial_prefix(vlm, k: int, seed: int) -> SoftPrefix:
    """A prefix of `k` vectors started from the embeddings of `k` distinct ordinary tokens drawn with `seed`
    (special tokens and the image token excluded), in float32.

    Raises:
        InputError: k < 1, or a vocabulary with fewer than k ordinary tokens.
    """
    special = set(vlm.tokenizer.all_special_ids) | {vlm.image_token_id}
    size = vlm.embed_tokens.weight.shape[0]
    ordinary = [i for i in range(min(size, len(vlm.tokenizer))) if i not in special]
    if k < 1 or k > len(ordinary):
        raise InputError(f"--prefix-tokens {k}: expected 1..{len(ordinary)} (the model's ordinary tokens)")
    ids = sorted(random.Random(f"{seed}:alea-prefix").sample(ordinary, k))
    return SoftPrefix(vlm.embed_tokens.weight[ids].detach().float(), ids)


@contextmanager
def inserted(vlm, vectors: torch.Tensor, slots: torch.Tensor) -> Iterator[None]:
    """Within the block, the token embeddings at `slots` ([batch, seq] bool) are `vectors` ([k, hidden], k slots
    per row), gradients flowing into `vectors`. Calls whose input is not [batch, seq] (cached decode steps) pass
    through unchanged; the hook is removed on exit, also on errors."""
    per_row = slots.sum(1)
    if bool((per_row != vectors.shape[0]).any()):
        raise InputError(f"the batch has {per_row.tolist()} prefix slots per row but the prefix has "
                         f"{vectors.shape[0]} vectors; encode it with the prefix's slot ids")

    def hook(module, args, output):
        if output.shape[:2] != slots.shape:
            return output
        source = vectors.to(output.dtype).repeat(slots.shape[0], 1)
        return output.masked_scatter(slots[..., None].expand_as(output), source)

    handle = vlm.embed_tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _nll(vlm, rows: Sequence[Row], prefix: SoftPrefix | None, *, per_row: bool = False) -> torch.Tensor:
    """The responses' NLL given image, prompt and (if given) the prefix after the prompt."""
    batch = encode_responses(vlm, rows, prefix.slot_ids if prefix is not None else ())
    with inserted(vlm, prefix.vectors, batch.slots) if prefix is not None else nullcontext():
        logits = vlm.model(**batch.inputs).logits
    return response_nll(logits, batch, per_row=per_row)


@torch.no_grad()
def mean_nll(vlm, rows: Sequence[Row], prefix: SoftPrefix | None = None, *, batch_size: int = 16) -> float:
    """The mean over `rows` of each response's per-token NLL given its image and prompt, with `prefix` after the
    prompt when given: ALEAHallu's visual-neglect objective when the responses are the hallucinated ones."""
    totals = [_nll(vlm, rows[i:i + batch_size], prefix, per_row=True) for i in range(0, len(rows), batch_size)]
    return float(torch.cat(totals).mean())


def train_prefix(vlm, rows: Sequence[Row], *, tokens: int = 5, lr: float = 1e-3, epochs: int = 3,
                 batch_size: int = 4, seed: int = 0, state_path: Path, save_every: int = 50, log_every: int = 10,
                 log: Callable[[str], None] = print) -> tuple[SoftPrefix, list[dict]]:
    """Learn a `tokens`-vector prefix that makes the hallucinated responses of `rows` (image, prompt, response ids)
    likely, with the model frozen: AdamW on the NLL, `epochs` passes in mini-batches of `batch_size`, gradients
    zeroed every step (ALEAHallu's code never zeroes them). Resumes from `state_path` (`optimise`).

    Returns the prefix and the training log.
    """
    prefix = initial_prefix(vlm, tokens, seed)
    optimizer = torch.optim.AdamW([prefix.vectors], lr=lr, weight_decay=0.0)

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        chosen = [rows[i] for i in batch_of(step, len(rows), batch_size, seed=seed, stage="prefix")]
        return {"loss": _nll(vlm, chosen, prefix)}

    steps = steps_for(len(rows), batch_size, epochs)
    with trainable_only(vlm.model):
        history = optimise({"prefix": prefix.vectors}, optimizer, loss_at, steps=steps, state_path=state_path,
                           stage="prefix", save_every=save_every, log_every=log_every, log=log)
    return prefix, history
