"""The PIH task as `halluscope bench pih` runs it: the prompts `halluscope eval` asks (the base question, the
truthful control and the misleading claims of the counting or colour task), each method's replies parsed and
classified as `eval` classifies them (`evaluation.classify`) and summed up per method by `metrics.summarize`:
base accuracy and the copy rate on misleading prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

__all__ = ["COLUMNS", "MAX_NEW_TOKENS", "N_IMAGES", "PROMPT", "build_items", "plot", "score", "setting_lines"]

#: The comparison table: one row per method. Rates are over the base questions (accuracy) and over the
#: misleading prompts (copy and correction rates); n_base and n_misleading count them.
COLUMNS = ("method", "base_accuracy", "copy_rate", "correction_rate", "n_base", "n_misleading")
#: `halluscope eval`'s reply budget, so the greedy row equals an eval run of the same samples.
MAX_NEW_TOKENS = 50
#: The task asks its own prompts.
PROMPT = None
#: None: the task's default (synthetic data: one image per value and shape; loaded data: every row).
N_IMAGES = None


def build_items(data: str, *, n: int | None, seed: int, task: str, offsets: Sequence[int] | None,
                size: int | None, **_: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One item per sample of `task` built from `data` as `halluscope eval` builds them (item, then the
    `samples_to_frame` columns), their images (image_id, image: PNG bytes or a path), and what was left out
    (samples whose image does not decode, rows a loader skipped).

    Raises:
        InputError: what `build_task` refuses (unknown data, offsets of the other task, a bad size).
    """
    from halluscope.evaluation import readable_samples
    from halluscope.tasks import build_task, get_task
    from halluscope.tasks.sample import samples_to_frame

    spec = get_task(task)
    values = None if offsets is None else tuple(offsets)
    samples = build_task(spec.name, data, n=n, seed=seed, **{spec.knob: values},
                         **({"size": size} if size is not None else {}))
    ok, bad = readable_samples(samples)
    items = samples_to_frame(ok)
    items.insert(0, "item", range(len(items)))
    first = items.drop_duplicates("image_id")
    images = pd.DataFrame({"image_id": first["image_id"].to_numpy(),
                           "image": [b if b is not None else p for b, p in zip(first["image_bytes"],
                                                                                first["image_path"])]})
    skipped = {"skipped": [{"sample_id": s, "reason": r} for s, r in bad],
               "skipped_source_rows": [{"row": r.row, "image_id": r.image_id, "reason": r.reason}
                                       for r in getattr(samples, "skipped", ())]}
    return items, images, {"task": spec.name, "task_version": spec.version, **skipped}


def score(items: pd.DataFrame, replies: pd.DataFrame, **_: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Per method: base accuracy, copy and correction rates on misleading prompts, and their counts; each reply
    with its parsed answer and outcome; and the rates per misleading condition of every method.

    Args:
        items: from `build_items`.
        replies: method, item, reply: every method's reply to every item.
    """
    from halluscope import metrics
    from halluscope.evaluation import classify
    from halluscope.tasks.sample import INT_VALUED_TASKS, samples_from_frame

    sample_of = dict(zip(items["item"], samples_from_frame(items)))
    rows = []
    for method, item, reply in replies[["method", "item", "reply"]].itertuples(index=False):
        sample = sample_of[item]
        answer, outcome = classify(sample, reply)
        rows.append({"method": method, "item": item, "sample_id": sample.id, "image_id": sample.image_id,
                     "task": sample.task, "condition": sample.condition, "object": sample.object,
                     "truth": sample.truth, "claim": sample.claim, "prompt": sample.prompt, "reply": reply,
                     "answer": answer, "outcome": outcome})
    details = pd.DataFrame(rows)
    if details["task"].iloc[0] in INT_VALUED_TASKS:
        details = details.astype({"truth": "Int64", "claim": "Int64", "answer": "Int64"})
    table, by_condition = [], {}
    for method, group in details.groupby("method", sort=False):
        summary = metrics.summarize(group)
        table.append({"method": method, "base_accuracy": summary["base_accuracy"], "copy_rate": summary["copy_rate"],
                      "correction_rate": summary["correction_rate"],
                      "n_base": int((group["condition"] == metrics.BASE).sum()),
                      "n_misleading": summary["n_misleading"]})
        by_condition[method] = summary["copy_rate_by_condition"]
    return pd.DataFrame(table, columns=list(COLUMNS)), details, {"copy_rate_by_condition": by_condition}


def setting_lines(summary: dict[str, Any]) -> list[str]:
    """What the task and the rates are (the lines `bench_step.setting_lines` adds for pih)."""
    values = summary["offsets"] or "the task's default"
    return [f"task: {summary['task']} (version {summary['task_version']}), offsets {values}, "
            f"size {summary['size'] or 'default'}",
            "replies classified as `halluscope eval` classifies them (evaluation.classify); base_accuracy over the "
            "base questions, copy_rate and correction_rate over the misleading prompts (metrics.summarize)"]


def plot(table: pd.DataFrame, summary: dict[str, Any], path: Path, *, title: str) -> Path:
    """One panel per rate (base accuracy, copy rate, correction rate), one horizontal bar per method with its
    value, and greedy's value as a dashed line, so any number of methods stays readable."""
    from halluscope.plots.figure import new_panels, save_png, set_titles

    rates = {"base_accuracy": "base accuracy", "copy_rate": "copy rate (misleading)",
             "correction_rate": "correction rate (misleading)"}
    methods = list(table["method"])
    fig, axes = new_panels(len(rates), width=3.4, height=1.2 + 0.3 * len(methods))
    for k, (ax, (column, label)) in enumerate(zip(axes, rates.items())):
        values = table[column].astype(float).tolist()
        bars = ax.barh(range(len(methods)), values, color=["dimgray"] + ["tab:blue"] * (len(methods) - 1))
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize="x-small", padding=2)
        ax.axvline(values[0], color="dimgray", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(methods)), methods if k == 0 else [""] * len(methods), fontsize="small")
        ax.invert_yaxis()
        ax.set_xlim(0, 1.15)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    note = f"n = {table['n_base'].iloc[0]} base questions, {table['n_misleading'].iloc[0]} misleading prompts per method"
    set_titles(fig, title, note)
    return save_png(fig, path)
