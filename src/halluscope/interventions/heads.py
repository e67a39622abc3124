"""Attention-head interventions at the input of each decoder layer's `o_proj`.

The `o_proj` input is the concatenation of the per-query-head attention outputs ([batch, seq, heads*head_dim],
head-major), so editing a slice there removes exactly one query head's contribution, also under grouped-query
attention. Every mode is the same edit, x_h <- r_h + alpha * (x_h - r_h), with a different replacement r_h:

- "zero": r = 0 (alpha 0 knocks the head out);
- "scale": r = 0, i.e. the head is multiplied by alpha (the name for alpha != 0);
- "mean": r = a per-(layer, head) mean over a reference set (`compute_head_means`), fixed across inputs;
- "reference-mean": r = the mean of the head over the current row's own (non-pad) positions, recomputed in
  each forward, as the PIH reference study did. It only acts on prefill calls: on a cached decode step the
  mean of one position is the position itself, which makes the reference's ablation a no-op there.

`positions` says which forward calls are edited: "all", "prompt" (prefill calls, seq > 1) or "generated"
(cached decode calls, seq == 1).

Hooks are registered once per context and switched by tensors: `HeadHooks.set(coef)` takes a coefficient
tensor [batch, layer, head] (1 = untouched), so one batch can carry a different intervention in every row.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from halluscope.errors import InputError

__all__ = ["MODES", "MODE_NOTES", "POSITIONS", "HeadIntervention", "HeadHooks", "intervene", "parse_heads",
           "format_heads",
           "compute_head_means"]

MODES = ("zero", "scale", "mean", "reference-mean")
# what a run manifest records beside a mode whose name alone would mislead
MODE_NOTES = {
    "reference-mean": "the PIH reference study's edit: each head replaced by its mean over the row's prompt "
                      "positions on the prefill forward only; cached decode steps (and, in score mode, the "
                      "teacher-forced reply) are left unedited, as the reference's hook was a no-op there",
}
POSITIONS = ("all", "prompt", "generated")
_HEAD = re.compile(r"^L(\d+)H(\d+)$", re.IGNORECASE)


def parse_heads(text: str) -> frozenset[tuple[int, int]]:
    """Parse "L0H3,L11H15" into {(0, 3), (11, 15)}."""
    heads = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = _HEAD.match(part)
        if not match:
            raise InputError(f"malformed head {part!r} in {text!r}; write heads as L<layer>H<head>, e.g. L0H3,L11H15")
        heads.add((int(match[1]), int(match[2])))
    if not heads:
        raise InputError(f"no heads in {text!r}; write heads as L<layer>H<head>, e.g. L0H3,L11H15")
    return frozenset(heads)


def format_heads(heads: Iterable[tuple[int, int]]) -> str:
    """Format heads as "L0H3,L11H15" (sorted by layer, then head)."""
    return ",".join(f"L{layer}H{head}" for layer, head in sorted(heads))


@dataclass(frozen=True)
class HeadIntervention:
    """Which heads to edit, how, and where. See the module docstring for the modes."""

    heads: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    mode: str = "zero"
    alpha: float = 0.0
    positions: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _head_pairs(self.heads))
        object.__setattr__(self, "alpha", _finite_alpha(self.alpha))
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise InputError(f"unknown intervention mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise InputError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}")

    def check(self, n_layers: int, n_heads: int) -> None:
        """Raise if a head is outside a model with `n_layers` x `n_heads`."""
        bad = [(l, h) for l, h in self.heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
        if bad:
            raise InputError(f"heads {format_heads(bad)} are out of range; this model has layers 0..{n_layers - 1} "
                             f"and heads 0..{n_heads - 1}")


_PAIRS_HINT = "pass (layer, head) pairs of non-negative integers, e.g. {(0, 3), (11, 15)}"


def _index(value: object) -> int | None:
    """`value` as an int if it is an integer (Python, numpy or 0-d torch), else None; bools are not integers."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _head_pairs(heads: object) -> frozenset[tuple[int, int]]:
    """`heads` as a frozenset of (layer, head) int pairs, or an InputError naming the first bad entry."""
    if isinstance(heads, str):
        raise InputError(f"heads {heads!r} is a string; parse it with parse_heads({heads!r}) or {_PAIRS_HINT}")
    try:
        entries = list(heads)  # type: ignore[call-overload]
    except TypeError:
        raise InputError(f"heads {heads!r} is not a collection; {_PAIRS_HINT}") from None
    pairs = set()
    for entry in entries:
        pair = tuple(entry) if isinstance(entry, (tuple, list)) else ()
        layer, head = [_index(v) for v in pair] if len(pair) == 2 else (None, None)
        if layer is None or head is None or layer < 0 or head < 0:
            raise InputError(f"bad head {entry!r} in heads; {_PAIRS_HINT}")
        pairs.add((layer, head))
    return frozenset(pairs)


def _finite_alpha(alpha: object) -> float:
    """`alpha` as a float, or an InputError if it is not a finite real number."""
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, torch.Tensor)):
        raise InputError(f"alpha {alpha!r} is not a number; pass a finite float (0 knocks the heads out, "
                         f"1 leaves them unchanged)")
    try:
        value = float(alpha)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
        raise InputError(f"alpha {alpha!r} is not a single number; pass a finite float such as 0.5") from None
    if not math.isfinite(value):
        raise InputError(f"alpha {alpha!r} is not finite; pass a finite float (0 knocks the heads out, "
                         f"1 leaves them unchanged)")
    return value


