"""The `halluscope` command line: one command per pipeline step, each writing into a run directory.

    halluscope tiny-models tiny/
    halluscope eval --model tiny/qwen2_vl --task count --data synthetic --n 20 --out runs/demo
    halluscope sweep --run runs/demo && halluscope rank --run runs/demo
    halluscope ablate --run runs/demo --heads best3
"""

from __future__ import annotations

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

    names = [get_family(f).name for f in family] if family else list(TINY_FAMILIES)
    with progress_bar("building", len(names)) as advance:
        for name in names:
            build_tiny(name, out / name)
            advance()
    console.print(f"wrote {len(names)} checkpoints under {out}: {', '.join(names)}")


def _load(model: str):
    from halluscope.steps import load_model

    return load_model(model)


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
          size: Optional[int] = typer.Option(None, "--size", help="Side of synthetic images in pixels (default 224)."),
          batch_size: int = typer.Option(8, "--batch-size"),
          max_new_tokens: int = typer.Option(50, "--max-new-tokens"),
          object_column: Optional[str] = typer.Option(None, "--object-column",
                                                      help="Column holding the object noun (loaded counting data)."),
          name_objects: bool = typer.Option(False, "--name-objects",
                                            help="Let the model name each image's object (counting data without nouns)."),
          objects: Optional[Path] = typer.Option(None, "--objects",
                                                 help="JSON file mapping row index, image id or file name to the "
                                                      "object noun (counting data without nouns)."),
          force: bool = typer.Option(False, "--force", help="Overwrite a different run in --out.")) -> None:
    """Baseline evaluation of a PIH task: greedy replies, parsed answers, copy/correction rates, plots.

    Example: halluscope eval --model organism --task count --data synthetic --n 20 --out runs/count
    """
    from halluscope.steps import eval_step

    options: dict = {"size": size} if size is not None else {}
    if objects is not None:
        options["objects"] = _json_mapping(objects, "--objects")
    run, summary = eval_step(out, model=model, task=task, data=data, n=n, offsets=_ints(offsets, "offsets"),
                             seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             object_column=object_column, name_objects=name_objects, force=force,
                             progress=progress_bar, warn=lambda m: console.print(f"[yellow]{m}[/yellow]"), **options)
    _print_summary(summary, run.path)


def _json_mapping(path: Path, option: str) -> dict:
    """A JSON object read from `path`, or a one-line error naming the option and the problem."""
    import json

    from halluscope.errors import InputError

    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{option} {str(path)!r} does not exist; pass a JSON file such as "
                         f"{{\"0003\": \"apples\"}}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{option} {str(path)!r} is not readable JSON ({str(exc).splitlines()[0]}); pass a JSON "
                         f"object such as {{\"0003\": \"apples\"}}") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} {str(path)!r} holds a {type(value).__name__}; pass a JSON object mapping row "
                         f"index, image id or file name to a noun")
    return value


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


# ---- means, sweep, rank, ablate -------------------------------------------------------------------------
@app.command("means")
def means(run_dir: Path = typer.Option(..., "--run", help="An eval run directory."),
          batch_size: int = typer.Option(8, "--batch-size"),
          force: bool = typer.Option(False, "--force")) -> None:
    """Per-(layer, head) mean o_proj input over the run's samples, for --intervention mean.

    Example: halluscope means --run runs/count
    """
    from halluscope.steps import means_step

    path = means_step(run_dir, batch_size=batch_size, force=force, progress=progress_bar)
    console.print(f"wrote {path}")


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
    from halluscope.steps import sweep_step

    table = sweep_step(run_dir, layers=layers, heads=heads, mode=mode, intervention=intervention,
                       batch_size=batch_size, max_new_tokens=max_new_tokens, force=force, progress=progress_bar)
    console.print(f"wrote {Path(run_dir) / 'sweep.parquet'}: {len(table)} rows "
                  f"({table['sample_id'].nunique()} prompts x {len(table.groupby(['layer', 'head']))} heads)")


@app.command("rank")
def rank(run_dir: Path = typer.Option(..., "--run", help="A run with a sweep."),
         top: int = typer.Option(10, "--top", help="Heads to show.")) -> None:
    """Rank heads by how often knocking them out corrects the prompt-induced answer; write heads.json.

    Example: halluscope rank --run runs/count
    """
    from halluscope.steps import rank_step

    report, ranking = rank_step(run_dir)
    table = Table(title="heads whose knockout most often corrects the prompt-induced answer")
    for column in ("rank", "head", "correction rate", "copy rate", "n"):
        table.add_column(column, justify="right")
    for row in ranking.head(top).itertuples():
        table.add_row(str(row.rank), f"L{row.layer}H{row.head}", _pct(row.correction_rate), _pct(row.copy_rate),
                      str(row.n))
    Console().print(table)
    Console().print("head sets: " + ", ".join(f"{k}={v}" for k, v in report["names"].items()))


