"""Plots: every figure is a real PNG with something drawn, degenerate inputs do not crash, errors fire, rates
carry their Wilson intervals, and a panel of negligible values says so instead of plotting noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from halluscope import plots
from halluscope.errors import InputError
from halluscope.metrics import base_accuracy, pih_rates, select_misleading
from halluscope.plots import analysis_figures, figure


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
        "color_copy_rate.png", "color_correction_rate.png", "color_copy_rate_by_distractor.png",
        "color_base_accuracy.png",
        "count_copy_rate.png", "count_correction_rate.png", "count_copy_rate_by_offset.png", "count_base_accuracy.png",
    ]
    for path in paths:
        _assert_png(path)


def test_eval_plots_on_empty_table_still_writes_figures(tmp_path: Path) -> None:
    empty = _baseline("count", [2], ["+1"]).iloc[:0]
    paths = plots.eval_plots(empty, tmp_path)
    assert [p.name for p in paths] == ["copy_rate.png", "correction_rate.png", "copy_rate_by_condition.png",
                                       "base_accuracy.png"]
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
    with pytest.raises(InputError, match=r"got no series"):
        plots.plot_rate_by_condition({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_rate_by_condition_draws_each_setting(tmp_path: Path) -> None:
    df = _baseline("count", [1, 2, 3, 4], ["+1", "+2", "+10"])
    before = pih_rates(select_misleading(df), by=("condition",))
    after = before.assign(copy_rate=before["copy_rate"] / 2)
    _assert_png(plots.plot_rate_by_condition({"baseline": before, "ablated": after}, tmp_path / "c.png"))


def test_wilson_interval_matches_the_formula_and_stays_open_at_zero() -> None:
    low, high = plots.wilson_interval([0, 5, 10], [10, 10, 10])
    assert np.allclose(low, [0.0, 0.236593, 0.722467], atol=1e-6)
    assert np.allclose(high, [0.277533, 0.763407, 1.0], atol=1e-6)  # 0 of 10 does not mean 0%
    low, high = plots.wilson_interval(0, 0)
    assert np.isnan(low) and np.isnan(high)
    with pytest.raises(InputError, match=r"successes \[11.0\] must lie within 0..n \[10.0\]"):
        plots.wilson_interval([11], [10])


def test_with_intervals_counts_from_rate_and_n() -> None:
    rates = pd.DataFrame({"n": [4, 0], "copy_rate": [0.5, np.nan]})
    out = plots.with_intervals(rates, ["copy_rate"])
    expected = plots.wilson_interval(2, 4)
    assert out["copy_rate_low"].iloc[0] == pytest.approx(float(expected[0]))
    assert out["copy_rate_high"].iloc[0] == pytest.approx(float(expected[1]))
    assert np.isnan(out["copy_rate_low"].iloc[1])
    with pytest.raises(InputError, match=r"rates lack column\(s\) \['n'\]"):
        plots.with_intervals(rates.drop(columns="n"), ["copy_rate"])


def test_mean_intervals() -> None:
    table = pd.DataFrame({"g": ["a", "a", "a", "b"], "v": [0.1, 0.2, 0.3, 0.5]})
    out = plots.mean_intervals(table, "v", ["g"]).set_index("g")
    half = 1.959963984540054 * 0.1 / np.sqrt(3)
    assert out.loc["a", "n"] == 3 and out.loc["a", "mean"] == pytest.approx(0.2)
    assert out.loc["a", "low"] == pytest.approx(0.2 - half) and out.loc["a", "high"] == pytest.approx(0.2 + half)
    assert np.isnan(out.loc["b", "low"])  # one value: no spread to estimate
    with pytest.raises(InputError, match=r"table lacks column\(s\) \['w'\]"):
        plots.mean_intervals(table, "w", ["g"])


def _probabilities(word_scale: float) -> pd.DataFrame:
    rows = []
    for i in range(6):
        for alpha in (0.0, 0.5, 1.0):
            for form, scale in (("digit", 1.0), ("word", word_scale)):
                rows.append({"sample_id": f"s{i}", "condition": ["+1", "+2"][i % 2], "alpha": alpha, "form": form,
                             "p_truth": scale * (0.5 + 0.05 * i - 0.2 * alpha), "p_claim": scale * 0.3 * alpha})
    return pd.DataFrame(rows)


def test_probability_panels_of_negligible_values_say_so(tmp_path: Path, monkeypatch) -> None:
    notes: list[str] = []
    monkeypatch.setattr(analysis_figures, "draw_no_data", lambda ax, message="no data": notes.append(message))
    table = _probabilities(word_scale=1e-9)  # a model that answers in digits: word forms ~ 0
    _assert_valid_png(plots.plot_probability_shift(table, tmp_path / "word.png", form="word"))
    assert len(notes) == 3 and all("does not answer in word form" in n for n in notes)
    notes.clear()
    _assert_png(plots.plot_probability_shift(table, tmp_path / "digit.png", form="digit"))
    assert notes == []


def test_caption_dodge_and_titles() -> None:
    assert figure.caption([36, 36]) == "n = 36 prompts per point; bars: 95% Wilson interval"
    assert figure.caption([4, 9], "prompts per bar", None) == "n = 4-9 prompts per bar"
    assert figure.dodge(1) == [0.0] and figure.dodge(2, share=0.5) == [-0.125, 0.125]
    fig, _ = figure.new_figure(4.0, 3.0)
    title = figure.fitted_title(fig, "copy rate with " + ",".join(f"L{i}H{i}" for i in range(30)))
    assert max(len(line) for line in title.splitlines()) <= 4.0 * 72 / (0.55 * 12)
    assert figure.axis_labels("count") == ("true count", "offset") and figure.is_negligible([1e-5, -2e-4])


def test_every_plot_function_of_a_figure_module_is_exported_from_the_package():
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(plots.__path__):
        names = getattr(importlib.import_module(f"halluscope.plots.{module.name}"), "__all__", [])
        for name in (n for n in names if n.startswith("plot_")):
            assert name in plots.__all__, f"halluscope.plots does not export {module.name}.{name}"
            assert getattr(plots, name) is getattr(importlib.import_module(f"halluscope.plots.{module.name}"), name)
