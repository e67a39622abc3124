"""Reading a dataset table for the loaders: a local parquet / arrow / json / jsonl / csv file, an image folder
(HF imagefolder style, `metadata.csv|jsonl|parquet` with a `file_name` column), a folder of parquet/arrow shards,
or a Hugging Face Hub id (through the optional `datasets` package). Also turns one image cell (HF image dict,
bytes, path, PIL image) into what `Sample.image` holds, and the shared skip-and-report bookkeeping."""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from halluscope.errors import InputError
from halluscope.images import open_image
from halluscope.tasks.sample import SampleList, SkippedRow, SkippedRowsWarning, _missing, as_sample_image

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Table",
    "call_with_options",
    "cell_name",
    "check_columns",
    "finish",
    "image_from_cell",
    "is_hub_id",
    "positive_int",
    "read_table",
    "text_or_none",
]

_FILE_KINDS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_HINT = "pass a local parquet/arrow/json/jsonl/csv file or an image folder with metadata.csv (file_name column)"


@dataclass(frozen=True)
class Table:
    """A loaded table, the folder its relative image paths are resolved against, and a label for messages."""

    frame: pd.DataFrame
    base_dir: Path | None
    label: str


def is_hub_id(source: str) -> bool:
    """True for strings shaped like ``owner/name`` that do not end in a known table suffix."""
    return bool(_HUB_ID.match(source)) and Path(source).suffix.lower() not in _FILE_KINDS


def read_table(source: str | os.PathLike, *, split: str) -> Table:
    """Read `source` (file, folder or hub id) into a DataFrame; image columns are left undecoded.

    Raises:
        InputError: the path does not exist (and is not a hub id), the format is unknown or unreadable, or the
            hub cannot be used (no `datasets`, unreachable, unknown id).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return Table(_read_file(path), path.parent.resolve(), repr(text))
    if path.is_dir():
        return _read_dir(path, split)
    if is_hub_id(text):
        return Table(_read_hub(text, split), None, repr(text))
    raise InputError(
        f"dataset path not found: {text!r}; {_LOCAL_HINT}, or a Hugging Face Hub id like 'nielsr/countbench'"
    )


def _read_file(path: Path) -> pd.DataFrame:
    import pandas as pd
    import pyarrow as pa

    kind = _FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"unknown table format {path.suffix!r} for {str(path)!r}; expected one of {sorted(_FILE_KINDS)}; "
            f"{_LOCAL_HINT}"
        )
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "arrow":
            return _read_arrow(path).to_pandas()
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "jsonl":
            return pd.read_json(path, lines=True)
        return _read_json(path)
    except (ValueError, OSError, pa.ArrowException) as exc:
        raise InputError(
            f"cannot read {str(path)!r} as {kind}: {_one_line(exc)}; check the file or convert it to parquet"
        ) from None


def _read_arrow(path: Path) -> Any:
    """Arrow IPC in stream format (what `datasets` writes) or file format (feather v2)."""
    import pyarrow as pa
    import pyarrow.ipc

    try:
        with pa.memory_map(str(path)) as source:
            return pyarrow.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return pyarrow.ipc.open_file(source).read_all()


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON list of records or dict of columns; falls back to JSON lines."""
    import pandas as pd

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return pd.read_json(path, lines=True)
    if isinstance(data, list):
        return pd.DataFrame.from_records(data)
    if isinstance(data, dict):
        return pd.DataFrame(data)
    raise InputError(
        f"{str(path)!r} holds a JSON {type(data).__name__}; expected a list of records or a dict of columns"
    )


def _read_dir(path: Path, split: str) -> Table:
    import pandas as pd

    for name in _METADATA_FILES:
        meta = path / name
        if meta.is_file():
            return Table(_read_file(meta), path.resolve(), repr(str(meta)))
    shards: list[Path] = []
    for folder in (path, path / "data"):
        for suffix in (".parquet", ".arrow"):
            shards = sorted(folder.glob(f"*{suffix}"))
            if shards:
                break
        if shards:
            break
    # HF hub snapshots name shards by split (train-00000-of-00001.parquet): keep the requested split
    in_split = [p for p in shards if p.name.startswith(f"{split}-") or p.name.startswith(f"{split}.")]
    shards = in_split or shards
    if not shards:
        raise InputError(
            f"folder {str(path)!r} has no {'/'.join(_METADATA_FILES)} and no .parquet/.arrow files; {_LOCAL_HINT}"
        )
    frames = [_read_file(p) for p in shards]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return Table(frame, shards[0].parent.resolve(), repr(str(path)))


