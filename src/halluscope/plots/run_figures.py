"""Figures of a run's outcome tables, written as PNG files: PIH rates by true value and by offset, base
accuracy, before/after an intervention, and layer x head heatmaps.

Every rate is drawn with its 95% Wilson interval and says how many prompts it rests on; series that coincide
are set side by side with their own markers, so none hides another. Each function takes a table (or array),
writes one PNG, and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from halluscope.errors import InputError
from halluscope.metrics.pih import (
    base_accuracy,
    misleading_conditions,
    pih_rates,
    select_misleading,
    truth_sort_key,
)
from halluscope.plots.figure import (
    MARKERS,
    RATE_LABELS,
    PathLike,
    axis_labels,
    caption,
    dodge,
    draw_no_data,
    new_figure,
    require_columns,
    save_png,
    set_titles,
)
from halluscope.plots.intervals import with_intervals

__all__ = [
    "eval_plots",
    "plot_base_accuracy",
    "plot_before_after",
    "plot_head_heatmap",
    "plot_rate_by_condition",
    "plot_rate_by_truth",
]

#: Cells of a heatmap at most this many get their value written in them.
_ANNOTATE_CELLS = 256


# -------------------------------------------------------------------------------------------- helpers


def _truth_axis(values: Sequence[Any]) -> tuple[dict[Any, float], list[Any], bool]:
    """x positions for truth values: the values themselves when all numeric, else 0..k-1 as categories."""
    truths = sorted(set(values), key=truth_sort_key)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in truths)
    positions = {v: float(v) if numeric else float(i) for i, v in enumerate(truths)}
    return positions, truths, numeric


def _spacing(positions: Sequence[float]) -> float:
    """The smallest gap between neighbouring x positions (1 for a single one)."""
    gaps = np.diff(sorted(set(positions)))
    return float(gaps.min()) if gaps.size else 1.0


def _unit_y(ax: Axes, label: str) -> None:
    ax.set_ylim(-0.03, 1.06)
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)


def _draw_series(ax: Axes, x: Sequence[float], rows: pd.DataFrame, rate: str, index: int, label: str,
                 linestyle: str) -> None:
    """One series of rates with its Wilson interval as error bars."""
    values = rows[rate].to_numpy(dtype="float64")
    low = values - rows[f"{rate}_low"].to_numpy(dtype="float64")
    high = rows[f"{rate}_high"].to_numpy(dtype="float64") - values
    ax.errorbar(x, values, yerr=[low, high], marker=MARKERS[index % len(MARKERS)], linestyle=linestyle,
                capsize=2.5, markersize=5, linewidth=1.4, alpha=0.9, label=label)


def _counts_differ(n: Sequence[Any]) -> bool:
    """Whether bars rest on different numbers of prompts (then each says its n; a shared n is said once, in the
    caption)."""
    return len({int(v) for v in n if pd.notna(v)}) > 1


def _bars_with_intervals(ax: Axes, x: np.ndarray, rows: pd.DataFrame, rate: str, width: float, label: str | None,
                         colour: str | None = None, *, label_counts: bool = False) -> None:
    """Bars of `rate` with their Wilson intervals as error bars, and each bar's n over it if `label_counts`."""
    values = rows[rate].to_numpy(dtype="float64")
    errors = [values - rows[f"{rate}_low"].to_numpy(dtype="float64"),
              rows[f"{rate}_high"].to_numpy(dtype="float64") - values]
    bars = ax.bar(x, values, width, label=label, color=colour, yerr=errors, capsize=2.5,
                  error_kw={"elinewidth": 1, "ecolor": "black", "alpha": 0.7})
    if label_counts:
        ax.bar_label(bars, labels=[f"n={int(v)}" if pd.notna(v) else "" for v in rows["n"]], fontsize="x-small",
                     padding=2)


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
    """One line per misleading condition: `rate` (y, in [0, 1], with its 95% Wilson interval) against the true
    value (x).

    Shows how the prompt-induced copy (or correction) rate depends on the true count/colour and offset.

    Args:
        rates: `pih_rates(df, by=("condition", "truth"))`.
        conditions: the conditions to draw; default all misleading ones, in numeric order.

    Raises:
        InputError: `rates` lacks `condition`, `truth`, `n` or `rate`.

    Example:
        >>> plot_rate_by_truth(pih_rates(baseline), run.plots_dir / "copy.png", xlabel="true count")
    """
    require_columns(rates, ["condition", "truth", "n", rate], "plot_rate_by_truth",
                    "pass pih_rates(df, by=('condition', 'truth'))")
    fig, ax = new_figure()
    chosen = list(conditions) if conditions is not None else misleading_conditions(rates["condition"])
    shown = with_intervals(rates[rates["condition"].isin(chosen)], [rate])
    label = RATE_LABELS.get(rate, rate)
    if shown.empty:
        draw_no_data(ax)
    else:
        positions, truths, numeric = _truth_axis(list(shown["truth"]))
        drawn = [c for c in chosen if (shown["condition"] == c).any()]
        offsets = dodge(len(drawn), _spacing(list(positions.values())))
        for i, condition in enumerate(drawn):
            sub = shown[shown["condition"] == condition]
            sub = sub.iloc[sorted(range(len(sub)), key=lambda j: truth_sort_key(sub["truth"].iloc[j]))]
            x = [positions[t] + offsets[i] for t in sub["truth"]]
            _draw_series(ax, x, sub, rate, i, str(condition), "-" if numeric else ":")  # colours are no continuum
        ax.set_xticks([positions[t] for t in truths], [str(t) for t in truths])
        ax.legend(title=legend_title, fontsize="small", ncols=2 if len(drawn) > 4 else 1)
    ax.set_xlabel(xlabel)
    _unit_y(ax, label)
    set_titles(fig, title or f"{label} by {xlabel}, per {legend_title}", caption(shown["n"]), ax)
    return save_png(fig, path)


