"""The pipeline steps as plain functions over a run directory: what each CLI command (and `demo`) does.

Each step opens or creates the run, records its arguments, skips finished shards, writes its tables and plots,
and returns what it computed. Progress is reported through an optional `progress(description, total)` context
manager that yields an `advance(n)` function.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import pandas as pd

from halluscope.errors import InputError, RunError
from halluscope.runs import TABLE_PRODUCERS, Run, locked_step, writer_lock
from halluscope.scale import LOCAL, ModelSource, Scale, map_shards

__all__ = ["Progress", "no_progress", "fill_parts", "sharded_step", "load_model", "run_model", "load_means",
           "eval_step", "means_step", "sweep_step", "rank_step", "confirm_step", "ablate_step", "ablation_name",
           "head_spec"]

Progress = Callable[[str, int], ContextManager[Callable[..., None]]]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress reporter that reports nothing."""
    yield lambda n=1: None


def load_model(name: str):
    """`load_vlm` with transformers' own progress bars and info logs silenced."""
    from transformers.utils import logging as hf_logging

    from halluscope.models.load import load_vlm

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return load_vlm(name)


def run_model(run: Run, vlm=None):
    """The model a run was made with (reloaded unless given), checked against the run's weight fingerprint."""
    manifest = run.manifest
    info = manifest.get("model") or {}
    vlm = vlm if vlm is not None else load_model(info.get("name", ""))
    if info.get("fingerprint") and not _same_model(vlm, info, manifest):
        raise RunError(f"the weights of {info.get('name')!r} changed since {run.path} was made "
                       f"(fingerprint {vlm.fingerprint()} vs {info['fingerprint']}); start a new run")
    return vlm


def _same_model(vlm, info: dict, manifest: dict) -> bool:
    """Whether `vlm` is the model the run recorded; a run made before fingerprint scheme 2 is checked against
    its legacy fingerprint, re-created from the transformers version and model path its manifest recorded."""
    from halluscope.models.fingerprint import SCHEME, legacy_fingerprint

    if info.get("fingerprint_scheme") == SCHEME:
        return vlm.fingerprint() == info["fingerprint"]
    version = (manifest.get("environment") or {}).get("packages", {}).get("transformers")
    if not version:
        return False
    return info["fingerprint"] in {legacy_fingerprint(vlm.model, transformers_version=version, name_or_path=path)
                                   for path in _legacy_paths(vlm, info, manifest)}


def _description(vlm, out: str | Path, resuming: bool) -> dict:
    """What the run records about `vlm`; when resuming a run made before fingerprint scheme 2 with this very
    model, the run's own record (so that the run still resumes)."""
    description = vlm.describe()
    if resuming:
        manifest = Run.open(out).manifest
        info = manifest.get("model") or {}
        if info.get("fingerprint") and info.get("fingerprint_scheme") != description["fingerprint_scheme"] \
                and _same_model(vlm, info, manifest):
            return info
    return description


def _legacy_paths(vlm, info: dict, manifest: dict) -> set[str]:
    """The `_name_or_path` values a legacy fingerprint may have hashed: the recorded name, it relative to the
    recorded working directory, the organism's directory, and the path the model was loaded from now."""
    import os

    name = info.get("name", "")
    paths = {name, vlm.model.config._name_or_path}
    if name == "organism":
        from halluscope.organism import organism_path

        paths.add(str(organism_path()))
    elif os.path.isabs(name) and manifest.get("cwd"):
        paths.add(os.path.relpath(name, manifest["cwd"]))
    return paths


def load_means(run: Run, mode: str):
    """The run's per-head means when `mode` is "mean", else None."""
    if mode != "mean":
        return None
    path = run.path / "head_means.safetensors"
    if not path.is_file():
        raise RunError(f"--intervention mean needs per-head means in {run.path}; run `halluscope means --run "
                       f"{run.path}` first")
    from safetensors.torch import load_file

    return load_file(str(path))["means"]


def _samples(run: Run):
    from halluscope.evaluation import readable_samples
    from halluscope.tasks.sample import samples_from_frame

    return readable_samples(samples_from_frame(run.read_table("samples", hint="eval")))


