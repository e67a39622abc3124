"""Attribution patching: every head's knockout effect on the score-mode metric, estimated from one forward and
one backward pass per prompt and answer form.

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
and run only through the layers below it: about L/2 extra backward passes per prompt and answer form.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from halluscope.errors import InputError
from halluscope.sweep.engine import ScoreSetup
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

    handles = [vlm.o_proj(layer).register_forward_pre_hook(hook) for layer in range(vlm.n_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _tracked_residuals(vlm, captured: list) -> Iterator[None]:
    """Hooks that record the residual stream entering every decoder layer and leaving the last one."""

    def before(module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def after(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in vlm.layers]
    handles.append(vlm.layers[-1].register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _gradients(metric: torch.Tensor, heads: list[torch.Tensor], residuals: list[torch.Tensor], grad_drop: bool,
               keep_graph: bool) -> list[list[torch.Tensor]]:
    """The metric's gradient at every layer's `o_proj` input; with `grad_drop`, then per dropped layer d
    (1..L-1) the gradient at the `o_proj` inputs below d with the backward pass through layer d's blocks zeroed:
    the gradient at the residual stream after layer d (from the full backward) passes to the stream before it
    unchanged, then on down through layers d-1..0. Those cost about L/2 full backward passes together."""
    if not grad_drop:
        return [list(torch.autograd.grad(metric, heads, retain_graph=keep_graph))]
    full = torch.autograd.grad(metric, heads + residuals[2:], retain_graph=True)
    rows, after = [list(full[:len(heads)])], full[len(heads):]  # after[i]: the gradient entering layer i + 2
    for d in range(1, len(heads)):
        rows.append(list(torch.autograd.grad(residuals[d], heads[:d], grad_outputs=after[d - 1],
                                             retain_graph=keep_graph or d < len(heads) - 1)))
    return rows


def _references(vlm, captured: list, mode: str, means: torch.Tensor | None) -> list[torch.Tensor]:
    """Per layer, r - x of every head [rows, seq, heads, head_dim]: the knockout's change at alpha 0."""
    out = []
    for layer, x in enumerate(captured):
        heads = x.detach().view(*x.shape[:2], vlm.n_heads, vlm.head_dim)
        if mode == "mean":
            out.append(means[layer].to(heads)[None, None] - heads)
        else:
            out.append(-heads)
    return out


def attribution_scores(vlm, setup: ScoreSetup, *, estimator: str = "atp-star", mode: str = "zero",
                       alpha: float = 0.0, means: torch.Tensor | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Estimated change of each form's truth - claim log-probability difference under each single-head
    knockout ({form: [layer, head]}), and the clean difference ({form: value}).

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
    totals = {form: torch.zeros(rows, layers, vlm.n_heads) for form in setup.forms()}
    clean: dict[str, float] = {}
    with _frozen(vlm.model), torch.enable_grad():
        for slot, batch, indices in setup.inputs():
            heads: list[torch.Tensor] = []
            residuals: list[torch.Tensor] = []
            with _tracked_heads(vlm, heads), _tracked_residuals(vlm, residuals):
                logits = vlm.forward(batch, use_cache=False, logits_to_keep=slot.window(batch)).logits
            change = _references(vlm, heads, mode, means)
            metrics: dict[str, Any] = {}  # per form, the metric's terms read from this sequence
            for index, (logp, _) in word_scores(logits, slot.words, indices).items():
                word = slot.words[index]
                term = logp[0] if word.role == "truth" else -logp[0]
                metrics[word.form] = term if word.form not in metrics else metrics[word.form] + term
            for k, (form, metric) in enumerate(metrics.items()):
                clean[form] = clean.get(form, 0.0) + float(metric.detach())
                grads = _gradients(metric, heads, residuals, rows > 1, keep_graph=k < len(metrics) - 1)
                for row, row_grads in enumerate(grads):
                    for layer, g in enumerate(row_grads):
                        d = change[layer]
                        totals[form][row, layer] += (1 - alpha) * (g.view_as(d) * d).sum(dim=(0, 1, 3)).float().cpu()
    return {form: _combine(total, estimator) for form, total in totals.items()}, clean


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
