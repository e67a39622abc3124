"""OPERA: beam search that penalises candidates whose attention piles onto a few summary tokens, and goes back
when one summary token keeps drawing it.

Huang et al., "OPERA: Alleviating Hallucination in Multi-Modal Large Language Models via Over-Trust Penalty and
Retrospection-Allocation", CVPR 2024, arXiv:2311.17911. At every step each beam's `candidates` most likely tokens
are run one token ahead to read the last layer's self-attention (maximum over heads, renormalised per query).
On the local window of the reply (the candidate and the reply tokens before it, at most `window`) the weights
are scaled by sigma (`scale`); column j's over-trust score is the product of its weights at and below the
diagonal, and the largest (times 1e-7, the official code's constant) is the candidate's penalty. A beam picks
among its candidates only, scored log-softmax(logit - alpha * penalty). Retrospection: when the column that
leads (the mode over a beam's candidates, then over beams) has led in every beam for `threshold` steps, the
search goes back to the token after that summary token and picks again without the continuations it picked
there before, at most `max_rollbacks` times per position and at most `window` tokens back.

As in the official code, over the first `warmup` reply tokens a candidate gains alpha times its attention to the
image tokens instead of the penalty, and no rollback returns into them. Defaults: the paper's (5 beams, sigma
50, alpha 1, 5 candidates, r 15) and the official code's (window 512, warmup 10, 5 rollbacks per position).
Neutral: alpha 0 and max_rollbacks 0, which form no candidate set and read no attention: plain beam search with
`num_beams` beams (greedy decoding with one). The rollback searches one row at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged
from halluscope.errors import InputError

__all__ = ["OPERA", "OPERAConfig", "over_trust", "rollback_position"]

#: the official code multiplies every column product by this constant before taking the maximum
PRODUCT_SCALE = 1e-7


@dataclass(frozen=True)
class OPERAConfig(MethodConfig):
    num_beams: int = ranged(5, 1, integer=True, doc="beams of the search")
    alpha: float = ranged(1.0, 0.0, doc="weight of the over-trust penalty; 0 scores every token as beam search")
    scale: float = ranged(50.0, 0.0, low_open=True, doc="sigma, the factor on attention weights before the products")
    candidates: int = ranged(5, 1, integer=True, doc="tokens per beam that are scored with the penalty")
    window: int = ranged(512, 1, integer=True, doc="reply tokens the penalty reads; a rollback goes no further back")
    threshold: int = ranged(15, 1, integer=True, doc="r, the steps a column must lead in every beam to roll back")
    max_rollbacks: int = ranged(5, 0, integer=True, doc="rollbacks to one position at most; 0 turns retrospection off")
    warmup: int = ranged(10, 0, integer=True, doc="first reply tokens rewarded for image attention, never rolled into")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_rollbacks > 0 and self.num_beams == 1:
            raise InputError(f"opera max_rollbacks={self.max_rollbacks} needs beam search, but num_beams=1; pass "
                             f"num_beams >= 2 or max_rollbacks=0")


def over_trust(attention: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The over-trust penalty of local-window attention [..., w, w] (row i: query i over keys 0..w-1): the largest
    column score 1e-7 * prod_{i >= j} scale * attention[i, j], and the column j it comes from, each [...]."""
    w = attention.shape[-1]
    lower = torch.ones(w, w, dtype=torch.bool, device=attention.device).tril()
    factors = torch.where(lower, scale * attention, torch.ones_like(attention))
    scores = (PRODUCT_SCALE * factors.prod(-2)).clamp(max=torch.finfo(attention.dtype).max)  # inf would give NaN
    return scores.max(-1)


def rollback_position(leads: torch.Tensor, step: int, config: OPERAConfig, rollbacks: dict[int, int]) -> int | None:
    """Where retrospection sends the search at reply position `step`, or None.

    `leads` [beams, steps] holds each beam's leading column (a reply index) at every step kept so far, this one
    last. The column leading now (the mode over beams) must have led `threshold` times in every beam and lie past
    the warmup; the search then goes back to the token after it (to the column itself once that position has had
    `max_rollbacks`), at most `window` tokens back. `rollbacks` counts the rollbacks per position and is updated.
    """
    column = int(leads[:, -1].mode().values)
    if column < config.warmup or not bool(((leads == column).sum(-1) >= config.threshold).all()):
        return None
    position = column + 1
    if rollbacks.get(position, 0) >= config.max_rollbacks:
        position -= 1
    position = max(position, step - config.window)
    if not 1 <= position < step or rollbacks.get(position, 0) >= config.max_rollbacks:
        return None
    rollbacks[position] = rollbacks.get(position, 0) + 1
    return position


