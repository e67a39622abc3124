"""The run directory: one self-describing, resumable folder that several commands fill in sequence.

A run holds `manifest.json` (what ran, on what, with which versions), one parquet file per table, JSON
documents, `parts/<step>/` shards for resumable work and `plots/`. Every file is written to a temporary
name in the same directory and moved into place with `os.replace`, so a reader (or a restarted command)
sees each file either complete or not at all, even after `kill -9`.

Layout::

    <run>/manifest.json
    <run>/.lock                         while a command writes the run: its pid and command line
    <run>/<table>.parquet, <run>/<name>.json
    <run>/parts/<step>/<key>.parquet    each stamped with its step's identity
    <run>/plots/*.png

Integrity rules:

- One writer per run: every step holds `<run>/.lock` (`writer_lock`, `locked_step`) from its start to its
  end. A lock left by a killed process is taken over; a live holder makes a second command fail after a
  short wait, naming the holder. Shards may be written by many processes of one step at once, as long as
  each key is written by one of them.
- The manifest is never saved from a copy held in memory: each change re-reads `manifest.json`, applies
  itself and writes the file atomically (under the lock), so no object can erase what another recorded.
- A shard is reused only by the step that wrote it: each carries a hash of its step's identity arguments
  (`step_identity`; batch sizes are settings, not identity) and a step started afresh clears its shards.
  A corrupt or truncated shard is reported in one warning, deleted and recomputed.
- `--force` deletes only what the run wrote: the outputs its manifest lists (tables, documents, plots), its
  `parts/` and its temporary files; anything else in the directory is left alone.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from halluscope.errors import InputError, RunError

__all__ = ["MANIFEST_NAME", "LOCK_NAME", "SETTINGS_KEYS", "TABLE_PRODUCERS", "Parts", "Run", "check_name",
           "locked_step", "step_identity", "to_jsonable", "writer_lock"]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
LOCK_NAME = ".lock"
#: How long a command waits for another one to release a run before it gives up, in seconds.
LOCK_WAIT_SECONDS = 3.0
_LOCK_POLL_SECONDS = 0.1
#: An empty or unreadable lock older than this is a holder that died between creating and filling it.
_LOCK_FILL_SECONDS = 10.0
#: Arguments that change how a step computes, not what: recorded under "settings", never compared, never
#: part of a shard's identity (a run that ran out of memory resumes with a smaller batch).
SETTINGS_KEYS = frozenset({"batch_size"})
#: The parquet schema metadata key holding a shard's step identity.
IDENTITY_KEY = b"halluscope.step_identity"

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
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # what `_atomic_write` leaves behind when killed
_PACKAGES = ("torch", "transformers", "numpy", "pandas", "pyarrow")
_PART_ERRORS = (pa.ArrowException, OSError, ValueError)

_log = logging.getLogger(__name__)


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


def _write_parquet(target: Path, df: pd.DataFrame, metadata: Mapping[bytes, bytes] | None = None) -> None:
    """Write `df` to `target` atomically, with `metadata` added to the parquet schema's key-value metadata."""
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame for {target.name}, got {type(df).__name__}; wrap it in pd.DataFrame(...)")
    if not metadata:
        _atomic_write(target, lambda tmp: df.to_parquet(tmp))
        return

    def write(tmp: Path) -> None:  # what DataFrame.to_parquet does, plus the metadata
        table = pa.Table.from_pandas(df)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        pq.write_table(table, tmp)

    _atomic_write(target, write)

def _write_text(target: Path, text: str) -> None:
    _atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith(_TMP_SUFFIX):
        raise InputError(
            f"invalid {what} name {name!r}; expected letters, digits, '_', '-' or '.', not starting with '.' "
            f"(e.g. 'baseline')"
        )
    return name


def check_name(name: str, what: str) -> str:
    """`name` if it can name a table, document or step of a run (letters, digits, '_', '-', '.').

    Raises:
        InputError: it cannot; the message says what is allowed.
    """
    return _check_name(name, what)


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


