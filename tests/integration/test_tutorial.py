"""`examples/tutorial.py` runs end to end on the built-in organism, offline, and prints every step's result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TUTORIAL = Path(__file__).resolve().parents[2] / "examples" / "tutorial.py"

#: One line per step of the tutorial, in the order it prints them.
SECTIONS = (
    "VLM('organism'",                                   # 1. the model and one misleading prompt
    "(truth 7) ->",
    "copy_rate  correction_rate",                       # 2. baseline copy rate by true count
    "correction_rate  copy_rate  rank",                 # 3. the single-head sweep, ranked
    "knocked out: '",                                   # 4. the top heads confirmed in generate mode
    "copy before  copy after",                          # 5. joint knockout
    "base counting accuracy",
    "attention from the answer position",               # 6. attention mass, intact vs knocked out
    "image_share  text_share  template_share  reply_share",
    "p(true count) and p(prompted count)",              # 7. answer probabilities vs alpha
    "p_truth  p_claim",
)


def test_tutorial_runs_and_prints_every_step(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(TUTORIAL)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    at = 0
    for line in SECTIONS:
        found = done.stdout.find(line, at)
        assert found >= 0, f"{line!r} missing (or out of order) in the tutorial's output:\n{done.stdout}"
        at = found + len(line)
