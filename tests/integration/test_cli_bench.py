"""`halluscope bench pope`, `bench chair` and `bench pih` end to end: on a tiny model (synthetic scenes, a
COCO-format directory and the counting task; head ablation and decoding methods beside greedy, a decoding method
at its neutral setting equal to greedy, reruns that add a method or change a setting computing only that
method's replies, the one-line errors), and pope and chair on the shipped scenes organism."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from halluscope.bench.chair import COLUMNS as CHAIR_COLUMNS
from halluscope.bench.pih import COLUMNS as PIH_COLUMNS
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

    greedy_shards = _shards(run / "parts" / "pope-greedy")
    code, _, err = cli(*args, "--method", "heads:L1H0", "--method", 'vcd:{"alpha": 0}')
    assert code == 0, err
    assert _shards(run / "parts" / "pope-greedy") == greedy_shards
    table = pd.read_parquet(run / "pope.parquet")
    assert table["method"].unique().tolist() == ["greedy", "heads:L1H0", 'vcd:{"alpha":0.0}']
    # VCD at alpha 0 is plain greedy: the same replies, so the same row values
    rows = table.set_index(["method", "split"])
    assert rows.loc['vcd:{"alpha":0.0}'].equals(rows.loc["greedy"])
    replies = pd.read_parquet(run / "replies.parquet")
    assert replies.loc[replies["method"] == "greedy", "reply"].tolist() == \
        replies.loc[replies["method"] == 'vcd:{"alpha":0.0}', "reply"].tolist()
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    vcd_step = next(v for k, v in steps.items() if k.startswith("pope-vcd_"))
    assert vcd_step["arguments"]["config"] == {"alpha": 0.0, "beta": 0.1, "noise_step": 500, "seed": 0}
    assert steps["bench-pope"]["summary"]["methods"][2]["spec"] == 'vcd:{"alpha": 0}'


def _shards(directory) -> dict:
    """Each shard file of a method's step and when it was written."""
    return {p: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_bench_pih_rates_the_counting_task_per_method_and_resumes_per_method(cli, model, tmp_path):
    run = tmp_path / "pih"
    args = ("bench", "pih", "--model", model, "--task", "count", "--n", "2", "--size", "112", "--offsets", "1,2",
            "--max-new-tokens", "4", "--out", run)
    code, out, err = cli(*args, "--method", "heads:L0H1")
    assert code == 0, err
    table = pd.read_parquet(run / "pih.parquet")
    assert list(table.columns) == list(PIH_COLUMNS) and table["method"].tolist() == ["greedy", "heads:L0H1"]
    assert table[["n_base", "n_misleading"]].values.tolist() == [[2, 4], [2, 4]]
    assert _in_unit_range(table, ["base_accuracy", "copy_rate", "correction_rate"])
    assert "task: count (version 1), offsets [1, 2], size 112" in out
    assert "| heads:L0H1 |" in (run / "pih.md").read_text() and (run / "plots" / "pih.png").is_file()
    replies = pd.read_parquet(run / "replies.parquet")
    assert len(replies) == 2 * 8 and set(replies["outcome"]) <= {"copied", "corrected", "other", "none", "negated"}

    before = {step: _shards(run / "parts" / step) for step in ("pih-greedy", "pih-ablation_L0H1")}
    code, _, err = cli(*args, "--method", "heads:L0H1", "--method", 'vcd:{"alpha": 0}')
    assert code == 0, err
    assert {step: _shards(run / "parts" / step) for step in before} == before  # only vcd was computed
    table = pd.read_parquet(run / "pih.parquet").set_index("method")
    assert table.loc['vcd:{"alpha":0.0}'].equals(table.loc["greedy"])

    # another setting is another method: a step of its own beside the first, which stays as it was
    neutral = next(p for p in (run / "parts").iterdir() if p.name.startswith("pih-vcd_"))
    neutral_shards = _shards(neutral)
    code, _, err = cli(*args, "--method", 'vcd:{"alpha": 0}', "--method", 'vcd:{"alpha": 0.5}')
    assert code == 0, err
    assert _shards(neutral) == neutral_shards
    assert len([p for p in (run / "parts").iterdir() if p.name.startswith("pih-vcd_")]) == 2
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    configs = [m["config"]["alpha"] for m in steps["bench-pih"]["summary"]["methods"] if m["decoder"] == "vcd"]
    assert configs == [0.0, 0.5]


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
    (("--method", "vcd:0.5"), "not a JSON object of settings"),
    (("--data", "nowhere"), "neither 'synthetic' nor a directory"),
    (("--rule", "strict"), "unknown --rule 'strict'"),
])
def test_bench_errors_are_one_line_and_write_nothing(cli, model, tmp_path, extra, message):
    code, _, err = cli("bench", "pope", "--model", model, "--n", "2", "--out", tmp_path / "run", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "items.parquet").exists()


@pytest.mark.parametrize("benchmark", ["pope", "chair"])
def test_bench_runs_offline_on_the_scenes_organism(cli, tmp_path, benchmark):
    code, _, err = cli("bench", benchmark, "--model", "organism-scenes", "--n", "4", "--out", tmp_path / "run")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "run" / f"{benchmark}.parquet")
    columns = POPE_COLUMNS if benchmark == "pope" else CHAIR_COLUMNS
    assert list(table.columns) == list(columns) and set(table["method"]) == {"greedy"}
    assert _in_unit_range(table, [c for c in columns if c not in ("method", "split", "length")])
    assert len(table) == (3 if benchmark == "pope" else 1)


