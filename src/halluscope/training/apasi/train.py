"""`apasi_train_step`: APASI's training, DPO rounds with a curriculum, into a checkpoint directory that is also a
run directory (step "apasi-train"; one step "apasi-round-<t>" per round).

Round 0 trains on the pairs of an `apasi data` run made with the same model. Each later round t regenerates the
descriptions with the model of round t-1, rebuilds the graph, re-injects with a harder setting
(`round_settings`) and trains against that model as its reference, as the paper's iterative alignment does
(its released code runs round 0 only; the schedule is ours). Layout:

    CKPT/config.json, model.safetensors, processor files   the final model (`load_vlm(CKPT)` opens it)
    CKPT/manifest.json                 every hyper-parameter, the data run's digest, per-round summaries
    CKPT/train_log.json                TRL's log of every optimiser step, per round
    CKPT/rounds.parquet                one row per round: pairs, settings, final loss, reward accuracy, seconds
    CKPT/rounds/round-<t>/adapter/     the round's LoRA adapter; its config names the model it applies to
    CKPT/rounds/round-<t>/model/       the merged model after round t (kept for t < last: the next base)
    CKPT/rounds/round-<t>/data/        the round's preference data (an `apasi data` run; t >= 1)

A finished round is skipped on a rerun, an unfinished one resumes from TRL's last checkpoint, and a rerun with
other arguments fails unless --force, which starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from halluscope.errors import InputError
from halluscope.runs import Run, to_jsonable, writer_lock
from halluscope.steps import Progress, load_model, no_progress
from halluscope.training.apasi.data import DATA_STEP, apasi_data_step
from halluscope.training.apasi.dpo import DPOSettings, dpo_round, preference_dataset, save_round

__all__ = ["SCHEDULE", "TRAIN_STEP", "apasi_train_step", "round_settings"]

#: The run step that trains (and the first step of a checkpoint run).
TRAIN_STEP = "apasi-train"
#: What `round_settings` does, as manifests and docs state it.
SCHEDULE = ("round t of R: replace rate = rate x (1 - t / (2 (R - 1))) (falls linearly to half), top-k = "
            "ceil(top_k / 2^t) (guide objects from fewer, more strongly co-occurring absent objects), objects "
            "per insertion = max(1, objects - t); round 0 uses the data run's settings")


def round_settings(t: int, rounds: int, *, rate: float, top_k: int, objects: int) -> dict[str, Any]:
    """Round t's injection settings: harder each round (fewer injected sentences or objects, guide objects drawn
    from fewer and more plausible absent objects); round 0 is the data run's own.

    Example:
        >>> [round_settings(t, 3, rate=0.2, top_k=10, objects=2) for t in range(3)][2]
        {'rate': 0.1, 'top_k': 3, 'objects': 1}
    """
    share = t / (rounds - 1) if rounds > 1 else 0.0
    return {"rate": round(rate * (1.0 - 0.5 * share), 6), "top_k": max(1, math.ceil(top_k / 2 ** t)),
            "objects": max(1, objects - t)}


def _data_run(data: str | Path) -> Run:
    """The finished `apasi data` run at `data`.

    Raises:
        InputError: no such run, another kind of run, an unfinished one, or one without pairs.
    """
    if not Run.exists(data):
        raise InputError(f"--data {str(data)!r} is not a run directory; make the pairs with `halluscope apasi data "
                         f"--model M --out {data}`")
    run = Run.open(data)
    manifest = run.manifest
    if manifest.get("first_step") != DATA_STEP or run.status(DATA_STEP) != "finished":
        raise InputError(f"--data {str(data)!r} is not a finished `halluscope apasi data` run (first step "
                         f"{manifest.get('first_step')!r}, status {run.status(DATA_STEP)!r}); run `halluscope apasi "
                         f"data --out {data}` to make or finish it")
    return run


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def apasi_train_step(out: str | Path, *, model: str, data: str | Path, rounds: int = 1,
                     settings: DPOSettings | None = None, force: bool = False, vlm=None,
                     progress: Progress = no_progress) -> dict[str, Any]:
    """Train `model` with APASI for `rounds` rounds on the pairs of data run `data`; the merged model, its
    adapters and the logs go to `out`.

    Args:
        model: the model the data run was made with (checked by weight fingerprint).
        data: a finished `apasi data` run.
        rounds: DPO rounds; rounds after the first regenerate their data (`round_settings`).
        settings: LoRA and DPO hyper-parameters (`DPOSettings`); round t trains with seed `settings.seed + t`.

    Returns:
        {"rounds": one row per round, "summary": what the manifest records, "run": the Run}. A `vlm` passed in is
        trained in place (the adapter is merged into its weights).

    Raises:
        InputError: bad settings, a data run that is not a finished `apasi data` run or has no pairs, or a
            model other than the data's.
        RunError: `out` holds a different run (pass force=True to start over).
    """
    settings = settings or DPOSettings()
    if rounds < 1:
        raise InputError(f"--rounds {rounds}; expected a whole number >= 1")
    source = _data_run(data)
    pairs = source.read_table("pairs")
    if pairs.empty:
        dropped = (source.manifest["steps"][DATA_STEP].get("summary") or {}).get("dropped")
        raise InputError(f"--data {str(data)!r} has no pairs (dropped: {dropped}); make more descriptions (--n), "
                         f"or another --variant")
    vlm = vlm if vlm is not None else load_model(model)
    made_with = source.manifest.get("model") or {}
    if made_with.get("fingerprint") != vlm.fingerprint():
        raise InputError(f"--data {str(data)!r} was made by {made_with.get('name')!r}, not by {model!r} (weight "
                         f"fingerprints {made_with.get('fingerprint')} vs {vlm.fingerprint()}); APASI trains a model "
                         f"on its own descriptions: make the data with `halluscope apasi data --model {model}`")
    entry = source.manifest["steps"][DATA_STEP]
    data_arguments = {**entry["arguments"], **(entry.get("settings") or {})}
    arguments = {"model": model, "data": str(Path(data).resolve()),
                 "pairs_digest": _digest(source.path / "pairs.parquet"), "rounds": rounds, "dpo": settings.to_dict(),
                 "schedule": SCHEDULE,
                 "lora_targets": "every nn.Linear under " + vlm.family.layers}
    out = Path(out)
    with writer_lock(out, create=True):
        run = Run.create(out, step=TRAIN_STEP, arguments=arguments, model=vlm.describe(), force=force)
        if not run.resumed:
            shutil.rmtree(out / "rounds", ignore_errors=True)
        rows, logs = [], {}
        base_name, current = model, vlm
        for t in range(rounds):
            folder = out / "rounds" / f"round-{t}"
            step = f"apasi-round-{t}"
            schedule = round_settings(t, rounds, rate=data_arguments["rate"], top_k=data_arguments["top_k"],
                                      objects=data_arguments["objects"])
            if run.status(step) != "finished":
                if t > 0:
                    current = load_model(base_name)
                row, logs[t] = _train_round(out, step, t, current, base_name, source, data_arguments, schedule,
                                            settings, force=force, progress=progress)
            else:
                row = run.manifest["steps"][step]["summary"]
                logs[t] = _read_log(out, t)
            rows.append(row)
            base_name = str(folder / "model")
        _publish(run, out / "rounds" / f"round-{rounds - 1}" / "model")
        table = pd.DataFrame(rows)
        run.write_json("train_log", {f"round-{t}": history for t, history in logs.items()})
        run.write_table("rounds", table)
        summary = {"rounds": table.to_dict("records"), "versions": {p: _version(p) for p in (
            "trl", "peft", "accelerate", "datasets", "transformers", "torch")}}
        run.finish_step(TRAIN_STEP, summary)
    return {"rounds": table, "summary": summary, "run": run}


def _train_round(out: Path, step: str, t: int, vlm, base_name: str, source: Run, data_arguments: dict[str, Any],
                 schedule: dict[str, Any], settings: DPOSettings, *, force: bool,
                 progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One round: its data (the data run's for round 0, regenerated by `vlm` after), DPO, the adapter and the
    merged model saved; returns the round's summary row and TRL's log."""
    began = time.time()
    folder = out / "rounds" / f"round-{t}"
    sub = Run.open(out)
    sub.begin_step(step, {"round": t, **schedule, "seed": settings.seed + t}, force=force)
    if t == 0:
        pairs, images = source.read_table("pairs"), source.read_table("images")
    else:
        keep = ("images", "n", "seed", "prompt", "variant", "doubt", "max_new_tokens", "nlp", "batch_size")
        made = apasi_data_step(folder / "data", model=base_name, vlm=vlm, force=force, progress=progress,
                               **{k: data_arguments[k] for k in keep if k in data_arguments}, **schedule)
        pairs, images = made["pairs"], made["run"].read_table("images")
        if pairs.empty:
            raise InputError(f"round {t}'s regenerated data has no pairs (dropped: {made['summary']['dropped']}); "
                             f"train fewer --rounds, or make the data run with more images (--n)")
    dataset = preference_dataset(vlm, pairs, dict(zip(images["image_id"], images["image"])))
    model, history = dpo_round(vlm, dataset, dataclasses.replace(settings, seed=settings.seed + t),
                               work_dir=folder / "trainer", progress=progress)
    save_round(model, vlm.processor, adapter_dir=folder / "adapter", model_dir=folder / "model", base=base_name)
    shutil.rmtree(folder / "trainer", ignore_errors=True)
    (folder / "train_log.json").write_text(json.dumps(to_jsonable(history)), encoding="utf-8")
    final = [entry for entry in history if "loss" in entry]
    row = {"round": t, "pairs": len(pairs), **schedule, "steps": len(final),
           "final_loss": final[-1]["loss"] if final else None,
           "reward_accuracy": final[-1].get("rewards/accuracies") if final else None,
           "reward_margin": final[-1].get("rewards/margins") if final else None,
           "seconds": round(time.time() - began, 1)}
    sub.finish_step(step, row)
    return row, history


def _read_log(out: Path, t: int) -> list[dict[str, Any]]:
    path = out / "rounds" / f"round-{t}" / "train_log.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _publish(run: Run, model_dir: Path) -> None:
    """Copy the last round's merged model into the run's top level (each file atomically, recorded as the run's
    output), then drop the copy it came from."""
    if not model_dir.is_dir():
        return  # published by an earlier invocation that stopped before finishing the step
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        run.write_file(path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))
    shutil.rmtree(model_dir)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
