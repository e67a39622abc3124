"""Attribution patching: every head's knockout effect on the score-mode metric, estimated from one forward and
one backward pass per prompt.

The metric is score mode's: the log-probability of the truth's whole word minus the claim's at the answer slot
(`halluscope.sweep.slot`). A knockout moves head h's `o_proj` input from x_h to r_h + alpha (x_h - r_h) at every
position (r = 0, or the head's mean), so to first order (Nanda 2023, "Attribution patching")

    effect(h) ~= sum over positions of (1 - alpha) (r_h - x_h) . dm/dx_h

with the gradient taken once, for all heads at the same time, at the clean forward. Only the `o_proj` inputs take
gradients (no weight gradients), so memory stays that of one forward's activations.

AtP* (Kramar et al. 2024, arXiv 2403.00745) addresses the first-order estimate's false negatives. Of its two
fixes, the query-key fix concerns patching a head's queries or keys, which a knockout at the head's output does
not; GradDrop concerns cancellation between the paths from a head to the metric: the gradient is recomputed
with the backward pass through each later layer's blocks dropped in turn (keeping the residual path), giving one
estimate per dropped layer. `atp-star` reports, per head, the GradDrop score (the mean absolute value of those
estimates) with the sign of the AtP estimate, so a head whose paths cancel in the plain estimate still ranks by
the size of its parts. The dropped-layer backward passes start from the full backward's gradient at the layer
and run only through the layers below it: about L/2 extra backward passes per prompt.

What one prompt costs: the image goes through the vision tower once. The teacher-forced sequences of one answer
slot (one per distinct word prefix) share the prompt and the clean reply up to the slot, so that prefix runs once
(one forward, keeping its keys and values) and each sequence continues from it with its own few tokens; the
backward pass then crosses the prefix once for all of them instead of once per sequence. The backward passes
(every answer form's full one and, for AtP*, every dropped-layer one) run together, one layer at a time, as one
batch of vector-Jacobian products per layer (`is_grads_batched`): L autograd calls per prompt with large
operands instead of L small ones per sequence and form, the same products. Nothing before the first layer's
`o_proj` takes gradients (the vision tower builds no graph). Sharing the prefix adds the sequences'
gradients at the prefix before the products with the knockout's change instead of after, and computes the
continuation tokens over cached keys with smaller matrix products: the estimates equal one forward and backward
per sequence to within float32 rounding, not bit for bit (within 1e-6 of the largest estimate on the tiny test
models, 5e-6 on the 70M benchmark model; the test allows 1e-5). A slot with one sequence runs it whole, bit for
bit as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from transformers import DynamicCache

from halluscope.errors import InputError
from halluscope.models.compat import cache_argument, output_cache
from halluscope.sweep.engine import ScoreSetup, _continued_positions, _vision_once
from halluscope.sweep.slot import word_scores

__all__ = ["ESTIMATORS", "attribution_scores", "estimate_rows"]

ESTIMATORS = ("atp", "atp-star")


@contextmanager
def _frozen(model) -> Iterator[None]:
    """The model's parameters without gradients for the body (only the captured activations take them)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@contextmanager
def _tracked_heads(vlm, captured: list) -> Iterator[None]:
    """Pre-hooks that make every layer's `o_proj` input part of the autograd graph and record it."""

    def hook(module, args):
        x = args[0]
        if not x.requires_grad:  # the first layer's: nothing before it takes gradients
            x = x.detach().requires_grad_(True)
        captured.append(x)
        return (x,)

    with _removed_after([vlm.o_proj(layer).register_forward_pre_hook(hook) for layer in range(vlm.n_layers)]):
        yield


