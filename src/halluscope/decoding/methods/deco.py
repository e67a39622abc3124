"""DeCo: the final layer's candidate tokens re-scored with the logits of the preceding layer most sure of one of them.

Wang et al., "MLLM Can See? Dynamic Correction Decoding for Hallucination Mitigation", ICLR 2025,
arXiv:2410.11779. Candidates: the final layer's `top_k` most likely tokens, cut to the smallest set whose
probability reaches `top_p`. Anchor: the layer of an early-exit window whose distribution softmax(lm_head(norm(h_j)))
gives some candidate the highest probability; conf is that probability. Scores: l_N + alpha * conf * l_anchor on
the candidates, -inf elsewhere. Paper settings (LLaVA-1.5, 32 layers): top_k 20, top_p 0.9, alpha 0.6, window
20 to 28; here the window is hidden-state indices (0 the embeddings, as in DoLa), by default
floor(20 L / 32)..floor(28 L / 32) of L layers, or the layers given. No extra forward; the window is read
out in the final lm_head call. Neutral: alpha 0, plain decoding (no candidate mask either, so beam search is
unchanged too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from halluscope.decoding.methods.base import DecodingMethod, MethodConfig, ranged
from halluscope.decoding.methods.early_exit import early_exit_window

__all__ = ["DeCo", "DeCoConfig", "top_candidates"]


@dataclass(frozen=True)
class DeCoConfig(MethodConfig):
    alpha: float = ranged(0.6, 0.0, doc="weight of the anchor layer's logits; 0 is neutral")
    top_k: int = ranged(20, 1, integer=True, doc="most candidates taken from the final layer")
    top_p: float = ranged(0.9, 0.0, 1.0, low_open=True, doc="candidates cut to the set whose probability reaches it")
    start_layer: int | None = ranged(None, 0, integer=True, doc="first window layer; None: the paper's share")
    end_layer: int | None = ranged(None, 1, integer=True, doc="layer after the window's last; None: the paper's")


def top_candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's `top_k` most likely tokens [batch, k] and which of them are candidates [batch, k]: those with
    the probability before them below `top_p` (so the most likely token always is one)."""
    probs = torch.softmax(logits.float(), -1)
    top, index = probs.topk(min(top_k, probs.shape[-1]), -1)
    return index, top.cumsum(-1) - top < top_p


class DeCo(DecodingMethod):
    """Dynamic correction with the most confident preceding layer (Wang et al., ICLR 2025, arXiv:2410.11779):
    no extra forward; the window is read out in the final lm_head call."""

    name = "deco"
    Config = DeCoConfig

    def early_exit(self, vlm) -> list[int]:
        c = self.config
        window = early_exit_window(vlm.n_layers, c.start_layer, c.end_layer, (20, 28), "deco")
        return [] if c.alpha == 0 else window

    def step_logits(self, context):
        c = self.config
        real = context.logits[0]
        if c.alpha == 0:  # neutral: plain decoding, with no candidate mask either (it would change beam scores)
            return real
        index, keep = top_candidates(real, c.top_k, c.top_p)
        early = context.early  # [window, batch, vocab]
        # each layer's probability of each candidate: only the candidates' logits need the layer's normalizer
        picked = early.gather(-1, index.expand(early.shape[0], -1, -1)) - early.logsumexp(-1, keepdim=True)
        conf, flat = picked.exp().masked_fill(~keep, -1.0).transpose(0, 1).flatten(1).max(-1)  # over (layer, cand.)
        anchor = early[flat // index.shape[-1], torch.arange(real.shape[0], device=real.device)]
        scores = real.float() + c.alpha * conf[:, None] * anchor
        allowed = torch.zeros_like(real, dtype=torch.bool).scatter(-1, index, keep)
        return scores.masked_fill(~allowed, float("-inf"))
