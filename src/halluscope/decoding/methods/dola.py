"""DoLa: decoding by contrasting the final layer with the early layer whose next-token distribution differs most.

Chuang et al., "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language Models", ICLR 2024,
arXiv:2309.03883. At each token the premature layer M is the candidate layer whose early-exit distribution
q_M = softmax(lm_head(norm(h_M))) has the largest Jensen-Shannon divergence from the final q_N; the score is
log q_N - strength * log q_M over the tokens with q_N >= beta * max q_N. Candidate layers as in transformers'
implementation: "high" = every second layer of the upper half, "low" = of the lower half (indices of the hidden
states, 0 the embeddings), or a list such as "2,4". Paper defaults: strength 1, beta 0.1 (its repetition penalty
is left out: halluscope compares methods under one decoder). Neutral: strength 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, plausible, ranged
from halluscope.errors import InputError

__all__ = ["DoLa", "DoLaConfig", "candidate_layers", "jensen_shannon"]


@dataclass(frozen=True)
class DoLaConfig(MethodConfig):
    layers: str = "high"
    strength: float = ranged(1.0, 0.0, doc="weight of the premature layer's log-probabilities; 0 is neutral")
    beta: float = ranged(0.1, 0.0, 1.0, doc="plausibility cutoff, a fraction of the top token's probability")

    def __post_init__(self) -> None:
        super().__post_init__()
        text = str(self.layers).strip().lower()
        if text not in ("high", "low") and not all(p.strip().isdigit() for p in text.split(",") if p.strip()):
            raise InputError(f"dola layers={self.layers!r} is not valid; pass 'high', 'low' or layer indices such "
                             f"as '2,4'")


def candidate_layers(spec: str, n_layers: int) -> list[int]:
    """The candidate premature layers (hidden-state indices, 0 = embeddings) of a model with `n_layers`."""
    text = spec.strip().lower()
    if text in ("high", "low"):
        half = n_layers // 2
        layers = list(range(half, n_layers, 2) if text == "high" else range(0, half, 2))
    else:
        layers = sorted({int(p) for p in text.split(",") if p.strip()})
    if not layers or layers[-1] >= n_layers:
        raise InputError(f"dola layers {spec!r} select no layer of this {n_layers}-layer model; pass indices in "
                         f"0..{n_layers - 1}")
    return layers


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """JSD between distributions given as log-probabilities [..., vocab] -> [...]."""
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))


class DoLa(DecodingMethod):
    """Contrast of the final layer with the most divergent early layer (Chuang et al., ICLR 2024,
    arXiv:2309.03883): no extra forward; the candidate layers are read out in the final lm_head call."""

    name = "dola"
    Config = DoLaConfig

    def early_exit(self, vlm) -> list[int]:
        return [] if self.config.strength == 0 else candidate_layers(self.config.layers, vlm.n_layers)

    def step_logits(self, context):
        real = context.logits[0]
        if self.config.strength == 0:
            return real
        final = torch.log_softmax(real.float(), -1)
        early = torch.log_softmax(context.early, -1)
        chosen = jensen_shannon(final[None], early).argmax(0)  # [batch]: index into the candidate layers
        premature = early[chosen, torch.arange(real.shape[0], device=real.device)]
        return plausible(real, real - self.config.strength * premature, self.config.beta)
