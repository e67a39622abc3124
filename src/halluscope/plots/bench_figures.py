"""Figures of a benchmark's comparison table (`halluscope bench`): one group of bars per POPE split or CHAIR
metric, one bar per method, each bar labelled with its value."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from halluscope.plots.figure import PathLike, caption, new_figure, new_panels, require_columns, save_png, set_titles

__all__ = ["plot_chair", "plot_comparison", "plot_pope"]

_FIX = "pass the comparison table `halluscope bench` writes"


def _bars(ax: Axes, groups: Sequence[str], methods: Sequence[str], value: pd.DataFrame, label: str) -> None:
    """Bars of `value` (index: method, columns: group), grouped by column, with their values written above."""
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        x = [g + (k - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        heights = [float(value.at[method, group]) for group in groups]
        bars = ax.bar(x, heights, width=width, label=method)
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize="x-small", padding=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)


def plot_pope(table: pd.DataFrame, path: PathLike, *, title: str, n_per_split: int) -> Path:
    """POPE accuracy and yes-ratio per split, one bar per method; returns the PNG's path.

    Raises:
        InputError: `table` lacks method, split, accuracy or yes_ratio.
    """
    require_columns(table, ["method", "split", "accuracy", "yes_ratio"], "plot_pope", _FIX)
    methods, splits = list(dict.fromkeys(table["method"])), list(dict.fromkeys(table["split"]))
    fig, axes = new_panels(2, width=max(4.2, 1.4 * len(splits) * max(1, len(methods)) / 2), height=3.8)
    for ax, column, label in zip(axes, ("accuracy", "yes_ratio"), ("accuracy", "yes ratio (0.5 = balanced)")):
        _bars(ax, splits, methods, table.pivot(index="method", columns="split", values=column), label)
    axes[0].legend(fontsize="small", loc="lower left")
    set_titles(fig, title, caption([n_per_split], "questions per bar", interval=None))
    return save_png(fig, path)


def plot_chair(table: pd.DataFrame, path: PathLike, *, title: str, n_captions: int) -> Path:
    """CHAIR_s, CHAIR_i and recall, one bar per method; returns the PNG's path.

    Raises:
        InputError: `table` lacks method, chair_s, chair_i or recall.
    """
    metrics = ["chair_s", "chair_i", "recall"]
    require_columns(table, ["method", *metrics], "plot_chair", _FIX)
    methods = list(dict.fromkeys(table["method"]))
    fig, ax = new_figure(width=max(5.0, 1.2 * len(metrics) * max(1, len(methods)) / 2), height=3.8)
    _bars(ax, metrics, methods, table.set_index("method")[metrics], "fraction (CHAIR: lower is better)")
    ax.legend(fontsize="small", loc="upper left")
    set_titles(fig, title, caption([n_captions], "captions per bar", interval=None), ax=ax)
    return save_png(fig, path)


def plot_comparison(table: pd.DataFrame, path: PathLike, *, title: str, note: str) -> Path:
    """Each arm's change from the baseline (the first arm) with its interval, one panel per metric; returns the
    PNG's path.

    Raises:
        InputError: `table` lacks the columns `halluscope bench compare` writes.
    """
    require_columns(table, ["arm", "metric", "change", "change_low", "change_high"], "plot_comparison",
                    "pass the table `halluscope bench compare` writes")
    shown = table[table["arm"] != table["arm"].iloc[0]]
    metrics = list(dict.fromkeys(shown["metric"]))
    fig, axes = new_panels(len(metrics), width=3.2, height=1.2 + 0.35 * len(shown) / max(1, len(metrics)))
    for ax, metric in zip(axes, metrics):
        rows = shown[shown["metric"] == metric]
        labels = [f"{a} ({s})" for a, s in zip(rows["arm"], rows["split"])] if "split" in rows else list(rows["arm"])
        y = list(range(len(rows)))[::-1]
        errors = np.clip([rows["change"] - rows["change_low"], rows["change_high"] - rows["change"]], 0, None)
        ax.errorbar(rows["change"], y, xerr=errors, fmt="o", capsize=3)
        ax.axvline(0.0, color="grey", linewidth=0.8)
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(y), fontsize="small")
        ax.set_title(metric, fontsize="medium")
        ax.set_xlabel("change")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
    set_titles(fig, title, note)
    return save_png(fig, path)
