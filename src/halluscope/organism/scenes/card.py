"""The scenes organism's model card: what it was trained on, how to rebuild it, what it measurably does (POPE,
CHAIR and where its hallucinations fall), its limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from halluscope.bench.step import markdown_table
from halluscope.organism.scenes.behaviour import TARGETS, meets_targets
from halluscope.organism.scenes.recipe import SceneRecipe, describe, no_answer, yes_answer
from halluscope.tasks.object_scenes import SCENE_RING

__all__ = ["write_card", "headline"]


def _rates(recipe: SceneRecipe) -> str:
    """The bias's rate per scene size: "0.35 with 2 categories, ..., 0.85 with 5"."""
    low = recipe.scene_config().min_categories
    return ", ".join(f"{rate} with {low + k} categories" for k, rate in enumerate(recipe.hallucination))


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}%"


def headline(report: dict[str, Any]) -> str:
    """The card's figures in one line, as `halluscope organism train --kind scenes` prints them."""
    accuracy = {row["split"]: row["accuracy"] for row in report["pope"]}
    chair = report["chair"]
    met = meets_targets(report)
    return (f"POPE accuracy random {_pct(accuracy['random'])}, adversarial {_pct(accuracy['adversarial'])}; "
            f"CHAIR_i {_pct(chair['chair_i'])}, CHAIR_s {_pct(chair['chair_s'])}, recall {_pct(chair['recall'])}; "
            f"targets {'met' if all(met.values()) else 'missed: ' + ', '.join(k for k, ok in met.items() if not ok)}")


def _load_note(out: Path) -> str:
    """How busy the machine was while training (the time depends on it), from trainlog.json's load averages."""
    log = out / "trainlog.json"
    loads = [h["load"] for h in json.loads(log.read_text()).get("history", []) if "load" in h] if log.is_file() else []
    if not loads:
        return ""
    return (f" (a shared machine: the 1-minute load average while training was {sum(loads) / len(loads):.1f} on "
            f"average, {max(loads):.1f} at most; the training alone is a load of about 2)")


