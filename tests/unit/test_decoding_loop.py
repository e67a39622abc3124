"""The decoding loop: plain decoding equals `VLM.generate_ids` token for token, sampling is seeded and its limits
are greedy, and `mitigate` puts the VLM back as it found it."""

from __future__ import annotations

import pytest
import torch

import halluscope
from halluscope.decoding import Sampler, decode_ids, mitigate
from halluscope.decoding.methods.base import DecodingMethod
from halluscope.errors import InputError
from halluscope.tasks.scenes import count_scene

PAIRS = [(count_scene(3, "circle", size=112, seed=1), "How many circles?"),
         (count_scene(5, "star", size=112, seed=2), "Describe the 7 stars in this image, one by one.")]


ONE_FAMILY = pytest.mark.parametrize("family", ["qwen2_vl"])  # behaviour of the loop itself, not of a family


def test_plain_loop_equals_generate(vlm):
    batch = vlm.encode(PAIRS)
    expected = vlm.generate_ids(batch, max_new_tokens=16)
    assert torch.equal(decode_ids(vlm, batch, max_new_tokens=16), expected)


@ONE_FAMILY
def test_sampling_is_seeded_and_its_limits_are_greedy(vlm):
    batch = vlm.encode(PAIRS)
    greedy = decode_ids(vlm, batch, max_new_tokens=10)
    sample = lambda **kw: decode_ids(vlm, batch, max_new_tokens=10, sampler=Sampler(do_sample=True, **kw))  # noqa: E731
    assert torch.equal(sample(seed=3), sample(seed=3))
    assert not torch.equal(sample(seed=3, temperature=5.0), sample(seed=4, temperature=5.0))
    assert torch.equal(sample(seed=3, top_p=1e-9), greedy)  # only the top token is left to draw
    assert torch.equal(sample(seed=3, temperature=1e-6), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(do_sample=True, top_p=0.8)
    drawn = {int(sampler.pick(scores, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("settings, valid", [({"temperature": 0}, "> 0"), ({"top_p": 1.5}, "(0, 1]")])
def test_sampler_rejects_values_out_of_range(settings, valid):
    with pytest.raises(InputError, match=valid.replace("(", r"\(").replace("]", r"\]")):
        Sampler(do_sample=True, **settings)


@ONE_FAMILY
def test_max_new_tokens_must_be_positive(vlm):
    with pytest.raises(InputError, match="max_new_tokens"):
        decode_ids(vlm, vlm.encode(PAIRS[:1]), max_new_tokens=0)


@ONE_FAMILY
def test_mitigate_routes_generate_and_restores_the_vlm(vlm):
    class Forbid(DecodingMethod):
        name = "forbid"

        def step_logits(self, context):
            scores = context.logits[0].clone()
            scores[:, 5] = float("inf")  # always token 5
            return scores

    with mitigate(vlm, Forbid()) as method:
        assert isinstance(method, Forbid)
        ids = vlm.generate_ids(vlm.encode(PAIRS[:1]), max_new_tokens=3)
    assert ids.tolist() == [[5, 5, 5]]
    assert "generate_ids" not in vars(vlm) and "encode" not in vars(vlm)
    with pytest.raises(RuntimeError), mitigate(vlm, "greedy"):
        raise RuntimeError("boom")
    assert "generate_ids" not in vars(vlm) and "encode" not in vars(vlm)


@ONE_FAMILY
def test_decode_and_mitigate_are_exported(vlm):
    replies = halluscope.decode(vlm, PAIRS, method="greedy", max_new_tokens=6)
    assert replies == vlm.generate(vlm.encode(PAIRS), max_new_tokens=6)
    with halluscope.mitigate(vlm, "vcd", alpha=0.0):
        assert vlm.generate(vlm.encode(PAIRS), max_new_tokens=6) == replies
