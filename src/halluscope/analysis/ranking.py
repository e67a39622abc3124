"""Head ranking over a knockout sweep: per-head correction and copy rates, dense ranks, and the named head
sets ("top2", "best3") that later commands take as `--heads`.

Input is the sweep table, one row per (sample, layer, head) knockout with columns `sample_id`, `truth`,
`condition`, `layer`, `head`, `outcome` (one of `OUTCOMES`) and optionally `baseline_outcome` (the outcome
without a knockout). Pass misleading prompts only if the rates should be PIH corrections.

The named sets follow the PIH reference study (pih-reference.md §3, §4.1), with its defects fixed:

- "top{k}": the union over true values of the heads with dense rank <= k by per-value correction rate;
- "best{k}": the k heads with the highest overall correction rate.
- With a `baseline_outcome` column, a row counts as corrected only if the knockout changed the answer to the
  truth (the baseline did not already give it), as the reference's "number changed to ground truth" did; a
  knockout that changes nothing then scores 0 and joins no named set.
- Heads with zero corrections appear in every table (the reference built its tables from the corrected
  rows only, so they vanished). They are never put in a named set: in the reference they could not be
  ranked, and with ties a rank of 0 corrections would pull in every such head.
- A head's overall rate divides by its own number of rows, not by the row count of L0H0, so a sweep
  need not contain L0H0 and heads swept on different prompt subsets are compared fairly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from halluscope.errors import InputError
from halluscope.metrics.pih import OUTCOMES, condition_sort_key, truth_sort_key

__all__ = [
    "best_k_sets",
    "correction_matrix",
    "head_rates",
    "rank_heads",
    "rank_report",
    "resolve_head_set",
    "top_k_sets",
]

HeadList = list[tuple[int, int]]

_HEAD_COLUMNS = ("layer", "head")
_SET_NAME = re.compile(r"^(top|best)(\d+)$", re.IGNORECASE)
_FIX = "pass the sweep table written by `halluscope sweep` (run.read_table('sweep'))"
_REPORT_TOP_K = 5  # entries per true value in rank_report()["by_truth"]
_REPORT_TOP_KS = [1, 2, 3, 4, 5]
_REPORT_BEST_KS = [1, 3, 5, 10]


# ------------------------------------------------------------------------------------------ validation


def _as_columns(by: str | Sequence[str]) -> list[str]:
    columns = [by] if isinstance(by, str) else list(by)
    clash = [c for c in columns if c in _HEAD_COLUMNS]
    if clash:
        raise InputError(f"by={columns!r} repeats {clash}; rates are always per (layer, head), so group by other "
                         "columns, e.g. by=('truth',)")
    return columns


def _check_sweep(sweep: pd.DataFrame, needed: Iterable[str], what: str) -> pd.DataFrame:
    """The needed columns of `sweep` (plus `baseline_outcome` when present), layer/head as int64."""
    if not isinstance(sweep, pd.DataFrame):
        raise InputError(f"{what} expects a pandas DataFrame, got {type(sweep).__name__}; {_FIX}")
    needed = list(dict.fromkeys([*needed, *_HEAD_COLUMNS, "outcome"]))
    missing = [c for c in needed if c not in sweep.columns]
    if missing:
        raise InputError(f"{what}: sweep table lacks column(s) {missing}; needs {needed}, found "
                         f"{list(sweep.columns)}; {_FIX}")
    if sweep.empty:
        raise InputError(f"{what}: the sweep table has no rows; run `halluscope sweep --run RUN` first")
    keep = needed + (["baseline_outcome"] if "baseline_outcome" in sweep.columns else [])
    table = sweep[keep].copy()
    for column in ("outcome", "baseline_outcome"):
        if column in table.columns:
            values = table[column]
            bad = sorted({str(v) for v in values.dropna().unique()} - set(OUTCOMES)) + (
                ["<missing>"] if values.isna().any() else [])
            if bad:
                raise InputError(f"{what}: unknown {column} value(s) {bad}; expected one of {list(OUTCOMES)}; {_FIX}")
    for column in _HEAD_COLUMNS:
        numbers = pd.to_numeric(table[column], errors="coerce").astype("float64")
        bad_rows = numbers.isna() | (numbers % 1 != 0) | (numbers < 0)
        if bad_rows.any():
            example = table[column][bad_rows].iloc[0]
            raise InputError(f"{what}: column {column!r} has {int(bad_rows.sum())} value(s) that are not "
                             f"non-negative integers, e.g. {example!r}; {_FIX}")
        table[column] = numbers.astype("int64")
    return table


def _check_ks(ks: Iterable[int], what: str) -> list[int]:
    ks = list(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad or not ks:
        raise InputError(f"{what}: ks={ks!r} must be positive integers, e.g. ks=(1, 3, 5)")
    return sorted({int(k) for k in ks})


# ------------------------------------------------------------------------------------------- sorting


def _sort_key(column: str) -> Callable[[Any], Any]:
    if column == "condition":
        return condition_sort_key
    if column in ("layer", "head", "rank"):
        return int
    return truth_sort_key


def _sorted(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows ordered by `columns`: conditions by `condition_sort_key`, truths (and other columns) by
    `truth_sort_key`, layer/head/rank numerically."""
    keys = [_sort_key(c) for c in columns]
    rows = list(table[list(columns)].itertuples(index=False, name=None))
    order = sorted(range(len(rows)), key=lambda i: tuple(key(v) for key, v in zip(keys, rows[i])))
    return table.iloc[order].reset_index(drop=True)


