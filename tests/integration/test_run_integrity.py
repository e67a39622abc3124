"""Run-directory integrity through the CLI: one writer per run, --force removes only what the run wrote, several
ablations side by side, a run resumed with a smaller --batch-size, corrupt shards recomputed."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

import halluscope.evaluation as evaluation
import halluscope.runs as runs

EVAL = ("--task", "count", "--data", "synthetic", "--n", "3", "--offsets", "1", "--max-new-tokens", "6")

_HOLD_LOCK = """
import sys, time
from halluscope.runs import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from halluscope.models.tiny import build_tiny

    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


def _steps(run) -> dict:
    return json.loads((run / "manifest.json").read_text())["steps"]


def test_a_command_on_a_run_another_command_writes_fails_in_one_line(cli, model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    monkeypatch.setattr(runs, "LOCK_WAIT_SECONDS", 0.3)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (("means", "--run", run), ("eval", "--model", model, *EVAL, "--out", run),
                     ("ablate", "--run", run, "--heads", "L0H1")):
            code, _, err = cli(*args)
            assert code == 2 and f"is being written by pid {holder.pid}" in err, (args, err)
            assert "wait for it to finish" in err and len(err.strip().splitlines()) == 1, err
    finally:
        holder.kill()
        holder.wait()
    assert set(_steps(run)) == {"eval"}
    code, _, err = cli("means", "--run", run)  # the killed holder's lock is taken over
    assert code == 0, err
    assert not (run / runs.LOCK_NAME).exists()


def test_eval_force_deletes_only_what_the_run_wrote(cli, model, tmp_path):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    assert cli("means", "--run", run)[0] == 0
    plots = sorted(p.name for p in (run / "plots").iterdir())
    assert f"plots/{plots[0]}" in _steps(run)["eval"]["outputs"]
    (run / "notes.txt").write_text("mine")
    (run / "plots" / "mine.png").write_bytes(b"mine")
    code, _, err = cli("eval", "--model", model, *EVAL[:-2], "--max-new-tokens", "5", "--out", run, "--force")
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / "plots" / "mine.png").read_bytes() == b"mine"
    assert not (run / "head_means.safetensors").exists()  # written by the run's `means`: removed
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted([*plots, "mine.png"])
    assert set(_steps(run)) == {"eval"}


def test_several_ablations_live_side_by_side_and_head_lists_are_normalised(cli, model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    code, out, err = cli("ablate", "--run", run, "--heads", "L1H2,l0h1,L0H1")
    assert code == 0, err
    assert "ablation_L0H1-L1H2" in out
    code, _, err = cli("ablate", "--run", run, "--heads", "L0H1", "--name", "mine")
    assert code == 0, err
    first = pd.read_parquet(run / "ablation_L0H1-L1H2.parquet")
    assert json.loads((run / "ablation_L0H1-L1H2_summary.json").read_text())["heads"] == "L0H1,L1H2"
    assert json.loads((run / "mine_summary.json").read_text())["heads"] == "L0H1"
    assert {"ablate-ablation_L0H1-L1H2", "ablate-mine"} <= set(_steps(run))

    def recompute(*args, **kwargs):
        raise AssertionError("a finished shard was recomputed")

    monkeypatch.setattr(evaluation, "iter_evaluate", recompute)
    code, _, err = cli("ablate", "--run", run, "--heads", "l0h1,L1H2", "--batch-size", "3")  # same set, new batch
    assert code == 0, err
    entry = _steps(run)["ablate-ablation_L0H1-L1H2"]
    assert len(entry["resumed"]) == 1 and entry["settings"] == {"batch_size": 3}
    assert entry["arguments"]["spec"] == "L0H1,L1H2"
    pd.testing.assert_frame_equal(pd.read_parquet(run / "ablation_L0H1-L1H2.parquet"), first)
    code, _, err = cli("ablate", "--run", run, "--heads", "L0H1", "--name", "baseline")
    assert code == 2 and "would overwrite" in err and len(err.strip().splitlines()) == 1


def test_an_eval_that_ran_out_of_memory_resumes_with_a_smaller_batch(cli, model, tmp_path, monkeypatch):
    args = ("eval", "--model", model, "--task", "count", "--data", "synthetic", "--n", "12", "--offsets", "1,2",
            "--max-new-tokens", "4", "--out", tmp_path / "run")
    real, calls = evaluation.iter_evaluate, []

    def out_of_memory(*a, **k):
        calls.append(k["batch_size"])
        if len(calls) == 2:  # the second shard (samples 36..47) does not fit
            raise RuntimeError("CUDA out of memory")
        yield from real(*a, **k)

    monkeypatch.setattr(evaluation, "iter_evaluate", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli(*args, "--batch-size", "36")
    first = pd.read_parquet(tmp_path / "run" / "parts" / "eval" / "000000.parquet")
    assert len(first) == 36
    monkeypatch.setattr(evaluation, "iter_evaluate", real)
    code, _, err = cli(*args, "--batch-size", "4")
    assert code == 0, err
    baseline = pd.read_parquet(tmp_path / "run" / "baseline.parquet")
    samples = pd.read_parquet(tmp_path / "run" / "samples.parquet")
    assert baseline["sample_id"].tolist() == samples["id"].tolist()  # each sample once, in order
    assert baseline["reply"].head(36).tolist() == first["reply"].tolist()  # the finished shard was kept
    entry = _steps(tmp_path / "run")["eval"]
    assert entry["settings"] == {"batch_size": 4} and len(entry["resumed"]) == 1


def test_a_corrupt_shard_is_recomputed_with_a_warning(cli, model, tmp_path, caplog):
    run = tmp_path / "run"
    assert cli("eval", "--model", model, *EVAL, "--out", run)[0] == 0
    clean = pd.read_parquet(run / "baseline.parquet")
    shard = run / "parts" / "eval" / "000000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, e.g. by a full disk outside halluscope's writes
    (run / "baseline.parquet").unlink()
    with caplog.at_level("WARNING", logger="halluscope.runs"):
        code, _, err = cli("eval", "--model", model, *EVAL, "--out", run)
    assert code == 0, err
    assert f"part {shard} is corrupt or truncated" in caplog.text and "recomputed" in caplog.text
    pd.testing.assert_frame_equal(pd.read_parquet(run / "baseline.parquet"), clean)
