"""Training an organism of any kind from scratch, deterministically for a seed and thread count, resumably.

The loop is the same for every kind; the recipe's kind decides the training data (`kinds.py`). A state file
(model, optimiser, schedule and random states) is written atomically every `save_every` steps, so a killed run
continues where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch

from halluscope.errors import RunError
from halluscope.organism.kinds import get_kind
from halluscope.organism.recipe import Recipe, build_model, build_processor, build_tokenizer

__all__ = ["train"]

_STATE = "train_state.pt"


def _schedule(recipe: Recipe) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        low = recipe.final_lr_fraction
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "embed" not in name else plain).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), eps=1e-8)


class _DropHead:
    """Zero each (row, layer, head) of the o_proj input with probability p during training."""

    def __init__(self, model, recipe: Recipe) -> None:
        self.p, self.heads, self.keep = recipe.drophead, recipe.heads, None
        layers = model.model.language_model.layers
        self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(layers)] if self.p > 0 else []
        self.n_layers = len(layers)

    def draw(self, batch: int) -> None:
        if self.p > 0:
            self.keep = (torch.rand(batch, self.n_layers, self.heads) >= self.p).float()

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            b, t, _ = x.shape
            return ((x.view(b, t, self.heads, -1) * self.keep[:, layer][:, None, :, None])
                    .reshape(b, t, -1),)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(out: str | os.PathLike, recipe: Recipe, *, save_every: int = 250, log_every: int = 50,
          log: Callable[[str], None] = print) -> Path:
    """Train the organism `recipe` describes into `out` (model, processor, trainlog.json); resumes from
    `out/train_state.pt`. The log records every `log_every` steps the loss, the learning rate, the training
    seconds so far (over all resumed segments) and the machine's 1-minute load average.

    Raises:
        RunError: `out` holds the state of a run with another recipe.

    Example:
        >>> train("organism-scenes/", SceneRecipe(seed=0))  # doctest: +SKIP
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    tokenizer = build_tokenizer(recipe)
    processor = build_processor(recipe, tokenizer)
    model = build_model(recipe, tokenizer)
    model.train()
    data = get_kind(recipe.kind).load("data")(recipe, tokenizer, processor)
    optimizer = _optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe))
    rng = random.Random(f"{recipe.seed}:steps")
    history: list[dict] = []
    start = 0
    state_path = out / _STATE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["recipe"] != recipe.to_dict():
            raise RunError(f"{state_path} was made with a different recipe; use another --out, or delete the file "
                           f"to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], state["history"]
        log(f"resuming at step {start}")
    drophead = _DropHead(model, recipe)
    # the log's seconds add up over resumed segments (the steps a kill lost are not counted twice)
    began, ema = time.time() - (history[-1]["seconds"] if history else 0.0), None
    try:
        for step in range(start, recipe.steps):
            batch = data.batch(rng, recipe.batch_size)
            drophead.draw(recipe.batch_size)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if (step + 1) % log_every == 0:
                history.append({"step": step + 1, "loss_ema": round(ema, 5), "lr": scheduler.get_last_lr()[0],
                                "seconds": round(time.time() - began, 1), "load": round(os.getloadavg()[0], 2)})
                log(f"step {step + 1}/{recipe.steps} loss {ema:.4f} ({time.time() - began:.0f}s)")
            if (step + 1) % save_every == 0 and step + 1 < recipe.steps:
                _save_atomic({"step": step + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "rng": rng.getstate(),
                              "torch_rng": torch.get_rng_state(), "history": history,
                              "recipe": recipe.to_dict()}, state_path)
    finally:
        drophead.remove()
    model.eval()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "trainlog.json").write_text(json.dumps({"recipe": recipe.to_dict(), "history": history,
                                                   "torch": torch.__version__}, indent=1))
    state_path.unlink(missing_ok=True)
    return out
