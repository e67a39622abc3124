"""How the `halluscope` command line fails: usage errors, `--version`, bare `halluscope`, Ctrl-C (in process and
with a real SIGINT), OSErrors from the run directory, and out-of-range numeric options, which every command
rejects before anything is recorded in a run directory. Also: progress is logged as plain lines when stderr is
not a terminal."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import time
from importlib.metadata import version
from pathlib import Path

import pytest

EVAL = ("--task", "count", "--data", "synthetic", "--n", "2", "--offsets", "1", "--max-new-tokens", "6")


@pytest.fixture(scope="module")
def model(tiny_dirs) -> Path:
    return tiny_dirs["qwen2_vl"]


@pytest.fixture(scope="module")
def eval_run(model, tmp_path_factory) -> Path:
    """A finished eval run of the tiny qwen2_vl that no test may change."""
    from halluscope.steps import eval_step

    run = tmp_path_factory.mktemp("runs") / "count"
    eval_step(run, model=str(model), task="count", data="synthetic", n=2, offsets=(1,), max_new_tokens=6)
    return run


@pytest.fixture
def run(eval_run, tmp_path) -> Path:
    """A private copy of the eval run, so that a command a test wrongly lets through cannot affect another."""
    return Path(shutil.copytree(eval_run, tmp_path / "run"))


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- usage errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (("eval", "--n", "abc"), "Invalid value for '--n'"),
    (("eval", "--model", "m", "--out", "o", "--batch-size", "x"), "'--batch-size'"),
    (("eval", "--bogus"), "No such option: --bogus"),
    (("rank",), "Missing option '--run'"),
    (("nope",), "No such command 'nope'"),
    (("sweep", "--run", "r", "--mode"), "'--mode' requires an argument"),
    (("organism", "train", "--steps", "many"), "Invalid value for '--steps'"),
    (("probs", "--run", "r", "--heads", "L0H1", "--alphas"), "'--alphas' requires an argument"),
])
def test_usage_errors_are_one_line(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert line.startswith("error: ") and message in line, line


def test_a_bad_value_is_quoted_with_the_commands_help(cli):
    code, _, err = cli("rank", "--run", "r", "--top=-1")
    line = _one_error_line(err)
    assert code == 2 and "'--top'" in line and "(got '-1')" in line and "`halluscope rank --help`" in line


@pytest.mark.parametrize("args", [(), ("organism",)])
def test_bare_command_prints_help_and_exits_2(cli, args):
    code, out, err = cli(*args)
    assert code == 2 and "Usage: halluscope" in out + err and "Traceback" not in err


def test_version(cli):
    assert cli("--version") == (0, f"halluscope {version('halluscope')}\n", "")


def test_help_exits_0(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "--version" in out and "eval" in out


# ---- Ctrl-C ---------------------------------------------------------------------------------------------
def test_keyboard_interrupt_exits_130(cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("halluscope.steps.rank_step", interrupted)
    code, _, err = cli("rank", "--run", "r")
    assert code == 130 and _one_error_line(err) == "interrupted; rerun to resume"


def test_sigint_half_way_exits_130_and_the_rerun_resumes(cli, spawn, model, tmp_path):
    args = ("eval", "--model", model, "--task", "count", "--data", "synthetic", "--n", "20", "--offsets", "1,2",
            "--max-new-tokens", "10", "--batch-size", "4", "--out", tmp_path / "run")
    proc, parts = spawn(*args), tmp_path / "run" / "parts" / "eval"
    end = time.time() + 120
    while proc.poll() is None and time.time() < end and not (parts.is_dir() and any(parts.glob("*.parquet"))):
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"eval ended before a shard appeared: {proc.communicate()}")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted; rerun to resume"
    code, _, err = cli(*args)
    assert code == 0, err


# ---- OSErrors -------------------------------------------------------------------------------------------
def test_a_file_where_the_run_directory_should_be(cli, model, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    code, _, err = cli("eval", "--model", model, *EVAL, "--out", blocker / "count")
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: ") and str(blocker) in line, line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_directory(cli, model, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    try:
        code, _, err = cli("eval", "--model", model, *EVAL, "--out", parent / "count")
    finally:
        parent.chmod(0o755)
    line = _one_error_line(err)
    assert code == 2 and str(parent) in line, line


@pytest.mark.parametrize("error, fix", [
    (PermissionError(errno.EACCES, "Permission denied", "/runs/count/heads.json"), "check its permissions"),
    (OSError(errno.EROFS, "Read-only file system", "/runs/count/heads.json"), "read-only"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/count/heads.json"), "a file sits where"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/count/heads.json"), "rerun to resume"),
])
def test_oserrors_name_the_path_and_the_fix(cli, monkeypatch, error, fix):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("halluscope.steps.rank_step", fail)
    code, _, err = cli("rank", "--run", "/runs/count")
    line = _one_error_line(err)
    assert code == 2 and "'/runs/count/heads.json'" in line and error.strerror in line and fix in line, line


# ---- numeric options: rejected before anything is recorded ------------------------------------------------
BAD_OPTIONS = [
    ("means", "--batch-size", "0"),
    ("sweep", "--batch-size", "0"), ("sweep", "--max-new-tokens", "0"),
    ("rank", "--top", "0"), ("rank", "--top", "-1"),
    ("confirm", "--batch-size", "-4"), ("confirm", "--max-new-tokens", "0"),
    ("ablate", "--heads", "L0H1", "--batch-size", "0"), ("ablate", "--heads", "L0H1", "--alpha", "nan"),
    ("ablate", "--heads", "L0H1", "--alpha", "inf"),
    ("attention", "--heads", "L0H1", "--limit", "0"), ("attention", "--heads", "L0H1", "--max-new-tokens", "0"),
    ("attention-maps", "--heads", "L0H1", "--samples", "0"),
    ("probs", "--heads", "L0H1", "--limit", "-1"), ("probs", "--heads", "L0H1", "--max-new-tokens", "0"),
    ("probs", "--heads", "L0H1", "--alphas", "0,nan"),
    ("lens", "--limit", "0"), ("lens", "--max-new-tokens", "0"),
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=" ".join)
def test_bad_numbers_change_nothing_in_the_run(cli, run, args):
    before = _snapshot(run)
    command, *options = args
    code, _, err = cli(command, "--run", run, *options)
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: ") and options[-2].lstrip("-").split("-")[0] in line, line
    assert _snapshot(run) == before


@pytest.mark.parametrize("option, value", [("--n", "0"), ("--n", "-2"), ("--batch-size", "0"),
                                           ("--max-new-tokens", "0")])
def test_bad_numbers_create_no_eval_run(cli, model, tmp_path, option, value):
    code, _, err = cli("eval", "--model", model, *EVAL, option, value, "--out", tmp_path / "run")
    assert code == 2 and option in _one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args", [("organism", "train", "--out", "{tmp}/o", "--steps", "0"),
                                  ("organism", "train", "--out", "{tmp}/o", "--threads", "0"),
                                  ("demo", "--out", "{tmp}/o", "--n", "0")], ids=" ".join)
def test_bad_numbers_of_organism_and_demo_write_nothing(cli, tmp_path, args):
    code, _, err = cli(*(a.format(tmp=tmp_path) for a in args))
    assert code == 2 and args[-2] in _one_error_line(err)
    assert not (tmp_path / "o").exists()


# ---- progress on a non-terminal stderr --------------------------------------------------------------------
def test_progress_is_logged_as_lines_when_stderr_is_not_a_terminal(cli, model, tmp_path):
    code, _, err = cli("eval", "--model", model, *EVAL, "--out", tmp_path / "run")
    assert code == 0, err
    assert re.search(r"^eval: (\d+)/\1 \(100%\) \d+:\d\d:\d\d elapsed$", err, re.MULTILINE), err
    assert "━" not in err and "\r" not in err and "\x1b[" not in err  # no rich bar, no cursor moves
