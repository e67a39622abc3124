"""M3ID: multi-modal mutual-information decoding against the same prompt without the image.

Favero et al., "Multi-Modal Hallucination Control by Visual Information Grounding", CVPR 2024,
arXiv:2403.14003 (no official code). With log-probabilities l_c (image) and l_u (no image) and
gamma_t = exp(-lambda * t) at the t-th generated token, the score is
l_c + [max p_c < gate] * ((1 - gamma_t) / gamma_t) * (l_c - l_u): the pull towards the image grows as the reply
gets longer, and applies only while the model is unsure. Paper defaults: lambda 0.02, gate 0.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged, source_pairs

__all__ = ["M3ID", "M3IDConfig"]


@dataclass(frozen=True)
class M3IDConfig(MethodConfig):
    lam: float = ranged(0.02, 0.0, doc="growth rate of the image's weight over the reply; 0 is neutral")
    gate: float = ranged(0.3, 0.0, 1.0, doc="contrast only where the top token's probability is below this")


class M3ID(DecodingMethod):
    """Time-growing contrast with the no-image branch (Favero et al., CVPR 2024, arXiv:2403.14003). The branch
    is the prompt alone in the chat template: a short extra prefill, one more row per step."""

    name = "m3id"
    Config = M3IDConfig
    needs_pairs = True

    def branches(self, vlm, batch):
        from halluscope.decoding.branches import branch_batch

        return [branch_batch(vlm, [(None, prompt) for _, prompt in source_pairs(self, batch)])]

    def step_logits(self, context):
        real, blind = (torch.log_softmax(l.float(), -1) for l in context.logits)
        gamma = math.exp(-self.config.lam * context.step)
        unsure = (real.max(-1, keepdim=True).values.exp() < self.config.gate).to(real.dtype)
        return real + unsure * ((1 - gamma) / gamma) * (real - blind)