def fill_parts(parts, rows: Sequence, compute: Callable[[Any, Sequence, int], Iterator[pd.DataFrame]], *, chunk: int,
               progress: Progress, description: str, vlm, scale: Scale = LOCAL) -> pd.DataFrame:
    """Outputs for `rows` computed in resumable shards of up to `chunk` rows, then all shards read back in order.

    `compute(vlm, rows[start:stop], start)` yields the frames of rows start..stop-1; it gets the model as its first
    argument and must not hold it, since the shards run where `scale` says (`halluscope.scale.map_shards`).
    Progress advances by each shard's rows. A shard keyed "000040" with 36 rows holds rows 40..75; finished shards
    are skipped by the rows they cover, not by a chunk size, so a step resumed with another chunk size neither
    repeats nor misses a row.

    Example:
        >>> fill_parts(run.parts("eval"), samples, lambda vlm, rows, start: iter_evaluate(vlm, rows), chunk=32,
        ...            progress=no_progress, description="eval", vlm=vlm)  # doctest: +SKIP
    """
    n = len(rows)
    covered = {int(key): int(key) + count for key, count in parts.rows().items() if key.isdigit()}
    shards, finished, start = [], 0, 0
    while start < n:
        if start in covered:
            finished += covered[start] - start
            start = covered[start]
            continue
        stop = min([start + chunk, n, *(s for s in covered if s > start)])
        shards.append((start, rows[start:stop]))
        start = stop
    with progress(description, n) as advance:
        advance(finished)
        map_shards(shards, functools.partial(_fill_shard, compute), parts.write, model=ModelSource(vlm), scale=scale,
                   on_part=lambda key, frame: advance(len(frame)))
    return parts.read_all()


def sharded_step(run: Run, step: str, arguments: dict[str, Any], rows: Sequence, compute, *,
                 columns: Sequence[str], chunk: int, force: bool, progress: Progress, vlm) -> pd.DataFrame:
    """A model stage as its own resumable step of `run` (begun with `arguments`, then finished): the `columns` of
    `compute`'s frames for `rows` (`fill_parts`), from finished shards plus the rest, ordered by the first column
    (the row's index). The progress bar is named after the step less its method prefix ("apasi-check": "check")."""
    sub = Run.open(run.path)
    sub.begin_step(step, arguments, force=force)
    table = pd.DataFrame(columns=list(columns))
    if rows:
        table = fill_parts(sub.parts(step), rows, compute, chunk=chunk, progress=progress,
                           description=step.split("-", 1)[-1], vlm=vlm)
        table = table[list(columns)].sort_values(columns[0]).reset_index(drop=True)
    sub.finish_step(step, {"rows": len(rows)})
    return table


def _fill_shard(compute: Callable[[Any, Sequence, int], Iterator[pd.DataFrame]], vlm,
                shard: tuple[int, Sequence]) -> Iterator[tuple[str, pd.DataFrame]]:
    """The one part of a `fill_parts` shard, keyed by its first row."""
    start, rows = shard
    yield f"{start:06d}", pd.concat(list(compute(vlm, rows, start)), ignore_index=True)


def _evaluate_into(run: Run, step: str, vlm, samples, *, batch_size: int, max_new_tokens: int, progress: Progress,
                   description: str, intervention=None, means=None, scale: Scale = LOCAL,
                   method=None) -> pd.DataFrame:
    """Evaluate `samples` in resumable shards of at least 32 rows under RUN/parts/<step>/ (`fill_parts`)."""
    from halluscope.evaluation import iter_evaluate

    def compute(vlm, rows, start: int) -> Iterator[pd.DataFrame]:
        return iter_evaluate(vlm, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             intervention=intervention, means=means, method=method)

    return fill_parts(run.parts(step), samples, compute, chunk=max(batch_size, 32), progress=progress,
                      description=description, vlm=vlm, scale=scale)


