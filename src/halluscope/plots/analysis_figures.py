"""Figures of the analyses (attention mass and maps, token probabilities, logit lens), written as PNG files.

Same conventions as `halluscope.plots.run_figures`: matplotlib's object API on an Agg canvas (no pyplot state),
one PNG per function, the path returned, the n of every value shown. Heatmaps of [layer, head] matrices use
`halluscope.plots.run_figures.plot_head_heatmap`. A panel whose values are all negligible (an answer form the
model does not use) says so instead of drawing noise on its own tiny scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from halluscope.errors import InputError
from halluscope.plots.figure import (
    MARKERS,
    NEGLIGIBLE,
    PathLike,
    caption,
    dodge,
    draw_no_data,
    fitted_title,
    is_negligible,
    new_panels,
    require_columns,
    save_png,
    set_titles,
)
from halluscope.plots.intervals import mean_intervals

__all__ = [
    "attention_plots",
    "plot_layer_shares",
    "plot_attention_map",
    "plot_probability_shift",
    "plot_lens",
]

_SETTING_STYLE = {"baseline": "-", "ablated": "--"}
_MAPS_PER_ROW = 5  # heads side by side in one row of an attention-map figure with one panel per head


def _weighted(sub: pd.DataFrame, column: str, by: Sequence[str]) -> pd.Series:
    weights = sub["n"] if "n" in sub.columns else pd.Series(1.0, index=sub.index)
    return (sub[column] * weights).groupby([sub[c] for c in by]).sum() / weights.groupby([sub[c] for c in by]).sum()


def _prompts(summary: pd.DataFrame) -> list[int]:
    """Prompts behind each (setting, query, layer, head) of a summary: its `n` summed over conditions."""
    if "n" not in summary.columns or summary.empty:
        return []
    keys = [c for c in ("setting", "query", "layer", "head", "form", "kind", "alpha") if c in summary.columns]
    return summary.groupby(keys, observed=True)["n"].sum().tolist()


def _negligible_note(ax: Axes, label: str, values: Any, form: str) -> None:
    largest = float(np.nanmax(np.abs(np.asarray(values, dtype="float64")))) if np.size(values) else 0.0
    draw_no_data(ax, f"{label}: every value is below {NEGLIGIBLE:g} (largest {largest:.1e}); the model does not "
                     f"answer in {form} form, so there is nothing to compare")


# ------------------------------------------------------------------------------------- attention mass


def plot_layer_shares(summary: pd.DataFrame, path: PathLike, *, share: str = "image_share",
                      title: str | None = None) -> Path:
    """Per layer, the head-averaged `share` (e.g. attention on image tokens), baseline vs ablated.

    One panel per query kind, conditions pooled (weighted by their number of prompts).

    Args:
        summary: `summarize_attention(table)`.

    Raises:
        InputError: `summary` lacks the needed columns.
    """
    require_columns(summary, ["setting", "query", "layer", share], "plot_layer_shares",
                    "pass summarize_attention(table)")
    from halluscope.analysis.attention import QUERY_KINDS

    kinds = [k for k in QUERY_KINDS if k in set(summary["query"])] or ["prompt"]
    fig, axes = new_panels(len(kinds))
    for ax, kind in zip(axes, kinds):
        sub = summary[summary["query"] == kind]
        if sub.empty:
            draw_no_data(ax)
        for setting, style in _SETTING_STYLE.items():
            part = sub[sub["setting"] == setting]
            if part.empty:
                continue
            curve = _weighted(part, share, ["layer"]).sort_index()
            ax.plot(curve.index, curve.values, style, marker="o", label=setting)
        ax.set_title(f"query: {kind}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(share.replace("_", " "))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    set_titles(fig, title or f"{share.replace('_', ' ')} by layer (mean over heads)",
               caption(_prompts(summary), "prompts per point", None))
    return save_png(fig, path)


def attention_plots(summary: pd.DataFrame, plots_dir: PathLike, n_layers: int, n_heads: int, *,
                    label: str = "") -> list[Path]:
    """The attention-mass figures of a run: the per-layer image-share curve, and [layer, head] heatmaps of the
    baseline image share and of its change under the ablation (last prompt position).

    Files: `attention_image_by_layer.png`, `attention_image_heads.png`, `attention_image_heads_change.png`.
    """
    from halluscope.analysis.attention import layer_head_matrix
    from halluscope.plots.run_figures import plot_head_heatmap

    out = Path(plots_dir)
    suffix = f" ({label} ablated)" if label else ""
    paths = [plot_layer_shares(summary, out / "attention_image_by_layer.png",
                               title=f"attention on image tokens by layer{suffix}")]
    base = layer_head_matrix(summary, "image_share", setting="baseline", query="prompt", n_layers=n_layers,
                             n_heads=n_heads)
    ablated = layer_head_matrix(summary, "image_share", setting="ablated", query="prompt", n_layers=n_layers,
                                n_heads=n_heads)
    note = caption(_prompts(summary[summary["query"] == "prompt"]), "prompts per head", None)
    paths.append(plot_head_heatmap(base, out / "attention_image_heads.png", cbar_label="image share", note=note,
                                   title="attention on image tokens, last prompt position"))
    paths.append(plot_head_heatmap(ablated - base, out / "attention_image_heads_change.png",
                                   cbar_label="ablated - baseline", note=note,
                                   title=f"change in image attention{suffix}"))
    return paths


# -------------------------------------------------------------------------------------- attention maps


def plot_attention_map(image: Any, maps: Sequence[tuple[str, Sequence[tuple[Any, np.ndarray]]]],
                       path: PathLike, *, title: str | None = None) -> Path:
    """The image with each head's attention over its image tokens laid on top: one row per head when an image
    has several panels (crops), else the heads side by side.

    Each panel's colours span its own min..max weight (the colour bar gives the values); the title gives the
    panel's total share of attention on image tokens.

    Args:
        image: the image (path, bytes or PIL image).
        maps: per head, (label, [(ImageGrid, [rows, cols] weights), ...]) as `grid_values` returns them;
            grids sharing a panel are drawn on one axis.

    Raises:
        InputError: no maps.
    """
    from halluscope.images import open_image

    if not maps:
        raise InputError("plot_attention_map() got no maps; pass [(label, grid_values(row)), ...]")
    picture = np.asarray(open_image(image).convert("RGB"))
    height, width = picture.shape[:2]
    panels = list(dict.fromkeys(g.panel for _, grids in maps for g, _ in grids)) or ["image"]
    n_panels = len(panels) * len(maps)
    rows = len(maps) if len(panels) > 1 else -(-len(maps) // _MAPS_PER_ROW)  # one panel per head: side by side
    fig, axes = new_panels(n_panels, width=3.4, height=3.2, rows=rows)
    for spare in axes[n_panels:]:
        spare.set_visible(False)
    for r, (label, grids) in enumerate(maps):
        for c, panel in enumerate(panels):
            ax = axes[r * len(panels) + c]
            ax.imshow(picture, extent=(0, width, height, 0))
            chosen = [(g, v) for g, v in grids if g.panel == panel]
            low = min((float(v.min()) for _, v in chosen), default=0.0)
            top = max((float(v.max()) for _, v in chosen), default=1.0)
            top = top if top > low else low + 1e-9  # a flat map still gets a valid colour range
            x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
            image_obj = None
            for grid, values in chosen:
                left, upper, right, lower = grid.box
                extent = (left * width, right * width, lower * height, upper * height)
                image_obj = ax.imshow(values, extent=extent, cmap="inferno", alpha=0.6, vmin=low, vmax=top,
                                      interpolation="nearest")
                x0, y0 = min(x0, extent[0]), min(y0, extent[3])
                x1, y1 = max(x1, extent[1]), max(y1, extent[2])
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            ax.set_xticks([])
            ax.set_yticks([])
            share = sum(float(v.sum()) for _, v in chosen)
            ax.set_title(f"{label} {panel}: {share:.0%} on image", fontsize="small")
            if image_obj is not None:
                fig.colorbar(image_obj, ax=ax, shrink=0.7)
    if title:
        fig.suptitle(fitted_title(fig, title, size=10), fontsize="small")
    return save_png(fig, path)


# ------------------------------------------------------------------------------------- probabilities


def plot_probability_shift(table: pd.DataFrame, path: PathLike, *, form: str, title: str | None = None) -> Path:
    """Mean p(truth), p(claim) and their difference against alpha, one line per condition (offset), each point
    with its 95% interval over prompts (mean -+ 1.96 standard errors).

    Args:
        table: the per-prompt table of `token_probabilities` (probs.parquet).
        form: the answer form to draw ("digit" or "word").

    Raises:
        InputError: `table` lacks the needed columns.
    """
    require_columns(table, ["condition", "form", "alpha", "p_truth", "p_claim"], "plot_probability_shift",
                    "pass the table of token_probabilities() (probs.parquet)")
    from halluscope.metrics.pih import condition_order

    sub = table[table["form"] == form]
    sub = sub.assign(shift=sub["p_claim"] - sub["p_truth"])
    fig, axes = new_panels(3)
    counts: list[int] = []
    for ax, column, label in zip(axes, ("p_truth", "p_claim", "shift"),
                                 ("p(true answer)", "p(prompted answer)", "p(prompted) - p(true)")):
        means = mean_intervals(sub, column, ["condition", "alpha"])
        means = means[means["n"] > 0]
        conditions = condition_order(means["condition"])
        counts += means["n"].tolist()
        if means.empty:
            draw_no_data(ax)
        elif is_negligible(means["mean"]):
            _negligible_note(ax, label, means["mean"], form)
        else:
            alphas = sorted(set(means["alpha"]))
            offsets = dodge(len(conditions), float(np.diff(alphas).min()) if len(alphas) > 1 else 1.0, 0.3)
            for i, condition in enumerate(conditions):
                part = means[means["condition"] == condition].sort_values("alpha")
                ax.errorbar(part["alpha"] + offsets[i], part["mean"],
                            yerr=[part["mean"] - part["low"], part["high"] - part["mean"]],
                            marker=MARKERS[i % len(MARKERS)], capsize=2, markersize=4, alpha=0.9, label=str(condition))
            if column != "shift":
                ax.set_ylim(bottom=0)
            ax.legend(title="offset", fontsize="x-small", ncols=2 if len(conditions) > 4 else 1)
        ax.set_xlabel("alpha (1 = heads unchanged, 0 = knocked out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    set_titles(fig, title or f"answer probabilities vs head strength ({form} form)",
               caption(counts, "prompts per point", "95% interval of the mean"))
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------- lens


def plot_lens(summary: pd.DataFrame, path: PathLike, *, form: str, title: str | None = None) -> Path:
    """Per layer, mean probability and median rank of the true and the prompted answer on misleading prompts
    (truth only on base/control), baseline solid and ablated dashed.

    Args:
        summary: `summarize_lens(table)`.

    Raises:
        InputError: `summary` lacks the needed columns.
    """
    require_columns(summary, ["kind", "setting", "form", "layer", "p_truth", "p_claim", "median_rank_truth",
                              "median_rank_claim"], "plot_lens", "pass summarize_lens(table)")
    sub = summary[summary["form"] == form]
    fig, axes = new_panels(2)
    lines = (("misleading", "truth", "tab:green"), ("misleading", "claim", "tab:red"),
             ("truthful", "truth", "tab:blue"))
    for ax, (prefix, ylabel) in zip(axes, (("p_", "mean probability"), ("median_rank_", "median rank"))):
        if prefix == "p_" and not sub.empty and is_negligible(sub[["p_truth", "p_claim"]].to_numpy()):
            _negligible_note(ax, ylabel, sub[["p_truth", "p_claim"]].to_numpy(), form)
            ax.set_xlabel("layer")
            continue
        drawn = False
        for kind, target, colour in lines:
            for setting, style in _SETTING_STYLE.items():
                part = sub[(sub["kind"] == kind) & (sub["setting"] == setting)].sort_values("layer")
                values = part[f"{prefix}{target}"]
                if part.empty or values.isna().all():
                    continue
                ax.plot(part["layer"], values, style, color=colour, marker="o",
                        label=f"{target} ({kind}, {setting})")
                drawn = True
        if not drawn:
            draw_no_data(ax)
        else:
            ax.legend(fontsize="x-small")
        if prefix == "median_rank_" and drawn:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    set_titles(fig, title or f"logit lens at the answer position ({form} form)",
               caption(_prompts(sub), "prompts per point", None))
    return save_png(fig, path)
