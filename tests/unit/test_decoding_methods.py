"""Decoding methods: at the neutral setting each gives plain greedy's tokens exactly, on every family, in a batch
of unequal prompts; the registry and the configs fail with one-line errors; each method's rule is computed as its
paper states it."""

from __future__ import annotations

import math
import random

import pytest
import torch

from halluscope.decoding import available_methods, build_method, decode_ids, get_method, mitigate
from halluscope.decoding.loop import StepContext
from halluscope.decoding.registry import MethodSpec, register_method
from halluscope.errors import InputError
from halluscope.tasks.scenes import count_scene

PAIRS = [(count_scene(3, "circle", size=112, seed=1), "How many circles?"),
         (count_scene(5, "star", size=112, seed=2), "Describe the 7 stars in this image, one by one.")]
ONE_FAMILY = pytest.mark.parametrize("family", ["qwen2_vl"])

NEUTRAL = {
    "greedy": {},
    "heads": {"heads": "L0H1,L1H0", "alpha": 1.0},
    "vcd": {"alpha": 0.0},
    "m3id": {"lam": 0.0},
    "ritual": {"alpha": 0.0},
    "icd": {"alpha": 0.0},
    "pai": {"alpha": 0.0, "gamma": 1.0},
    "dola": {"strength": 0.0},
    "vaf": {"image_scale": 1.0, "system_scale": 1.0},
    "vhr": {"scale": 1.0},
    "vista": {"lam": 0.0, "alpha": 0.0},
    "deco": {"alpha": 0.0},
    "opera": {"num_beams": 1, "alpha": 0.0, "max_rollbacks": 0},  # with beams: plain beam search, test_decoding_beam
}


def test_every_registered_method_has_a_neutral_setting_under_test():
    assert sorted(NEUTRAL) == available_methods()


def test_neutral_settings_give_plain_greedy_tokens(vlm):
    with mitigate(vlm, "greedy"):
        batch = vlm.encode(PAIRS)  # keeps its pairs for the methods whose branches change them
    expected = vlm.generate_ids(batch, max_new_tokens=12)
    for name, settings in NEUTRAL.items():
        got = decode_ids(vlm, batch, build_method(name, **settings), max_new_tokens=12)
        assert torch.equal(got, expected), name


# ---- registry and configs -------------------------------------------------------------------------------
def test_unknown_method_gets_a_did_you_mean():
    with pytest.raises(InputError, match=r"unknown decoding method 'vdc'\. Did you mean 'vcd'\? Available: ") as err:
        get_method("vdc")
    assert "\n" not in str(err.value)


def test_aliases_and_case_resolve_to_the_method():
    assert get_method("ClearSight") is get_method("vaf")
    assert get_method("VCD").name == "vcd"


def test_a_taken_name_cannot_be_registered_twice():
    with pytest.raises(InputError, match="already registered"):
        register_method(MethodSpec("vcd", "halluscope.decoding.methods.vcd:VCD"))
    with pytest.raises(InputError, match="already registered by 'vaf'"):
        register_method(MethodSpec("mine", "somewhere:Mine", aliases=("clearsight",)))


def test_a_target_that_is_not_a_method_is_refused(monkeypatch):
    from halluscope.decoding import registry

    # registered for this test only, so the registry other tests see keeps real methods alone
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    register_method(MethodSpec("not-a-method", "halluscope.errors:InputError"), replace=True)
    with pytest.raises(InputError, match="not a DecodingMethod"):
        get_method("not-a-method")


@pytest.mark.parametrize("name, settings, valid", [
    ("vcd", {"alpha": -1}, r"vcd alpha=-1 is out of range; pass a number >= 0\.0"),
    ("vcd", {"beta": 2}, r"vcd beta=2 is out of range; pass a number in \[0\.0, 1\.0\]"),
    ("vcd", {"noise_step": 1000}, r"noise_step=1000 is out of range; pass an integer in \[0, 999\]"),
    ("m3id", {"gate": float("nan")}, r"gate=nan is out of range"),
    ("pai", {"gamma": 0.5}, r"gamma=0\.5 is out of range; pass a number >= 1\.0"),
    ("vaf", {"image_scale": 0}, r"image_scale=0 is out of range; pass a number > 0\.0"),
    ("dola", {"layers": "middle"}, r"dola layers='middle' is not valid"),
    ("icd", {"prefix": " "}, r"icd prefix=' ' is empty"),
    ("heads", {}, r"method 'heads' needs heads"),
])
def test_bad_settings_fail_in_one_line_naming_the_range(name, settings, valid):
    with pytest.raises(InputError, match=valid) as err:
        build_method(name, **settings)
    assert "\n" not in str(err.value)


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(InputError, match=r"method 'vcd' has no setting 'alpah'\. Did you mean 'alpha'\? Settings: "
                                         r"alpha, beta, noise_step, seed"):
        build_method("vcd", alpah=1)