# ---- eval -----------------------------------------------------------------------------------------------
def eval_step(out: str | Path, *, model: str, task: str = "count", data: str = "synthetic", n: int | None = None,
              offsets: Sequence[int] | None = None, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 50,
              object_column: str | None = None, name_objects: bool = False, force: bool = False,
              vlm=None, progress: Progress = no_progress, warn: Callable[[str], None] = print,
              scale: Scale = LOCAL, method: str | None = None, method_config: str | dict | None = None,
              **options: Any) -> tuple[Run, dict]:
    """Baseline evaluation of a PIH task into run directory `out`; returns the run and its summary.

    `offsets` are count offsets for "count" and colour distances for "color"; `options` go to the task builder
    (e.g. size=112); `scale` says where the replies are computed (`halluscope.scale`); `method` and
    `method_config` (a dict or JSON text) decode under a mitigation method, recorded with its full config in the
    step's arguments (`decoding`), so a rerun with another method is a different run.
    """
    from halluscope.decoding.api import method_from_options
    from halluscope import metrics
    from halluscope.evaluation import readable_samples, vlm_object_namer
    from halluscope.plots.run_figures import eval_plots
    from halluscope.tasks import build_task, get_task
    from halluscope.tasks.sample import samples_from_frame, samples_to_frame

    spec = get_task(task)
    values = tuple(offsets) if offsets is not None else None
    decoder = method_from_options(method, method_config)
    arguments = {"model": model, "task": spec.name, "data": data, "n": n, "offsets": values, "seed": seed,
                 "batch_size": batch_size, "max_new_tokens": max_new_tokens, "object_column": object_column,
                 "name_objects": name_objects, "options": options,
                 "decoding": "greedy" if decoder is None else dict(decoder.record(), strategy=decoder.strategy)}
    builder = dict(options, **({"object_column": object_column} if object_column else {}))

    def build(namer=None):
        samples = build_task(spec.name, data, n=n, seed=seed, **{spec.knob: values}, **builder,
                             **({"name_objects": namer} if namer else {}))
        for row in getattr(samples, "skipped", ()):
            warn(f"skipped source row {row.row} ({row.image_id}): {row.reason}")
        return samples

    # bad data, offsets or columns fail here, before a model is loaded or anything is written to `out`
    resuming = not force and Run.exists(out)
    samples = None if resuming or name_objects else build()
    vlm = vlm if vlm is not None else load_model(model)
    with writer_lock(out, create=True):  # one writer from the run's creation to its finish
        run = Run.create(out, step="eval", arguments=arguments, model=_description(vlm, out, resuming), force=force)
        if run.has_table("samples"):
            samples = samples_from_frame(run.read_table("samples"))
        else:
            samples = samples if samples is not None else build(
                vlm_object_namer(vlm, batch_size=batch_size) if name_objects else None)
            run.write_json("skipped_rows", [{"row": r.row, "image_id": r.image_id, "reason": r.reason}
                                            for r in getattr(samples, "skipped", ())])
            run.write_table("samples", samples_to_frame(samples))
        ok, bad = readable_samples(samples)
        for sample_id, why in bad:
            warn(f"skipped {sample_id}: {why}")
        baseline = _evaluate_into(run, "eval", vlm, ok, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  progress=progress, description="eval", scale=scale, method=decoder)
        run.write_table("baseline", baseline)
        summary = metrics.summarize(baseline)
        summary["skipped"] = [{"sample_id": s, "reason": r} for s, r in bad]  # images that do not decode
        has_rows = (run.path / "skipped_rows.json").is_file()  # runs made before it was kept lack it
        summary["skipped_source_rows"] = run.read_json("skipped_rows") if has_rows else []
        run.write_json("summary", summary)
        eval_plots(baseline, run.plots_dir)
        run.finish_step("eval", summary)
    return run, summary


# ---- means ----------------------------------------------------------------------------------------------
@locked_step
def means_step(run_dir: str | Path, *, batch_size: int = 8, force: bool = False, vlm=None,
               progress: Progress = no_progress) -> Path:
    """Per-(layer, head) mean o_proj input over the run's samples, saved as RUN/head_means.safetensors."""
    from safetensors.torch import save_file

    from halluscope.interventions.heads import compute_head_means

    run = Run.open(run_dir)
    run.begin_step("means", {"batch_size": batch_size}, force=force)
    vlm = run_model(run, vlm)
    samples, _ = _samples(run)

    def batches():
        with progress("means", len(samples)) as advance:
            for i in range(0, len(samples), batch_size):
                rows = samples[i:i + batch_size]
                yield vlm.encode([(s.image, s.prompt) for s in rows])
                advance(len(rows))

    head_means = compute_head_means(vlm, batches())
    path = run.write_file("head_means.safetensors", lambda tmp: save_file({"means": head_means.contiguous()}, str(tmp)))
    run.finish_step("means", {"n_samples": len(samples)})
    return path


# ---- sweep ----------------------------------------------------------------------------------------------
def _check_mode(intervention: str) -> str:
    from halluscope.interventions.heads import MODES

    if intervention not in MODES:
        raise InputError(f"unknown --intervention {intervention!r}; use one of {', '.join(MODES)}")
    return intervention


def _mode_note(intervention: str) -> dict[str, str]:
    """What a manifest records beside the mode's name when the name alone would mislead."""
    from halluscope.interventions.heads import MODE_NOTES

    return {"intervention_note": MODE_NOTES[intervention]} if intervention in MODE_NOTES else {}


