"""The `halluscope` command line: one command per pipeline step, each writing into a run directory.

    halluscope tiny-models tiny/
    halluscope eval --model tiny/qwen2_vl --task count --data synthetic --n 20 --out runs/demo
    halluscope sweep --run runs/demo && halluscope rank --run runs/demo
    halluscope ablate --run runs/demo --heads best3
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from halluscope.errors import HalluscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find why vision-language models hallucinate, and fix it.")
organism_app = typer.Typer(no_args_is_help=True, help="The built-in model organism of prompt-induced hallucination.")
app.add_typer(organism_app, name="organism")
console = Console(stderr=True)


def main() -> None:
    """Console entry point: HalluscopeErrors print one line and exit 2 instead of a traceback."""
    try:
        app(standalone_mode=False)
    except HalluscopeError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        raise SystemExit(130) from None
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """A rich progress bar on stderr; yields a function that advances it by n."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=total == 0) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _ints(text: Optional[str], what: str) -> Optional[tuple[int, ...]]:
    from halluscope.errors import InputError

    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"malformed {what} {text!r}; write comma-separated integers, e.g. 1,2,3") from None


# ---- models ---------------------------------------------------------------------------------------------
@app.command("tiny-models")
def tiny_models(out: Path = typer.Argument(..., help="Directory to write one checkpoint per family into."),
                family: Optional[List[str]] = typer.Option(None, "--family", help="Only these families.")) -> None:
    """Build tiny random checkpoints of every supported family offline (test fixtures).

    Example: halluscope tiny-models tiny/ --family qwen2_vl --family llava
    """
    from halluscope.models.families import get_family
    from halluscope.models.tiny import TINY_FAMILIES, build_tiny

    _quiet_transformers()
    names = [get_family(f).name for f in family] if family else list(TINY_FAMILIES)
    with progress_bar("building", len(names)) as advance:
        for name in names:
            build_tiny(name, out / name)
            advance()
    console.print(f"wrote {len(names)} checkpoints under {out}: {', '.join(names)}")


def _load(model: str):
    from halluscope.models.load import load_vlm

    _quiet_transformers()
    return load_vlm(model)


def _run_model(run):
    """Reload the model a run was made with and check its weights are unchanged."""
    from halluscope.errors import RunError

    info = run.manifest.get("model") or {}
    vlm = _load(info.get("name", ""))
    if info.get("fingerprint") and vlm.fingerprint() != info["fingerprint"]:
        raise RunError(f"the weights of {info['name']!r} changed since {run.path} was made "
                       f"(fingerprint {vlm.fingerprint()} vs {info['fingerprint']}); start a new run")
    return vlm