@contextmanager
def _tracked_residuals(vlm, captured: list) -> Iterator[None]:
    """Hooks that record the residual stream entering every decoder layer and leaving the last one."""

    def before(module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def after(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in vlm.layers]
    with _removed_after([*handles, vlm.layers[-1].register_forward_hook(after)]):
        yield


@contextmanager
def _tracked_positions(vlm, captured: list) -> Iterator[None]:
    """A hook that records the position ids the text model is given (None where it derives them itself)."""

    def hook(module, args, kwargs):
        captured.append(kwargs.get("position_ids"))

    with _removed_after([vlm.text_model.register_forward_pre_hook(hook, with_kwargs=True)]):
        yield


@contextmanager
def _removed_after(handles: list) -> Iterator[None]:
    """Keep the hooks `handles` registered for the block and remove them after it, also on an exception."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Graph:
    """One prompt's forward with gradients: every call's `o_proj` inputs and residual streams, per layer and call
    (a call: a prefix, or a sequence continued from one), and per answer form the metric's terms per sequence."""

    heads: list[list[torch.Tensor]]  # [layer][call]: o_proj input [1, positions, hidden]
    residuals: list[list[torch.Tensor]]  # [layer][call]: the stream entering it; the last entry leaves the last layer
    terms: dict[str, list[torch.Tensor]]  # form -> its metric's part from each sequence, in sequence order


def _groups(setup: ScoreSetup, shared: bool) -> list[tuple[Any, list[tuple[Any, Any, list[int]]]]]:
    """(prefix batch, the input sequences that continue it) per forward: with `shared`, one per answer slot whose
    sequences share the slot's context (a slot with one sequence runs it whole); else one per sequence."""
    if not shared:
        return [(batch, [(slot, batch, indices)]) for slot, batch, indices in setup.inputs()]
    groups = []
    for slot in setup.slots:
        sequences = [(slot, batch, indices) for batch, indices in slot.inputs]
        groups.append((slot.batch if len(sequences) > 1 else sequences[0][1], sequences))
    return groups


def _window_logits(vlm, prefix, sequences: list[tuple[Any, Any, list[int]]]) -> list[torch.Tensor]:
    """Each sequence's logits over its scored window [1, window, vocab]: one forward over `prefix` (which every
    sequence extends), then each sequence's own tokens through the text model from the prefix's keys and values."""
    windows = [slot.window(batch) for slot, batch, _ in sequences]
    extra = [batch.seq_len - prefix.seq_len for _, batch, _ in sequences]
    keep = max(1, max(w - n for w, n in zip(windows, extra)))  # the prefix's last positions some window reads
    positions: list[torch.Tensor | None] = []
    with _tracked_positions(vlm, positions):
        out = vlm.forward(prefix, use_cache=any(extra), logits_to_keep=keep)
    kv = [(k, v) for k, v, *_ in output_cache(out)] if any(extra) else []
    logits = []
    for (_, batch, _), window, n in zip(sequences, windows, extra):
        pieces = [out.logits[:, keep - (window - n):]] if window > n else []
        if n:
            offsets = torch.arange(1, n + 1, device=batch.input_ids.device)[None]
            hidden = vlm.text_model(input_ids=batch.input_ids[:, prefix.seq_len:], attention_mask=batch.attention_mask,
                                    position_ids=_continued_positions(positions[0], prefix.seq_len - 1, offsets),
                                    use_cache=True, **{cache_argument(vlm.text_model): DynamicCache(kv)}
                                    ).last_hidden_state
            pieces.append(vlm.lm_head(hidden[:, -min(n, window):]))
        logits.append(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])
    return logits


def _forward(vlm, setup: ScoreSetup, shared: bool = True) -> _Graph:
    """The prompt's forward passes with every `o_proj` input taking gradients (see `_groups` for `shared`)."""
    heads: list[torch.Tensor] = []
    residuals: list[torch.Tensor] = []
    terms: dict[str, list[torch.Tensor]] = {}
    with _tracked_heads(vlm, heads), _tracked_residuals(vlm, residuals), _vision_once(vlm):
        for prefix, sequences in _groups(setup, shared):
            for (slot, _, indices), logits in zip(sequences, _window_logits(vlm, prefix, sequences)):
                own: dict[str, torch.Tensor] = {}
                for index, (logp, _) in word_scores(logits, slot.words, indices).items():
                    word = slot.words[index]
                    term = logp[0] if word.role == "truth" else -logp[0]
                    own[word.form] = term if word.form not in own else own[word.form] + term
                for form, term in own.items():
                    terms.setdefault(form, []).append(term)
    layers = vlm.n_layers
    calls = len(heads) // layers
    return _Graph([[heads[c * layers + l] for c in range(calls)] for l in range(layers)],
                  [[residuals[c * (layers + 1) + i] for c in range(calls)] for i in range(layers + 1)], terms)


