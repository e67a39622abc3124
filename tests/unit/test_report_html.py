"""report.html from whatever a run has: sections of missing steps name the command that fills them, ablations
join the rate figures and the comparison, head tooltips pick the prompts a knockout changed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from halluscope.plots.html_report import render_report, report_step
from halluscope.plots.report_sections import head_examples, outcome_tables
from halluscope.runs import Run

MODEL = {"name": "tiny", "family": "qwen2_vl", "n_layers": 2, "n_heads": 2, "fingerprint": "f00d"}


def _table(outcomes: list[str]) -> pd.DataFrame:
    rows = []
    for i, outcome in enumerate(outcomes):
        condition = ["base", "control", "+1", "+2"][i % 4]
        truth = 2 + i % 3
        claim = None if condition == "base" else truth + (0 if condition == "control" else int(condition))
        rows.append({"sample_id": f"count-{i // 4:04d}-{condition}", "image_id": f"{i // 4:04d}", "task": "count",
                     "condition": condition, "truth": truth, "claim": claim,
                     "prompt": f"Describe the {claim} circles in this image.", "reply": f"There are {truth} circles.",
                     "outcome": outcome})
    return pd.DataFrame(rows)


@pytest.fixture
def run(tmp_path: Path) -> Run:
    """A run with an eval only."""
    run = Run.create(tmp_path / "run", step="eval", arguments={"task": "count"}, model=MODEL)
    run.write_table("baseline", _table(["corrected", "corrected", "copied", "corrected"] * 6))
    run.finish_step("eval")
    return run


def test_a_run_with_an_eval_only_gets_every_section(run: Run) -> None:
    text = render_report(run)
    assert "<script src" not in text and 'id="rates-by-condition"' in text and 'id="rates-by-truth"' in text
    for section in ("rates", "heads", "maps", "shifts", "comparison", "manifest"):
        assert f'<section id="{section}">' in text
    assert f"halluscope sweep --run {run.path}" in text  # an empty section says how to fill it
    assert "halluscope attention-maps --run" in text and "halluscope ablate --run" in text
    assert "f00d" in text and "true count" in text and "offset" in text


def test_ablations_join_the_rates_and_the_comparison(run: Run) -> None:
    run.begin_step("ablate-ablation_best1", {"heads": "L0H1", "spec": "best1"})
    run.write_table("ablation_best1", _table(["corrected"] * 24))
    run.finish_step("ablate-ablation_best1")
    run.begin_step("ablate-ablation_unfinished", {"heads": "L1H1", "spec": "L1H1"})  # still running: left out
    run.write_table("ablation_unfinished", _table(["copied"] * 24))
    run.begin_step("ablate-scaled", {"heads": "L0H1", "spec": "best1", "intervention": "scale", "alpha": 0.5})
    run.write_table("scaled", _table(["copied"] * 24))
    run.finish_step("ablate-scaled")
    assert list(outcome_tables(run)) == ["baseline", "best1 knocked out", "best1 scale, alpha 0.5"]
    text = render_report(run)
    assert "best1 knocked out" in text and "L1H1 knocked out" not in text
    assert "<td>100.0%</td>" in text  # the cut of the copy rate: all of it


def test_report_step_writes_and_records_the_page(run: Run) -> None:
    path = report_step(run.path)
    assert path == run.path / "report.html" and path.stat().st_size > 1_000_000  # plotly.js is inside
    entry = json.loads((run.path / "manifest.json").read_text())["steps"]["report"]
    assert entry["status"] == "finished" and entry["outputs"] == ["report.html"]


def test_head_examples_prefer_flips_and_use_generated_replies() -> None:
    baseline = pd.DataFrame({"sample_id": ["a", "b", "c"], "prompt": ["Describe the 5 dots.", "P b", "P c"],
                             "reply": ["There are 5 dots.", "R b", "R c"]})
    sweep = pd.DataFrame({
        "sample_id": ["a", "b", "c", "a"], "layer": [0, 0, 0, 1], "head": [1, 1, 1, 0], "truth": [3, 3, 3, 3],
        "claim": [5, 4, 5, 5], "outcome": ["corrected", "copied", "copied", "corrected"],
        "baseline_outcome": ["copied", "corrected", "copied", "copied"]})
    confirm = pd.DataFrame({"sample_id": ["a"], "layer": [0], "head": [1], "reply": ["There are 3 dots"],
                            "outcome": ["corrected"]})
    examples = head_examples(sweep, baseline, confirm)
    first, second = examples[(0, 1)]  # c did not change: no example
    assert first.prompt == "Describe the 5 dots. (truth: 3)"
    assert first.before == "There are 5 dots. (copied)" and first.after == "There are 3 dots (corrected, generated)"
    assert second.before == "R b (corrected)" and second.after == "answers 4 (copied, score mode)"
    assert examples[(1, 0)][0].after == "answers 3 (corrected, score mode)"
    assert head_examples(sweep.drop(columns="baseline_outcome"), baseline) == {}


def test_a_benchmark_run_shows_its_comparison_table(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "pope", step="bench-pope", arguments={"benchmark": "pope"}, model=MODEL)
    run.write_table("pope", pd.DataFrame({"method": ["greedy", "ablation_L0H1"], "split": ["random"] * 2,
                                          "accuracy": [0.81, 0.86]}))
    run.finish_step("bench-pope")
    text = render_report(run)
    comparison = text.split('<section id="comparison">')[1].split("</section>")[0]
    assert "POPE: greedy vs each method" in comparison and "ablation_L0H1" in comparison
    assert 'class="absent"' not in comparison
    assert "halluscope eval --model M --out RUN" in text  # the PIH sections of a benchmark run say what fills them


def test_head_examples_of_an_attribution_sweep_come_from_its_exact_rows() -> None:
    baseline = pd.DataFrame({"sample_id": ["a"], "prompt": ["P a"], "reply": ["R a"]})
    sweep = pd.DataFrame({"sample_id": ["a", "a"], "layer": [0, 0], "head": [0, 1], "truth": [3, 3], "claim": [5, 5],
                          "outcome": ["corrected", "corrected"], "baseline_outcome": ["copied", "copied"],
                          "estimator": ["atp-star", "exact"]})
    assert list(head_examples(sweep, baseline)) == [(0, 1)]  # an estimate changes no reply
