"""The built-in model organisms: tiny Qwen2-VLs trained to show one kind of hallucination each.

`load_vlm("organism")` loads the prompt-induced-hallucination organism shipped in `checkpoint/`,
`load_vlm("organism-scenes")` the object-hallucination organism shipped in `scenes/checkpoint/`; `train` rebuilds
either from its recipe (`kinds.py` lists the kinds).
"""

from __future__ import annotations

from pathlib import Path

from halluscope.errors import ModelLoadError
from halluscope.organism.kinds import KINDS, kind_for_name

__all__ = ["CHECKPOINT_DIR", "MODEL_NAMES", "organism_path"]

#: The PIH organism's checkpoint directory.
CHECKPOINT_DIR = KINDS["pih"].checkpoint
#: What `load_vlm` takes to load a shipped organism.
MODEL_NAMES: tuple[str, ...] = tuple(kind.model_name for kind in KINDS.values())


def organism_path(name: str = "organism") -> Path:
    """The directory of the shipped organism that `load_vlm(name)` loads.

    Raises:
        ModelLoadError: `name` is no organism, or its checkpoint is missing.
    """
    kind = kind_for_name(name)
    if kind is None:
        raise ModelLoadError(f"{name!r} is not a built-in organism; use one of {', '.join(MODEL_NAMES)}")
    if not (kind.checkpoint / "config.json").is_file():
        raise ModelLoadError(f"the {name} checkpoint is missing from {kind.checkpoint}; reinstall halluscope or "
                             f"rebuild it with `halluscope organism train --kind {kind.name} --out {kind.checkpoint}`")
    return kind.checkpoint
