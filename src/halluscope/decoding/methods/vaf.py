"""ClearSight's visual amplification fusion (VAF): in middle layers, attention scores to image tokens scaled up
and scores to the system text before the image scaled down.

Yin et al., "ClearSight: Visual Signal Enhancement for Object Hallucination Mitigation in Multimodal Large
Language Models", CVPR 2025, arXiv:2503.13107. Pre-softmax scores of every query row: image columns times
`image_scale`, system columns times `system_scale`, in layers [start_layer, end_layer). The paper's setting on
LLaVA-1.5 (32 layers): 1.15 and 0.95 in layers 9 to 14; by default the same share of a model's depth
(layers floor(9 L / 32) to ceil(15 L / 32) - 1 of L), or the layers given. Image and system columns come from
each row's own image tokens, never from fixed offsets. Costs no extra forward; the scaled layers run eager
attention. Neutral: both scales 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged
from halluscope.decoding.methods.pai import layer_range

__all__ = ["VAF", "VAFConfig", "scale_columns"]


@dataclass(frozen=True)
class VAFConfig(MethodConfig):
    image_scale: float = ranged(1.15, 0.0, low_open=True, doc="factor on scores to image tokens; 1 is neutral")
    system_scale: float = ranged(0.95, 0.0, low_open=True, doc="factor on scores to the system text; 1 is neutral")
    start_layer: int | None = ranged(None, 0, integer=True, doc="first scaled layer; None: the paper's share")
    end_layer: int | None = ranged(None, 1, integer=True, doc="layer after the last scaled one; None: the paper's")

    def layers(self, n_layers: int) -> tuple[int, int]:
        """[start, end) of the scaled layers in a model of `n_layers`."""
        start = (9 * n_layers) // 32 if self.start_layer is None else self.start_layer
        end = max(start + 1, -(-15 * n_layers // 32)) if self.end_layer is None else self.end_layer
        return start, end


def scale_columns(scores: torch.Tensor, image: torch.Tensor, system: torch.Tensor, image_scale: float,
                  system_scale: float) -> torch.Tensor:
    """Every query row's scores [batch, heads, queries, keys] to image columns times `image_scale` and to system
    columns ([batch, keys] masks) times `system_scale`."""
    factor = torch.ones_like(image, dtype=scores.dtype)
    factor = factor.masked_fill(image, image_scale).masked_fill(system, system_scale)
    return scores * factor[:, None, None, :]


class VAF(DecodingMethod):
    """Middle-layer image-attention amplification (Yin et al., CVPR 2025, arXiv:2503.13107)."""

    name = "vaf"
    Config = VAFConfig

    @contextmanager
    def applied(self, vlm, batch) -> Iterator[None]:
        from halluscope.decoding.attention import ScoreEdit, score_edit

        c = self.config
        layers = layer_range(vlm, *c.layers(vlm.n_layers), "vaf")
        if (c.image_scale == 1 and c.system_scale == 1) or not layers:
            yield
            return

        def edit(scores: torch.Tensor, image: torch.Tensor, system: torch.Tensor) -> torch.Tensor:
            return scale_columns(scores, image, system, c.image_scale, c.system_scale)

        with score_edit(vlm, ScoreEdit(layers, edit)):
            yield
