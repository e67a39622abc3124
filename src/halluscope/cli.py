"""The `halluscope` command line: one command per pipeline step, each writing into a run directory.

    halluscope tiny-models tiny/
    halluscope eval --model tiny/qwen2_vl --task count --data synthetic --n 20 --out runs/demo
    halluscope sweep --run runs/demo && halluscope rank --run runs/demo
    halluscope ablate --run runs/demo --heads best3
"""

from __future__ import annotations

import errno
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, List, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from halluscope.errors import HalluscopeError

if TYPE_CHECKING:
    from halluscope.scale import Scale

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find why vision-language models hallucinate, and fix it.")
organism_app = typer.Typer(no_args_is_help=True, help="The built-in model organism of prompt-induced hallucination.")
app.add_typer(organism_app, name="organism")
console = Console(stderr=True)

USAGE_EXIT = 2  # bad input of any kind: click's exit code for usage errors
INTERRUPT_EXIT = 130  # 128 + SIGINT, the shell's code for Ctrl-C
PROGRESS_INTERVAL = 5.0  # seconds between progress log lines when stderr is not a terminal


def _version() -> str:
    """The installed package's version, or "unknown" when running from an uninstalled source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("halluscope")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    """Eager `--version` callback: print `halluscope <version>` and exit 0."""
    if value:
        print(f"halluscope {_version()}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print halluscope's version and exit.")) -> None:
    """Find why vision-language models hallucinate, and fix it."""


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point. Every error a user can cause prints one line instead of a traceback:

    - HalluscopeErrors, usage errors (missing or unknown option, bad value) and OSErrors (read-only or
      missing directory, a file in the way, permission denied) exit 2;
    - bare `halluscope` (or `halluscope organism`) prints the help and exits 2, click's convention;
    - Ctrl-C exits 130 with "interrupted; rerun to resume" (steps resume from their finished shards).
    """
    argv = _local_ray(list(sys.argv[1:] if args is None else args))
    try:
        code = app(args=argv, prog_name="halluscope", standalone_mode=False)
    except HalluscopeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort as exc:  # EOF on a prompt; older click also turned Ctrl-C into Abort
        if isinstance(exc.__context__, KeyboardInterrupt):
            _interrupted()
        console.print("aborted")
        raise SystemExit(1) from None
    except OSError as exc:
        _os_error(exc)
    except Exception as exc:
        if _is_click_error(exc):
            _usage_error(exc, argv)
        raise
    _exit_with(code)


def _local_ray(argv: List[str]) -> List[str]:
    """`--ray` given without an address (last, or before another option) means "local" (typer options cannot
    take an optional value)."""
    out: List[str] = []
    for i, word in enumerate(argv):
        out.append(word)
        if word == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("local")
    return out


def _fail(message: str, code: int = USAGE_EXIT) -> NoReturn:
    """Print `error: <message>` on one line of stderr and exit with `code`."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise SystemExit(code) from None


def _interrupted() -> NoReturn:
    console.print("interrupted; rerun to resume", highlight=False, soft_wrap=True)
    raise SystemExit(INTERRUPT_EXIT) from None


def _exit_with(code: object) -> None:
    """Exit with the code typer returns in non-standalone mode (130 after Ctrl-C, 0 after --help)."""
    if code == INTERRUPT_EXIT:
        _interrupted()
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        raise SystemExit(code)


def _click_error_types() -> tuple[type, ...]:
    """ClickException as typer raises it: its vendored copy (typer >= 0.17) and click's own (older typer)."""
    types: list[type] = []
    try:
        from typer._click.exceptions import ClickException as vendored

        types.append(vendored)
    except ImportError:
        pass
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


def _is_click_error(exc: BaseException) -> bool:
    return isinstance(exc, _click_error_types())


def _usage_error(exc: Exception, argv: List[str]) -> NoReturn:
    """A click/typer error as one line; bare `halluscope` (no-args help) exits 2 after the help is printed."""
    code = getattr(exc, "exit_code", USAGE_EXIT) or USAGE_EXIT
    if type(exc).__name__ == "NoArgsIsHelpError":
        text = exc.format_message()  # empty when typer's rich formatter has already printed the help
        if text.strip():
            print(text, file=sys.stderr)
        raise SystemExit(code) from None
    ctx = getattr(exc, "ctx", None)
    given = _given_value(exc, argv)
    hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    _fail(exc.format_message().rstrip(".") + (f" (got {given!r})" if given is not None else "") + hint, code)