def plot_rate_by_condition(
    series: Mapping[str, pd.DataFrame],
    path: PathLike,
    *,
    rate: str = "copy_rate",
    title: str | None = None,
    xlabel: str = "offset",
) -> Path:
    """`rate` per misleading condition (the offset of the prompted count), one line per setting (baseline,
    each ablation), pooled over true values, with 95% Wilson intervals.

    Args:
        series: label -> `pih_rates(select_misleading(df), by=("condition",))`, e.g. {"baseline": ...}.

    Raises:
        InputError: a table lacks `condition`, `n` or `rate`; no series given.

    Example:
        >>> plot_rate_by_condition({"baseline": pih_rates(select_misleading(df), by=("condition",))}, "c.png")
    """
    if not series:
        raise InputError("plot_rate_by_condition() got no series; pass {'baseline': pih_rates(...)}")
    for name, table in series.items():
        require_columns(table, ["condition", "n", rate], f"plot_rate_by_condition ({name})",
                        "pass pih_rates(select_misleading(df), by=('condition',))")
    fig, ax = new_figure()
    label = RATE_LABELS.get(rate, rate)
    conditions = misleading_conditions(pd.concat([t["condition"] for t in series.values()]))
    position = {c: float(i) for i, c in enumerate(conditions)}
    offsets = dodge(len(series))
    counts: list[Any] = []
    for i, (name, table) in enumerate(series.items()):
        rows = with_intervals(table[table["condition"].isin(conditions)], [rate])
        rows = rows.iloc[sorted(range(len(rows)), key=lambda j: position[rows["condition"].iloc[j]])]
        counts += rows["n"].tolist()
        if not rows.empty:
            _draw_series(ax, [position[c] + offsets[i] for c in rows["condition"]], rows, rate, i, name, "-")
    if conditions:
        ax.set_xticks(list(position.values()), conditions)
        ax.legend(fontsize="small")
    else:
        draw_no_data(ax)
    ax.set_xlabel(xlabel)
    _unit_y(ax, label)
    set_titles(fig, title or f"{label} by {xlabel}", caption(counts), ax)
    return save_png(fig, path)


def plot_base_accuracy(
    acc: pd.DataFrame, path: PathLike, *, title: str | None = None, xlabel: str = "true value"
) -> Path:
    """Bar chart of accuracy on the plain question per true value, each bar with its n and 95% interval.

    Args:
        acc: `base_accuracy(df, by=("truth",))`.

    Raises:
        InputError: `acc` lacks `truth`, `n` or `accuracy`.
    """
    require_columns(acc, ["truth", "n", "accuracy"], "plot_base_accuracy", "pass base_accuracy(df, by=('truth',))")
    fig, ax = new_figure()
    rows = with_intervals(acc, ["accuracy"])
    if rows.empty:
        draw_no_data(ax)
    else:
        rows = rows.iloc[sorted(range(len(rows)), key=lambda j: truth_sort_key(rows["truth"].iloc[j]))]
        x = np.arange(len(rows))
        _bars_with_intervals(ax, x, rows, "accuracy", 0.7, None, "tab:blue", label_counts=_counts_differ(rows["n"]))
        ax.set_xticks(x, [str(t) for t in rows["truth"]])
    ax.set_xlabel(xlabel)
    _unit_y(ax, "base accuracy")
    set_titles(fig, title or f"base-question accuracy by {xlabel}", caption(rows["n"], "prompts per bar"), ax)
    return save_png(fig, path)


