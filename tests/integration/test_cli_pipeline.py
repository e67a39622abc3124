"""`tiny-models`, `eval`, `means`, `sweep`, `rank` and `ablate` end to end on a tiny model, including a real
kill -9 half way through eval and sweep, and the one-line errors for bad input."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

EVAL = ("--task", "count", "--data", "synthetic", "--n", "6", "--offsets", "1,2", "--max-new-tokens", "10")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from halluscope.models.tiny import build_tiny

    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def _kill_after_first_part(proc, parts: Path, timeout: float = 120) -> None:
    """Wait until the process has finished at least one shard, then kill -9 it."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if parts.is_dir() and any(p.suffix == ".parquet" for p in parts.iterdir()):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    pytest.fail(f"process ended or timed out before a shard appeared: {proc.communicate()}")


def test_tiny_models_command(cli, tmp_path):
    code, _, err = cli("tiny-models", tmp_path, "--family", "llava", "--family", "janus")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["janus", "llava"]
    assert (tmp_path / "llava" / "model.safetensors").is_file()


@pytest.mark.parametrize("task,offsets", [("count", "1,2"), ("color", "1,3")])
def test_eval_writes_a_self_describing_run(cli, model, tmp_path, task, offsets):
    run = tmp_path / "run"
    code, out, err = cli("eval", "--model", model, "--task", task, "--data", "synthetic", "--n", "6",
                         "--offsets", offsets, "--max-new-tokens", "8", "--out", run)
    assert code == 0, err
    baseline = pd.read_parquet(run / "baseline.parquet")
    assert list(baseline.columns)[:3] == ["sample_id", "image_id", "task"]
    assert {"prompt", "condition", "truth", "claim", "reply", "answer", "outcome"} <= set(baseline.columns)
    samples = pd.read_parquet(run / "samples.parquet")
    assert len(baseline) == len(samples) and baseline["sample_id"].is_unique
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"]["eval"]["status"] == "finished"
    assert manifest["model"]["family"] == "qwen2_vl" and manifest["steps"]["eval"]["arguments"]["decoding"] == "greedy"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_samples"] == len(baseline)
    # copy and correction rate by true value, copy rate by offset (or distractor), base accuracy
    assert len(list((run / "plots").glob("*.png"))) == 4


def test_eval_refuses_a_different_run_unless_forced(cli, model, tmp_path):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    code, _, err = cli("eval", "--model", model, *EVAL[:-2], "--max-new-tokens", "5", "--out", run)
    assert code == 2 and "--force" in err
    assert cli("eval", "--model", model, *EVAL[:-2], "--max-new-tokens", "5", "--out", run, "--force")[0] == 0


def test_eval_killed_half_way_resumes_to_the_same_table(cli, spawn, model, tmp_path):
    args = ("eval", "--model", model, "--task", "count", "--data", "synthetic", "--n", "20", "--offsets", "1,2",
            "--max-new-tokens", "10", "--batch-size", "4")
    clean = tmp_path / "clean"
    assert cli(*args, "--out", clean)[0] == 0
    killed = tmp_path / "killed"
    _kill_after_first_part(spawn(*args, "--out", killed), killed / "parts" / "eval")
    assert not (killed / "baseline.parquet").exists()
    code, _, err = cli(*args, "--out", killed)
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "baseline.parquet"),
                                  pd.read_parquet(clean / "baseline.parquet"))


def test_sweep_rank_ablate_pipeline(cli, model, tmp_path):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    assert cli("means", "--run", run)[0] == 0
    code, _, err = cli("sweep", "--run", run, "--max-new-tokens", "10")
    assert code == 0, err
    sweep = pd.read_parquet(run / "sweep.parquet")
    baseline = pd.read_parquet(run / "baseline.parquet")
    prompts = baseline[baseline["condition"].str.startswith("+")]
    assert len(sweep) == len(prompts) * 2 * 4  # prompts x layers x heads
    assert not sweep.duplicated(["sample_id", "layer", "head"]).any()
    code, out, err = cli("rank", "--run", run)
    assert code == 0, err
    heads = json.loads((run / "heads.json").read_text())
    assert len(heads["ranking"]) == 8 and (run / "plots" / "head_correction_rate.png").is_file()
    code, out, err = cli("ablate", "--run", run, "--heads", "L0H1,L1H2")
    assert code == 0, err
    result = json.loads((run / "ablation_L0H1-L1H2_summary.json").read_text())
    assert result["heads"] == "L0H1,L1H2" and "before" in result and "after" in result
    assert len(pd.read_parquet(run / "ablation_L0H1-L1H2.parquet")) == len(baseline)
    code, _, err = cli("ablate", "--run", run, "--heads", "L0H1", "--intervention", "mean", "--force")
    assert code == 0, err
    code, _, err = cli("sweep", "--run", run, "--mode", "generate", "--layers", "1:2", "--intervention", "mean",
                       "--force", "--max-new-tokens", "10")
    assert code == 0, err
    assert set(pd.read_parquet(run / "sweep.parquet")["layer"]) == {1}


