"""Self-check scoring: `training.checks.yes_probabilities` (each image and question prefilled once, both answer
wordings continued from its cache) against the two-row scoring it replaced (each wording teacher-forced in a
whole forward of image, question and answer), in one process.

On the ~70M-parameter Qwen2-VL of `benchmarks/sweep.py` and LLaVA of `benchmarks/decode.py`, both built offline,
it scores POPE's question about `--questions` (image, object) pairs of the synthetic object scenes with the
wordings "Yes, there is a {}." and "No, there is no {}.". The two scorers run interleaved within each repetition
(in alternating order, so a change in the machine's load hits both alike). Per model it prints the median over
repetitions of the two-row time over the shared-prefill time, and the largest difference in P(yes) between them
(the same numbers up to float rounding). Target: >= 1.5x, since the prompt (image tokens included) is most of
every row and now runs once instead of twice.

    python benchmarks/checks.py [--questions 32] [--batch-size 16] [--repetitions 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import build_llava  # noqa: E402  (the 70M LLaVA of the decoding benchmark)
from sweep import build_checkpoint as build_qwen  # noqa: E402  (the 70M Qwen2-VL of the sweep benchmark)

TARGET = 1.5
WORDINGS = {"yes": "Yes, there is a {}.", "no": "No, there is no {}."}


def two_row_scores(vlm, asked, wordings, batch_size: int) -> list[float]:
    """The replaced scoring: both wordings of every question as rows of their own, each a whole forward."""
    from halluscope.metrics.pope import fill_answer
    from halluscope.training.checks import question
    from halluscope.training.sequences import encode_responses, response_ids, response_logprob

    out = []
    for start in range(0, len(asked), batch_size):
        rows = [(image, question(obj), response_ids(vlm, fill_answer(wordings[answer], obj)))
                for image, obj in asked[start:start + batch_size] for answer in ("yes", "no")]
        batch = encode_responses(vlm, rows)
        with torch.no_grad():
            logprob = response_logprob(vlm.model(**batch.inputs).logits, batch)
        out += torch.sigmoid(logprob[0::2] - logprob[1::2]).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from halluscope.models.load import load_vlm
    from halluscope.tasks.object_scenes import SceneConfig, draw_object_scene
    from halluscope.training.checks import yes_probabilities

    categories = SceneConfig().categories
    asked = [(draw_object_scene(k, seed=0).image, categories[k % len(categories)]) for k in range(args.questions)]
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; threads {args.threads}; {args.questions} questions, batch "
          f"{args.batch_size}, {args.repetitions} repetitions")
    scorers = {"shared": yes_probabilities, "two-row": two_row_scores}
    lowest = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in (("qwen2_vl_70m", build_qwen), ("llava_70m", build_llava)):
            vlm = load_vlm(build(Path(tmp)))
            scores = {name: score(vlm, asked[:2], WORDINGS, batch_size=args.batch_size)  # warm-up
                      for name, score in scorers.items()}
            seconds: dict[str, list[float]] = {name: [] for name in scorers}
            for repetition in range(args.repetitions):
                order = list(scorers) if repetition % 2 == 0 else list(reversed(scorers))
                for name in order:
                    start = time.perf_counter()
                    scores[name] = scorers[name](vlm, asked, WORDINGS, batch_size=args.batch_size)
                    seconds[name].append(time.perf_counter() - start)
            ratio = statistics.median(two / shared for two, shared in zip(seconds["two-row"], seconds["shared"]))
            lowest = min(lowest, ratio)
            gap = max(abs(a - b) for a, b in zip(scores["shared"], scores["two-row"]))
            print(f"{label}: shared prefill {statistics.median(seconds['shared']):.3f} s, two rows "
                  f"{statistics.median(seconds['two-row']):.3f} s (medians): {ratio:.2f}x; "
                  f"largest |P(yes) difference| {gap:.1e}")
    print(f"checks {lowest:.2f}x (target >= {TARGET}x): {'met' if lowest >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
