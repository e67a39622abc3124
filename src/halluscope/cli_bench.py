"""The `halluscope bench` commands: POPE, CHAIR and the PIH task on one model, under plain greedy decoding and
under each named mitigation method, into a run directory with one comparison table
(`halluscope.bench.step.bench_step`). The group registers on `halluscope.cli.app` when this module is imported
(`halluscope.cli` imports it).

    halluscope bench pope --model organism-scenes --data synthetic --method heads:L0H1,L1H2 --out runs/pope
    halluscope bench chair --model organism-scenes --data synthetic --method vcd --out runs/chair
    halluscope bench pih --model organism --task count --size 112 --method vcd --method heads:L0H2 --out runs/pih
    halluscope bench compare runs/chair runs/chair-apasi --out runs/chair-compare
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from halluscope.cli import GPUS_PER_WORKER, RAY, WORKERS, _ints, app, progress_bar, scale_of

__all__ = ["bench_app", "chair", "compare", "pih", "pope"]

bench_app = typer.Typer(no_args_is_help=True,
                        help="Hallucination benchmarks (POPE, CHAIR, the PIH task): greedy vs mitigation methods.")
app.add_typer(bench_app, name="bench")

_MODEL = typer.Option(..., "--model", help="Hub id, local checkpoint directory, 'organism' or 'organism-scenes'.")
_DATA = typer.Option("synthetic", "--data",
                     help="'synthetic' (object scenes drawn offline) or a directory with "
                          "annotations/instances_*.json and images/.")
_METHODS = typer.Option(None, "--method",
                        help="A method to compare with plain greedy, repeatable: any registered decoding method at its "
                             "defaults (e.g. vcd, dola; `halluscope decode --help` lists them), with settings as JSON "
                             "('vcd:{\"alpha\": 0.5}'), heads:L0H1,L1H2 (heads knocked out) or heads:best3@RUN (a "
                             "run's ranked head set).")
_OUT = typer.Option(..., "--out", help="Run directory to write.")
_SEED = typer.Option(0, "--seed", help="Seed of the synthetic scenes and of the image draw.")
_TOKENS = typer.Option(None, "--max-new-tokens", min=1, help="Greedy reply budget, the same for every method.")
_BATCH = typer.Option(16, "--batch-size", min=1)
_FORCE = typer.Option(False, "--force", help="Overwrite a different run in --out.")


@bench_app.command("pope")
def pope(model: str = _MODEL, data: str = _DATA, methods: Optional[List[str]] = _METHODS, out: Path = _OUT,
         n: int = typer.Option(100, "--n", min=1, help="Images asked about (6 questions each per split)."),
         seed: int = _SEED,
         template: Optional[str] = typer.Option(None, "--template",
                                                help="Question template with one {} (default POPE's)."),
         rule: str = typer.Option("pope", "--rule", help="Answer rule: pope, opera or apasi."),
         max_new_tokens: Optional[int] = _TOKENS, batch_size: int = _BATCH, force: bool = _FORCE,
         ray: Optional[str] = RAY, workers: int = WORKERS, gpus_per_worker: float = GPUS_PER_WORKER) -> None:
    """POPE (random, popular, adversarial splits) under greedy and each --method; one row per method x split.

    Example: halluscope bench pope --model organism-scenes --data synthetic --method heads:L0H1,L1H2 --out runs/pope
    """
    _run("pope", model=model, data=data, methods=methods or [], out=out, n=n, seed=seed, prompt=template,
         max_new_tokens=max_new_tokens, batch_size=batch_size, force=force, rule=rule,
         scale=scale_of(ray, workers, gpus_per_worker))


@bench_app.command("chair")
def chair(model: str = _MODEL, data: str = _DATA, methods: Optional[List[str]] = _METHODS, out: Path = _OUT,
          n: int = typer.Option(100, "--n", min=1, help="Images captioned."),
          seed: int = _SEED,
          prompt: Optional[str] = typer.Option(None, "--prompt", help="Caption prompt (default 'Describe this "
                                                                       "image.')."),
          nlp: str = typer.Option("auto", "--nlp", help="CHAIR's NLP components: auto, nltk or offline."),
          chair_method: str = typer.Option("opera", "--chair-method", help="Word extraction: opera or original."),
          max_new_tokens: Optional[int] = _TOKENS, batch_size: int = _BATCH, force: bool = _FORCE,
          ray: Optional[str] = RAY, workers: int = WORKERS, gpus_per_worker: float = GPUS_PER_WORKER) -> None:
    """CHAIR (CHAIR_s, CHAIR_i, recall, length) under greedy and each --method; one row per method.

    Example: halluscope bench chair --model organism-scenes --data synthetic --out runs/chair
    """
    _run("chair", model=model, data=data, methods=methods or [], out=out, n=n, seed=seed, prompt=prompt,
         max_new_tokens=max_new_tokens, batch_size=batch_size, force=force, nlp=nlp, chair_method=chair_method,
         scale=scale_of(ray, workers, gpus_per_worker))


@bench_app.command("pih")
def pih(model: str = _MODEL,
        data: str = typer.Option("synthetic", "--data", help="'synthetic', a local file/folder, or a hub id (as "
                                                             "`halluscope eval --data`)."),
        methods: Optional[List[str]] = _METHODS, out: Path = _OUT,
        task: str = typer.Option("count", "--task", help="count or color."),
        n: Optional[int] = typer.Option(None, "--n", min=1, help="Images (default: all / one per value and shape)."),
        offsets: Optional[str] = typer.Option(None, "--offsets",
                                              help="Count offsets (count) or colour distances (color), e.g. 1,2,3."),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic scenes."),
        size: Optional[int] = typer.Option(None, "--size", help="Side of synthetic images in pixels (default 224; "
                                                                "the organism's is 112)."),
        max_new_tokens: Optional[int] = _TOKENS, batch_size: int = _BATCH, force: bool = _FORCE,
        ray: Optional[str] = RAY, workers: int = WORKERS, gpus_per_worker: float = GPUS_PER_WORKER) -> None:
    """The PIH task (eval's prompts) under greedy and each --method: base accuracy and copy rate, one row per method.

    Example: halluscope bench pih --model organism --task count --size 112 --method vcd --method heads:L0H2,L0H3
    --out runs/pih
    """
    _run("pih", model=model, data=data, methods=methods or [], out=out, n=n, seed=seed, task=task,
         offsets=_ints(offsets, "offsets"), size=size, max_new_tokens=max_new_tokens, batch_size=batch_size,
         force=force, scale=scale_of(ray, workers, gpus_per_worker))


@bench_app.command("compare")
def compare(runs: List[Path] = typer.Argument(..., help="Finished `bench pope`, `bench chair` or `bench pih` run "
                                                        "directories of one benchmark; the first run's first "
                                                        "method is the baseline."),
            out: Path = _OUT,
            resamples: int = typer.Option(2000, "--bootstrap", min=1, help="Bootstrap resamples of the images."),
            seed: int = typer.Option(0, "--seed", help="Seed of the resamples."),
            level: float = typer.Option(0.95, "--level", help="Confidence level of the intervals."),
            force: bool = _FORCE) -> None:
    """Each method's change from the baseline with a paired bootstrap interval over images: a before/after table.

    Example: halluscope bench compare runs/chair runs/chair-apasi --out runs/chair-compare
    """
    from halluscope.bench.compare import compare_step

    result = compare_step(out, runs=runs, resamples=resamples, seed=seed, level=level, force=force)
    table, summary = result["table"], result["summary"]
    shown = Table(title=f"{summary['benchmark'].upper()}: change from {summary['baseline']} ({result['run'].path})")
    keys = [c for c in ("arm", "split", "metric") if c in table.columns]
    for column in (*keys, "value", "change", "interval", "relative"):
        shown.add_column(column, justify="left" if column in keys else "right", overflow="fold")
    for row in table.to_dict("records"):
        shown.add_row(*(str(row[k]) for k in keys), f"{row['value']:.3f}", f"{row['change']:+.3f}",
                      f"[{row['change_low']:+.3f}, {row['change_high']:+.3f}]", f"{row['relative']:+.1%}")
    Console().print(shown)
    Console().print(f"  {summary['n_images']} images; {summary['interval']}", highlight=False, soft_wrap=True)


def _run(benchmark: str, **arguments) -> None:
    from halluscope.bench.step import bench_step, setting_lines

    result = bench_step(benchmark=benchmark, progress=progress_bar, **arguments)
    table = result["table"]
    shown = Table(title=f"{benchmark.upper()} ({result['run'].path})")
    for column in table.columns:
        shown.add_column(column, justify="left" if column in ("method", "split") else "right", overflow="fold")
    for row in table.itertuples(index=False):
        shown.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    Console().print(shown)
    for line in setting_lines(result["summary"]):
        Console().print(f"  {line}", highlight=False, soft_wrap=True)
