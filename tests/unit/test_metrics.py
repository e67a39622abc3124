"""PIH metrics on hand-built baseline tables with exact expected numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from halluscope.errors import InputError
from halluscope.metrics import (
    base_accuracy,
    condition_order,
    misleading_conditions,
    pih_rates,
    relative_reduction,
    select_misleading,
    summarize,
)

# sample -> (image, truth, outcome per condition); s1 and s2 show the same image
_OUTCOMES = {
    "s0": ("i0", 2, {"base": "corrected", "control": "corrected", "+1": "copied", "+2": "copied", "+10": "corrected"}),
    "s1": ("i1", 3, {"base": "other", "control": "corrected", "+1": "copied", "+2": "corrected", "+10": "none"}),
    "s2": ("i1", 3, {"base": "corrected", "control": "other", "+1": "negated", "+2": "copied", "+10": "copied"}),
}


@pytest.fixture
def count_df() -> pd.DataFrame:
    rows = []
    for sample, (image, truth, outcomes) in _OUTCOMES.items():
        for condition, outcome in outcomes.items():
            claim = None if condition == "base" else truth + int(condition) if condition != "control" else truth
            rows.append({"sample_id": sample, "image_id": image, "task": "count", "condition": condition,
                         "truth": truth, "claim": claim, "prompt": "p", "reply": "r", "answer": "a",
                         "outcome": outcome})
    return pd.DataFrame(rows)


def _row(table: pd.DataFrame, **where: object) -> pd.Series:
    mask = np.logical_and.reduce([table[k] == v for k, v in where.items()])
    assert mask.sum() == 1
    return table[mask].iloc[0]


def test_condition_order_is_numeric() -> None:
    assert condition_order(["+10", "control", "+2", "base", "+1", "+2"]) == ["base", "control", "+1", "+2", "+10"]
    assert misleading_conditions(["d10", "d2", "base", "d1", "control"]) == ["d1", "d2", "d10"]


def test_pih_rates_per_condition(count_df: pd.DataFrame) -> None:
    rates = pih_rates(count_df, by=("condition",))
    assert rates["condition"].tolist() == ["base", "control", "+1", "+2", "+10"]
    assert rates["n"].tolist() == [3, 3, 3, 3, 3]
    expected = {  # copy, correction, other, none, negated
        "base": (0, 2 / 3, 1 / 3, 0, 0),
        "control": (0, 2 / 3, 1 / 3, 0, 0),
        "+1": (2 / 3, 0, 0, 0, 1 / 3),
        "+2": (2 / 3, 1 / 3, 0, 0, 0),
        "+10": (1 / 3, 1 / 3, 0, 1 / 3, 0),
    }
    columns = ["copy_rate", "correction_rate", "other_rate", "none_rate", "negated_rate"]
    for condition, values in expected.items():
        assert _row(rates, condition=condition)[columns].tolist() == pytest.approx(values, abs=1e-12)


def test_pih_rates_per_condition_and_truth(count_df: pd.DataFrame) -> None:
    rates = pih_rates(select_misleading(count_df))
    assert list(zip(rates["condition"], rates["truth"])) == [
        ("+1", 2), ("+1", 3), ("+2", 2), ("+2", 3), ("+10", 2), ("+10", 3)
    ]
    one = _row(rates, condition="+1", truth=3)
    assert (one["n"], one["copy_rate"], one["negated_rate"]) == (2, 0.5, 0.5)
    assert _row(rates, condition="+10", truth=2)["correction_rate"] == 1.0
    rate_columns = [c for c in rates.columns if c.endswith("_rate")]
    assert np.allclose(rates[rate_columns].sum(axis=1), 1.0)


def test_pih_rates_overall_and_empty(count_df: pd.DataFrame) -> None:
    overall = pih_rates(select_misleading(count_df), by=())
    assert overall["n"].tolist() == [9] and overall["copy_rate"].iloc[0] == pytest.approx(5 / 9)
    empty = pih_rates(count_df.iloc[:0])
    assert empty.empty and list(empty.columns[:3]) == ["condition", "truth", "n"]


def test_colour_truths_sort_alphabetically_and_numbers_numerically() -> None:
    df = pd.DataFrame({"condition": ["d2", "d1", "d1", "d10"], "truth": ["red", "blue", "red", "blue"],
                       "outcome": ["copied", "corrected", "copied", "other"]})
    rates = pih_rates(df)
    assert list(zip(rates["condition"], rates["truth"])) == [("d1", "blue"), ("d1", "red"), ("d2", "red"), ("d10", "blue")]
    numbers_as_text = pd.DataFrame({"condition": ["+1"] * 3, "truth": ["10", "9", "2"], "outcome": ["copied"] * 3})
    assert pih_rates(numbers_as_text)["truth"].tolist() == ["2", "9", "10"]


def test_base_accuracy(count_df: pd.DataFrame) -> None:
    acc = base_accuracy(count_df)
    assert acc["truth"].tolist() == [2, 3] and acc["n"].tolist() == [1, 2] and acc["accuracy"].tolist() == [1.0, 0.5]
    assert base_accuracy(count_df, by=())["accuracy"].iloc[0] == pytest.approx(2 / 3)


def test_summarize(count_df: pd.DataFrame) -> None:
    summary = summarize(count_df)
    json.dumps(summary, allow_nan=False)  # JSON-ready
    assert summary["n_rows"] == 15 and summary["n_samples"] == 3 and summary["n_images"] == 2
    assert summary["tasks"] == ["count"] and summary["n_misleading"] == 9
    assert summary["base_accuracy"] == pytest.approx(2 / 3)
    assert summary["control_accuracy"] == pytest.approx(2 / 3)
    assert summary["copy_rate"] == pytest.approx(5 / 9) and summary["correction_rate"] == pytest.approx(2 / 9)
    assert list(summary["copy_rate_by_condition"]) == ["+1", "+2", "+10"]
    assert summary["copy_rate_by_condition"] == pytest.approx({"+1": 2 / 3, "+2": 2 / 3, "+10": 1 / 3})
    assert summary["correction_rate_by_condition"] == pytest.approx({"+1": 0.0, "+2": 1 / 3, "+10": 1 / 3})
    assert summary["copy_rate_by_truth"] == pytest.approx({"2": 2 / 3, "3": 0.5})
    assert summary["base_accuracy_by_truth"] == {"2": 1.0, "3": 0.5}


def test_summarize_without_base_or_control_gives_none(count_df: pd.DataFrame) -> None:
    summary = summarize(select_misleading(count_df))
    assert summary["base_accuracy"] is None and summary["control_accuracy"] is None
    assert summary["base_accuracy_by_truth"] == {}


def test_relative_reduction() -> None:
    assert relative_reduction(0.5, 0.2) == pytest.approx(0.6)
    assert relative_reduction(0.4, 0.6) == pytest.approx(-0.5)
    assert math.isnan(relative_reduction(0.0, 0.1)) and math.isnan(relative_reduction(0.0, 0.0))
    series = relative_reduction(pd.Series([0.5, 0.0], index=[3, 4]), pd.Series([0.25, 0.0], index=[3, 4]))
    assert series.index.tolist() == [3, 4] and series.iloc[0] == 0.5 and math.isnan(series.iloc[1])
    arr = relative_reduction(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert arr[0] == 1.0 and math.isnan(arr[1])


def test_missing_column_and_unknown_outcome_fail(count_df: pd.DataFrame) -> None:
    with pytest.raises(InputError, match=r"pih_rates: table lacks column\(s\) \['truth'\]"):
        pih_rates(count_df.drop(columns="truth"))
    bad = count_df.assign(outcome=count_df["outcome"].replace({"none": "refused"}))
    with pytest.raises(InputError, match=r"unknown outcome value\(s\) \['refused'\]; expected one of"):
        summarize(bad)
    with pytest.raises(InputError, match="expects a pandas DataFrame, got list"):
        base_accuracy([1, 2])  # type: ignore[arg-type]
