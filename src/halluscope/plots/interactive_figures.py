"""The interactive figures of the HTML report, as plotly figures built from plain tables (no run, no file).

Each figure carries its numbers in its hover text: a rate its n and 95% Wilson interval, a head its rank and
the prompts whose reply its knockout changed, an attention map its weights. Interactivity is plotly's own
(hover, legend toggles, a drop-down per sample); the page adds no JavaScript of its own.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from halluscope.plots.figure import NEGLIGIBLE, RATE_LABELS, is_negligible
from halluscope.plots.intervals import mean_intervals

__all__ = [
    "HeadExample",
    "MapSample",
    "attention_maps_figure",
    "head_heatmap_figure",
    "layer_shares_figure",
    "probability_figure",
    "rates_figure",
]

_FONT = {"family": "system-ui, -apple-system, 'Segoe UI', sans-serif", "size": 13}
_SETTING_DASH = {"baseline": "solid", "ablated": "dash"}
_SHIFT_PANELS = (("p_truth", "p(true answer)"), ("p_claim", "p(prompted answer)"),
                 ("shift", "p(prompted) - p(true)"))
_HOVER_TEXT = 90  # characters of a prompt or reply shown in a tooltip line
_MAP_SIDE = 256  # pixels: the longest side of an image under its attention maps


def _go() -> Any:
    import plotly.graph_objects as go  # lazy: plotly loads only when a page is built

    return go


def _subplots(**kwargs: Any) -> Any:
    from plotly.subplots import make_subplots

    return make_subplots(**kwargs)


def _layout(fig: Any, title: str, height: int) -> Any:
    fig.update_layout(title={"text": title, "x": 0.01, "xanchor": "left"}, height=height, font=_FONT,
                      template="plotly_white", margin={"l": 70, "r": 30, "t": 90, "b": 60},
                      hoverlabel={"align": "left"}, legend={"orientation": "h", "y": -0.18})
    return fig


def _short(text: Any) -> str:
    """`text` on one line, cut to the tooltip width, HTML-escaped (plotly reads tooltips as HTML)."""
    line = " ".join(str(text).split())
    if len(line) > _HOVER_TEXT:
        line = line[: _HOVER_TEXT - 1] + "…"
    return html.escape(line)


def _colour(index: int) -> str:
    """The colour of the index-th series, the same in every panel of a figure."""
    from plotly.colors import qualitative

    return qualitative.Plotly[index % len(qualitative.Plotly)]


def _note(fig: Any, text: str, row: int, col: int, cols: int) -> None:
    """A message in the middle of subplot (row, col) of a `cols`-wide grid, in place of curves (placed in page
    coordinates: plotly.js does not place annotations on the axes of a subplot that has no trace)."""
    index = (row - 1) * cols + col
    suffix = "" if index == 1 else str(index)
    x_domain, y_domain = fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain
    fig.add_annotation(text=text, showarrow=False, font={"color": "grey"}, xref="paper", yref="paper",
                       x=sum(x_domain) / 2, y=sum(y_domain) / 2, xanchor="center", yanchor="middle")


# ------------------------------------------------------------------------------------------------ rates


def rates_figure(series: Mapping[str, pd.DataFrame], *, by: str, xlabel: str,
                 rates: Sequence[str] = ("copy_rate", "correction_rate"), title: str) -> Any:
    """One panel per rate: the rate of each setting (baseline, each ablation) per value of `by`, with its 95%
    Wilson interval as error bars; the tooltip gives rate, interval and n.

    Args:
        series: label -> `with_intervals(pih_rates(select_misleading(df), by=(by,)), rates)`.
        by: "condition" (the offset) or "truth".
        xlabel: the axis name ("offset", "true count").

    Example:
        >>> rates_figure({"baseline": table}, by="condition", xlabel="offset", title="PIH rates by offset")
    """
    fig = _subplots(rows=1, cols=len(rates), subplot_titles=[RATE_LABELS.get(r, r) for r in rates],
                    horizontal_spacing=0.08)
    for col, rate in enumerate(rates, start=1):
        for index, (name, table) in enumerate(series.items()):
            x = [str(v) for v in table[by]]
            y = table[rate].to_numpy(dtype="float64")
            custom = np.stack([table[f"{rate}_low"], table[f"{rate}_high"], table["n"]], axis=-1)
            fig.add_trace(_go().Scatter(
                x=x, y=y, name=name, legendgroup=name, showlegend=col == 1, mode="lines+markers",
                marker={"color": _colour(index), "symbol": index}, line={"color": _colour(index)}, error_y={"type": "data", "symmetric": False, "array": table[f"{rate}_high"] - y,
                         "arrayminus": y - table[f"{rate}_low"], "thickness": 1.2, "width": 3},
                customdata=custom,
                hovertemplate=(f"<b>%{{fullData.name}}</b><br>{xlabel} %{{x}}<br>{RATE_LABELS.get(rate, rate)} "
                               "%{y:.1%} (95% CI %{customdata[0]:.1%}-%{customdata[1]:.1%})<br>"
                               "n = %{customdata[2]} prompts<extra></extra>")), row=1, col=col)
        fig.update_xaxes(title_text=xlabel, type="category", row=1, col=col)
        fig.update_yaxes(range=[-0.03, 1.03], tickformat=".0%", row=1, col=col)
    fig.update_layout(scattermode="group", scattergap=0.6)  # settings with equal rates side by side
    return _layout(fig, title, 430)


# ------------------------------------------------------------------------------------------------ heads


@dataclass(frozen=True)
class HeadExample:
    """A prompt whose reply a head's knockout changed: the prompt, and the reply before and after."""

    prompt: str
    before: str
    after: str