def _heads(table: pd.DataFrame) -> HeadList:
    return sorted({(int(l), int(h)) for l, h in zip(table["layer"], table["head"])})


# -------------------------------------------------------------------------------------------- tables


def head_rates(sweep: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """Correction and copy rates of every knocked-out head, per group of `by`.

    Every (layer, head, by...) group in the sweep gets a row, also those with zero corrections.

    Args:
        sweep: the sweep table (needs `layer`, `head`, `outcome` and the `by` columns).
        by: extra grouping columns; () gives one row per head, ("truth",) one per head and true value.

    Returns:
        Columns `*by, layer, head, n, corrected, copied, correction_rate, copy_rate`, sorted by
        (by..., layer, head); with `baseline_outcome`, `corrected` counts rows whose answer the knockout
        changed to the truth. With a `baseline_outcome` column also `n_baseline_copied` (rows whose
        baseline copied the prompt), `flipped` (of those, rows the knockout made "corrected") and
        `flip_rate` = flipped / n_baseline_copied (NaN when no baseline copied).

    Raises:
        InputError: a column is missing, the table is empty, an outcome is unknown or a layer/head is not
            a non-negative integer.

    Example:
        >>> head_rates(run.read_table("sweep"), by=("truth",))
    """
    by = _as_columns(by)
    return _rates(_check_sweep(sweep, by, "head_rates"), by)


def _rates(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """`head_rates` of a checked table."""
    outcome = table["outcome"]
    corrected = outcome == "corrected"
    if "baseline_outcome" in table.columns:  # count changes only: a prompt already answered right is no credit
        corrected &= table["baseline_outcome"] != "corrected"
    flags = {"corrected": corrected, "copied": outcome == "copied"}
    if "baseline_outcome" in table.columns:
        baseline_copied = table["baseline_outcome"] == "copied"
        flags["n_baseline_copied"] = baseline_copied
        flags["flipped"] = baseline_copied & (outcome == "corrected")
    keys = [*by, *_HEAD_COLUMNS]
    frame = pd.concat([table[keys], pd.DataFrame(flags).astype("int64")], axis=1)
    grouped = frame.groupby(keys, dropna=False, sort=False, observed=True)
    out = grouped[list(flags)].sum()
    out.insert(0, "n", grouped.size())
    out = out.reset_index()
    out["correction_rate"] = out["corrected"] / out["n"]
    out["copy_rate"] = out["copied"] / out["n"]
    columns = [*keys, "n", "corrected", "copied", "correction_rate", "copy_rate"]
    if "flipped" in out.columns:
        out["flip_rate"] = out["flipped"] / out["n_baseline_copied"].where(out["n_baseline_copied"] > 0)
        columns += ["n_baseline_copied", "flipped", "flip_rate"]
    return _sorted(out[columns], keys)


def rank_heads(sweep: pd.DataFrame, by: str | Sequence[str] = ()) -> pd.DataFrame:
    """`head_rates` plus `rank`: the dense rank by correction rate within each `by` group (1 = best).

    Heads with equal rates share a rank and the next rate gets the next integer (1, 1, 2).

    Returns:
        Columns `*by, rank, layer, head, n, ...` (see `head_rates`), sorted by (by..., rank, layer, head).

    Raises:
        InputError: as `head_rates`.

    Example:
        >>> rank_heads(sweep, by="truth").query("rank <= 2")
    """
    by = _as_columns(by)
    return _ranked(_rates(_check_sweep(sweep, by, "rank_heads"), by), by)


def _ranked(rates: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """`rank_heads` from the output of `_rates`."""
    scores = rates.groupby(by, dropna=False, observed=True)["correction_rate"] if by else rates["correction_rate"]
    rates.insert(len(by), "rank", scores.rank(method="dense", ascending=False).astype("int64"))
    return _sorted(rates, [*by, "rank", *_HEAD_COLUMNS])


# ------------------------------------------------------------------------------------------ head sets


def top_k_sets(
    sweep: pd.DataFrame, ks: Iterable[int] = (1, 2, 3, 4, 5), by: str | Sequence[str] = "truth"
) -> dict[str, HeadList]:
    """The reference's "top{k}" sets: per group of `by`, the heads with dense rank <= k; their union.

    Ties share a rank, and each true value adds its own heads, so "top1" often holds several heads.
    Heads with zero corrections in a group are not taken from that group.

    Returns:
        {"top1": [(layer, head), ...], ...}, one key per k, heads sorted by (layer, head).

    Raises:
        InputError: as `head_rates`, or a k is not a positive integer.

    Example:
        >>> top_k_sets(sweep, ks=(1, 2))["top1"]
        [(0, 3), (0, 6), (11, 15)]
    """
    ks = _check_ks(ks, "top_k_sets")
    return _top_sets(rank_heads(sweep, by), ks)


def _top_sets(ranked: pd.DataFrame, ks: list[int]) -> dict[str, HeadList]:
    ranked = ranked[ranked["corrected"] > 0]
    return {f"top{k}": _heads(ranked[ranked["rank"] <= k]) for k in ks}


def best_k_sets(sweep: pd.DataFrame, ks: Iterable[int] = (1, 3, 5, 10)) -> dict[str, HeadList]:
    """The reference's "best{k}" sets: the k heads with the highest overall correction rate.

    Ties at the cut are broken by (layer, head) ascending, so the result is deterministic; `rank_heads`
    shows which heads tie with the last one kept. Heads with zero corrections are never chosen, so a set
    holds fewer than k heads when fewer heads corrected anything.

    Returns:
        {"best1": [(layer, head)], "best3": [...], ...}, heads sorted by (layer, head).

    Raises:
        InputError: as `head_rates`, or a k is not a positive integer.

    Example:
        >>> best_k_sets(sweep, ks=(3,))
        {'best3': [(0, 3), (0, 6), (11, 15)]}
    """
    ks = _check_ks(ks, "best_k_sets")
    return _best_sets(head_rates(sweep), ks)


def _best_sets(rates: pd.DataFrame, ks: list[int]) -> dict[str, HeadList]:
    rates = rates[rates["corrected"] > 0].sort_values(
        ["correction_rate", "layer", "head"], ascending=[False, True, True], kind="mergesort"
    )
    return {f"best{k}": _heads(rates.head(k)) for k in ks}


# --------------------------------------------------------------------------------------------- report


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _entries(ranked: pd.DataFrame) -> list[dict[str, Any]]:
    from halluscope.interventions.heads import format_heads  # lazy: the heads module imports torch

    extra = [c for c in ("n_baseline_copied", "flipped") if c in ranked.columns]
    out = []
    for row in ranked.to_dict("records"):
        layer, head = int(row["layer"]), int(row["head"])
        entry = {
            "layer": layer,
            "head": head,
            "name": format_heads([(layer, head)]),
            "correction_rate": _number(row["correction_rate"]),
            "copy_rate": _number(row["copy_rate"]),
            "n": int(row["n"]),
            "corrected": int(row["corrected"]),
            "copied": int(row["copied"]),
            "rank": int(row["rank"]),
        }
        entry.update({c: int(row[c]) for c in extra})
        if "flip_rate" in row:
            entry["flip_rate"] = _number(row["flip_rate"])
        out.append(entry)
    return out


def rank_report(sweep: pd.DataFrame) -> dict[str, Any]:
    """The ranking of a sweep as a JSON-ready dict (the run's `heads.json`).

    Keys:
        ranking: every head, best first: layer, head, name ("L0H3"), correction_rate, copy_rate, n,
            corrected, copied, rank (dense, overall); plus n_baseline_copied, flipped, flip_rate when the
            sweep has `baseline_outcome`. Rates that are undefined are None.
        by_truth: {str(truth): the entries with per-truth rank <= 5 and at least one correction}.
        top: `top_k_sets` over truths (k = 1..5); best: `best_k_sets` (k = 1, 3, 5, 10); heads as
            [layer, head] lists.
        names: every set of top and best as "L0H3,L11H15" (what `--heads` accepts).
        n_prompts: distinct `sample_id`s; n_heads: distinct heads swept.

    Raises:
        InputError: as `head_rates` (also needs `sample_id` and `truth`).

    Example:
        >>> run.write_json("heads", rank_report(run.read_table("sweep")))
    """
    from halluscope.interventions.heads import format_heads  # lazy: the heads module imports torch

    table = _check_sweep(sweep, ["sample_id", "truth"], "rank_report")
    per_truth = _ranked(_rates(table, ["truth"]), ["truth"])
    overall = _ranked(_rates(table, []), [])
    by_truth = {}
    for truth, group in per_truth.groupby("truth", dropna=False, sort=False, observed=True):
        keep = group[(group["rank"] <= _REPORT_TOP_K) & (group["corrected"] > 0)]
        by_truth[str(truth)] = _entries(keep)
    top = _top_sets(per_truth, _REPORT_TOP_KS)
    best = _best_sets(overall, _REPORT_BEST_KS)
    sets = {**top, **best}
    return {
        "ranking": _entries(overall),
        "by_truth": by_truth,
        "top": {name: [list(h) for h in heads] for name, heads in top.items()},
        "best": {name: [list(h) for h in heads] for name, heads in best.items()},
        "names": {name: format_heads(heads) for name, heads in sets.items()},
        "n_prompts": int(table["sample_id"].nunique()),
        "n_heads": int(len(table[list(_HEAD_COLUMNS)].drop_duplicates())),
    }


# --------------------------------------------------------------------------------------- head specs


def _report_sets(report: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(report, dict) or not all(isinstance(report.get(k), dict) for k in ("top", "best")):
        raise InputError("the head ranking has no 'top'/'best' sets; rerun `halluscope rank --run RUN` to rewrite "
                         "heads.json")
    return {**report["top"], **report["best"]}


def _set_order(name: str) -> tuple[str, int]:
    match = _SET_NAME.match(name)
    return (match[1], int(match[2])) if match else (name, 0)


def resolve_head_set(
    spec: str, report: dict[str, Any] | None, n_layers: int, n_heads: int
) -> frozenset[tuple[int, int]]:
    """Turn a `--heads` value into heads: a set name from the ranking ("best3", "top2") or a list "L0H3,L11H15".

    Args:
        spec: a set name or comma-separated L<layer>H<head> names.
        report: the `rank_report` dict (the run's heads.json), or None if the run has no ranking.
        n_layers, n_heads: the model's size; every head must fall inside it.

    Raises:
        InputError: a set name without a report, an unknown or empty set, a malformed list, or a head
            outside the model.

    Example:
        >>> resolve_head_set("L0H3,L11H15", None, n_layers=28, n_heads=28)
        frozenset({(0, 3), (11, 15)})
    """
    from halluscope.interventions.heads import format_heads, parse_heads  # lazy: imports torch

    if not isinstance(spec, str):
        raise InputError(f"head spec {spec!r} is not a string; pass a set name like 'best3' or heads like 'L0H3,L11H15'")
    text = spec.strip()
    if _SET_NAME.match(text):
        name = text.lower()
        if report is None:
            raise InputError(f"head set {spec!r} needs a head ranking; run `halluscope rank --run RUN` first, "
                             "or name heads directly, e.g. L0H3,L11H15")
        sets = _report_sets(report)
        if name not in sets:
            available = ", ".join(sorted(sets, key=_set_order)) or "none"
            raise InputError(f"unknown head set {spec!r}; available: {available}")
        heads = frozenset((int(layer), int(head)) for layer, head in sets[name])
        if not heads:
            raise InputError(f"head set {spec!r} is empty: no head corrected any prompt in the ranked sweep; "
                             "name heads directly, e.g. L0H3,L11H15")
    else:
        heads = parse_heads(text)
    bad = [(layer, head) for layer, head in heads if not (0 <= layer < n_layers and 0 <= head < n_heads)]
    if bad:
        raise InputError(f"heads {format_heads(bad)} in {spec!r} are out of range; valid layers 0..{n_layers - 1}, "
                         f"heads 0..{n_heads - 1}")
    return heads


# ---------------------------------------------------------------------------------------------- matrix


def correction_matrix(sweep: pd.DataFrame, n_layers: int, n_heads: int) -> np.ndarray:
    """Overall correction rate per head as a `[layer, head]` float array, NaN where a head was not swept.

    Feed it to `halluscope.plots.run_figures.plot_head_heatmap`.

    Raises:
        InputError: as `head_rates`, or the sweep has a head outside `n_layers` x `n_heads`.

    Example:
        >>> plot_head_heatmap(correction_matrix(sweep, 28, 28), "plots/correction.png", title="correction rate")
    """
    from halluscope.interventions.heads import format_heads  # lazy: the heads module imports torch

    if n_layers < 1 or n_heads < 1:
        raise InputError(f"correction_matrix: n_layers={n_layers}, n_heads={n_heads}; pass the model's sizes (>= 1)")
    rates = head_rates(sweep)
    outside = rates[(rates["layer"] >= n_layers) | (rates["head"] >= n_heads)]
    if len(outside):
        first = format_heads([(int(outside["layer"].iloc[0]), int(outside["head"].iloc[0]))])
        raise InputError(f"correction_matrix: the sweep has {len(outside)} head(s) outside layers 0..{n_layers - 1}, "
                         f"heads 0..{n_heads - 1}, e.g. {first}; pass the sizes of the "
                         "model that was swept")
    matrix = np.full((n_layers, n_heads), np.nan)
    matrix[rates["layer"].to_numpy(), rates["head"].to_numpy()] = rates["correction_rate"].to_numpy()
    return matrix
