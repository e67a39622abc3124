"""`compare_step`: finished `bench pope`, `bench chair` or `bench pih` runs side by side, each method's change from
the first with a paired bootstrap confidence interval over images.

A before/after table from two benchmark runs is only as good as the noise behind it: on 100 images CHAIR_i moves
by a few hundredths between training seeds, and POPE F1 by one or two answers in 600. Every metric of these tables
is a ratio of sums of per-image counts (CHAIR_i = hallucinated / mentioned objects, POPE precision = TP / (TP +
FP), PIH copy rate = copied / misleading prompts, ...), so one resample of the images (the same draw for every
arm: the comparison is paired) gives every metric of every arm at once, as weighted sums of the counts. The runs
must have asked the same items of the same images and scored them the same way; the first arm (the first run's
first method) is the baseline.

    compare_step("runs/compare", runs=["runs/chair", "runs/chair-apasi"])["table"]
    # arm, model, metric, value, baseline, change, change_low, change_high, relative, relative_low, relative_high
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from halluscope.bench.step import markdown_table
from halluscope.errors import InputError, RunError
from halluscope.runs import Run, writer_lock

__all__ = ["BENCHMARKS", "COLUMNS", "METRICS", "Arm", "arm_counts", "bootstrap_weights", "compare_arms",
           "compare_step", "metric_values"]

#: The benchmarks a comparison reads.
BENCHMARKS = ("pope", "chair", "pih")
#: Each metric as (numerator, denominator): weights over the per-image count columns of `arm_counts`.
METRICS: dict[str, dict[str, tuple[dict[str, float], dict[str, float]]]] = {
    "chair": {"chair_s": ({"hallucinating": 1}, {"captions": 1}),
              "chair_i": ({"hallucinated": 1}, {"mentioned": 1}),
              "recall": ({"recalled": 1}, {"ground_truth": 1}),
              "length": ({"words": 1}, {"captions": 1})},
    "pope": {"accuracy": ({"tp": 1, "tn": 1}, {"tp": 1, "fp": 1, "tn": 1, "fn": 1}),
             "precision": ({"tp": 1}, {"tp": 1, "fp": 1}),
             "recall": ({"tp": 1}, {"tp": 1, "fn": 1}),
             "f1": ({"tp": 2}, {"tp": 2, "fp": 1, "fn": 1}),
             "yes_ratio": ({"tp": 1, "fp": 1}, {"tp": 1, "fp": 1, "tn": 1, "fn": 1})},
    "pih": {"base_accuracy": ({"base_correct": 1}, {"base": 1}),
            "copy_rate": ({"copied": 1}, {"misleading": 1}),
            "correction_rate": ({"corrected": 1}, {"misleading": 1})},
}
#: The comparison table's columns (POPE adds `split` after `model`).
COLUMNS = ("arm", "model", "metric", "value", "baseline", "change", "change_low", "change_high", "relative",
           "relative_low", "relative_high")
#: What the runs must share for their scores to be comparable (keys of a bench run's summary).
_SHARED = ("data", "seed", "n_images", "n_items", "prompt", "rule", "chair_method", "vocabulary", "nlp_components",
           "task", "task_version", "offsets", "size")


@dataclass(frozen=True)
class Arm:
    """One method of one bench run: its label, the model it ran, and its per-image counts (one row per image,
    in the order of the baseline's images; POPE: one column per split and count)."""

    label: str
    model: str
    counts: pd.DataFrame


def arm_counts(benchmark: str, replies: pd.DataFrame) -> pd.DataFrame:
    """Per-image counts of one method's scored replies (a bench run's `replies.parquet`, one method's rows).

    CHAIR: captions, hallucinating (captions with a hallucinated object), hallucinated, mentioned, recalled and
    ground-truth objects, words. POPE: tp, fp, tn, fn per split, as columns `(split, count)`. pih: base prompts
    and those answered correctly, misleading prompts and those whose reply copied or corrected the claim
    (`metrics.pih`'s outcomes).
    """
    if benchmark == "chair":
        per_caption = pd.DataFrame({
            "image_id": replies["image_id"], "captions": 1, "hallucinating": replies["chair_s"],
            "hallucinated": replies["n_hallucinated"], "mentioned": replies["n_mentions"],
            "recalled": replies["n_recalled"], "ground_truth": replies["n_ground_truth"], "words": replies["length"]})
        return per_caption.groupby("image_id", sort=False).sum()
    if benchmark == "pih":
        from halluscope.metrics.pih import BASE, CONTROL

        base, misleading = replies["condition"] == BASE, ~replies["condition"].isin([BASE, CONTROL])
        per_prompt = pd.DataFrame({
            "image_id": replies["image_id"], "base": base, "base_correct": base & (replies["outcome"] == "corrected"),
            "misleading": misleading, "copied": misleading & (replies["outcome"] == "copied"),
            "corrected": misleading & (replies["outcome"] == "corrected")})
        return per_prompt.groupby("image_id", sort=False).sum().astype("int64")
    label, prediction = replies["label"] == "yes", replies["prediction"] == "yes"
    outcomes = pd.DataFrame({"image_id": replies["image_id"], "split": replies["split"],
                             "tp": label & prediction, "fp": ~label & prediction,
                             "tn": ~label & ~prediction, "fn": label & ~prediction})
    counts = outcomes.groupby(["image_id", "split"], sort=False).sum().astype("int64")
    columns = pd.MultiIndex.from_product([list(dict.fromkeys(replies["split"])), ["tp", "fp", "tn", "fn"]])
    return counts.unstack("split", fill_value=0).swaplevel(axis=1).reindex(columns=columns)


def metric_values(benchmark: str, sums: pd.DataFrame) -> pd.DataFrame:
    """Every metric from summed counts (`sums`: one row per resample or one row in all, columns as
    `arm_counts` gives them); NaN where a denominator is 0, and F1 NaN where precision or recall is, as
    `metrics.pope.pope_metrics` has it. Columns: metric (CHAIR, pih) or (split, metric) (POPE)."""
    def ratio(frame: pd.DataFrame, numerator: dict, denominator: dict) -> np.ndarray:
        top = sum(weight * frame[c].to_numpy(dtype="float64") for c, weight in numerator.items())
        bottom = sum(weight * frame[c].to_numpy(dtype="float64") for c, weight in denominator.items())
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)

    metrics = METRICS[benchmark]
    if benchmark != "pope":
        return pd.DataFrame({name: ratio(sums, *parts) for name, parts in metrics.items()}, index=sums.index)
    columns = {}
    for split in dict.fromkeys(sums.columns.get_level_values(0)):
        frame = sums[split]
        values = {name: ratio(frame, *parts) for name, parts in metrics.items()}
        undefined = ((frame["tp"] + frame["fp"]) == 0) | ((frame["tp"] + frame["fn"]) == 0)
        values["f1"] = np.where(undefined.to_numpy(), np.nan, values["f1"])
        columns.update({(split, name): value for name, value in values.items()})
    return pd.DataFrame(columns, index=sums.index)


