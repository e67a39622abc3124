"""95% intervals of the numbers the figures show: Wilson score intervals for rates (a share of prompts), and
mean +- 1.96 standard errors for means over prompts (probabilities, attention shares).

Wilson rather than the normal approximation because the rates of interest sit at 0 or 1 on few prompts, where
the normal interval collapses to a point; the PNG figures and the HTML page both take their bounds from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from halluscope.errors import InputError

__all__ = ["Z95", "mean_intervals", "wilson_interval", "with_intervals"]

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson_interval(successes: np.ndarray | Sequence[float] | float, n: np.ndarray | Sequence[float] | float,
                    z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval `[low, high]` of the rate successes / n, elementwise; NaN where n is 0.

    Raises:
        InputError: successes outside 0..n.

    Example:
        >>> low, high = wilson_interval(0, 10)   # 0 of 10: the rate may still be up to 28%
        >>> round(float(high), 3)
        0.278
    """
    k = np.asarray(successes, dtype="float64")
    total = np.asarray(n, dtype="float64")
    if np.any((k < 0) | (k > total)):
        raise InputError(f"wilson_interval: successes {k.tolist()} must lie within 0..n {total.tolist()}")
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / total
        denominator = 1 + z**2 / total
        centre = (p + z**2 / (2 * total)) / denominator
        half = z * np.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denominator
        low = np.where(total > 0, np.clip(centre - half, 0.0, 1.0), np.nan)
        high = np.where(total > 0, np.clip(centre + half, 0.0, 1.0), np.nan)
    return low, high


def with_intervals(rates: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """`rates` (one row per group, with `n`) plus `<column>_low` and `<column>_high`: the Wilson interval of
    each rate column, from its count round(rate * n).

    Args:
        rates: e.g. `pih_rates(...)` or `base_accuracy(...)`.
        columns: the rate columns, e.g. ["copy_rate"].

    Raises:
        InputError: `rates` lacks `n` or a rate column.

    Example:
        >>> with_intervals(pih_rates(select_misleading(baseline), by=("condition",)), ["copy_rate"])
    """
    missing = [c for c in ["n", *columns] if c not in rates.columns]
    if missing:
        raise InputError(f"with_intervals: rates lack column(s) {missing} (has {list(rates.columns)}); pass "
                         "pih_rates(...) or base_accuracy(...), which give n")
    out = rates.copy()
    n = out["n"].to_numpy(dtype="float64")
    for column in columns:
        values = out[column].to_numpy(dtype="float64")
        known = np.isfinite(values)
        counts = np.where(known, np.rint(np.where(known, values, 0.0) * n), 0.0)
        low, high = wilson_interval(counts, n)
        # rounding can leave the bound of a rate of 0 or 1 a hair beyond the rate: an error bar is never negative
        out[f"{column}_low"] = np.where(known, np.fmin(low, values), np.nan)
        out[f"{column}_high"] = np.where(known, np.fmax(high, values), np.nan)
    return out


def mean_intervals(table: pd.DataFrame, value: str, by: Sequence[str]) -> pd.DataFrame:
    """Per group of `by`: `n` (non-missing values), `mean`, `low`, `high` = mean -+ 1.96 standard errors
    (the normal approximation; NaN bounds for a single value).

    Raises:
        InputError: `table` lacks `value` or a `by` column.

    Example:
        >>> mean_intervals(probs, "p_truth", ["form", "condition", "alpha"])
    """
    missing = [c for c in [*by, value] if c not in table.columns]
    if missing:
        raise InputError(f"mean_intervals: table lacks column(s) {missing} (has {list(table.columns)})")
    grouped = table.groupby(list(by), sort=False, observed=True, dropna=False)[value]
    out = grouped.agg(n="count", mean="mean", sd="std").reset_index()
    half = Z95 * out["sd"] / np.sqrt(out["n"].where(out["n"] > 0))
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns="sd")