# ---- eval -----------------------------------------------------------------------------------------------
@app.command("eval")
def eval_(model: str = typer.Option(..., "--model", help="Hub id, local checkpoint directory, or 'organism'."),
          task: str = typer.Option("count", "--task", help="count or color."),
          data: str = typer.Option("synthetic", "--data", help="'synthetic', a local file/folder, or a hub id."),
          out: Path = typer.Option(..., "--out", help="Run directory to write."),
          n: Optional[int] = typer.Option(None, "--n", help="Number of images (default: all / one per value)."),
          offsets: Optional[str] = typer.Option(None, "--offsets",
                                                help="Count offsets (count) or colour distances (color), e.g. 1,2,3."),
          seed: int = typer.Option(0, "--seed", help="Seed of the synthetic scenes."),
          batch_size: int = typer.Option(8, "--batch-size"),
          max_new_tokens: int = typer.Option(50, "--max-new-tokens"),
          object_column: Optional[str] = typer.Option(None, "--object-column",
                                                      help="Column holding the object noun (loaded counting data)."),
          name_objects: bool = typer.Option(False, "--name-objects",
                                            help="Let the model name each image's object (counting data without nouns)."),
          force: bool = typer.Option(False, "--force", help="Overwrite a different run in --out.")) -> None:
    """Baseline evaluation of a PIH task: greedy replies, parsed answers, copy/correction rates, plots.

    Example: halluscope eval --model organism --task count --data synthetic --n 20 --out runs/count
    """
    import pandas as pd

    from halluscope import metrics, plots
    from halluscope.evaluation import iter_evaluate, readable_samples, vlm_object_namer
    from halluscope.runs import Run
    from halluscope.tasks import build_task, get_task
    from halluscope.tasks.sample import samples_from_frame, samples_to_frame

    spec = get_task(task)
    values = _ints(offsets, "offsets")
    arguments = {"model": model, "task": spec.name, "data": data, "n": n, "offsets": values, "seed": seed,
                 "batch_size": batch_size, "max_new_tokens": max_new_tokens, "object_column": object_column,
                 "name_objects": name_objects, "decoding": "greedy"}
    vlm = _load(model)
    run = Run.create(out, step="eval", arguments=arguments, model=vlm.describe(), force=force)
    if run.has_table("samples"):
        samples = samples_from_frame(run.read_table("samples"))
    else:
        options = {}
        if object_column:
            options["object_column"] = object_column
        if name_objects:
            options["name_objects"] = vlm_object_namer(vlm, batch_size=batch_size)
        samples = build_task(spec.name, data, n=n, seed=seed, **{spec.knob: values}, **options)
        for row in getattr(samples, "skipped", ()):
            console.print(f"[yellow]skipped source row {row.row} ({row.image_id}): {row.reason}[/yellow]")
        run.write_table("samples", samples_to_frame(samples))
    ok, bad = readable_samples(samples)
    for sample_id, why in bad:
        console.print(f"[yellow]skipped {sample_id}: {why}[/yellow]")
    parts = run.parts("eval")
    done = parts.done()
    chunk = max(batch_size, 32)
    with progress_bar("eval", len(ok)) as advance:
        for start in range(0, len(ok), chunk):
            key = f"{start:06d}"
            if key in done:
                advance(min(chunk, len(ok) - start))
                continue
            frames = []
            for frame in iter_evaluate(vlm, ok[start:start + chunk], batch_size=batch_size,
                                       max_new_tokens=max_new_tokens):
                frames.append(frame)
                advance(len(frame))
            parts.write(key, pd.concat(frames, ignore_index=True))
    baseline = parts.read_all()
    run.write_table("baseline", baseline)
    summary = metrics.summarize(baseline)
    summary["skipped"] = [{"sample_id": s, "reason": r} for s, r in bad]
    run.write_json("summary", summary)
    plots.eval_plots(baseline, run.plots_dir)
    run.finish_step("eval", summary)
    _print_summary(summary, run.path)


def _print_summary(summary: dict, path: Path) -> None:
    table = Table(title=f"PIH baseline ({path})")
    table.add_column("condition")
    table.add_column("copy rate", justify="right")
    table.add_column("correction rate", justify="right")
    for condition, rate in (summary.get("copy_rate_by_condition") or {}).items():
        corr = (summary.get("correction_rate_by_condition") or {}).get(condition)
        table.add_row(condition, _pct(rate), _pct(corr))
    Console().print(table)
    Console().print(f"base accuracy {_pct(summary.get('base_accuracy'))}, control accuracy "
                    f"{_pct(summary.get('control_accuracy'))}, misleading copy rate {_pct(summary.get('copy_rate'))}")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ---- means ----------------------------------------------------------------------------------------------
@app.command("means")
def means(run_dir: Path = typer.Option(..., "--run", help="An eval run directory."),
          batch_size: int = typer.Option(8, "--batch-size"),
          force: bool = typer.Option(False, "--force")) -> None:
    """Per-(layer, head) mean o_proj input over the run's samples, for --intervention mean.

    Example: halluscope means --run runs/count
    """
    from safetensors.torch import save_file

    from halluscope.evaluation import readable_samples
    from halluscope.interventions.heads import compute_head_means
    from halluscope.runs import Run
    from halluscope.tasks.sample import samples_from_frame

    run = Run.open(run_dir)
    run.begin_step("means", {"batch_size": batch_size}, force=force)
    vlm = _run_model(run)
    samples, _ = readable_samples(samples_from_frame(run.read_table("samples")))
    batches = (vlm.encode([(s.image, s.prompt) for s in samples[i:i + batch_size]])
               for i in range(0, len(samples), batch_size))
    with progress_bar("means", len(samples)):
        head_means = compute_head_means(vlm, batches)
    save_file({"means": head_means.contiguous()}, str(run.path / "head_means.safetensors"))
    run.finish_step("means", {"n_samples": len(samples)})
    console.print(f"wrote {run.path / 'head_means.safetensors'} [{vlm.n_layers} x {vlm.n_heads} x {vlm.head_dim}]")


def _load_means(run, mode: str):
    from halluscope.errors import RunError

    if mode != "mean":
        return None
    path = run.path / "head_means.safetensors"
    if not path.is_file():
        raise RunError(f"--intervention mean needs per-head means in {run.path}; run `halluscope means --run "
                       f"{run.path}` first")
    from safetensors.torch import load_file

    return load_file(str(path))["means"]


