"""Attention mass: how much of its attention a query row puts on image tokens, on the user's prompt text, on
the chat template and on the reply so far, per layer and head, with and without a head intervention.

The attention weights are recomputed from the post-RoPE queries and keys of the chosen query rows only,
captured by hooks during an ordinary (sdpa) forward: `q_proj`/`k_proj` outputs plus the `position_embeddings`
the decoder layer hands its attention module, rotated by the family's own `apply_rotary_pos_emb`. That costs
O(T) memory per query row and head instead of the O(T^2) per head of `output_attentions=True`, which would also
need eager attention (sdpa returns no weights) and would change the numerics of the run being analysed.

Token classes (`TOKEN_CLASSES`) of a key position:

- "image": the model's image tokens (`Batch.image_mask`; delimiters such as `<|vision_start|>` are template);
- "text": the tokens of the user's prompt text, located by aligning the rendered chat turn with the input ids;
- "template": every other prompt token (system prompt, role tags, BOS, image delimiters);
- "reply": teacher-forced reply tokens after the prompt (seen only by query rows inside the reply).

Query rows ("query" column): "prompt" = the last prompt position (it predicts the reply's first token);
"generated" = the mean over the reply positions up to and including the answer position; "answer" = the
position that predicts the answer token (the score-mode slot of `halluscope.sweep.engine.prepare_score`,
which equals "prompt" when the reply starts with its answer).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import pandas as pd
import torch

from halluscope.analysis.probabilities import PROMPT_SCHEMA, answer_setup, typed_table
from halluscope.errors import HalluscopeError, InputError
from halluscope.runs import locked_step

__all__ = [
    "TOKEN_CLASSES",
    "PAD_CLASS",
    "QUERY_KINDS",
    "SHARE_COLUMNS",
    "query_attention",
    "token_classes",
    "attention_shares",
    "attention_mass",
    "summarize_attention",
    "layer_head_matrix",
    "attention_step",
]

TOKEN_CLASSES = ("image", "text", "template", "reply")
QUERY_KINDS = ("prompt", "generated", "answer")
SHARE_COLUMNS = tuple(f"{c}_share" for c in TOKEN_CLASSES)
PAD_CLASS = -1

_MASS_SCHEMA = {**PROMPT_SCHEMA, "setting": "string", "query": "string", "layer": "int64", "head": "int64",
                "n_queries": "int64", **dict.fromkeys(SHARE_COLUMNS, "float64")}

Reduce = Callable[[int, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ capture


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(attn: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The rotary embedding the attention module's own modeling file applies (`apply_rotary_pos_emb`).

    Falls back to the standard rotate-half form when the module defines none.
    """
    own = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if own is not None:
        return lambda x, cos, sin: own(x, x, cos, sin)[0]
    return lambda x, cos, sin: x * cos[:, None] + _rotate_half(x) * sin[:, None]


