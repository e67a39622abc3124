"""RITUAL: the logits of a randomly transformed copy of the image added to those of the image.

Woo et al., "RITUAL: Random Image Transformations as a Universal Anti-hallucination Lever in Large
Vision-Language Models", arXiv:2405.17821. Scores l(x, v) + alpha * l(x, T(v)) under the adaptive plausibility
constraint (beta), T drawn per row from horizontal flip, vertical flip, rotation, colour jitter, Gaussian blur
and random resized crop. Paper defaults: alpha 3, beta 0.1. Here T is drawn from a generator seeded by `seed`
and the row's index, so a run is reproducible; every transform keeps the image size (so the branch has the real
rows' length and shares their prefill forward).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageFilter

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, plausible, ranged, source_pairs

__all__ = ["RITUAL", "RITUALConfig", "TRANSFORMS", "random_transform"]

TRANSFORMS = ("hflip", "vflip", "rotate", "color", "blur", "crop")


@dataclass(frozen=True)
class RITUALConfig(MethodConfig):
    alpha: float = ranged(3.0, 0.0, doc="weight of the transformed image's logits; 0 is neutral")
    beta: float = ranged(0.1, 0.0, 1.0, doc="plausibility cutoff, a fraction of the top token's probability")
    seed: int = ranged(0, 0, integer=True, doc="seed of the transform draw")


def random_transform(image: Image.Image, rng: random.Random) -> tuple[str, Image.Image]:
    """One of `TRANSFORMS` drawn from `rng`, applied to `image` (same size, RGB): (its name, the new image)."""
    name = rng.choice(TRANSFORMS)
    if name == "hflip":
        return name, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if name == "vflip":
        return name, image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if name == "rotate":
        return name, image.rotate(rng.uniform(-180, 180), resample=Image.Resampling.BILINEAR)
    if name == "color":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.6, 1.4))
        return name, image
    if name == "blur":
        return name, image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    scale = rng.uniform(0.5, 1.0)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    left, top = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
    return name, image.crop((left, top, left + w, top + h)).resize(image.size, Image.Resampling.BICUBIC)


class RITUAL(DecodingMethod):
    """Add the logits of a randomly transformed image (Woo et al., arXiv:2405.17821): one extra branch,
    prefilled with the real rows and decoded in the same forwards."""

    name = "ritual"
    Config = RITUALConfig
    needs_pairs = True

    def branches(self, vlm, batch):
        from halluscope.decoding.branches import branch_batch

        pairs = source_pairs(self, batch)
        transformed = [(random_transform(vlm.prepared_image(image), random.Random(f"{self.config.seed}:{row}"))[1],
                        prompt) for row, (image, prompt) in enumerate(pairs)]
        return [branch_batch(vlm, transformed)]

    def step_logits(self, context):
        real, transformed = context.logits
        return plausible(real, real + self.config.alpha * transformed, self.config.beta)
