"""The run directory: one self-describing, resumable folder that several commands fill in sequence.

A run holds `manifest.json` (what ran, on what, with which versions), one parquet file per table, JSON
documents, `parts/<step>/` shards for resumable work and `plots/`. Every file is written to a temporary
name in the same directory and moved into place with `os.replace`, so a reader (or a restarted command)
sees each file either complete or not at all, even after `kill -9`.

Layout::

    <run>/manifest.json
    <run>/<table>.parquet, <run>/<name>.json
    <run>/parts/<step>/<key>.parquet
    <run>/plots/*.png

One process writes the manifest at a time (the command that owns the step); shards may be written by
many processes at once, as long as each key is written by one of them.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd

from halluscope.errors import InputError, RunError

__all__ = ["MANIFEST_NAME", "TABLE_PRODUCERS", "Parts", "Run", "to_jsonable"]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1

#: Which CLI command writes each well-known table; used to say how to produce a missing one.
TABLE_PRODUCERS: dict[str, str] = {
    "samples": "eval",
    "baseline": "eval",
    "summary": "eval",
    "sweep": "sweep",
    "heads": "rank",
    "ranking": "rank",
    "confirm": "confirm",
    "ablation": "ablate",
    "attention": "attention",
    "attention_maps": "attention-maps",
    "probs": "probs",
    "lens": "lens",
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TMP_SUFFIX = ".tmp"
_PACKAGES = ("torch", "transformers", "numpy", "pandas", "pyarrow")


# ----------------------------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Return `obj` as plain JSON types: tuples/sets -> lists, Paths -> str, numpy scalars/arrays -> Python.

    Non-finite floats become None, so the output is strict JSON that any reader accepts.

    Example:
        >>> to_jsonable({"k": (1, np.int64(2)), "p": Path("a/b"), "x": float("nan")})
        {'k': [1, 2], 'p': 'a/b', 'x': None}
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise InputError(
        f"cannot store {type(obj).__name__} value {obj!r:.60} in JSON; "
        "pass str, numbers, bools, None, lists, dicts, Paths or numpy scalars"
    )


def _dumps(obj: Any) -> str:
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


# ------------------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable across power loss (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Write `target` through `write(tmp)` on a hidden temp file in the same directory, then `os.replace`.

    A crash before the replace leaves only a `.<name>.<id>.tmp` file, which no reader treats as data.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}{_TMP_SUFFIX}"
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _write_parquet(target: Path, df: pd.DataFrame) -> None:
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame for {target.name}, got {type(df).__name__}; wrap it in pd.DataFrame(...)")
    _atomic_write(target, lambda tmp: df.to_parquet(tmp))


def _write_text(target: Path, text: str) -> None:
    _atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(_TMP_SUFFIX):
        raise InputError(
            f"invalid {what} name {name!r}; expected letters, digits, '_', '-' or '.', not starting with '.' "
            f"(e.g. 'baseline')"
        )
    return name


# ----------------------------------------------------------------------------------------- provenance


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision(cwd: Path) -> dict[str, Any] | None:
    """The commit (and whether the tree has local changes) of the git checkout holding `cwd`, else None."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip()

    revision = git("rev-parse", "HEAD")
    if not revision:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": revision, "dirty": None if status is None else bool(status)}


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
    }


