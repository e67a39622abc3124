"""Scale-out: the one place that decides whether a step's shards run in this process or on Ray workers.

A step lists its shards (what each of its resumable parts needs), gives a `work(vlm, shard)` function that yields
`(part key, frame)` pairs, and a `write(key, frame)` that stores a finished part. `map_shards` runs the shards in
this process with the step's model, or on Ray actors that each load the model once and send the frames back to
this process. The step's code is the same either way.

This process (the driver) writes every part, never the workers: a worker on another machine need not see the
run directory, each part is stamped with its step's identity by the one process that holds the run's lock, and a
worker killed mid-shard leaves nothing behind. Its actor is restarted (loading the model again), the shard is
retried, and its rows reach the run exactly once. Ray is an optional extra (`pip install 'halluscope[ray]'`),
imported only when a `Scale` asks for it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import pandas as pd

from halluscope.errors import HalluscopeError, InputError, RunError

__all__ = ["INSTALL_RAY", "LOCAL", "ModelSource", "Scale", "map_shards", "require_ray"]

#: The command that installs the Ray extra, named by the error raised when Ray is missing.
INSTALL_RAY = "pip install 'halluscope[ray]'"
#: How often a worker process may die (and its shard be retried on a restarted worker) before the step fails.
MAX_RETRIES = 3
#: Shards queued on each worker at once, so that a worker never waits while the driver writes a part.
IN_FLIGHT = 2

Shard = TypeVar("Shard")
Work = Callable[[Any, Any], Iterable[tuple[str, pd.DataFrame]]]


@dataclass(frozen=True)
class Scale:
    """Where a step's shards run.

    Attributes:
        address: None runs them in this process; "local" starts a Ray instance on this machine (no dashboard, no
            usage stats); "auto" joins the Ray cluster this machine belongs to; "HOST:PORT" joins the cluster
            whose head listens there.
        workers: Ray actors, each holding one model replica.
        gpus_per_worker: GPUs reserved for each actor (fractions share a GPU); 0 keeps the workers on the CPU.

    Raises:
        InputError: a count out of range, or `address` set while Ray is not installed.

    Example:
        >>> Scale("local", workers=2)  # doctest: +SKIP
    """

    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InputError(f"--workers {self.workers}: give at least 1 worker")
        if self.gpus_per_worker < 0:
            raise InputError(f"--gpus-per-worker {self.gpus_per_worker}: give 0 (CPU workers) or more")
        if self.address is None and (self.workers != 1 or self.gpus_per_worker):
            raise InputError("--workers and --gpus-per-worker need --ray; add `--ray` (a local Ray instance) or "
                             "`--ray auto` (the cluster this machine belongs to)")
        if self.address is not None:
            require_ray()


#: Shards run in this process.
LOCAL = Scale()


def require_ray() -> Any:
    """The `ray` module, imported with its usage statistics switched off.

    Raises:
        InputError: Ray is not installed; the message gives the install command.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise InputError(f"--ray needs Ray, which is not installed; install it with `{INSTALL_RAY}`") from None
    return ray


class ModelSource:
    """The step's model as a worker gets it: in this process the loaded model itself; in a Ray worker, loaded
    once by name and checked against the driver's weight fingerprint (the loaded model is never pickled).

    Example:
        >>> source = ModelSource(vlm)  # doctest: +SKIP
        >>> source.get() is vlm  # doctest: +SKIP
        True
    """

    def __init__(self, vlm: Any) -> None:
        self._vlm = vlm
        self._fingerprint: str | None = None
        self.name: str = vlm.name

    def __getstate__(self) -> dict[str, Any]:
        fingerprint = self._fingerprint if self._vlm is None else self._vlm.fingerprint()
        return {"name": self.name, "_fingerprint": fingerprint}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _vlm=None)

    def get(self, device: str = "cpu") -> Any:
        """The model; a worker loads it on the CPU the first time it asks, checks its fingerprint there (sums on
        a GPU may differ in the last bits), then moves it to `device`.

        Raises:
            RunError: the worker's copy of the model has other weights than the driver's.
        """
        if self._vlm is None:
            from halluscope.steps import load_model

            vlm = load_model(self.name)
            if vlm.fingerprint() != self._fingerprint:
                raise RunError(f"a worker loaded {self.name!r} with other weights than the driver (fingerprint "
                               f"{vlm.fingerprint()} vs {self._fingerprint}); install the same checkpoint on "
                               "every node")
            vlm.model.to(device)
            self._vlm = vlm
        return self._vlm


