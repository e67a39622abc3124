"""Prompt-induced hallucination (PIH) metrics over a baseline table (one row per sample and prompt).

Input columns: `sample_id, image_id, task, condition, truth, claim, prompt, reply, answer, outcome`.
`condition` is "base" (no claim), "control", or a misleading condition ("+1", "+2", ... for counts,
"d1", "d2", ... for colours); `outcome` is one of `OUTCOMES`. A rate is the share of rows with that
outcome, so the five rates of a group sum to 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np
import pandas as pd

from halluscope.errors import InputError

__all__ = [
    "BASE",
    "CONTROL",
    "OUTCOMES",
    "RATE_COLUMNS",
    "base_accuracy",
    "condition_order",
    "condition_sort_key",
    "misleading_conditions",
    "pih_rates",
    "relative_reduction",
    "select_misleading",
    "summarize",
    "truth_sort_key",
]

BASE = "base"
CONTROL = "control"
OUTCOMES = ("copied", "corrected", "other", "none", "negated")
#: outcome -> its rate column in `pih_rates`.
RATE_COLUMNS = {
    "copied": "copy_rate",
    "corrected": "correction_rate",
    "other": "other_rate",
    "none": "none_rate",
    "negated": "negated_rate",
}

_NUMBERED = re.compile(r"([A-Za-z_]*)([+-]?\d+)")
_FIX = "pass the baseline table written by `halluscope eval` (run.read_table('baseline'))"

Reducible = Union[float, np.ndarray, pd.Series]


# -------------------------------------------------------------------------------------------- ordering


def condition_sort_key(condition: str) -> tuple[int, str, int]:
    """Sort key: "base", "control", then numbered conditions by prefix and number ("+2" < "+10", "d1" < "d2")."""
    if condition == BASE:
        return (0, "", 0)
    if condition == CONTROL:
        return (1, "", 0)
    match = _NUMBERED.fullmatch(str(condition))
    if match:
        return (2, match.group(1), int(match.group(2)))
    return (3, str(condition), 0)


def condition_order(conditions: Iterable[str]) -> list[str]:
    """The distinct `conditions`, base and control first, then misleading ones in numeric order.

    Example:
        >>> condition_order(["+10", "control", "+2", "base", "+2"])
        ['base', 'control', '+2', '+10']
    """
    return sorted(set(conditions), key=condition_sort_key)


def misleading_conditions(conditions: Iterable[str]) -> list[str]:
    """The distinct misleading conditions (neither base nor control) in numeric order."""
    return [c for c in condition_order(conditions) if c not in (BASE, CONTROL)]


def truth_sort_key(value: Any) -> tuple[int, float, str]:
    """Sort key for truth-like values: numbers (or numeric strings) numerically, then text, then missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, 0.0, "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _sort_rows(table: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Rows ordered by `by`: conditions by `condition_sort_key`, other columns by `truth_sort_key`."""
    keys = [condition_sort_key if col == "condition" else truth_sort_key for col in by]
    rows = list(table[list(by)].itertuples(index=False, name=None))

    def row_key(i: int) -> tuple[Any, ...]:
        return tuple(key(value) for key, value in zip(keys, rows[i]))

    return table.iloc[sorted(range(len(table)), key=row_key)].reset_index(drop=True)


# ------------------------------------------------------------------------------------------ validation


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{what} expects a pandas DataFrame, got {type(df).__name__}; {_FIX}")
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise InputError(f"{what}: table lacks column(s) {missing} (has {list(df.columns)}); {_FIX}")
    if "outcome" in df.columns:
        unknown = sorted(set(df["outcome"].dropna().astype(str)) - set(OUTCOMES))
        if unknown or df["outcome"].isna().any():
            bad = unknown + (["<missing>"] if df["outcome"].isna().any() else [])
            raise InputError(f"{what}: unknown outcome value(s) {bad}; expected one of {list(OUTCOMES)}; {_FIX}")


# ---------------------------------------------------------------------------------------------- tables


def _grouped_means(
    df: pd.DataFrame, by: Sequence[str], flags: dict[str, pd.Series], columns: list[str]
) -> pd.DataFrame:
    """Per group of `by`: `n` rows and the mean of each boolean flag (one row overall when `by` is empty)."""
    if df.empty:
        dtypes = {**{c: "float64" for c in columns}, **{c: "object" for c in by}, "n": "int64"}
        return pd.DataFrame({c: pd.Series(dtype=dtypes[c]) for c in columns})
    frame = pd.DataFrame({name: flag.astype("float64") for name, flag in flags.items()}, index=df.index)
    if not by:
        row = {"n": len(df), **{name: float(frame[name].mean()) for name in flags}}
        return pd.DataFrame([row], columns=columns)
    frame = pd.concat([df[list(by)], frame], axis=1)
    grouped = frame.groupby(list(by), dropna=False, sort=False)
    out = grouped[list(flags)].mean()
    out.insert(0, "n", grouped.size())
    return _sort_rows(out.reset_index(), by)[columns]