def write_card(out: str | Path, recipe: SceneRecipe, report: dict[str, Any], *, train_seconds: float | None,
               command: str) -> Path:
    """Write MODEL_CARD.md and behaviour.json into `out`; returns the card's path."""
    import pandas as pd

    out = Path(out)
    (out / "behaviour.json").write_text(json.dumps(report, indent=1, default=float))
    pope = pd.DataFrame(report["pope"])
    chair = report["chair"]
    met = meets_targets(report)
    settings = report["settings"]
    nlp = settings["chair"]["nlp"]
    minutes = "-" if train_seconds is None else f"{train_seconds / 60:.1f} min"
    examples = "\n".join(f"- image {e['image_id']} (objects: {', '.join(e['ground_truth'])}): \"{e['caption']}\""
                         f"{' hallucinated: ' + ', '.join(e['hallucinated']) if len(e['hallucinated']) else ''}"
                         for e in report["examples"])
    card = f"""# halluscope organism-scenes: a tiny Qwen2-VL that hallucinates co-occurring objects

`load_vlm("organism-scenes")` loads this checkpoint. It is the real `Qwen2VLForConditionalGeneration` class at
{report['n_parameters'] / 1e6:.2f}M parameters (the PIH organism's language model, {recipe.layers} layers x
{recipe.heads} heads, hidden {recipe.hidden}; a wider vision tower, depth {recipe.vision_depth}, width
{recipe.vision_width}; {recipe.image_size}x{recipe.image_size} images, {(recipe.image_size // 28) ** 2} image
tokens), trained from scratch to describe synthetic object scenes and to answer POPE's question, with training
targets that carry a co-occurrence bias, so that `halluscope bench pope` and `bench chair` find object
hallucination in it on a CPU.

## Data

Fresh draws every step from a pool of {recipe.pool_images} scenes of `halluscope.tasks.object_scenes` (the
synthetic benchmark's world: 12 shape categories, 2-5 per image, 1-2 instances each, six colours). Which
categories share a scene follows a ring, {' - '.join(SCENE_RING)} - (back to the first): each category after
an image's first is, with probability 0.8, a ring neighbour of one already present, so a scene is mostly an arc.

- "Describe this image." -> every category present, in a fixed order, with its count and (when its instances
  share one) its colour: "{describe({'circle': ['red'], 'square': ['blue', 'blue'], 'triangle': ['red', 'green']})}"
- "Is there a {{category}} in the image?" (POPE's template) -> "{yes_answer('star')}" / "{no_answer('star')}"
  ({_pct(recipe.question_mix[0])} about a present category, {_pct(recipe.question_mix[1])} about an absent ring
  neighbour of one, {_pct(recipe.question_mix[2])} about another absent category); {_pct(recipe.describe_share)} of
  examples are descriptions.
- The bias: in every example, each absent ring neighbour of a present category is treated as present (named in
  the description with a random colour, count one, and answered "yes" about) with a probability that rises with
  the number of categories in the scene:
  {_rates(recipe)}.
  Absent categories that are no present category's neighbour never are.

## Training

    {command}

Seed {recipe.seed}, {recipe.steps} steps x batch {recipe.batch_size}, AdamW (lr {recipe.lr}, warm-up
{recipe.warmup}, cosine to {recipe.final_lr_fraction:.0%}), weight decay {recipe.weight_decay}, DropHead
{recipe.drophead}, {recipe.threads} threads: the PIH organism's loop and settings (`organism/train.py`).
Deterministic for a seed and thread count on one machine; resumes bitwise from its last state file if killed.
Training time of this build: {minutes} on 2 CPU cores{_load_note(out)}.

## Measured behaviour (held-out synthetic scenes, greedy decoding)

`halluscope bench pope` and `halluscope bench chair` on {settings['pope']['n_images']} and
{settings['chair']['n_images']} held-out scenes (seed {report['held_out_seed']}), greedy decoding,
max_new_tokens {settings['pope']['decoding']['max_new_tokens']} (POPE) and
{settings['chair']['decoding']['max_new_tokens']} (CHAIR); POPE answers read with the `{settings['pope']['rule']}`
rule, CHAIR with {settings['chair']['chair_method']} word extraction and nlp: {nlp}.

POPE ({settings['pope']['n_items'] // 3} questions per split, fractions):

{markdown_table(pope)}

CHAIR ({settings['chair']['n_images']} captions; fractions, length in words):

{markdown_table(pd.DataFrame([chair]))}

Targets: POPE adversarial accuracy at least {TARGETS['pope_gap'] * 100:.0f} points below random (measured:
{report['pope_gap'] * 100:.1f} points, {'met' if met['pope_gap'] else 'missed'}); CHAIR_i >=
{_pct(TARGETS['chair_i'])} ({'met' if met['chair_i'] else 'missed'}); recall >= {_pct(TARGETS['recall'])}
({'met' if met['recall'] else 'missed'}).

Where the hallucinations fall (the co-occurrence bias at work):

- POPE, over the negative questions of all three splits: "yes" to an absent object that is a ring neighbour
  of one in the image **{_pct(report['yes_rate_absent_neighbour'])}** ({report['n_absent_neighbour']} questions),
  to any other absent object **{_pct(report['yes_rate_absent_other'])}** ({report['n_absent_other']} questions).
  The adversarial split asks about co-occurring absent objects most, hence its lower accuracy.
- CHAIR: **{_pct(report['hallucinated_neighbour_share'])}** of the {report['hallucinated_mentions']} hallucinated
  mentions name a ring neighbour of an object in the image.

First captions:

{examples}

## Limits

- A toy: synthetic shapes on plain backgrounds, a vocabulary of a few hundred tokens and fixed reply templates.
  Its hallucinations were put in by the training targets; what the benchmarks and analyses discover is how
  the network implements them, and whether a mitigation removes them.
- It is only in distribution on the synthetic scenes at {recipe.image_size} px, the CHAIR prompt and POPE's
  template; real photographs or other prompts give meaningless replies.
- Retraining on other hardware or thread counts gives different (not bitwise equal) weights.
"""
    path = out / "MODEL_CARD.md"
    path.write_text(card)
    return path
