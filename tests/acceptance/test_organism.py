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