def test_record_holds_the_full_config_with_defaults():
    assert build_method("vcd", alpha=0.5).record() == {
        "method": "vcd", "config": {"alpha": 0.5, "beta": 0.1, "noise_step": 500, "seed": 0}}


@ONE_FAMILY
def test_methods_that_change_the_input_need_the_batch_pairs(vlm):
    with pytest.raises(InputError, match=r"encode the batch inside `with halluscope.mitigate"):
        decode_ids(vlm, vlm.encode(PAIRS), build_method("icd"), max_new_tokens=2)


# ---- each method's rule ------------------------------------------------------------------------------
def _context(*logits, step=0, early=None):
    return StepContext([torch.tensor(l, dtype=torch.float32) for l in logits], early, step, None)


def test_vcd_contrasts_within_the_plausible_tokens():
    real, noised = [[2.0, 1.0, -3.0]], [[1.0, 2.0, -3.0]]
    scores = build_method("vcd", alpha=1.0, beta=0.1).step_logits(_context(real, noised))
    # (1 + a) * real - a * noised; token 2 has p < 0.1 * max p under the real logits, so it is excluded
    assert scores.tolist() == [[3.0, 0.0, float("-inf")]]


def test_icd_and_ritual_rules():
    real, other = [[2.0, 1.0, -3.0]], [[1.0, 2.0, -3.0]]
    assert build_method("icd", alpha=0.5, beta=0.0).step_logits(_context(real, other)).tolist() == [[2.5, 0.5, -3.0]]
    ritual = build_method("ritual", alpha=3.0, beta=0.0)
    assert ritual.step_logits(_context(real, other)).tolist() == [[5.0, 7.0, -12.0]]


def test_m3id_weight_grows_with_the_step_and_is_gated_by_confidence():
    real, blind = [[0.0, 0.1, 0.2]], [[0.3, 0.0, 0.0]]
    method = build_method("m3id", lam=0.5, gate=0.9)
    lc, lu = (torch.log_softmax(torch.tensor(x), -1) for x in (real, blind))
    for step in (0, 1, 4):
        gamma = math.exp(-0.5 * step)
        torch.testing.assert_close(method.step_logits(_context(real, blind, step=step)),
                                   lc + (1 - gamma) / gamma * (lc - lu))
    sure = build_method("m3id", lam=0.5, gate=0.1)  # max p of `real` is above 0.1: no contrast
    torch.testing.assert_close(sure.step_logits(_context(real, blind, step=4)), lc)


def test_pai_guidance_rule():
    real, blind = [[2.0, 1.0, 0.0]], [[0.0, 1.0, 2.0]]
    lc, lu = (torch.log_softmax(torch.tensor(x), -1) for x in (real, blind))
    expected = torch.tensor(real) + 0.5 * (lc - lu)  # log p_u + gamma (log p_c - log p_u), up to a row constant
    scores = build_method("pai", gamma=1.5, beta=0.0).step_logits(_context(real, blind))
    torch.testing.assert_close(scores, expected)


def test_vcd_noise_follows_the_diffusion_schedule():
    from halluscope.decoding.methods.vcd import diffusion_noise

    zeros = torch.zeros(200_000)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, 0)
    assert torch.equal(diffusion_noise(zeros, 500, 0), diffusion_noise(zeros, 500, 0))
    assert abs(diffusion_noise(zeros, 500, 0).std().item() - (1 - abar[500]).sqrt().item()) < 5e-3
    torch.testing.assert_close(diffusion_noise(torch.ones(4), 0, 0).mean(), abar[0].sqrt().float(), atol=0.02, rtol=0)