class OPERA(DecodingMethod):
    """Over-trust penalty and retrospection-allocation (Huang et al., CVPR 2024, arXiv:2311.17911): beam search
    whose candidates share one look-ahead forward per step, reading the last layer's attention through the attention
    function (eager attention in that layer only)."""

    name = "opera"
    Config = OPERAConfig

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self._vlm = None  # while decoding with the penalty or the rollback on
        self._width: int | None = None  # prompt columns of the cache, known from the first step
        self._seen = torch.zeros(0, 0, 0)  # [rows, reply, reply]: each reply token's attention to the reply
        self._ahead: list[torch.Tensor] | None = None  # while looking ahead: the candidates' attention [rows, k, keys]
        self._leads: list[torch.Tensor] = []  # per step: each beam's leading column [rows]
        self._rollbacks: dict[int, int] = {}
        self._back: int | None = None

    @property
    def rewinds(self) -> bool:
        return self.config.max_rollbacks > 0

    @contextmanager
    def applied(self, vlm, batch) -> Iterator[None]:
        from halluscope.decoding.attention import ScoreEdit, score_edit

        if self.config.alpha == 0 and self.config.max_rollbacks == 0:
            yield
            return
        self._vlm, self._width = vlm, None
        try:
            with score_edit(vlm, ScoreEdit(frozenset({vlm.n_layers - 1}), None, self._observe)):
                yield
        finally:
            self._vlm, self._seen, self._leads = None, torch.zeros(0, 0, 0), []

    def _observe(self, probs: torch.Tensor) -> None:
        """Keep the last layer's attention [rows, heads, queries, keys]: a look-ahead's candidates, each over the
        cache and its own column, or the rows of the reply tokens a forward fed (replacing those from their
        position on)."""
        weights = probs.amax(1)
        weights = weights / weights.sum(-1, keepdim=True)
        queries, keys = weights.shape[1:]
        if self._ahead is not None:  # k alternatives, each over the cache and its own column
            own = weights[:, :, keys - queries:].diagonal(dim1=1, dim2=2)
            self._ahead.append(torch.cat([weights[:, :, :keys - queries], own[..., None]], -1))
            return
        start = None if self._width is None else keys - queries - self._width
        if start is None or start < 0:  # the prefill
            return
        seen = weights.new_zeros(weights.shape[0], start + queries, start + queries)
        seen[:, :start, :start] = self._seen[:, :start, :start]
        seen[:, start:] = weights[:, :, self._width:]
        self._seen = seen

    def reorder(self, index: torch.Tensor) -> None:
        if self._vlm is not None:
            self._seen = self._seen[index]

    def step_logits(self, context):
        logits = context.logits[0]
        if self._vlm is None:
            return logits
        rows, step, c = context.rows, context.step, self.config
        n = rows.n
        if step == 0:  # a new search (one per row when rolling back)
            self._width, self._seen, self._leads, self._rollbacks = rows.width, logits.new_zeros(n, 0, 0), [], {}
        candidates = logits.topk(c.candidates, -1).indices  # [rows, candidates]
        self._ahead = []
        try:  # every candidate in one look-ahead forward
            rows.peek(self._vlm, candidates.repeat(rows.mask.shape[0] // n, 1))
            ahead = self._ahead[0][:n]  # [rows, candidates, keys]
        finally:
            self._ahead = None
        w = min(step + 1, c.window)
        low = step + 1 - w
        window = ahead.new_zeros(n, c.candidates, w, w)
        window[:, :, :w - 1, :w - 1] = self._seen[:, None, low:step, low:step]
        window[:, :, w - 1] = ahead[:, :, rows.width + low:]
        penalty, column = over_trust(window, c.scale)
        if step + 1 <= c.warmup:
            image = rows.image_columns[:n, None, :ahead.shape[-1]]
            penalty = -(ahead * image).sum(-1)
        if c.max_rollbacks > 0:
            self._leads.append((column + low).mode(-1).values)
            self._back = rollback_position(torch.stack(self._leads, -1), step, c, self._rollbacks)
            if self._back is not None:
                self._leads = self._leads[:self._back + 1]
        if c.alpha == 0:
            return logits
        scores = logits.float().gather(-1, candidates) - c.alpha * penalty
        return torch.full_like(logits, float("-inf"), dtype=torch.float32).scatter(-1, candidates, scores)

    def rewind(self, context):
        back, self._back = self._back, None
        return back