def _read_hub(hub_id: str, split: str) -> pd.DataFrame:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{hub_id!r} is not a local file or folder, and reading it from the Hugging Face Hub needs the optional "
            f"`datasets` package (pip install datasets); or {_LOCAL_HINT}"
        ) from None
    try:
        dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # network, auth, unknown id: re-raised with the user's input attached, never swallowed
        raise InputError(
            f"cannot load {hub_id!r} (split {split!r}) from the Hugging Face Hub: {_one_line(exc)}; "
            f"check the id and your connection, or {_LOCAL_HINT}"
        ) from exc
    # arrow format keeps image columns as {"bytes", "path"} dicts instead of decoding them to PIL
    return dataset.with_format("arrow")[:].to_pandas()


def check_columns(table: Table, needed: Sequence[str], hint: str) -> None:
    """Raise InputError naming the columns found and the ones needed when any of `needed` is absent."""
    found = [str(c) for c in table.frame.columns]
    missing = [c for c in needed if c not in found]
    if missing:
        close = {m: difflib.get_close_matches(m, found, n=1) for m in missing}
        guess = "; ".join(f"{m!r} looks like {c[0]!r}" for m, c in close.items() if c)
        raise InputError(
            f"table {table.label} lacks columns {missing} (needed: {list(needed)}); found {found}"
            f"{'; ' + guess if guess else ''}; {hint}"
        )


def image_from_cell(value: Any, base_dir: Path | None) -> str | bytes:
    """Turn one image cell into a path string or encoded bytes and check that it decodes.

    Accepts an HF image dict ``{"bytes": ..., "path": ...}`` (bytes win), raw bytes, a path (relative paths are
    resolved against `base_dir`, the table's folder) or a PIL image.

    Raises:
        InputError: the cell is empty, of an unknown type, a missing file, or not a decodable image.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = data if data is not None and not _missing(data) and len(data) else path
    if value is None or _missing(value) or (isinstance(value, (str, bytes)) and not value):
        raise InputError("empty image cell; expected an image dict, bytes or a path")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        image: str | bytes = str(path)
    else:
        image = as_sample_image(value)
    open_image(image)  # raises InputError for a missing or undecodable image
    return image


def finish(samples: Iterable[Any], skipped: list[SkippedRow], label: str, n_rows: int) -> SampleList:
    """Wrap the samples with the skipped rows; warn (SkippedRowsWarning) when any were skipped, fail when all were."""
    result = SampleList(samples, skipped)
    if skipped:
        shown = ", ".join(s.image_id for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        if not result:
            reasons = "; ".join(f"row {s.row}: {s.reason}" for s in skipped[:3])
            raise InputError(
                f"no usable rows in {label}: all {len(skipped)} were skipped ({reasons}); check the columns and images"
            )
        message = (
            f"skipped {len(skipped)} of {n_rows} rows of {label} (image ids {shown}); "
            "the reasons are in the returned list's .skipped"
        )
        warnings.warn(SkippedRowsWarning(message, tuple(skipped)), stacklevel=3)
    elif not result:
        raise InputError(f"no usable rows in {label}; check that the table is not empty and the filters match")
    return result


def call_with_options(function: Callable[..., Any], options: dict[str, Any], /, *args: Any, **fixed: Any) -> Any:
    """Call `function(*args, **fixed, **options)`, turning an unknown option name into an InputError."""
    accepted = [
        p.name for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for name in options:
        if name in fixed:
            raise InputError(f"option {name!r} is set by build_task's own argument; pass it there, not in options")
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = [a for a in accepted if a not in fixed]
            raise InputError(f"unknown option {name!r}{hint} for {function.__name__}; valid options: {valid}")
    return function(*args, **fixed, **options)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    """Return `value` if it is an int >= 1 (or None when allowed); raise InputError naming `name` otherwise."""
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        expected = "an integer >= 1" + (" or None" if allow_none else "")
        raise InputError(f"{name} = {value!r}; expected {expected}")
    return value


def cell_name(value: Any) -> str | None:
    """The path an image cell names (a path cell or an HF dict's "path"), for lookups by file name."""
    if isinstance(value, dict):
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and not _missing(value):
        return os.fspath(value)
    return None


def text_or_none(value: Any) -> str | None:
    """A stripped non-empty string, or None for missing/empty/non-string cells."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None
