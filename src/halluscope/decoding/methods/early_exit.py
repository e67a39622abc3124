"""Early-exit readings shared by the layer-contrast methods (DoLa, VISTA's window, DeCo): which hidden states
form a window, and their next-token logits through the final norm and lm_head."""

from __future__ import annotations

import torch
from torch import nn

from halluscope.errors import InputError

__all__ = ["early_exit_logits", "early_exit_window"]


def early_exit_window(n_layers: int, start: int | None, end: int | None, paper: tuple[int, int],
                      method: str) -> list[int]:
    """Hidden-state indices start..end-1 of an early-exit window (0 = embeddings; the final normed state is never
    one); a None bound takes the paper's window `paper` (first, last of 32 layers) scaled to `n_layers`.

    Raises:
        InputError: the window is empty or reaches past the last layer before the final one.
    """
    first = paper[0] * n_layers // 32 if start is None else start
    stop = paper[1] * n_layers // 32 + 1 if end is None else end
    if not 0 <= first < stop <= n_layers:
        raise InputError(f"{method} early-exit layers {first}..{stop - 1} do not fit this model's {n_layers} "
                         f"layers; pass 0 <= start_layer < end_layer <= {n_layers}")
    return list(range(first, stop))


def early_exit_logits(norm: nn.Module, lm_head: nn.Module, hidden: tuple[torch.Tensor, ...],
                      layers: list[int]) -> torch.Tensor:
    """lm_head(norm(h_j)) of every window layer j of one step's hidden states: [window, batch, vocab], float32."""
    return lm_head(norm(torch.stack([hidden[j] for j in layers]))).float()