def pih_rates(df: pd.DataFrame, by: Sequence[str] = ("condition", "truth")) -> pd.DataFrame:
    """Outcome rates per group: `n`, `copy_rate`, `correction_rate`, `other_rate`, `none_rate`, `negated_rate`.

    Args:
        df: a baseline table (needs `outcome` and the `by` columns).
        by: grouping columns; ("condition",) gives one row per condition, () one row overall.

    Returns:
        One row per group, conditions in `condition_order` and truths in numeric/alphabetic order.

    Raises:
        InputError: a needed column is missing or an outcome is not one of `OUTCOMES`.

    Example:
        >>> pih_rates(select_misleading(baseline), by=("condition",))
    """
    by = list(by)
    _require(df, [*by, "outcome"], "pih_rates")
    flags = {RATE_COLUMNS[o]: df["outcome"] == o for o in OUTCOMES}
    return _grouped_means(df, by, flags, [*by, "n", *RATE_COLUMNS.values()])


def base_accuracy(df: pd.DataFrame, by: Sequence[str] = ("truth",)) -> pd.DataFrame:
    """Accuracy on the plain question (condition "base", outcome "corrected") per group: `n`, `accuracy`.

    Raises:
        InputError: a needed column is missing or an outcome is unknown.
    """
    by = list(by)
    _require(df, [*by, "condition", "outcome"], "base_accuracy")
    base = df[df["condition"] == BASE]
    return _grouped_means(base, by, {"accuracy": base["outcome"] == "corrected"}, [*by, "n", "accuracy"])


def select_misleading(df: pd.DataFrame) -> pd.DataFrame:
    """The rows whose prompt carries a misleading claim (condition neither base nor control)."""
    _require(df, ["condition"], "select_misleading")
    return df[~df["condition"].isin([BASE, CONTROL])]


# --------------------------------------------------------------------------------------------- summary


def _share(mask: pd.Series) -> float | None:
    return float(mask.mean()) if len(mask) else None


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers of a baseline table as a JSON-ready dict (rates over no rows are None).

    Keys: n_rows, n_samples, n_images, tasks, base_accuracy, control_accuracy, n_misleading, copy_rate,
    correction_rate (both over misleading rows), copy_rate_by_condition, correction_rate_by_condition,
    copy_rate_by_truth, base_accuracy_by_truth (truth keys as strings).

    Raises:
        InputError: a needed column is missing or an outcome is unknown.
    """
    _require(df, ["sample_id", "image_id", "condition", "truth", "outcome"], "summarize")
    base = df[df["condition"] == BASE]
    control = df[df["condition"] == CONTROL]
    mis = select_misleading(df)

    def by_key(table: pd.DataFrame, column: str, rate: str) -> dict[str, float]:
        return {str(k): float(v) for k, v in zip(table[column], table[rate])}

    by_condition = pih_rates(mis, by=("condition",))
    by_truth = pih_rates(mis, by=("truth",))
    return {
        "n_rows": int(len(df)),
        "n_samples": int(df["sample_id"].nunique()),
        "n_images": int(df["image_id"].nunique()),
        "tasks": sorted(str(t) for t in df["task"].unique()) if "task" in df.columns else [],
        "base_accuracy": _share(base["outcome"] == "corrected"),
        "control_accuracy": _share(control["outcome"] == "corrected"),
        "n_misleading": int(len(mis)),
        "copy_rate": _share(mis["outcome"] == "copied"),
        "correction_rate": _share(mis["outcome"] == "corrected"),
        "copy_rate_by_condition": by_key(by_condition, "condition", "copy_rate"),
        "correction_rate_by_condition": by_key(by_condition, "condition", "correction_rate"),
        "copy_rate_by_truth": by_key(by_truth, "truth", "copy_rate"),
        "base_accuracy_by_truth": by_key(base_accuracy(df, by=("truth",)), "truth", "accuracy"),
    }


def relative_reduction(before: Reducible, after: Reducible) -> Reducible:
    """(before - after) / before: the share of `before` that an intervention removed.

    NaN where `before` == 0, because nothing could be reduced (0 -> 0 is not "no change" and 0 -> x is
    not a finite increase). Works on floats (returns a float), numpy arrays and pandas Series (keeps the index).

    Example:
        >>> relative_reduction(0.5, 0.2)
        0.6
    """
    b = np.asarray(before, dtype="float64")
    a = np.asarray(after, dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(b == 0, np.nan, (b - a) / np.where(b == 0, 1.0, b))
    if isinstance(before, pd.Series):
        return pd.Series(out, index=before.index, name=before.name)
    if out.ndim == 0:
        return float(out)
    return out