def _given_value(exc: Exception, words: List[str]) -> Optional[str]:
    """The command-line value of the option a BadParameter is about (typer's message leaves it out)."""
    opts = getattr(getattr(exc, "param", None), "opts", None) or []
    for i, word in enumerate(words):
        for opt in opts:
            if word == opt and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(opt + "="):
                return word[len(opt) + 1:]
    return None


_OS_FIXES = {
    errno.EACCES: "check its permissions, or pass a directory you can write to",
    errno.EPERM: "check its permissions, or pass a directory you can write to",
    errno.EROFS: "the file system is read-only: pass a directory on a writable disk",
    errno.ENOTDIR: "a file sits where a directory is needed: move the file or pass another path",
    errno.EEXIST: "something already exists there: move it or pass another path",
    errno.EISDIR: "a directory sits where a file is needed: move it or pass another path",
    errno.ENOSPC: "the disk is full: free some space, then rerun to resume",
    errno.ENOENT: "check the path, or create its parent directory",
}


def os_error_message(exc: OSError) -> str:
    """One line naming the path, the reason and the fix of an OSError."""
    reason = exc.strerror or (str(exc).splitlines() or [type(exc).__name__])[0]
    fix = _OS_FIXES.get(exc.errno, "check the path and rerun")
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(repr(str(p)) for p in paths)
    return f"cannot use {where}: {reason}; {fix}" if where else f"{reason}; {fix}"


def _os_error(exc: OSError) -> NoReturn:
    if exc.errno == errno.EPIPE:  # output piped into `head` that has closed: not an error of the user's
        raise SystemExit(1) from None
    _fail(os_error_message(exc))


