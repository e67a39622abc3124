"""The colour task: a neutral "What color" question, a truthful control and prompts that name a wrong colour at
distance d on the six-colour cycle, built from Visual-Counterfact's colour split or from synthetic scenes."""

from __future__ import annotations

import ast
import os
from typing import Any, Iterable, NamedTuple, Sequence

from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes
from halluscope.tasks._sources import (
    call_with_options,
    check_columns,
    finish,
    image_from_cell,
    positive_int,
    read_table,
    text_or_none,
)
from halluscope.tasks.sample import Sample, SampleList, SkippedRow, _missing, as_sample_image
from halluscope.tasks.scenes import SHAPES, balanced_pair, color_scene, derive_seed

__all__ = [
    "BASE_TEMPLATE",
    "COLOR_CYCLE",
    "DEFAULT_DISTANCES",
    "DESCRIBE_TEMPLATE",
    "VISUAL_COUNTERFACT_HUB_ID",
    "ColorItem",
    "build",
    "color_samples",
    "load_visual_counterfact",
    "parse_color_list",
    "shift_color",
    "synthetic_color",
    "validate_distances",
]

#: The colour cycle; a misleading colour at distance d is d steps backwards from the truth.
COLOR_CYCLE: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
#: The reference's three distances (its d = 0, 1, 2); d3 is the opposite colour.
DEFAULT_DISTANCES: tuple[int, ...] = (1, 2, 3)
#: The neutral question.
BASE_TEMPLATE = "What color is the {object} in the image?"
#: The describe prompt: with the true colour it is the control, with a shifted colour the misleading prompt.
DESCRIBE_TEMPLATE = "Describe the {color} {object}."
#: The dataset the reference used (split "color", 493 rows).
VISUAL_COUNTERFACT_HUB_ID = "mgolov/Visual-Counterfact"

_TABLE_HINT = (
    "Visual-Counterfact-style tables need an image column (HF image dict, bytes or path), an object column and a "
    "list-of-colours column; pass image_column=... / object_column=... / answer_column=... to name yours"
)


class ColorItem(NamedTuple):
    """One image of the colour task: id, image (path, bytes or PIL), true colour, singular noun, other true colours."""

    image_id: str
    image: Any
    color: str
    object: str
    aliases: tuple[str, ...] = ()


def shift_color(color: str, distance: int) -> str:
    """The colour `distance` steps backwards on `COLOR_CYCLE` (red -> purple -> blue -> green for d = 1, 2, 3).

    Raises:
        InputError: `color` is not in the cycle.

    Example:
        >>> [shift_color("red", d) for d in (1, 2, 3)]
        ['purple', 'blue', 'green']
    """
    if color not in COLOR_CYCLE:
        raise InputError(f"colour {color!r} is not in the cycle {list(COLOR_CYCLE)}; use one of those six")
    return COLOR_CYCLE[(COLOR_CYCLE.index(color) - distance) % len(COLOR_CYCLE)]


def validate_distances(distances: Iterable[int]) -> tuple[int, ...]:
    """Return `distances` as a tuple after checking they are distinct integers in 1..5 (at least one).

    Raises:
        InputError: a distance is outside 1..5 or not an int, one repeats, or none is given.

    Example:
        >>> validate_distances([1, 3])
        (1, 3)
    """
    if isinstance(distances, (str, bytes)) or not isinstance(distances, Iterable):
        raise InputError(f"distances = {distances!r}; expected a sequence of distinct integers in 1..5, e.g. (1, 2, 3)")
    values = tuple(distances)
    bad = [d for d in values if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 5]
    if bad or not values:
        raise InputError(
            f"distances = {values!r}; expected distinct integers in 1..5 (bad: {bad or 'none given'}); "
            "distance 6 would name the true colour"
        )
    repeated = sorted({d for d in values if values.count(d) > 1})
    if repeated:
        raise InputError(f"distances = {values!r} repeat {repeated}; give each distance once")
    return values


