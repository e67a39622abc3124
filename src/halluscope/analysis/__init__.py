"""Analyses over run tables: head ranking and head sets now; attention mass, token probabilities and the
logit lens later.

Names are re-exported lazily, so `import halluscope.analysis` costs nothing until an analysis is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_RANKING = [
    "best_k_sets",
    "correction_matrix",
    "head_rates",
    "rank_heads",
    "rank_report",
    "resolve_head_set",
    "top_k_sets",
]

__all__ = sorted(_RANKING)

_LAZY = {name: "halluscope.analysis.ranking" for name in _RANKING}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'halluscope.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
