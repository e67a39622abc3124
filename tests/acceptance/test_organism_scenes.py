"""The shipped scenes organism behaves as its model card says: it hallucinates absent objects that co-occur with
present ones, measured with `bench pope` and `bench chair` on the fixed held-out synthetic scenes."""

from __future__ import annotations

import json

import pytest

from halluscope.models import load_vlm
from halluscope.organism.kinds import get_kind
from halluscope.organism.scenes.behaviour import TARGETS, behaviour_report

CHECKPOINT = get_kind("scenes").checkpoint


@pytest.fixture(scope="module")
def organism():
    return load_vlm("organism-scenes")


@pytest.fixture(scope="module")
def report(organism):
    return behaviour_report(organism)


def test_loads_by_name_and_is_small(organism):
    assert organism.family.name == "qwen2_vl"
    size = sum(p.stat().st_size for p in CHECKPOINT.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    assert not (CHECKPOINT / "train_state.pt").exists()


def test_adversarial_pope_falls_below_random(report):
    # the card's build measured 10.3 points; a hundredth of slack for replies that flip between CPUs' float kernels
    assert report["pope_gap"] >= TARGETS["pope_gap"] - 0.01
    # the gap comes from absent co-occurring objects: it says "yes" to them far more often than to others
    assert report["yes_rate_absent_neighbour"] >= report["yes_rate_absent_other"] + 0.2


def test_captions_name_present_objects_and_add_absent_ones(report):
    assert report["chair"]["chair_i"] >= TARGETS["chair_i"]
    assert report["chair"]["recall"] >= TARGETS["recall"]


def test_the_card_states_what_is_measured_now(report):
    """The shipped behaviour.json is this measurement (same code, same held-out scenes), so the card is not stale
    (a tolerance of one reply in fifty, for float differences between machines)."""
    shipped = json.loads((CHECKPOINT / "behaviour.json").read_text())
    assert [row["split"] for row in shipped["pope"]] == [row["split"] for row in report["pope"]]
    for then, now in zip(shipped["pope"], report["pope"]):
        assert {k: v for k, v in then.items() if k != "split"} == pytest.approx(
            {k: v for k, v in now.items() if k != "split"}, abs=0.02)
    assert shipped["chair"] == pytest.approx(report["chair"], abs=0.02, rel=0.02)
