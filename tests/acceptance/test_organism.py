"""The shipped organism behaves as its model card says, measured on the fixed held-out synthetic set."""

from __future__ import annotations

import pytest

from halluscope.models import load_vlm
from halluscope.organism.behaviour import find_head_set, measure_behaviour


@pytest.fixture(scope="module")
def organism():
    return load_vlm("organism")


@pytest.fixture(scope="module")
def behaviour(organism):
    return measure_behaviour(organism)


def test_loads_by_name_and_is_small(organism):
    from halluscope.organism import CHECKPOINT_DIR

    assert organism.family.name == "qwen2_vl"
    size = sum(p.stat().st_size for p in CHECKPOINT_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_counts_and_names_colours(behaviour):
    assert behaviour["base_accuracy"] >= 0.80
    assert behaviour["color_accuracy"] >= 0.90


def test_corrects_small_counts_and_copies_large_ones(behaviour):
    assert behaviour["copy_rate_counts_1_3"] <= 0.30
    assert behaviour["copy_rate_counts_7_9"] >= 0.60


def test_sweep_finds_a_small_head_set_that_cuts_copying(organism):
    result = find_head_set(organism, max_heads=5)
    best = result["best"]
    assert best is not None, result["trials"]
    assert len(best["heads"].split(",")) <= 5
    assert best["copy_rate_relative_reduction"] >= 0.40 and best["base_accuracy_drop"] <= 0.10


def test_atp_star_estimates_agree_with_exact_knockouts(organism):
    """Fidelity of attribution patching on the organism: rank correlation of AtP* estimates with the exact
    score-mode effects over all heads (mean over prompts) >= 0.8, and >= 8 of the exact top 10 in AtP*'s top 20."""
    import pandas as pd
    import torch

    from halluscope.evaluation import evaluate
    from halluscope.sweep.attribution import attribution_scores
    from halluscope.sweep.engine import SweepItem, prepare_score, score_prompt
    from halluscope.tasks import synthetic_counting

    samples = [s for s in synthetic_counting(6, size=112, seed=3) if s.claim is not None and s.claim != s.truth][:12]
    table = evaluate(organism, samples, max_new_tokens=12, batch_size=16)
    grid = [(l, h) for l in range(organism.n_layers) for h in range(organism.n_heads)]
    estimated, exact = [], []
    for sample, row in zip(samples, table.itertuples()):
        item = SweepItem(sample.id, sample.image, sample.prompt, sample.truth, sample.claim, sample.task,
                         tuple(int(t) for t in row.reply_ids), sample.object)
        setup = prepare_score(organism, item, max_new_tokens=12)
        estimates, clean = attribution_scores(organism, setup, estimator="atp-star")
        estimated.append(torch.stack([estimates[f] for f in clean]).mean(0).flatten())
        rows = score_prompt(organism, setup, grid, batch_size=len(grid))
        exact.append(torch.tensor([sum(r[f"logit_diff_{f}"] - clean[f] for f in clean) / len(clean) for r in rows]))
    per_head_estimate, per_head_exact = torch.stack(estimated).mean(0), torch.stack(exact).mean(0)
    spearman = pd.Series(per_head_estimate.numpy()).rank().corr(pd.Series(per_head_exact.numpy()).rank())
    assert spearman >= 0.8
    top10 = set(per_head_exact.argsort(descending=True)[:10].tolist())
    top20 = set(per_head_estimate.argsort(descending=True)[:20].tolist())
    assert len(top10 & top20) >= 8
