"""Figures of a run, written as PNG files: PIH rates by true value, base accuracy, before/after an
intervention, and layer x head heatmaps.

Figures are built with matplotlib's object API (`Figure` on an Agg canvas), never pyplot: no global
backend switch, no figure registry to leak or close, no display needed, safe in worker processes.
Each function takes a table (or array), writes one PNG, and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from halluscope.errors import InputError
from halluscope.metrics.pih import (
    base_accuracy,
    misleading_conditions,
    pih_rates,
    select_misleading,
    truth_sort_key,
)

__all__ = [
    "eval_plots",
    "plot_base_accuracy",
    "plot_before_after",
    "plot_head_heatmap",
    "plot_rate_by_truth",
]

PathLike = str | os.PathLike[str]

_RATE_LABELS = {
    "copy_rate": "copy (PIH) rate",
    "correction_rate": "correction rate",
    "other_rate": "other-answer rate",
    "none_rate": "no-answer rate",
    "negated_rate": "negated rate",
}
_TASK_LABELS = {"count": ("true count", "offset"), "color": ("true colour", "distractor")}


# -------------------------------------------------------------------------------------------- helpers


def _figure(width: float = 6.4, height: float = 4.2) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=120)
    fig.clear()  # free the artists now; the Figure is not registered anywhere, so nothing else to close
    return out


def _no_data(ax: Axes, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")


def _require(table: pd.DataFrame, columns: Sequence[str], what: str, fix: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{what} expects a pandas DataFrame, got {type(table).__name__}; {fix}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{what}: table lacks column(s) {missing} (has {list(table.columns)}); {fix}")


def _truth_axis(values: Sequence[Any]) -> tuple[dict[Any, float], list[Any], bool]:
    """x positions for truth values: the values themselves when all numeric, else 0..k-1 as categories."""
    truths = sorted(set(values), key=truth_sort_key)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in truths)
    positions = {v: float(v) if numeric else float(i) for i, v in enumerate(truths)}
    return positions, truths, numeric


def _set_truth_ticks(ax: Axes, positions: dict[Any, float], truths: list[Any], xlabel: str) -> None:
    ax.set_xticks([positions[t] for t in truths], [str(t) for t in truths])
    ax.set_xlabel(xlabel)


def _unit_y(ax: Axes, label: str) -> None:
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)


# -------------------------------------------------------------------------------------------- figures


def plot_rate_by_truth(
    rates: pd.DataFrame,
    path: PathLike,
    *,
    rate: str = "copy_rate",
    title: str | None = None,
    xlabel: str = "true value",
    legend_title: str = "condition",
    conditions: Sequence[str] | None = None,
) -> Path:
    """One line per misleading condition: `rate` (y, in [0, 1]) against the true value (x).

    Shows how the prompt-induced copy (or correction) rate depends on the true count/colour and offset.

    Args:
        rates: `pih_rates(df, by=("condition", "truth"))`.
        conditions: the conditions to draw; default all misleading ones, in numeric order.

    Raises:
        InputError: `rates` lacks `condition`, `truth` or `rate`.

    Example:
        >>> plot_rate_by_truth(pih_rates(baseline), run.plots_dir / "copy.png", xlabel="true count")
    """
    _require(rates, ["condition", "truth", rate], "plot_rate_by_truth", "pass pih_rates(df, by=('condition', 'truth'))")
    fig, ax = _figure()
    chosen = list(conditions) if conditions is not None else misleading_conditions(rates["condition"])
    shown = rates[rates["condition"].isin(chosen)]
    if shown.empty:
        _no_data(ax)
    else:
        positions, truths, numeric = _truth_axis(list(shown["truth"]))
        style = "-" if numeric else ":"  # categories (colours) are not a continuum
        for condition in chosen:
            sub = shown[shown["condition"] == condition]
            if sub.empty:
                continue
            ordered = sorted(zip(sub["truth"], sub[rate]), key=lambda tv: truth_sort_key(tv[0]))
            ax.plot([positions[t] for t, _ in ordered], [v for _, v in ordered], marker="o", linestyle=style, label=str(condition))
        _set_truth_ticks(ax, positions, truths, xlabel)
        ax.legend(title=legend_title, fontsize="small")
    _unit_y(ax, _RATE_LABELS.get(rate, rate))
    ax.set_title(title or f"{_RATE_LABELS.get(rate, rate)} by {xlabel}")
    return _save(fig, path)


def plot_base_accuracy(
    acc: pd.DataFrame, path: PathLike, *, title: str | None = None, xlabel: str = "true value"
) -> Path:
    """Bar chart of accuracy on the plain question per true value, each bar labelled with its n.

    Args:
        acc: `base_accuracy(df, by=("truth",))`.

    Raises:
        InputError: `acc` lacks `truth` or `accuracy`.
    """
    _require(acc, ["truth", "accuracy"], "plot_base_accuracy", "pass base_accuracy(df, by=('truth',))")
    fig, ax = _figure()
    if acc.empty:
        _no_data(ax)
    else:
        ordered = sorted(zip(acc["truth"], acc["accuracy"], acc.get("n", [None] * len(acc))), key=lambda r: truth_sort_key(r[0]))
        x = np.arange(len(ordered))
        bars = ax.bar(x, [r[1] for r in ordered], color="tab:blue")
        if "n" in acc.columns:
            ax.bar_label(bars, labels=[f"n={r[2]}" for r in ordered], fontsize="x-small")
        ax.set_xticks(x, [str(r[0]) for r in ordered])
        ax.set_xlabel(xlabel)
    _unit_y(ax, "base accuracy")
    ax.set_title(title or f"Base-question accuracy by {xlabel}")
    return _save(fig, path)


def _by_truth(rates: pd.DataFrame, rate: str, what: str) -> dict[Any, float]:
    _require(rates, ["truth", rate], "plot_before_after", "pass pih_rates(select_misleading(df), by=('truth',))")
    duplicated = rates["truth"][rates["truth"].duplicated()].tolist()  # tolist: plain Python values
    if duplicated:
        raise InputError(
            f"plot_before_after: {what} has several rows for truth {duplicated[0]!r}; expected one row per "
            "truth; pass pih_rates(select_misleading(df), by=('truth',))"
        )
    return dict(zip(rates["truth"], rates[rate]))


def plot_before_after(
    before_rates: pd.DataFrame,
    after_rates: pd.DataFrame,
    path: PathLike,
    *,
    rate: str = "copy_rate",
    title: str | None = None,
    labels: tuple[str, str] = ("before", "after"),
    xlabel: str = "true value",
) -> Path:
    """Grouped bars of `rate` per true value before vs after an intervention (e.g. a head ablation).

    Args:
        before_rates, after_rates: one row per truth, e.g. `pih_rates(select_misleading(df), by=("truth",))`.

    Raises:
        InputError: a table lacks `truth`/`rate` or has several rows for one truth.
    """
    before = _by_truth(before_rates, rate, "before_rates")
    after = _by_truth(after_rates, rate, "after_rates")
    fig, ax = _figure()
    truths = sorted(set(before) | set(after), key=truth_sort_key)
    if not truths:
        _no_data(ax)
    else:
        x = np.arange(len(truths))
        width = 0.4
        for offset, label, values in ((-width / 2, labels[0], before), (width / 2, labels[1], after)):
            ax.bar(x + offset, [values.get(t, np.nan) for t in truths], width, label=label)
        ax.set_xticks(x, [str(t) for t in truths])
        ax.set_xlabel(xlabel)
        ax.legend(fontsize="small")
    _unit_y(ax, _RATE_LABELS.get(rate, rate))
    ax.set_title(title or f"{_RATE_LABELS.get(rate, rate)} by {xlabel}: {labels[0]} vs {labels[1]}")
    return _save(fig, path)


def plot_head_heatmap(
    matrix: Any, path: PathLike, *, title: str | None = None, cbar_label: str | None = None
) -> Path:
    """Heatmap of a `[layer, head]` matrix, layer on the y axis (layer 0 at the top), NaN cells grey.

    Uses a diverging colour map centred on 0 when values have both signs (e.g. logit differences).

    Args:
        matrix: 2-D array-like `[layer, head]` (numpy array, nested lists, CPU tensor).

    Raises:
        InputError: `matrix` is not 2-D.
    """
    values = np.asarray(matrix, dtype="float64")
    if values.ndim != 2:
        raise InputError(
            f"plot_head_heatmap: matrix has shape {values.shape}; expected 2-D [layer, head]; "
            "reshape it, e.g. scores.reshape(n_layers, n_heads)"
        )
    n_layers, n_heads = values.shape
    fig, ax = _figure(min(max(3.0 + 0.22 * n_heads, 5.0), 14.0), min(max(1.5 + 0.2 * n_layers, 4.0), 12.0))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        _no_data(ax)
    else:
        lo, hi = float(finite.min()), float(finite.max())
        if lo < 0 < hi:
            bound = max(-lo, hi)
            cmap, vmin, vmax = "RdBu_r", -bound, bound
        else:
            cmap, vmin, vmax = "viridis", lo, hi
        cmap_nan_grey = colormaps[cmap].with_extremes(bad="lightgrey")  # NaN must not look like 0 (white)
        image = ax.imshow(
            np.ma.masked_invalid(values), cmap=cmap_nan_grey, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        fig.colorbar(image, ax=ax, label=cbar_label or "")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"{n_layers} layers x {n_heads} heads")
    return _save(fig, path)


def eval_plots(df: pd.DataFrame, plots_dir: PathLike) -> list[Path]:
    """The eval figures of a baseline table, per task: copy rate and correction rate by true value per
    misleading condition, and base-question accuracy by true value.

    Files are `<task>_copy_rate.png`, `<task>_correction_rate.png`, `<task>_base_accuracy.png` (no
    prefix when the table has no `task` column or no rows).

    Raises:
        InputError: the table lacks the columns `metrics.pih` needs.
    """
    _require(df, ["condition", "truth", "outcome"], "eval_plots", "pass the baseline table of `halluscope eval`")
    out_dir = Path(plots_dir)
    tasks: list[str | None] = (
        sorted(str(t) for t in df["task"].dropna().unique()) if "task" in df.columns else []
    ) or [None]
    paths: list[Path] = []
    for task in tasks:
        sub = df if task is None else df[df["task"].astype(str) == task]
        xlabel, legend_title = _TASK_LABELS.get(task or "", ("true value", "condition"))
        prefix = "" if task is None else f"{task}_"
        suffix = f" ({task})" if task and task not in _TASK_LABELS else ""
        rates = pih_rates(select_misleading(sub), by=("condition", "truth"))
        for rate, name in (("copy_rate", "Copy (PIH) rate"), ("correction_rate", "Correction rate")):
            paths.append(
                plot_rate_by_truth(
                    rates,
                    out_dir / f"{prefix}{rate}.png",
                    rate=rate,
                    title=f"{name} vs {xlabel}, per {legend_title}{suffix}",
                    xlabel=xlabel,
                    legend_title=legend_title,
                )
            )
        paths.append(
            plot_base_accuracy(
                base_accuracy(sub, by=("truth",)),
                out_dir / f"{prefix}base_accuracy.png",
                title=f"Base-question accuracy by {xlabel}{suffix}",
                xlabel=xlabel,
            )
        )
    return paths
