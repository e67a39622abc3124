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

__all__ = ["HELD_OUT_SEED", "SELECTION_SEED", "held_out_sets", "measure_behaviour", "find_head_set", "behaviour_report"]

HELD_OUT_SEED = 20261122  # never used in training, whose scenes come from a seeded stream of 62-bit seeds
SELECTION_SEED = HELD_OUT_SEED + 1  # scenes on which head sets are chosen (then measured on the held-out ones)
_MAX_NEW_TOKENS = 12


def held_out_sets(images_per_count: int = 10, *, size: int = 112, seed: int = HELD_OUT_SEED) -> tuple[list, list]:
    """The held-out counting (counts 1-9, offsets 1-5) and colour samples (another `seed`: another such set)."""
    count = synthetic_counting(9 * images_per_count, size=size, seed=seed, offsets=(1, 2, 3, 4, 5))
    color = synthetic_color(6 * images_per_count // 2, size=size, seed=seed)
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


def _trial(vlm, count, heads, baseline: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Copy rate and base counting with `heads` knocked out, against `baseline` figures of the same prompts."""
    figures = _count_figures(evaluate(vlm, count, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS,
                                      intervention=HeadIntervention(frozenset(map(tuple, heads)))))
    return {
        "heads": format_heads(map(tuple, heads)),
        "copy_rate": figures["copy_rate"], "base_accuracy": figures["base_accuracy"],
        "copy_rate_relative_reduction": 1 - figures["copy_rate"] / baseline["copy_rate"]
        if baseline["copy_rate"] else None,
        "base_accuracy_drop": baseline["base_accuracy"] - figures["base_accuracy"],
    }


def _passes(trial: dict[str, Any]) -> bool:
    return (trial["copy_rate_relative_reduction"] or 0) >= 0.4 and trial["base_accuracy_drop"] <= 0.10


def find_head_set(vlm, *, images_per_count: int = 10, max_heads: int = 5, batch_size: int = 32) -> dict[str, Any]:
    """Find a head set on one set of scenes and measure it on another, so its reported cut is not the one it
    was chosen on.

    On the selection set: sweep every head (score mode) over the misleading counting prompts, knock out the
    best-k sets (k = 1..max_heads) jointly, and choose the smallest that cuts the copy rate by >= 40% relative
    with base counting down at most 10 points. Then measure that set on the held-out set ("best").
    """
    selection, _ = held_out_sets(images_per_count, seed=SELECTION_SEED)
    grid = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    rows = []
    for sample in (s for s in selection if s.kind == "misleading"):
        item = SweepItem(sample.id, sample.image, sample.prompt, sample.truth, sample.claim)
        setup = prepare_score(vlm, item, max_new_tokens=_MAX_NEW_TOKENS)
        for (layer, head), result in zip(grid, score_prompt(vlm, setup, grid, batch_size=len(grid))):
            rows.append({"sample_id": sample.id, "truth": sample.truth, "layer": layer, "head": head, **result})
    sweep = pd.DataFrame(rows)
    chosen_on = _count_figures(evaluate(vlm, selection, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS))
    trials = [{"set": name, **_trial(vlm, selection, heads, chosen_on, batch_size)}
              for name, heads in best_k_sets(sweep, ks=tuple(range(1, max_heads + 1))).items() if heads]
    chosen = next((t for t in trials if _passes(t)), None)
    count, _ = held_out_sets(images_per_count)
    baseline = _count_figures(evaluate(vlm, count, batch_size=batch_size, max_new_tokens=_MAX_NEW_TOKENS))
    best = None if chosen is None else {
        "set": chosen["set"], **_trial(vlm, count, [tuple(map(int, h[1:].split("H"))) for h in
                                                    chosen["heads"].split(",")], baseline, batch_size)}
    return {"baseline": {"copy_rate": baseline["copy_rate"], "base_accuracy": baseline["base_accuracy"]},
            "selection": {"seed": SELECTION_SEED, "copy_rate": chosen_on["copy_rate"],
                          "base_accuracy": chosen_on["base_accuracy"]},
            "trials": trials, "best": best, "best_passes": best is not None and _passes(best), "sweep": sweep}


def behaviour_report(vlm, *, images_per_count: int = 10) -> dict[str, Any]:
    """Everything the model card states: behaviour figures and the head-set search (without the sweep table)."""
    heads = find_head_set(vlm, images_per_count=images_per_count)
    heads.pop("sweep")
    return {"behaviour": measure_behaviour(vlm, images_per_count=images_per_count), "head_set": heads,
            "n_parameters": sum(p.numel() for p in vlm.model.parameters()), "held_out_seed": HELD_OUT_SEED}