def _examples_html(examples: Sequence[HeadExample]) -> str:
    if not examples:
        return "no measured prompt's answer changed"
    lines = ["prompts whose answer it changed:"]
    for example in examples:
        lines += [f"• {_short(example.prompt)}", f"   before: {_short(example.before)}",
                  f"   after: {_short(example.after)}"]
    return "<br>".join(lines)


def head_heatmap_figure(ranking: pd.DataFrame, examples: Mapping[tuple[int, int], Sequence[HeadExample]], *,
                        n_layers: int, n_heads: int, title: str) -> Any:
    """The layer x head heatmap of correction rates (layer 0 at the top); hovering a head shows its rate with
    n and 95% interval, its rank, and example prompts whose reply its knockout changed (before / after).

    Args:
        ranking: `with_intervals(rank_heads(sweep), ["correction_rate"])` (ranking.parquet plus intervals).
        examples: (layer, head) -> a few `HeadExample`s.

    Example:
        >>> head_heatmap_figure(ranking, {}, n_layers=4, n_heads=8, title="correction rate per head")
    """
    z = np.full((n_layers, n_heads), np.nan)
    custom = np.empty((n_layers, n_heads, 5), dtype=object)
    custom[:] = ""
    for row in ranking.itertuples(index=False):
        layer, head = int(row.layer), int(row.head)
        z[layer, head] = row.correction_rate
        custom[layer, head] = [int(row.rank), int(row.n), float(row.correction_rate_low),
                               float(row.correction_rate_high), _examples_html(examples.get((layer, head), ()))]
    fig = _go().Figure(_go().Heatmap(
        z=z, customdata=custom, colorscale="Viridis", xgap=1, ygap=1, colorbar={"title": {"text": "correction rate"},
                                                                                "tickformat": ".0%"},
        hovertemplate=("<b>L%{y}H%{x}</b>: correction rate %{z:.1%} "
                       "(95% CI %{customdata[2]:.1%}-%{customdata[3]:.1%}, n = %{customdata[1]})<br>"
                       "rank %{customdata[0]}<br>%{customdata[4]}<extra></extra>")))
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", dtick=1, autorange="reversed")
    return _layout(fig, title, max(360, 120 + 34 * n_layers))


# ------------------------------------------------------------------------------------------------ maps


@dataclass(frozen=True)
class MapSample:
    """One prompt's attention maps: its label, its image and, per head, the (ImageGrid, [rows, cols] weights)
    pairs of `halluscope.analysis.maps.grid_values`."""

    label: str
    image: Any
    heads: Sequence[tuple[str, Sequence[tuple[Any, np.ndarray]]]]