def _no_run(root: Path) -> str:
    return f"no run at {root}; create one with `halluscope eval ... --out {root}`"


# ------------------------------------------------------------------------------------------ identity


def _split_arguments(arguments: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity arguments, settings): `SETTINGS_KEYS` are recorded but never compared."""
    identity = {k: v for k, v in arguments.items() if k not in SETTINGS_KEYS}
    settings = {k: v for k, v in arguments.items() if k in SETTINGS_KEYS}
    return identity, settings


def step_identity(step: str, arguments: Mapping[str, Any] | None) -> str:
    """A short hash of a step and its identity arguments (settings such as batch_size left out).

    Shards carry it, so a shard is only reused by the step (with the same arguments) that wrote it.

    Example:
        >>> step_identity("sweep", {"mode": "score", "batch_size": 16}) == step_identity("sweep", {"mode": "score"})
        True
    """
    identity = None if arguments is None else _split_arguments(to_jsonable(dict(arguments)))[0]
    text = json.dumps({"step": step, "arguments": identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- lock

_HELD: dict[str, int] = {}  # resolved run directory -> pid of this process, while it holds the run's lock


def _command_line(limit: int = 120) -> str:
    words = [Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]]
    text = " ".join(words).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine and is not a zombie (a killed, unreaped process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but belongs to another user
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _read_lock(lock_file: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file; {} while it is being written (or garbled); None if it is gone."""
    try:
        holder = json.loads(lock_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _is_stale(lock_file: Path, holder: dict[str, Any]) -> bool:
    """A lock whose holder is gone: a dead pid on this machine, or a lock never filled in by its creator."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        try:
            return time.time() - lock_file.stat().st_mtime > _LOCK_FILL_SECONDS
        except FileNotFoundError:
            return False
    if holder.get("host") != socket.gethostname():
        return False  # another machine's pid cannot be checked from here
    return pid == os.getpid() or not _pid_alive(pid)  # our own pid: a dead earlier process's, reused


def _break_lock(lock_file: Path, holder: dict[str, Any]) -> None:
    """Remove a stale lock. It is renamed aside first, so that of two processes breaking it at once only one
    removes it; a lock that changed since it was judged stale is put back."""
    aside = lock_file.with_name(f"{lock_file.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(lock_file, aside)
    except FileNotFoundError:
        return
    if _read_lock(aside) != holder:  # another process re-took the run in between: give its lock back
        try:
            os.link(aside, lock_file)
        except OSError:
            pass
    elif holder:
        _log.warning(f"taking over {lock_file.parent} from pid {holder.get('pid')} "
                     f"({holder.get('command', '?')}), which is no longer running")
    aside.unlink(missing_ok=True)


def _busy(lock_file: Path, holder: dict[str, Any]) -> RunError:
    if holder.get("pid") is None:
        who = "another process (its lock is being written)"
    else:
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        who = f"pid {holder['pid']}{where} (`{holder.get('command', '?')}`, since {holder.get('since', '?')})"
    return RunError(f"run {lock_file.parent} is being written by {who}; wait for it to finish, or if that "
                    f"process is gone, delete {lock_file} and rerun")


def _acquire(lock_file: Path) -> str:
    """Create `lock_file` atomically (O_CREAT|O_EXCL) with this process as holder; returns its token.

    Waits up to `LOCK_WAIT_SECONDS` for a live holder, takes over a stale one.
    """
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(), "since": _now(),
          "token": uuid.uuid4().hex}
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fd = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock_file)
            if holder is None:
                continue  # released just now
            if _is_stale(lock_file, holder):
                _break_lock(lock_file, holder)
                continue
            if time.monotonic() >= deadline:
                raise _busy(lock_file, holder) from None
            time.sleep(_LOCK_POLL_SECONDS)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(me))
        return me["token"]


def _release(lock_file: Path, token: str) -> None:
    holder = _read_lock(lock_file)
    if holder and holder.get("token") == token:
        lock_file.unlink(missing_ok=True)


@contextmanager
def writer_lock(path: str | os.PathLike[str], *, create: bool = False) -> Iterator[Path]:
    """Hold the writer lock of run directory `path` (`<run>/.lock`) for the `with` block; released on errors.

    The lock file holds the holder's pid, host and command line. Taking it again inside the block (in the same
    process) is a no-op, so a step can call methods that lock for themselves. A lock whose process is gone is
    taken over; a live holder makes this wait up to `LOCK_WAIT_SECONDS`, then fail.

    Args:
        create: the run may not exist yet (the first step): make the directory if missing.

    Raises:
        RunError: another process holds the run; without `create`, `path` holds no run; with it, `path` is a file.

    Example:
        >>> with writer_lock("runs/count"):
        ...     run = Run.open("runs/count")
        ...     run.begin_step("sweep", {...})
    """
    root = Path(path)
    if create and root.exists() and not root.is_dir():
        raise RunError(f"run path {str(root)!r} is a file; expected a directory; choose another --out path")
    if not create and not (root / MANIFEST_NAME).is_file():
        raise RunError(_no_run(root))
    key = str(root.resolve())
    if _HELD.get(key) == os.getpid():
        yield root
        return
    root.mkdir(parents=True, exist_ok=True)
    lock_file = root / LOCK_NAME
    token = _acquire(lock_file)
    _HELD[key] = os.getpid()
    try:
        yield root
    finally:
        _HELD.pop(key, None)
        _release(lock_file, token)


_Step = TypeVar("_Step", bound=Callable[..., Any])


def locked_step(step: _Step) -> _Step:
    """Decorate a step function whose first argument is a run directory: it holds the run's writer lock for
    its whole call, so no other command writes the run between its begin_step and finish_step.

    Example:
        >>> @locked_step
        ... def rank_step(run_dir): ...
    """

    @functools.wraps(step)
    def locked(run_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        with writer_lock(run_dir):
            return step(run_dir, *args, **kwargs)

    return locked  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- removal


def _inside(root: Path, name: str) -> Path | None:
    """`root/name` when `name` is a relative path inside the run (a hand-edited manifest could say otherwise)."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or not relative.parts or ".." in relative.parts:
        return None
    return root.joinpath(*relative.parts)


