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
import pyarrow.parquet as pq
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


def test_create_force_wipes_everything_the_run_wrote(tmp_path: Path) -> None:
    path = tmp_path / "run"
    old = Run.create(path, step="eval", arguments=EVAL_ARGS, model=MODEL)
    old.write_table("baseline", _frame())
    old.parts("eval").write("s0000", _frame())
    (old.plots_dir / "maps").mkdir()
    (old.plots_dir / "maps" / "x.png").write_bytes(b"png")  # written during the step: recorded at its finish
    old.finish_step("eval")
    assert "plots/maps/x.png" in old.manifest["steps"]["eval"]["outputs"]

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


# ------------------------------------------------------------------------------ manifest read-modify-write


def test_two_run_objects_on_one_directory_lose_no_entry(run: Run) -> None:
    other = Run.open(run.path)
    assert other.begin_step("sweep", {"mode": "score"}) is False
    other.write_table("sweep", _frame())
    (other.plots_dir / "sweep.png").write_bytes(b"png")
    run.write_table("baseline", _frame())  # `run` began eval before `other` began sweep
    other.finish_step("sweep", {"rows": 3})
    run.finish_step("eval", {"n": 4})
    other.begin_step("rank", {})
    run.write_json("notes", {"ok": True})

    steps = json.loads((run.path / MANIFEST_NAME).read_text())["steps"]
    assert set(steps) == {"eval", "sweep", "rank"}
    assert steps["sweep"]["status"] == "finished" and steps["sweep"]["outputs"] == ["sweep.parquet", "plots/sweep.png"]
    assert steps["eval"]["status"] == "finished" and steps["eval"]["outputs"] == ["baseline.parquet", "notes.json"]
    assert run.manifest == other.manifest and run.status("rank") == "running"  # both read the state on disk


def test_a_stale_run_object_cannot_erase_later_steps(run: Run) -> None:
    """The demo held eval's Run while later steps ran; its last write used to save eval's manifest, after which
    a generate-mode sweep found no sweep entry and reused the score-mode shards."""
    run.finish_step("eval", {"n": 4})
    sweep = Run.open(run.path)
    sweep.begin_step("sweep", {"layers": [0, 1], "mode": "score"})
    sweep.parts("sweep").write("000000-L000", _frame())
    sweep.finish_step("sweep")
    run.write_json("demo", {"headline": 1})

    later = Run.open(run.path)
    assert later.status("sweep") == "finished"
    with pytest.raises(RunError, match='mode: "score" in the run vs "generate" now'):
        later.begin_step("sweep", {"layers": [0, 1], "mode": "generate"})
    assert later.begin_step("sweep", {"layers": [0, 1], "mode": "generate"}, force=True) is False
    assert later.parts("sweep").done() == set()


# ---------------------------------------------------------------------------------------- part identity


def test_a_step_started_afresh_never_reuses_leftover_parts(run: Run) -> None:
    leftover = Parts(run.path / "parts" / "sweep")  # e.g. shards whose manifest entry was lost
    leftover.write("000000-L000", _frame())
    assert run.parts("sweep").done() == set()  # no entry: nothing is reusable
    assert run.begin_step("sweep", {"mode": "generate"}) is False
    assert not leftover.path.exists() and run.parts("sweep").done() == set()


def test_parts_are_stamped_and_reused_only_by_their_step_identity(run: Run) -> None:
    run.begin_step("sweep", {"mode": "score", "layers": [0, 1]})
    parts = run.parts("sweep")
    file = parts.write("000000-L000", _frame())
    identity = runs.step_identity("sweep", {"mode": "score", "layers": [0, 1]})
    assert parts.identity == identity
    assert pq.read_metadata(file).metadata[runs.IDENTITY_KEY] == identity.encode()
    assert Run.open(run.path).parts("sweep").done() == {"000000-L000"}

    other = Parts(parts.path, identity=runs.step_identity("sweep", {"mode": "generate", "layers": [0, 1]}))
    assert other.done() == set() and other.read_all().empty  # written by another step: recomputed
    other.write("000000-L000", _frame(k=7))
    assert other.done() == {"000000-L000"} and parts.done() == set()
    assert runs.step_identity("sweep", {"mode": "score", "batch_size": 4}) == runs.step_identity(
        "sweep", {"mode": "score", "batch_size": 64})