def _data_uri(image: Any) -> tuple[str, int, int]:
    """The image as a JPEG data URI of at most `_MAP_SIDE` pixels a side (so the page needs no other file and
    stays small when each head's panel repeats the image), with its width and height."""
    from halluscope.images import open_image

    picture = open_image(image).convert("RGB")
    picture.thumbnail((_MAP_SIDE, _MAP_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), *picture.size


def attention_maps_figure(samples: Sequence[MapSample], *, title: str) -> Any:
    """Each head's attention from the last prompt position over the image tokens, laid over the image; a
    drop-down picks the sample. One panel per head (and per image panel, for families that split an image
    into crops); colours span each panel's own range, the tooltip gives the weight.

    Example:
        >>> attention_maps_figure([MapSample("count-0001-+2", image, maps)], title="attention maps")
    """
    go = _go()
    columns = list(dict.fromkeys((head, grid.panel) for s in samples for head, grids in s.heads for grid, _ in grids))
    several = len({panel for _, panel in columns}) > 1  # name the panel only where an image has several

    def panel_title(head: str, panel: str, share: float | None = None) -> str:
        where = f" {panel}" if several else ""
        return f"{head}{where}" + ("" if share is None else f": {share:.0%} on image")

    fig = _subplots(rows=1, cols=max(1, len(columns)), subplot_titles=[panel_title(*c) for c in columns] or [""],
                    horizontal_spacing=0.02)
    owner: list[int] = []  # the sample of each trace
    panel_titles: list[list[str]] = []
    for index, sample in enumerate(samples):
        uri, width, height = _data_uri(sample.image)
        grids_of = {(head, grid.panel): [] for head, grids in sample.heads for grid, _ in grids}
        for head, grids in sample.heads:
            for grid, values in grids:
                grids_of[(head, grid.panel)].append((grid, values))
        titles = []
        for col, key in enumerate(columns, start=1):
            chosen = grids_of.get(key, [])
            fig.add_trace(go.Image(source=uri, x0=0, dx=1, y0=0, dy=1, visible=index == 0, hoverinfo="skip"),
                          row=1, col=col)
            owner.append(index)
            low = min((float(v.min()) for _, v in chosen), default=0.0)
            top = max((float(v.max()) for _, v in chosen), default=1.0)
            for grid, values in chosen:
                left, upper, right, lower = grid.box
                cell_w, cell_h = (right - left) * width / grid.cols, (lower - upper) * height / grid.rows
                fig.add_trace(go.Heatmap(
                    z=values, x0=left * width + cell_w / 2, dx=cell_w, y0=upper * height + cell_h / 2, dy=cell_h,
                    zmin=low, zmax=top if top > low else low + 1e-9, colorscale="Inferno", opacity=0.55,
                    showscale=False, visible=index == 0,
                    hovertemplate=f"{html.escape(key[0])}: weight %{{z:.4f}}<extra></extra>"), row=1, col=col)
                owner.append(index)
            share = sum(float(v.sum()) for _, v in chosen)
            titles.append(panel_title(*key, share))
        panel_titles.append(titles)
    for col in range(1, len(columns) + 1):
        fig.update_xaxes(visible=False, row=1, col=col)
        fig.update_yaxes(visible=False, autorange="reversed", scaleanchor=f"x{'' if col == 1 else col}",
                         row=1, col=col)
    buttons = [{"label": sample.label, "method": "update",
                "args": [{"visible": [o == index for o in owner]},
                         {f"annotations[{i}].text": text for i, text in enumerate(panel_titles[index])}]}
               for index, sample in enumerate(samples)]
    for i, text in enumerate(panel_titles[0] if panel_titles else []):
        fig.layout.annotations[i].text = text
    _layout(fig, title, 470)
    fig.update_layout(margin={"t": 150}, title={"yref": "container", "y": 0.98, "yanchor": "top"},
                      updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "xanchor": "left", "y": 1.2,
                                    "yanchor": "bottom", "showactive": True}])
    return fig


# -------------------------------------------------------------------------------------- attention mass