def _grad(outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], grad_outputs: list[torch.Tensor],
          retain: bool) -> list[list[torch.Tensor | None]]:
    """Batched vector-Jacobian products [forms, *input shape] at `inputs` (grouped as given; None where no
    output depends on an input)."""
    flat = [t for group in inputs for t in group]
    grads = iter(torch.autograd.grad(outputs, flat, grad_outputs, retain_graph=retain, is_grads_batched=True,
                                     allow_unused=True))
    return [[next(grads) for _ in group] for group in inputs]


def _gradients(metrics: torch.Tensor, heads: list[list[torch.Tensor]], residuals: list[list[torch.Tensor]],
               grad_drop: bool) -> list[list[list[torch.Tensor | None]]]:
    """Per row, layer and call, the gradient of every metric [forms, *o_proj input shape] (`metrics`: [forms]).

    Row 0 is the full backward. With `grad_drop`, row d (1..L-1) holds the gradient at the `o_proj` inputs below
    layer d with the backward pass through layer d's blocks cut: the gradient at the residual stream after layer
    d (from the full backward) passes to the stream before it unchanged, then on down through layers d-1..0.
    Those cost about L/2 full backward passes together. The backward runs one layer at a time, as one batch of
    vector-Jacobian products per layer: every form's full backward and every dropped-layer backward still
    running (L autograd calls in all, instead of one per form and dropped layer; the same products).
    """
    forms, layers = len(metrics), len(heads)
    seeds = torch.eye(forms, dtype=metrics.dtype, device=metrics.device)
    if not grad_drop:
        return [_grad([metrics], heads, [seeds], retain=False)]
    rows: list[list[Any]] = [[None] * layers] + [[None] * d for d in range(1, layers)]
    # per call, the gradients at the stream leaving layer k, stacked [entries * forms, ...]: the full backward's,
    # then those with layer L-1, L-2, ..., k+1 dropped
    stack = _grad([metrics], [residuals[layers]], [seeds], retain=True)[0]
    for k in reversed(range(layers)):
        live = [(stream, grad) for stream, grad in zip(residuals[k + 1], stack) if grad is not None]
        got = _grad([s for s, _ in live], [heads[k]] + ([residuals[k]] if k else []), [g for _, g in live],
                    retain=k > 0)
        for entry in range(layers - k):  # entry e > 0 is the backward with layer L - e dropped
            rows[layers - entry if entry else 0][k] = [None if g is None else g[entry * forms:(entry + 1) * forms]
                                                       for g in got[0]]
        if k:
            stack = [_with_dropped(below, after, forms) for below, after in zip(got[1], stack)]
    return rows


def _with_dropped(below: torch.Tensor | None, after: torch.Tensor | None, forms: int) -> torch.Tensor | None:
    """One call's stack at the stream entering a layer: the running backward passes' gradients there (`below`),
    then the backward with this layer dropped, whose gradient there is the full backward's after the layer (the
    first `forms` of `after`). None stands for zeros (no metric depends on that stream)."""
    if below is None and after is None:
        return None
    below = torch.zeros_like(after) if below is None else below
    return torch.cat([below, torch.zeros_like(below[:forms]) if after is None else after[:forms]])


def _references(vlm, captured: list[list[torch.Tensor]], mode: str, means: torch.Tensor | None
                ) -> list[list[torch.Tensor]]:
    """Per layer and call, r - x of every head [1, positions, heads, head_dim]: the knockout's change at alpha 0."""
    out = []
    for layer, calls in enumerate(captured):
        changes = []
        for x in calls:
            heads = x.detach().view(*x.shape[:2], vlm.n_heads, vlm.head_dim)
            changes.append(means[layer].to(heads)[None, None] - heads if mode == "mean" else -heads)
        out.append(changes)
    return out


