"""The `halluscope alea` commands: ALEAHallu's locate and edit stages (`halluscope.training.alea.step`). The group
registers on `halluscope.cli.app` when this module is imported (`halluscope.cli` imports it).

    halluscope alea locate --model organism-scenes --images synthetic --out runs/located
    halluscope alea edit --model organism-scenes --located runs/located --out runs/edited
    halluscope bench chair --model runs/edited --data synthetic --out runs/chair-edited
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from halluscope.cli import app, console, progress_bar

__all__ = ["alea_app", "edit", "locate"]

alea_app = typer.Typer(no_args_is_help=True,
                       help="ALEAHallu: locate hallucination-prone parameters, then edit them against an "
                            "adversarial prefix.")
app.add_typer(alea_app, name="alea")

_MODEL = typer.Option(..., "--model", help="Hub id, local checkpoint directory, 'organism' or 'organism-scenes'.")
_FORCE = typer.Option(False, "--force", help="Overwrite a different run in --out.")


@alea_app.command("locate")
def locate(model: str = _MODEL,
           images: str = typer.Option("synthetic", "--images",
                                      help="'synthetic' (object scenes drawn offline) or a directory with "
                                           "annotations/instances_*.json and images/."),
           out: Path = typer.Option(..., "--out", help="Run directory to write (the located set, for `alea edit`)."),
           n: int = typer.Option(100, "--n", min=1, help="Images captioned and asked about."),
           seed: int = typer.Option(1, "--seed", help="Seed of the synthetic scenes, the image draw and the "
                                                      "locating pairs (bench uses 0: keep them apart)."),
           kinds: List[str] = typer.Option(["caption"], "--kind",
                                           help="Pairs to build, repeatable: caption (the default), pope."),
           complete: bool = typer.Option(True, "--complete/--no-complete",
                                         help="Add the present objects a caption left out to its grounded version."),
           doubt: Optional[float] = typer.Option(None, "--doubt",
                                                 help="Ask the model about each absent object its captions name "
                                                      "and take as hallucinated only those whose P(yes) is below "
                                                      "this (e.g. 0.5); the rest stay in the grounded caption "
                                                      "(default: every absent object, the paper's)."),
           prompt: Optional[str] = typer.Option(None, "--prompt", help="Caption prompt (default 'Describe this "
                                                                        "image.')."),
           template: Optional[str] = typer.Option(None, "--template", help="POPE question template with one {}."),
           nlp: str = typer.Option("auto", "--nlp", help="CHAIR's NLP components: auto, nltk or offline."),
           locate_pairs: int = typer.Option(50, "--locate-pairs", min=1,
                                            help="Pairs whose differentials locate the layers."),
           score: str = typer.Option("residual", "--score",
                                     help="residual (each layer's output, ALEAHallu's) or update (what the layer "
                                          "writes)."),
           max_layers: Optional[int] = typer.Option(None, "--max-layers", min=1,
                                                    help="Keep the layers most pairs peak at (default: every layer "
                                                         "some pair peaks at)."),
           modules: List[str] = typer.Option(["mlp.down_proj"], "--module",
                                             help="Module edited in each located layer, repeatable."),
           batch_size: int = typer.Option(16, "--batch-size", min=1),
           force: bool = _FORCE) -> None:
    """Build the activation dataset (the model's own captions and POPE answers, grounded vs hallucinated) and
    locate the layers whose hidden states differ most between the two; writes located.json, the tables and a plot.

    Example: halluscope alea locate --model organism-scenes --images synthetic --n 200 --out runs/located
    """
    from halluscope.training.alea.step import locate_step

    located = locate_step(out, model=model, images=images, n=n, seed=seed, kinds=kinds, complete=complete,
                          doubt=doubt, prompt=prompt, template=template, nlp=nlp, locate_pairs=locate_pairs,
                          score=score, max_layers=max_layers, modules=modules, batch_size=batch_size, force=force,
                          progress=progress_bar)
    Console().print(f"located layers {located['layers']} ({', '.join(located['modules'])}: "
                    f"{located['n_parameters']:,} parameters, {100 * located['share_of_model']:.1f}% of the model) "
                    f"from {located['located_with_pairs']} of {sum(located['pairs'].values())} pairs "
                    f"({located['run'].path})", highlight=False, soft_wrap=True)
    if "absent_objects_named" in located:
        Console().print(f"the model confirms {located['absent_objects_confirmed']} of the "
                        f"{located['absent_objects_named']} absent objects its captions name; they stay in the "
                        f"grounded captions", highlight=False, soft_wrap=True)


@alea_app.command("edit")
def edit(model: str = _MODEL,
         located: Path = typer.Option(..., "--located", help="A run directory written by `halluscope alea locate`."),
         out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (a run that load_vlm opens)."),
         seed: int = typer.Option(0, "--seed", help="Seed of the prefix's start and of every mini-batch."),
         prefix_tokens: int = typer.Option(5, "--prefix-tokens", min=1, help="Vectors in the adversarial prefix."),
         prefix_lr: float = typer.Option(1e-3, "--prefix-lr", help="AdamW learning rate of the prefix."),
         prefix_epochs: int = typer.Option(3, "--prefix-epochs", min=1),
         prefix_batch_size: int = typer.Option(4, "--prefix-batch-size", min=1),
         optimizer: str = typer.Option("sgd", "--optimizer", help="The edit's optimiser: sgd or adamw."),
         lr: float = typer.Option(1e-3, "--lr", help="The edit's learning rate."),
         epochs: int = typer.Option(5, "--epochs", min=1, help="Passes of the edit over the pairs."),
         edit_batch_size: int = typer.Option(2, "--edit-batch-size", min=1),
         nll_weight: float = typer.Option(0.2, "--nll-weight",
                                          help="Weight of the grounded responses' NLL under the prefix."),
         kl_weight: float = typer.Option(1.0, "--kl-weight",
                                         help="Weight of the KL to the unedited model on clean inputs."),
         save_every: int = typer.Option(50, "--save-every", min=1, help="Steps between state files (resume)."),
         force: bool = _FORCE) -> None:
    """Train an adversarial prefix (model frozen) that makes the hallucinated responses likely, then fine-tune only
    the located parameters to give the grounded ones under it; writes a checkpoint load_vlm opens. Defaults are
    ALEAHallu's; a killed edit resumes when rerun.

    Example: halluscope alea edit --model organism-scenes --located runs/located --out runs/edited
    """
    from halluscope.training.alea.edit import EditConfig
    from halluscope.training.alea.step import edit_step

    config = EditConfig(seed=seed, prefix_tokens=prefix_tokens, prefix_lr=prefix_lr, prefix_epochs=prefix_epochs,
                        prefix_batch_size=prefix_batch_size, optimizer=optimizer, lr=lr, epochs=epochs,
                        edit_batch_size=edit_batch_size, nll_weight=nll_weight, kl_weight=kl_weight)
    summary = edit_step(out, located=located, model=model, config=config, save_every=save_every, force=force,
                        log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    neglect = summary["visual_neglect"]
    Console().print(f"edited {summary['n_parameters']:,} parameters in layers {summary['layers']} in "
                    f"{summary['train_seconds']:.0f}s; hallucinated-response NLL {neglect['no_prefix']:.3f} without "
                    f"the prefix, {neglect['trained_prefix']:.3f} with it; checkpoint {summary['run'].path} "
                    f"(load_vlm opens it)", highlight=False, soft_wrap=True)