def _sweep_items(run: Run, baseline: pd.DataFrame):
    """The run's misleading prompts as sweep items, with their images, reply ids and true-answer aliases."""
    from halluscope.sweep.runner import sweep_items

    samples, _ = _samples(run)
    return sweep_items(baseline, {s.id: s.image for s in samples},
                       aliases={s.id: s.truth_aliases for s in samples})


@locked_step
def sweep_step(run_dir: str | Path, *, layers: str | None = None, heads: str | None = None, mode: str = "score",
               intervention: str = "zero", batch_size: int = 16, max_new_tokens: int = 50, verify_top: int = 0,
               force: bool = False, vlm=None, progress: Progress = no_progress, scale: Scale = LOCAL) -> pd.DataFrame:
    """Knock out every head of the grid, one at a time, on the run's misleading prompts (or estimate every
    knockout's effect by attribution patching, `mode` "atp"/"atp-star", and verify the top `verify_top` heads
    per prompt exactly); writes sweep.parquet. `scale` says where the shards run (`halluscope.scale`)."""
    from halluscope.sweep.runner import (EXACT_MODES, SWEEP_MODES, parse_range, run_sweep, shard_count,
                                         verification_summary)

    if mode not in SWEEP_MODES:
        raise InputError(f"unknown --mode {mode!r}; use one of {', '.join(SWEEP_MODES)}")
    if verify_top < 0 or (verify_top and mode in EXACT_MODES):
        raise InputError(f"--verify-top {verify_top}: give a count >= 1 with an estimator mode (atp, atp-star)")
    run = Run.open(run_dir)
    baseline = run.read_table("baseline", hint="eval")
    head_means = load_means(run, _check_mode(intervention))
    vlm = run_model(run, vlm)
    layer_ids = parse_range(layers, vlm.n_layers, "layer")
    head_ids = parse_range(heads, vlm.n_heads, "head")
    run.begin_step("sweep", {"layers": layer_ids, "heads": head_ids, "mode": mode, "intervention": intervention,
                             **_mode_note(intervention), "batch_size": batch_size,
                             "max_new_tokens": max_new_tokens, "verify_top": verify_top}, force=force)
    items = _sweep_items(run, baseline)
    if not items:
        raise InputError(f"{run.path} has no misleading prompts to sweep; evaluate with offsets/distances")
    parts = run.parts("sweep")
    with progress(f"sweep ({mode})", shard_count(mode, len(items), len(layer_ids))) as advance:
        advance(len(parts.done()))
        table = run_sweep(vlm, parts, items, [(l, h) for l in layer_ids for h in head_ids], mode=mode,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, intervention_mode=intervention,
                          means=head_means, verify_top=verify_top, on_shard=advance, scale=scale)
    clean = baseline.set_index("sample_id")
    table["condition"] = table["sample_id"].map(clean["condition"])
    table["baseline_outcome"] = table["sample_id"].map(clean["outcome"])
    run.write_table("sweep", table)
    summary = {"rows": len(table), "prompts": len(items), "heads": len(layer_ids) * len(head_ids)}
    if verify_top:  # how far the estimates can be trusted, from the heads measured both ways
        summary["verification"] = verification_summary(table)
    run.finish_step("sweep", summary)
    return table


# ---- rank -----------------------------------------------------------------------------------------------
@locked_step
def rank_step(run_dir: str | Path, *, by: str = "auto") -> tuple[dict, pd.DataFrame]:
    """Rank heads by correction rate under knockout; writes heads.json, ranking.parquet and a heatmap.

    `by` picks the sweep rows ranked (`halluscope.sweep.runner.rows_by`): an estimator sweep's estimates of every
    head, or its exactly verified heads.
    """
    from halluscope.sweep.runner import rows_by
    from halluscope.analysis.ranking import correction_matrix, rank_heads, rank_report
    from halluscope.plots.figure import caption
    from halluscope.plots.run_figures import plot_head_heatmap

    run = Run.open(run_dir)
    sweep_table = rows_by(run.read_table("sweep", hint="sweep"), by)
    run.begin_step("rank", {"by": by}, force=True)  # cheap and derived: always recomputed from the current sweep
    report = rank_report(sweep_table)
    run.write_json("heads", report)
    ranking = rank_heads(sweep_table)
    run.write_table("ranking", ranking)
    info = run.manifest["model"]
    plot_head_heatmap(correction_matrix(sweep_table, info["n_layers"], info["n_heads"]),
                      run.plots_dir / "head_correction_rate.png", title="correction rate per knocked-out head",
                      cbar_label="correction rate", note=caption(ranking["n"], "prompts per head", None))
    run.finish_step("rank", {"best": report["best"]})
    return report, ranking


