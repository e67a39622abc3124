"""The built wheel ships the organism: `load_vlm("organism")` works from a plain `pip install`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_organism_checkpoint(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("halluscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"halluscope/organism/checkpoint/{p.name}" for p in (ROOT / "src/halluscope/organism/checkpoint").iterdir()}
    assert shipped <= names, sorted(shipped - names)
    assert {"halluscope/organism/checkpoint/model.safetensors", "halluscope/tasks/README.md"} <= names
