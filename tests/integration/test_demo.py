"""`halluscope demo` runs the whole pipeline on the organism and writes a report with the headline numbers."""

from __future__ import annotations

import json


def test_demo_writes_report_and_headline(cli, tmp_path):
    run = tmp_path / "demo"
    code, out, err = cli("demo", "--out", run, "--n", "9")
    assert code == 0, err
    assert "copy rate on misleading prompts" in out and "heads ranked" in out
    for name in ("baseline.parquet", "sweep.parquet", "heads.json", "confirm.parquet", "attention.parquet",
                 "probs.parquet", "report.md", "demo.json"):
        assert (run / name).is_file(), name
    headline = json.loads((run / "demo.json").read_text())
    assert headline["chosen"]["heads"] and 0 <= headline["confirm_agreement"] <= 1
    report = (run / "report.md").read_text()
    assert "![" in report and headline["chosen"]["heads"] in report
    # a rerun resumes: every step finds its shards and the headline is unchanged
    code, _, err = cli("demo", "--out", run, "--n", "9")
    assert code == 0, err
    assert json.loads((run / "demo.json").read_text())["chosen"] == headline["chosen"]
