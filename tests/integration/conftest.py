"""Helpers for running CLI commands end to end, in process (`cli`) or as a killable subprocess (`spawn`), and
one demo run shared by the tests that read a finished run (`demo_run`)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from halluscope.cli import main


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `halluscope ARGS...` in process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["halluscope", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def spawn():
    """Start `halluscope ARGS...` as a subprocess (so a test can kill -9 it)."""

    def start(*args: str) -> subprocess.Popen:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        # a test runner started in the background of a non-interactive shell ignores SIGINT, and the child would
        # inherit that; the command must meet Ctrl-C as a user's terminal sends it
        return subprocess.Popen([sys.executable, "-m", "halluscope", *map(str, args)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    return start


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """`halluscope demo --n 9` run once per session (the slowest command): (run directory, what it printed).

    Tests may add to the run (a rerun, `halluscope report`) but must not delete what the demo wrote.
    """
    out = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["demo", "--out", str(out), "--n", "9"])
    return out, printed.getvalue()
