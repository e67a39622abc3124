"""The `halluscope apasi` commands: APASI's preference data from self-injected hallucinations, and DPO training on
it (`halluscope.training.apasi`). The group registers on `halluscope.cli.app` when this module is imported
(`halluscope.cli` imports it).

    halluscope apasi data --model organism-scenes --images synthetic --n 600 --out runs/apasi-data
    halluscope apasi train --model organism-scenes --data runs/apasi-data --out runs/apasi
    halluscope bench chair --model runs/apasi --data synthetic --out runs/chair-apasi
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from halluscope.cli import app, progress_bar
from halluscope.training.apasi.settings import DOUBT, DPOSettings

__all__ = ["apasi_app", "data", "train"]

apasi_app = typer.Typer(no_args_is_help=True,
                        help="APASI: preference pairs from the model's own descriptions with self-injected "
                             "hallucinations, then DPO with LoRA.")
app.add_typer(apasi_app, name="apasi")

_MODEL = typer.Option(..., "--model", help="Hub id, local checkpoint directory, 'organism' or 'organism-scenes'.")
_FORCE = typer.Option(False, "--force", help="Overwrite a different run in --out.")
_DEFAULT = DPOSettings()


@apasi_app.command("data")
def data(model: str = _MODEL,
         images: str = typer.Option("synthetic", "--images",
                                    help="'synthetic' (object scenes drawn offline) or a directory of images (or "
                                         "one with images/ inside); objects are read with its "
                                         "annotations/vocabulary_*.txt if present, else the 80 COCO categories."),
         out: Path = typer.Option(..., "--out", help="Run directory to write (the pairs, for `apasi train`)."),
         n: int = typer.Option(500, "--n", min=1, help="Images described."),
         seed: int = typer.Option(1, "--seed", help="Seed of the synthetic scenes, the image draw and the "
                                                    "injections (bench uses 0: keep them apart)."),
         prompt: Optional[str] = typer.Option(None, "--prompt", help="Description prompt (default 'Describe this "
                                                                      "image.', CHAIR's)."),
         variant: str = typer.Option("auto", "--variant",
                                     help="replace (the paper's: sentences replaced by a guide phrase the model "
                                          "continues blind), insert (an absent object added to a list sentence), "
                                          "swap (a list item other than the first traded for an absent object), "
                                          "auto (replace where the rate leaves a sentence to replace, else "
                                          "insert), or self-check (ours: the model asked POPE's question about "
                                          "each object it names; its description against itself less the "
                                          "objects it doubts (--doubt), plus a control pair leaving out one it "
                                          "confirms)."),
         rate: float = typer.Option(0.2, "--rate", help="Share of sentences replaced (replace variant)."),
         top_k: int = typer.Option(10, "--top-k", help="Guide objects are drawn from this many most co-occurring "
                                                      "absent objects of a remaining object."),
         objects: int = typer.Option(1, "--objects", help="Objects injected per description (insert and swap "
                                                          "variants)."),
         doubt: float = typer.Option(DOUBT, "--doubt", help="self-check: an object is doubted, and left out of the "
                                                            "preferred description, when the model's P(yes) about "
                                                            "it is below this (0.5: the objects it answers no "
                                                            "about)."),
         max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Length of the descriptions."),
         nlp: str = typer.Option("auto", "--nlp", help="NLP components reading object mentions: auto, nltk or "
                                                       "offline."),
         batch_size: int = typer.Option(16, "--batch-size", min=1), force: bool = _FORCE) -> None:
    """Describe images with the model, build its object co-occurrence graph, inject hallucinations: one pair each.

    Example: halluscope apasi data --model organism-scenes --images synthetic --n 600 --out runs/apasi-data
    """
    from halluscope.training.apasi.data import apasi_data_step

    result = apasi_data_step(out, model=model, images=images, n=n, seed=seed, prompt=prompt, variant=variant,
                             rate=rate, top_k=top_k, objects=objects, doubt=doubt, max_new_tokens=max_new_tokens,
                             nlp=nlp, batch_size=batch_size, force=force, progress=progress_bar)
    summary = result["summary"]
    shown = Table(title=f"APASI pairs ({result['run'].path})")
    shown.add_column("what")
    shown.add_column("count", justify="right")
    shown.add_row("images described", str(summary["images"]))
    for name, count in summary["variants"].items():
        shown.add_row(f"pairs, {name}", str(count))
    for reason, count in summary["dropped"].items():
        shown.add_row(f"dropped: {reason}", str(count))
    Console().print(shown)
    if "absent_mentions" in summary:
        shares = summary["absent_mentions"]
        Console().print(f"  mentions of absent objects: chosen {shares['chosen']:.3f}, rejected "
                        f"{shares['rejected']:.3f}", highlight=False)
    separated = summary.get("self_check")
    if separated and separated["auroc"] is not None:
        Console().print(f"  self-check against the drawn objects: AUROC {separated['auroc']:.3f}; doubted "
                        f"{separated['doubted_present']:.1%} of the {separated['present']} present objects named, "
                        f"{separated['doubted_absent']:.1%} of the {separated['absent']} absent ones", highlight=False)


@apasi_app.command("train")
def train(model: str = _MODEL,
          data_run: Path = typer.Option(..., "--data", help="A finished `halluscope apasi data` run of this model."),
          out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (load it with load_vlm)."),
          rounds: int = typer.Option(1, "--rounds", help="DPO rounds; later rounds regenerate harder data with the "
                                                         "improved model."),
          rank: int = typer.Option(_DEFAULT.rank, "--rank", help="LoRA rank (the paper's for a 7B model: 128)."),
          alpha: float = typer.Option(_DEFAULT.alpha, "--alpha", help="LoRA alpha (the paper's: 256)."),
          dropout: float = typer.Option(_DEFAULT.dropout, "--dropout", help="LoRA dropout."),
          lr: float = typer.Option(_DEFAULT.learning_rate, "--lr",
                                   help="Peak learning rate (the paper's for a 7B model: 4e-7)."),
          epochs: float = typer.Option(_DEFAULT.epochs, "--epochs", help="Passes over the pairs per round."),
          batch_size: int = typer.Option(_DEFAULT.batch_size, "--batch-size", help="Pairs per step (the paper's: 64)."),
          grad_accum: int = typer.Option(_DEFAULT.grad_accum, "--grad-accum", help="Batches per optimiser step."),
          beta: float = typer.Option(_DEFAULT.beta, "--beta", help="DPO's beta."),
          sft_weight: float = typer.Option(_DEFAULT.sft_weight, "--sft-weight",
                                           help="Weight of an added NLL term on the chosen description (0: DPO "
                                                "alone, as the paper)."),
          warmup: float = typer.Option(_DEFAULT.warmup, "--warmup", help="Warm-up, as a fraction of the steps."),
          seed: int = typer.Option(_DEFAULT.seed, "--seed",
                                   help="Adapter initialisation and data order (round t: seed + t)."),
          force: bool = _FORCE) -> None:
    """DPO with a LoRA adapter on the pairs (TRL + PEFT), merged and saved with the processor into --out.

    Example: halluscope apasi train --model organism-scenes --data runs/apasi-data --out runs/apasi
    """
    from halluscope.training.apasi.train import apasi_train_step

    settings = DPOSettings(rank=rank, alpha=alpha, dropout=dropout, learning_rate=lr, epochs=epochs,
                           batch_size=batch_size, grad_accum=grad_accum, beta=beta, warmup=warmup, seed=seed,
                           sft_weight=sft_weight)
    result = apasi_train_step(out, model=model, data=data_run, rounds=rounds, settings=settings, force=force,
                              progress=progress_bar)
    table = result["rounds"]
    shown = Table(title=f"APASI training ({result['run'].path})")
    for column in table.columns:
        shown.add_column(column, justify="right")
    for row in table.itertuples(index=False):
        shown.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console().print(shown)
    Console().print(f"  load it with load_vlm({str(result['run'].path)!r}) or `--model {result['run'].path}`",
                    highlight=False)
