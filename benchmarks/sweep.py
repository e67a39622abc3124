"""Knockout-sweep throughput: the reference study's loop against halluscope's engine, in one process.

Builds a ~70M-parameter Qwen2-VL-architecture checkpoint offline (8 layers, hidden 512, 8 heads, vocab 32000,
vision 4 x 256), saves it and loads it back through `load_vlm`. Then, on the same misleading counting prompts
and the full layer x head grid, it times

- the baseline evaluation (`halluscope.evaluate`, batched greedy replies): the input of both sweeps, as in the
  reference study, whose sweep compares each knockout's reply with the eval's baseline reply;
- the reference loop: per head, a freshly registered o_proj hook and one full 50-token greedy `generate` at
  batch 1 (the vision tower re-run every time), the answer parsed from the reply;
- the engine in score mode (answer-position logits, prefix reuse, batched heads) and generate mode
  (verification against the baseline reply, batched cached decoding of diverging rows, early stop);

- attribution patching (`atp`: every head estimated from one forward and one batched backward per prompt;
  `atp-star`: with GradDrop's dropped-layer backward passes), alone and with the exact score-mode verification of
  atp-star's top 10 heads per prompt (both from the baseline reply, every head of every prompt);

checks that generate mode gives the reference loop's outcomes exactly (and reports score-mode agreement), and
prints heads per second for each and the median over prompts of its speed-up against the reference loop (the
methods run interleaved, prompt by prompt), ending with `speedup score=<x>x generate=<y>x atp-star=<z>x`. Lines
before it give the ratios with the baseline evaluation charged to the engine alone, and atp-star's with its
verification included. The machine's load average is printed before and after (the machine may be shared).

    python benchmarks/sweep.py [--prompts 2] [--threads 2] [--model 70m|organism]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers


def build_checkpoint(out: Path) -> Path:
    """A ~70M-parameter random Qwen2-VL with the tiny offline tokenizer and a realistic vocabulary size."""
    from halluscope.models.families import get_family
    from halluscope.models.processors import processor_class
    from halluscope.models.tiny import QWEN_TEMPLATE, build_tiny

    tiny = build_tiny("qwen2_vl", out / "tokenizer-source")  # tokenizer and processor settings
    processor = processor_class(get_family("qwen2_vl")).from_pretrained(tiny)
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    text = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=8,
                intermediate_size=2048, head_dim=64, vocab_size=32000, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=4, embed_dim=256, num_heads=4, hidden_size=512, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = transformers.GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
    target = out / "qwen2_vl_70m"
    model.save_pretrained(target)
    processor.chat_template = QWEN_TEMPLATE
    processor.save_pretrained(target)
    return target


def reference_loop(vlm, item, grid, max_new_tokens: int) -> list[str]:
    """One hook registration and one full-length batch-1 generate per head, as the reference study did."""
    from halluscope.interventions.heads import HeadIntervention, intervene

    outcomes = []
    batch = vlm.encode([(item.image, item.prompt)])  # built once per prompt; the vision tower re-runs per generate
    for head in grid:
        with intervene(vlm, HeadIntervention({head})):
            reply = vlm.generate(batch, max_new_tokens=max_new_tokens)[0]
        outcomes.append(item.classify(reply)[1])
    return outcomes


def _load() -> str:
    """The machine's load averages over 1, 5 and 15 minutes: on a shared machine the ratios move with them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2, help="misleading counting prompts to sweep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64, help="knockouts per forward in the engine")
    parser.add_argument("--model", default="70m", help="'70m' (the random 70M checkpoint, built here) or any "
                        "load_vlm name, e.g. 'organism' (trained: its replies state the answer early)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    from halluscope.evaluation import evaluate
    from halluscope.models.load import load_vlm
    from halluscope.sweep.attribution import attribution_scores
    from halluscope.sweep.engine import generate_prompt, prepare_score, score_prompt
    from halluscope.sweep.runner import sweep_items
    from halluscope.tasks.counting import synthetic_counting

    if args.model == "70m":
        with tempfile.TemporaryDirectory() as tmp:
            vlm = load_vlm(build_checkpoint(Path(tmp)))
        size = 224
    else:
        vlm, size = load_vlm(args.model), 112
    n_params = sum(p.numel() for p in vlm.model.parameters())
    samples = [s for s in synthetic_counting(args.prompts, seed=7, offsets=(3,), size=size, min_count=5)
               if s.kind == "misleading"]
    grid = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    print(f"model: {n_params / 1e6:.1f}M parameters, {vlm.n_layers} layers x {vlm.n_heads} heads; "
          f"{len(samples)} prompts x {len(grid)} heads; torch threads {args.threads}; {platform.processor() or platform.machine()}")
    print(f"load average (1, 5, 15 min) before: {_load()}")
    start = time.perf_counter()
    baseline = evaluate(vlm, samples, max_new_tokens=args.max_new_tokens)
    baseline_time = time.perf_counter() - start
    items = sweep_items(baseline, {s.id: s.image for s in samples})
    print(f" baseline: {baseline_time:8.2f} s  (evaluation of the prompts; input of both sweeps)")

    def atp_star(item, verify: int = 0):
        setup = prepare_score(vlm, item, max_new_tokens=args.max_new_tokens)
        estimates, _ = attribution_scores(vlm, setup, estimator="atp-star")
        effect = sum(estimates.values()) / len(estimates)
        if not verify:
            return effect
        top = sorted(grid, key=lambda lh: -float(effect[lh]))[:verify]
        return score_prompt(vlm, setup, sorted(top), batch_size=args.batch_size)

    methods = {
        "reference": lambda it: reference_loop(vlm, it, grid, args.max_new_tokens),
        "score": lambda it: [r["outcome"] for r in score_prompt(
            vlm, prepare_score(vlm, it, max_new_tokens=args.max_new_tokens), grid, batch_size=args.batch_size)],
        "generate": lambda it: [r["outcome"] for r in generate_prompt(
            vlm, it, grid, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)],
        "atp": lambda it: attribution_scores(vlm, prepare_score(vlm, it, max_new_tokens=args.max_new_tokens),
                                             estimator="atp"),
        "atp-star": atp_star,
        "atp-star+verify10": lambda it: atp_star(it, verify=10),
    }
    # interleaved: every method runs on a prompt before the next prompt (in a rotating order), so a change in
    # the machine's load hits all of them alike; ratios are per prompt, reported as medians
    timings = {name: [] for name in methods}
    results = {name: [] for name in methods}
    names = list(methods)
    for index, item in enumerate(items):
        for name in names[index % len(names):] + names[:index % len(names)]:
            start = time.perf_counter()
            results[name].append(methods[name](item))
            timings[name].append(time.perf_counter() - start)
    for name in names:
        rate = len(items) * len(grid) / sum(timings[name])
        print(f"{name:>17}: {sum(timings[name]):8.2f} s  {rate:8.1f} heads/s")

    if results["generate"] != results["reference"]:
        raise SystemExit("generate mode disagrees with the reference loop: the engine is not exact")
    flat = lambda rs: [o for r in rs for o in r]  # noqa: E731
    agree = sum(a == b for a, b in zip(flat(results["score"]), flat(results["reference"]))) / len(flat(results["reference"]))
    print(f"generate-mode outcomes equal the reference loop's; score-mode outcomes agree on {agree:.0%} "
          f"(score mode reads the answer after the clean reply's words, so it can differ where a knockout "
          f"changes those words)")

    def speedup(name: str, charge: float = 0.0) -> float:
        """Median over prompts of reference time / method time (plus `charge` per prompt)."""
        return statistics.median(r / (t + charge) for r, t in zip(timings["reference"], timings[name]))

    share = baseline_time / len(items)
    print(f"with the baseline evaluation charged to the engine alone: score={speedup('score', share):.1f}x "
          f"generate={speedup('generate', share):.1f}x atp-star={speedup('atp-star', share):.1f}x")
    print(f"atp-star with the exact verification of its top 10 heads per prompt: "
          f"{speedup('atp-star+verify10'):.1f}x")
    print(f"plain atp (no GradDrop): {speedup('atp'):.1f}x")
    print(f"load average (1, 5, 15 min) after: {_load()}")
    print(f"speedup score={speedup('score'):.1f}x generate={speedup('generate'):.1f}x "
          f"atp-star={speedup('atp-star'):.1f}x")


if __name__ == "__main__":
    main()
