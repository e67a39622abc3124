"""A walk through the PIH pipeline from Python, on the built-in organism (about half a minute on a 2-core CPU).

The same steps work on a real checkpoint: swap "organism" for "Qwen/Qwen2-VL-7B-Instruct" (on a GPU, with
device="cuda") and the synthetic task for `halluscope.tasks.load_countbench(...)`.

    python examples/tutorial.py
"""

from __future__ import annotations

import halluscope
from halluscope.analysis.attention import SHARE_COLUMNS, attention_mass
from halluscope.analysis.probabilities import run_prompts, token_probabilities
from halluscope.analysis.ranking import best_k_sets, rank_heads
from halluscope.interventions.heads import HeadIntervention, format_heads
from halluscope.metrics import pih_rates, select_misleading
from halluscope.sweep.engine import SweepItem, generate_prompt, prepare_score, score_prompt

# 1. A model, and what prompt-induced hallucination looks like on one image.
vlm = halluscope.load_vlm("organism")
samples = halluscope.tasks.synthetic_counting(36, size=112, seed=1, offsets=(1, 3, 10))
seven = next(s for s in samples if s.truth == 7 and s.condition == "+3")
print(vlm)
print(f"{seven.prompt!r} (truth {seven.truth}) ->", vlm.generate(vlm.encode([(seven.image, seven.prompt)]))[0])

# 2. Baseline: copy rate by true count (greedy decoding, batched).
baseline = halluscope.evaluate(vlm, samples, batch_size=32, max_new_tokens=12)
rates = pih_rates(select_misleading(baseline), by=("truth",))
print(rates[["truth", "copy_rate", "correction_rate"]].to_string(index=False))

# 3. Which heads carry the copying? Knock out every head, one at a time, on every misleading prompt.
#    Score mode reads the answer logits after the clean reply's words, reusing the residual stream below
#    each layer; it equals one full forward per head (tested), just faster.
grid = [(layer, head) for layer in range(vlm.n_layers) for head in range(vlm.n_heads)]
rows = []
for sample in (s for s in samples if s.kind == "misleading"):
    item = SweepItem(sample.id, sample.image, sample.prompt, sample.truth, sample.claim)
    for (layer, head), result in zip(grid, score_prompt(vlm, prepare_score(vlm, item, max_new_tokens=12), grid)):
        rows.append({"sample_id": sample.id, "truth": sample.truth, "layer": layer, "head": head, **result})

import pandas as pd  # noqa: E402  (kept next to its first use in this walk-through)

sweep = pd.DataFrame(rows)
print(rank_heads(sweep).head(5)[["layer", "head", "correction_rate", "copy_rate", "rank"]].to_string(index=False))

# 4. Confirm the top heads with real greedy generation (generate mode: exact, stops once the answer is given).
top = [tuple(h) for h in best_k_sets(sweep, ks=(3,))["best3"]]
item = SweepItem(seven.id, seven.image, seven.prompt, seven.truth, seven.claim)
for head, result in zip(top, generate_prompt(vlm, item, top, max_new_tokens=12)):
    print(f"L{head[0]}H{head[1]} knocked out: {result['reply']!r} ({result['outcome']})")

# 5. Knock the set out jointly and re-evaluate: does copying drop, and does counting survive?
ablated = halluscope.evaluate(vlm, samples, batch_size=32, max_new_tokens=12, intervention=HeadIntervention(set(top)))
after = pih_rates(select_misleading(ablated), by=("truth",))
print(f"with {format_heads(top)} knocked out:")
print(pd.DataFrame({"truth": rates["truth"], "copy before": rates["copy_rate"],
                    "copy after": after["copy_rate"]}).to_string(index=False))
base = lambda t: (t[t["condition"] == "base"]["outcome"] == "corrected").mean()  # noqa: E731
print(f"base counting accuracy {base(baseline):.2f} -> {base(ablated):.2f}")

# 6. Where does the answer look? The share of attention that the position predicting the answer puts on the
#    image tokens, the prompt's text, the chat template and the reply so far (mean over layers and heads), with
#    the set intact and knocked out. Each setting generates its own reply up to the answer, then re-reads it.
prompts = run_prompts(baseline, samples, conditions=["+3", "+10"], limit=24)
mass = attention_mass(vlm, prompts, top, max_new_tokens=12)
answer = mass[mass["query"] == "answer"].groupby("setting", sort=False)[list(SHARE_COLUMNS)].mean()
print(f"attention from the answer position, {format_heads(top)} intact (baseline) vs knocked out (ablated):")
print(answer.round(3).to_string())

# 7. How likely are the true and the prompted count at the answer position when the set's output is scaled by
#    alpha (1 = unchanged, 0 = knocked out)? One teacher-forced forward per alpha, on the clean reply's prefix.
probs = token_probabilities(vlm, prompts, top, alphas=(0, 0.5, 1), max_new_tokens=12)
digits = probs[probs["form"] == "digit"].groupby("alpha")[["p_truth", "p_claim"]].mean()
print(f"p(true count) and p(prompted count) with {format_heads(top)} scaled by alpha:")
print(digits.round(3).to_string())
