"""Running a knockout sweep over a run's prompts as resumable shards (one per prompt x layer).

Each finished shard is written atomically under RUN/parts/sweep/, so a killed sweep restarts where it stopped
and the final table has every (prompt, layer, head) row exactly once.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator, Sequence

import pandas as pd
import torch

from halluscope.errors import InputError
from halluscope.scale import LOCAL, ModelSource, Scale, map_shards
from halluscope.sweep.attribution import ESTIMATORS, attribution_scores, estimate_rows
from halluscope.sweep.engine import SweepItem, generate_prompt, prepare_generate, prepare_score, score_prompt

__all__ = ["EXACT_MODES", "SWEEP_MODES", "RANK_BY", "sweep_items", "run_sweep", "parse_range", "shard_count",
           "rows_by", "verification_summary"]

RANK_BY = ("auto", "exact", "estimate")

EXACT_MODES = ("score", "generate")
SWEEP_MODES = (*EXACT_MODES, *ESTIMATORS)


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


def shard_count(mode: str, items: int, layers: int) -> int:
    """How many shards a sweep writes: one per prompt and layer (exact modes) or per prompt (estimators)."""
    return items * layers if mode in EXACT_MODES else items


def run_sweep(vlm, parts, items: Sequence[SweepItem], grid: Sequence[tuple[int, int]], *,
              mode: str = "score", batch_size: int = 16, max_new_tokens: int = 50,
              intervention_mode: str = "zero", means: torch.Tensor | None = None, verify_top: int = 0,
              on_shard: Callable[[], None] | None = None, scale: Scale = LOCAL) -> pd.DataFrame:
    """Sweep single-head knockouts of every (layer, head) in `grid` over `items`.

    Exact modes ("score", "generate") write one shard per (item, layer). Estimators ("atp", "atp-star") write one
    shard per item: every head's estimate, plus exact score-mode rows for the `verify_top` heads with the largest
    estimated effect. Finished shards in `parts` (a `runs.Parts`) are skipped; the rest run where `scale` says
    (`halluscope.scale.map_shards`), one task per item. Returns the full table, one row per (item, layer, head,
    estimator), sorted by item order, layer, head.
    """
    if mode not in SWEEP_MODES:
        raise InputError(f"unknown sweep mode {mode!r}; use one of {', '.join(SWEEP_MODES)}")
    if verify_top and mode not in ESTIMATORS:
        raise InputError(f"--verify-top re-measures estimated heads; use it with --mode {' or '.join(ESTIMATORS)}")
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for layer, head in sorted(set(grid)):
        by_layer.setdefault(layer, []).append((layer, head))
    done = parts.done()
    shards = []  # (index, item, layers still to do; None for an estimator's one shard per item)
    for index, item in enumerate(items):
        if mode in ESTIMATORS:
            if _key(index) not in done:
                shards.append((index, item, None))
            continue
        todo = tuple(layer for layer in by_layer if _key(index, layer) not in done)
        if todo:
            shards.append((index, item, todo))
    work = functools.partial(_sweep_shard, by_layer=by_layer, mode=mode, intervention_mode=intervention_mode,
                             means=means, verify_top=verify_top, batch_size=batch_size, max_new_tokens=max_new_tokens)
    map_shards(shards, work, parts.write, model=ModelSource(vlm), scale=scale,
               on_part=None if on_shard is None else lambda key, frame: on_shard())
    table = parts.read_all()
    return table.sort_values(["item", "layer", "head"], kind="stable").reset_index(drop=True)


def _sweep_shard(vlm, shard: tuple[int, SweepItem, tuple[int, ...] | None], *,
                 by_layer: dict[int, list[tuple[int, int]]], mode: str, intervention_mode: str, means, verify_top: int,
                 batch_size: int, max_new_tokens: int) -> Iterator[tuple[str, pd.DataFrame]]:
    """One item's parts: each of its `layers` (exact modes, one clean reply and clean forward shared by them), or
    its one estimator part."""
    index, item, layers = shard
    if layers is None:
        heads = [head for layer in by_layer for head in by_layer[layer]]
        yield _key(index), _estimated(vlm, item, index, heads, mode, intervention_mode, means, verify_top, batch_size,
                                      max_new_tokens)
        return
    prepare = prepare_score if mode == "score" else prepare_generate
    setup = prepare(vlm, item, max_new_tokens=max_new_tokens)
    for layer in layers:
        heads = by_layer[layer]
        if mode == "score":
            results = score_prompt(vlm, setup, heads, mode=intervention_mode, means=means, batch_size=batch_size)
        else:
            results = generate_prompt(vlm, setup, heads, mode=intervention_mode, means=means,
                                      batch_size=batch_size, max_new_tokens=max_new_tokens)
        frame = _frame(item, index, heads, mode, "exact", results)
        if mode == "score":
            frame["clean_reply"] = setup.clean_reply
        yield _key(index, layer), frame


def _frame(item: SweepItem, index: int, heads, mode: str, estimator: str, results) -> pd.DataFrame:
    return pd.DataFrame([{"sample_id": item.sample_id, "item": index, "truth": item.truth, "claim": item.claim,
                          "layer": l, "head": h, "mode": mode, "estimator": estimator, **res}
                         for (l, h), res in zip(heads, results)])


def _estimated(vlm, item: SweepItem, index: int, heads: list[tuple[int, int]], estimator: str,
               intervention_mode: str, means, verify_top: int, batch_size: int, max_new_tokens: int) -> pd.DataFrame:
    """One item's shard of an estimator sweep: every head's estimate, then the top heads measured exactly."""
    setup = prepare_score(vlm, item, max_new_tokens=max_new_tokens)
    estimates, clean = attribution_scores(vlm, setup, estimator=estimator, mode=intervention_mode, means=means)
    estimated = estimate_rows(vlm, setup, heads, clean, estimates)
    frames = [_frame(item, index, heads, estimator, estimator, estimated)]
    if verify_top:
        order = sorted(range(len(heads)), key=lambda i: -estimated[i]["effect"])[:verify_top]
        top = sorted(heads[i] for i in order)
        exact = score_prompt(vlm, setup, top, mode=intervention_mode, means=means, batch_size=batch_size)
        for row in exact:
            row["effect"] = sum(row[f"logit_diff_{f}"] - clean[f] for f in clean) / len(clean)
        frames.append(_frame(item, index, top, estimator, "exact", exact))
    frame = pd.concat(frames, ignore_index=True)
    frame["clean_reply"] = setup.clean_reply
    return frame


def rows_by(table: pd.DataFrame, by: str = "auto") -> pd.DataFrame:
    """The rows of a sweep table that `by` names: "exact" (exact knockouts; in an estimator sweep, the verified
    heads), "estimate" (an estimator's rows, every head) or "auto" (the estimates of an estimator sweep, else
    the exact rows). Tables made before the `estimator` column are exact."""
    if by not in RANK_BY:
        raise InputError(f"unknown --by {by!r}; use one of {', '.join(RANK_BY)}")
    kind = table["estimator"] if "estimator" in table.columns else pd.Series("exact", index=table.index)
    estimated = kind != "exact"
    if by == "auto":
        by = "estimate" if estimated.any() else "exact"
    rows = table[estimated if by == "estimate" else ~estimated]
    if rows.empty:
        raise InputError(f"the sweep has no {by} rows; run `halluscope sweep --mode atp-star` for estimates, or "
                         f"add `--verify-top K` (or a score/generate sweep) for exact rows")
    return rows.reset_index(drop=True)


def verification_summary(table: pd.DataFrame) -> dict[str, float | int | None]:
    """How well an estimator sweep's estimates match its exactly verified heads: the number of verified
    (prompt, head) pairs, the rank correlation of estimated and exact effects over them, and the share whose
    estimated outcome (the answer the estimate favours) is the exact one."""
    kind = table["estimator"]
    estimated = table[kind != "exact"].set_index(["sample_id", "layer", "head"])
    exact = table[kind == "exact"].set_index(["sample_id", "layer", "head"])
    pairs = exact.merge(estimated[["effect", "outcome"]], left_index=True, right_index=True, how="inner",
                        suffixes=("", "_estimate"))
    if len(pairs) < 2:
        return {"verified": len(pairs), "spearman": None, "outcome_agreement": None}
    spearman = pairs["effect"].rank().corr(pairs["effect_estimate"].rank())
    return {"verified": len(pairs), "spearman": None if pd.isna(spearman) else float(spearman),
            "outcome_agreement": float((pairs["outcome"] == pairs["outcome_estimate"]).mean())}


def _key(index: int, layer: int | None = None) -> str:
    return f"{index:06d}" if layer is None else f"{index:06d}-L{layer:03d}"