class _QueryCapture:
    """Hooks on every layer's attention that rebuild the attention rows of `positions` from q, k and RoPE."""

    def __init__(self, vlm, positions: torch.Tensor, key_mask: torch.Tensor, reduce: Reduce,
                 layers: Sequence[int]) -> None:
        self.vlm = vlm
        self.positions = positions  # [batch, rows]
        self.key_mask = key_mask.bool()  # [batch, seq]
        self.reduce = reduce
        self.layers = list(layers)
        self.out: list[Any] = [None] * vlm.n_layers
        self.seen: set[int] = set()
        self._state: dict[int, dict[str, Any]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_QueryCapture":
        for layer in self.layers:
            attn = self.vlm.attention(layer)
            for name in ("q_proj", "k_proj"):
                if not isinstance(getattr(attn, name, None), torch.nn.Module):
                    raise HalluscopeError(f"attention module {type(attn).__name__} of layer {layer} has no {name}; "
                                          "attention mass needs separate q_proj/k_proj projections")
            self._handles += [
                attn.register_forward_pre_hook(self._pre(layer), with_kwargs=True),
                attn.q_proj.register_forward_hook(self._grab(layer, "q")),
                attn.k_proj.register_forward_hook(self._grab(layer, "k")),
                attn.register_forward_hook(self._post(layer, attn)),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state.clear()

    def _pre(self, layer: int):
        def hook(module, args, kwargs):
            embeddings = kwargs.get("position_embeddings")
            if embeddings is None:
                raise HalluscopeError(f"{type(module).__name__} of layer {layer} got no position_embeddings; this "
                                      "family applies RoPE inside attention, which attention mass does not support")
            self._state[layer] = {"rope": embeddings}
        return hook

    def _grab(self, layer: int, what: str):
        def hook(module, args, output):
            if layer in self._state:
                self._state[layer][what] = output
        return hook

    def _post(self, layer: int, attn: torch.nn.Module):
        rope = _rope(attn)
        n_heads, n_kv = self.vlm.n_heads, self.vlm.n_kv_heads
        head_dim = getattr(attn, "head_dim", None) or self.vlm.head_dim
        scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        window = getattr(attn, "sliding_window", None)

        def hook(module, args, output):
            state = self._state.pop(layer)
            q, k = state["q"].float(), state["k"].float()
            cos, sin = (t.float() for t in state["rope"])
            batch, seq, _ = k.shape
            if k.shape[1] != self.key_mask.shape[1]:
                raise HalluscopeError(f"layer {layer} saw {k.shape[1]} keys but the batch has {self.key_mask.shape[1]} "
                                      "positions; run the forward without a KV cache (use_cache=False)")
            rows = self.positions.shape[1]
            index = torch.arange(batch, device=q.device)[:, None]
            cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
            q_rows = q[index, self.positions].view(batch, rows, n_heads, head_dim).transpose(1, 2)
            q_rows = rope(q_rows, cos[index, self.positions], sin[index, self.positions])  # [b, H, r, d]
            keys = rope(k.view(batch, seq, n_kv, head_dim).transpose(1, 2), cos, sin)  # [b, KV, T, d]
            groups = n_heads // n_kv  # query head h reads kv head h // groups
            scores = torch.einsum("bkgrd,bktd->bkgrt", q_rows.reshape(batch, n_kv, groups, rows, head_dim), keys)
            scores = scores.reshape(batch, n_heads, rows, seq) * scaling
            key_index = torch.arange(seq, device=q.device)
            allowed = (key_index[None, None, :] <= self.positions[:, :, None]) & self.key_mask[:, None, :]
            if window:
                allowed &= key_index[None, None, :] > self.positions[:, :, None] - window
            weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
            self.out[layer] = self.reduce(layer, weights)
            self.seen.add(layer)
        return hook


def query_attention(vlm, batch, positions: torch.Tensor | Sequence[Sequence[int]], *,
                    reduce: Reduce | None = None, layers: Sequence[int] | None = None) -> list[Any]:
    """Attention weights of the query rows `positions`, per layer: `[batch, head, row, key]` float32.

    One forward pass without KV cache (under whatever interventions are active) with hooks that recompute
    softmax(q k^T * scaling) for the chosen rows from post-RoPE q and k, with the causal and padding masks
    (and a sliding window when the layer has one). Equal to eager attention weights, without eager attention.

    Args:
        batch: a `Batch` (`vlm.encode`, possibly with reply tokens appended).
        positions: `[batch, rows]` absolute positions of the query rows; each must be a non-pad token.
        reduce: `reduce(layer, weights)` maps each layer's weights to what is kept (default: the weights),
            e.g. class shares, so only O(rows x keys) is held per layer.
        layers: capture only these layers (default: all).

    Returns:
        One entry per decoder layer: `reduce(layer, weights)` of that layer (None for layers not captured).

    Raises:
        InputError: `positions` has the wrong shape, lies outside the batch or on a pad token.

    Example:
        >>> rows = query_attention(vlm, batch, [[batch.seq_len - 1]])
        >>> rows[0].shape  # [batch, head, 1, seq]
    """
    pos = torch.as_tensor(positions, dtype=torch.long, device=batch.input_ids.device)
    if pos.ndim != 2 or pos.shape[0] != len(batch):
        raise InputError(f"positions has shape {tuple(pos.shape)}; expected [batch={len(batch)}, rows]")
    if pos.numel() and (pos.min() < 0 or pos.max() >= batch.seq_len):
        raise InputError(f"positions {pos.tolist()} fall outside the batch's {batch.seq_len} positions; "
                         f"pass indices in 0..{batch.seq_len - 1}")
    mask = batch.attention_mask.bool()
    if not bool(mask.gather(1, pos).all()):
        raise InputError(f"positions {pos.tolist()} include pad tokens; query only real tokens "
                         "(the batch is left-padded, so a row's tokens end at the last position)")
    wanted = list(range(vlm.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    if any(not 0 <= l < vlm.n_layers for l in wanted):
        raise InputError(f"layers {wanted} fall outside the model's layers 0..{vlm.n_layers - 1}")
    capture = _QueryCapture(vlm, pos, mask, reduce or (lambda layer, weights: weights), wanted)
    with capture, torch.inference_mode():
        vlm.forward(batch, use_cache=False, logits_to_keep=1)
    missing = sorted(set(wanted) - capture.seen)
    if missing:
        raise HalluscopeError(f"layers {missing} ran no attention during the forward; cannot capture their queries")
    return capture.out


# --------------------------------------------------------------------------------------- token classes


def _prompt_span(vlm, prompt: str, row_ids: list[int]) -> tuple[int, int]:
    """[start, end) of the user's prompt text inside `row_ids` (the row's tokens up to the end of the prompt)."""
    rendered = vlm.render(prompt)
    text = prompt if prompt in rendered else prompt.strip()
    start_char = rendered.rfind(text)
    if start_char < 0:
        raise HalluscopeError(f"the {vlm.family.name} chat template does not contain the prompt text {prompt!r} "
                              "verbatim; cannot tell prompt tokens from template tokens")
    end_char = start_char + len(text)
    enc = vlm.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (s, e) in enumerate(offsets) if s < end_char and e > start_char and e > s]
    if not inside:
        raise HalluscopeError(f"no token of the rendered {vlm.family.name} template overlaps the prompt {prompt!r}")
    first, last = inside[0], inside[-1] + 1
    tail = ids[first:]  # the prompt and the template after it: unchanged by the processor's image expansion
    if row_ids[len(row_ids) - len(tail):] == tail:
        start = len(row_ids) - len(tail)
        return start, start + (last - first)
    needle = ids[first:last]  # fallback: the last occurrence of the prompt's tokens
    for start in range(len(row_ids) - len(needle), -1, -1):
        if row_ids[start:start + len(needle)] == needle:
            return start, start + len(needle)
    raise HalluscopeError(f"cannot find the tokens of prompt {prompt!r} in the {vlm.family.name} input ids; the "
                          "processor tokenizes the prompt differently from the tokenizer alone")


def token_classes(vlm, batch, prompts: Sequence[str], prompt_len: int | None = None) -> torch.Tensor:
    """The class of every position, `[batch, seq]` int8: indices into `TOKEN_CLASSES`, -1 on padding.

    Args:
        batch: the encoded prompts, possibly with reply tokens appended after position `prompt_len`.
        prompts: each row's user prompt text (what was passed to `vlm.encode`).
        prompt_len: the length of the encoded prompts before any reply tokens (default: the whole batch).

    Raises:
        InputError: `prompts` does not have one entry per row.
        HalluscopeError: the prompt text cannot be located in a row's tokens.
    """
    if len(prompts) != len(batch):
        raise InputError(f"got {len(prompts)} prompts for a batch of {len(batch)} rows; pass one prompt per row")
    end = batch.seq_len if prompt_len is None else int(prompt_len)
    classes = torch.full((len(batch), batch.seq_len), TOKEN_CLASSES.index("template"), dtype=torch.int8)
    classes[:, end:] = TOKEN_CLASSES.index("reply")
    ids = batch.input_ids.cpu()
    for row, prompt in enumerate(prompts):
        start, stop = _prompt_span(vlm, prompt, ids[row, :end].tolist())
        classes[row, start:stop] = TOKEN_CLASSES.index("text")
    classes[batch.image_mask.cpu()] = TOKEN_CLASSES.index("image")
    classes[~batch.attention_mask.bool().cpu()] = PAD_CLASS
    return classes


def attention_shares(vlm, batch, positions, classes: torch.Tensor) -> torch.Tensor:
    """Share of attention on each token class: `[batch, layer, head, row, class]` (classes of `TOKEN_CLASSES`).

    Example:
        >>> shares = attention_shares(vlm, batch, [[batch.seq_len - 1]], token_classes(vlm, batch, [prompt]))
        >>> shares[0, :, :, 0, TOKEN_CLASSES.index("image")]  # [layer, head] image share of the last position
    """
    onehot = torch.zeros(*classes.shape, len(TOKEN_CLASSES), dtype=torch.float32, device=batch.input_ids.device)
    real = classes >= 0
    onehot[real] = torch.nn.functional.one_hot(classes[real].long(), len(TOKEN_CLASSES)).float().to(onehot.device)
    per_layer = query_attention(vlm, batch, positions,
                                reduce=lambda layer, w: torch.einsum("bhrt,btc->bhrc", w, onehot).cpu())
    return torch.stack(per_layer, dim=1)


# ------------------------------------------------------------------------------------------- tables


def _setting_rows(vlm, prompt, setup, prompt_len: int, setting: str) -> list[dict[str, Any]]:
    batch = setup.slots[0].batch  # the clean reply up to the answer word: its last position predicts the word
    positions = list(range(prompt_len - 1, batch.seq_len))
    classes = token_classes(vlm, batch, [prompt.prompt], prompt_len)
    shares = attention_shares(vlm, batch, [positions], classes)[0].numpy()  # [layer, head, row, class]
    kinds = {"prompt": shares[:, :, :1], "answer": shares[:, :, -1:]}
    if len(positions) > 1:
        kinds["generated"] = shares[:, :, 1:]
    rows = []
    for kind in QUERY_KINDS:
        if kind not in kinds:
            continue
        block = kinds[kind]
        mean = block.mean(axis=2)  # [layer, head, class]
        for layer in range(mean.shape[0]):
            for head in range(mean.shape[1]):
                rows.append({"sample_id": prompt.sample_id, "condition": prompt.condition, "truth": prompt.truth,
                             "claim": prompt.claim, "setting": setting, "query": kind, "layer": layer, "head": head,
                             "n_queries": block.shape[2],
                             **{c: float(v) for c, v in zip(SHARE_COLUMNS, mean[layer, head])}})
    return rows


def attention_mass(vlm, prompts: Sequence, heads, *, mode: str = "zero", means: torch.Tensor | None = None,
                   max_new_tokens: int = 50, on_prompt: Callable[[], None] | None = None,
                   on_skip: Callable[[str, str], None] | None = None) -> pd.DataFrame:
    """Per prompt, layer and head: the attention shares of the query rows, baseline and with `heads` ablated.

    Each setting generates its own greedy reply (the ablated one under the ablation: the true generation
    context) up to the answer, then teacher-forces it in one forward with the query rows captured.

    Args:
        prompts: `RunPrompt`s (`halluscope.analysis.probabilities.run_prompts`).
        heads: the (layer, head) set to ablate in the "ablated" setting.
        mode: "zero" (knockout) or "mean" (needs `means`).
        on_prompt: called after each prompt (progress); on_skip(sample_id, reason) for prompts that cannot be
            placed (e.g. a tokenizer that merges the reply into the template).

    Returns:
        One row per (sample_id, setting, query, layer, head): `sample_id, condition, truth, claim, setting,
        query, layer, head, n_queries` and `image_share, text_share, template_share, reply_share` (sum 1).

    Raises:
        InputError: an unknown mode, or heads outside the model.

    Example:
        >>> table = attention_mass(vlm, run_prompts(baseline, samples), {(0, 3)})
    """
    from halluscope.interventions.heads import HeadIntervention, intervene

    if mode not in ("zero", "mean"):
        raise InputError(f"attention mass ablates with mode 'zero' or 'mean', got {mode!r}")
    iv = HeadIntervention(frozenset(heads), mode=mode, alpha=0.0)
    iv.check(vlm.n_layers, vlm.n_heads)
    rows: list[dict[str, Any]] = []
    for prompt in prompts:
        prompt_len = vlm.encode([(prompt.image, prompt.prompt)]).seq_len
        for setting in ("baseline", "ablated"):
            edit = nullcontext() if setting == "baseline" else intervene(vlm, iv, means=means)
            with edit:
                try:
                    setup = answer_setup(vlm, prompt, max_new_tokens=max_new_tokens)
                except InputError as exc:
                    if on_skip is not None:
                        on_skip(prompt.sample_id, f"{setting}: {exc}")
                    continue
                rows += _setting_rows(vlm, prompt, setup, prompt_len, setting)
        if on_prompt is not None:
            on_prompt()
    return typed_table(rows, _MASS_SCHEMA, prompts)


def summarize_attention(table: pd.DataFrame) -> pd.DataFrame:
    """Mean shares over prompts per (condition, setting, query, layer, head), with `n` prompts.

    Raises:
        InputError: `table` lacks the columns of `attention_mass`.
    """
    keys = ["condition", "setting", "query", "layer", "head"]
    missing = [c for c in [*keys, *SHARE_COLUMNS] if c not in table.columns]
    if missing:
        raise InputError(f"attention table lacks columns {missing}; pass the output of attention_mass()")
    grouped = table.groupby(keys, sort=False, observed=True)
    out = grouped[list(SHARE_COLUMNS)].mean()
    out.insert(0, "n", grouped.size())
    out = out.reset_index()
    from halluscope.metrics.pih import condition_sort_key

    order = sorted(range(len(out)), key=lambda i: (
        condition_sort_key(out["condition"].iloc[i]), out["setting"].iloc[i] != "baseline",
        QUERY_KINDS.index(out["query"].iloc[i]), int(out["layer"].iloc[i]), int(out["head"].iloc[i])))
    return out.iloc[order].reset_index(drop=True)


def layer_head_matrix(summary: pd.DataFrame, column: str, *, setting: str, query: str,
                      n_layers: int, n_heads: int) -> np.ndarray:
    """A `[layer, head]` matrix of `column`, averaged over conditions (weighted by n); NaN where absent."""
    sub = summary[(summary["setting"] == setting) & (summary["query"] == query)]
    matrix = np.full((n_layers, n_heads), np.nan)
    if sub.empty:
        return matrix
    weighted = (sub[column] * sub["n"]).groupby([sub["layer"], sub["head"]]).sum()
    total = sub["n"].groupby([sub["layer"], sub["head"]]).sum()
    for (layer, head), value in (weighted / total).items():
        matrix[int(layer), int(head)] = value
    return matrix



@locked_step  # one writer per run, for the whole step
def attention_step(run_dir, *, heads: str, intervention: str = "zero", conditions=None, limit: int | None = None,
                   max_new_tokens: int | None = None, force: bool = False, vlm=None, progress=None,
                   warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`halluscope attention`: attention mass of a run's prompts, baseline vs `heads` ablated.

    Writes attention.parquet (`summarize_attention`), attention_samples.parquet (per prompt) and the figures
    of `halluscope.plots.analysis_figures.attention_plots`. Resumes from finished shards under RUN/parts/attention/.

    Args:
        run_dir: an eval run.
        heads: a set name from the run's ranking ("best3") or "L0H3,L11H15".
        intervention: "zero" or "mean" (needs `halluscope means`).
        conditions, limit: which prompts (default all).
        max_new_tokens: reply budget up to the answer (default: the eval run's).
        vlm: the run's model if already loaded; progress: a `halluscope.steps.Progress`; warn: gets one line per
            skipped prompt.

    Returns:
        {"heads", "prompts", "skipped", "image_share_last_prompt_position": {setting: mean}}.

    Raises:
        RunError: no run, no baseline table, or every prompt skipped. InputError: bad heads or conditions.

    Example:
        >>> attention_step("runs/count", heads="best3")
    """
    from halluscope.analysis.probabilities import compute_in_shards, missing_prompts, open_analysis, skip_reporter
    from halluscope.errors import RunError
    from halluscope.interventions.heads import format_heads
    from halluscope.plots.analysis_figures import attention_plots
    from halluscope.steps import no_progress

    a = open_analysis(run_dir, "attention", heads=heads, intervention=intervention, conditions=conditions,
                      limit=limit, max_new_tokens=max_new_tokens, force=force, vlm=vlm)
    run, head_set, prompts, vlm = a.run, a.head_set, a.prompts, a.vlm
    on_skip = skip_reporter(warn, [])
    table = compute_in_shards(
        run, "attention", prompts, progress=progress or no_progress,
        description=f"attention {format_heads(head_set)}",
        compute=lambda chunk, advance: attention_mass(vlm, chunk, head_set, mode=intervention, means=a.means,
                                                      max_new_tokens=a.budget, on_prompt=advance, on_skip=on_skip))
    if table.empty:
        raise RunError(f"no prompt of {run.path} could be analysed (all skipped); see the skip messages")
    summary = summarize_attention(table)
    run.write_table("attention_samples", table)
    run.write_table("attention", summary)
    attention_plots(summary, run.plots_dir, vlm.n_layers, vlm.n_heads, label=format_heads(head_set))
    last = summary[summary["query"] == "prompt"]
    image_share = {s: float(last.loc[last["setting"] == s, "image_share"].mean())
                   for s in ("baseline", "ablated") if (last["setting"] == s).any()}
    result = {"heads": format_heads(head_set), "prompts": int(table["sample_id"].nunique()),
              "skipped": missing_prompts(prompts, table), "image_share_last_prompt_position": image_share}
    run.finish_step("attention", result)
    return result