@app.command("confirm")
def confirm(run_dir: Path = typer.Option(..., "--run", help="A run with a sweep and a ranking."),
            heads: str = typer.Option("best5", "--heads", help="A named set from rank (best5) or L0H3,L11H15."),
            batch_size: int = typer.Option(16, "--batch-size"),
            max_new_tokens: int = typer.Option(50, "--max-new-tokens"),
            force: bool = typer.Option(False, "--force")) -> None:
    """Re-run the top heads' knockouts with greedy generation and compare with the score-mode outcomes.

    Example: halluscope confirm --run runs/count --heads best5
    """
    from halluscope.steps import confirm_step

    result = confirm_step(run_dir, heads=heads, batch_size=batch_size, max_new_tokens=max_new_tokens, force=force,
                          progress=progress_bar)
    Console().print(f"generate mode agrees with score mode on {_pct(result['agreement'])} of rows for "
                    f"{result['heads']}")


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
    from halluscope.steps import ablate_step

    result = ablate_step(run_dir, heads=heads, intervention=intervention, alpha=alpha, positions=positions,
                         batch_size=batch_size, force=force, progress=progress_bar)
    before, after = result["before"], result["after"]
    Console().print(f"heads {result['heads']} ({result['intervention']}, alpha={alpha}): copy rate "
                    f"{_pct(before['copy_rate'])} -> {_pct(after['copy_rate'])}, base accuracy "
                    f"{_pct(before['base_accuracy'])} -> {_pct(after['base_accuracy'])}")


# ---- organism -------------------------------------------------------------------------------------------
@organism_app.command("train")
def organism_train(out: Path = typer.Option(..., "--out", help="Directory for the checkpoint and model card."),
                   seed: int = typer.Option(0, "--seed"),
                   steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: the recipe's)."),
                   threads: int = typer.Option(2, "--threads", help="Torch threads (results depend on it).")) -> None:
    """Train the model organism from scratch (deterministic for a seed and thread count), then measure it and
    write its model card. Resumes if killed.

    Example: halluscope organism train --out organism/ --seed 0
    """
    import dataclasses
    import sys
    import time

    from halluscope.organism.recipe import Recipe
    from halluscope.organism.train import train

    recipe = Recipe(seed=seed, threads=threads)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    start = time.time()
    train(out, recipe, log=lambda line: console.print(line, highlight=False))
    _write_card(out, recipe, time.time() - start, "halluscope " + " ".join(sys.argv[1:]))


@organism_app.command("card")
def organism_card(model: Path = typer.Option(..., "--model", help="A trained organism directory.")) -> None:
    """Measure a trained organism on the held-out set and (re)write its MODEL_CARD.md and behaviour.json."""
    import json

    from halluscope.organism.recipe import Recipe

    log = json.loads((model / "trainlog.json").read_text()) if (model / "trainlog.json").is_file() else {}
    recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in log.get("recipe", {}).items()})
    seconds = (log.get("history") or [{}])[-1].get("seconds")
    _write_card(model, recipe, seconds, f"halluscope organism train --out DIR --seed {recipe.seed}")


def _write_card(out: Path, recipe, seconds, command: str) -> None:
    from halluscope.organism.behaviour import behaviour_report
    from halluscope.organism.card import write_card

    report = behaviour_report(_load(str(out)))
    path = write_card(out, recipe, report, train_seconds=seconds, command=command)
    b = report["behaviour"]
    console.print(f"wrote {path}: counting {_pct(b['base_accuracy'])}, colour {_pct(b['color_accuracy'])}, copy "
                  f"1-3 {_pct(b['copy_rate_counts_1_3'])}, copy 7-9 {_pct(b['copy_rate_counts_7_9'])}; head set: "
                  f"{(report['head_set']['best'] or {}).get('heads', 'none met the target')}")


# ---- demo -----------------------------------------------------------------------------------------------
@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write."),
         n: int = typer.Option(36, "--n", help="Synthetic images (5 misleading offsets + base + control each)."),
         force: bool = typer.Option(False, "--force", help="Overwrite a different run in --out.")) -> None:
    """The whole PIH pipeline on the built-in organism: eval, sweep, rank, confirm, ablate, attention, probs,
    and report.md. Offline, about a minute on a 2-core CPU; rerunning resumes.

    Example: halluscope demo --out runs/demo
    """
    from halluscope.demo import run_demo
    from halluscope.report import headline_lines

    headline = run_demo(out, n=n, force=force, progress=progress_bar)
    Console().print(f"\n[bold]halluscope demo[/bold] ({out / 'report.md'})")
    for line in headline_lines(headline):
        Console().print(f"  {line}", highlight=False)


from halluscope import cli_analysis  # noqa: E402,F401  (registers attention, attention-maps, probs, lens)

if __name__ == "__main__":  # pragma: no cover
    main()
