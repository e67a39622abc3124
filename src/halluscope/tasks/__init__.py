"""Tasks: `Sample` records (image + prompt + truth + claim) and their builders, counting (CountBench + synthetic)
and colour (Visual-Counterfact + synthetic), behind one registry (`build_task`).

Names are imported on first use, so `import halluscope.tasks` loads neither pandas nor PIL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    # records
    "Sample",
    "SampleList",
    "SkippedRow",
    "SkippedRowsWarning",
    "samples_to_frame",
    "samples_from_frame",
    # registry
    "TaskSpec",
    "available_tasks",
    "build_task",
    "get_task",
    "register_task",
    # counting
    "DEFAULT_OFFSETS",
    "counting_samples",
    "load_countbench",
    "synthetic_counting",
    # colour
    "COLOR_CYCLE",
    "DEFAULT_DISTANCES",
    "color_samples",
    "load_visual_counterfact",
    "shift_color",
    "synthetic_color",
    # scenes
    "SHAPES",
    "color_scene",
    "count_scene",
]

_SOURCES = {
    "halluscope.tasks.sample": (
        "Sample",
        "SampleList",
        "SkippedRow",
        "SkippedRowsWarning",
        "samples_to_frame",
        "samples_from_frame",
    ),
    "halluscope.tasks.registry": ("TaskSpec", "available_tasks", "build_task", "get_task", "register_task"),
    "halluscope.tasks.counting": ("DEFAULT_OFFSETS", "counting_samples", "load_countbench", "synthetic_counting"),
    "halluscope.tasks.color": (
        "COLOR_CYCLE",
        "DEFAULT_DISTANCES",
        "color_samples",
        "load_visual_counterfact",
        "shift_color",
        "synthetic_color",
    ),
    "halluscope.tasks.scenes": ("SHAPES", "color_scene", "count_scene"),
}
_WHERE = {name: module for module, names in _SOURCES.items() for name in names}

if TYPE_CHECKING:
    from halluscope.tasks.color import (
        COLOR_CYCLE,
        DEFAULT_DISTANCES,
        color_samples,
        load_visual_counterfact,
        shift_color,
        synthetic_color,
    )
    from halluscope.tasks.counting import DEFAULT_OFFSETS, counting_samples, load_countbench, synthetic_counting
    from halluscope.tasks.registry import TaskSpec, available_tasks, build_task, get_task, register_task
    from halluscope.tasks.sample import (
        Sample,
        SampleList,
        SkippedRow,
        SkippedRowsWarning,
        samples_from_frame,
        samples_to_frame,
    )
    from halluscope.tasks.scenes import SHAPES, color_scene, count_scene


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'halluscope.tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
