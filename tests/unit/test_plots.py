"""Plots: every figure is a real PNG with something drawn, degenerate inputs do not crash, errors fire."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from halluscope import plots
from halluscope.errors import InputError
from halluscope.metrics import base_accuracy, pih_rates, select_misleading


def _assert_valid_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 300 and height >= 200
        assert len(image.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 10  # more than a blank canvas


def _baseline(task: str, truths: list, conditions: list[str]) -> pd.DataFrame:
    outcomes = ["copied", "corrected", "other", "none", "negated"]
    rows = []
    for s, truth in enumerate(truths):
        for c, condition in enumerate(["base", "control", *conditions]):
            rows.append({"sample_id": f"{task}{s}", "image_id": f"i{s}", "task": task, "condition": condition,
                         "truth": truth, "outcome": "corrected" if condition == "base" and s % 2 else outcomes[(s + c) % 5]})
    return pd.DataFrame(rows)


def test_eval_plots_per_task(tmp_path: Path) -> None:
    count = _baseline("count", [2, 3, 3, 5, 7], ["+1", "+2", "+10"])
    colour = _baseline("color", ["red", "blue", "green"], ["d1", "d2", "d3"])
    colour["truth"] = colour["truth"].astype(object)
    paths = plots.eval_plots(pd.concat([count, colour], ignore_index=True), tmp_path / "plots")
    assert [p.name for p in paths] == [
        "color_copy_rate.png", "color_correction_rate.png", "color_base_accuracy.png",
        "count_copy_rate.png", "count_correction_rate.png", "count_base_accuracy.png",
    ]
    for path in paths:
        _assert_png(path)


def test_eval_plots_on_empty_table_still_writes_figures(tmp_path: Path) -> None:
    empty = _baseline("count", [2], ["+1"]).iloc[:0]
    paths = plots.eval_plots(empty, tmp_path)
    assert [p.name for p in paths] == ["copy_rate.png", "correction_rate.png", "base_accuracy.png"]
    for path in paths:
        _assert_valid_png(path)


def test_rate_by_truth_single_point_and_named_conditions(tmp_path: Path) -> None:
    rates = pih_rates(select_misleading(_baseline("count", [4], ["+1"])))
    out = plots.plot_rate_by_truth(rates, tmp_path / "one.png", rate="correction_rate", title="one point")
    _assert_png(out)
    out = plots.plot_rate_by_truth(rates, tmp_path / "none.png", conditions=["+9"])  # nothing to draw
    _assert_valid_png(out)


def test_base_accuracy_and_before_after(tmp_path: Path) -> None:
    df = _baseline("count", [1, 2, 2, 3], ["+1", "+2"])
    _assert_png(plots.plot_base_accuracy(base_accuracy(df), tmp_path / "acc.png"))
    before = pih_rates(select_misleading(df), by=("truth",))
    after = before.assign(copy_rate=before["copy_rate"] / 2).iloc[1:]  # truth 1 missing after: drawn as a gap
    _assert_png(plots.plot_before_after(before, after, tmp_path / "ba.png", labels=("clean", "ablated")))
    empty = before.iloc[:0]
    _assert_valid_png(plots.plot_before_after(empty, empty, tmp_path / "ba_empty.png"))


def test_head_heatmap(tmp_path: Path) -> None:
    matrix = np.arange(28 * 12, dtype=float).reshape(28, 12) - 100
    matrix[3, 4] = np.nan
    _assert_png(plots.plot_head_heatmap(matrix, tmp_path / "h.png", title="knockout", cbar_label="Δ copy rate"))
    _assert_valid_png(plots.plot_head_heatmap([[0.5]], tmp_path / "one.png"))
    _assert_valid_png(plots.plot_head_heatmap(np.full((2, 3), np.nan), tmp_path / "nan.png"))


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"matrix has shape \(4,\); expected 2-D \[layer, head\]"):
        plots.plot_head_heatmap(np.zeros(4), tmp_path / "x.png")
    rates = pih_rates(select_misleading(_baseline("count", [1, 2], ["+1", "+2"])))  # two rows per truth
    with pytest.raises(InputError, match="before_rates has several rows for truth 1; expected one row per truth"):
        plots.plot_before_after(rates, rates, tmp_path / "x.png")
    with pytest.raises(InputError, match=r"table lacks column\(s\) \['copy_rate'\]"):
        plots.plot_rate_by_truth(rates.drop(columns="copy_rate"), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
