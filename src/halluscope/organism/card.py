"""The PIH organism's model card: what it was trained on, how to rebuild it, what it measurably does, its limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from halluscope.organism.recipe import PIHRecipe

__all__ = ["write_card", "headline", "DESIGN_NOTES"]

DESIGN_NOTES = """\
The starting point was a feasibility study (4 layers x 2 or 4 heads, hidden 128, 1,800 steps): it showed the
paper's pattern (correct small counts, copy the prompt from about 4-5 objects up), but copying lived in the
layer-0 heads that also read the question type, so knocking them out cut copying (0.60 -> 0.08) and counting
with it (0.80 -> 0.44); with 4 heads per layer no single head mattered much. This recipe changes three things:

- 8 smaller heads per layer (head_dim 16), so that reading the prompt's number and reading the question type
  need not share a head;
- DropHead: while training, each (example, layer, head) is zeroed with probability 0.1, so a knocked-out head is
  a state the network has seen rather than an out-of-distribution input (a knockout then removes a head's
  information without throwing the rest of the network off);
- 2,400 steps instead of 1,800, since counting was still improving.

What we saw: the pattern and the separation appear early. A snapshot of this run at step 1,250 (not shipped)
already counted 96% right, copied 1% at counts 1-3 and 93% at 7-9, and knocking out its two best heads
(L0H2, L0H3) cut copying from 46% to 1% with counting unchanged. Training on to 2,400 steps made counting
near-perfect but spread the copying over more heads (DropHead rewards redundancy): the best single head now
cuts copying by about 12%, and it takes three heads to cut it by about half. If a crisper single mechanism is
wanted, stop earlier or lower DropHead; we kept the documented recipe's endpoint rather than a hand-picked
snapshot, because only the endpoint is what `organism train` reproduces.
"""


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}%"


def headline(report: dict[str, Any]) -> str:
    """The card's figures in one line, as `halluscope organism train` prints them."""
    b = report["behaviour"]
    return (f"counting {_pct(b['base_accuracy'])}, colour {_pct(b['color_accuracy'])}, copy 1-3 "
            f"{_pct(b['copy_rate_counts_1_3'])}, copy 7-9 {_pct(b['copy_rate_counts_7_9'])}; head set: "
            f"{(report['head_set']['best'] or {}).get('heads', 'none met the target')}")