# ---- progress -------------------------------------------------------------------------------------------
def _is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextmanager
def progress_bar(description: str, total: int, *, stream: Optional[IO] = None,
                 interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[Callable[..., None]]:
    """Report progress on stderr (or `stream`); yields a function that advances it by n.

    On a terminal this is a rich live bar. Otherwise (a log file, CI, a pipe) it prints plain lines such as
    `sweep (score): 120/480 (25%) 0:00:31 elapsed`, at most every `interval` seconds and once at the end.
    """
    stream = sys.stderr if stream is None else stream
    if total == 0:
        yield lambda n=1: None
    elif _is_terminal(stream):
        with _rich_bar(description, total, stream) as advance:
            yield advance
    else:
        with _log_lines(description, total, stream, interval, clock) as advance:
            yield advance


@contextmanager
def _rich_bar(description: str, total: int, stream: IO) -> Iterator[Callable[..., None]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    target = console if stream is sys.stderr else Console(file=stream)
    with Progress(*columns, console=target, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextmanager
def _log_lines(description: str, total: int, stream: IO, interval: float,
               clock: Callable[[], float]) -> Iterator[Callable[..., None]]:
    """Periodic one-line progress reports; the last one when the body finishes (not when it fails)."""
    start = last = clock()
    done, printed = 0, -1

    def report() -> None:
        nonlocal printed
        stream.write(f"{description}: {done}/{total} ({100 * done // total}%) "
                     f"{timedelta(seconds=int(clock() - start))} elapsed\n")
        stream.flush()
        printed = done

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        if clock() - last >= interval:
            report()
            last = clock()

    yield advance
    if printed != done:
        report()


# ---- scale-out (halluscope.scale) -----------------------------------------------------------------------------
RAY = typer.Option(None, "--ray", metavar="[ADDRESS]",
                   help="Run the shards on Ray: --ray alone starts a local instance, --ray auto joins this machine's "
                        "cluster, --ray HOST:PORT joins that one (pip install 'halluscope\\[ray]').")
WORKERS = typer.Option(1, "--workers", min=1, help="Ray workers, each holding one model replica (with --ray).")
GPUS_PER_WORKER = typer.Option(0.0, "--gpus-per-worker", min=0.0,
                               help="GPUs reserved for each Ray worker; 0 keeps them on the CPU (with --ray).")


METHOD = typer.Option(None, "--method", help="Decode under a mitigation method (e.g. vcd, pai, vista, heads); "
                                               "`halluscope decode --help` lists them all.")
METHOD_CONFIG = typer.Option(None, "--method-config", help='The method\'s settings as a JSON object, e.g. \'{"alpha": 1.0}\'.')


def scale_of(ray: Optional[str], workers: int, gpus_per_worker: float) -> Scale:
    """The `halluscope.scale.Scale` the --ray, --workers and --gpus-per-worker options ask for."""
    from halluscope.scale import Scale

    return Scale(ray, workers=workers, gpus_per_worker=gpus_per_worker)


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
          n: Optional[int] = typer.Option(None, "--n", min=1,
                                         help="Number of images (default: all / one per value)."),
          offsets: Optional[str] = typer.Option(None, "--offsets",
                                                help="Count offsets (count) or colour distances (color), e.g. 1,2,3."),
          seed: int = typer.Option(0, "--seed", help="Seed of the synthetic scenes."),
          size: Optional[int] = typer.Option(None, "--size", help="Side of synthetic images in pixels (default 224)."),
          batch_size: int = typer.Option(8, "--batch-size", min=1),
          max_new_tokens: int = typer.Option(50, "--max-new-tokens", min=1),
          object_column: Optional[str] = typer.Option(None, "--object-column",
                                                      help="Column holding the object noun (loaded counting data)."),
          name_objects: bool = typer.Option(False, "--name-objects",
                                            help="Let the model name each image's object (counting data without nouns)."),
          objects: Optional[Path] = typer.Option(None, "--objects",
                                                 help="JSON file mapping row index, image id or file name to the "
                                                      "object noun (counting data without nouns)."),
          force: bool = typer.Option(False, "--force", help="Overwrite a different run in --out."),
          ray: Optional[str] = RAY, workers: int = WORKERS, gpus_per_worker: float = GPUS_PER_WORKER,
          method: Optional[str] = METHOD, method_config: Optional[str] = METHOD_CONFIG) -> None:
    """Baseline evaluation of a PIH task: greedy replies, parsed answers, copy/correction rates, plots.

    Example: halluscope eval --model organism --task count --data synthetic --n 20 --out runs/count
    """
    from halluscope.steps import eval_step

    scale = scale_of(ray, workers, gpus_per_worker)

    options: dict = {"size": size} if size is not None else {}
    if objects is not None:
        options["objects"] = _json_mapping(objects, "--objects")
    run, summary = eval_step(out, model=model, task=task, data=data, n=n, offsets=_ints(offsets, "offsets"),
                             seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             object_column=object_column, name_objects=name_objects, force=force,
                             progress=progress_bar, warn=lambda m: console.print(f"[yellow]{m}[/yellow]"), scale=scale,
                             method=method, method_config=method_config, **options)
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
          batch_size: int = typer.Option(8, "--batch-size", min=1),
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
          mode: str = typer.Option("score", "--mode", help="score (answer-word scores), generate (greedy replies), "
                                   "or atp / atp-star (every head estimated from one forward and backward)."),
          intervention: str = typer.Option("zero", "--intervention", help="zero, mean or reference-mean."),
          batch_size: int = typer.Option(16, "--batch-size", min=1, help="Knockouts per forward."),
          max_new_tokens: int = typer.Option(50, "--max-new-tokens", min=1),
          verify_top: int = typer.Option(0, "--verify-top", min=0,
                                         help="With atp/atp-star: measure the K heads with the largest estimated "
                                              "effect per prompt exactly (score mode); the table keeps both."),
          force: bool = typer.Option(False, "--force"),
          ray: Optional[str] = RAY, workers: int = WORKERS, gpus_per_worker: float = GPUS_PER_WORKER) -> None:
    """Knock out every head of the grid, one at a time, on the run's misleading prompts.

    Example: halluscope sweep --run runs/count --layers 0:2 --mode score
    Example: halluscope sweep --run runs/count --mode atp-star --verify-top 10
    Example: halluscope sweep --run runs/count --ray --workers 2
    """
    from halluscope.steps import sweep_step

    table = sweep_step(run_dir, layers=layers, heads=heads, mode=mode, intervention=intervention,
                       batch_size=batch_size, max_new_tokens=max_new_tokens, verify_top=verify_top, force=force,
                       progress=progress_bar, scale=scale_of(ray, workers, gpus_per_worker))
    console.print(f"wrote {Path(run_dir) / 'sweep.parquet'}: {len(table)} rows "
                  f"({table['sample_id'].nunique()} prompts x {len(table.groupby(['layer', 'head']))} heads)")
    if verify_top:
        from halluscope.sweep.runner import verification_summary

        check = verification_summary(table)
        console.print(f"verified {check['verified']} (prompt, head) pairs exactly: rank correlation of estimated "
                      f"and exact effects {check['spearman'] if check['spearman'] is None else round(check['spearman'], 3)}, "
                      f"outcome agreement {_pct(check['outcome_agreement'])}")


@app.command("rank")
def rank(run_dir: Path = typer.Option(..., "--run", help="A run with a sweep."),
         top: int = typer.Option(10, "--top", min=1, help="Heads to show."),
         by: str = typer.Option("auto", "--by", help="Rows to rank: exact, estimate (an atp/atp-star sweep's "
                                "estimates), or auto (estimates of an estimator sweep, else exact).")) -> None:
    """Rank heads by how often knocking them out corrects the prompt-induced answer; write heads.json.

    Example: halluscope rank --run runs/count
    """
    from halluscope.steps import rank_step

    report, ranking = rank_step(run_dir, by=by)
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
            batch_size: int = typer.Option(16, "--batch-size", min=1),
            max_new_tokens: int = typer.Option(50, "--max-new-tokens", min=1),
            force: bool = typer.Option(False, "--force"),
            ray: Optional[str] = RAY, workers: int = WORKERS, gpus_per_worker: float = GPUS_PER_WORKER) -> None:
    """Re-run the top heads' knockouts with greedy generation and compare with the score-mode outcomes.

    Example: halluscope confirm --run runs/count --heads best5
    """
    from halluscope.steps import confirm_step

    result = confirm_step(run_dir, heads=heads, batch_size=batch_size, max_new_tokens=max_new_tokens, force=force,
                          progress=progress_bar, scale=scale_of(ray, workers, gpus_per_worker))
    Console().print(f"generate mode agrees with score mode on {_pct(result['agreement'])} of rows for "
                    f"{result['heads']}")


