"""PAI: more attention to the image while decoding, plus guidance away from the no-image reply.

Liu et al., "Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in LVLMs",
ECCV 2024, arXiv:2407.21771. (a) In layers [start_layer, end_layer), the last query row's pre-softmax scores to
image tokens become A + alpha * |A|. (b) The scores are guided against the no-image branch,
log p_u + gamma * (log p_c - log p_u), within the adaptive plausibility constraint (beta) of the image rows.
Paper defaults (LLaVA-1.5, 32 layers): alpha 0.5, gamma 1.1, beta 0.1, layers 2 to 32. Here `end_layer` None
means the last layer. Neutral: alpha 0 and gamma 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, plausible, ranged, source_pairs
from halluscope.errors import InputError

__all__ = ["PAI", "PAIConfig", "boost_image", "layer_range"]


@dataclass(frozen=True)
class PAIConfig(MethodConfig):
    alpha: float = ranged(0.5, 0.0, doc="image-attention boost, A + alpha |A|; 0 is neutral")
    gamma: float = ranged(1.1, 1.0, doc="guidance scale against the no-image branch; 1 is neutral")
    beta: float = ranged(0.1, 0.0, 1.0, doc="plausibility cutoff, a fraction of the top token's probability")
    start_layer: int = ranged(2, 0, integer=True, doc="first boosted layer")
    end_layer: int | None = ranged(None, 1, integer=True, doc="layer after the last boosted one; None: the end")


def layer_range(vlm, start: int, end: int | None, method: str) -> frozenset[int]:
    """Layers start..end-1 (end None: to the last), checked against the model."""
    stop = vlm.n_layers if end is None else end
    if not 0 <= start <= stop <= vlm.n_layers:
        raise InputError(f"{method} layers {start}..{end} do not fit this model's {vlm.n_layers} layers; pass "
                         f"0 <= start_layer <= end_layer <= {vlm.n_layers}")
    return frozenset(range(start, stop))


def boost_image(scores: torch.Tensor, image: torch.Tensor, alpha: float) -> torch.Tensor:
    """The last query row's scores [batch, heads, queries, keys] to image columns [batch, keys] as A + alpha |A|."""
    last = scores[:, :, -1:, :]
    boosted = torch.where(image[:, None, None, :], last + alpha * last.abs(), last)
    return torch.cat([scores[:, :, :-1, :], boosted], 2)


class PAI(DecodingMethod):
    """Image-attention boost and guidance against the no-image branch (Liu et al., ECCV 2024,
    arXiv:2407.21771): the boost edits scores in the attention function (eager attention in the boosted layers
    only), the guidance adds one short no-image branch to every forward."""

    name = "pai"
    Config = PAIConfig
    needs_pairs = True

    def branches(self, vlm, batch):
        from halluscope.decoding.branches import branch_batch

        if self.config.gamma == 1:
            return []
        return [branch_batch(vlm, [(None, prompt) for _, prompt in source_pairs(self, batch)])]

    @contextmanager
    def applied(self, vlm, batch) -> Iterator[None]:
        from halluscope.decoding.attention import ScoreEdit, score_edit

        layers = layer_range(vlm, self.config.start_layer, self.config.end_layer, "pai")
        if self.config.alpha == 0 or not layers:
            yield
            return
        alpha = self.config.alpha
        with score_edit(vlm, ScoreEdit(layers, lambda scores, image, system: boost_image(scores, image, alpha))):
            yield

    def step_logits(self, context):
        if len(context.logits) == 1:
            return context.logits[0]
        real, blind = context.logits
        guided = real + (self.config.gamma - 1) * (torch.log_softmax(real.float(), -1) -
                                                    torch.log_softmax(blind.float(), -1))
        return plausible(real, guided, self.config.beta)
