"""Head ablation while decoding: the heads a knockout sweep found (a run's ranked set, or named heads) scaled at
their `o_proj` input on every forward, prompt and generated tokens alike.

Rudman et al., "Mechanisms of Prompt-Induced Hallucination in Vision-Language Models", ACL 2026,
arXiv:2601.05201: knocking out a few early heads reduces copying of a prompt's false count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged
from halluscope.errors import InputError

__all__ = ["HeadAblation", "HeadAblationConfig"]


@dataclass(frozen=True)
class HeadAblationConfig(MethodConfig):
    """`heads`: "L0H1,L1H2", or a ranked set of a run, "best3@runs/count" (its heads.json); `alpha`: the heads'
    scale (0 knocks them out, 1 leaves them unchanged: the neutral setting)."""

    heads: str = ""
    alpha: float = ranged(0.0, doc="scale of the heads' outputs; 0 knocks them out, 1 is neutral")


class HeadAblation(DecodingMethod):
    """Heads knocked out (or scaled by `alpha`) at their `o_proj` input for the whole reply.

    Rudman et al., ACL 2026, arXiv:2601.05201. Costs nothing per token beyond the hooks.
    """

    name = "heads"
    Config = HeadAblationConfig

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        if not self.config.heads.strip():
            raise InputError("method 'heads' needs heads; pass heads='L0H1,L1H2' or heads='best3@RUN' (a ranked run)")

    def resolve(self, vlm) -> frozenset[tuple[int, int]]:
        """The (layer, head) pairs named by the config, checked against the model."""
        from halluscope.bench.methods import parse_method

        return parse_method(f"heads:{self.config.heads}", vlm.n_layers, vlm.n_heads).heads

    @contextmanager
    def applied(self, vlm, batch) -> Iterator[None]:
        from halluscope.interventions.heads import HeadIntervention, intervene

        with intervene(vlm, HeadIntervention(self.resolve(vlm), mode="scale", alpha=self.config.alpha)):
            yield
