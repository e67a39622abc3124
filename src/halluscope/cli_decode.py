"""The `halluscope decode` command: replies of one model to images and prompts under a mitigation method
(`halluscope.decoding`). It registers on `halluscope.cli.app` when imported (`halluscope.cli` imports it).

    halluscope decode --model organism --method vcd --image dogs.png --prompt "How many dogs are there?"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from halluscope.cli import METHOD_CONFIG, app, console
from halluscope.decoding.registry import available_methods

__all__ = ["decode"]


@app.command("decode")
def decode(model: str = typer.Option(..., "--model", help="Hub id, local checkpoint directory, or 'organism'."),
           method: str = typer.Option("greedy", "--method",
                                      help=f"Mitigation method: {', '.join(available_methods())}."),
           method_config: Optional[str] = METHOD_CONFIG,
           images: List[Path] = typer.Option(..., "--image",
                                             help="Image file; repeat it, or give one for all prompts."),
           prompts: List[str] = typer.Option(..., "--prompt", help="Prompt; repeat it, once per image."),
           max_new_tokens: int = typer.Option(50, "--max-new-tokens", min=1),
           sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
           temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (with --sample)."),
           top_p: float = typer.Option(1.0, "--top-p", help="Nucleus mass (with --sample)."),
           seed: int = typer.Option(0, "--seed", help="Seed of the sampler (with --sample)."),
           num_beams: Optional[int] = typer.Option(
               None, "--num-beams", min=1, help="Beam search with this many beams (OPERA: its own setting, 5 unless "
                                                "given).")) -> None:
    """Decode replies under a mitigation method (greedy unless --sample or --num-beams); prints image, prompt and
    reply per line.

    Example: halluscope decode --model organism --method vcd --method-config '{"alpha": 1.0}' --image dogs.png
    --prompt "How many dogs are there?"

    Example: halluscope decode --model organism --num-beams 5 --image dogs.png --prompt "Describe the image."
    """
    from halluscope.decoding import Sampler, build_method, method_from_options
    from halluscope.decoding import decode as decode_replies
    from halluscope.decoding.api import place_beams
    from halluscope.errors import InputError
    from halluscope.steps import load_model

    if len(images) not in (1, len(prompts)):
        raise InputError(f"got {len(images)} --image and {len(prompts)} --prompt; give one image for all prompts "
                         f"or one image per prompt")
    for image in images:
        if not image.is_file():
            raise InputError(f"--image {str(image)!r} does not exist; pass an image file")
    chosen = method_from_options(method, method_config)  # None: plain greedy
    sampler = Sampler(do_sample=sample, temperature=temperature, top_p=top_p, seed=seed)
    chosen, sampler = place_beams(chosen or build_method("greedy"), sampler, num_beams)
    vlm = load_model(model)
    sources = images * len(prompts) if len(images) == 1 else images
    pairs = [(str(image), prompt) for image, prompt in zip(sources, prompts)]
    replies = decode_replies(vlm, pairs, method=chosen, max_new_tokens=max_new_tokens, sampler=sampler)
    label = "greedy" if chosen.name == "greedy" else f"{chosen.name} {json.dumps(chosen.config.record())}"
    beams = chosen.num_beams or sampler.num_beams
    decoder = "sampling" if sample else f"beam search, {beams} beams" if beams > 1 else "greedy decoding"
    console.print(f"method: {label}; {decoder}", highlight=False, soft_wrap=True)
    for (image, prompt), reply in zip(pairs, replies):
        typer.echo(f"{image}\t{prompt}\t{reply}")