# ---- sweep, rank, ablate --------------------------------------------------------------------------------
@app.command("sweep")
def sweep(run_dir: Path = typer.Option(..., "--run", help="An eval run directory."),
          layers: Optional[str] = typer.Option(None, "--layers", help="Layer range A:B (default: all)."),
          heads: Optional[str] = typer.Option(None, "--heads", help="Head range A:B (default: all)."),
          mode: str = typer.Option("score", "--mode", help="score (answer logits) or generate (greedy replies)."),
          intervention: str = typer.Option("zero", "--intervention", help="zero, mean or reference-mean."),
          batch_size: int = typer.Option(16, "--batch-size", help="Knockouts per forward."),
          max_new_tokens: int = typer.Option(50, "--max-new-tokens"),
          force: bool = typer.Option(False, "--force")) -> None:
    """Knock out every head of the grid, one at a time, on the run's misleading prompts.

    Example: halluscope sweep --run runs/count --layers 0:2 --mode score
    """
    from halluscope.errors import InputError
    from halluscope.runs import Run
    from halluscope.sweep.runner import SWEEP_MODES, parse_range, run_sweep, sweep_items
    from halluscope.tasks.sample import samples_from_frame

    if mode not in SWEEP_MODES:
        raise InputError(f"unknown --mode {mode!r}; use one of {', '.join(SWEEP_MODES)}")
    run = Run.open(run_dir)
    baseline = run.read_table("baseline", hint="eval")
    vlm = _run_model(run)
    layer_ids = parse_range(layers, vlm.n_layers, "layer")
    head_ids = parse_range(heads, vlm.n_heads, "head")
    run.begin_step("sweep", {"layers": layer_ids, "heads": head_ids, "mode": mode, "intervention": intervention,
                             "batch_size": batch_size, "max_new_tokens": max_new_tokens}, force=force)
    head_means = _load_means(run, intervention)
    images = {s.id: s.image for s in samples_from_frame(run.read_table("samples"))}
    items = sweep_items(baseline, images)
    if not items:
        raise InputError(f"{run.path} has no misleading prompts to sweep; evaluate with offsets/distances")
    with progress_bar(f"sweep ({mode})", len(items) * len(layer_ids)) as advance:
        advance(len(run.parts("sweep").done()))
        table = run_sweep(vlm, run.parts("sweep"), items, layer_ids, head_ids, mode=mode, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, intervention_mode=intervention, means=head_means,
                          on_shard=advance)
    clean = baseline.set_index("sample_id")
    table["condition"] = table["sample_id"].map(clean["condition"])
    table["baseline_outcome"] = table["sample_id"].map(clean["outcome"])
    run.write_table("sweep", table)
    run.finish_step("sweep", {"rows": len(table), "prompts": len(items), "heads": len(layer_ids) * len(head_ids)})
    console.print(f"wrote {run.path / 'sweep.parquet'}: {len(table)} rows ({len(items)} prompts x "
                  f"{len(layer_ids) * len(head_ids)} heads)")


@app.command("rank")
def rank(run_dir: Path = typer.Option(..., "--run", help="A run with a sweep."),
         top: int = typer.Option(10, "--top", help="Heads to show.")) -> None:
    """Rank heads by how often knocking them out corrects the prompt-induced answer; write heads.json.

    Example: halluscope rank --run runs/count
    """
    from halluscope import plots
    from halluscope.analysis.ranking import correction_matrix, rank_heads, rank_report
    from halluscope.runs import Run

    run = Run.open(run_dir)
    sweep_table = run.read_table("sweep", hint="sweep")
    run.begin_step("rank", {"top": top}, force=True)
    report = rank_report(sweep_table)
    run.write_json("heads", report)
    ranking = rank_heads(sweep_table)
    run.write_table("ranking", ranking)
    info = run.manifest["model"]
    plots.plot_head_heatmap(correction_matrix(sweep_table, info["n_layers"], info["n_heads"]),
                            run.plots_dir / "head_correction_rate.png", title="correction rate per knocked-out head",
                            cbar_label="correction rate")
    run.finish_step("rank", {"best": report["best"]})
    table = Table(title="heads whose knockout most often corrects the prompt-induced answer")
    for column in ("rank", "head", "correction rate", "copy rate", "n"):
        table.add_column(column, justify="right")
    for row in ranking.head(top).itertuples():
        table.add_row(str(row.rank), f"L{row.layer}H{row.head}", _pct(row.correction_rate), _pct(row.copy_rate),
                      str(row.n))
    Console().print(table)