class HeadHooks:
    """One `o_proj` pre-hook per decoder layer, registered on enter and removed on exit (also on errors).

    Use `set(coef, ...)` to switch what the hooks do without re-registering them.
    """

    def __init__(self, vlm, *, means: torch.Tensor | None = None) -> None:
        self.vlm = vlm
        self.means = means  # [layer, head, head_dim] for mode "mean"
        self._handles: list = []
        self.coef: torch.Tensor | None = None
        self.mode, self.positions = "zero", "all"
        self.row_mask: torch.Tensor | None = None  # [batch, seq] non-pad positions, for "reference-mean"
        self._active_layers: frozenset[int] = frozenset()

    def __enter__(self) -> "HeadHooks":
        for layer in range(self.vlm.n_layers):
            self._handles.append(self.vlm.o_proj(layer).register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.coef = self.row_mask = None

    def clear(self) -> None:
        """Make every hook a no-op."""
        self.coef, self._active_layers = None, frozenset()

    def set(self, coef: torch.Tensor, *, mode: str = "zero", positions: str = "all",
            row_mask: torch.Tensor | None = None) -> None:
        """Switch the hooks: `coef` is [batch or 1, layer, head]; 1 leaves a head untouched."""
        if mode == "mean" and self.means is None:
            raise InputError("mode 'mean' needs per-head means; compute them with `halluscope means --run RUN` "
                             "or compute_head_means() and pass means=")
        if mode == "reference-mean" and row_mask is None:
            raise InputError("mode 'reference-mean' needs the batch's attention mask (row_mask=) to skip padding")
        self.coef = coef.to(self.vlm.device, self.vlm.dtype)
        self.mode, self.positions, self.row_mask = mode, positions, row_mask
        self._active_layers = frozenset((self.coef != 1).any(dim=(0, 2)).nonzero().flatten().tolist())

    def _applies(self, seq: int) -> bool:
        if self.mode == "reference-mean" and seq == 1:  # a one-position mean is the position itself: no-op
            return False
        if self.positions == "prompt":
            return seq > 1
        if self.positions == "generated":
            return seq == 1
        return True

    def _hook(self, layer: int):
        def hook(module, args):
            if layer not in self._active_layers or not self._applies(args[0].shape[1]):
                return None
            x = args[0]
            batch, seq, _ = x.shape
            heads = x.view(batch, seq, self.vlm.n_heads, self.vlm.head_dim)
            coef = self.coef[:, layer, :][:, None, :, None]  # [batch or 1, 1, head, 1]
            if self.mode in ("zero", "scale"):
                new = coef * heads
            elif self.mode == "mean":
                ref = self.means[layer].to(x.dtype)[None, None]
                new = torch.where(coef == 1, heads, ref + coef * (heads - ref))  # 1 leaves a head bit-identical
            else:  # reference-mean: each row's own position mean, over its non-pad positions
                mask = self.row_mask[:, -seq:].to(x.dtype)[:, :, None, None]
                ref = (heads * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
                new = torch.where(mask.bool() & (coef != 1), ref + coef * (heads - ref), heads)
            return (new.reshape(batch, seq, -1),)

        return hook


def _coefficients(interventions: Sequence[HeadIntervention], n_layers: int, n_heads: int) -> torch.Tensor:
    coef = torch.ones(len(interventions), n_layers, n_heads)
    for row, iv in enumerate(interventions):
        iv.check(n_layers, n_heads)
        for layer, head in iv.heads:
            coef[row, layer, head] = iv.alpha
    return coef


@contextmanager
def intervene(vlm, interventions: HeadIntervention | Sequence[HeadIntervention], *,
              means: torch.Tensor | None = None, row_mask: torch.Tensor | None = None) -> Iterator[HeadHooks]:
    """Apply one intervention to every row, or one per batch row, for the body of the `with`.

    All rows must share a mode and positions. Example:
        >>> with intervene(vlm, HeadIntervention({(0, 3)}, mode="zero")):
        ...     replies = vlm.generate(batch)
    """
    rows = [interventions] if isinstance(interventions, HeadIntervention) else list(interventions)
    if not rows:
        raise InputError("intervene() got no interventions; pass a HeadIntervention or one per batch row")
    modes = {(iv.mode, iv.positions) for iv in rows}
    if len(modes) > 1:
        raise InputError(f"rows mix modes/positions {sorted(modes)}; use one mode and positions per batch")
    mode, positions = modes.pop()
    with HeadHooks(vlm, means=means) as hooks:
        hooks.set(_coefficients(rows, vlm.n_layers, vlm.n_heads), mode=mode, positions=positions, row_mask=row_mask)
        yield hooks


@torch.inference_mode()
def compute_head_means(vlm, batches: Iterable) -> torch.Tensor:
    """The mean o_proj input of every (layer, head) over all non-pad positions of `batches`: [layer, head, head_dim].

    Used by mode "mean": a fixed reference activation, so the ablation carries no information about the input.
    """
    sums = torch.zeros(vlm.n_layers, vlm.n_heads, vlm.head_dim, dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def capture(layer):
        def hook(module, args):
            x = args[0].to(torch.float64)
            mask = current["mask"][:, :, None].to(torch.float64)
            sums[layer] += (x * mask).sum((0, 1)).view(vlm.n_heads, vlm.head_dim)
        return hook

    handles = [vlm.o_proj(l).register_forward_pre_hook(capture(l)) for l in range(vlm.n_layers)]
    try:
        for batch in batches:
            current["mask"] = batch.attention_mask
            count += batch.attention_mask.sum()
            vlm.forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise InputError("compute_head_means() got no positions; pass at least one non-empty batch")
    return (sums / count).to(torch.float32)
