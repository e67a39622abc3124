"""The analysis commands of the `halluscope` CLI: `attention`, `attention-maps`, `probs` and `lens`.

Each is a thin wrapper over a step function (`attention_step`, `attention_maps_step`, `probs_step`,
`lens_step` in `halluscope.analysis`), which reads the run's prompts, works through them in resumable shards
and writes its table and figures into the run. The commands register on `halluscope.cli.app` when this module
is imported (`halluscope.cli` imports it).

    halluscope attention --run runs/count --heads best3
    halluscope attention-maps --run runs/count --heads L0H3,L11H15 --samples 20
    halluscope probs --run runs/count --heads best3 --alphas 0,0.25,0.5,0.75,1
    halluscope lens --run runs/count --heads best3
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from halluscope.cli import app, console, progress_bar

__all__ = ["attention", "attention_maps", "probs", "lens"]

_RUN = typer.Option(..., "--run", help="An eval run directory.")
_HEADS_HELP = "A named set from rank (best3, top1) or L0H3,L11H15."
_CONDITIONS = typer.Option(None, "--conditions", help="Only these conditions, e.g. base,+1.")
_LIMIT = typer.Option(None, "--limit", min=1, help="Only the first N prompts.")
_BUDGET = typer.Option(None, "--max-new-tokens", min=1,
                       help="Reply budget up to the answer (default: the eval run's).")
_FORCE = typer.Option(False, "--force", help="Redo the step with different arguments.")


def _warn(message: str) -> None:
    console.print(f"[yellow]{message}[/yellow]", highlight=False, soft_wrap=True)


@app.command("attention")
def attention(run_dir: Path = _RUN,
              heads: str = typer.Option(..., "--heads", help=_HEADS_HELP),
              intervention: str = typer.Option("zero", "--intervention", help="zero or mean (needs `means`)."),
              conditions: Optional[str] = _CONDITIONS, limit: Optional[int] = _LIMIT,
              max_new_tokens: Optional[int] = _BUDGET, force: bool = _FORCE) -> None:
    """Attention on image, prompt-text, template and reply tokens per layer and head, baseline vs ablated.

    Query rows: the last prompt position and each reply token up to the answer. Writes attention.parquet
    (mean per condition, setting, query, layer, head), attention_samples.parquet (per prompt) and plots.

    Example: halluscope attention --run runs/count --heads best3
    """
    from halluscope.analysis.attention import attention_step

    result = attention_step(run_dir, heads=heads, intervention=intervention, conditions=conditions, limit=limit,
                            max_new_tokens=max_new_tokens, force=force, progress=progress_bar, warn=_warn)
    shares = ", ".join(f"{s} {v:.1%}" for s, v in result["image_share_last_prompt_position"].items())
    console.print(f"wrote {run_dir / 'attention.parquet'} ({result['prompts']} prompts, {len(result['skipped'])} "
                  f"skipped); attention on image tokens from the last prompt position: {shares}")


@app.command("attention-maps")
def attention_maps(run_dir: Path = _RUN,
                   heads: str = typer.Option(..., "--heads", help=_HEADS_HELP),
                   samples: int = typer.Option(20, "--samples", min=1, help="How many prompts to map (the first N)."),
                   conditions: Optional[str] = _CONDITIONS, force: bool = _FORCE) -> None:
    """Full attention rows of the last prompt position for chosen heads, and maps over the image (no ablation).

    Writes attention_maps.parquet (float16 rows; decode with halluscope.analysis.maps.grid_values) and one
    figure per prompt under plots/attention_maps/.

    Example: halluscope attention-maps --run runs/count --heads L0H3,L11H15 --samples 20
    """
    from halluscope.analysis.maps import attention_maps_step

    result = attention_maps_step(run_dir, heads=heads, samples=samples, conditions=conditions, force=force,
                                 progress=progress_bar)
    console.print(f"wrote {run_dir / 'attention_maps.parquet'} and {result['prompts']} figures under "
                  f"{result['figures']}")


@app.command("probs")
def probs(run_dir: Path = _RUN,
          heads: str = typer.Option(..., "--heads", help=_HEADS_HELP),
          alphas: str = typer.Option("0,0.25,0.5,0.75,1", "--alphas",
                                     help="Head strengths: 1 leaves the heads unchanged, 0 knocks them out."),
          intervention: str = typer.Option("scale", "--intervention",
                                           help="scale (toward 0) or mean (toward the head mean; needs `means`)."),
          conditions: Optional[str] = _CONDITIONS, limit: Optional[int] = _LIMIT,
          max_new_tokens: Optional[int] = _BUDGET, force: bool = _FORCE) -> None:
    """Probability of the true and the prompted answer at the answer position as the heads are scaled by alpha.

    Writes probs.parquet (one row per prompt, alpha and answer form) and plots/probs_<form>.png.

    Example: halluscope probs --run runs/count --heads best3 --alphas 0,0.25,0.5,0.75,1
    """
    from halluscope.analysis.probabilities import probs_step

    result = probs_step(run_dir, heads=heads, alphas=alphas, intervention=intervention, conditions=conditions,
                        limit=limit, max_new_tokens=max_new_tokens, force=force, progress=progress_bar, warn=_warn)
    console.print(f"wrote {run_dir / 'probs.parquet'}: {result['rows']} rows ({result['prompts']} prompts, "
                  f"{len(result['skipped'])} skipped)")


@app.command("lens")
def lens(run_dir: Path = _RUN,
         heads: Optional[str] = typer.Option(None, "--heads", help="Also read the lens with these heads ablated: "
                                             + _HEADS_HELP),
         intervention: str = typer.Option("zero", "--intervention", help="zero or mean (needs `means`)."),
         conditions: Optional[str] = _CONDITIONS, limit: Optional[int] = _LIMIT,
         max_new_tokens: Optional[int] = _BUDGET, force: bool = _FORCE) -> None:
    """Logit lens at the answer position: per layer, probability and rank of the true and the prompted answer.

    Writes lens.parquet (one row per prompt, setting, answer form and layer) and plots/lens_<form>.png.

    Example: halluscope lens --run runs/count --heads best3
    """
    from halluscope.analysis.lens import lens_step

    result = lens_step(run_dir, heads=heads, intervention=intervention, conditions=conditions, limit=limit,
                       max_new_tokens=max_new_tokens, force=force, progress=progress_bar, warn=_warn)
    console.print(f"wrote {run_dir / 'lens.parquet'}: {result['rows']} rows ({result['prompts']} prompts, "
                  f"{len(result['skipped'])} skipped)")
