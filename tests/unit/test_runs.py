"""Run directory: create / resume / refuse / force, atomic tables and shards, manifest contents, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import halluscope.runs as runs
from halluscope.errors import InputError, RunError
from halluscope.runs import MANIFEST_NAME, Parts, Run

MODEL = {"id": "tiny/qwen2-vl", "family": "qwen2_vl", "class": "Qwen2VLForConditionalGeneration", "hash": "abc123"}
EVAL_ARGS = {"task": "count", "limit": 4, "decoding": {"strategy": "greedy"}}


def _frame(n: int = 3, k: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"layer": np.arange(n), "head": np.arange(n) * 2, "k": k})


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run.create(tmp_path / "run", step="eval", arguments=EVAL_ARGS, model=MODEL)


# ---------------------------------------------------------------------------------- create / resume


def test_create_then_resume_keeps_finished_parts(tmp_path: Path) -> None:
    path = tmp_path / "run"
    first = Run.create(path, step="eval", arguments=EVAL_ARGS, model=MODEL)
    assert first.resumed is False and first.status("eval") == "running"
    first.parts("eval").write("s0000", _frame())
    first.write_table("baseline", _frame())

    again = Run.create(path, step="eval", arguments=dict(EVAL_ARGS), model=dict(MODEL))
    assert again.resumed is True
    assert again.parts("eval").done() == {"s0000"}
    assert again.has_table("baseline")
    assert len(again.manifest["steps"]["eval"]["resumed"]) == 1


def test_create_refuses_different_arguments_showing_both_values(tmp_path: Path) -> None:
    path = tmp_path / "run"
    Run.create(path, step="eval", arguments=EVAL_ARGS, model=MODEL)
    with pytest.raises(RunError) as err:
        Run.create(path, step="eval", arguments={**EVAL_ARGS, "limit": 8}, model=MODEL)
    message = str(err.value)
    assert "arguments.limit: 4 in the run vs 8 now" in message
    assert "--force" in message and "\n" not in message


def test_create_refuses_different_model(tmp_path: Path) -> None:
    path = tmp_path / "run"
    Run.create(path, step="eval", arguments=EVAL_ARGS, model=MODEL)
    with pytest.raises(RunError, match=r'model\.hash: "abc123" in the run vs "def456" now'):
        Run.create(path, step="eval", arguments=EVAL_ARGS, model={**MODEL, "hash": "def456"})


def test_create_refuses_run_made_by_another_step(tmp_path: Path) -> None:
    path = tmp_path / "run"
    Run.create(path, step="demo", arguments={})
    with pytest.raises(RunError, match="created by 'demo', not 'eval'"):
        Run.create(path, step="eval", arguments=EVAL_ARGS)


def test_create_force_wipes_the_whole_run(tmp_path: Path) -> None:
    path = tmp_path / "run"
    old = Run.create(path, step="eval", arguments=EVAL_ARGS, model=MODEL)
    old.write_table("baseline", _frame())
    old.parts("eval").write("s0000", _frame())
    (old.plots_dir / "x.png").write_bytes(b"png")

    new = Run.create(path, step="eval", arguments={**EVAL_ARGS, "limit": 8}, model=MODEL, force=True)
    assert new.resumed is False
    assert not new.has_table("baseline") and new.parts("eval").done() == set()
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST_NAME]
    assert new.manifest["steps"]["eval"]["arguments"]["limit"] == 8


def test_non_run_directory_is_refused_and_force_adopts_without_deleting(tmp_path: Path) -> None:
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="non-empty directory that is not a halluscope run"):
        Run.create(path, step="eval", arguments=EVAL_ARGS)
    run = Run.create(path, step="eval", arguments=EVAL_ARGS, force=True)
    assert (path / "notes.txt").read_text() == "keep me"
    assert Run.open(path).status("eval") == "running" and run.path == path


def test_create_on_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(RunError, match="is a file; expected a directory"):
        Run.create(target, step="eval", arguments={})


def test_open_without_manifest_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(RunError) as err:
        Run.open(tmp_path / "nope")
    assert str(err.value) == f"no run at {tmp_path / 'nope'}; create one with `halluscope eval ... --out {tmp_path / 'nope'}`"


def test_open_corrupt_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(RunError, match="is not valid JSON"):
        Run.open(tmp_path)


# ---------------------------------------------------------------------------------------- later steps


def test_begin_step_new_resume_refuse_force(run: Run) -> None:
    run.write_table("baseline", _frame())
    run.finish_step("eval", {"n": 4})

    reopened = Run.open(run.path)
    assert reopened.begin_step("sweep", {"layers": (0, 1), "mode": "zero"}) is False
    reopened.parts("sweep").write("s0000-L00", _frame())
    reopened.write_table("sweep", _frame())
    reopened.write_json("sweep_info", {"ok": True})

    again = Run.open(run.path)
    assert again.begin_step("sweep", {"layers": [0, 1], "mode": "zero"}) is True  # tuple == list once stored
    assert again.parts("sweep").done() == {"s0000-L00"}

    with pytest.raises(RunError) as err:
        again.begin_step("sweep", {"layers": [0, 1], "mode": "mean"})
    assert 'mode: "zero" in the run vs "mean" now' in str(err.value) and "--force" in str(err.value)

    assert again.begin_step("sweep", {"layers": [0, 1], "mode": "mean"}, force=True) is False
    assert again.parts("sweep").done() == set()
    assert not again.has_table("sweep") and not (run.path / "sweep_info.json").exists()
    assert again.has_table("baseline")  # other steps' outputs survive
    assert again.status("eval") == "finished" and again.status("sweep") == "running"


def test_finish_step_records_summary_and_unknown_step_fails(run: Run) -> None:
    run.finish_step("eval", {"copy_rate": np.float64(0.25), "heads": [(0, 3)]})
    entry = Run.open(run.path).manifest["steps"]["eval"]
    assert entry["status"] == "finished" and entry["finished"] is not None
    assert entry["summary"] == {"copy_rate": 0.25, "heads": [[0, 3]]}
    with pytest.raises(RunError, match=r"step 'rank' was never begun .*run.begin_step\('rank', arguments\)"):
        run.finish_step("rank")


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["halluscope", "eval", "--out", "runs/x"])
    args = {"task": "count", "image_dir": Path("data/img"), "offsets": (1, 2), "seed": np.int64(3),
            "alpha": np.float32(0.5), "decoding": {"strategy": "greedy"}}
    run = Run.create(tmp_path / "run", step="eval", arguments=args, model=MODEL)
    manifest = json.loads((run.path / MANIFEST_NAME).read_text())
    assert manifest["command"] == ["halluscope", "eval", "--out", "runs/x"]
    assert manifest["halluscope"] == metadata.version("halluscope")
    assert manifest["model"] == MODEL
    packages = manifest["environment"]["packages"]
    assert packages["pandas"] == pd.__version__ and packages["numpy"] == np.__version__
    assert set(packages) >= {"torch", "transformers"}
    assert manifest["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "git" in manifest and manifest["created"].endswith("+00:00")
    step = manifest["steps"]["eval"]
    assert step["arguments"] == {"task": "count", "image_dir": "data/img", "offsets": [1, 2], "seed": 3,
                                 "alpha": 0.5, "decoding": {"strategy": "greedy"}}
    assert step["status"] == "running" and step["finished"] is None and step["started"]
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_manifest_version_falls_back_to_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(runs.metadata, "version", missing)
    manifest = Run.create(tmp_path / "run", step="eval", arguments={}).manifest
    assert manifest["halluscope"] == "unknown" and manifest["environment"]["packages"]["torch"] is None


def test_git_revision_recorded_and_missing_git_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(
        '#!/bin/sh\ncase "$1" in\n  rev-parse) echo 0123456789abcdef ;;\n  status) echo " M src/x.py" ;;\nesac\n'
    )
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    manifest = Run.create(tmp_path / "a", step="eval", arguments={}).manifest
    assert manifest["git"] == {"revision": "0123456789abcdef", "dirty": True}

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert Run.create(tmp_path / "b", step="eval", arguments={}).manifest["git"] is None


def test_json_documents_round_trip_and_reject_unknown_types(run: Run) -> None:
    run.write_json("heads", {"top": [(0, 3), (11, 15)], "score": np.float32(0.5), "gap": float("nan"),
                             "path": Path("a/b"), "ok": np.bool_(True)})
    assert run.read_json("heads") == {"top": [[0, 3], [11, 15]], "score": 0.5, "gap": None, "path": "a/b", "ok": True}
    with pytest.raises(InputError, match="cannot store object value"):
        run.write_json("bad", {"x": object()})
    with pytest.raises(InputError, match="reserved"):
        run.write_json("manifest", {})


# --------------------------------------------------------------------------------------------- tables


def test_tables_round_trip_and_missing_table_lists_present_and_producer(run: Run) -> None:
    df = pd.DataFrame({"sample_id": ["a", "b"], "layer": [0, 1], "x": [0.5, 1.5]})
    run.write_table("baseline", df)
    pd.testing.assert_frame_equal(run.read_table("baseline"), df)
    assert run.tables() == ["baseline"] and run.has_table("baseline") and not run.has_table("sweep")
    with pytest.raises(RunError) as err:
        run.read_table("sweep")
    assert "has no table 'sweep' (present: baseline); run `halluscope sweep` on this run first" in str(err.value)
    with pytest.raises(RunError, match="run `halluscope probe` on this run first"):
        run.read_table("probs", hint="probe")
    with pytest.raises(RunError, match=r"has no document 'heads' \(present: none\); run `halluscope rank`"):
        run.read_json("heads")


def test_invalid_names_are_refused(run: Run) -> None:
    for bad in ["../x", ".hidden", "a/b", "", "x.tmp"]:
        with pytest.raises(InputError, match="invalid table name"):
            run.write_table(bad, _frame())
    with pytest.raises(InputError, match="invalid step name"):
        run.begin_step("sw eep", {})
    with pytest.raises(InputError, match="expected a pandas DataFrame"):
        run.write_table("t", [1, 2])  # type: ignore[arg-type]


def test_plots_dir_is_created_on_demand(run: Run) -> None:
    assert not (run.path / "plots").exists()
    assert run.plots_dir == run.path / "plots" and run.plots_dir.is_dir()


# ---------------------------------------------------------------------------------------------- parts


def test_parts_keys_are_sanitized_and_read_in_key_order(tmp_path: Path) -> None:
    parts = Parts(tmp_path / "p")
    assert parts.done() == set() and parts.read_all().empty
    keys = ["s0002-L01", "s0000-L05", "a/b c%", "..", "s0001-L00"]
    for i, key in enumerate(keys):
        parts.write(key, _frame(2, k=i))
    assert parts.done() == set(keys)
    assert all(p.parent == parts.path for p in parts.path.iterdir())  # "a/b" did not make a subdirectory
    table = parts.read_all()
    expected = [keys.index(k) for k in sorted(keys) for _ in range(2)]
    assert table["k"].tolist() == expected and table.index.tolist() == list(range(10))
    pd.testing.assert_frame_equal(parts.read("a/b c%"), _frame(2, k=2))
    with pytest.raises(RunError, match="no finished part 'zz'"):
        parts.read("zz")
    with pytest.raises(InputError, match="invalid part key"):
        parts.write("", _frame())
    parts.clear()
    assert parts.done() == set() and not parts.path.exists()


def test_failed_replace_leaves_previous_shard_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = Parts(tmp_path / "p")
    parts.write("k", _frame(2, k=1))

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        parts.write("k", _frame(5, k=2))
    monkeypatch.undo()
    assert sorted(p.name for p in parts.path.iterdir()) == ["k.parquet"]
    pd.testing.assert_frame_equal(parts.read("k"), _frame(2, k=1))


_CRASH_AT_REPLACE = """
import os, sys
import pandas as pd
from halluscope.runs import Parts
parts = Parts(sys.argv[1])
parts.write("done", pd.DataFrame({"x": [1]}))
os.replace = lambda *a, **k: os._exit(9)  # die between the temp write and the rename
parts.write("crashed", pd.DataFrame({"x": [2]}))
"""


def test_crash_between_temp_write_and_replace_is_not_a_finished_shard(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-c", _CRASH_AT_REPLACE, str(directory)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and "crashed" in leftovers[0]  # the complete temp file is still there...
    parts = Parts(directory)
    assert parts.done() == {"done"}  # ...but it is never taken for a finished shard
    assert parts.read_all()["x"].tolist() == [1]
    parts.clear()
    assert not directory.exists()


_WRITE_FOREVER = """
import sys
import numpy as np, pandas as pd
from halluscope.runs import Run
parts = Run.open(sys.argv[1]).parts("sweep")
base = pd.DataFrame({"x": np.arange(200_000), "y": np.random.default_rng(0).random(200_000)})
i = 0
while True:
    parts.write(f"s{i:05d}", base.assign(k=i))
    i += 1
"""


def test_kill_9_while_writing_leaves_only_complete_parts(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "run", step="sweep", arguments={})
    parts = run.parts("sweep")
    proc = subprocess.Popen([sys.executable, "-c", _WRITE_FOREVER, str(run.path)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while True:  # kill while a temp file is being written, after a few shards are done
            assert proc.poll() is None, "writer exited early; run _WRITE_FOREVER by hand to see why"
            assert time.monotonic() < deadline, "writer made no progress"
            names = [p.name for p in parts.path.iterdir()] if parts.path.is_dir() else []
            if sum(n.endswith(".parquet") for n in names) >= 3 and any(n.endswith(".tmp") for n in names):
                break
            time.sleep(0.001)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    done = parts.done()
    assert len(done) >= 3
    for key in done:
        shard = parts.read(key)
        assert len(shard) == 200_000 and set(shard["k"]) == {int(key[1:])}
    table = parts.read_all()
    assert len(table) == 200_000 * len(done)
    assert sorted(set(table["k"])) == sorted(int(k[1:]) for k in done)
