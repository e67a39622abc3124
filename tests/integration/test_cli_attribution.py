"""`sweep --mode atp-star --verify-top K` and `rank --by` end to end on a tiny model: every head estimated, the
top K per prompt measured exactly (equal to a plain score-mode sweep of those heads), both kept in one table."""

from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from halluscope.models.tiny import build_tiny

    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def test_estimator_sweep_verify_and_rank(cli, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("eval", "--model", model, "--task", "count", "--data", "synthetic", "--n", "3",
                       "--offsets", "2", "--max-new-tokens", "8", "--out", "runs/r")
    assert code == 0, err
    code, out, err = cli("sweep", "--run", "runs/r", "--mode", "atp-star", "--verify-top", "3",
                         "--max-new-tokens", "8")
    assert code == 0, err
    table = pd.read_parquet("runs/r/sweep.parquet")
    estimated, exact = table[table["estimator"] == "atp-star"], table[table["estimator"] == "exact"]
    prompts = table["sample_id"].nunique()
    assert len(estimated) == prompts * 2 * 4 and len(exact) == prompts * 3  # tiny: 2 layers x 4 heads
    for sample_id, rows in estimated.groupby("sample_id"):  # the verified heads are each prompt's top 3
        top = set(map(tuple, rows.nlargest(3, "effect")[["layer", "head"]].to_numpy()))
        assert set(map(tuple, exact[exact["sample_id"] == sample_id][["layer", "head"]].to_numpy())) == top
    assert estimated["logit_diff_digit"].notna().all() and exact["outcome"].isin(["corrected", "copied", "other"]).all()

    # the verified rows are what an exact score-mode sweep gives for those heads
    code, _, err = cli("sweep", "--run", "runs/r", "--mode", "score", "--max-new-tokens", "8", "--force")
    assert code == 0, err
    scored = pd.read_parquet("runs/r/sweep.parquet").set_index(["sample_id", "layer", "head"])
    for row in exact.itertuples():
        plain = scored.loc[(row.sample_id, row.layer, row.head)]
        assert plain["outcome"] == row.outcome
        assert plain["logit_diff_digit"] == pytest.approx(row.logit_diff_digit, abs=1e-4)


def test_rank_by_estimate_or_exact(cli, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("eval", "--model", model, "--task", "count", "--data", "synthetic", "--n", "3", "--offsets", "2",
               "--max-new-tokens", "8", "--out", "runs/r")[0] == 0
    assert cli("sweep", "--run", "runs/r", "--mode", "atp", "--verify-top", "2", "--max-new-tokens", "8")[0] == 0
    code, _, err = cli("rank", "--run", "runs/r", "--by", "estimate")
    assert code == 0, err
    assert len(pd.read_parquet("runs/r/ranking.parquet")) == 8  # every head
    code, _, err = cli("rank", "--run", "runs/r", "--by", "exact")
    assert code == 0, err
    verified = pd.read_parquet("runs/r/sweep.parquet").query("estimator == 'exact'")
    assert len(pd.read_parquet("runs/r/ranking.parquet")) == len(verified.groupby(["layer", "head"]))
    manifest = json.loads(open("runs/r/manifest.json").read())
    assert manifest["steps"]["rank"]["arguments"]["by"] == "exact"
    assert manifest["steps"]["sweep"]["arguments"]["mode"] == "atp" and \
        manifest["steps"]["sweep"]["arguments"]["verify_top"] == 2
    code, _, err = cli("rank", "--run", "runs/r", "--by", "nonsense")
    assert code == 2 and "--by" in err


def test_verify_top_needs_an_estimator(cli, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("eval", "--model", model, "--task", "count", "--data", "synthetic", "--n", "2", "--offsets", "2",
               "--max-new-tokens", "8", "--out", "runs/r")[0] == 0
    code, _, err = cli("sweep", "--run", "runs/r", "--mode", "score", "--verify-top", "3")
    assert code == 2 and "estimator" in err