def test_ritual_transforms_keep_the_size_and_are_seeded():
    from halluscope.decoding.methods.ritual import TRANSFORMS, random_transform

    image = count_scene(3, "circle", size=112, seed=1)
    drawn = set()
    for seed in range(40):
        name, out = random_transform(image, random.Random(seed))
        again = random_transform(image, random.Random(seed))[1]
        assert out.size == image.size and out.tobytes() == again.tobytes()
        drawn.add(name)
    assert drawn == set(TRANSFORMS)


def test_dola_picks_the_most_divergent_layer_and_contrasts_with_it():
    from halluscope.decoding.methods.dola import candidate_layers, jensen_shannon

    assert candidate_layers("high", 8) == [4, 6] and candidate_layers("low", 8) == [0, 2]
    with pytest.raises(InputError, match=r"dola layers 'low' select no layer of this 1-layer model"):
        candidate_layers("low", 1)
    p = torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), -1)
    assert jensen_shannon(p, p).abs().item() < 1e-7
    q = torch.log_softmax(torch.tensor([0.0, 2.0, 0.0]), -1)
    r = torch.log_softmax(torch.tensor([0.0, 0.0, 9.0]), -1)
    assert jensen_shannon(p, r) > jensen_shannon(p, q) > 0

    method = build_method("dola", layers="0,1", beta=0.0)
    early = torch.tensor([[[0.0, 2.0, 0.0]], [[0.0, 0.0, 9.0]]])  # [candidate layers, batch, vocab]
    real = [[2.0, 0.0, 0.0]]
    scores = method.step_logits(_context(real, early=early))
    torch.testing.assert_close(scores, torch.tensor(real) - r)  # layer 1 diverges most


@ONE_FAMILY
def test_head_ablation_equals_the_intervention_under_generate(vlm):
    from halluscope.interventions.heads import HeadIntervention, intervene

    batch = vlm.encode(PAIRS)
    with intervene(vlm, HeadIntervention({(0, 1), (1, 0)}, mode="scale", alpha=0.0)):
        expected = vlm.generate_ids(batch, max_new_tokens=10)
    assert torch.equal(decode_ids(vlm, batch, build_method("heads", heads="L0H1,L1H0"), max_new_tokens=10), expected)


def test_pai_boosts_the_last_query_rows_image_scores_only():
    from halluscope.decoding.methods.pai import boost_image

    scores = torch.tensor([[[[1.0, -2.0, 3.0], [-1.0, -2.0, 4.0]]]])  # [batch 1, head 1, queries 2, keys 3]
    image = torch.tensor([[False, True, True]])
    assert boost_image(scores, image, 0.5).tolist() == [[[[1.0, -2.0, 3.0], [-1.0, -1.0, 6.0]]]]


def test_vaf_scales_image_and_system_columns():
    from halluscope.decoding.methods.vaf import scale_columns

    scores = torch.tensor([[[[2.0, 2.0, 2.0, 2.0]]]])
    image, system = torch.tensor([[False, False, True, False]]), torch.tensor([[False, True, False, False]])
    assert scale_columns(scores, image, system, 1.5, 0.5).tolist() == [[[[2.0, 1.0, 3.0, 2.0]]]]
    assert build_method("vaf").config.layers(32) == (9, 15)
    assert build_method("vaf").config.layers(8) == (2, 4)


@ONE_FAMILY
def test_dola_scores_equal_a_manual_contrast_from_a_full_forward(vlm):
    from halluscope.decoding.methods.dola import jensen_shannon

    batch = vlm.encode(PAIRS[:1])
    seen = []

    class Recorded(get_method("dola")):
        def step_logits(self, context):
            seen.append(super().step_logits(context))
            return seen[-1]

    decode_ids(vlm, batch, Recorded(layers="0,1", beta=0.2), max_new_tokens=1)
    with torch.inference_mode():
        out = vlm.forward(batch, output_hidden_states=True)
        real = out.logits[:, -1]
        final = torch.log_softmax(real, -1)
        early = [torch.log_softmax(vlm.lm_head(vlm.norm(out.hidden_states[j][:, -1])), -1) for j in (0, 1)]
    premature = max(early, key=lambda e: float(jensen_shannon(final, e)))
    expected = (real - premature).masked_fill(real < real.max(-1, keepdim=True).values + math.log(0.2), float("-inf"))
    torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=0)