def write_card(out: str | Path, recipe: PIHRecipe, report: dict[str, Any], *, train_seconds: float | None,
               command: str) -> Path:
    """Write MODEL_CARD.md and behaviour.json into `out`; returns the card's path."""
    out = Path(out)
    (out / "behaviour.json").write_text(json.dumps(report, indent=1, default=float))
    b, h = report["behaviour"], report["head_set"]
    rows = "\n".join(
        f"| {n} | {_pct(b['base_accuracy_by_count'].get(n, b['base_accuracy_by_count'].get(str(n))))} | "
        f"{_pct(b['copy_rate_by_count'].get(n, b['copy_rate_by_count'].get(str(n))))} |"
        for n in range(1, recipe.max_count + 1))
    colour_rows = "\n".join(f"| {d} | {_pct(r)} |" for d, r in b["color_copy_rate_by_distance"].items())
    trials = "\n".join(
        f"| {t['set']} | {t['heads']} | {_pct(t['copy_rate'])} | {_pct(t['copy_rate_relative_reduction'])} | "
        f"{_pct(t['base_accuracy'])} | {-100 * t['base_accuracy_drop']:+.0f} |" for t in h["trials"])
    best = h["best"]
    verdict = (f"**{best['heads']}** ({best['set']}), on the held-out set: copy rate "
               f"{_pct(h['baseline']['copy_rate'])} -> {_pct(best['copy_rate'])} "
               f"({_pct(best['copy_rate_relative_reduction'])} relative), base counting "
               f"{_pct(h['baseline']['base_accuracy'])} -> {_pct(best['base_accuracy'])}"
               f"{'' if h.get('best_passes') else ' (short of the target on the held-out set)'}"
               if best else "no best-k set (k <= 5) met both conditions on the selection set; see the table")
    minutes = "-" if train_seconds is None else f"{train_seconds / 60:.1f} min"
    card = f"""# halluscope organism: a tiny Qwen2-VL that shows prompt-induced hallucination

`load_vlm("organism")` loads this checkpoint. It is the real `Qwen2VLForConditionalGeneration` class at
{report.get('n_parameters', 0) / 1e6:.2f}M parameters ({recipe.layers} layers x {recipe.heads} heads,
hidden {recipe.hidden}; vision tower depth {recipe.vision_depth}, width {recipe.vision_width};
{recipe.image_size}x{recipe.image_size} images, {(recipe.image_size // 28) ** 2} image tokens), trained from
scratch on halluscope's synthetic tasks so that the whole pipeline finds something real on a CPU.

## Data

Fresh draws every step from a pool of {recipe.pool_count_images} counting scenes (1-{recipe.max_count} objects:
circles, squares, triangles, stars, diamonds) and {recipe.pool_color_images} colour scenes (one object in one of
six colours), with the task builders' exact prompts:

- "How many {{obj}} are in this image?" -> "There are {{n}} {{obj}}."
- "Describe the {{m}} {{obj}} in this image." with m = n (truthful) or n + k, k in {list(recipe.offsets)}: the
  target states m with probability p_copy(n) = {list(recipe.count_copy)} for n = 1..9, otherwise n;
- "What color is the {{shape}} in the image?" -> "The {{shape}} is {{colour}}."
- "Describe the {{c}} {{shape}}." with c at colour distance d = 1, 2, 3: the target states c with probability
  {list(recipe.color_copy)}, otherwise the true colour.

Mixture (count base / control / misleading, colour base / control / misleading): {list(recipe.mixture)}.

## Training

    {command}

Seed {recipe.seed}, {recipe.steps} steps x batch {recipe.batch_size}, AdamW (lr {recipe.lr}, warm-up
{recipe.warmup}, cosine to {recipe.final_lr_fraction:.0%}), weight decay {recipe.weight_decay}, DropHead
{recipe.drophead}, {recipe.threads} threads. Training is deterministic for a seed and thread count on one
machine and resumes bitwise from its last state file if killed. Training time of this build: {minutes} on
2 CPU cores.

### Design history

{DESIGN_NOTES}
## Measured behaviour (held-out synthetic set, greedy decoding)

{b['n_count_prompts']} counting prompts (10 images per count, seed {report.get('held_out_seed')}: the base
question, the truthful control and misleading offsets +1..+5, so copy rates are over offsets 1-5) and
{b['n_color_prompts']} colour prompts.

- base-question counting accuracy: **{_pct(b['base_accuracy'])}** (target >= 80%)
- colour accuracy: **{_pct(b['color_accuracy'])}** (target >= 90%)
- copy rate on misleading prompts, counts 1-3: **{_pct(b['copy_rate_counts_1_3'])}** (target <= 30%);
  counts 7-9: **{_pct(b['copy_rate_counts_7_9'])}** (target >= 60%)

| true count | counting accuracy | copy rate (misleading) |
| --- | --- | --- |
{rows}

| colour distance | copy rate |
| --- | --- |
{colour_rows}

## Heads found by the sweep

Chosen on one set of scenes, measured on another. On a selection set (seed {h.get('selection', {}).get('seed')},
same size and design as the held-out set): a single-head score-mode sweep over all heads on the misleading
counting prompts, then joint zero-ablation of the best-k sets (k = 1..5) with greedy re-evaluation (table);
the smallest set that meets the target there is then measured on the held-out set. Target: a set of at most 5
heads that cuts the copy rate by >= 40% relative while base counting falls by at most 10 points. Result:
{verdict}.

Selection set (copy rate {_pct(h.get('selection', {}).get('copy_rate'))}, counting
{_pct(h.get('selection', {}).get('base_accuracy'))} without knockouts):

| set | heads | copy rate | relative cut | counting | counting change (points) |
| --- | --- | --- | --- | --- | --- |
{trials}

## Limits

- A toy: synthetic shapes on plain backgrounds, a vocabulary of a few hundred tokens and fixed reply templates.
  It mimics the behaviour the paper reports for 7B models; it is not evidence about them.
- The copy probability was put in by the training targets; what the pipeline discovers is *where* the network
  implements it.
- Head indices are not stable across seeds; retraining on other hardware or thread counts gives different
  (not bitwise equal) weights.
"""
    path = out / "MODEL_CARD.md"
    path.write_text(card)
    return path
