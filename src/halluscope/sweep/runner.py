"""Running a knockout sweep over a run's prompts as resumable shards (one per prompt x layer).

Each finished shard is written atomically under RUN/parts/sweep/, so a killed sweep restarts where it stopped
and the final table has every (prompt, layer, head) row exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import pandas as pd
import torch

from halluscope.errors import InputError
from halluscope.sweep.engine import SweepItem, generate_prompt, prepare_generate, prepare_score, score_prompt

__all__ = ["SWEEP_MODES", "sweep_items", "run_sweep", "parse_range"]

SWEEP_MODES = ("score", "generate")


def parse_range(text: str | None, size: int, what: str) -> list[int]:
    """Parse "A:B" (half-open, like Python slices), "A" or None (everything) into indices below `size`."""
    if text is None or text.strip() in ("", ":"):
        return list(range(size))
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else size
        else:
            lo = int(text)
            hi = lo + 1
    except ValueError:
        raise InputError(f"malformed {what} range {text!r}; write A:B (e.g. 0:{size}) or a single index") from None
    if not (0 <= lo < hi <= size):
        raise InputError(f"{what} range {text!r} is out of bounds; this model has {what}s 0..{size - 1}, "
                         f"so use A:B with 0 <= A < B <= {size}")
    return list(range(lo, hi))


def sweep_items(baseline: pd.DataFrame, images: dict[str, object], conditions: Iterable[str] | None = None,
                aliases: dict[str, tuple[str, ...]] | None = None) -> list[SweepItem]:
    """The misleading prompts of an eval run (or those of `conditions`) as sweep items, each with its baseline
    reply's token ids (which the engine reuses as the clean reply) and its true-answer `aliases` by sample id."""
    rows = baseline[baseline["claim"].notna() & (baseline["condition"] != "control")]
    if conditions is not None:
        rows = rows[rows["condition"].isin(list(conditions))]
    items = []
    for row in rows.itertuples(index=False):
        cast = int if row.task == "count" else str
        reply_ids = getattr(row, "reply_ids", None)  # runs (or shards) evaluated before reply ids were stored
        known = reply_ids is not None and not isinstance(reply_ids, float)  # lack them (None, or NaN in a mix)
        items.append(SweepItem(row.sample_id, images[row.sample_id], row.prompt, cast(row.truth), cast(row.claim),
                               row.task, tuple(int(t) for t in reply_ids) if known else None, row.object,
                               (aliases or {}).get(row.sample_id, ())))
    return items


def run_sweep(vlm, parts, items: Sequence[SweepItem], grid: Sequence[tuple[int, int]], *,
              mode: str = "score", batch_size: int = 16, max_new_tokens: int = 50,
              intervention_mode: str = "zero", means: torch.Tensor | None = None,
              on_shard: Callable[[], None] | None = None) -> pd.DataFrame:
    """Sweep single-head knockouts of every (layer, head) in `grid` over `items`, one shard per (item, layer).

    Finished shards in `parts` (a `runs.Parts`) are skipped. Returns the full table, one row per
    (item, layer, head), sorted by item order, layer, head.
    """
    if mode not in SWEEP_MODES:
        raise InputError(f"unknown sweep mode {mode!r}; use one of {', '.join(SWEEP_MODES)}")
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for layer, head in sorted(set(grid)):
        by_layer.setdefault(layer, []).append((layer, head))
    done = parts.done()
    for index, item in enumerate(items):
        todo = [layer for layer in by_layer if _key(index, layer) not in done]
        if not todo:
            continue
        # one clean reply and clean forward per prompt, shared by all its layers
        prepare = prepare_score if mode == "score" else prepare_generate
        setup = prepare(vlm, item, max_new_tokens=max_new_tokens)
        for layer in todo:
            heads = by_layer[layer]
            if mode == "score":
                results = score_prompt(vlm, setup, heads, mode=intervention_mode, means=means, batch_size=batch_size)
            else:
                results = generate_prompt(vlm, setup, heads, mode=intervention_mode, means=means,
                                          batch_size=batch_size, max_new_tokens=max_new_tokens)
            frame = pd.DataFrame([
                {"sample_id": item.sample_id, "item": index, "truth": item.truth, "claim": item.claim,
                 "layer": l, "head": h, "mode": mode, **res}
                for (l, h), res in zip(heads, results)
            ])
            if mode == "score":
                frame["clean_reply"] = setup.clean_reply
            parts.write(_key(index, layer), frame)
            if on_shard is not None:
                on_shard()
    table = parts.read_all()
    return table.sort_values(["item", "layer", "head"], kind="stable").reset_index(drop=True)


def _key(index: int, layer: int) -> str:
    return f"{index:06d}-L{layer:03d}"