@app.command("ablate")
def ablate(run_dir: Path = typer.Option(..., "--run", help="An eval run directory."),
           heads: str = typer.Option(..., "--heads", help="A named set from rank (best3, top1) or L0H3,L11H15."),
           intervention: str = typer.Option("zero", "--intervention", help="zero, mean, scale or reference-mean."),
           alpha: float = typer.Option(0.0, "--alpha", help="0 knocks the heads out, 1 leaves them unchanged."),
           positions: str = typer.Option("all", "--positions", help="all, prompt or generated."),
           batch_size: int = typer.Option(8, "--batch-size"),
           force: bool = typer.Option(False, "--force")) -> None:
    """Re-evaluate the run's task with heads knocked out; write the PIH rates before and after.

    Example: halluscope ablate --run runs/count --heads best3
    """
    import pandas as pd

    from halluscope import metrics, plots
    from halluscope.analysis.ranking import resolve_head_set
    from halluscope.evaluation import iter_evaluate, readable_samples
    from halluscope.interventions.heads import HeadIntervention, format_heads
    from halluscope.runs import Run
    from halluscope.tasks.sample import samples_from_frame

    run = Run.open(run_dir)
    baseline = run.read_table("baseline", hint="eval")
    info = run.manifest["model"]
    report = run.read_json("heads") if run.has_table("heads") or (run.path / "heads.json").is_file() else None
    head_set = resolve_head_set(heads, report, info["n_layers"], info["n_heads"])
    iv = HeadIntervention(head_set, mode=intervention, alpha=alpha, positions=positions)
    eval_args = run.manifest["steps"]["eval"]["arguments"]
    run.begin_step("ablate", {"heads": format_heads(head_set), "spec": heads, "intervention": intervention,
                              "alpha": alpha, "positions": positions, "batch_size": batch_size}, force=force)
    vlm = _run_model(run)
    head_means = _load_means(run, intervention)
    samples, _ = readable_samples(samples_from_frame(run.read_table("samples")))
    parts = run.parts("ablate")
    done = parts.done()
    chunk = max(batch_size, 32)
    with progress_bar(f"ablate {format_heads(head_set)}", len(samples)) as advance:
        for start in range(0, len(samples), chunk):
            key = f"{start:06d}"
            if key in done:
                advance(min(chunk, len(samples) - start))
                continue
            frames = []
            for frame in iter_evaluate(vlm, samples[start:start + chunk], batch_size=batch_size,
                                       max_new_tokens=eval_args["max_new_tokens"], intervention=iv,
                                       means=head_means):
                frames.append(frame)
                advance(len(frame))
            parts.write(key, pd.concat(frames, ignore_index=True))
    after = parts.read_all()
    run.write_table("ablation", after)
    before_summary, after_summary = metrics.summarize(baseline), metrics.summarize(after)
    result = {"heads": format_heads(head_set), "intervention": iv.mode, "alpha": alpha, "positions": positions,
              "before": before_summary, "after": after_summary,
              "copy_rate_relative_reduction": metrics.relative_reduction(before_summary["copy_rate"] or 0.0,
                                                                         after_summary["copy_rate"] or 0.0),
              "base_accuracy_change": _diff(after_summary["base_accuracy"], before_summary["base_accuracy"])}
    run.write_json("ablation_summary", result)
    mis_before = metrics.pih_rates(metrics.select_misleading(baseline), by=("truth",))
    mis_after = metrics.pih_rates(metrics.select_misleading(after), by=("truth",))
    plots.plot_before_after(mis_before, mis_after, run.plots_dir / "ablation_copy_rate.png",
                            title=f"copy rate with {format_heads(head_set)} knocked out",
                            labels=("baseline", "ablated"))
    run.finish_step("ablate", result)
    Console().print(f"heads {format_heads(head_set)} ({iv.mode}, alpha={alpha}): copy rate "
                    f"{_pct(before_summary['copy_rate'])} -> {_pct(after_summary['copy_rate'])}, base accuracy "
                    f"{_pct(before_summary['base_accuracy'])} -> {_pct(after_summary['base_accuracy'])}")


def _diff(a, b):
    return None if a is None or b is None else a - b


if __name__ == "__main__":  # pragma: no cover
    main()
