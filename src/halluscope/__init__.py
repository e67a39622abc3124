"""halluscope: find why vision-language models hallucinate, and fix it.

The common things, in three lines:

    >>> import halluscope
    >>> vlm = halluscope.load_vlm("Qwen/Qwen2-VL-7B-Instruct")  # or "organism", the built-in tiny model
    >>> vlm.generate(vlm.encode([("dogs.jpg", "Describe the 7 dogs in this image.")]))  # any image path

Names are imported on first use, so `import halluscope` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HalluscopeError", "VLM", "decode", "evaluate", "load_vlm", "mitigate", "tasks"]

_LAZY = {
    "HalluscopeError": ("halluscope.errors", "HalluscopeError"),
    "VLM": ("halluscope.models.vlm", "VLM"),
    "load_vlm": ("halluscope.models.load", "load_vlm"),
    "evaluate": ("halluscope.evaluation", "evaluate"),
    "mitigate": ("halluscope.decoding.api", "mitigate"),
    "decode": ("halluscope.decoding.api", "decode"),
    "tasks": ("halluscope.tasks", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'halluscope' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
    return sorted(__all__)
