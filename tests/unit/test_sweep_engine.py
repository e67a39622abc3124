"""The sweep engine equals the naive loop (one hook, one full forward or generate per head) on every family:
batching, prefix reuse and early stopping change nothing."""

from __future__ import annotations

import pytest

from halluscope.errors import HalluscopeError
from halluscope.sweep.engine import (SweepItem, answer_decided, generate_prompt, naive_generate, naive_score,
                                     prepare_generate, prepare_score, score_prompt)
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


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])  # 3-D (M-RoPE) and plain position ids
def test_generate_mode_verifies_late_divergence_and_decodes_from_the_cache(vlm, monkeypatch):
    """Rows that agree with the clean reply's first tokens are verified on from their cache; rows that leave
    it are decoded on from their cache, ragged batches included; every reply equals the naive loop's."""
    import halluscope.sweep.engine as engine

    seen = {"_verify_rest": 0, "_decode": 0}
    for name in seen:
        original = getattr(engine._Knockouts, name)

        def spy(self, group, name=name, original=original):
            seen[name] += len(group)
            return original(self, group)
        monkeypatch.setattr(engine._Knockouts, name, spy)
    item, heads = _item(), _grid(vlm)
    fast = generate_prompt(vlm, item, heads, mode="scale", alpha=0.8, batch_size=2, max_new_tokens=16)
    assert fast == naive_generate(vlm, item, heads, mode="scale", alpha=0.8, max_new_tokens=16)
    assert seen["_verify_rest"] > 0 and seen["_decode"] > 0


def test_baseline_reply_ids_replace_the_clean_generation(tiny_dirs, monkeypatch):
    """An item carrying its eval reply's token ids gets the same setups without generating again."""
    import dataclasses

    import halluscope.sweep.engine as engine
    from halluscope.evaluation import evaluate
    from halluscope.models import load_vlm
    from halluscope.images import image_to_png_bytes
    from halluscope.tasks.sample import Sample

    vlm = load_vlm(tiny_dirs["qwen2_vl"])
    item = _item()
    sample = Sample(id="s0", image_id="0", image=image_to_png_bytes(item.image), object="circles", truth=4,
                    claim=6, prompt=item.prompt, condition="+2", task="count")
    reply_ids = evaluate(vlm, [sample], max_new_tokens=10)["reply_ids"].iloc[0]
    assert vlm.tokenizer.decode(reply_ids, skip_special_tokens=True).strip() == \
        evaluate(vlm, [sample], max_new_tokens=10)["reply"].iloc[0]
    fresh_score = prepare_score(vlm, item, max_new_tokens=10)
    fresh_generate = prepare_generate(vlm, item, max_new_tokens=10)
    known = dataclasses.replace(item, reply_ids=tuple(reply_ids))
    monkeypatch.setattr(engine, "_greedy", lambda *a, **k: pytest.fail("generated a clean reply again"))
    assert prepare_score(vlm, known, max_new_tokens=10).clean_reply == fresh_score.clean_reply
    assert prepare_generate(vlm, known, max_new_tokens=10).sequence == fresh_generate.sequence


def test_last_layer_mlp_patch_restores_a_wrapped_forward(tiny_dirs):
    """The last-positions MLP patch puts back an instance-level forward (as accelerate hooks install)."""
    from halluscope.models import load_vlm
    from halluscope.sweep.engine import _mlp_on_last

    mlp = load_vlm(tiny_dirs["qwen2_vl"]).layers[-1].mlp
    wrapped = mlp.forward
    mlp.forward = wrapped  # an instance attribute now
    with _mlp_on_last(type("Layer", (), {"mlp": mlp})(), 1):
        assert mlp.forward is not wrapped
    assert mlp.__dict__["forward"] is wrapped


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


def test_reference_mean_in_score_mode_averages_and_edits_the_prompt_only():
    """The reference's in-forward mean acted on its prefill (the prompt); the teacher-forced reply stays as is."""
    import torch

    from halluscope.interventions.heads import HeadHooks
    from halluscope.sweep.engine import ScoreSetup

    class Batch:
        attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1]])

    setup = ScoreSetup(_item(), "", [], prompt_len=4)
    mask = setup.prompt_mask(Batch())
    assert mask.tolist() == [[0, 1, 1, 1, 0, 0]]

    class Tiny:
        n_layers, n_heads, head_dim, device, dtype = 1, 1, 2, torch.device("cpu"), torch.float32

        def o_proj(self, layer):
            return torch.nn.Identity()

    hooks = HeadHooks(Tiny())
    hooks.set(torch.zeros(1, 1, 1), mode="reference-mean", row_mask=mask)
    x = torch.arange(12.0).view(1, 6, 2)
    out = hooks._hook(0)(None, (x,))[0]
    assert torch.equal(out[0, 1:4], x[0, 1:4].mean(0).expand(3, -1))  # prompt: its own mean
    assert torch.equal(out[0, 4:], x[0, 4:]) and torch.equal(out[0, 0], x[0, 0])  # reply and padding untouched


def test_batch_of_one_equals_naive_loop(vlm):
    """One knockout per forward (the chunk shape that hid a dropped cache under transformers 5.24): both modes
    still equal the naive loop."""
    item = _item()
    heads = _grid(vlm)[: vlm.n_heads + 1]  # a whole layer and one head of the next
    setup = prepare_score(vlm, item, max_new_tokens=10)
    fast = score_prompt(vlm, setup, heads, batch_size=1)
    slow = naive_score(vlm, setup, heads)
    assert [f["outcome"] for f in fast] == [s["outcome"] for s in slow]
    for f, s in zip(fast, slow):
        for key in (k for k in s if k.startswith("logit_diff")):
            assert abs(f[key] - s[key]) <= 1e-4
    assert generate_prompt(vlm, item, heads, mode="scale", alpha=0.5, batch_size=1, max_new_tokens=10) == \
        naive_generate(vlm, item, heads, mode="scale", alpha=0.5, max_new_tokens=10)