def _by_truth(rates: pd.DataFrame, rate: str, what: str) -> pd.DataFrame:
    require_columns(rates, ["truth", "n", rate], "plot_before_after",
                    "pass pih_rates(select_misleading(df), by=('truth',))")
    duplicated = rates["truth"][rates["truth"].duplicated()].tolist()  # tolist: plain Python values
    if duplicated:
        raise InputError(
            f"plot_before_after: {what} has several rows for truth {duplicated[0]!r}; expected one row per "
            "truth; pass pih_rates(select_misleading(df), by=('truth',))"
        )
    return with_intervals(rates, [rate]).set_index("truth")


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
    """Grouped bars of `rate` per true value before vs after an intervention (e.g. a head ablation), each bar
    with its n and 95% Wilson interval.

    Args:
        before_rates, after_rates: one row per truth, e.g. `pih_rates(select_misleading(df), by=("truth",))`.

    Raises:
        InputError: a table lacks `truth`/`n`/`rate` or has several rows for one truth.
    """
    before = _by_truth(before_rates, rate, "before_rates")
    after = _by_truth(after_rates, rate, "after_rates")
    fig, ax = new_figure(7.2, 4.4)
    truths = sorted(set(before.index) | set(after.index), key=truth_sort_key)
    label = RATE_LABELS.get(rate, rate)
    if not truths:
        draw_no_data(ax)
    else:
        x = np.arange(len(truths))
        width = 0.4
        differ = _counts_differ([*before["n"], *after["n"]])
        for offset, name, table, colour in ((-width / 2, labels[0], before, "tab:blue"),
                                            (width / 2, labels[1], after, "tab:orange")):
            rows = table.reindex(truths)  # a truth missing from one side is drawn as a gap
            _bars_with_intervals(ax, x + offset, rows, rate, width, name, colour, label_counts=differ)
        ax.set_xticks(x, [str(t) for t in truths])
        ax.legend(fontsize="small")
    ax.set_xlabel(xlabel)
    _unit_y(ax, label)
    set_titles(fig, title or f"{label} by {xlabel}: {labels[0]} vs {labels[1]}",
               caption([*before["n"], *after["n"]], "prompts per bar"), ax)
    return save_png(fig, path)


def plot_head_heatmap(
    matrix: Any, path: PathLike, *, title: str | None = None, cbar_label: str | None = None,
    note: str | None = None,
) -> Path:
    """Heatmap of a `[layer, head]` matrix, layer on the y axis (layer 0 at the top), NaN cells grey, values
    written in the cells of small grids.

    Uses a diverging colour map centred on 0 when values have both signs (e.g. logit differences).

    Args:
        matrix: 2-D array-like `[layer, head]` (numpy array, nested lists, CPU tensor).
        note: a line under the title, e.g. "n = 180 prompts per head".

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
    fig, ax = new_figure(min(max(3.0 + 0.4 * n_heads, 6.0), 14.0), min(max(2.0 + 0.35 * n_layers, 4.2), 12.0))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        draw_no_data(ax)
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
        if values.size <= _ANNOTATE_CELLS:
            middle = (vmin + vmax) / 2
            for (layer, head), value in np.ndenumerate(values):
                if np.isfinite(value):
                    dark = cmap == "viridis" and value < middle
                    ax.text(head, layer, f"{value:.2g}", ha="center", va="center", fontsize="x-small",
                            color="white" if dark else "black")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    set_titles(fig, title or f"{n_layers} layers x {n_heads} heads", note, ax)
    return save_png(fig, path)


def eval_plots(df: pd.DataFrame, plots_dir: PathLike) -> list[Path]:
    """The eval figures of a baseline table, per task: copy rate and correction rate by true value per
    misleading condition, the copy rate by condition (offset) pooled over true values, and base-question accuracy
    by true value.

    Files are `<task>_copy_rate.png`, `<task>_correction_rate.png`, `<task>_copy_rate_by_offset.png` (named
    after the task's condition axis: `..._by_distractor.png` for colours, `copy_rate_by_condition.png` without a
    task), `<task>_base_accuracy.png` (no prefix when the table has no `task` column or no rows).

    Raises:
        InputError: the table lacks the columns `metrics.pih` needs.
    """
    require_columns(df, ["condition", "truth", "outcome"], "eval_plots", "pass the baseline table of `halluscope eval`")
    out_dir = Path(plots_dir)
    tasks: list[str | None] = (
        sorted(str(t) for t in df["task"].dropna().unique()) if "task" in df.columns else []
    ) or [None]
    paths: list[Path] = []
    for task in tasks:
        sub = df if task is None else df[df["task"].astype(str) == task]
        xlabel, legend_title = axis_labels(task)
        prefix = "" if task is None else f"{task}_"
        suffix = f" ({task})" if task and xlabel == "true value" else ""
        misleading = select_misleading(sub)
        rates = pih_rates(misleading, by=("condition", "truth"))
        for rate in ("copy_rate", "correction_rate"):
            paths.append(plot_rate_by_truth(
                rates, out_dir / f"{prefix}{rate}.png", rate=rate, xlabel=xlabel, legend_title=legend_title,
                title=f"{RATE_LABELS[rate]} by {xlabel}, per {legend_title}{suffix}"))
        paths.append(plot_rate_by_condition(
            {"baseline": pih_rates(misleading, by=("condition",))}, out_dir / f"{prefix}copy_rate_by_{legend_title}.png",
            xlabel=legend_title, title=f"{RATE_LABELS['copy_rate']} by {legend_title}{suffix}"))
        paths.append(plot_base_accuracy(
            base_accuracy(sub, by=("truth",)), out_dir / f"{prefix}base_accuracy.png", xlabel=xlabel,
            title=f"base-question accuracy by {xlabel}{suffix}"))
    return paths
