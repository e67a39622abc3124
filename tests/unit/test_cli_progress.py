"""`halluscope.cli.progress_bar`: plain log lines, at most one per interval and one at the end, when the
stream is not a terminal (log files, CI, pipes); a rich live bar when it is."""

from __future__ import annotations

import io
import re

import pytest

from halluscope.cli import progress_bar

LINE = re.compile(r"^sweep \(score\): (\d+)/480 \((\d+)%\) (\d+):(\d\d):(\d\d) elapsed$")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_at_most_every_interval_and_at_the_end():
    stream, clock = io.StringIO(), Clock()
    with progress_bar("sweep (score)", 480, stream=stream, interval=5.0, clock=clock) as advance:
        for _ in range(48):  # 48 steps of 10 items, 1 s apart: one line per 5 s
            clock.now += 1.0
            advance(10)
    lines = stream.getvalue().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert lines[0] == "sweep (score): 50/480 (10%) 0:00:05 elapsed"
    assert lines[-1] == "sweep (score): 480/480 (100%) 0:00:48 elapsed"
    assert len(lines) == 10  # at 5, 10, ..., 45 s, then the end


def test_fast_progress_prints_only_the_final_line():
    stream, clock = io.StringIO(), Clock()
    with progress_bar("eval", 6, stream=stream, clock=clock) as advance:
        for _ in range(6):
            advance()
    assert stream.getvalue() == "eval: 6/6 (100%) 0:00:00 elapsed\n"


def test_no_final_line_when_the_body_fails():
    """An error message stays the last (and only) line on stderr."""
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with progress_bar("eval", 6, stream=stream, clock=Clock()) as advance:
            advance(2)
            raise KeyboardInterrupt
    assert stream.getvalue() == ""


def test_nothing_for_an_empty_total():
    stream = io.StringIO()
    with progress_bar("eval", 0, stream=stream) as advance:
        advance(0)
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_rich_bar():
    stream = Terminal()
    with progress_bar("building", 3, stream=stream) as advance:
        for _ in range(3):
            advance()
    text = stream.getvalue()
    assert "building" in text and "3/3" in text
    assert not re.search(r"\d+/3 \(\d+%\) .* elapsed", text)  # not the log-line format