# ---- confirm --------------------------------------------------------------------------------------------
@locked_step
def confirm_step(run_dir: str | Path, *, heads: str = "best5", batch_size: int = 16, max_new_tokens: int = 50,
                 force: bool = False, vlm=None, progress: Progress = no_progress, scale: Scale = LOCAL) -> dict:
    """Re-run the sweep's top heads in generate mode (greedy replies) and compare with the score-mode outcomes.

    Writes confirm.parquet (one row per prompt x head, both outcomes) and returns the agreement per head. `scale`
    says where the shards run (`halluscope.scale`).
    """
    from halluscope.analysis.ranking import resolve_head_set
    from halluscope.interventions.heads import format_heads
    from halluscope.sweep.runner import rows_by, run_sweep

    run = Run.open(run_dir)
    ranked_by = ((run.manifest["steps"].get("rank") or {}).get("arguments") or {}).get("by", "auto")
    scored = rows_by(run.read_table("sweep", hint="sweep"), ranked_by)  # the rows the ranking was made from
    info = run.manifest["model"]
    head_set = sorted(resolve_head_set(heads, run.read_json("heads", hint="rank"), info["n_layers"], info["n_heads"]))
    run.begin_step("confirm", {"heads": format_heads(head_set), "batch_size": batch_size,
                               "max_new_tokens": max_new_tokens}, force=force)
    vlm = run_model(run, vlm)
    items = [i for i in _sweep_items(run, run.read_table("baseline")) if i.sample_id in set(scored["sample_id"])]
    parts = run.parts("confirm")
    with progress("confirm (generate)", len(items) * len({l for l, _ in head_set})) as advance:
        advance(len(parts.done()))
        generated = run_sweep(vlm, parts, items, head_set, mode="generate", batch_size=batch_size,
                              max_new_tokens=max_new_tokens, on_shard=advance, scale=scale)
    score_outcomes = scored[["sample_id", "layer", "head", "outcome"]].rename(columns={"outcome": "score_outcome"})
    table = generated.merge(score_outcomes, on=["sample_id", "layer", "head"], how="left")
    table["agree"] = table["outcome"] == table["score_outcome"]
    run.write_table("confirm", table)
    per_head = {f"L{l}H{h}": {"correction_rate": float((g["outcome"] == "corrected").mean()),
                              "score_correction_rate": float((g["score_outcome"] == "corrected").mean()),
                              "agreement": float(g["agree"].mean())}
                for (l, h), g in table.groupby(["layer", "head"])}
    result = {"heads": format_heads(head_set), "agreement": float(table["agree"].mean()), "per_head": per_head}
    run.finish_step("confirm", result)
    return result


# ---- ablate ---------------------------------------------------------------------------------------------
#: Outputs of other steps, which an ablation's --name must not overwrite.
_TAKEN_NAMES = {name: command for name, command in TABLE_PRODUCERS.items() if name != "ablation"} | {
    "attention_samples": "attention", "skipped_rows": "eval", "head_means": "means", "demo": "demo",
    "report": "demo"}


def head_spec(heads: str | None, head_set) -> str | None:
    """A --heads value as recorded: a set name lowercased ("best3"), a head list normalised ("L0H3,L11H15":
    sorted, duplicates removed, any case), so equal head sets are one step; None stays None."""
    from halluscope.interventions.heads import format_heads, parse_heads

    if heads is None:
        return None
    try:
        parse_heads(heads)
    except InputError:
        return heads.strip().lower()
    return format_heads(head_set)


def ablation_name(spec: str, limit: int = 96) -> str:
    """The default name of an ablation's outputs: "ablation_best3", "ablation_L0H3-L11H15" (a long head list:
    "ablation_<n>heads-<hash>").

    Example:
        >>> ablation_name("L0H3,L11H15")
        'ablation_L0H3-L11H15'
    """
    import hashlib

    name = f"ablation_{spec.replace(',', '-')}"
    if len(name) <= limit:
        return name
    return f"ablation_{spec.count(',') + 1}heads-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def _check_output_name(name: str) -> str:
    """`name` if it can name an ablation's files without overwriting another step's."""
    from halluscope.runs import check_name

    check_name(name, "ablation")
    if name in _TAKEN_NAMES:
        raise InputError(f"--name {name!r} would overwrite the run's {name} output (of `halluscope "
                         f"{_TAKEN_NAMES[name]}`); choose another name, e.g. ablation_{name}")
    return name