def _prune_empty(directory: Path) -> None:
    """Remove `directory` and its subdirectories where they are empty."""
    if not directory.is_dir() or directory.is_symlink():
        return
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            _prune_empty(child)
    if not any(directory.iterdir()):
        directory.rmdir()


def _remove_outputs(root: Path, names: list[str]) -> None:
    """Delete the files a step recorded as its outputs (and the plot folders they leave empty)."""
    for name in names:
        target = _inside(root, name) if isinstance(name, str) else None
        if target is not None and (target.is_file() or target.is_symlink()):
            target.unlink()
    _prune_empty(root / "plots")


def _remove_run_files(root: Path, manifest: Mapping[str, Any]) -> None:
    """Delete what the run wrote: every step's recorded outputs, `parts/`, and temp files of killed writes."""
    for entry in (manifest.get("steps") or {}).values():
        _remove_outputs(root, list((entry or {}).get("outputs") or []))
    if (root / "parts").is_dir() and not (root / "parts").is_symlink():
        shutil.rmtree(root / "parts")
    for directory in (root, root / "plots"):
        if directory.is_dir():
            for leftover in directory.iterdir():
                if _TMP_RE.match(leftover.name) and leftover.is_file():
                    leftover.unlink()
    _prune_empty(root / "plots")


# ---------------------------------------------------------------------------------------------- Parts


