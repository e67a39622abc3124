"""The built-in model organism: a tiny Qwen2-VL trained to show prompt-induced hallucination.

`load_vlm("organism")` loads the checkpoint shipped in `checkpoint/`; `train` rebuilds it from its recipe.
"""

from __future__ import annotations

from pathlib import Path

from halluscope.errors import ModelLoadError

__all__ = ["CHECKPOINT_DIR", "organism_path"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"


def organism_path() -> Path:
    """The directory of the shipped organism checkpoint."""
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise ModelLoadError(f"the organism checkpoint is missing from {CHECKPOINT_DIR}; reinstall halluscope or "
                             f"rebuild it with `halluscope organism train --out {CHECKPOINT_DIR}`")
    return CHECKPOINT_DIR