@locked_step
def ablate_step(run_dir: str | Path, *, heads: str, intervention: str = "zero", alpha: float = 0.0,
                positions: str = "all", batch_size: int = 8, force: bool = False, vlm=None,
                progress: Progress = no_progress, name: str | None = None) -> dict:
    """Re-evaluate the run's samples with `heads` edited; writes the rates before and after.

    `name` names the outputs (`<name>.parquet`, `<name>_summary.json`) and the step ("ablate-<name>"), so
    several head sets can be kept; by default it comes from the head set (`ablation_name`).
    """
    from halluscope import metrics
    from halluscope.analysis.ranking import resolve_head_set
    from halluscope.interventions.heads import HeadIntervention, format_heads

    run = Run.open(run_dir)
    baseline = run.read_table("baseline", hint="eval")
    info = run.manifest["model"]
    report = run.read_json("heads") if (run.path / "heads.json").is_file() else None
    head_set = resolve_head_set(heads, report, info["n_layers"], info["n_heads"])
    spec = head_spec(heads, head_set)
    name = _check_output_name(name) if name is not None else ablation_name(spec)
    iv = HeadIntervention(head_set, mode=intervention, alpha=alpha, positions=positions)
    step = "ablate" if name == "ablation" else f"ablate-{name}"  # "ablation": the name before --name existed
    head_means = load_means(run, intervention)
    run.begin_step(step, {"heads": format_heads(head_set), "spec": spec, "intervention": intervention,
                          **_mode_note(intervention), "alpha": alpha, "positions": positions,
                          "batch_size": batch_size}, force=force)
    vlm = run_model(run, vlm)
    samples, _ = _samples(run)
    after = _evaluate_into(run, step, vlm, samples, batch_size=batch_size,
                           max_new_tokens=run.manifest["steps"]["eval"]["arguments"]["max_new_tokens"],
                           progress=progress, description=f"{step} {format_heads(head_set)}", intervention=iv,
                           means=head_means)
    run.write_table(name, after)
    before_summary, after_summary = metrics.summarize(baseline), metrics.summarize(after)
    base_change = (None if before_summary["base_accuracy"] is None or after_summary["base_accuracy"] is None
                   else after_summary["base_accuracy"] - before_summary["base_accuracy"])
    result = {"name": name, "heads": format_heads(head_set), "spec": spec, "intervention": iv.mode, "alpha": alpha,
              "positions": positions, "before": before_summary, "after": after_summary,
              "copy_rate_relative_reduction": metrics.relative_reduction(before_summary["copy_rate"] or 0.0,
                                                                         after_summary["copy_rate"] or 0.0),
              "base_accuracy_change": base_change}
    run.write_json(f"{name}_summary", result)
    _ablation_plots(run, name, baseline, after, f"{format_heads(head_set)} knocked out")
    run.finish_step(step, {k: v for k, v in result.items() if k not in ("before", "after")})
    return result


def _ablation_plots(run: Run, name: str, baseline: pd.DataFrame, after: pd.DataFrame, what: str) -> None:
    """The copy rate before and after an ablation, by true value (`<name>_copy_rate.png`) and by condition
    (`<name>_copy_rate_by_offset.png`, named after the task's condition axis)."""
    from halluscope import metrics
    from halluscope.plots.figure import axis_labels
    from halluscope.plots.run_figures import plot_before_after, plot_rate_by_condition

    tasks = sorted(str(t) for t in baseline["task"].dropna().unique()) if "task" in baseline.columns else []
    truth_label, condition_label = axis_labels(tasks[0] if len(tasks) == 1 else None)
    before, ablated = metrics.select_misleading(baseline), metrics.select_misleading(after)
    plot_before_after(metrics.pih_rates(before, by=("truth",)), metrics.pih_rates(ablated, by=("truth",)),
                      run.plots_dir / f"{name}_copy_rate.png", title=f"copy (PIH) rate with {what}",
                      labels=("baseline", "ablated"), xlabel=truth_label)
    plot_rate_by_condition({"baseline": metrics.pih_rates(before, by=("condition",)),
                            "ablated": metrics.pih_rates(ablated, by=("condition",))},
                           run.plots_dir / f"{name}_copy_rate_by_{condition_label}.png",
                           title=f"copy (PIH) rate with {what}", xlabel=condition_label)
