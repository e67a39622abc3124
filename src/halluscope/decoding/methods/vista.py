"""VISTA: a per-prompt visual steering vector in every layer's output, and a late window's logits mixed into the
final ones.

Li et al., "The Hidden Life of Tokens: Reducing Hallucination of Large Vision-Language Models via Visual
Information Steering", ICML 2025, arXiv:2502.03628. VSV: v_l = h_l(x, v) - h_l(x), the output of decoder layer l
at the last prompt token with the image minus without it (the no-image twin); while decoding, every position's
output x of layer l becomes ||x|| * normalize(normalize(x) + lam * v_l / ||v_l||), so only its direction moves.
SLA: the scores are (1 - alpha) * l_N + alpha * the mean over an early-exit window of lm_head(norm(h_j)).
Paper settings (LLaVA-1.5, 32 layers): lam 0.17 for captions (CHAIR; 0.01 for POPE), alpha 0.3, window 25 to 30;
here the window is hidden-state indices (0 the embeddings), by default floor(25 L / 32)..floor(30 L / 32) of L
layers, or the layers given. The paper's vector is a PCA direction of the differences; with one (image, no image)
pair per prompt we use the difference itself. Cost: one prefill of the input and one of the twin per call, before
decoding; per token, lm_head of the window's mean normed state (the mean of the window's logits, lm_head being
affine) read out in the final lm_head call. Neutral: lam 0 and alpha 0.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged
from halluscope.decoding.methods.early_exit import early_exit_window
from halluscope.decoding.methods.image_effect import image_effect, no_image_twin

if TYPE_CHECKING:
    from halluscope.models.vlm import Batch

__all__ = ["VISTA", "VISTAConfig", "steer", "steering_vectors"]


@dataclass(frozen=True)
class VISTAConfig(MethodConfig):
    lam: float = ranged(0.17, 0.0, doc="steering strength (0.17 the paper's caption setting, 0.01 its POPE one); "
                                       "0 is neutral")
    alpha: float = ranged(0.3, 0.0, 1.0, doc="weight of the window's mean logits; 0 is neutral")
    start_layer: int | None = ranged(None, 0, integer=True, doc="first window layer; None: the paper's share")
    end_layer: int | None = ranged(None, 1, integer=True, doc="layer after the window's last; None: the paper's")


def steering_vectors(vlm, batch: Batch, twin: Batch) -> torch.Tensor:
    """Every decoder layer's output at the last prompt token with the image minus without it (`twin`):
    [layer, batch, hidden_size], float32."""
    return image_effect(vlm, batch, twin, list(vlm.layers))


def steer(x: torch.Tensor, direction: torch.Tensor, lam: float) -> torch.Tensor:
    """x [batch, seq, hidden] turned towards the unit `direction` [batch, hidden] by `lam`, each position keeping
    its norm: ||x|| * normalize(normalize(x) + lam * direction)."""
    x32 = x.float()
    turned = F.normalize(F.normalize(x32, dim=-1) + lam * direction[:, None, :], dim=-1)
    return (turned * x32.norm(dim=-1, keepdim=True)).to(x.dtype)


class VISTA(DecodingMethod):
    """Visual steering and self-logits augmentation (Li et al., ICML 2025, arXiv:2502.03628): the vectors come
    from two prefills per call; steering adds no forward; the window's mean is one more row of the final lm_head
    call."""

    name = "vista"
    Config = VISTAConfig
    needs_pairs = True
    early_exit_mean = True

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        # while steering: each prompt's unit vectors [layer, batch, hidden], and those of the rows being decoded
        self._prompts: torch.Tensor | None = None
        self._directions: torch.Tensor | None = None

    def early_exit(self, vlm) -> list[int]:
        c = self.config
        window = early_exit_window(vlm.n_layers, c.start_layer, c.end_layer, (25, 30), "vista")
        return [] if c.alpha == 0 else window

    @contextmanager
    def applied(self, vlm, batch) -> Iterator[None]:
        c = self.config
        handles = []
        try:
            if c.lam > 0:
                self._prompts = F.normalize(steering_vectors(vlm, batch, no_image_twin(self, vlm, batch)), dim=-1)
                self._directions = self._prompts
                for layer, module in enumerate(vlm.layers):
                    # prepended, so the hidden states transformers records (and SLA reads) are the steered ones
                    handles.append(module.register_forward_hook(self._hook(layer), prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._prompts = self._directions = None

    def _hook(self, layer: int):
        lam = self.config.lam

        def hook(module, args, output):
            return steer(output, self._directions[layer], lam)

        return hook

    def expand(self, index: torch.Tensor) -> None:
        if self._prompts is not None:
            self._directions = self._prompts[:, index]

    def reorder(self, index: torch.Tensor) -> None:
        if self._directions is not None:
            self._directions = self._directions[:, index]

    def step_logits(self, context):
        real = context.logits[0]
        alpha = self.config.alpha
        if alpha == 0:
            return real
        window = context.early[0]  # the window's mean logits
        return (1 - alpha) * real.float() + alpha * window
