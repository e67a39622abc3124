"""Scale-out on one machine: the same organism sweep in one process and on 1 and 2 Ray workers.

Makes one eval run of the built-in organism (`--images` images, counting offsets 1..4), then runs the same
score-mode sweep (every prompt x layer part) on copies of it:

- in one process with 1 and with 2 torch threads;
- on a local Ray instance (2 CPUs, started once, not timed) with 1 and with 2 workers; each worker is one
  process with one torch thread that loads the model on its first shard.

Checks that every sweep table is the same. For each setting it prints the wall time, the time until the first
prompt's parts were written (a Ray worker's start and model load fall there) and the steady time per part after
them (time after the first prompt / parts after it). Then the speed-up of 2 workers over 1 (steady time
per part, and wall time), and Ray's overhead: per part (steady, 1 worker vs one process with 1 thread) and once
per run (first prompt, the same two).

    python benchmarks/ray_scaling.py [--images 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch


def timed_sweep(source: Path, to: Path, **options) -> tuple[dict[str, float], pd.DataFrame]:
    """One sweep over a fresh copy of the eval run `source`: its timings (seconds) and its table."""
    from halluscope.steps import sweep_step

    shutil.copytree(source, to)
    marks: list[tuple[float, int]] = []  # (time, parts written so far)

    @contextmanager
    def progress(description: str, total: int):
        def advance(n: int = 1) -> None:
            marks.append((time.perf_counter(), (marks[-1][1] if marks else 0) + n))

        yield advance

    start = time.perf_counter()
    table = sweep_step(to, progress=progress, **options)
    end = time.perf_counter()
    layers = table["layer"].nunique()  # a prompt's parts: one Ray shard, written together
    first = next(t for t, n in marks if n >= layers)
    steady = (end - first) / max(marks[-1][1] - layers, 1)
    return {"wall": end - start, "first": first - start, "steady": steady}, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2, help="synthetic images (8 misleading prompts each)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setting; the fastest counts")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from halluscope.scale import Scale
    from halluscope.steps import eval_step, load_model

    vlm = load_model("organism")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        eval_step(root / "eval", model="organism", n=args.images, offsets=(1, 2, 3, 4), vlm=vlm)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        settings = {"one process, 1 thread": ({}, 1), "one process, 2 threads": ({}, 2),
                    "Ray, 1 worker": ({"scale": Scale("local", workers=1)}, 1),
                    "Ray, 2 workers": ({"scale": Scale("local", workers=2)}, 1)}
        best: dict[str, dict[str, float]] = {}
        tables = []
        for repeat in range(args.repeats):
            for name, (options, threads) in settings.items():
                torch.set_num_threads(threads)
                timing, table = timed_sweep(root / "eval", root / f"{repeat}-{name}", vlm=vlm, **options)
                best[name] = {k: min(v, best.get(name, {}).get(k, float("inf"))) for k, v in timing.items()}
                tables.append(table)
        ray.shutdown()
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0])
    parts = len(tables[0][["sample_id", "layer"]].drop_duplicates())
    print(f"{platform.machine()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end), "
          f"torch {torch.__version__}; best of {args.repeats}; organism sweep, {tables[0]['sample_id'].nunique()} "
          f"prompts, {parts} parts (prompt x layer), {len(tables[0])} rows; tables identical in every setting")
    for name, t in best.items():
        print(f"  {name}: {t['wall']:.1f} s wall, first prompt after {t['first']:.2f} s, then "
              f"{1000 * t['steady']:.0f} ms per part")
    one, two, plain = best["Ray, 1 worker"], best["Ray, 2 workers"], best["one process, 1 thread"]
    print(f"speedup 2 workers / 1 worker = {one['steady'] / two['steady']:.2f}x per part "
          f"({one['wall'] / two['wall']:.2f}x wall); Ray overhead = {1000 * (one['steady'] - plain['steady']):.0f} ms "
          f"per part + {one['first'] - plain['first']:.1f} s once (worker start and model load)")


if __name__ == "__main__":
    main()
