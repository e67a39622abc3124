"""The matplotlib plumbing every PNG figure shares: a figure on its own Agg canvas, saving, the "nothing to
draw" panel, input checks, titles that fit, series that do not hide each other, and the axis names.

Figures use matplotlib's object API (`Figure` on an Agg canvas), never pyplot: no global backend switch, no
figure registry to leak or close, no display needed, safe in worker processes.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from halluscope.errors import InputError

__all__ = [
    "MARKERS",
    "NEGLIGIBLE",
    "PathLike",
    "RATE_LABELS",
    "axis_labels",
    "caption",
    "dodge",
    "draw_no_data",
    "fitted_title",
    "is_negligible",
    "new_figure",
    "new_panels",
    "require_columns",
    "save_png",
    "set_titles",
]

PathLike = str | os.PathLike[str]

#: Values whose magnitude stays below this everywhere in a panel are drawn as a message, not as curves: a
#: probability of 1e-6 (an answer form the model never uses) plotted on its own scale looks like a signal.
NEGLIGIBLE = 1e-3
#: Marker per series, so that series which coincide stay distinguishable without colour.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

RATE_LABELS = {
    "copy_rate": "copy (PIH) rate",
    "correction_rate": "correction rate",
    "other_rate": "other-answer rate",
    "none_rate": "no-answer rate",
    "negated_rate": "negated rate",
    "accuracy": "base accuracy",
}
_TASK_AXES = {"count": ("true count", "offset"), "color": ("true colour", "distractor")}


def axis_labels(task: str | None) -> tuple[str, str]:
    """The names of the truth axis and the condition axis of a task, used by every figure alike.

    Example:
        >>> axis_labels("count")
        ('true count', 'offset')
    """
    return _TASK_AXES.get(task or "", ("true value", "condition"))


def new_figure(width: float = 6.4, height: float = 4.2) -> tuple[Figure, Axes]:
    """A one-panel figure on its own Agg canvas, laid out so that labels are not cut."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def new_panels(n_panels: int, width: float = 4.2, height: float = 3.6, rows: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of `n_panels` panels in `rows` rows, each `width` x `height` inches."""
    cols = max(1, -(-n_panels // rows))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False).ravel().tolist()


def save_png(fig: Figure, path: PathLike) -> Path:
    """Write `fig` to `path` as a 120-dpi PNG (parents created) and free its artists; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    fig.clear()  # the Figure is registered nowhere, so clearing it is all the cleanup there is
    return out


def draw_no_data(ax: Axes, message: str = "no data") -> None:
    """Write `message` in the middle of an empty panel, so a missing curve is never mistaken for zero."""
    ax.text(0.5, 0.5, textwrap.fill(message, 40), ha="center", va="center", transform=ax.transAxes, color="grey")


def require_columns(table: pd.DataFrame, columns: Sequence[str], what: str, fix: str) -> None:
    """Raise InputError unless `table` is a DataFrame with every column in `columns`.

    Raises:
        InputError: naming the function (`what`), the missing columns, the present ones and `fix`.
    """
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{what} expects a pandas DataFrame, got {type(table).__name__}; {fix}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{what}: table lacks column(s) {missing} (has {list(table.columns)}); {fix}")


def fitted_title(fig: Figure, text: str, *, size: float = 12.0) -> str:
    """`text` wrapped to the figure's width (at `size` points), so a long head list or prompt is not clipped."""
    width_points = fig.get_figwidth() * 72
    return textwrap.fill(text, max(20, int(width_points / (0.55 * size))))


def set_titles(fig: Figure, title: str, note: str | None = None, ax: Axes | None = None) -> None:
    """The figure's title, wrapped to fit, and a smaller grey `note` under it (on `ax`, or the figure's
    bottom edge when there is no single panel): the n and interval of the values shown."""
    fig.suptitle(fitted_title(fig, title))
    if note and ax is not None:
        ax.set_title(note, fontsize="small", color="dimgray")
    elif note:
        fig.supxlabel(note, fontsize="small", color="dimgray")


def caption(n: Sequence[Any], what: str = "prompts per point", interval: str | None = "95% Wilson interval") -> str:
    """One line saying how many observations each plotted value rests on and what the error bars are.

    Example:
        >>> caption([36, 36])
        'n = 36 prompts per point; bars: 95% Wilson interval'
    """
    counts = sorted({int(v) for v in n if pd.notna(v)})
    if not counts:
        text = f"n = 0 {what}"
    elif len(counts) == 1:
        text = f"n = {counts[0]} {what}"
    else:
        text = f"n = {counts[0]}-{counts[-1]} {what}"
    return text + (f"; bars: {interval}" if interval else "")


def dodge(n_series: int, spacing: float = 1.0, share: float = 0.5) -> list[float]:
    """x offsets that spread `n_series` series over `share` of the gap between x positions, centred on 0,
    so points and error bars of series with equal values sit side by side instead of on top of each other.

    Example:
        >>> dodge(3)
        [-0.125, 0.0, 0.125]
    """
    if n_series < 2:
        return [0.0] * n_series
    step = spacing * share / n_series
    return [(i - (n_series - 1) / 2) * step for i in range(n_series)]


def is_negligible(values: Any, floor: float = NEGLIGIBLE) -> bool:
    """True when every finite value is below `floor` in magnitude (or there is none): a panel of noise."""
    array = np.asarray(values, dtype="float64")
    finite = array[np.isfinite(array)]
    return finite.size == 0 or float(np.abs(finite).max()) < floor
