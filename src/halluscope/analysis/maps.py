"""Attention maps: the full attention row of the last prompt position for chosen heads, stored compactly, and
the image-token part of it laid back over the image in the family's spatial layout.

The layout knowledge is one table, `LAYOUTS` (family name -> function), each returning the `ImageGrid`s of one
image: which image tokens form a rows x cols grid and which part of the image that grid covers.

| family | grid |
| --- | --- |
| Qwen2-VL, Qwen2.5-VL | merged patches: `image_grid_thw` (h, w) / `spatial_merge_size`, whole image |
| LLaVA | (image_size / patch_size)^2, minus the CLS token when the strategy keeps it ("full"); the centre crop (or padded square) the processor makes |
| LLaVA-OneVision | the base tile (image_size / patch_size)^2 over the whole (squashed) image, then the any-res grid whose rows end in a newline token (dropped), rows x cols solved from the token count and the image's aspect ratio |
| Idefics3, SmolVLM | sqrt(image_seq_len)^2 per crop; crops placed by their `<row_r_col_c>` tokens, the global image over the whole image |
| Janus | sqrt(num_image_tokens)^2 over the square the processor pads the image to |

Rows of the stored table hold the weights as float16 bytes over all key positions (`decode_weights`), the key
classes as int8 bytes (`halluscope.analysis.attention.TOKEN_CLASSES`, -1 pad), and the layout as JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from halluscope.analysis.attention import TOKEN_CLASSES, query_attention, token_classes
from halluscope.analysis.probabilities import PROMPT_SCHEMA, typed_table
from halluscope.errors import HalluscopeError, InputError
from halluscope.runs import locked_step

__all__ = [
    "ImageGrid",
    "LayoutInput",
    "LAYOUTS",
    "image_layout",
    "attention_maps",
    "decode_weights",
    "decode_classes",
    "decode_layout",
    "grid_values",
    "attention_maps_step",
]

_MAP_SCHEMA = {**PROMPT_SCHEMA, "layer": "int64", "head": "int64", "query_position": "int64", "n_keys": "int64",
               "image_share": "float64", "weights": "object", "token_class": "object", "layout": "string"}
_CROP = re.compile(r"<row_(\d+)_col_(\d+)>")

Box = tuple[float, float, float, float]
_WHOLE: Box = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class ImageGrid:
    """A rows x cols grid of image tokens and the part of the image it covers.

    `tokens` indexes the row's image tokens (in sequence order), row-major, rows*cols entries. `box` is
    (left, top, right, bottom) in fractions of the image's width and height; it may reach outside [0, 1] when
    the processor pads the image. Grids with the same `panel` are drawn on one axis (e.g. the crops of a
    split image).
    """

    panel: str
    rows: int
    cols: int
    tokens: tuple[int, ...]
    box: Box = _WHOLE


@dataclass(frozen=True)
class LayoutInput:
    """What a layout function may read: the model, the batch, the row, its image size and image-token count."""

    vlm: Any
    batch: Any
    row: int
    image_size: tuple[int, int]  # (width, height) of the image given to the processor
    n_tokens: int


def _grid(panel: str, rows: int, cols: int, start: int = 0, box: Box = _WHOLE, stride: int | None = None) -> ImageGrid:
    stride = cols if stride is None else stride
    tokens = tuple(start + r * stride + c for r in range(rows) for c in range(cols))
    return ImageGrid(panel, rows, cols, tokens, box)


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise HalluscopeError(f"{what}: {n} image tokens do not form a square grid")
    return side


def _centred_square(size: tuple[int, int], pad: bool) -> Box:
    """The square a processor pads the image to (pad) or crops from its centre (not pad), as a fraction box."""
    width, height = size
    side = max(width, height) if pad else min(width, height)
    dx, dy = (side - width) / 2 / width, (side - height) / 2 / height
    return (-dx, -dy, 1 + dx, 1 + dy)


def _count_check(inp: LayoutInput, expected: int, how: str) -> None:
    if expected != inp.n_tokens:
        raise HalluscopeError(f"{inp.vlm.family.name}: the layout ({how}) has {expected} image tokens but the row "
                              f"has {inp.n_tokens}; the image layout table in halluscope.analysis.maps is out of date")


def _qwen(inp: LayoutInput) -> list[ImageGrid]:
    thw = inp.batch.inputs["image_grid_thw"][inp.row].tolist()  # one image per row
    merge = inp.vlm.model.config.vision_config.spatial_merge_size
    t, rows, cols = int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge
    _count_check(inp, t * rows * cols, f"image_grid_thw {thw} / merge {merge}")
    return [_grid("image", rows, cols)]  # first temporal slice (t = 1 for an image)


def _llava(inp: LayoutInput) -> list[ImageGrid]:
    vision = inp.vlm.model.config.vision_config
    side = vision.image_size // vision.patch_size
    skip = 1 if inp.vlm.model.config.vision_feature_select_strategy == "full" else 0  # the CLS token is kept
    _count_check(inp, side * side + skip, f"({vision.image_size}/{vision.patch_size})^2 + {skip} CLS")
    processor = inp.vlm.processor.image_processor
    if getattr(processor, "do_pad", False):
        box = _centred_square(inp.image_size, pad=True)
    elif getattr(processor, "do_center_crop", False):
        box = _centred_square(inp.image_size, pad=False)
    else:
        box = _WHOLE
    return [_grid("image", side, side, start=skip, box=box)]


def _any_res_shape(n: int, aspect: float) -> tuple[int, int]:
    """rows, cols with rows * (cols + 1) == n (one newline token per row), cols/rows closest to `aspect`."""
    options = [(rows, n // rows - 1) for rows in range(1, n + 1) if n % rows == 0 and n // rows > 1]
    if not options:
        raise HalluscopeError(f"llava_onevision: {n} high-resolution tokens do not form rows ending in a newline")
    return min(options, key=lambda rc: abs(math.log(rc[1] / rc[0]) - math.log(aspect)))


def _onevision(inp: LayoutInput) -> list[ImageGrid]:
    vision = inp.vlm.model.config.vision_config
    side = vision.image_size // vision.patch_size
    base = side * side
    grids = [_grid("base", side, side)]
    rest = inp.n_tokens - base
    if rest > 1:  # rest == 1: no high-resolution tiles, only the newline token after the base tile
        width, height = inp.image_size
        rows, cols = _any_res_shape(rest, width / height)
        grids.append(_grid("high-res", rows, cols, start=base, stride=cols + 1))
    elif rest != 1:
        _count_check(inp, base + 1, f"base tile ({side}x{side}) + newline")
    return grids


def _idefics(inp: LayoutInput) -> list[ImageGrid]:
    ids = inp.batch.input_ids[inp.row].tolist()
    tokens = inp.vlm.tokenizer.convert_ids_to_tokens([ids[start - 1] for start, _ in inp.batch.image_spans[inp.row]])
    runs, placed = [], []
    offset = 0
    for (start, end), marker in zip(inp.batch.image_spans[inp.row], tokens):
        runs.append((offset, end - start))
        match = _CROP.fullmatch(marker or "")
        placed.append((int(match[1]), int(match[2])) if match else None)
        offset += end - start
    n_rows = max([p[0] for p in placed if p] or [1])
    n_cols = max([p[1] for p in placed if p] or [1])
    grids = []
    for (start, length), where in zip(runs, placed):
        side = _square_side(length, f"{inp.vlm.family.name} crop")
        if where is None:
            grids.append(_grid("global", side, side, start=start))
        else:
            r, c = where
            box = ((c - 1) / n_cols, (r - 1) / n_rows, c / n_cols, r / n_rows)
            grids.append(_grid("crops", side, side, start=start, box=box))
    return grids


def _janus(inp: LayoutInput) -> list[ImageGrid]:
    side = _square_side(inp.n_tokens, "janus")
    pad = getattr(inp.vlm.processor.image_processor, "do_pad", False)
    return [_grid("image", side, side, box=_centred_square(inp.image_size, pad=True) if pad else _WHOLE)]


#: family name -> layout function. Adding a family's maps = adding an entry here.
LAYOUTS: dict[str, Callable[[LayoutInput], list[ImageGrid]]] = {
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "llava": _llava,
    "llava_onevision": _onevision,
    "idefics3": _idefics,
    "smolvlm": _idefics,
    "janus": _janus,
}


def image_layout(vlm, batch, row: int, image_size: tuple[int, int]) -> list[ImageGrid]:
    """The image-token grids of batch row `row` (one image per row) for the family of `vlm`.

    Raises:
        HalluscopeError: the family has no entry in `LAYOUTS`, or the row's image tokens do not fit its layout.

    Example:
        >>> image_layout(vlm, vlm.encode([(img, "How many?")]), 0, img.size)[0].rows
    """
    layout = LAYOUTS.get(vlm.family.name)
    if layout is None:
        raise HalluscopeError(f"no image layout for family {vlm.family.name!r}; add an entry to "
                              f"halluscope.analysis.maps.LAYOUTS (known: {', '.join(sorted(LAYOUTS))})")
    n_tokens = int(batch.image_mask[row].sum())
    return layout(LayoutInput(vlm, batch, row, tuple(image_size), n_tokens))


# ------------------------------------------------------------------------------------------- storage


def decode_weights(row: Any) -> np.ndarray:
    """The stored attention row `[keys]` as float32 (from a row of the `attention_maps` table)."""
    return np.frombuffer(row["weights"], dtype=np.float16).astype(np.float32)


def decode_classes(row: Any) -> np.ndarray:
    """The stored key classes `[keys]` as int8 indices into `TOKEN_CLASSES` (-1 on padding)."""
    return np.frombuffer(row["token_class"], dtype=np.int8)


def decode_layout(row: Any) -> list[ImageGrid]:
    """The stored image grids of a row."""
    return [ImageGrid(g["panel"], g["rows"], g["cols"], tuple(g["tokens"]), tuple(g["box"]))
            for g in json.loads(row["layout"])]


def grid_values(row: Any) -> list[tuple[ImageGrid, np.ndarray]]:
    """Each image grid of a stored row with its attention weights as a `[rows, cols]` array."""
    weights, classes = decode_weights(row), decode_classes(row)
    image = weights[classes == TOKEN_CLASSES.index("image")]
    return [(g, image[list(g.tokens)].reshape(g.rows, g.cols)) for g in decode_layout(row)]


def attention_maps(vlm, prompts: Sequence, heads, *, on_prompt: Callable[[], None] | None = None) -> pd.DataFrame:
    """The attention row of the last prompt position for each head in `heads`, for each prompt (no ablation).

    Returns:
        One row per (prompt, head): `sample_id, condition, truth, claim, layer, head, query_position, n_keys,
        image_share`, `weights` (float16 bytes, `decode_weights`), `token_class` (int8 bytes, `decode_classes`)
        and `layout` (JSON, `decode_layout`); `grid_values(row)` gives the maps over the image.

    Raises:
        InputError: no heads, or heads outside the model.

    Example:
        >>> maps = attention_maps(vlm, run_prompts(baseline, samples, limit=5), {(0, 3)})
    """
    from halluscope.interventions.heads import HeadIntervention

    heads = sorted(frozenset(heads))
    if not heads:
        raise InputError("attention_maps() needs at least one head, e.g. {(0, 3)}")
    HeadIntervention(frozenset(heads)).check(vlm.n_layers, vlm.n_heads)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    rows = []
    for prompt in prompts:
        batch = vlm.encode([(prompt.image, prompt.prompt)])
        position = batch.seq_len - 1
        classes = token_classes(vlm, batch, [prompt.prompt])[0]
        layout = json.dumps([asdict(g) for g in image_layout(vlm, batch, 0, vlm.prepared_image(prompt.image).size)])
        weights = query_attention(vlm, batch, [[position]], layers=list(by_layer),
                                  reduce=lambda layer, w: w[0, by_layer[layer], 0].cpu())
        image = (classes == TOKEN_CLASSES.index("image")).numpy()
        for layer, chosen in by_layer.items():
            for head, row in zip(chosen, weights[layer]):
                values = row.numpy()
                rows.append({"sample_id": prompt.sample_id, "condition": prompt.condition, "truth": prompt.truth,
                             "claim": prompt.claim, "layer": layer,
                             "head": head, "query_position": position, "n_keys": len(values),
                             "image_share": float(values[image].sum()),
                             "weights": values.astype(np.float16).tobytes(),
                             "token_class": classes.numpy().astype(np.int8).tobytes(), "layout": layout})
        if on_prompt is not None:
            on_prompt()
    return typed_table(rows, _MAP_SCHEMA, prompts)



@locked_step  # one writer per run, for the whole step
def attention_maps_step(run_dir, *, heads: str, samples: int = 20, conditions=None, force: bool = False, vlm=None,
                        progress=None) -> dict[str, Any]:
    """`halluscope attention-maps`: attention rows of the first `samples` prompts for `heads`, and their maps.

    Writes attention_maps.parquet (`attention_maps`) and one figure per prompt under plots/attention_maps/.
    Resumes from finished shards under RUN/parts/attention-maps/.

    Args:
        run_dir: an eval run.
        heads: a set name from the run's ranking ("best3") or "L0H3,L11H15".
        samples: how many prompts (the first ones, after the condition filter).
        vlm: the run's model if already loaded; progress: a `halluscope.steps.Progress`.

    Returns:
        {"heads", "prompts", "figures" (directory)}.

    Raises:
        RunError: no run or no baseline table. InputError: bad heads, conditions or samples.

    Example:
        >>> attention_maps_step("runs/count", heads="L0H3,L11H15", samples=20)
    """
    from halluscope.analysis.probabilities import (SHARD_SIZE, compute_in_shards, parse_conditions,
                                                   prompts_of_run, resolve_run_heads)
    from halluscope.interventions.heads import format_heads
    from halluscope.plots.analysis_figures import plot_attention_map
    from halluscope.runs import Run
    from halluscope.steps import head_spec, no_progress, run_model

    if samples < 1:
        raise InputError(f"samples must be >= 1, got {samples}; pass e.g. --samples 20")
    run = Run.open(run_dir)
    baseline = run.read_table("baseline", hint="eval")
    head_set = resolve_run_heads(run, heads)
    prompts = prompts_of_run(run, baseline, conditions=conditions, limit=samples)
    run.begin_step("attention-maps", {"heads": format_heads(head_set), "spec": head_spec(heads, head_set), "samples": samples,
                                      "conditions": parse_conditions(conditions), "shard_size": SHARD_SIZE},
                   force=force)
    vlm = run_model(run, vlm)
    table = compute_in_shards(run, "attention-maps", prompts, progress=progress or no_progress,
                              description=f"maps {format_heads(head_set)}",
                              compute=lambda chunk, advance: attention_maps(vlm, chunk, head_set, on_prompt=advance))
    run.write_table("attention_maps", table)
    by_id = {p.sample_id: p for p in prompts}
    out = run.plots_dir / "attention_maps"
    for sample_id, rows in table.groupby("sample_id", sort=False):
        maps = [(f"L{row['layer']}H{row['head']}", grid_values(row)) for row in rows.to_dict("records")]
        prompt = by_id[sample_id]
        plot_attention_map(prompt.image, maps, out / f"{re.sub(r'[^A-Za-z0-9_.+-]', '_', sample_id)}.png",
                           title=f"{sample_id} ({prompt.condition}): {prompt.prompt}")
    result = {"heads": format_heads(head_set), "prompts": len(by_id), "figures": str(out)}
    run.finish_step("attention-maps", result)
    return result
