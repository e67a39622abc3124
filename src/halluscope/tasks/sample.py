"""The `Sample` record (one image + one prompt to evaluate), the list type task builders return (with the rows
a loader had to skip), and the lossless conversion of samples to and from a parquet-safe DataFrame."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal

from halluscope.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FRAME_COLUMNS",
    "INT_VALUED_TASKS",
    "Sample",
    "SampleList",
    "SkippedRow",
    "SkippedRowsWarning",
    "as_sample_image",
    "samples_from_frame",
    "samples_to_frame",
]

#: Tasks whose `truth` and `claim` are ints (counts); every other task uses strings. The samples frame
#: stores both as text and uses this set to turn them back into ints.
INT_VALUED_TASKS = frozenset({"count"})

#: Columns of `samples_to_frame`, in order. `truth`/`claim` are text (claim is null for the base prompt),
#: `truth_aliases` is a list of strings, and exactly one of `image_path` (text) / `image_bytes` (binary) is set.
FRAME_COLUMNS = (
    "id",
    "image_id",
    "task",
    "condition",
    "object",
    "truth",
    "claim",
    "truth_aliases",
    "prompt",
    "image_path",
    "image_bytes",
)

_TEXT_FIELDS = ("id", "image_id", "object", "prompt", "condition", "task")


@dataclass(frozen=True)
class Sample:
    """One (image, prompt) pair to evaluate, with the true answer and what the prompt claims.

    Args:
        id: unique within a run, e.g. ``"count-0003-+2"``.
        image_id: groups the prompts asked about one image, e.g. ``"0003"``.
        image: a file path or encoded image bytes (PNG/JPEG/...); decode with `halluscope.images.open_image`.
        object: the noun as used in the prompt (plural for counting, singular for colour).
        truth: the true count (int) or the true colour (str).
        claim: what the prompt asserts (same type as `truth`); None for the base question.
        prompt: the exact user text sent with the image.
        condition: ``"base"``, ``"control"`` (the prompt claims the truth), ``"+k"`` (count offset) or ``"dk"``
            (colour distance).
        task: ``"count"`` or ``"color"``.
        truth_aliases: other answers that are also true, e.g. the other colours of a multi-coloured object.

    Raises:
        InputError: a field has the wrong type or is empty.

    Example:
        >>> Sample("count-0001-+1", "0001", "a.png", "apples", 3, 4, "Describe the 4 apples in this image.",
        ...        "+1", "count").kind
        'misleading'
    """

    id: str
    image_id: str
    image: str | bytes = field(repr=False)
    object: str
    truth: int | str
    claim: int | str | None
    prompt: str
    condition: str
    task: str
    truth_aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"Sample.{name} = {value!r}; expected a non-empty string")
        if isinstance(self.image, (bytearray, memoryview)):
            object.__setattr__(self, "image", bytes(self.image))
        elif isinstance(self.image, os.PathLike):
            object.__setattr__(self, "image", os.fspath(self.image))
        if not isinstance(self.image, (str, bytes)) or not self.image:
            raise InputError(
                f"Sample {self.id!r}: image of type {type(self.image).__name__} is not usable; "
                "expected a non-empty file path or encoded image bytes (encode PIL images with image_to_png_bytes)"
            )
        value_type: type = int if self.task in INT_VALUED_TASKS else str
        type_name = "an int" if value_type is int else "a str"
        if not _is_type(self.truth, value_type):
            raise InputError(f"Sample {self.id!r}: truth = {self.truth!r}; a {self.task!r} sample needs {type_name}")
        if self.claim is not None and not _is_type(self.claim, value_type):
            raise InputError(
                f"Sample {self.id!r}: claim = {self.claim!r}; a {self.task!r} sample needs {type_name} or None"
            )
        aliases = tuple(self.truth_aliases)
        if not all(isinstance(a, str) and a for a in aliases):
            raise InputError(f"Sample {self.id!r}: truth_aliases = {aliases!r}; expected non-empty strings")
        object.__setattr__(self, "truth_aliases", aliases)

    @property
    def kind(self) -> Literal["base", "control", "misleading"]:
        """``"base"`` (neutral question), ``"control"`` (truthful claim) or ``"misleading"`` (false claim)."""
        if self.condition in ("base", "control"):
            return self.condition  # type: ignore[return-value]
        return "misleading"


@dataclass(frozen=True)
class SkippedRow:
    """A source row a loader could not turn into samples: its position in the table, its image id, and why."""

    row: int
    image_id: str
    reason: str


class SkippedRowsWarning(UserWarning):
    """Warned when a loader skips rows (undecodable image, bad count, ...); the ids are in `.skipped`."""

    def __init__(self, message: str, skipped: tuple[SkippedRow, ...] = ()) -> None:
        super().__init__(message)
        self.skipped = skipped


class SampleList(list):
    """The list of `Sample`s a task builder returns, plus the source rows it skipped (`.skipped`).

    It is a plain `list` in every other respect; slicing or copying gives a plain list without `.skipped`.

    Example:
        >>> samples = SampleList([], skipped=(SkippedRow(4, "0004", "cannot decode image"),))
        >>> [s.image_id for s in samples.skipped]
        ['0004']
    """

    skipped: tuple[SkippedRow, ...]

    def __init__(self, samples: Iterable[Sample] = (), skipped: Iterable[SkippedRow] = ()) -> None:
        super().__init__(samples)
        self.skipped = tuple(skipped)


def as_sample_image(image: Any) -> str | bytes:
    """Normalise an image to what `Sample.image` holds: a path string or encoded bytes (PIL -> PNG bytes).

    Raises:
        InputError: the value is neither a path, bytes nor a PIL image.
    """
    if isinstance(image, (str, bytes)):
        return image
    if isinstance(image, (bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, os.PathLike):
        return os.fspath(image)
    from PIL import Image

    if isinstance(image, Image.Image):
        from halluscope.images import image_to_png_bytes

        return image_to_png_bytes(image)
    raise InputError(
        f"image of type {type(image).__name__} is not usable; pass a file path, encoded bytes or a PIL image"
    )


def samples_to_frame(samples: Iterable[Sample]) -> pd.DataFrame:
    """One row per sample with the columns of `FRAME_COLUMNS`; safe to write with `DataFrame.to_parquet`.

    `truth` and `claim` are stored as text (`samples_from_frame` turns counts back into ints); the image goes
    to `image_path` (a path) or `image_bytes` (encoded bytes), the other one is null.

    Raises:
        InputError: two samples share an id, or an item is not a `Sample`.

    Example:
        >>> from halluscope.tasks import synthetic_counting
        >>> samples = synthetic_counting(1, size=112, offsets=(1,))
        >>> samples_from_frame(samples_to_frame(samples)) == samples
        True
    """
    import pandas as pd

    samples = list(samples)
    for i, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            raise InputError(
                f"item {i} is a {type(sample).__name__}, not a Sample; pass the samples a task builder returned"
            )
    duplicates = sorted(k for k, v in Counter(s.id for s in samples).items() if v > 1)
    if duplicates:
        raise InputError(
            f"sample ids must be unique in a run; repeated: {duplicates[:5]}; give each (image, prompt) its own id"
        )
    columns: dict[str, list[Any]] = {name: [] for name in FRAME_COLUMNS}
    for s in samples:
        columns["id"].append(s.id)
        columns["image_id"].append(s.image_id)
        columns["task"].append(s.task)
        columns["condition"].append(s.condition)
        columns["object"].append(s.object)
        columns["truth"].append(str(s.truth))
        columns["claim"].append(None if s.claim is None else str(s.claim))
        columns["truth_aliases"].append(list(s.truth_aliases))
        columns["prompt"].append(s.prompt)
        columns["image_path"].append(s.image if isinstance(s.image, str) else None)
        columns["image_bytes"].append(s.image if isinstance(s.image, bytes) else None)
    frame = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})
    return frame


def samples_from_frame(frame: pd.DataFrame) -> list[Sample]:
    """Rebuild the samples of a `samples_to_frame` table (also after a parquet round trip), exactly.

    Raises:
        InputError: a needed column is missing, or a row does not make a valid `Sample`.
    """
    needed = [c for c in FRAME_COLUMNS if c != "truth_aliases"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(
            f"samples table lacks columns {missing}; found {list(frame.columns)}; "
            "pass a table written from samples_to_frame (e.g. a run's samples.parquet)"
        )
    has_aliases = "truth_aliases" in frame.columns
    samples = []
    for i, row in enumerate(frame.to_dict("records")):
        try:
            samples.append(_sample_from_row(row, has_aliases))
        except InputError as exc:
            raise InputError(f"row {i} (id {row.get('id')!r}) of the samples table: {exc}") from None
    return samples


def _sample_from_row(row: dict[str, Any], has_aliases: bool) -> Sample:
    task = row["task"]
    image_bytes, image_path = row["image_bytes"], row["image_path"]
    if not _missing(image_bytes):
        image = bytes(image_bytes)
    elif not _missing(image_path):
        image = str(image_path)
    else:
        raise InputError("both image_path and image_bytes are null; expected exactly one of them to be set")
    aliases = row["truth_aliases"] if has_aliases else None
    return Sample(
        id=str(row["id"]),
        image_id=str(row["image_id"]),
        image=image,
        object=str(row["object"]),
        truth=_parse_value(row["truth"], task),
        claim=None if _missing(row["claim"]) else _parse_value(row["claim"], task),
        prompt=str(row["prompt"]),
        condition=str(row["condition"]),
        task=str(task),
        truth_aliases=() if aliases is None or _missing(aliases) else tuple(str(a) for a in aliases),
    )


def _parse_value(value: Any, task: str) -> int | str:
    if task not in INT_VALUED_TASKS:
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"value {value!r} is not a number; a {task!r} sample's truth/claim must be an integer"
        ) from None
    if not number.is_integer():
        raise InputError(f"value {value!r} is not an integer; a {task!r} sample's truth/claim must be an integer")
    return int(number)


def _missing(value: Any) -> bool:
    """True for None / NaN / pd.NA scalars (never for arrays or bytes)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in ("NAType", "NaTType")


def _is_type(value: Any, value_type: type) -> bool:
    return isinstance(value, value_type) and not isinstance(value, bool)