def test_sweep_killed_half_way_resumes_to_the_same_table(cli, spawn, model, tmp_path):
    runs = []
    for name in ("clean", "killed"):
        run = tmp_path / name
        assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
        runs.append(run)
    clean, killed = runs
    assert cli("sweep", "--run", clean, "--max-new-tokens", "10")[0] == 0
    _kill_after_first_part(spawn("sweep", "--run", killed, "--max-new-tokens", "10"), killed / "parts" / "sweep")
    assert cli("sweep", "--run", killed, "--max-new-tokens", "10")[0] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "sweep.parquet"), pd.read_parquet(clean / "sweep.parquet"))


@pytest.mark.parametrize("args,message", [
    (("eval", "--model", "{model}", "--data", "/no/such/file.parquet", "--out", "{run}"), "not"),
    (("eval", "--model", "{model}", "--task", "counts", "--out", "{run}"), "Did you mean"),
    (("eval", "--model", "{model}", "--offsets", "1,x", "--out", "{run}"), "offsets"),
    (("eval", "--model", "{model}", "--offsets", "0,-1", "--out", "{run}"), "offset"),
    (("eval", "--model", "/no/such/model", "--out", "{run}"), "not found"),
    (("sweep", "--run", "{run}"), "no run"),
])
def test_bad_input_gives_one_line_errors(cli, model, tmp_path, args, message):
    args = [a.format(model=model, run=tmp_path / "run") for a in args]
    code, _, err = cli(*args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    if args[0] == "eval":  # checked before anything is written: the corrected command is not refused later
        assert not (tmp_path / "run").exists()


def test_errors_after_eval(cli, model, tmp_path):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    for args, message in [
        (("sweep", "--run", run, "--layers", "0:9"), "layers 0..1"),
        (("sweep", "--run", run, "--mode", "fast"), "score, generate"),
        (("ablate", "--run", run, "--heads", "L0H9"), "heads 0..3"),
        (("ablate", "--run", run, "--heads", "L0X1"), "L<layer>H<head>"),
        (("ablate", "--run", run, "--heads", "best3"), "halluscope rank"),
        (("rank", "--run", run), "sweep"),
        (("ablate", "--run", run, "--heads", "L0H1", "--intervention", "mean"), "halluscope means"),
        (("sweep", "--run", run, "--intervention", "half"), "zero, scale, mean, reference-mean"),
        (("sweep", "--run", run, "--intervention", "mean"), "halluscope means"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and message in err, (args, err)
    steps = json.loads((run / "manifest.json").read_text())["steps"]
    assert set(steps) == {"eval"}  # rejected commands recorded nothing, so their corrected form runs


def test_eval_on_local_data_with_an_objects_file_records_skipped_rows(cli, model, tmp_path):
    """Counting data without nouns takes them from --objects (a JSON file); undecodable rows are kept in the
    summary."""
    from halluscope.images import image_to_png_bytes
    from halluscope.tasks import SkippedRowsWarning
    from halluscope.tasks.scenes import count_scene

    table = tmp_path / "counts.parquet"
    pd.DataFrame({"image": [image_to_png_bytes(count_scene(2, "circle", size=56, seed=0)), b"not an image",
                            image_to_png_bytes(count_scene(3, "star", size=56, seed=1))],
                  "number": [2, 3, 3]}).to_parquet(table)
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"0": "circles", "2": "stars", "0001": "cups"}))
    run = tmp_path / "run"
    with pytest.warns(SkippedRowsWarning, match=r"skipped 1 of 3 rows .*\(image ids 0001\)"):
        code, _, err = cli("eval", "--model", model, "--data", table, "--objects", objects, "--offsets", "1",
                           "--max-new-tokens", "4", "--out", run)
    assert code == 0, err
    samples = pd.read_parquet(run / "samples.parquet")
    assert dict(zip(samples["image_id"], samples["object"])) == {"0000": "circles", "0002": "stars"}
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["row"], r["image_id"]) for r in summary["skipped_source_rows"]] == [(1, "0001")]
    code, _, err = cli("eval", "--model", model, "--data", table, "--objects", tmp_path / "none.json",
                       "--out", tmp_path / "other")
    assert code == 2 and "--objects" in err and "does not exist" in err
