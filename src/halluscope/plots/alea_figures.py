"""The figure of `halluscope alea locate`: each layer's differential between grounded and hallucinated responses
and how many pairs peak there, the located layers marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from halluscope.plots.figure import PathLike, caption, new_panels, require_columns, save_png, set_titles

__all__ = ["plot_differentials"]


def plot_differentials(per_layer: pd.DataFrame, located: Sequence[int], path: PathLike, *, score: str,
                       title: str) -> Path:
    """Two panels over the layers: the mean differential of each reading (the one that located drawn solid) and
    the pairs whose `score` differential peaks at each layer, located layers in a second colour; returns the PNG.

    Raises:
        InputError: `per_layer` lacks layer, wins or a reading's mean (`locate.select_layers` writes them).
    """
    readings = [c.removesuffix("_mean") for c in per_layer.columns if c.endswith("_mean")]
    require_columns(per_layer, ["layer", "wins", f"{score}_mean"], "plot_differentials",
                    "pass the per-layer summary `halluscope.training.alea.locate.select_layers` returns")
    layers = per_layer["layer"].tolist()
    fig, (curves, wins) = new_panels(2, width=max(4.2, 0.35 * len(layers) + 2.5), height=3.6)
    for reading in readings:
        curves.plot(layers, per_layer[f"{reading}_mean"], marker="o", linestyle="-" if reading == score else ":",
                    label=reading + (" (locates)" if reading == score else ""))
    curves.set_xticks(layers)
    curves.set_xlabel("layer")
    curves.set_ylabel("mean distance of pooled hidden states")
    curves.legend(fontsize="small")
    curves.grid(alpha=0.3)
    colours = ["tab:red" if layer in set(located) else "tab:gray" for layer in layers]
    bars = wins.bar(layers, per_layer["wins"], color=colours)
    wins.bar_label(bars, fontsize="x-small", padding=1)
    wins.set_xticks(layers)
    wins.set_xlabel("layer (red: located)")
    wins.set_ylabel(f"pairs peaking here ({score})")
    wins.grid(axis="y", alpha=0.3)
    set_titles(fig, title, caption([int(per_layer["wins"].sum())], "pairs", interval=None))
    return save_png(fig, path)
