"""The task registry: task names (with aliases) mapped to lazily imported ``"module:function"`` builders, and
`build_task`, the one call the CLI makes to turn (task, data) into samples."""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from halluscope.errors import InputError
from halluscope.tasks.sample import SampleList

__all__ = ["TaskSpec", "available_tasks", "build_task", "get_task", "register_task"]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task.

    Args:
        name: the canonical name ("count", "color"), written to manifests and Sample.task.
        target: ``"module:function"`` of the builder, imported on first use; the builder takes
            ``(data, *, n, seed, <knob>=..., **options)`` and returns a `SampleList`.
        knob: the name of the task's list-valued setting, "offsets" (count) or "distances" (color).
        hub_id: the dataset the reference study used, accepted as `data`.
        version: bumped whenever prompts or builders change what a task produces.
        aliases: other accepted names.
        description: a one-line summary of what the task asks.
    """

    name: str
    target: str
    knob: str
    hub_id: str
    version: int = 1
    aliases: tuple[str, ...] = ()
    description: str = ""

    def load(self) -> Callable[..., SampleList]:
        """Import and return the builder function."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


_TASKS: dict[str, TaskSpec] = {}
_ALIASES: dict[str, str] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add `spec` under its name and aliases.

    Raises:
        InputError: the name or an alias is already taken (pass replace=True to override on purpose), or the
            target is not of the form "module:function".
    """
    if ":" not in spec.target:
        raise InputError(
            f"task target {spec.target!r} is not 'module:function'; e.g. 'halluscope.tasks.counting:build'"
        )
    names = (spec.name, *spec.aliases)
    taken = [n for n in names if n in _ALIASES and _ALIASES[n] != spec.name]
    if spec.name in _TASKS and not replace:
        taken.insert(0, spec.name)
    if taken and not replace:
        raise InputError(f"task name(s) {taken} already registered; pick another name or pass replace=True")
    for alias in names:
        _ALIASES[alias] = spec.name
    _TASKS[spec.name] = spec
    return spec


def available_tasks() -> list[str]:
    """Canonical names of the registered tasks, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> TaskSpec:
    """The `TaskSpec` registered under `name` or one of its aliases.

    Raises:
        InputError: unknown name, with a "did you mean" and the available names.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _ALIASES:
        close = difflib.get_close_matches(str(name), list(_ALIASES), n=1)
        hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
        raise InputError(f"unknown task {name!r}.{hint} Available: {', '.join(available_tasks())}")
    return _TASKS[_ALIASES[key]]


def build_task(
    task: str,
    data: str | os.PathLike = "synthetic",
    *,
    n: int | None = None,
    seed: int = 0,
    offsets: Iterable[int] | None = None,
    distances: Iterable[int] | None = None,
    **options: Any,
) -> SampleList:
    """Build the samples of `task` from `data`; the entry point of the CLI.

    Args:
        task: "count" or "color" (aliases: "counting", "countbench"; "colour", "visual-counterfact").
        data: "synthetic" (drawn scenes), a local file/folder, or a Hub id (e.g. "nielsr/countbench"); "reference"
            stands for the task's reference Hub dataset.
        n: number of images (synthetic: None = one per (value, shape) pair; loaded: None = all rows).
        seed: seed of the synthetic scenes (loaders do not use it).
        offsets: count offsets k (count task only; default `counting.DEFAULT_OFFSETS`).
        distances: colour distances d (color task only; default (1, 2, 3)).
        **options: passed by keyword to the synthetic builder or loader, e.g. size=112, max_count=9,
            object_column="gpt_named_object".

    Returns:
        A `SampleList`: the samples, with the loader's skipped rows in `.skipped` (empty for synthetic data).

    Raises:
        InputError: unknown task, option or data, or a setting that belongs to the other task.

    Example:
        >>> samples = build_task("count", "synthetic", n=2, seed=0, offsets=(1,), size=112)
        >>> [s.condition for s in samples]
        ['base', 'control', '+1', 'base', 'control', '+1']
    """
    spec = get_task(task)
    knobs = {"offsets": offsets, "distances": distances}
    for knob, value in knobs.items():
        if knob != spec.knob and value is not None:
            raise InputError(f"{knob} = {value!r} does not apply to task {spec.name!r}; use {spec.knob}=... instead")
    data_text = os.fspath(data)
    if data_text == "reference":
        data_text = spec.hub_id
    elif data_text != "synthetic" and not Path(data_text).expanduser().exists() and "/" not in data_text:
        close = difflib.get_close_matches(data_text, ["synthetic", "reference"], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(
            f"data {data_text!r} is not 'synthetic', 'reference', an existing file or folder, or a Hub id "
            f"(owner/name).{hint}"
        )
    return spec.load()(data_text, n=n, seed=seed, **{spec.knob: knobs[spec.knob]}, **options)


register_task(
    TaskSpec(
        name="count",
        target="halluscope.tasks.counting:build",
        knob="offsets",
        hub_id="nielsr/countbench",
        aliases=("counting", "countbench"),
        description="counting: 'How many {obj}...', truthful control, and overstated counts +k",
    )
)
register_task(
    TaskSpec(
        name="color",
        target="halluscope.tasks.color:build",
        knob="distances",
        hub_id="mgolov/Visual-Counterfact",
        aliases=("colour", "visual-counterfact"),
        description="colour: 'What color is the {object}...', truthful control, and wrong colours at distance d",
    )
)
