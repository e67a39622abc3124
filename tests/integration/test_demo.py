"""`halluscope demo` runs the whole pipeline on the organism and writes a report with the headline numbers."""

from __future__ import annotations

import json


def test_demo_writes_report_and_headline(cli, demo_run):
    run, out = demo_run
    assert "copy rate on misleading prompts" in out and "heads ranked" in out and "report.html" in out
    for name in ("baseline.parquet", "sweep.parquet", "heads.json", "confirm.parquet", "attention.parquet",
                 "attention_maps.parquet", "probs.parquet", "report.md", "report.html", "demo.json"):
        assert (run / name).is_file(), name
    headline = json.loads((run / "demo.json").read_text())
    assert headline["chosen"]["heads"] and 0 <= headline["confirm_agreement"] <= 1
    report = (run / "report.md").read_text()
    assert "![" in report and headline["chosen"]["heads"] in report
    assert "plots/attention_maps/" in report  # the demo draws the maps of its head set
    # every step stays recorded (the demo's last writes once saved a stale copy of the manifest over them)
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert {"eval", "sweep", "rank", "confirm", "attention", "attention-maps", "probs", "demo", "report"} <= set(steps)
    assert steps["attention-maps"]["arguments"]["heads"] == headline["chosen"]["heads"]
    assert any(name.startswith("ablate-ablation_best") for name in steps)
    assert all(entry["status"] == "finished" for entry in steps.values())
    assert {"demo.json", "report.md"} <= set(steps["demo"]["outputs"]) and not (run / ".lock").exists()
    assert "report.html" in steps["report"]["outputs"]
    # a rerun resumes: every step finds its shards and the headline is unchanged
    code, _, err = cli("demo", "--out", run, "--n", "9")
    assert code == 0, err
    assert json.loads((run / "demo.json").read_text())["chosen"] == headline["chosen"]