def attribution_scores(vlm, setup: ScoreSetup, *, estimator: str = "atp-star", mode: str = "zero",
                       alpha: float = 0.0, means: torch.Tensor | None = None, shared: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Estimated change of each form's truth - claim log-probability difference under each single-head
    knockout ({form: [layer, head]}), and the clean difference ({form: value}).

    Args:
        shared: run the teacher-forced sequences of an answer slot from one forward over their shared prefix
            (the fast path); False runs one whole forward per sequence (the naive path it is tested against).

    Raises:
        InputError: an unknown estimator or mode, or mode "mean" without means.
    """
    if estimator not in ESTIMATORS:
        raise InputError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if mode not in ("zero", "scale", "mean"):
        raise InputError(f"attribution patching estimates 'zero', 'scale' or 'mean' knockouts, not {mode!r}")
    if mode == "mean" and means is None:
        raise InputError("mode 'mean' needs per-head means; run `halluscope means --run RUN` first")
    layers = vlm.n_layers
    # row 0: every path (AtP); row d: layer d's blocks dropped on the way back (GradDrop, d = 1..L-1)
    rows = layers if estimator == "atp-star" else 1
    with _frozen(vlm.model), torch.enable_grad():
        graph = _forward(vlm, setup, shared)
        forms = list(graph.terms)
        clean = {form: sum(float(term.detach()) for term in graph.terms[form]) for form in forms}
        metrics = torch.stack([sum(graph.terms[form][1:], graph.terms[form][0]) for form in forms])
        change = _references(vlm, graph.heads, mode, means)
        totals = torch.zeros(len(forms), rows, layers, vlm.n_heads)
        for row, row_grads in enumerate(_gradients(metrics, graph.heads, graph.residuals, rows > 1)):
            for layer, calls in enumerate(row_grads):
                for grad, d in zip(calls, change[layer]):
                    if grad is not None:
                        per_form = (grad.view(len(forms), *d.shape) * d).sum(dim=(1, 2, 4))
                        totals[:, row, layer] += (1 - alpha) * per_form.float().cpu()
    return {form: _combine(totals[f], estimator) for f, form in enumerate(forms)}, clean


def _combine(total: torch.Tensor, estimator: str) -> torch.Tensor:
    """[layer, head] estimates from the per-row ones [rows, layer, head] (row 0: every path; row d: layer d's
    blocks dropped, filled for heads below d).

    AtP*'s GradDrop score (Kramar et al. 2024, section 3.2) averages |estimate with layer d dropped| over the
    L - 1 layers d other than the head's own; dropping a layer below the head leaves its estimate as AtP's.
    It is a magnitude; the sign is the AtP estimate's.
    """
    if estimator == "atp":
        return total[0]
    layers = total.shape[1]
    out = torch.empty_like(total[0])
    for layer in range(layers):
        plain = total[0, layer]
        later = total[layer + 1:, layer].abs().sum(0) if layer + 1 < layers else torch.zeros_like(plain)
        out[layer] = torch.sign(plain) * (layer * plain.abs() + later) / max(layers - 1, 1)
    return out


def estimate_rows(vlm, setup: ScoreSetup, heads: Sequence[tuple[int, int]], clean: dict[str, float],
                  estimates: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Sweep-table rows for `heads`: the estimated logit differences (clean + estimated change), the estimated
    effect (mean change over forms) and the outcome the estimate favours."""
    rows = []
    for layer, head in heads:
        row: dict[str, Any] = {}
        effects = []
        for form, (n_truth, n_claim) in setup.forms().items():
            change = float(estimates[form][layer, head])
            effects.append(change)
            row[f"logit_diff_{form}"] = clean[form] + change
            row[f"tokens_truth_{form}"], row[f"tokens_claim_{form}"] = n_truth, n_claim
        row["effect"] = sum(effects) / len(effects)
        row["outcome"] = "corrected" if any(row[f"logit_diff_{f}"] > 0 for f in setup.forms()) else "copied"
        rows.append(row)
    return rows