@app.command("ablate")
def ablate(run_dir: Path = typer.Option(..., "--run", help="An eval run directory."),
           heads: str = typer.Option(..., "--heads", help="A named set from rank (best3, top1) or L0H3,L11H15."),
           intervention: str = typer.Option("zero", "--intervention", help="zero, mean, scale or reference-mean."),
           alpha: float = typer.Option(0.0, "--alpha", help="0 knocks the heads out, 1 leaves them unchanged."),
           positions: str = typer.Option("all", "--positions", help="all, prompt or generated."),
           batch_size: int = typer.Option(8, "--batch-size", min=1),
           name: Optional[str] = typer.Option(None, "--name",
                                              help="Names the outputs, NAME.parquet and NAME_summary.json "
                                                   "(default: from the heads, e.g. ablation_best3)."),
           force: bool = typer.Option(False, "--force")) -> None:
    """Re-evaluate the run's task with heads knocked out; write the PIH rates before and after.

    Each head set keeps its own outputs, so several ablations live side by side in one run.

    Example: halluscope ablate --run runs/count --heads best3
    """
    from halluscope.steps import ablate_step

    result = ablate_step(run_dir, heads=heads, intervention=intervention, alpha=alpha, positions=positions,
                         batch_size=batch_size, force=force, progress=progress_bar, name=name)
    before, after = result["before"], result["after"]
    Console().print(f"{result['name']}: heads {result['heads']} ({result['intervention']}, alpha={alpha}): copy rate "
                    f"{_pct(before['copy_rate'])} -> {_pct(after['copy_rate'])}, base accuracy "
                    f"{_pct(before['base_accuracy'])} -> {_pct(after['base_accuracy'])}")


