"""Every figure halluscope draws: the PNG figures of runs (`run_figures`), analyses (`analysis_figures`),
benchmarks (`bench_figures`) and ALEAHallu's located layers (`alea_figures`), their shared plumbing (`figure`, `intervals`), and the interactive HTML page of a
run (`interactive_figures`, `report_sections`, `html_report`).

Names are re-exported lazily, so `import halluscope.plots` loads neither matplotlib nor plotly until a figure
is drawn.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "run_figures": ["eval_plots", "plot_base_accuracy", "plot_before_after", "plot_head_heatmap",
                    "plot_rate_by_condition", "plot_rate_by_truth"],
    "analysis_figures": ["attention_plots", "plot_attention_map", "plot_layer_shares", "plot_lens",
                         "plot_probability_shift"],
    "bench_figures": ["plot_chair", "plot_comparison", "plot_pope"],
    "alea_figures": ["plot_differentials"],
    "intervals": ["mean_intervals", "wilson_interval", "with_intervals"],
    "html_report": ["render_report", "report_step"],
}
_LAZY = {name: f"halluscope.plots.{module}" for module, names in _MODULES.items() for name in names}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'halluscope.plots' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