def layer_shares_figure(summary: pd.DataFrame, *, title: str) -> Any:
    """Attention on image tokens per layer (mean over heads and conditions, weighted by prompts), baseline vs
    ablated, one panel per query position kind; the tooltip gives the share and n.

    Args:
        summary: `summarize_attention(table)` (attention.parquet).
    """
    from halluscope.analysis.attention import QUERY_KINDS

    kinds = [k for k in QUERY_KINDS if k in set(summary["query"])]
    fig = _subplots(rows=1, cols=max(1, len(kinds)), subplot_titles=[f"query: {k}" for k in kinds] or [""],
                    shared_yaxes=True, horizontal_spacing=0.04)
    for col, kind in enumerate(kinds, start=1):
        for index, (setting, dash) in enumerate(_SETTING_DASH.items()):
            part = summary[(summary["query"] == kind) & (summary["setting"] == setting)]
            if part.empty:
                continue
            weighted = (part["image_share"] * part["n"]).groupby(part["layer"]).sum()
            per_layer = part.groupby("layer")["n"]
            n = per_layer.sum() / part.groupby("layer")["head"].nunique()  # prompts per layer
            share = (weighted / per_layer.sum()).sort_index()
            fig.add_trace(_go().Scatter(
                x=share.index, y=share.values, name=setting, legendgroup=setting, showlegend=col == 1,
                mode="lines+markers", line={"dash": dash, "color": _colour(index)},
                marker={"color": _colour(index), "symbol": index}, customdata=n.reindex(share.index).to_numpy(),
                hovertemplate=(f"<b>{setting}</b>, layer %{{x}}<br>image share %{{y:.1%}}<br>"
                               "n = %{customdata:.0f} prompts<extra></extra>")), row=1, col=col)
        fig.update_xaxes(title_text="layer", dtick=1, row=1, col=col)
    fig.update_yaxes(range=[0, 1], tickformat=".0%", title_text="attention on image tokens", row=1, col=1)
    return _layout(fig, title, 400)


# -------------------------------------------------------------------------------------- probabilities


def probability_figure(table: pd.DataFrame, *, title: str, condition_label: str = "offset") -> Any:
    """p(true answer), p(prompted answer) and their difference against alpha, one row of panels per answer
    form, one line per misleading condition with its 95% interval over prompts. A panel whose values are all
    below `NEGLIGIBLE` (an answer form the model never uses) says so instead of drawing noise.

    Args:
        table: the per-prompt table of `token_probabilities` (probs.parquet).
        condition_label: what a condition is called ("offset", "distractor").
    """
    from halluscope.metrics.pih import misleading_conditions

    frame = table.assign(shift=table["p_claim"] - table["p_truth"])
    conditions = misleading_conditions(frame["condition"])
    frame = frame[frame["condition"].isin(conditions)]
    forms = sorted(set(frame["form"]))
    cols = len(_SHIFT_PANELS)
    fig = _subplots(rows=max(1, len(forms)), cols=cols, horizontal_spacing=0.07, vertical_spacing=0.16,
                    subplot_titles=[f"{label} ({form} form)" for form in forms for _, label in _SHIFT_PANELS] or None)
    alphas = [str(a) for a in sorted(set(frame["alpha"]))]
    in_legend: set[str] = set()
    for row, form in enumerate(forms, start=1):
        sub = frame[frame["form"] == form]
        for col, (column, label) in enumerate(_SHIFT_PANELS, start=1):
            fig.update_xaxes(title_text="alpha (1 = heads unchanged)", type="category", categoryorder="array",
                             categoryarray=alphas, row=row, col=col)
            means = mean_intervals(sub, column, ["condition", "alpha"])
            means = means[means["n"] > 0]
            if is_negligible(means["mean"]):
                largest = float(means["mean"].abs().max()) if len(means) else 0.0
                _note(fig, f"every value below {NEGLIGIBLE:g}<br>(largest {largest:.1e}):<br>the model does not "
                           f"answer<br>in {form} form", row, col, cols)
                fig.update_yaxes(showticklabels=False, row=row, col=col)
                continue
            for index, condition in enumerate(conditions):
                part = means[means["condition"] == condition].sort_values("alpha")
                if part.empty:
                    continue
                name = f"{condition_label} {condition}"
                fig.add_trace(_go().Scatter(
                    x=[str(a) for a in part["alpha"]], y=part["mean"], name=name, legendgroup=name,
                    showlegend=name not in in_legend, mode="lines+markers",
                    marker={"color": _colour(index), "symbol": index}, line={"color": _colour(index)},
                    error_y={"type": "data", "symmetric": False, "array": part["high"] - part["mean"],
                             "arrayminus": part["mean"] - part["low"], "thickness": 1, "width": 2},
                    customdata=np.stack([part["low"], part["high"], part["n"]], axis=-1),
                    hovertemplate=(f"<b>{name}</b>, alpha %{{x}}<br>{label} %{{y:.3f}} "
                                   "(95% CI %{customdata[0]:.3f} to %{customdata[1]:.3f})<br>"
                                   "n = %{customdata[2]} prompts<extra></extra>")), row=row, col=col)
                in_legend.add(name)
    fig.update_layout(scattermode="group", scattergap=0.5)
    return _layout(fig, title, 330 * max(1, len(forms)) + 120)
