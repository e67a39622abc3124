"""`halluscope bench pope` and `bench chair` end to end: on a tiny model (synthetic scenes and a COCO-format
directory, a head-ablation method beside greedy, a rerun that adds a method reusing the finished replies, the
one-line errors)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from halluscope.bench.chair import COLUMNS as CHAIR_COLUMNS
from halluscope.bench.pope import COLUMNS as POPE_COLUMNS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from halluscope.models.tiny import build_tiny

    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def _in_unit_range(table: pd.DataFrame, columns) -> bool:
    values = table[list(columns)].to_numpy(dtype=float).ravel()
    values = values[~pd.isna(values)]
    return bool(((values >= 0) & (values <= 1)).all())


def test_bench_pope_compares_greedy_with_a_head_ablation_and_adds_methods_on_rerun(cli, model, tmp_path):
    run = tmp_path / "pope"
    args = ("bench", "pope", "--model", model, "--data", "synthetic", "--n", "3", "--max-new-tokens", "4",
            "--out", run)
    code, out, err = cli(*args, "--method", "heads:L0H1,L1H2")
    assert code == 0, err
    table = pd.read_parquet(run / "pope.parquet")
    assert list(table.columns) == list(POPE_COLUMNS)
    assert table[["method", "split"]].values.tolist() == [
        [m, s] for m in ("greedy", "heads:L0H1,L1H2") for s in ("random", "popular", "adversarial")]
    assert _in_unit_range(table, POPE_COLUMNS[2:])
    assert "heads:L0H1,L1H2" in out and "max_new_tokens=4" in out
    assert "| greedy | adversarial |" in (run / "pope.md").read_text()
    assert (run / "plots" / "pope.png").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"]["bench-pope"]["arguments"]["decoding"].startswith("greedy")
    assert "pope.parquet" in manifest["steps"]["bench-pope"]["outputs"]
    replies = pd.read_parquet(run / "replies.parquet")
    assert len(replies) == 2 * len(pd.read_parquet(run / "items.parquet"))

    greedy_shards = {p: p.stat().st_mtime_ns for p in (run / "parts" / "pope-greedy").iterdir()}
    code, _, err = cli(*args, "--method", "heads:L1H0")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in (run / "parts" / "pope-greedy").iterdir()} == greedy_shards
    assert pd.read_parquet(run / "pope.parquet")["method"].unique().tolist() == ["greedy", "heads:L1H0"]


def test_bench_chair_on_a_coco_directory_names_its_nlp(cli, model, tmp_path):
    from halluscope.tasks.object_scenes import write_scene_dataset

    data = write_scene_dataset(tmp_path / "scenes", n_images=6, seed=3)
    run = tmp_path / "chair"
    code, out, err = cli("bench", "chair", "--model", model, "--data", data.root, "--n", "4", "--max-new-tokens", "6",
                         "--method", "heads:L0H0", "--out", run)
    assert code == 0, err
    table = pd.read_parquet(run / "chair.parquet")
    assert list(table.columns) == list(CHAIR_COLUMNS) and table["method"].tolist() == ["greedy", "heads:L0H0"]
    assert _in_unit_range(table, ["chair_s", "chair_i", "recall"]) and (table["length"] >= 0).all()
    summary = json.loads((run / "chair_summary.json").read_text())
    assert summary["nlp"] in ("nltk", "offline") and summary["n_images"] == 4 and summary["vocabulary"] == "shapes"
    assert table.attrs["nlp"] == summary["nlp"]  # the parquet file names its nlp too
    assert f"nlp: {summary['nlp']}" in out and f"nlp: {summary['nlp']}" in (run / "chair.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (("--method", "greedly"), "Did you mean 'greedy'"),
    (("--data", "nowhere"), "neither 'synthetic' nor a directory"),
    (("--rule", "strict"), "unknown --rule 'strict'"),
])
def test_bench_errors_are_one_line_and_write_nothing(cli, model, tmp_path, extra, message):
    code, _, err = cli("bench", "pope", "--model", model, "--n", "2", "--out", tmp_path / "run", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "items.parquet").exists()


def test_organism_train_names_an_unknown_kind_before_writing(cli, tmp_path):
    code, _, err = cli("organism", "train", "--kind", "scene", "--out", tmp_path / "o")
    assert code == 2 and "Did you mean 'scenes'" in err and not (tmp_path / "o").exists()
