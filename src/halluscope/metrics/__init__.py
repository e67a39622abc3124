"""Metrics over run tables: prompt-induced hallucination (PIH) rates now; POPE and CHAIR later.

Names are re-exported lazily, so `import halluscope.metrics` costs nothing until a metric is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BASE",
    "CONTROL",
    "OUTCOMES",
    "RATE_COLUMNS",
    "base_accuracy",
    "condition_order",
    "condition_sort_key",
    "misleading_conditions",
    "pih_rates",
    "relative_reduction",
    "select_misleading",
    "summarize",
    "truth_sort_key",
]

_LAZY = {name: "halluscope.metrics.pih" for name in __all__}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'halluscope.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