def color_samples(items: Iterable[ColorItem | tuple], distances: Iterable[int] = DEFAULT_DISTANCES) -> SampleList:
    """Build 1 base + 1 control + one misleading sample per distance for each image, in that order.

    A misleading colour that is one of the object's other true colours (`aliases`) would not mislead, so that
    prompt is left out for that image.

    Args:
        items: (image_id, image, colour, noun[, aliases]) tuples; `colour` is one of `COLOR_CYCLE`, `noun` the
            singular object noun, `aliases` the object's other true colours.
        distances: steps backwards on the cycle for the misleading colours.

    Returns:
        The samples; ids are ``"color-{image_id}-{condition}"`` with condition "base", "control" or "d1".."d5".

    Raises:
        InputError: a bad distance, colour, noun or image, or a repeated image id.

    Example:
        >>> [s.prompt for s in color_samples([("0001", b"png", "red", "apple")], distances=(3,))]
        ['What color is the apple in the image?', 'Describe the red apple.', 'Describe the green apple.']
    """
    distances = validate_distances(distances)
    samples: list[Sample] = []
    seen: set[str] = set()
    for item in items:
        if len(item) not in (4, 5):
            raise InputError(
                f"colour item {item!r:.80} has {len(item)} fields; expected (image_id, image, colour, noun[, aliases])"
            )
        image_id, image, color, noun = (str(item[0]), *item[1:4])
        aliases = tuple(dict.fromkeys(a for a in (item[4] if len(item) == 5 else ()) if a != color))
        if image_id in seen:
            raise InputError(f"image id {image_id!r} appears twice; give each image its own id")
        seen.add(image_id)
        if color not in COLOR_CYCLE:
            raise InputError(f"image {image_id!r}: colour {color!r} is not one of {list(COLOR_CYCLE)}")
        if not isinstance(noun, str) or not noun.strip():
            raise InputError(f"image {image_id!r}: object noun = {noun!r}; expected a non-empty noun such as 'apple'")
        noun, image = noun.strip(), as_sample_image(image)
        base = BASE_TEMPLATE.format(object=noun)
        samples.append(_color_sample(image_id, image, noun, color, aliases, "base", base, None))
        control = DESCRIBE_TEMPLATE.format(color=color, object=noun)
        samples.append(_color_sample(image_id, image, noun, color, aliases, "control", control, color))
        for d in distances:
            claim = shift_color(color, d)
            if claim in aliases:
                continue
            prompt = DESCRIBE_TEMPLATE.format(color=claim, object=noun)
            samples.append(_color_sample(image_id, image, noun, color, aliases, f"d{d}", prompt, claim))
    return SampleList(samples)


def synthetic_color(
    n_images: int | None = None,
    *,
    size: int = 224,
    seed: int = 0,
    shapes: Sequence[str] = SHAPES,
    distances: Iterable[int] = DEFAULT_DISTANCES,
) -> SampleList:
    """Colour samples over drawn scenes (one shape in one clean colour), balanced over the six colours and shapes.

    Image i gets its (colour, shape) from `balanced_pair`: colours and shapes are balanced (within one) for any
    n_images, and every 6*S images cover each pair once. It is drawn with `derive_seed(seed, "color", i)`, stored
    as PNG bytes, and named by the singular shape ("circle").

    Args:
        n_images: number of images; None gives one image per (colour, shape) pair.
        size: image side in pixels.
        seed: the whole set is a function of the arguments and this seed.
        shapes: shapes to cycle through, a subset of `SHAPES`.
        distances: see `color_samples`.

    Raises:
        InputError: a bad count, size, seed, shape or distance.

    Example:
        >>> len(synthetic_color(6, size=112))  # 6 images x (base, control, d1, d2, d3)
        30
    """
    distances = validate_distances(distances)
    values = (shapes,) if isinstance(shapes, str) else tuple(shapes)
    if not values or len(set(values)) != len(values) or any(s not in SHAPES for s in values):
        raise InputError(f"shapes = {values!r}; expected distinct names from {list(SHAPES)}")
    if n_images is None:
        n_images = len(COLOR_CYCLE) * len(values)
    positive_int(n_images, "n_images")
    items = []
    for i in range(n_images):
        j, k = balanced_pair(i, len(COLOR_CYCLE), len(values))
        color, shape = COLOR_CYCLE[j], values[k]
        image = color_scene(color, shape, size=size, seed=derive_seed(seed, "color", i))
        items.append(ColorItem(f"{i:04d}", image_to_png_bytes(image), color, shape))
    return color_samples(items, distances)


def parse_color_list(value: Any) -> tuple[str, ...]:
    """The colours of a Visual-Counterfact `correct_answer` cell, lowercased, in order.

    Accepts a real list/array, the string repr of a Python list (read with `ast.literal_eval`, never `eval`), or a
    bare colour word.

    Raises:
        InputError: the cell is empty or not a list of strings.

    Example:
        >>> parse_color_list("['Brown', 'white']")
        ('brown', 'white')
    """
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "("):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise InputError(
                    f"colour list {text!r:.80} is not a Python list literal; expected e.g. \"['red', 'white']\""
                ) from None
        else:
            value = [text]
    elif value is None or _missing(value):
        raise InputError("empty colour list; expected e.g. ['red', 'white']")
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise InputError(f"colour list {value!r:.80} is not a list; expected e.g. ['red', 'white']")
    colors = tuple(value)
    if not colors or not all(isinstance(c, str) and c.strip() for c in colors):
        raise InputError(f"colour list {colors!r:.80} must hold non-empty strings; expected e.g. ['red', 'white']")
    return tuple(c.strip().lower() for c in colors)