# ---- organism -------------------------------------------------------------------------------------------
@organism_app.command("train")
def organism_train(out: Path = typer.Option(..., "--out", help="Directory for the checkpoint and model card."),
                   kind: str = typer.Option("pih", "--kind",
                                            help="pih (prompt-induced hallucination, load_vlm('organism')) or "
                                                 "scenes (object hallucination, load_vlm('organism-scenes'))."),
                   seed: int = typer.Option(0, "--seed"),
                   steps: Optional[int] = typer.Option(None, "--steps", min=1,
                                                      help="Training steps (default: the recipe's)."),
                   threads: int = typer.Option(2, "--threads", min=1,
                                              help="Torch threads (results depend on it).")) -> None:
    """Train a model organism from scratch (deterministic for a seed and thread count), then measure it and
    write its model card. Resumes if killed.

    Example: halluscope organism train --kind scenes --out organism-scenes/ --seed 0
    """
    import dataclasses

    from halluscope.organism.kinds import get_kind
    from halluscope.organism.train import train

    recipe = get_kind(kind).load("recipe")(seed=seed, threads=threads)
    if steps is not None:
        recipe = dataclasses.replace(recipe, steps=steps)
    start = time.time()
    train(out, recipe, log=lambda line: console.print(line, highlight=False))
    _write_card(out, recipe, time.time() - start, "halluscope " + " ".join(sys.argv[1:]))


@organism_app.command("card")
def organism_card(model: Path = typer.Option(..., "--model", help="A trained organism directory.")) -> None:
    """Measure a trained organism on its held-out set and (re)write its MODEL_CARD.md and behaviour.json."""
    import json

    from halluscope.errors import InputError
    from halluscope.organism.recipe import recipe_from_dict

    log_file = model / "trainlog.json"
    if not log_file.is_file():
        raise InputError(f"{model} has no trainlog.json; pass a directory written by `halluscope organism train`")
    log = json.loads(log_file.read_text())
    recipe = recipe_from_dict(log["recipe"])
    seconds = (log.get("history") or [{}])[-1].get("seconds")
    _write_card(model, recipe, seconds,
                f"halluscope organism train --kind {recipe.kind} --out DIR --seed {recipe.seed}")


def _write_card(out: Path, recipe, seconds, command: str) -> None:
    from halluscope.organism.kinds import get_kind

    kind = get_kind(recipe.kind)
    report = kind.load("report")(_load(str(out)))
    path = kind.load("card")(out, recipe, report, train_seconds=seconds, command=command)
    console.print(f"wrote {path}: {kind.headline(report)}")


# ---- demo -----------------------------------------------------------------------------------------------
@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write."),
         n: int = typer.Option(36, "--n", min=1, help="Synthetic images (5 misleading offsets + base + control each)."),
         force: bool = typer.Option(False, "--force", help="Overwrite a different run in --out.")) -> None:
    """The whole PIH pipeline on the built-in organism: eval, sweep, rank, confirm, ablate, attention,
    attention-maps, probs, then report.md and the interactive report.html. Offline, about a minute on a 2-core
    CPU; rerunning resumes.

    Example: halluscope demo --out runs/demo
    """
    from halluscope.demo import run_demo
    from halluscope.report import headline_lines

    headline = run_demo(out, n=n, force=force, progress=progress_bar)
    Console().print(f"\n[bold]halluscope demo[/bold] ({out / 'report.md'}, {out / 'report.html'})")
    for line in headline_lines(headline):
        Console().print(f"  {line}", highlight=False)


# ---- report ---------------------------------------------------------------------------------------------
@app.command("report")
def report(run_dir: Path = typer.Option(..., "--run", help="A run directory, from any step on.")) -> None:
    """Write RUN/report.html: one self-contained page (opens offline) with the run's PIH rates, the head
    heatmap (hover a head for its rank and the prompts it flips), attention maps, attention and probability
    shifts, the comparison of settings and the manifest, from whatever steps the run has.

    Example: halluscope report --run runs/count
    """
    from halluscope.plots.html_report import report_step

    path = report_step(run_dir)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opens offline)")


from halluscope import cli_analysis  # noqa: E402,F401  (registers attention, attention-maps, probs, lens)
from halluscope import cli_bench  # noqa: E402,F401  (registers the bench group: pope, chair)
from halluscope import cli_decode  # noqa: E402,F401  (registers decode)
from halluscope import cli_alea  # noqa: E402,F401  (registers the alea group: locate, edit)
from halluscope import cli_apasi  # noqa: E402,F401  (registers the apasi group: data, train)

if __name__ == "__main__":  # pragma: no cover
    main()