class Parts:
    """Finished shards of one step (`parts/<step>/<key>.parquet`); a restarted command skips `done()` keys.

    Each shard is written atomically, so it is either completely present or absent. Keys are free-form
    strings such as "s0003-L05", stored percent-encoded so that any key maps to one file and back.

    With an `identity` (what `Run.parts` gives), each shard written carries it in its parquet metadata and
    only shards carrying it count as done; shards of another identity are ignored (and recomputed). Shards
    without an identity (written before halluscope stamped them) count when `legacy` is true. A shard whose
    footer cannot be read (truncated, garbage) is reported in one warning, deleted, and so recomputed.

    Example:
        >>> parts = run.parts("sweep")
        >>> for key in todo - parts.done():
        ...     parts.write(key, compute(key))
        >>> table = parts.read_all()
    """

    def __init__(self, directory: Path, identity: str | None = None, *, legacy: bool = True) -> None:
        self.path = Path(directory)
        self.identity = identity
        self.legacy = legacy

    @staticmethod
    def _file_name(key: str) -> str:
        if not isinstance(key, str) or not key:
            raise InputError(f"invalid part key {key!r}; expected a non-empty string such as 's0003-L05'")
        name = quote(key, safe="-_.")
        if name.startswith("."):
            name = "%2E" + name[1:]  # hidden names are reserved for temp files
        return name + ".parquet"

    def _discard(self, path: Path, problem: str) -> None:
        """Delete an unusable shard, saying so in one line."""
        path.unlink(missing_ok=True)
        _log.warning(f"part {path} {problem}; deleted it, it will be recomputed")

    def _rows(self, path: Path) -> int | None:
        """The shard's row count if it is usable (readable footer, matching identity), else None; a corrupt
        shard is discarded."""
        try:
            footer = pq.read_metadata(path)
        except FileNotFoundError:
            return None
        except _PART_ERRORS as exc:
            self._discard(path, f"is corrupt or truncated ({str(exc).splitlines()[0] if str(exc) else exc!r})")
            return None
        return footer.num_rows if self._matches((footer.metadata or {}).get(IDENTITY_KEY)) else None

    def _scan(self) -> dict[str, tuple[Path, int]]:
        """Usable shards: key -> (file, rows), read from each footer; corrupt ones are discarded."""
        if not self.path.is_dir():
            return {}
        usable: dict[str, tuple[Path, int]] = {}
        for path in sorted(self.path.iterdir()):
            if path.name.endswith(".parquet") and not path.name.startswith(".") and path.is_file():
                rows = self._rows(path)
                if rows is not None:
                    usable[unquote(path.name[: -len(".parquet")])] = (path, rows)
        return usable

    def _matches(self, stamp: bytes | None) -> bool:
        if self.identity is None:
            return True
        if stamp is None:
            return self.legacy
        return stamp.decode("utf-8", "replace") == self.identity

    def done(self) -> set[str]:
        """Keys whose shard has been written completely (by this step, when the parts have an identity)."""
        return set(self._scan())

    def rows(self) -> dict[str, int]:
        """Each done key's number of rows, from the shard footers (the data is not read)."""
        return {key: rows for key, (_, rows) in self._scan().items()}

    def write(self, key: str, df: pd.DataFrame) -> Path:
        """Store the shard for `key` atomically (replacing an earlier one), stamped with the identity; returns
        its file."""
        target = self.path / self._file_name(key)
        stamp = {IDENTITY_KEY: self.identity.encode("utf-8")} if self.identity is not None else None
        _write_parquet(target, df, stamp)
        return target

    def _read_file(self, path: Path) -> pd.DataFrame:
        try:
            return pd.read_parquet(path)
        except _PART_ERRORS as exc:
            self._discard(path, f"could not be read ({str(exc).splitlines()[0] if str(exc) else exc!r})")
            raise RunError(f"part {path} was unreadable and has been deleted; rerun the step to recompute it") from None

    def read(self, key: str) -> pd.DataFrame:
        """The shard for `key`.

        Raises:
            RunError: no finished shard exists for `key` (or it was unreadable, and has been deleted).
        """
        target = self.path / self._file_name(key)
        if not target.is_file() or self._rows(target) is None:
            raise RunError(
                f"no finished part {key!r} in {self.path}; {len(self.done())} parts are done; "
                "rerun the step to produce it"
            )
        return self._read_file(target)

    def read_all(self) -> pd.DataFrame:
        """All finished shards concatenated in sorted key order (an empty DataFrame if there are none).

        Raises:
            RunError: a shard was unreadable past its footer; it has been deleted, so a rerun recomputes it.
        """
        found = self._scan()
        if not found:
            return pd.DataFrame()
        frames = [self._read_file(found[key][0]) for key in sorted(found)]
        return pd.concat(frames, ignore_index=True)

    def clear(self) -> None:
        """Delete every shard (and leftover temp files) of this step."""
        if self.path.exists():
            shutil.rmtree(self.path)

    def __repr__(self) -> str:
        return f"Parts({str(self.path)!r}, done={len(self.done())})"


