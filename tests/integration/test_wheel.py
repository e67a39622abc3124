"""The built wheel ships both organisms: `load_vlm("organism")` and `load_vlm("organism-scenes")` work from a plain
`pip install`."""

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
    for checkpoint in ("organism/checkpoint", "organism/scenes/checkpoint"):
        shipped = {f"halluscope/{checkpoint}/{p.name}" for p in (ROOT / "src/halluscope" / checkpoint).iterdir()}
        assert shipped <= names, sorted(shipped - names)
        assert f"halluscope/{checkpoint}/model.safetensors" in names
    assert "halluscope/tasks/README.md" in names