def test_parts_of_an_earlier_version_resume_only_under_their_manifest_entry(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "run", step="eval", arguments=EVAL_ARGS, model=MODEL)
    run.finish_step("eval")
    manifest = json.loads((run.path / MANIFEST_NAME).read_text())  # as halluscope 0.1 wrote a sweep entry
    manifest["steps"]["sweep"] = {"arguments": {"mode": "score", "batch_size": 16}, "command": [], "started": "x",
                                  "resumed": [], "finished": None, "status": "running", "summary": None,
                                  "outputs": []}
    (run.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    Parts(run.path / "parts" / "sweep").write("000000-L000", _frame())  # no identity stamp

    reopened = Run.open(run.path)
    assert reopened.begin_step("sweep", {"mode": "score", "batch_size": 4}) is True
    assert reopened.parts("sweep").done() == {"000000-L000"}
    assert reopened.manifest["steps"]["sweep"]["settings"] == {"batch_size": 4}

    (run.path / MANIFEST_NAME).write_text(json.dumps({**manifest, "steps": {"eval": manifest["steps"]["eval"]}}))
    assert Run.open(run.path).parts("sweep").done() == set()  # without its entry an old shard is not trusted


def test_corrupt_and_truncated_parts_are_reported_deleted_and_recomputed(
        run: Run, caplog: pytest.LogCaptureFixture) -> None:
    parts = run.parts("eval")
    for key in ("a", "b", "c", "d"):
        parts.write(key, _frame(k=ord(key)))
    whole = (parts.path / "b.parquet").read_bytes()
    (parts.path / "b.parquet").write_bytes(whole[: len(whole) // 2])  # truncated
    (parts.path / "c.parquet").write_bytes(b"not a parquet file at all")  # garbage
    (parts.path / "d.parquet").write_bytes(b"")  # empty

    with caplog.at_level("WARNING", logger="halluscope.runs"):
        assert parts.done() == {"a"}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line and "recomputed" in line for line in lines)
    assert {name for name in ("b", "c", "d") if any(f"{name}.parquet" in line for line in lines)} == {"b", "c", "d"}
    assert sorted(p.name for p in parts.path.iterdir()) == ["a.parquet"]
    assert parts.read_all()["k"].tolist() == [ord("a")] * 3
    with pytest.raises(RunError, match="no finished part 'b'"):
        parts.read("b")
    parts.write("b", _frame(k=1))
    assert parts.done() == {"a", "b"}


# ------------------------------------------------------------------------------------------ settings


def test_batch_size_is_a_setting_not_part_of_a_steps_identity(tmp_path: Path) -> None:
    path = tmp_path / "run"
    run = Run.create(path, step="eval", arguments={**EVAL_ARGS, "batch_size": 64}, model=MODEL)
    run.parts("eval").write("000000", _frame())
    again = Run.create(path, step="eval", arguments={**EVAL_ARGS, "batch_size": 8}, model=MODEL)
    assert again.resumed is True and again.parts("eval").done() == {"000000"}
    entry = again.manifest["steps"]["eval"]
    assert entry["settings"] == {"batch_size": 8} and "batch_size" not in entry["arguments"]

    assert again.begin_step("sweep", {"mode": "score", "batch_size": 16}) is False
    again.parts("sweep").write("000000-L000", _frame())
    assert Run.open(path).begin_step("sweep", {"mode": "score", "batch_size": 2}) is True
    assert again.parts("sweep").done() == {"000000-L000"}
    assert again.manifest["steps"]["sweep"]["settings"] == {"batch_size": 2}


# --------------------------------------------------------------------------------------------- force


def test_force_deletes_only_what_the_run_wrote(tmp_path: Path) -> None:
    path = tmp_path / "run"
    run = Run.create(path, step="eval", arguments=EVAL_ARGS, model=MODEL)
    run.write_table("baseline", _frame())
    (run.plots_dir / "eval.png").write_bytes(b"png")
    run.finish_step("eval")
    (path / "notes.txt").write_text("mine")
    (path / "plots" / "mine.png").write_bytes(b"mine")  # after the step: not the run's
    (path / "mine.parquet").write_bytes(b"mine")
    (path / ".baseline.parquet.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"killed write")

    sweep = Run.open(path)
    sweep.begin_step("sweep", {"mode": "score"})
    sweep.write_table("sweep", _frame())
    (sweep.plots_dir / "sweep.png").write_bytes(b"png")
    sweep.finish_step("sweep")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["steps"]["sweep"]["outputs"] += ["../outside.txt", str(tmp_path / "outside.txt")]  # hand-edited
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    (tmp_path / "outside.txt").write_text("outside")

    Run.open(path).begin_step("sweep", {"mode": "generate"}, force=True)
    assert not (path / "sweep.parquet").exists() and not (path / "plots" / "sweep.png").exists()
    assert (path / "baseline.parquet").exists() and (tmp_path / "outside.txt").read_text() == "outside"

    Run.create(path, step="eval", arguments={**EVAL_ARGS, "limit": 8}, model=MODEL, force=True)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) == [
        MANIFEST_NAME, "mine.parquet", "notes.txt", "plots", "plots/mine.png"]


# ---------------------------------------------------------------------------------------------- lock

_HOLD_LOCK = """
import sys, time
from halluscope.runs import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    """A second process holding the run's lock for `seconds` (returned once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_fails_in_one_line_naming_the_holder(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    run.finish_step("eval")
    monkeypatch.setattr(runs, "LOCK_WAIT_SECONDS", 0.3)
    holder = _hold(run.path, 60)
    try:
        for write in (lambda: Run.open(run.path).begin_step("sweep", {}), lambda: run.write_table("t", _frame()),
                      lambda: Run.create(run.path, step="eval", arguments=EVAL_ARGS, model=MODEL, force=True)):
            with pytest.raises(RunError) as err:
                write()
            message = str(err.value)
            assert f"is being written by pid {holder.pid}" in message and "-c" in message, message
            assert f"delete {run.path / runs.LOCK_NAME}" in message and "\n" not in message
        assert run.status("sweep") is None and not run.has_table("t")  # reading needs no lock
    finally:
        holder.kill()
        holder.wait()
    assert Run.open(run.path).begin_step("sweep", {}) is False  # the killed holder's lock is stale: taken over
    assert not (run.path / runs.LOCK_NAME).exists()


def test_a_writer_waits_briefly_for_the_holder_to_finish(run: Run) -> None:
    holder = _hold(run.path, 0.5)
    try:
        assert run.begin_step("sweep", {}) is False  # waits up to LOCK_WAIT_SECONDS (3 s)
    finally:
        holder.wait()
    assert holder.returncode == 0 and run.status("sweep") == "running"


def test_a_stale_lock_of_a_dead_process_is_taken_over(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = run.path / runs.LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": runs.socket.gethostname(), "command": "halluscope sweep",
                                "since": "then", "token": "old"}))
    with caplog.at_level("WARNING", logger="halluscope.runs"):
        assert run.begin_step("sweep", {}) is False
    assert f"from pid {dead.pid} (halluscope sweep), which is no longer running" in caplog.text
    assert not lock.exists()


def test_the_lock_is_held_for_a_whole_step_and_released_on_errors(run: Run) -> None:
    lock = run.path / runs.LOCK_NAME

    @runs.locked_step
    def failing_step(run_dir: Path) -> None:
        Run.open(run_dir).begin_step("sweep", {})
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["command"]
        raise ValueError("out of memory")

    with pytest.raises(ValueError, match="out of memory"):
        failing_step(run.path)
    assert not lock.exists()
    with pytest.raises(RunError, match="no run at"):
        failing_step(run.path / "nope")