def map_shards(shards: Sequence[Shard], work: Work, write: Callable[[str, pd.DataFrame], None], *,
               model: ModelSource, scale: Scale = LOCAL,
               on_part: Callable[[str, pd.DataFrame], None] | None = None) -> None:
    """Run `work(vlm, shard)` over `shards` and `write` every `(key, frame)` it yields, in this process or on the
    Ray workers `scale` names; `on_part(key, frame)` follows each write (progress).

    In this process each frame is written as soon as it is yielded. On Ray, a shard's frames are written when the
    shard returns, in the order shards finish (parts are keyed, so the order does not matter). `work` must be
    picklable (a module-level function, a `functools.partial` of one, or a closure over plain data) and must not
    hold the model; it gets the model as its first argument.

    Raises:
        RunError: a worker died more than `MAX_RETRIES` times, or Ray could not be started or joined.
        HalluscopeError: what `work` raised, re-raised as itself.
    """
    on_part = on_part or (lambda key, frame: None)
    if scale.address is None:
        vlm = model.get()
        for shard in shards:
            for key, frame in work(vlm, shard):
                write(key, frame)
                on_part(key, frame)
        return
    if shards:
        _map_on_ray(shards, work, write, model=model, scale=scale, on_part=on_part)


class _ShardWorker:
    """A Ray actor: the model, loaded on its first shard, and the step's work function."""

    def __init__(self, model: ModelSource, work: Work, device: str) -> None:
        self.model, self.work, self.device = model, work, device

    def ready(self) -> bool:
        return True

    def run(self, shard: Any) -> list[tuple[str, pd.DataFrame]]:
        return list(self.work(self.model.get(self.device), shard))


def _map_on_ray(shards: Sequence[Any], work: Work, write: Callable[[str, pd.DataFrame], None], *,
                model: ModelSource, scale: Scale, on_part: Callable[[str, pd.DataFrame], None]) -> None:
    """Shards go to each actor once Ray has placed it (more workers than the cluster can hold at once just wait,
    and the shards go to those that run), `IN_FLIGHT` at a time; finished shards are written here."""
    ray = _connect(scale)
    _check_resources(ray, scale)
    worker = ray.remote(_ShardWorker).options(num_cpus=1, num_gpus=scale.gpus_per_worker, max_restarts=MAX_RETRIES,
                                              max_task_retries=MAX_RETRIES)
    device = "cuda" if scale.gpus_per_worker else "cpu"
    actors = [worker.remote(model, work, device) for _ in range(min(scale.workers, len(shards)))]
    todo = list(reversed(shards))
    placing = {actor.ready.remote(): actor for actor in actors}  # actors Ray has not started yet
    running: dict[Any, Any] = {}  # shard task -> its actor

    def submit(actor: Any) -> None:
        if todo:
            running[actor.run.remote(todo.pop())] = actor

    try:
        while running or (placing and todo):
            (ref,), _ = ray.wait([*running, *placing], num_returns=1)
            if ref in placing:
                actor = placing.pop(ref)
                _result(ray, ref)
                for _ in range(IN_FLIGHT):
                    submit(actor)
                continue
            actor = running.pop(ref)
            for key, frame in _result(ray, ref):
                write(key, frame)
                on_part(key, frame)
            submit(actor)
    finally:
        for actor in actors:
            ray.kill(actor)


def _check_resources(ray: Any, scale: Scale) -> None:
    """Raise if the cluster has fewer GPUs than one worker asks for (the workers would wait for them forever)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if scale.gpus_per_worker > gpus:
        raise InputError(f"--gpus-per-worker {scale.gpus_per_worker:g} asks for more GPUs than the Ray cluster has "
                         f"({gpus:g}); pass --gpus-per-worker {gpus:g} or less, or join a cluster with GPUs")


def _result(ray: Any, ref: Any) -> Any:
    """What a worker returned; what its work raised, re-raised as itself; a worker that kept dying, as a
    RunError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, HalluscopeError):
            raise exc.cause from None
        raise
    except ray.exceptions.RayActorError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RunError(f"a Ray worker died {MAX_RETRIES + 1} times ({first}); the finished parts are kept: rerun "
                       "the command to resume") from None


def _connect(scale: Scale) -> Any:
    """Ray, started on this machine or joined to a cluster (an already connected process stays connected)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        if scale.address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address=scale.address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot join the Ray cluster at {scale.address!r} ({first}); start one with `ray start "
                       "--head` on the head node, or pass `--ray` alone for a local instance") from None
    return ray
