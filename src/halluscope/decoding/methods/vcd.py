"""VCD: visual contrastive decoding against the same prompt with a diffusion-noised image.

Leng et al., "Mitigating Object Hallucinations in Large Vision-Language Models through Visual Contrastive
Decoding", CVPR 2024, arXiv:2311.16922. Scores (1 + alpha) * l(x, v) - alpha * l(x, v'), restricted to tokens
with p(token | x, v) >= beta * max p (the adaptive plausibility constraint). v' is the processed image after
`noise_step` steps of forward diffusion, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, under the 1,000-step
sigmoid beta schedule of the paper's code. The paper's defaults: alpha 1, beta 0.1, noise step 500 (its scripts
sample with temperature 1; halluscope decodes greedily unless asked to sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, plausible, ranged

__all__ = ["VCD", "VCDConfig", "diffusion_noise"]

_STEPS = 1000


@dataclass(frozen=True)
class VCDConfig(MethodConfig):
    alpha: float = ranged(1.0, 0.0, doc="contrast strength; 0 is neutral")
    beta: float = ranged(0.1, 0.0, 1.0, doc="plausibility cutoff, a fraction of the top token's probability")
    noise_step: int = ranged(500, 0, _STEPS - 1, integer=True, doc="forward-diffusion step of the noised image")
    seed: int = ranged(0, 0, integer=True, doc="seed of the noise")


def diffusion_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """`pixels` after `step` steps of forward diffusion (sigmoid schedule, 1,000 steps), seeded; elementwise, so
    it applies to any family's processed layout (Qwen's flattened patches included)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, _STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)[step]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device, pixels.dtype)
    return (abar.sqrt() * pixels + (1 - abar).sqrt() * noise).to(pixels.dtype)


class VCD(DecodingMethod):
    """Contrast with a diffusion-noised image (Leng et al., CVPR 2024, arXiv:2311.16922). One extra branch of
    the same length as the real rows, prefilled and decoded in the same forwards."""

    name = "vcd"
    Config = VCDConfig

    def branches(self, vlm, batch):
        from halluscope.models.vlm import Batch

        inputs = dict(batch.inputs)
        inputs["pixel_values"] = diffusion_noise(inputs["pixel_values"], self.config.noise_step, self.config.seed)
        return [Batch(inputs, batch.image_mask, batch.image_spans)]

    def step_logits(self, context):
        real, noised = context.logits
        alpha = self.config.alpha
        return plausible(real, real + alpha * (real - noised), self.config.beta)
