"""Mitigation-decoding throughput: every method against plain greedy `generate`, in one process.

Builds two ~70M-parameter random checkpoints offline and loads them through `load_vlm`: the Qwen2-VL of
`benchmarks/sweep.py` and a LLaVA of the same size (Llama text model: 8 layers, hidden 512, 8 heads, vocab
32000; CLIP vision 4 x 256). On the same batch of counting prompts (several prompts, `--max-new-tokens` new
tokens each) it times plain greedy `VLM.generate_ids` and `halluscope.decode` under every registered method at
its paper's defaults, and halluscope's loop with no method ("loop": what each method adds to, so the two ratios
separate the method's cost from the loop's). The methods run interleaved within each repetition (in a rotating
order, so a change in the machine's load hits all of them alike); each call runs twice per repetition, once for
the full reply and once for a single token (the prefill and every other per-call cost). Per model it reports,
as medians over repetitions of ratios to greedy's in the same repetition:

- tokens/s of the whole call (all generated positions of all rows; both decoders run every row to the end);
- tokens/s per decoding step: (N - 1) tokens per row over the full call's time minus the one-token call's;
- the one-token call's speed (what the prefill and per-call work cost against greedy's prefill).

Targets: methods with a second branch (VCD, M3ID, ICD, RITUAL, PAI) >= 0.75x for the whole call, since their
branch runs as extra rows of the same forward; methods with no extra forward per token >= 0.9x: DoLa, VAF, heads
and DeCo for the whole call, VHR and VISTA per decoding step (their target is per token: each pays two prefills per
call for its per-prompt scores, which no decoding can hide at short replies). OPERA is a search method, not a
rescoring of greedy decoding (5 beams, a look-ahead forward of every beam's candidates per step, and rows
searched one at a time while it may roll back), so it has no ratio target: its line shows what the search costs.
The last lines give one ratio per method, the lower of the two models' (whole call, or per step for VHR and VISTA):
`decode <method> <ratio>x`. The default reply length, 64 tokens, is a short caption (CHAIR's captions run
longer); the prefill share of a call, and with it every branch method's whole-call ratio, falls as replies grow.

If MitigV (PyPI `mitigv`) is importable, its VCD runs in the same repetitions on the models it supports (LLaVA
here), over the same prompts one call each (its API takes one prompt and returns text only, so its tokens are
counted as the full budget: an upper bound on its speed, exact while no reply ends early).
It is not a dependency: put a `pip install --no-deps mitigv` target on PYTHONPATH to include it.

    python benchmarks/decode.py [--prompts 4] [--max-new-tokens 64] [--repetitions 5] [--threads 2]
                                [--methods vcd,dola,...]   # default: every registered method
    PYTHONPATH=DIR python benchmarks/decode.py     # with MitigV's VCD (pip install --no-deps --target DIR mitigv)
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep import build_checkpoint as build_qwen  # noqa: E402  (the 70M Qwen2-VL of the sweep benchmark)

TARGETS = {"vcd": 0.75, "m3id": 0.75, "icd": 0.75, "ritual": 0.75, "pai": 0.75, "dola": 0.9, "vaf": 0.9,
           "heads": 0.9, "vhr": 0.9, "vista": 0.9, "deco": 0.9}  # none for OPERA, a search method (see above)
PER_STEP = {"vhr", "vista"}  # targets per decoding step: their per-prompt scores cost two prefills per call
SETTINGS = {"heads": {"heads": "L0H1,L1H2"}}  # the others at their defaults


def build_llava(out: Path) -> Path:
    """A ~70M-parameter random LLaVA with the tiny offline tokenizer and a realistic vocabulary size."""
    from halluscope.models.tiny import build_tiny

    tiny = build_tiny("llava", out / "tokenizer-source")
    processor = transformers.LlavaProcessor.from_pretrained(tiny)
    tok = processor.tokenizer
    text = transformers.LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                                    num_hidden_layers=8, intermediate_size=2048, head_dim=64, vocab_size=32000,
                                    max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = transformers.CLIPVisionConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                           intermediate_size=1024, image_size=224, patch_size=32)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=49,
                                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config = transformers.GenerationConfig(eos_token_id=tok.eos_token_id,
                                                            pad_token_id=tok.pad_token_id)
    target = out / "llava_70m"
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def mitigv_vcd(vlm, pairs):
    """MitigV's VCD on the same model and prompts (its API decodes one prompt per call), or None if MitigV is not
    importable; returns a function of the reply length giving the number of tokens generated."""
    try:
        import mitigv
    except ImportError:
        return None
    family = vlm.family.name if vlm.family.name in ("llava", "qwen2_5_vl") else None
    if family is None:
        return None
    vcd = mitigv.load_mitigator("vcd", model=vlm.model, processor=vlm.processor, model_type=family)

    def run(max_new_tokens: int) -> int:
        for image, prompt in pairs:
            vcd(vlm.prepared_image(image), prompt, max_new_tokens=max_new_tokens)
        return len(pairs) * max_new_tokens  # its API returns text only; random weights never end a reply early

    return run


def time_model(vlm, pairs, methods: dict, max_new_tokens: int, repetitions: int) -> dict[str, dict[str, list]]:
    """Per run name, per repetition: the full call's tokens and seconds, and the one-token call's (interleaved)."""
    from halluscope.decoding import decode_ids
    from halluscope.decoding.branches import SourcedBatch

    encoded = vlm.encode(pairs)
    batch = SourcedBatch(encoded.inputs, encoded.image_mask, encoded.image_spans, pairs=pairs)
    runs = {"greedy": lambda k: vlm.generate_ids(batch, max_new_tokens=k).numel(),
            "loop": lambda k: decode_ids(vlm, batch, max_new_tokens=k).numel()}
    runs.update({name: (lambda k, m=m: decode_ids(vlm, batch, m, max_new_tokens=k).numel())
                 for name, m in methods.items()})
    other = mitigv_vcd(vlm, pairs)
    if other is not None:
        runs["mitigv-vcd"] = other
    for run in runs.values():  # warm-up: first calls pay one-off costs
        run(2)
    names = list(runs)
    timings: dict[str, dict[str, list]] = {name: {"full": [], "one": []} for name in names}
    for rep in range(repetitions):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            for kind, k in (("full", max_new_tokens), ("one", 1)):
                start = time.perf_counter()
                tokens = runs[name](k)
                timings[name][kind].append((tokens, time.perf_counter() - start))
        print(f"  repetition {rep + 1}: " + " ".join(
            f"{n}={ratios(timings, n, 'greedy', 'call')[-1]:.2f}/{ratios(timings, n, 'greedy', 'step')[-1]:.2f}"
            for n in names[1:]) + "  (whole call / per step, vs greedy)", flush=True)
    return timings


def ratios(timings: dict[str, dict[str, list]], name: str, reference: str, measure: str) -> list[float]:
    """Per repetition, `name`'s speed over `reference`'s: tokens/s of the whole call ("call"), of the decoding
    steps ("step": the full call less the one-token call) or of the one-token call ("prefill")."""
    def speed(runs: dict[str, list], i: int) -> float:
        (tokens, seconds), (one_tokens, one_seconds) = runs["full"][i], runs["one"][i]
        if measure == "call":
            return tokens / seconds
        if measure == "prefill":
            return one_tokens / one_seconds
        steps = seconds - one_seconds
        return (tokens - one_tokens) / steps if steps > 0 and tokens > one_tokens else math.nan

    a, b = timings[name], timings[reference]
    return [speed(a, i) / speed(b, i) if speed(b, i) > 0 else math.nan for i in range(len(a["full"]))]


def ratio(timings: dict[str, dict[str, list]], name: str, measure: str, reference: str = "greedy") -> float:
    """Median over repetitions of `name`'s speed over `reference`'s (nan if no repetition measured it: every
    reply ended at its first token)."""
    values = [r for r in ratios(timings, name, reference, measure) if not math.isnan(r)]
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts decoded together in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="all",
                        help="comma-separated method names to time (default: every registered method)")
    args = parser.parse_args()
    if args.max_new_tokens < 2:
        parser.error("--max-new-tokens must be >= 2: the per-step ratio is the full call less a one-token call")
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    from halluscope.decoding import available_methods, build_method
    from halluscope.models.load import load_vlm
    from halluscope.tasks.counting import synthetic_counting

    samples = [s for s in synthetic_counting(args.prompts, seed=7, offsets=(3,), size=224, min_count=5)
               if s.kind == "misleading"][:args.prompts]
    pairs = [(s.image, s.prompt) for s in samples]
    names = [n for n in available_methods() if n != "greedy"] if args.methods == "all" else \
        [n.strip() for n in args.methods.split(",") if n.strip() and n.strip() != "greedy"]
    methods = {name: build_method(name, **SETTINGS.get(name, {})) for name in names}
    print(f"{len(pairs)} prompts x {args.max_new_tokens} new tokens, {args.repetitions} repetitions; torch "
          f"{torch.__version__}, transformers {transformers.__version__}; threads {args.threads}; "
          f"{platform.processor() or platform.machine()}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in (("qwen2_vl_70m", build_qwen), ("llava_70m", build_llava)):
            vlm = load_vlm(build(Path(tmp)))
            n_params = sum(p.numel() for p in vlm.model.parameters())
            print(f"{label}: {n_params / 1e6:.1f}M parameters, {vlm.n_layers} layers", flush=True)
            results[label] = time_model(vlm, pairs, methods, args.max_new_tokens, args.repetitions)
    for label, timings in results.items():
        greedy = statistics.median(t / s for t, s in timings["greedy"]["full"])
        print(f"{label}: greedy generate {greedy:.1f} tokens/s (median); speed vs greedy generate (whole call, "
              f"per decoding step, one-token call) and whole call vs halluscope's plain loop:")
        for name in [n for n in timings if n != "greedy"]:
            target = f"   target >= {TARGETS[name]:.2f}x {'per step' if name in PER_STEP else 'whole call'}" \
                if name in TARGETS else ""
            print(f"  {name:>10}  call {ratio(timings, name, 'call'):5.2f}x  step {ratio(timings, name, 'step'):5.2f}x"
                  f"  prefill {ratio(timings, name, 'prefill'):5.2f}x  vs loop "
                  f"{ratio(timings, name, 'call', 'loop'):5.2f}x{target}")
        if "mitigv-vcd" in timings:
            print(f"MitigV's VCD on {label} (one prompt per call, its noised branch a second forward): "
                  f"{ratio(timings, 'mitigv-vcd', 'call'):.2f}x greedy generate, {ratio(timings, 'vcd', 'call'):.2f}x "
                  f"for halluscope's VCD")
    for name in methods:
        measure = "step" if name in PER_STEP else "call"
        print(f"decode {name} {min(ratio(timings, name, measure) for timings in results.values()):.2f}x")


if __name__ == "__main__":
    main()
