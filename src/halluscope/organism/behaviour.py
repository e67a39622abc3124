"""Measuring the organism's behaviour on a fixed held-out synthetic set: the figures its model card states and
its behaviour test checks (counting and colour accuracy, copy rate by true count, and a head set found by the
sweep whose knockout cuts copying while counting survives)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from halluscope.analysis.ranking import best_k_sets
from halluscope.evaluation import evaluate
from halluscope.interventions.heads import HeadIntervention, format_heads
from halluscope.metrics.pih import base_accuracy, pih_rates, select_misleading
from halluscope.sweep.engine import SweepItem, prepare_score, score_prompt
from halluscope.tasks.color import synthetic_color
from halluscope.tasks.counting import synthetic_counting

__all__ = ["HELD_OUT_SEED", "held_out_sets", "measure_behaviour", "find_head_set", "behaviour_report"]

HELD_OUT_SEED = 20261122  # never used in training, whose scenes come from a seeded stream of 62-bit seeds
_MAX_NEW_TOKENS = 12


def held_out_sets(images_per_count: int = 10, *, size: int = 112) -> tuple[list, list]:
    """The held-out counting (counts 1-9, offsets 1-5) and colour samples."""
    count = synthetic_counting(9 * images_per_count, size=size, seed=HELD_OUT_SEED, offsets=(1, 2, 3, 4, 5))
    color = synthetic_color(6 * images_per_count // 2, size=size, seed=HELD_OUT_SEED)
    return count, color


def _count_figures(table: pd.DataFrame) -> dict[str, Any]:
    acc = base_accuracy(table, by=("truth",))
    copy = pih_rates(select_misleading(table), by=("truth",))
    base = table[table["condition"] == "base"]
    mis = select_misleading(table)
    low, high = mis[mis["truth"].astype(int) <= 3], mis[mis["truth"].astype(int) >= 7]
    return {
        "base_accuracy": float((base["outcome"] == "corrected").mean()),
        "base_accuracy_by_count": {int(t): float(a) for t, a in zip(acc["truth"], acc["accuracy"])},
        "copy_rate": float((mis["outcome"] == "copied").mean()),
        "copy_rate_by_count": {int(t): float(c) for t, c in zip(copy["truth"], copy["copy_rate"])},
        "copy_rate_counts_1_3": float((low["outcome"] == "copied").mean()),
        "copy_rate_counts_7_9": float((high["outcome"] == "copied").mean()),
    }


def measure_behaviour(vlm, *, images_per_count: int = 10, batch_size: int = 32) -> dict[str, Any]:
    """Greedy behaviour on the held-out set: counting, colour and copying figures."""
    count, color = held_out_sets(images_per_count)
    counts = evaluate(vlm, count, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS)
    colors = evaluate(vlm, color, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS)
    base_colour = colors[colors["condition"] == "base"]
    mis_colour = select_misleading(colors)
    by_distance = pih_rates(mis_colour, by=("condition",))
    return {
        **_count_figures(counts),
        "color_accuracy": float((base_colour["outcome"] == "corrected").mean()),
        "color_copy_rate_by_distance": dict(zip(by_distance["condition"], by_distance["copy_rate"].astype(float))),
        "n_count_prompts": len(counts), "n_color_prompts": len(colors),
    }


def find_head_set(vlm, *, images_per_count: int = 10, max_heads: int = 5, batch_size: int = 32) -> dict[str, Any]:
    """Sweep every head (score mode) on held-out misleading counting prompts, then knock out the best-k sets
    (k = 1..max_heads) jointly and measure copy rate and base counting accuracy with each."""
    count, _ = held_out_sets(images_per_count)
    misleading = [s for s in count if s.kind == "misleading"]
    grid = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    rows = []
    for sample in misleading:
        item = SweepItem(sample.id, sample.image, sample.prompt, sample.truth, sample.claim)
        setup = prepare_score(vlm, item, max_new_tokens=_MAX_NEW_TOKENS)
        for (layer, head), result in zip(grid, score_prompt(vlm, setup, grid, batch_size=len(grid))):
            rows.append({"sample_id": sample.id, "truth": sample.truth, "layer": layer, "head": head, **result})
    sweep = pd.DataFrame(rows)
    baseline = _count_figures(evaluate(vlm, count, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS))
    sets = best_k_sets(sweep, ks=tuple(range(1, max_heads + 1)))
    trials = []
    for name, heads in sets.items():
        if not heads:
            continue
        table = evaluate(vlm, count, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS,
                         intervention=HeadIntervention(frozenset(map(tuple, heads))))
        figures = _count_figures(table)
        trials.append({
            "set": name, "heads": format_heads(map(tuple, heads)),
            "copy_rate": figures["copy_rate"], "base_accuracy": figures["base_accuracy"],
            "copy_rate_relative_reduction": 1 - figures["copy_rate"] / baseline["copy_rate"]
            if baseline["copy_rate"] else None,
            "base_accuracy_drop": baseline["base_accuracy"] - figures["base_accuracy"],
        })
    passing = [t for t in trials if (t["copy_rate_relative_reduction"] or 0) >= 0.4 and t["base_accuracy_drop"] <= 0.10]
    return {"baseline": {"copy_rate": baseline["copy_rate"], "base_accuracy": baseline["base_accuracy"]},
            "trials": trials, "best": passing[0] if passing else None, "sweep": sweep}


def behaviour_report(vlm, *, images_per_count: int = 10) -> dict[str, Any]:
    """Everything the model card states: behaviour figures and the head-set search (without the sweep table)."""
    heads = find_head_set(vlm, images_per_count=images_per_count)
    heads.pop("sweep")
    return {"behaviour": measure_behaviour(vlm, images_per_count=images_per_count), "head_set": heads,
            "n_parameters": sum(p.numel() for p in vlm.model.parameters()), "held_out_seed": HELD_OUT_SEED}