def load_visual_counterfact(
    source: str | os.PathLike,
    *,
    image_column: str = "original_image",
    object_column: str = "object",
    answer_column: str = "correct_answer",
    split: str = "color",
    limit: int | None = None,
    distances: Iterable[int] = DEFAULT_DISTANCES,
) -> SampleList:
    """Colour samples from Visual-Counterfact's colour split (or a table in its shape), on the original images.

    Rows whose first listed colour is one of `COLOR_CYCLE` are kept (the reference's filter); truth is that colour
    and `truth_aliases` the other listed colours. Row r gets image id ``f"{r:04d}"`` (its position in the table
    before filtering). Kept rows that cannot be used (undecodable image, malformed colour list, empty object) are
    skipped: ids and reasons in the result's `.skipped`, plus one `SkippedRowsWarning`.

    Args:
        source: a parquet / arrow / json / jsonl / csv file, an image folder with metadata, a folder of shards, or
            a Hub id such as `VISUAL_COUNTERFACT_HUB_ID` (needs the optional `datasets` package and network).
        image_column: HF image dicts {"bytes", "path"}, raw bytes, or paths relative to the table's folder.
        object_column: the singular object noun ("Granny Smith").
        answer_column: the true colours, a list or its string repr like "['brown', 'white']".
        split: the split to read from the Hub.
        limit: keep at most this many images; None keeps all.
        distances: see `color_samples`.

    Returns:
        A `SampleList` (a list of `Sample`) with `.skipped`: the `SkippedRow`s (row, image_id, reason).

    Raises:
        InputError: a missing path, unreadable table, missing columns, a hub failure, or no usable row.

    Example:
        >>> samples = load_visual_counterfact("mgolov/Visual-Counterfact")  # doctest: +SKIP
    """
    distances = validate_distances(distances)
    positive_int(limit, "limit", allow_none=True)
    table = read_table(source, split=split)
    frame = table.frame
    if image_column not in frame.columns and "file_name" in frame.columns:
        image_column = "file_name"
    check_columns(table, [image_column, object_column, answer_column], _TABLE_HINT)
    items: list[ColorItem] = []
    skipped: list[SkippedRow] = []
    n_seen = 0
    columns = (frame[image_column].tolist(), frame[object_column].tolist(), frame[answer_column].tolist())
    for row, (cell, noun, answer) in enumerate(zip(*columns)):
        if limit is not None and len(items) >= limit:
            break
        n_seen += 1
        image_id = f"{row:04d}"
        try:
            colors = parse_color_list(answer)
            if colors[0] not in COLOR_CYCLE:
                continue  # the dataset filter, not a defect: not reported
            noun = text_or_none(noun)
            if noun is None:
                raise InputError(f"empty object in column {object_column!r}")
            image = image_from_cell(cell, table.base_dir)
        except InputError as exc:
            skipped.append(SkippedRow(row, image_id, str(exc)))
            continue
        items.append(ColorItem(image_id, image, colors[0], noun, colors[1:]))
    return finish(color_samples(items, distances), skipped, table.label, n_seen)


def build(
    data: str, *, n: int | None = None, seed: int = 0, distances: Iterable[int] | None = None, **options: Any
) -> SampleList:
    """The registry entry: "synthetic" -> `synthetic_color(n, seed=...)`, else `load_visual_counterfact(data, limit=n)`.

    Extra `options` go to the chosen function by keyword (e.g. size, image_column).
    """
    distances = DEFAULT_DISTANCES if distances is None else distances
    if data == "synthetic":
        return call_with_options(synthetic_color, options, n, seed=seed, distances=distances)
    return call_with_options(load_visual_counterfact, options, data, limit=n, distances=distances)


def _color_sample(
    image_id: str,
    image: str | bytes,
    noun: str,
    color: str,
    aliases: tuple[str, ...],
    condition: str,
    prompt: str,
    claim: str | None,
) -> Sample:
    return Sample(
        id=f"color-{image_id}-{condition}",
        image_id=image_id,
        image=image,
        object=noun,
        truth=color,
        claim=claim,
        prompt=prompt,
        condition=condition,
        task="color",
        truth_aliases=aliases,
    )
