"""Steps on Ray workers (`--ray`, `halluscope.scale`): the same tables as in one process, on the organism and a
tiny model; a worker killed mid-shard is retried; a killed driver's run resumes; more workers than fit wait; errors
are one line (a missing Ray, options without --ray, too many GPUs, a worker's own error, other weights).

All tests share one local Ray instance with 2 CPUs (the driver-kill test's subprocess starts its own).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from halluscope.scale import Scale
from halluscope.steps import eval_step, load_model, sweep_step

pytestmark = pytest.mark.integration

_WORKER_TITLE = "ray::_ShardWorker.run"  # the process title of a Ray worker while it computes a shard


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs, no dashboard) for the module; `map_shards` joins it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'halluscope[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def organism():
    return load_model("organism")


@pytest.fixture(scope="module")
def organism_eval(organism, tmp_path_factory) -> Path:
    """An eval run of the organism (4 misleading prompts); tests sweep copies of it."""
    out = tmp_path_factory.mktemp("organism") / "eval"
    eval_step(out, model="organism", n=2, offsets=(1, 3), vlm=organism)
    return out


@pytest.fixture(scope="module")
def organism_sweep(organism, organism_eval, tmp_path_factory) -> pd.DataFrame:
    """The plain (one-process) sweep of the organism run: the table every Ray sweep must equal."""
    run = _copy(organism_eval, tmp_path_factory.mktemp("plain") / "run")
    sweep_step(run, vlm=organism)
    return pd.read_parquet(run / "sweep.parquet")


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _ray_workers_of(parent: int) -> list[int]:
    """Pids of the Ray workers computing a shard, of the Ray instance whose processes `parent` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            raylet = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            started_by = int((Path("/proc") / str(raylet) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(_WORKER_TITLE) and started_by == parent:
            found.append(int(entry.name))
    return found


def test_cli_sweep_on_ray_writes_the_same_sweep_table(ray_instance, cli, organism_eval, organism_sweep, tmp_path):
    run = _copy(organism_eval, tmp_path / "run")
    code, out, err = cli("sweep", "--run", run, "--ray", "--workers", "2")
    assert code == 0, err
    assert "sweep (score): 16/16" in err  # progress as in one process: one step per (prompt, layer) part
    pd.testing.assert_frame_equal(pd.read_parquet(run / "sweep.parquet"), organism_sweep)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"]["sweep"]["status"] == "finished"
    assert len(list((run / "parts" / "sweep").glob("*.parquet"))) == 16


def test_a_worker_killed_mid_shard_is_retried_without_losing_or_repeating_rows(ray_instance, organism,
                                                                               organism_eval, organism_sweep,
                                                                               tmp_path):
    run = _copy(organism_eval, tmp_path / "run")
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline and not (run / "sweep.parquet").exists():
            for pid in _ray_workers_of(os.getpid())[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    try:
        table = sweep_step(run, vlm=organism, scale=Scale("local", workers=2))
    finally:
        killer.join()
    assert killed, "no worker was seen computing a shard"
    pd.testing.assert_frame_equal(table, organism_sweep)
    assert not table.duplicated(["sample_id", "layer", "head"]).any()


def test_a_killed_driver_resumes_from_its_written_parts(ray_instance, cli, organism_eval, organism_sweep, tmp_path):
    run = _copy(organism_eval, tmp_path / "run")
    driver = subprocess.Popen([sys.executable, "-m", "halluscope", "sweep", "--run", str(run), "--ray", "--workers",
                               "2", "--batch-size", "4"], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts = run / "parts" / "sweep"
    try:
        while driver.poll() is None and not any(parts.glob("*.parquet")):
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read().decode()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:  # the local Ray instance the driver started: its helpers outlive a killed driver
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        driver.stderr.close()
    written = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert 0 < len(written) < 16 and not (run / "sweep.parquet").exists()

    code, _, err = cli("sweep", "--run", run, "--batch-size", "4", "--ray", "--workers", "2")
    assert code == 0, err
    assert {name: (parts / name).stat().st_mtime_ns for name in written} == written  # kept, not recomputed
    pd.testing.assert_frame_equal(pd.read_parquet(run / "sweep.parquet"), organism_sweep)
    assert len(json.loads((run / "manifest.json").read_text())["steps"]["sweep"]["resumed"]) == 1


def test_eval_sweep_confirm_and_bench_on_ray_equal_one_process_on_a_tiny_model(ray_instance, cli, tmp_path):
    from halluscope.models.tiny import build_tiny

    model = build_tiny("qwen2_vl", tmp_path / "tiny")
    tables = {}
    for name, extra in (("plain", ()), ("ray", ("--ray", "--workers", "2"))):
        run, pope = tmp_path / name, tmp_path / f"{name}-pope"
        for args in (("eval", "--model", model, "--n", "7", "--offsets", "1,2,3", "--size", "56", "--batch-size", "4",
                      "--max-new-tokens", "6", "--out", run, *extra),
                     ("sweep", "--run", run, "--layers", "0:1", "--batch-size", "4", *extra),
                     ("rank", "--run", run),
                     ("confirm", "--run", run, "--heads", "L0H0,L0H1,L1H0", "--max-new-tokens", "6", *extra),
                     ("bench", "pope", "--model", model, "--n", "3", "--max-new-tokens", "4", "--batch-size", "8",
                      "--method", "heads:L0H1", "--out", pope, *extra)):
            code, _, err = cli(*args)
            assert code == 0, f"{args[0]}: {err}"
        tables[name] = [pd.read_parquet(path) for path in (run / "baseline.parquet", run / "sweep.parquet",
                                                           run / "confirm.parquet", pope / "replies.parquet",
                                                           pope / "pope.parquet")]
    for parts in ("ray/parts/eval", "ray-pope/parts/pope-greedy"):  # 35 and 54 rows: two shards of 32 rows at most
        assert len(list((tmp_path / parts).glob("*.parquet"))) == 2
    for plain, on_ray in zip(tables["plain"], tables["ray"]):
        pd.testing.assert_frame_equal(on_ray, plain)


def test_an_error_raised_on_a_worker_is_raised_as_itself_and_not_retried(ray_instance, organism, tmp_path):
    from halluscope.errors import InputError
    from halluscope.scale import ModelSource, map_shards

    calls = tmp_path / "calls"

    def work(vlm, shard):
        with open(calls, "a") as fh:
            fh.write(f"{shard}\n")
        raise InputError(f"shard {shard} of {vlm.name} is malformed")
        yield  # a generator, as every step's work is

    written = []
    with pytest.raises(InputError, match="shard 0 of organism is malformed"):
        map_shards([0], work, lambda key, frame: written.append(key), model=ModelSource(organism),
                   scale=Scale("local", workers=2))
    assert written == [] and calls.read_text() == "0\n"


def test_more_workers_than_the_instance_holds_wait_and_the_others_do_the_work(ray_instance, organism, organism_eval,
                                                                             organism_sweep, tmp_path):
    run = _copy(organism_eval, tmp_path / "run")
    table = sweep_step(run, vlm=organism, scale=Scale("local", workers=3))  # 1 CPU each, 2 CPUs
    pd.testing.assert_frame_equal(table, organism_sweep)


def test_more_gpus_per_worker_than_the_cluster_has_is_refused(ray_instance, organism):
    from halluscope.errors import InputError
    from halluscope.scale import ModelSource, map_shards

    with pytest.raises(InputError, match=r"--gpus-per-worker 1 asks for more GPUs than the Ray cluster has \(0\)"):
        map_shards([0], lambda vlm, shard: iter(()), lambda key, frame: None, model=ModelSource(organism),
                   scale=Scale("local", gpus_per_worker=1))


def test_a_worker_with_other_weights_than_the_driver_refuses_to_run(organism):
    import pickle

    from halluscope.errors import RunError
    from halluscope.scale import ModelSource

    shipped = pickle.loads(pickle.dumps(ModelSource(organism)))  # what a worker receives: name and fingerprint
    assert shipped.name == "organism" and shipped._vlm is None
    shipped._fingerprint = "0" * 16
    with pytest.raises(RunError, match="other weights than the driver"):
        shipped.get()


def test_ray_options_without_ray_installed_or_without_ray_are_one_line_errors(cli, organism_eval, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    code, _, err = cli("sweep", "--run", organism_eval, "--ray", "--workers", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'halluscope[ray]'" in err
    code, _, err = cli("confirm", "--run", organism_eval, "--workers", "2")
    assert code == 2 and "--workers and --gpus-per-worker need --ray" in err
