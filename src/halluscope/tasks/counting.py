"""The counting task: a neutral "How many" question, a truthful control and prompts that overstate the count by
fixed offsets, built from CountBench (or any table in its shape) or from synthetic shape scenes."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes
from halluscope.tasks._sources import (
    call_with_options,
    cell_name,
    check_columns,
    finish,
    image_from_cell,
    positive_int,
    read_table,
    text_or_none,
)
from halluscope.tasks.sample import Sample, SampleList, SkippedRow, _missing, as_sample_image
from halluscope.tasks.scenes import SHAPE_PLURALS, SHAPES, balanced_pair, count_scene, derive_seed, max_objects

__all__ = [
    "BASE_TEMPLATE",
    "COUNTBENCH_HUB_ID",
    "DEFAULT_OFFSETS",
    "DESCRIBE_TEMPLATE",
    "CountItem",
    "build",
    "counting_samples",
    "load_countbench",
    "synthetic_counting",
    "validate_offsets",
]

#: The neutral question (the reference's `prompt_count`).
BASE_TEMPLATE = "How many {obj} are in this image?"
#: The describe prompt: with the true count it is the control, with count + k the misleading prompt.
DESCRIBE_TEMPLATE = "Describe the {n} {obj} in this image."
#: Overstatement offsets k of the reference study (8 misleading prompts per image).
DEFAULT_OFFSETS: tuple[int, ...] = (1, 2, 3, 4, 5, 10, 20, 50)
#: The CountBench copy on the Hugging Face Hub the reference used (split "train", 540 rows).
COUNTBENCH_HUB_ID = "nielsr/countbench"

_TABLE_HINT = (
    "CountBench-style tables need an image column (HF image dict, bytes or path) and a count column; "
    "pass image_column=... / count_column=... to name yours"
)


class CountItem(NamedTuple):
    """One image of the counting task: its id, the image (path, bytes or PIL), the true count and the plural noun."""

    image_id: str
    image: Any
    count: int
    object: str


def validate_offsets(offsets: Iterable[int]) -> tuple[int, ...]:
    """Return `offsets` as a tuple after checking they are distinct positive integers (at least one).

    Raises:
        InputError: an offset is not a positive int, or one repeats, or none is given.

    Example:
        >>> validate_offsets([1, 2, 10])
        (1, 2, 10)
    """
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Iterable):
        raise InputError(f"offsets = {offsets!r}; expected a sequence of distinct positive integers, e.g. (1, 2, 3)")
    values = tuple(offsets)
    bad = [k for k in values if not isinstance(k, int) or isinstance(k, bool) or k < 1]
    if bad or not values:
        raise InputError(
            f"offsets = {values!r}; expected distinct positive integers (bad: {bad or 'none given'}), e.g. "
            f"{DEFAULT_OFFSETS}"
        )
    repeated = sorted({k for k in values if values.count(k) > 1})
    if repeated:
        raise InputError(f"offsets = {values!r} repeat {repeated}; give each offset once")
    return values


def counting_samples(items: Iterable[CountItem | tuple], offsets: Iterable[int] = DEFAULT_OFFSETS) -> SampleList:
    """Build 1 base + 1 control + len(offsets) misleading samples per image, in that order.

    Args:
        items: (image_id, image, count, noun) tuples; `image` is a path, encoded bytes or a PIL image, `count`
            the true count (>= 1), `noun` the plural object noun used in the prompt.
        offsets: the overstatements k; the misleading prompt claims count + k.

    Returns:
        The samples; ids are ``"count-{image_id}-{condition}"`` with condition "base", "control" or "+k".

    Raises:
        InputError: a bad offset, count, noun or image, or a repeated image id.

    Example:
        >>> for s in counting_samples([("0001", b"png", 3, "apples")], offsets=(2,)):
        ...     print(s.id, "|", s.prompt)
        count-0001-base | How many apples are in this image?
        count-0001-control | Describe the 3 apples in this image.
        count-0001-+2 | Describe the 5 apples in this image.
    """
    offsets = validate_offsets(offsets)
    samples: list[Sample] = []
    seen: set[str] = set()
    for item in items:
        if len(item) != 4:
            raise InputError(
                f"counting item {item!r:.80} has {len(item)} fields; expected (image_id, image, count, noun)"
            )
        image_id, image, count, noun = item
        image_id = str(image_id)
        if image_id in seen:
            raise InputError(f"image id {image_id!r} appears twice; give each image its own id")
        seen.add(image_id)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InputError(f"image {image_id!r}: count = {count!r}; expected an integer >= 1")
        if not isinstance(noun, str) or not noun.strip():
            raise InputError(
                f"image {image_id!r}: object noun = {noun!r}; expected a non-empty plural noun such as 'apples'"
            )
        noun, image = noun.strip(), as_sample_image(image)

        samples.append(_count_sample(image_id, image, noun, count, "base", BASE_TEMPLATE.format(obj=noun), None))
        control = DESCRIBE_TEMPLATE.format(n=count, obj=noun)
        samples.append(_count_sample(image_id, image, noun, count, "control", control, count))
        for k in offsets:
            prompt = DESCRIBE_TEMPLATE.format(n=count + k, obj=noun)
            samples.append(_count_sample(image_id, image, noun, count, f"+{k}", prompt, count + k))
    return SampleList(samples)


def synthetic_counting(
    n_images: int | None = None,
    *,
    max_count: int = 9,
    min_count: int = 1,
    size: int = 224,
    seed: int = 0,
    shapes: Sequence[str] = SHAPES,
    offsets: Iterable[int] = DEFAULT_OFFSETS,
) -> SampleList:
    """Counting samples over drawn scenes, balanced over counts min_count..max_count and over shapes.

    Image i gets its (count, shape) from `balanced_pair`: counts and shapes are balanced (within one) for any
    n_images, and every C*S images (C counts, S shapes) cover each pair once. It is drawn with
    `derive_seed(seed, "count", i)` and stored as PNG bytes. Nouns are the shapes' plurals ("circles"), also for a
    count of 1.

    Args:
        n_images: number of images; None gives one image per (count, shape) pair.
        max_count, min_count: the range of true counts (max_count <= `max_objects(size)`).
        size: image side in pixels (112 works: objects stay >= 10 px).
        seed: the whole set is a function of the arguments and this seed.
        shapes: shapes to cycle through, a subset of `SHAPES`.
        offsets: the overstatements k, see `counting_samples`.

    Raises:
        InputError: a bad count range, shape, size, seed or offset.

    Example:
        >>> len(synthetic_counting(4, max_count=2, size=112, offsets=(1, 2)))  # 4 images x (base, control, +1, +2)
        16
    """
    offsets = validate_offsets(offsets)
    positive_int(min_count, "min_count")
    positive_int(max_count, "max_count")
    if max_count < min_count:
        raise InputError(f"max_count = {max_count} < min_count = {min_count}; expected min_count <= max_count")
    if max_count > max_objects(size):
        raise InputError(
            f"max_count = {max_count} objects do not fit a {size}x{size} image (at most {max_objects(size)}); "
            "lower max_count or raise size"
        )
    shapes = _check_shapes(shapes)
    counts = range(min_count, max_count + 1)
    if n_images is None:
        n_images = len(counts) * len(shapes)
    positive_int(n_images, "n_images")
    items = []
    for i in range(n_images):
        j, k = balanced_pair(i, len(counts), len(shapes))
        shape = shapes[k]
        image = count_scene(counts[j], shape, size=size, seed=derive_seed(seed, "count", i))
        items.append(CountItem(f"{i:04d}", image_to_png_bytes(image), counts[j], SHAPE_PLURALS[shape]))
    return counting_samples(items, offsets)


def load_countbench(
    source: str | os.PathLike,
    *,
    object_column: str = "object",
    objects: Mapping[int | str, str] | None = None,
    name_objects: Callable[[list[str | bytes]], Sequence[str]] | None = None,
    count_column: str = "number",
    image_column: str = "image",
    split: str = "train",
    limit: int | None = None,
    offsets: Iterable[int] = DEFAULT_OFFSETS,
) -> SampleList:
    """Counting samples from a CountBench-style table: one image, its true count and the counted object per row.

    Row r gets image id ``f"{r:04d}"`` (its position in the table, like the reference's NNNN.png). Rows that
    cannot be used (undecodable or missing image, bad count, no noun) are skipped: their ids and reasons are in
    the result's `.skipped`, and one `SkippedRowsWarning` lists them. The load fails only if no row is usable.

    Args:
        source: a parquet / arrow / json / jsonl / csv file, an image folder with metadata.csv|jsonl|parquet
            (HF imagefolder: a `file_name` column), a folder of parquet/arrow shards, or a Hub id such as
            `COUNTBENCH_HUB_ID` (needs the optional `datasets` package and network).
        object_column: column with the plural noun ("apples"). Rows where it is absent or empty fall back to
            `objects`, then to `name_objects`.
        objects: nouns keyed by row index (int or its digits), image id ("0003") or the image's path/file name
            in the table.
        name_objects: called once with the images (paths or bytes) of the rows still lacking a noun; returns one
            plural noun per image (the CLI backs it with the VLM itself).
        count_column: column with the true count (an integer >= 1).
        image_column: column with HF image dicts {"bytes", "path"}, raw bytes, or paths (relative to the table's
            folder); an image folder's `file_name` column is used when this column is absent.
        split: the split to read from the Hub (ignored for local files, except to pick shards in a folder).
        limit: keep at most this many images (counting only usable rows); None keeps all.
        offsets: the overstatements k, see `counting_samples`.

    Returns:
        A `SampleList` (a list of `Sample`) with `.skipped`: the `SkippedRow`s (row, image_id, reason).

    Raises:
        InputError: a missing path, unreadable table, missing columns, no way to name objects, a hub failure, a bad
            `name_objects` result, or no usable row at all.

    Example:
        >>> samples = load_countbench("countbench.parquet", object_column="gpt_named_object")  # doctest: +SKIP
    """
    offsets = validate_offsets(offsets)
    positive_int(limit, "limit", allow_none=True)
    table = read_table(source, split=split)
    frame = table.frame
    if image_column not in frame.columns and "file_name" in frame.columns:
        image_column = "file_name"
    check_columns(table, [image_column, count_column], _TABLE_HINT)
    has_nouns = object_column in frame.columns
    if not has_nouns and objects is None and name_objects is None:
        raise InputError(
            f"table {table.label} has no object column {object_column!r} (found {[str(c) for c in frame.columns]}); "
            "name the column with object_column=..., or pass objects={row index or image id: 'apples'} or "
            "name_objects=<callable naming each image's object>"
        )
    if objects is not None and not isinstance(objects, Mapping):
        raise InputError(
            f"objects is a {type(objects).__name__}; expected a mapping from row index or image id to a noun"
        )

    nouns = frame[object_column].tolist() if has_nouns else [None] * len(frame)
    rows: list[list[Any]] = []  # [row, image_id, image, count, noun or None]
    skipped: list[SkippedRow] = []
    n_seen = 0
    columns = (frame[image_column].tolist(), frame[count_column].tolist(), nouns)
    for row, (cell, count_value, noun_value) in enumerate(zip(*columns)):
        if limit is not None and len(rows) >= limit:
            break
        n_seen += 1
        image_id = f"{row:04d}"
        try:
            count = _as_count(count_value, count_column)
            image = image_from_cell(cell, table.base_dir)
        except InputError as exc:
            skipped.append(SkippedRow(row, image_id, str(exc)))
            continue
        noun = text_or_none(noun_value) or _lookup_noun(objects, row, image_id, cell_name(cell))
        rows.append([row, image_id, image, count, noun])

    unnamed = [r for r in rows if r[4] is None]
    if unnamed and name_objects is not None:
        names = name_objects([r[2] for r in unnamed])
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or len(names) != len(unnamed):
            is_list = isinstance(names, Sequence) and not isinstance(names, (str, bytes))
            got = len(names) if is_list else repr(names)[:40]
            raise InputError(
                f"name_objects returned {got} names for {len(unnamed)} images; it must return one noun per image, in "
                "order"
            )
        for r, name in zip(unnamed, names):
            r[4] = text_or_none(name)

    items = []
    for row, image_id, image, count, noun in rows:
        if noun is None:
            reason = (
                f"no object noun: column {object_column!r} is empty or absent and neither objects nor name_objects "
                "named it"
            )
            skipped.append(SkippedRow(row, image_id, reason))
        else:
            items.append(CountItem(image_id, image, count, noun))
    skipped.sort(key=lambda s: s.row)
    return finish(counting_samples(items, offsets), skipped, table.label, n_seen)


def build(
    data: str, *, n: int | None = None, seed: int = 0, offsets: Iterable[int] | None = None, **options: Any
) -> SampleList:
    """The registry entry: "synthetic" -> `synthetic_counting(n, seed=...)`, else `load_countbench(data, limit=n)`.

    Extra `options` go to the chosen function by keyword (e.g. size, max_count, object_column).
    """
    offsets = DEFAULT_OFFSETS if offsets is None else offsets
    if data == "synthetic":
        return call_with_options(synthetic_counting, options, n, seed=seed, offsets=offsets)
    return call_with_options(load_countbench, options, data, limit=n, offsets=offsets)


def _count_sample(
    image_id: str, image: str | bytes, noun: str, count: int, condition: str, prompt: str, claim: int | None
) -> Sample:
    return Sample(
        id=f"count-{image_id}-{condition}",
        image_id=image_id,
        image=image,
        object=noun,
        truth=count,
        claim=claim,
        prompt=prompt,
        condition=condition,
        task="count",
    )


def _as_count(value: Any, column: str) -> int:
    if isinstance(value, bool) or value is None or _missing(value):
        raise InputError(f"count {value!r} in column {column!r} is not an integer >= 1")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"count {value!r} in column {column!r} is not an integer >= 1") from None
    if not number.is_integer() or number < 1:
        raise InputError(f"count {value!r} in column {column!r} is not an integer >= 1")
    return int(number)


def _lookup_noun(objects: Mapping[int | str, str] | None, row: int, image_id: str, name: str | None) -> str | None:
    if objects is None:
        return None
    keys: list[int | str] = [row, str(row), image_id]  # str(row): JSON mappings have string keys
    if name is not None:
        keys += [name, os.path.basename(name)]
    for key in keys:
        if key in objects:
            return text_or_none(objects[key])
    return None


def _check_shapes(shapes: Sequence[str]) -> tuple[str, ...]:
    values = (shapes,) if isinstance(shapes, str) else tuple(shapes)
    unknown = [s for s in values if s not in SHAPE_PLURALS]
    if unknown or not values or len(set(values)) != len(values):
        raise InputError(f"shapes = {values!r}; expected distinct names from {list(SHAPES)}")
    return values
