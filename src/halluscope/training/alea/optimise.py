"""The optimisation loop both trained stages share (the prefix, the edit): deterministic for a seed and thread
count, and resumable.

A step's mini-batch depends only on (seed, stage, step), never on a random state carried from step to step, so a
restarted run draws the same batches. Every `save_every` steps the trained tensors, the optimiser's state and the log
so far are written atomically to a state file; a killed run continues from it and ends with the tensors an
uninterrupted run ends with, bit for bit.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

__all__ = ["batch_of", "optimise", "steps_for", "trainable_only"]


def steps_for(n_rows: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps of `epochs` passes over `n_rows` rows in mini-batches of `batch_size` (the last one smaller)."""
    return epochs * math.ceil(n_rows / batch_size)


def batch_of(step: int, n_rows: int, batch_size: int, *, seed: int, stage: str) -> list[int]:
    """The row indices of mini-batch `step`: each epoch is one permutation of the rows drawn from
    (seed, stage, epoch), cut into consecutive batches.

    Example:
        >>> sorted(batch_of(0, 4, 2, seed=0, stage="edit") + batch_of(1, 4, 2, seed=0, stage="edit"))
        [0, 1, 2, 3]
    """
    per_epoch = math.ceil(n_rows / batch_size)
    epoch, index = divmod(step, per_epoch)
    order = random.Random(f"{seed}:{stage}:{epoch}").sample(range(n_rows), n_rows)
    return order[index * batch_size:(index + 1) * batch_size]


@contextmanager
def trainable_only(model: nn.Module, names: Collection[str] = ()) -> Iterator[None]:
    """Within the block only the parameters called `names` take gradients (none: the model is frozen); every
    parameter's `requires_grad` is restored on exit, also on errors."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def optimise(tensors: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
             loss_at: Callable[[int], dict[str, torch.Tensor]], *, steps: int, state_path: Path, stage: str,
             save_every: int = 50, log_every: int = 10, log: Callable[[str], None] = print) -> list[dict]:
    """Run `steps` optimiser steps of the loss `loss_at(step)` (a dict whose "loss" is minimised; its other terms
    are logged) over `tensors` (name -> the trained tensor, changed in place), resuming from `state_path`.

    Returns the log: every `log_every` steps and the last, the step, each term's mean since the previous entry,
    the training seconds so far (added up over resumed segments) and the 1-minute load average. The state file is
    removed once the last step is done.
    """
    history: list[dict] = []
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(state["tensors"][name])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        log(f"{stage}: resuming at step {start}/{steps}")
    began = time.time() - (history[-1]["seconds"] if history else 0.0)
    sums: dict[str, float] = {}
    count = 0
    for step in range(start, steps):
        optimizer.zero_grad(set_to_none=True)
        terms = loss_at(step)
        terms["loss"].backward()
        optimizer.step()
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        count += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = {"stage": stage, "step": step + 1, **{k: round(v / count, 6) for k, v in sums.items()},
                     "seconds": round(time.time() - began, 1), "load": round(os.getloadavg()[0], 2)}
            history.append(entry)
            log(f"{stage}: step {step + 1}/{steps} loss {entry['loss']:.4f} ({entry['seconds']:.0f}s)")
            sums, count = {}, 0
        if (step + 1) % save_every == 0 and step + 1 < steps:
            _save_atomic({"step": step + 1, "tensors": {k: v.detach().clone() for k, v in tensors.items()},
                          "optimizer": optimizer.state_dict(), "history": history}, state_path)
    state_path.unlink(missing_ok=True)
    return history
