"""ICD: instruction contrastive decoding against the same image with a disturbance instruction before the prompt.

Wang et al., "Mitigating Hallucinations in Large Vision-Language Models with Instruction Contrastive Decoding",
ACL Findings 2024, arXiv:2403.18715. Scores (1 + alpha) * l(v, x) - alpha * l(v, x_dist) under the adaptive
plausibility constraint (beta), where x_dist puts a role prefix that makes the model a confused detector before
the prompt. Defaults: alpha 1, beta 0.1, the paper's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, plausible, ranged, source_pairs
from halluscope.errors import InputError

__all__ = ["ICD", "ICDConfig"]

DISTURBANCE = ("You are a confused object detector to provide a fuzzy overview or impression of the image.")


@dataclass(frozen=True)
class ICDConfig(MethodConfig):
    alpha: float = ranged(1.0, 0.0, doc="contrast strength; 0 is neutral")
    beta: float = ranged(0.1, 0.0, 1.0, doc="plausibility cutoff, a fraction of the top token's probability")
    prefix: str = DISTURBANCE

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise InputError(f"icd prefix={self.prefix!r} is empty; pass the disturbance instruction as text")


class ICD(DecodingMethod):
    """Contrast with a disturbance-prefixed prompt (Wang et al., ACL Findings 2024, arXiv:2403.18715): one
    extra branch, the same image, continued from the real rows' keys and values up to where its text differs (no
    second vision pass) and decoded in the same forwards."""

    name = "icd"
    Config = ICDConfig
    needs_pairs = True

    def branches(self, vlm, batch):
        from halluscope.decoding.branches import branch_batch

        prefix = self.config.prefix.strip()
        return [branch_batch(vlm, [(image, f"{prefix} {prompt}") for image, prompt in source_pairs(self, batch)])]

    def step_logits(self, context):
        real, disturbed = context.logits
        return plausible(real, real + self.config.alpha * (real - disturbed), self.config.beta)
