"""The README's Python quickstart, read from the README and run: as written on the built-in organism, and its
first block (load, encode, generate) on every family's tiny checkpoint in place of the model name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from halluscope.models.tiny import TINY_FAMILIES

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL = '"organism"'


def quickstart_blocks() -> list[str]:
    """The Python code blocks of the README's "Python quickstart" section, in order."""
    section = README.read_text(encoding="utf-8").split("\n## Python quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert blocks, "the README's Python quickstart has no python code block"
    assert blocks[0].count(MODEL) == 1, f"the quickstart's first block should load the model {MODEL} once"
    return blocks


def run_printing(code: str) -> list[tuple]:
    """Run `code` in a fresh namespace; returns the arguments of each `print` call."""
    printed: list[tuple] = []
    exec(compile(code, str(README), "exec"), {"print": lambda *args: printed.append(args)})
    return printed


def assert_one_reply(printed: list[tuple], model: str) -> None:
    assert len(printed) == 1, "the quickstart prints the model's replies once"
    (replies,) = printed[0]
    assert isinstance(replies, list) and len(replies) == 1
    assert isinstance(replies[0], str) and replies[0].strip(), f"empty reply from {model}: {replies!r}"


def test_python_quickstart_runs_as_written_on_the_organism():
    assert_one_reply(run_printing("\n".join(quickstart_blocks())), "organism")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_python_quickstart_replies_on_every_family(family, tiny_dirs):
    code = quickstart_blocks()[0].replace(MODEL, repr(str(tiny_dirs[family])))
    assert_one_reply(run_printing(code), family)