def _differences(stored: Any, given: Any, prefix: str = "") -> list[str]:
    """Human-readable 'key: A in the run vs B now' lines for the leaves where two JSON values differ."""
    if isinstance(stored, dict) and isinstance(given, dict):
        out: list[str] = []
        for key in list(stored) + [k for k in given if k not in stored]:
            name = f"{prefix}{key}"
            if key not in given:
                out.append(f"{name}: {_short(stored[key])} in the run vs absent now")
            elif key not in stored:
                out.append(f"{name}: absent in the run vs {_short(given[key])} now")
            else:
                out.extend(_differences(stored[key], given[key], f"{name}."))
        return out
    if stored != given:
        return [f"{prefix.rstrip('.') or 'value'}: {_short(stored)} in the run vs {_short(given)} now"]
    return []


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summarize_differences(diffs: list[str], limit: int = 3) -> str:
    shown = "; ".join(diffs[:limit])
    return shown + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def _remove_children(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---------------------------------------------------------------------------------------------- Parts


class Parts:
    """Finished shards of one step (`parts/<step>/<key>.parquet`); a restarted command skips `done()` keys.

    Each shard is written atomically, so it is either completely present or absent. Keys are free-form
    strings such as "s0003-L05", stored percent-encoded so that any key maps to one file and back.

    Example:
        >>> parts = run.parts("sweep")
        >>> for key in todo - parts.done():
        ...     parts.write(key, compute(key))
        >>> table = parts.read_all()
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory)

    @staticmethod
    def _file_name(key: str) -> str:
        if not isinstance(key, str) or not key:
            raise InputError(f"invalid part key {key!r}; expected a non-empty string such as 's0003-L05'")
        name = quote(key, safe="-_.")
        if name.startswith("."):
            name = "%2E" + name[1:]  # hidden names are reserved for temp files
        return name + ".parquet"

    def _files(self) -> dict[str, Path]:
        if not self.path.is_dir():
            return {}
        return {
            unquote(p.name[: -len(".parquet")]): p
            for p in self.path.iterdir()
            if p.name.endswith(".parquet") and not p.name.startswith(".") and p.is_file()
        }

    def done(self) -> set[str]:
        """Keys whose shard has been written completely."""
        return set(self._files())

    def write(self, key: str, df: pd.DataFrame) -> Path:
        """Store the shard for `key` atomically (replacing an earlier one); returns its file."""
        target = self.path / self._file_name(key)
        _write_parquet(target, df)
        return target

    def read(self, key: str) -> pd.DataFrame:
        """The shard for `key`.

        Raises:
            RunError: no finished shard exists for `key`.
        """
        target = self.path / self._file_name(key)
        if not target.is_file():
            raise RunError(
                f"no finished part {key!r} in {self.path}; {len(self.done())} parts are done; "
                "rerun the step to produce it"
            )
        return pd.read_parquet(target)

    def read_all(self) -> pd.DataFrame:
        """All finished shards concatenated in sorted key order (an empty DataFrame if there are none)."""
        files = self._files()
        if not files:
            return pd.DataFrame()
        frames = [pd.read_parquet(files[key]) for key in sorted(files)]
        return pd.concat(frames, ignore_index=True)

    def clear(self) -> None:
        """Delete every shard (and leftover temp files) of this step."""
        if self.path.exists():
            shutil.rmtree(self.path)

    def __repr__(self) -> str:
        return f"Parts({str(self.path)!r}, done={len(self.done())})"


# ------------------------------------------------------------------------------------------------ Run


class Run:
    """A run directory: manifest, tables, JSON documents, resumable parts and plots.

    Create it with `Run.create` (first step, e.g. "eval"), reopen it with `Run.open`, and start each later
    step with `begin_step`; close a step with `finish_step`. Starting a step that the run already holds
    with the same arguments resumes it; with different arguments it raises unless `force=True`.

    Attributes:
        path: the run directory.
        resumed: True when the last `create`/`begin_step` resumed an existing step.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self._manifest = manifest
        self._step: str | None = None
        self.resumed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        step: str,
        arguments: Mapping[str, Any],
        model: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> Run:
        """Start a run at `path` with its first `step`, or resume it if it already ran with the same inputs.

        Args:
            path: the run directory; created if missing.
            step: the creating command, e.g. "eval".
            arguments: the command's arguments (incl. decoding, e.g. {"decoding": {"strategy": "greedy"}}).
            model: the model description from the caller (id, family, class, hash).
            force: wipe an existing run at `path` and start over; adopt a non-empty non-run directory.

        Raises:
            RunError: `path` holds a different run, or a non-empty directory that is not a run, and not `force`.

        Example:
            >>> run = Run.create("runs/qwen-count", step="eval", arguments={"task": "count"}, model=desc)
        """
        _check_name(step, "step")
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise RunError(f"run path {str(root)!r} is a file; expected a directory; choose another --out path")
        arguments_j, model_j = to_jsonable(dict(arguments)), to_jsonable(model)
        manifest_file = root / MANIFEST_NAME

        if manifest_file.is_file() and not force:
            run = cls.open(root)
            first = run._manifest.get("first_step")
            if first != step:
                raise RunError(
                    f"{root} holds a run created by {first!r}, not {step!r}; "
                    "pass --force to start over there or choose another --out directory"
                )
            stored = {"arguments": run._manifest["steps"][step]["arguments"], "model": run._manifest.get("model")}
            diffs = _differences(stored, {"arguments": arguments_j, "model": model_j})
            if diffs:
                raise RunError(
                    f"{root} already holds a {step!r} run with different inputs ({_summarize_differences(diffs)}); "
                    "pass --force to start over or choose another --out directory"
                )
            run._resume(step)
            return run

        if root.is_dir() and any(root.iterdir()):
            if not force:
                raise RunError(
                    f"{root} is a non-empty directory that is not a halluscope run (no {MANIFEST_NAME}); "
                    "choose an empty or new --out directory, or pass --force to write into it"
                )
            if manifest_file.is_file():
                _remove_children(root)  # only ever wipe a directory that is a run
        root.mkdir(parents=True, exist_ok=True)

        manifest: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "halluscope": _version("halluscope") or "unknown",
            "created": _now(),
            "command": list(sys.argv),
            "cwd": os.getcwd(),
            "git": _git_revision(Path(__file__).resolve().parent),
            "environment": _environment(),
            "model": model_j,
            "first_step": step,
            "steps": {},
        }
        run = cls(root, manifest)
        run._start(step, arguments_j)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        """Open an existing run directory.

        Raises:
            RunError: there is no (readable) manifest at `path`.
        """
        root = Path(path)
        manifest_file = root / MANIFEST_NAME
        if not manifest_file.is_file():
            raise RunError(f"no run at {root}; create one with `halluscope eval ... --out {root}`")
        try:
            manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(
                f"manifest {manifest_file} is not valid JSON ({exc}); restore it or recreate the run with --force"
            ) from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("steps"), dict):
            raise RunError(
                f"manifest {manifest_file} has no 'steps' mapping; expected a halluscope manifest; "
                "recreate the run with --force"
            )
        return cls(root, manifest)

    # ------------------------------------------------------------------ steps

    def begin_step(self, step: str, arguments: Mapping[str, Any], force: bool = False) -> bool:
        """Start (or resume) `step`; returns True when resuming a step begun earlier with the same arguments.

        Raises:
            RunError: the run holds `step` with different arguments and not `force`.

        Example:
            >>> run = Run.open("runs/qwen-count")
            >>> run.begin_step("sweep", {"layers": [0, 1], "mode": "zero"})
        """
        _check_name(step, "step")
        arguments_j = to_jsonable(dict(arguments))
        entry = self._manifest["steps"].get(step)
        if entry is not None:
            diffs = _differences(entry["arguments"], arguments_j)
            if not diffs:
                self._resume(step)
                return True
            if not force:
                raise RunError(
                    f"run {self.path} already holds step {step!r} with different arguments "
                    f"({_summarize_differences(diffs)}); pass --force to redo it or choose another run directory"
                )
            self._wipe_step(step)
        self._start(step, arguments_j)
        return False

    def finish_step(self, step: str, summary: Mapping[str, Any] | None = None) -> None:
        """Mark `step` finished and store its JSON-ready `summary` in the manifest.

        Raises:
            RunError: `step` was never begun in this run.
        """
        entry = self._manifest["steps"].get(step)
        if entry is None:
            raise RunError(
                f"step {step!r} was never begun in run {self.path} (steps: {sorted(self._manifest['steps'])}); "
                f"call run.begin_step({step!r}, arguments) first"
            )
        entry["finished"] = _now()
        entry["status"] = "finished"
        entry["summary"] = to_jsonable(summary) if summary is not None else None
        self._save()

    def status(self, step: str) -> str | None:
        """The state of `step`: "running", "finished", or None when the run never began it."""
        entry = self._manifest["steps"].get(step)
        return None if entry is None else entry["status"]

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as stored."""
        return copy.deepcopy(self._manifest)

    def _start(self, step: str, arguments: dict[str, Any]) -> None:
        self._manifest["steps"][step] = {
            "arguments": arguments,
            "command": list(sys.argv),
            "started": _now(),
            "resumed": [],
            "finished": None,
            "status": "running",
            "summary": None,
            "outputs": [],
        }
        self._step, self.resumed = step, False
        self._save()

    def _resume(self, step: str) -> None:
        entry = self._manifest["steps"][step]
        entry["resumed"].append(_now())
        entry["status"] = "running"
        entry["finished"] = None
        self._step, self.resumed = step, True
        self._save()

    def _wipe_step(self, step: str) -> None:
        for name in self._manifest["steps"][step].get("outputs", []):
            (self.path / name).unlink(missing_ok=True)
        self.parts(step).clear()
        del self._manifest["steps"][step]

    def _record_output(self, file_name: str) -> None:
        if self._step is None:
            return
        outputs = self._manifest["steps"][self._step]["outputs"]
        if file_name not in outputs:
            outputs.append(file_name)
            self._save()

    def _save(self) -> None:
        _write_text(self.path / MANIFEST_NAME, _dumps(self._manifest))

    # ------------------------------------------------------------------ tables and documents

    def tables(self) -> list[str]:
        """Names of the tables present, sorted."""
        return sorted(p.stem for p in self.path.glob("*.parquet") if not p.name.startswith("."))

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """True if `path` holds a run (a manifest)."""
        return (Path(path) / MANIFEST_NAME).is_file()

    def has_table(self, name: str) -> bool:
        """Whether table `name` is present."""
        return (self.path / f"{_check_name(name, 'table')}.parquet").is_file()

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        """Write `df` to `<run>/<name>.parquet` atomically; returns the file."""
        file_name = f"{_check_name(name, 'table')}.parquet"
        target = self.path / file_name
        _write_parquet(target, df)
        self._record_output(file_name)
        return target

    def read_table(self, name: str, hint: str | None = None) -> pd.DataFrame:
        """Read table `name`.

        Args:
            hint: the command that produces the table, overriding `TABLE_PRODUCERS` in the error message.

        Raises:
            RunError: the table is missing; the message lists the tables present and what produces it.
        """
        target = self.path / f"{_check_name(name, 'table')}.parquet"
        if not target.is_file():
            raise RunError(self._missing(f"table {name!r}", name, hint, self.tables()))
        return pd.read_parquet(target)

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `obj` (made JSON-ready by `to_jsonable`) to `<run>/<name>.json` atomically; returns the file."""
        file_name = f"{_check_name(name, 'document')}.json"
        if file_name == MANIFEST_NAME:
            raise InputError("the document name 'manifest' is reserved for the run manifest; choose another name")
        target = self.path / file_name
        _write_text(target, _dumps(obj))
        self._record_output(file_name)
        return target

    def read_json(self, name: str, hint: str | None = None) -> Any:
        """Read document `name`.

        Raises:
            RunError: the document is missing; the message lists the documents present and what produces it.
        """
        target = self.path / f"{_check_name(name, 'document')}.json"
        if not target.is_file():
            present = sorted(
                p.stem for p in self.path.glob("*.json") if p.name != MANIFEST_NAME and not p.name.startswith(".")
            )
            raise RunError(self._missing(f"document {name!r}", name, hint, present))
        return json.loads(target.read_text(encoding="utf-8"))

    def _missing(self, what: str, name: str, hint: str | None, present: list[str]) -> str:
        producer = hint or TABLE_PRODUCERS.get(name)
        fix = (
            f"run `halluscope {producer}` on this run first"
            if producer
            else "run the command that produces it on this run first"
        )
        return f"run {self.path} has no {what} (present: {', '.join(present) or 'none'}); {fix}"

    # ------------------------------------------------------------------ parts and plots

    def parts(self, step: str) -> Parts:
        """The resumable shards of `step` under `<run>/parts/<step>/`."""
        return Parts(self.path / "parts" / _check_name(step, "step"))

    @property
    def plots_dir(self) -> Path:
        """`<run>/plots`, created on first access."""
        directory = self.path / "plots"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={list(self._manifest['steps'])})"