def bootstrap_weights(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """How often each image is drawn in each resample: `[resamples, n_images]` counts, each row a draw of
    `n_images` images with replacement (a multinomial draw is exactly that)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=resamples)


def compare_arms(benchmark: str, arms: Sequence[Arm], *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> pd.DataFrame:
    """Each arm's metrics, their change from the first arm's and the relative change, with percentile
    intervals at `level` from `resamples` paired bootstrap resamples of the images (`COLUMNS`; POPE adds split).

    Raises:
        InputError: fewer than two arms, arms over different images, resamples < 1 or level outside (0, 1).
    """
    if len(arms) < 2:
        raise InputError(f"{len(arms)} method(s) to compare; pass two or more bench runs, or a run with two or more "
                         "methods")
    if resamples < 1 or not 0 < level < 1:
        raise InputError(f"--bootstrap {resamples}, --level {level}: expected resamples >= 1 and 0 < level < 1")
    images = arms[0].counts.index
    for arm in arms[1:]:
        if not arm.counts.index.equals(images) or not arm.counts.columns.equals(arms[0].counts.columns):
            raise InputError(f"{arm.label} was scored on other images than {arms[0].label}; compare runs made with "
                             "the same --data, --n and --seed")
    weights = bootstrap_weights(len(images), resamples, seed)
    point = [metric_values(benchmark, arm.counts.sum().to_frame().T) for arm in arms]
    drawn = [metric_values(benchmark, pd.DataFrame(weights @ arm.counts.to_numpy(dtype="float64"),
                                                   columns=arm.counts.columns)) for arm in arms]
    tails = [50 * (1 - level), 100 - 50 * (1 - level)]
    rows = []
    for arm, values, resampled in zip(arms, point, drawn):
        for column in values.columns:
            base, value = float(point[0][column].iloc[0]), float(values[column].iloc[0])
            change = resampled[column].to_numpy() - drawn[0][column].to_numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = change / drawn[0][column].to_numpy()
            where = {"split": column[0], "metric": column[1]} if benchmark == "pope" else {"metric": column}
            rows.append({"arm": arm.label, "model": arm.model, **where, "value": value, "baseline": base,
                         "change": value - base, **_interval("change", change, tails),
                         "relative": (value - base) / base if base else np.nan,
                         **_interval("relative", relative, tails)})
    columns = list(COLUMNS)
    if benchmark == "pope":
        columns.insert(2, "split")
    return pd.DataFrame(rows, columns=columns)


def _interval(name: str, samples: np.ndarray, tails: list[float]) -> dict[str, float]:
    """The percentile interval of `samples` (NaN resamples left out; NaN when all are)."""
    finite = samples[np.isfinite(samples)]
    low, high = np.percentile(finite, tails) if len(finite) else (np.nan, np.nan)
    return {f"{name}_low": float(low), f"{name}_high": float(high)}


def _bench_summary(run: Run) -> tuple[dict[str, Any], str | None]:
    """The finished bench step's summary of `run` and when it finished, or a clear error."""
    steps = run.manifest.get("steps", {})
    names = [f"bench-{b}" for b in BENCHMARKS if f"bench-{b}" in steps]
    if not names:
        raise InputError(f"{run.path} is not a `halluscope bench` run (its steps: "
                         f"{', '.join(steps) or 'none'}); pass the --out of one")
    if steps[names[0]].get("status") != "finished":
        raise RunError(f"{run.path}: its {names[0].replace('-', ' ')} has not finished; rerun its command to resume "
                       "it, then compare")
    return run.read_json(f"{names[0].split('-')[1]}_summary"), steps[names[0]].get("finished")


def load_arms(runs: Sequence[str | Path]) -> tuple[str, list[Arm], list[dict[str, Any]]]:
    """The benchmark, every method of every run as an `Arm` (in run order, then method order) and what each run
    records (path, model, methods, when its bench step finished).

    Raises:
        InputError: a run of another benchmark, runs that asked different items or scored them differently.
        RunError: a missing or unfinished run.
    """
    arms, inputs, first = [], [], None
    names = [Path(path).name for path in runs]
    names = names if len(set(names)) == len(names) else [str(path) for path in runs]
    for path, name in zip(runs, names):
        run = Run.open(path)
        summary, finished = _bench_summary(run)
        benchmark = summary["benchmark"]
        if first is None:
            first = (path, summary, run.read_table("items"))
        else:
            _check_comparable(first, (path, summary, run.read_table("items")))
        replies = run.read_table("replies")
        methods = list(dict.fromkeys(replies["method"]))
        for method in methods:
            label = name if len(methods) == 1 else f"{name}:{method}"
            arms.append(Arm(label, summary["model"], arm_counts(benchmark, replies[replies["method"] == method])))
        inputs.append({"run": str(Path(path).resolve()), "model": summary["model"], "methods": methods,
                       "finished": finished})
    return first[1]["benchmark"], arms, inputs


def _check_comparable(first: tuple, other: tuple) -> None:
    """Raise InputError unless `other` ran the benchmark of `first` on the same items, scored the same way."""
    (path_a, a, items_a), (path_b, b, items_b) = first, other
    if b["benchmark"] != a["benchmark"]:
        raise InputError(f"{path_b} is a bench {b['benchmark']} run and {path_a} a bench {a['benchmark']} run; "
                         "compare runs of one benchmark")
    scored_a, scored_b = _scoring(a), _scoring(b)
    differ = [k for k in scored_a if scored_a[k] != scored_b[k]]
    if differ or not items_a.equals(items_b):
        what = ", ".join(f"{k} ({scored_a[k]!r} vs {scored_b[k]!r})" for k in differ) or "items"
        raise InputError(f"{path_a} and {path_b} differ in {what}; compare runs made with the same --data, --n, "
                         "--seed, prompt, --max-new-tokens and scoring options")


def _scoring(summary: dict[str, Any]) -> dict[str, Any]:
    """What a bench run's scores rest on besides its model: `_SHARED` and the decoding length."""
    return {**{k: summary.get(k) for k in _SHARED}, "max_new_tokens": summary["decoding"]["max_new_tokens"]}


def compare_step(out: str | Path, *, runs: Sequence[str | Path], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95, force: bool = False) -> dict[str, Any]:
    """Compare the methods of finished bench runs `runs` (the first run's first method is the baseline) into run
    directory `out`: `compare.parquet`, `compare.md`, `compare_summary.json` and `plots/compare.png`.

    Every invocation recomputes the table from the runs as they are now, so a bench run rerun with another
    method is never compared stale.

    Returns:
        {"table": the comparison (`compare_arms`), "summary": what the run records, "run": the Run}.

    Raises:
        InputError, RunError: as `load_arms` and `compare_arms`; `out` holding a different run (force=True).
    """
    if not runs:
        raise InputError("no bench runs to compare; pass two or more --out directories of `halluscope bench`")
    benchmark, arms, inputs = load_arms(runs)
    table = compare_arms(benchmark, arms, resamples=resamples, seed=seed, level=level)
    arguments = {"runs": [i["run"] for i in inputs], "bootstrap": resamples, "seed": seed, "level": level}
    summary = {"benchmark": benchmark, "baseline": arms[0].label, "n_images": len(arms[0].counts),
               "interval": f"{100 * level:g}% paired bootstrap percentile interval over images ({resamples} resamples, "
                           f"seed {seed})", "inputs": inputs, "table": table.to_dict("records")}
    with writer_lock(out, create=True):
        run = Run.create(out, step="bench-compare", arguments=arguments, force=force)
        run.write_table("compare", table)
        run.write_json("compare_summary", summary)
        run.write_file("compare.md", lambda tmp: tmp.write_text(_markdown(summary, table), encoding="utf-8"))
        from halluscope.plots.bench_figures import plot_comparison

        plot_comparison(table, run.plots_dir / "compare.png", title=f"{benchmark.upper()}: change from "
                        f"{summary['baseline']}", note=f"{summary['n_images']} images; bars: {summary['interval']}")
        run.finish_step("bench-compare", {k: v for k, v in summary.items() if k != "table"})
    return {"table": table, "summary": summary, "run": run}


def _markdown(summary: dict[str, Any], table: pd.DataFrame) -> str:
    """Two tables: each arm's value and absolute change per metric, then the relative changes, with intervals."""
    keys = ["arm", "split"] if "split" in table.columns else ["arm"]
    metrics = list(dict.fromkeys(table["metric"]))

    def wide(cell) -> str:
        rows = []
        for key, group in table.groupby(keys, sort=False):
            by_metric = group.set_index("metric")
            rows.append([*(key if isinstance(key, tuple) else (key,)), *(cell(by_metric.loc[m]) for m in metrics)])
        return markdown_table(pd.DataFrame(rows, columns=[*keys, *metrics]))

    absolute = wide(lambda r: f"{r['value']:.3f} ({r['change']:+.3f} "
                              f"[{r['change_low']:+.3f}, {r['change_high']:+.3f}])")
    relative = wide(lambda r: f"{r['relative']:+.1%} [{r['relative_low']:+.1%}, {r['relative_high']:+.1%}]")
    sources = "\n".join(f"- {i['run']}: {i['model']} ({', '.join(i['methods'])})" for i in summary["inputs"])
    return (f"# {summary['benchmark'].upper()}: change from {summary['baseline']}\n\n{sources}\n\n"
            f"{summary['n_images']} images; intervals: {summary['interval']}.\n\n"
            f"## Value (change [interval])\n\n{absolute}\n\n## Relative change [interval]\n\n{relative}\n")