def test_organism_train_names_an_unknown_kind_before_writing(cli, tmp_path):
    code, _, err = cli("organism", "train", "--kind", "scene", "--out", tmp_path / "o")
    assert code == 2 and "Did you mean 'scenes'" in err and not (tmp_path / "o").exists()


def test_bench_compare_sets_runs_side_by_side_and_reads_them_as_they_are_now(cli, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    chair = ("bench", "chair", "--model", model, "--n", "3", "--max-new-tokens", "6")
    assert cli(*chair, "--out", "before")[0] == 0
    assert cli(*chair, "--method", "heads:L0H0", "--out", "after")[0] == 0
    compare = ("bench", "compare", "before", "after", "--out", "compare", "--bootstrap", "50")
    code, out, err = cli(*compare)
    assert code == 0, err
    table = pd.read_parquet("compare/compare.parquet")
    assert table["arm"].unique().tolist() == ["before", "after:greedy", "after:heads:L0H0"]
    assert "after:heads:L0H0" in out and "paired bootstrap" in out
    for arm, run, method in [("before", "before", "greedy"), ("after:heads:L0H0", "after", "heads:L0H0")]:
        expected = pd.read_parquet(f"{run}/chair.parquet").set_index("method").loc[method, list(CHAIR_COLUMNS[1:])]
        got = table[table["arm"] == arm].set_index("metric").loc[list(CHAIR_COLUMNS[1:]), "value"]
        np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), rtol=1e-12, equal_nan=True)
    # the same model decoded greedily on the same images: no change in any resample
    same = table[table["arm"] == "after:greedy"][["change", "change_low", "change_high"]].to_numpy(float)
    assert np.all((same == 0) | np.isnan(same))
    assert (tmp_path / "compare" / "plots" / "compare.png").is_file() and "## Relative change" in \
        (tmp_path / "compare" / "compare.md").read_text()
    step = json.loads((tmp_path / "compare" / "manifest.json").read_text())["steps"]["bench-compare"]
    assert step["arguments"]["runs"] == [str(tmp_path / "before"), str(tmp_path / "after")]

    assert cli(*chair, "--method", "heads:L1H1", "--out", "before")[0] == 0  # a method added to the baseline run
    assert cli(*compare)[0] == 0
    arms = pd.read_parquet("compare/compare.parquet")["arm"].unique().tolist()
    assert arms == ["before:greedy", "before:heads:L1H1", "after:greedy", "after:heads:L0H0"]

    code, _, err = cli(*compare[:-1], "60")
    assert code != 0 and "--force" in err
    assert cli(*compare[:-1], "60", "--force")[0] == 0


def test_bench_compare_reads_pope_per_split_and_refuses_runs_it_cannot_compare(cli, model, tmp_path):
    pope = tmp_path / "pope"
    assert cli("bench", "pope", "--model", model, "--n", "3", "--max-new-tokens", "4", "--method", "heads:L0H1",
               "--out", pope)[0] == 0
    code, _, err = cli("bench", "compare", pope, "--out", tmp_path / "compare")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "compare" / "compare.parquet")
    assert table[["arm", "split"]].drop_duplicates().values.tolist() == [
        [f"pope:{m}", s] for m in ("greedy", "heads:L0H1") for s in ("random", "popular", "adversarial")]
    expected = pd.read_parquet(pope / "pope.parquet").set_index(["method", "split"])["f1"]
    got = table[table["metric"] == "f1"].set_index(["arm", "split"])["value"]
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), rtol=1e-12, equal_nan=True)

    chair = tmp_path / "chair"
    assert cli("bench", "chair", "--model", model, "--n", "3", "--max-new-tokens", "4", "--out", chair)[0] == 0
    unfinished = tmp_path / "unfinished"
    shutil.copytree(chair, unfinished)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    manifest["steps"]["bench-chair"]["status"] = "running"  # as a killed run leaves it
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    for runs, message in [((pope, chair), "compare runs of one benchmark"),
                          ((chair, unfinished), "has not finished; rerun its command to resume it"),
                          ((chair,), "pass two or more bench runs"),
                          ((chair, tmp_path), "no run")]:
        code, _, err = cli("bench", "compare", *runs, "--out", tmp_path / "refused")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()


def test_bench_compare_reads_the_pih_task_per_method(cli, model, tmp_path):
    run = tmp_path / "pih"
    assert cli("bench", "pih", "--model", model, "--task", "count", "--n", "2", "--size", "112", "--offsets", "1,2",
               "--max-new-tokens", "4", "--method", "heads:L0H1", "--out", run)[0] == 0
    code, out, err = cli("bench", "compare", run, "--out", tmp_path / "compare")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "compare" / "compare.parquet")
    rates = ["base_accuracy", "copy_rate", "correction_rate"]
    assert table["arm"].unique().tolist() == ["pih:greedy", "pih:heads:L0H1"] and table["metric"].unique().tolist() \
        == rates
    expected = pd.read_parquet(run / "pih.parquet").set_index("method")[rates].to_numpy(float).ravel()
    np.testing.assert_allclose(table["value"].to_numpy(float), expected, rtol=1e-12, equal_nan=True)
