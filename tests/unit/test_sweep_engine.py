"""The sweep engine equals the naive loop (one hook, one full forward or generate per head) on every family:
batching, prefix reuse and early stopping change nothing."""

from __future__ import annotations

import pytest

from halluscope.errors import HalluscopeError
from halluscope.sweep.engine import (SweepItem, answer_decided, generate_prompt, naive_generate, naive_score,
                                     prepare_score, score_prompt)
from halluscope.sweep.runner import parse_range
from halluscope.tasks.scenes import count_scene


def _item(task: str = "count") -> SweepItem:
    if task == "count":
        return SweepItem("s0", count_scene(4, "circle", size=112, seed=1), "Describe the 6 circles in this image.", 4, 6)
    from halluscope.tasks.scenes import color_scene

    return SweepItem("c0", color_scene("red", "square", size=112, seed=1), "Describe the blue square.", "red", "blue",
                     task="color")


def _grid(vlm):
    return [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]


def test_score_mode_equals_naive_loop(vlm):
    setup = prepare_score(vlm, _item(), max_new_tokens=10)
    heads = _grid(vlm)
    fast = score_prompt(vlm, setup, heads, batch_size=3)  # 3 does not divide 4 heads: ragged batches too
    slow = naive_score(vlm, setup, heads)
    assert [f["outcome"] for f in fast] == [s["outcome"] for s in slow]
    for f, s in zip(fast, slow):
        for key in (k for k in s if k.startswith("logit_diff")):
            assert abs(f[key] - s[key]) <= 1e-4


def test_generate_mode_equals_naive_loop(vlm):
    item = _item()
    heads = _grid(vlm)
    assert generate_prompt(vlm, item, heads, batch_size=3, max_new_tokens=10) == \
        naive_generate(vlm, item, heads, max_new_tokens=10)


@pytest.mark.parametrize("family", ["qwen2_vl"])
@pytest.mark.parametrize("mode", ["mean", "reference-mean"])
def test_other_modes_equal_naive_loop(vlm, mode):
    from halluscope.interventions.heads import compute_head_means

    means = compute_head_means(vlm, [vlm.encode([(_item().image, "How many circles are in this image?")])])
    setup = prepare_score(vlm, _item(), max_new_tokens=10)
    heads = _grid(vlm)
    fast = score_prompt(vlm, setup, heads, mode=mode, means=means, batch_size=8)
    slow = naive_score(vlm, setup, heads, mode=mode, means=means)
    for f, s in zip(fast, slow):
        assert f["outcome"] == s["outcome"] and abs(f["logit_diff_digit"] - s["logit_diff_digit"]) <= 1e-4


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_colour_items_score_and_generate(vlm):
    item = _item("color")
    setup = prepare_score(vlm, item, max_new_tokens=10)
    heads = _grid(vlm)
    fast, slow = score_prompt(vlm, setup, heads), naive_score(vlm, setup, heads)
    assert [f["outcome"] for f in fast] == [s["outcome"] for s in slow]
    assert set(fast[0]) >= {"logit_diff_word", "outcome"}
    assert generate_prompt(vlm, item, heads, max_new_tokens=8) == naive_generate(vlm, item, heads, max_new_tokens=8)


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_early_stop_keeps_the_answer_of_a_full_generation(vlm):
    """Stopping once the answer is decided gives the same parsed answer as generating all tokens."""
    item = _item()
    heads = _grid(vlm)
    short = naive_generate(vlm, item, heads, max_new_tokens=20)
    full = naive_generate(vlm, item, heads, max_new_tokens=20, stop=lambda reply: False)
    assert [s["answer"] for s in short] == [f["answer"] for f in full]
    for s, f in zip(short, full):
        assert f["reply"].startswith(s["reply"])


@pytest.mark.parametrize("reply,decided", [
    ("There are 7", False), ("There are 7 ", True), ("There are 1", False), ("There are 12 dogs", True),
    ("twenty", False), ("twenty-", False), ("I see", False), ("7.", True), ("", False),
])
def test_answer_decided(reply, decided):
    assert answer_decided(reply) is decided


def test_score_mode_needs_a_misleading_prompt(tiny_dirs):
    from halluscope.models import load_vlm

    vlm = load_vlm(tiny_dirs["qwen2_vl"])
    item = SweepItem("s", count_scene(3, "star", size=112, seed=0), "How many stars are in this image?", 3, None)
    with pytest.raises(HalluscopeError, match="misleading"):
        prepare_score(vlm, item)


@pytest.mark.parametrize("text,size,expected", [(None, 4, [0, 1, 2, 3]), ("1:3", 4, [1, 2]), ("2", 4, [2]),
                                                (":2", 4, [0, 1]), ("2:", 4, [2, 3])])
def test_parse_range(text, size, expected):
    assert parse_range(text, size, "head") == expected


@pytest.mark.parametrize("text", ["0:9", "3:1", "a:b", "-1:2"])
def test_parse_range_errors(text):
    with pytest.raises(HalluscopeError) as e:
        parse_range(text, 4, "layer")
    assert "\n" not in str(e.value) and "layer" in str(e.value)