# ------------------------------------------------------------------------------------------------ Run


def _load_manifest(root: Path) -> dict[str, Any]:
    """The manifest as stored now.

    Raises:
        RunError: there is no (readable) manifest at `root`.
    """
    manifest_file = root / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(_no_run(root)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(
            f"manifest {manifest_file} is not valid JSON ({exc}); restore it or recreate the run with --force"
        ) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("steps"), dict):
        raise RunError(
            f"manifest {manifest_file} has no 'steps' mapping; expected a halluscope manifest; "
            "recreate the run with --force"
        )
    return manifest


def _entry_since_ns(entry: Mapping[str, Any]) -> int | None:
    """When the step's latest invocation began (whole seconds, rounded down), in ns; None if unknown."""
    stamps = [entry.get("started"), *(entry.get("resumed") or [])]
    try:
        return max(int(_dt.datetime.fromisoformat(s).timestamp()) for s in stamps if s) * 10**9
    except (TypeError, ValueError):
        return None


class Run:
    """A run directory: manifest, tables, JSON documents, resumable parts and plots.

    Create it with `Run.create` (first step, e.g. "eval"), reopen it with `Run.open`, and start each later
    step with `begin_step`; close a step with `finish_step`. Starting a step that the run already holds
    with the same arguments resumes it; with different arguments it raises unless `force=True`. Settings
    (`SETTINGS_KEYS`, e.g. batch_size) are recorded under the step's "settings" and never compared.

    A Run holds no copy of the manifest: every read and change goes to `manifest.json` on disk, so several
    Run objects (and the commands after one another) never overwrite each other's records. Changes take the
    run's writer lock (`writer_lock`); steps hold it for their whole duration (`locked_step`).

    Attributes:
        path: the run directory.
        resumed: True when the last `create`/`begin_step` resumed an existing step.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._step: str | None = None
        self._since_ns: int | None = None  # the manifest's mtime when this object began its step
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
            force: delete what an existing run at `path` wrote and start over (other files stay); adopt a
                non-empty non-run directory without deleting anything.

        Raises:
            RunError: `path` holds a different run, or a non-empty directory that is not a run, and not `force`;
                another command is writing the run.

        Example:
            >>> run = Run.create("runs/qwen-count", step="eval", arguments={"task": "count"}, model=desc)
        """
        _check_name(step, "step")
        root = Path(path)
        identity, settings = _split_arguments(to_jsonable(dict(arguments)))
        model_j = to_jsonable(model)
        with writer_lock(root, create=True):
            if Run.exists(root):
                if not force:
                    run = cls.open(root)
                    run._check_same_run(step, identity, model_j)
                    run._resume(step, settings)
                    return run
                try:
                    old = _load_manifest(root)
                except RunError:
                    old = {}  # unreadable: remove only parts/ and temp files, then replace the manifest
                _remove_run_files(root, old)
            elif any(p.name != LOCK_NAME for p in root.iterdir()) and not force:
                raise RunError(
                    f"{root} is a non-empty directory that is not a halluscope run (no {MANIFEST_NAME}); "
                    "choose an empty or new --out directory, or pass --force to write into it"
                )
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
            _write_text(root / MANIFEST_NAME, _dumps(manifest))
            run = cls(root)
            run._start(step, identity, settings)
            return run

    def _check_same_run(self, step: str, identity: dict[str, Any], model: Any) -> None:
        """Raise unless this run was created by `step` with the same identity arguments and model."""
        manifest = self.manifest
        first = manifest.get("first_step")
        if first != step:
            raise RunError(
                f"{self.path} holds a run created by {first!r}, not {step!r}; "
                "pass --force to start over there or choose another --out directory"
            )
        stored_arguments = ((manifest["steps"].get(step) or {}).get("arguments")) or {}
        stored = {"arguments": _split_arguments(stored_arguments)[0], "model": manifest.get("model")}
        diffs = _differences(stored, {"arguments": identity, "model": model})
        if diffs:
            raise RunError(
                f"{self.path} already holds a {step!r} run with different inputs ({_summarize_differences(diffs)}); "
                "pass --force to start over or choose another --out directory"
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        """Open an existing run directory.

        Raises:
            RunError: there is no (readable) manifest at `path`.
        """
        root = Path(path)
        _load_manifest(root)
        return cls(root)

    # ------------------------------------------------------------------ manifest

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as stored now (read from disk on every access; changing the dict changes nothing)."""
        return _load_manifest(self.path)

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Apply `change` to the manifest on disk: re-read it, change it, write it atomically, under the lock.

        Returns what `change` returns; when it raises, nothing is written.
        """
        with writer_lock(self.path):
            manifest = _load_manifest(self.path)
            result = change(manifest)
            _write_text(self.path / MANIFEST_NAME, _dumps(manifest))
            return result

    def _stamp(self) -> None:
        """Remember when this object's step (re)started, on the filesystem's clock: plots newer than it are the
        step's."""
        self._since_ns = (self.path / MANIFEST_NAME).stat().st_mtime_ns

    # ------------------------------------------------------------------ steps

    def begin_step(self, step: str, arguments: Mapping[str, Any], force: bool = False) -> bool:
        """Start (or resume) `step`; returns True when resuming a step begun earlier with the same arguments.

        Settings (`SETTINGS_KEYS`) are recorded but not compared. A step started afresh clears any shards
        left under `parts/<step>/`, so it never reuses work it cannot vouch for.

        Raises:
            RunError: the run holds `step` with different arguments and not `force`; another command is
                writing the run.

        Example:
            >>> run = Run.open("runs/qwen-count")
            >>> run.begin_step("sweep", {"layers": [0, 1], "mode": "zero"})
        """
        _check_name(step, "step")
        identity, settings = _split_arguments(to_jsonable(dict(arguments)))
        with writer_lock(self.path):
            entry = self.manifest["steps"].get(step)
            if entry is not None:
                diffs = _differences(_split_arguments(entry.get("arguments") or {})[0], identity)
                if not diffs:
                    self._resume(step, settings)
                    return True
                if not force:
                    raise RunError(
                        f"run {self.path} already holds step {step!r} with different arguments "
                        f"({_summarize_differences(diffs)}); pass --force to redo it or choose another run directory"
                    )
                self._wipe_step(step)
            self._start(step, identity, settings)
            return False

    def finish_step(self, step: str, summary: Mapping[str, Any] | None = None) -> None:
        """Mark `step` finished, store its JSON-ready `summary` in the manifest, and record the plots it wrote
        (files under `plots/` changed since the step began) as its outputs.

        Raises:
            RunError: `step` was never begun in this run.
        """
        summary_j = to_jsonable(summary) if summary is not None else None

        def finish(manifest: dict[str, Any]) -> None:
            entry = manifest["steps"].get(step)
            if entry is None:
                raise RunError(
                    f"step {step!r} was never begun in run {self.path} (steps: {sorted(manifest['steps'])}); "
                    f"call run.begin_step({step!r}, arguments) first"
                )
            since = self._since_ns if self._step == step and self._since_ns is not None else _entry_since_ns(entry)
            taken = {name for other in manifest["steps"].values() for name in (other.get("outputs") or [])}
            entry.setdefault("outputs", []).extend(name for name in self._plots_since(since) if name not in taken)
            entry["finished"] = _now()
            entry["status"] = "finished"
            entry["summary"] = summary_j

        self._update(finish)

    def status(self, step: str) -> str | None:
        """The state of `step`: "running", "finished", or None when the run never began it."""
        entry = self.manifest["steps"].get(step)
        return None if entry is None else entry["status"]

    def _start(self, step: str, identity: dict[str, Any], settings: dict[str, Any]) -> None:
        self.parts(step).clear()  # a step without a manifest entry never reuses shards

        def start(manifest: dict[str, Any]) -> None:
            manifest["steps"][step] = {
                "arguments": identity,
                "settings": settings,
                "command": list(sys.argv),
                "started": _now(),
                "resumed": [],
                "finished": None,
                "status": "running",
                "summary": None,
                "outputs": [],
            }

        self._update(start)
        self._step, self.resumed = step, False
        self._stamp()

    def _resume(self, step: str, settings: dict[str, Any]) -> None:
        def resume(manifest: dict[str, Any]) -> None:
            entry = manifest["steps"][step]
            entry.setdefault("resumed", []).append(_now())
            entry["status"] = "running"
            entry["finished"] = None
            if settings:
                entry["settings"] = {**(entry.get("settings") or {}), **settings}

        self._update(resume)
        self._step, self.resumed = step, True
        self._stamp()

    def _wipe_step(self, step: str) -> None:
        """Delete what `step` wrote (its recorded outputs and shards) and its manifest entry."""
        entry = self.manifest["steps"].get(step) or {}
        _remove_outputs(self.path, list(entry.get("outputs") or []))
        self.parts(step).clear()
        self._update(lambda manifest: manifest["steps"].pop(step, None))

    def _record_output(self, file_name: str) -> None:
        """Add `file_name` (relative to the run) to the outputs of the step this object began, if any."""
        if self._step is None:
            return
        step = self._step

        def record(manifest: dict[str, Any]) -> None:
            entry = manifest["steps"].get(step)
            if entry is not None and file_name not in entry.setdefault("outputs", []):
                entry["outputs"].append(file_name)

        self._update(record)

    def _plots_since(self, since_ns: int | None) -> list[str]:
        """Files under `plots/` (relative, posix) modified at or after `since_ns`."""
        directory = self.path / "plots"
        if since_ns is None or not directory.is_dir():
            return []
        return sorted(
            p.relative_to(self.path).as_posix()
            for p in directory.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.stat().st_mtime_ns >= since_ns
        )

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

    def write_file(self, file_name: str, write: Callable[[Path], None]) -> Path:
        """Write `<run>/<file_name>` atomically through `write(tmp_path)` and record it as an output of the
        current step (so `--force` can remove it); returns the file.

        Example:
            >>> run.write_file("head_means.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        """
        name = _check_name(file_name, "file")
        if name == MANIFEST_NAME:
            raise InputError(f"the file name {MANIFEST_NAME!r} is reserved for the run manifest; choose another name")
        target = self.path / name
        with writer_lock(self.path):
            _atomic_write(target, write)
            self._record_output(name)
        return target

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        """Write `df` to `<run>/<name>.parquet` atomically; returns the file."""
        file_name = f"{_check_name(name, 'table')}.parquet"
        target = self.path / file_name
        with writer_lock(self.path):
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
        text = _dumps(obj)
        with writer_lock(self.path):
            _write_text(target, text)
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
        """The resumable shards of `step` under `<run>/parts/<step>/`, stamped with and filtered by the step's
        identity (from its manifest entry; shards without one count, as before identities, only while the
        entry exists)."""
        entry = self.manifest["steps"].get(_check_name(step, "step"))
        arguments = None if entry is None else (entry.get("arguments") or {})
        return Parts(self.path / "parts" / step, identity=step_identity(step, arguments), legacy=entry is not None)

    @property
    def plots_dir(self) -> Path:
        """`<run>/plots`, created on first access. Plots written there during a step are recorded as its
        outputs when it finishes."""
        directory = self.path / "plots"
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def __repr__(self) -> str:
        try:
            steps = list(self.manifest["steps"])
        except RunError:
            steps = []
        return f"Run({str(self.path)!r}, steps={steps})"
