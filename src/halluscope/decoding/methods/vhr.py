"""VHR: the attention heads whose output depends most on the image, amplified while decoding.

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence", ACL 2025,
arXiv:2412.13949. A head's vision-aware head divergence (VHD) is how far its output moves when the image is taken
away: here ||o(x, v) - o(x)||, o the head's slice of its layer's `o_proj` input at the last prompt token, o(x) from
the no-image twin. Per prompt, the `top_k` heads of highest VHD over layers [start_layer, end_layer) (by default
the top `fraction` of those heads) are multiplied by `scale` at their `o_proj` input, on every position of the call.
Neither the paper's text beyond its abstract nor its code could be read here, so these are ours: the distance and
the position it is read at, one ranking over all scored layers, scoring once per prompt (not per token), and the
defaults scale 2 and 5% of the heads. Cost: one prefill of the input and one of the twin per call, before
decoding; nothing per token beyond the hooks. Neutral: scale 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged
from halluscope.decoding.methods.image_effect import image_effect, no_image_twin
from halluscope.decoding.methods.pai import layer_range
from halluscope.errors import InputError

if TYPE_CHECKING:
    from halluscope.models.vlm import Batch

__all__ = ["VHR", "VHRConfig", "head_divergence", "select_heads"]


@dataclass(frozen=True)
class VHRConfig(MethodConfig):
    scale: float = ranged(2.0, 0.0, low_open=True, doc="factor on the chosen heads' outputs; 1 is neutral")
    fraction: float = ranged(0.05, 0.0, 1.0, low_open=True, doc="share of the scored heads amplified (at least one)")
    top_k: int | None = ranged(None, 1, integer=True, doc="number of heads amplified; None: `fraction` of them")
    start_layer: int = ranged(0, 0, integer=True, doc="first scored layer")
    end_layer: int | None = ranged(None, 1, integer=True, doc="layer after the last scored one; None: the end")

    def count(self, n_heads: int) -> int:
        """How many of `n_heads` scored heads are amplified.

        Raises:
            InputError: `top_k` is more than `n_heads`.
        """
        if self.top_k is None:
            return max(1, round(self.fraction * n_heads))
        if self.top_k > n_heads:
            raise InputError(f"vhr top_k={self.top_k} is more than the {n_heads} heads of the scored layers; pass "
                             f"top_k <= {n_heads}")
        return self.top_k


def head_divergence(vlm, batch: Batch, twin: Batch) -> torch.Tensor:
    """Every head's VHD in each row: the norm of its `o_proj` input slice at the last prompt token with the image
    minus without it (`twin`), [batch, layer, head]."""
    effect = image_effect(vlm, batch, twin, [vlm.o_proj(layer) for layer in range(vlm.n_layers)], read_input=True)
    return effect.view(vlm.n_layers, len(batch), vlm.n_heads, vlm.head_dim).norm(dim=-1).transpose(0, 1)


def select_heads(scores: torch.Tensor, layers: frozenset[int], count: int) -> torch.Tensor:
    """The `count` highest-scoring heads of each row among `layers`: a bool mask like `scores` [batch, layer, head]."""
    scored = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    scored[sorted(layers)] = True
    ranked = scores.masked_fill(~scored[None, :, None], float("-inf")).flatten(1)
    chosen = torch.zeros_like(ranked, dtype=torch.bool).scatter(1, ranked.topk(count, dim=1).indices, True)
    return chosen.view_as(scores)


class VHR(DecodingMethod):
    """Vision-aware head reinforcement (He et al., ACL 2025, arXiv:2412.13949): heads chosen per prompt before
    decoding, then scaled by the `o_proj` hooks of head ablation."""

    name = "vhr"
    Config = VHRConfig
    needs_pairs = True

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        # while scaling: each prompt's head scales [batch, layer, head], those of the rows being decoded, the hooks
        self._prompts: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None
        self._hooks = None

    @contextmanager
    def applied(self, vlm, batch) -> Iterator[None]:
        from halluscope.interventions.heads import HeadHooks

        c = self.config
        layers = layer_range(vlm, c.start_layer, c.end_layer, "vhr")
        if c.scale == 1 or not layers:
            yield
            return
        count = c.count(len(layers) * vlm.n_heads)
        chosen = select_heads(head_divergence(vlm, batch, no_image_twin(self, vlm, batch)), layers, count)
        self._prompts = self._scales = torch.where(chosen, c.scale, 1.0)
        with HeadHooks(vlm) as hooks:
            self._hooks = hooks
            hooks.set(self._scales, mode="scale")
            try:
                yield
            finally:
                self._hooks = self._prompts = self._scales = None

    def expand(self, index: torch.Tensor) -> None:
        if self._hooks is not None:
            self._scales = self._prompts[index]
            self._hooks.set(self._scales, mode="scale")

    def reorder(self, index: torch.Tensor) -> None:
        if self._hooks is not None:
            self._scales = self._scales[index]
            self._hooks.set(self._scales, mode="scale")
