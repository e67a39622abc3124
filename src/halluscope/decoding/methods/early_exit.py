"""Early-exit readings shared by the layer-contrast methods (DoLa, VISTA's window, DeCo): which hidden states
form a window, and their next-token logits through the final norm and lm_head.

The decoding loop reads the early exits out in the same lm_head call as the final logits: at decoding batch
sizes a CPU matmul with lm_head is bound by reading its weights, so the extra rows cost little, where a second
call would read the whole vocabulary matrix again (a quarter of a 70M-parameter model's weights per token).
"""

from __future__ import annotations

from typing import Sequence

import torch

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


def early_exit_logits(vlm, hidden: Sequence[torch.Tensor], layers: Sequence[int], n: int,
                      final: torch.Tensor | None = None,
                      mean: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """lm_head(norm(h_j)) of the first `n` rows of each hidden state `hidden[j]` [rows, hidden_size], j in
    `layers`, as [len(layers), n, vocab] float32; with `mean`, their mean over the layers [1, n, vocab], read out
    as lm_head of the mean normed state (lm_head is affine, so the mean commutes with it: one row per row instead
    of one per layer). With `final` [rows, hidden_size] (final-normed states) their logits [rows, vocab] come from
    the same lm_head call and are returned first (else None)."""
    early = vlm.norm(torch.stack([hidden[j][:n] for j in layers]))
    early = early.mean(0, keepdim=True) if mean else early
    count = early.shape[0]
    if final is None:
        return None, vlm.lm_head(early.flatten(0, 1)).unflatten(0, (count, n)).float()
    logits = vlm.lm_head(torch.cat([final, early.flatten(0, 1)]))
    return logits[:len(final)], logits[len(final):].unflatten(0, (count, n)).float()
