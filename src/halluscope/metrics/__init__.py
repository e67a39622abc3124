"""Metrics: prompt-induced hallucination (PIH) rates over run tables; POPE and CHAIR over any model's replies.

Names are re-exported lazily, so `import halluscope.metrics` costs nothing until a metric is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_PIH = [
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
_CHAIR = ["chair_ground_truth", "evaluate_chair", "extract_objects", "score_chair"]
_POPE = ["build_pope", "load_pope_questions", "parse_yes_no", "pope_metrics", "score_pope", "write_pope_questions"]
_OTHER = {"coco_vocabulary": "vocabulary", "load_vocabulary": "vocabulary", "load_nlp": "nlp", "image_objects": "coco"}

_LAZY = {
    **{name: "halluscope.metrics.pih" for name in _PIH},
    **{name: "halluscope.metrics.chair" for name in _CHAIR},
    **{name: "halluscope.metrics.pope" for name in _POPE},
    **{name: f"halluscope.metrics.{module}" for name, module in _OTHER.items()},
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'halluscope.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
