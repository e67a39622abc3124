"""VHR, VISTA and DeCo: head scores, steering vectors and layer mixes equal a direct computation of each paper's rule
(row by row, unpadded, on tiny models, or by hand on given logits); the edits reach exactly what they name while
decoding; bad settings fail in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from halluscope.decoding import build_method, decode, decode_ids, get_method, mitigate
from halluscope.decoding.branches import encode_text
from halluscope.decoding.loop import StepContext
from halluscope.decoding.methods.early_exit import early_exit_window
from halluscope.decoding.methods.image_effect import no_image_twin
from halluscope.decoding.methods.vhr import head_divergence, select_heads
from halluscope.decoding.methods.vista import steer, steering_vectors
from halluscope.errors import InputError
from halluscope.tasks.scenes import count_scene

PAIRS = [(count_scene(3, "circle", size=112, seed=1), "How many circles?"),
         (count_scene(5, "star", size=112, seed=2), "Describe the 7 stars in this image, one by one.")]
ONE_FAMILY = pytest.mark.parametrize("family", ["qwen2_vl"])
# M-RoPE positions (a no-image twin gets text positions) and plain 1-D positions
TWO_FAMILIES = pytest.mark.parametrize("family", ["qwen2_vl", "llava"])


def _sourced(vlm):
    """PAIRS encoded as one left-padded batch that keeps its pairs (what `mitigate` gives a method)."""
    with mitigate(vlm, "greedy"):
        return vlm.encode(PAIRS)


@torch.inference_mode()
def _last_token(vlm, batch, modules, read_input: bool) -> torch.Tensor:
    """Each module's input or output at the last position of a one-row batch, from the model's own forward."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append((a[0] if read_input else o)[0, -1].float()))
             for m in modules]
    try:
        vlm.forward(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(seen)


def _context(*logits, early=None):
    return StepContext([torch.tensor(l, dtype=torch.float32) for l in logits], early, 0, None)


# ---- VHR ------------------------------------------------------------------------------------------------
@TWO_FAMILIES
def test_vhr_scores_are_each_heads_output_change_without_the_image(vlm):
    batch = _sourced(vlm)
    scores = head_divergence(vlm, batch, no_image_twin(build_method("vhr"), vlm, batch))
    o_proj = [vlm.o_proj(layer) for layer in range(vlm.n_layers)]
    assert scores.shape == (len(PAIRS), vlm.n_layers, vlm.n_heads)
    for row, (image, prompt) in enumerate(PAIRS):
        change = (_last_token(vlm, vlm.encode([(image, prompt)]), o_proj, True) -
                  _last_token(vlm, encode_text(vlm, [prompt]), o_proj, True))
        expected = change.view(vlm.n_layers, vlm.n_heads, vlm.head_dim).norm(dim=-1)
        torch.testing.assert_close(scores[row], expected, atol=1e-4, rtol=1e-4)
    assert (scores > 0).all()


def test_vhr_selects_the_top_heads_of_each_row_within_the_scored_layers():
    scores = torch.tensor([[[0.1, 0.9], [0.5, 0.7], [2.0, 0.0]],
                           [[0.8, 0.1], [0.2, 0.3], [0.0, 5.0]]])  # [row, layer, head]; layer 2 is not scored
    chosen = select_heads(scores, frozenset({0, 1}), 2)
    assert chosen.nonzero().tolist() == [[0, 0, 1], [0, 1, 1], [1, 0, 0], [1, 1, 1]]
    config = build_method("vhr").config
    assert config.count(1024) == 51 and config.count(8) == 1
    assert build_method("vhr", top_k=3).config.count(8) == 3


@ONE_FAMILY
def test_vhr_scales_exactly_the_chosen_heads_at_o_proj(vlm):
    batch = _sourced(vlm)
    method = build_method("vhr", scale=3.0, top_k=3)
    chosen = select_heads(head_divergence(vlm, batch, no_image_twin(method, vlm, batch)),
                          frozenset(range(vlm.n_layers)), 3)
    before, after = {}, {}

    def record(store, layer):
        return lambda module, args: store.__setitem__(layer, args[0].clone())

    with method.applied(vlm, batch):
        hooks = [h for layer in range(vlm.n_layers) for h in (
            vlm.o_proj(layer).register_forward_pre_hook(record(before, layer), prepend=True),
            vlm.o_proj(layer).register_forward_pre_hook(record(after, layer)))]
        with torch.inference_mode():
            vlm.forward(batch)
        for hook in hooks:
            hook.remove()
    for layer in range(vlm.n_layers):
        heads = before[layer].view(len(batch), batch.seq_len, vlm.n_heads, vlm.head_dim)
        factor = torch.where(chosen[:, layer], 3.0, 1.0)[:, None, :, None]
        assert torch.equal(after[layer], (heads * factor).flatten(2)), layer


@ONE_FAMILY
def test_vhr_decodes_as_generate_under_the_same_heads_scaled_per_row(vlm):
    from halluscope.interventions.heads import HeadIntervention, intervene

    batch = _sourced(vlm)
    method = build_method("vhr", scale=4.0, top_k=2)
    chosen = select_heads(head_divergence(vlm, batch, no_image_twin(method, vlm, batch)),
                          frozenset(range(vlm.n_layers)), 2)
    rows = [HeadIntervention({tuple(pair) for pair in mask.nonzero().tolist()}, mode="scale", alpha=4.0)
            for mask in chosen]
    with intervene(vlm, rows):
        expected = vlm.generate_ids(batch, max_new_tokens=8)
    assert torch.equal(decode_ids(vlm, batch, method, max_new_tokens=8), expected)


# ---- VISTA ----------------------------------------------------------------------------------------------
def test_vista_steering_turns_each_position_towards_the_vector_and_keeps_its_norm():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 7
    direction = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    steered = steer(x, direction, 0.3)
    torch.testing.assert_close(steered.norm(dim=-1), x.norm(dim=-1))
    cos = lambda a: F.cosine_similarity(a, direction[:, None, :], dim=-1)  # noqa: E731
    assert (cos(steered) > cos(x)).all()
    expected = x.norm(dim=-1, keepdim=True) * F.normalize(F.normalize(x, dim=-1) + 0.3 * direction[:, None], dim=-1)
    torch.testing.assert_close(steered, expected)
    torch.testing.assert_close(steer(x, direction, 0.0), x)


@TWO_FAMILIES
def test_vista_vectors_are_the_hidden_state_change_without_the_image(vlm):
    batch = _sourced(vlm)
    vectors = steering_vectors(vlm, batch, no_image_twin(build_method("vista"), vlm, batch))
    assert vectors.shape == (vlm.n_layers, len(PAIRS), vlm.text_config.hidden_size)
    for row, (image, prompt) in enumerate(PAIRS):
        with torch.inference_mode():
            with_image = vlm.forward(vlm.encode([(image, prompt)]), output_hidden_states=True).hidden_states
            without = vlm.forward(encode_text(vlm, [prompt]), output_hidden_states=True).hidden_states
        # hidden_states[l + 1] is layer l's output, except the last one, which transformers returns final-normed
        for layer in range(vlm.n_layers - 1):
            expected = (with_image[layer + 1][0, -1] - without[layer + 1][0, -1]).float()
            torch.testing.assert_close(vectors[layer, row], expected, atol=1e-4, rtol=1e-4)


@ONE_FAMILY
def test_vista_steers_every_layer_output_and_the_recorded_hidden_states(vlm):
    batch = _sourced(vlm)
    method = build_method("vista", lam=0.5, alpha=0.0)
    directions = F.normalize(steering_vectors(vlm, batch, no_image_twin(method, vlm, batch)), dim=-1)
    before, after = {}, {}

    def record(store, layer):
        return lambda module, args, output: store.__setitem__(layer, output.clone())

    with method.applied(vlm, batch):
        hooks = [h for layer, module in enumerate(vlm.layers) for h in (
            module.register_forward_hook(record(before, layer), prepend=True),  # runs before the steering hook
            module.register_forward_hook(record(after, layer)))]
        with torch.inference_mode():
            hidden = vlm.forward(batch, output_hidden_states=True).hidden_states
        for hook in hooks:
            hook.remove()
    for layer in range(vlm.n_layers):
        torch.testing.assert_close(after[layer], steer(before[layer], directions[layer], 0.5))
        torch.testing.assert_close(after[layer].norm(dim=-1), before[layer].norm(dim=-1))
    assert torch.equal(hidden[1], after[0])  # what SLA's early exit reads is the steered state
    with torch.inference_mode():
        assert torch.equal(vlm.forward(batch, output_hidden_states=True).hidden_states[1], before[0])  # removed


@ONE_FAMILY
def test_vista_decodes_as_generate_under_the_same_steering(vlm):
    batch = _sourced(vlm)
    method = build_method("vista", lam=0.4, alpha=0.0)
    directions = F.normalize(steering_vectors(vlm, batch, no_image_twin(method, vlm, batch)), dim=-1)
    hooks = [module.register_forward_hook(lambda m, a, o, d=directions[layer]: steer(o, d, 0.4))
             for layer, module in enumerate(vlm.layers)]
    try:
        expected = vlm.generate_ids(batch, max_new_tokens=8)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(decode_ids(vlm, batch, method, max_new_tokens=8), expected)


def test_vista_mixes_the_mean_window_logits_into_the_final_ones():
    method = build_method("vista", alpha=0.25)
    assert method.early_exit_mean  # the loop reads out the window's mean logits: [1, batch, vocab]
    early = torch.tensor([[[2.0, 1.0, 0.0]]])
    scores = method.step_logits(_context([[1.0, 2.0, 3.0]], early=early))
    torch.testing.assert_close(scores, torch.tensor([[0.75 + 0.5, 1.5 + 0.25, 2.25]]))


# ---- DeCo -----------------------------------------------------------------------------------------------
def test_deco_rescores_candidates_with_the_surest_window_layer_of_each_row():
    real = [[3.0, 2.0, 0.0, -5.0],  # candidates (top_p 0.9): tokens 0 and 1
            [0.0, 3.0, 2.5, -5.0]]  # candidates: tokens 1 and 2
    layer_a = torch.tensor([[0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 4.0, 0.0]])  # row 0: its top token is no candidate
    layer_b = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    method = build_method("deco", alpha=0.5, top_k=3, top_p=0.9)
    scores = method.step_logits(_context(real, early=torch.stack([layer_a, layer_b])))
    inf = float("-inf")
    conf_b, conf_a = math.exp(2) / (math.exp(2) + 3), math.exp(4) / (math.exp(4) + 3)
    expected = torch.tensor([[3.0, 2.0 + 0.5 * conf_b * 2.0, inf, inf],  # anchor b (token 1)
                             [inf, 3.0, 2.5 + 0.5 * conf_a * 4.0, inf]])  # anchor a (token 2)
    torch.testing.assert_close(scores, expected)
    # neutral: the real logits untouched, no candidate mask either (beam search would see it)
    assert build_method("deco", alpha=0.0, top_k=1).step_logits(_context(real)).tolist() == real


@ONE_FAMILY
@pytest.mark.parametrize("name", ["deco", "vista"])
def test_layer_mix_scores_equal_a_manual_mix_from_a_full_forward(vlm, name):
    batch = vlm.encode(PAIRS[:1])
    seen = []

    class Recorded(get_method(name)):
        def step_logits(self, context):
            seen.append(super().step_logits(context))
            return seen[-1]

    settings = {"deco": {"alpha": 0.6, "top_k": 50, "top_p": 0.99}, "vista": {"lam": 0.0, "alpha": 0.3}}[name]
    decode_ids(vlm, batch, Recorded(start_layer=0, end_layer=2, **settings), max_new_tokens=1)
    with torch.inference_mode():
        out = vlm.forward(batch, output_hidden_states=True)
        real = out.logits[:, -1].float()
        early = [vlm.lm_head(vlm.norm(out.hidden_states[j][:, -1])).float() for j in (0, 1)]
    if name == "vista":
        expected = 0.7 * real + 0.3 * (early[0] + early[1]) / 2
    else:
        probs = torch.softmax(real, -1)
        top, index = probs.topk(50, -1)
        allowed = torch.zeros_like(real, dtype=torch.bool)
        allowed[0, index[0, :int((top.cumsum(-1) - top < 0.99).sum())]] = True
        conf, anchor = max(((torch.softmax(e, -1)[allowed].max(), e) for e in early), key=lambda t: float(t[0]))
        expected = (real + 0.6 * conf * anchor).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(seen[0], expected, atol=1e-4, rtol=0)


def test_early_exit_windows_scale_the_papers_layers_to_the_model():
    assert early_exit_window(32, None, None, (25, 30), "vista") == [25, 26, 27, 28, 29, 30]
    assert early_exit_window(32, None, None, (20, 28), "deco") == list(range(20, 29))
    assert early_exit_window(2, None, None, (20, 28), "deco") == [1]  # never the final normed state
    assert early_exit_window(8, 2, 4, (20, 28), "deco") == [2, 3]


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, settings, valid", [
    ("vhr", {"scale": 0}, r"vhr scale=0 is out of range; pass a number > 0\.0"),
    ("vhr", {"fraction": 1.5}, r"vhr fraction=1\.5 is out of range; pass a number in \(0\.0, 1\.0\]"),
    ("vhr", {"top_k": 0}, r"vhr top_k=0 is out of range; pass an integer >= 1"),
    ("vista", {"lam": -0.1}, r"vista lam=-0\.1 is out of range; pass a number >= 0\.0"),
    ("vista", {"alpha": 2}, r"vista alpha=2 is out of range; pass a number in \[0\.0, 1\.0\]"),
    ("deco", {"top_p": 0}, r"deco top_p=0 is out of range; pass a number in \(0\.0, 1\.0\]"),
    ("deco", {"top_k": 2.5}, r"deco top_k=2\.5 is out of range; pass an integer >= 1"),
])
def test_bad_settings_fail_in_one_line_naming_the_range(name, settings, valid):
    with pytest.raises(InputError, match=valid) as err:
        build_method(name, **settings)
    assert "\n" not in str(err.value)


@ONE_FAMILY
@pytest.mark.parametrize("name, settings, valid", [
    ("vhr", {"top_k": 9}, r"vhr top_k=9 is more than the 8 heads of the scored layers; pass top_k <= 8"),
    ("vhr", {"start_layer": 3}, r"vhr layers 3\.\.None do not fit this model's 2 layers"),
    ("deco", {"end_layer": 3}, r"deco early-exit layers 1\.\.2 do not fit this model's 2 layers; pass 0 <= "
                               r"start_layer < end_layer <= 2"),
    ("vista", {"start_layer": 1, "end_layer": 1}, r"vista early-exit layers 1\.\.0 do not fit"),
])
def test_settings_that_do_not_fit_the_model_fail_in_one_line(vlm, name, settings, valid):
    with pytest.raises(InputError, match=valid) as err:
        decode_ids(vlm, _sourced(vlm), build_method(name, **settings), max_new_tokens=1)
    assert "\n" not in str(err.value)


@ONE_FAMILY
@pytest.mark.parametrize("name", ["vhr", "vista"])
def test_methods_scored_against_the_no_image_twin_need_the_batch_pairs(vlm, name):
    with pytest.raises(InputError, match=r"encode the batch inside `with halluscope.mitigate"):
        decode_ids(vlm, vlm.encode(PAIRS), build_method(name), max_new_tokens=1)


@ONE_FAMILY
@pytest.mark.parametrize("name", ["vhr", "vista"])
def test_per_prompt_state_follows_the_beams(vlm, name):
    """VHR's head scales and VISTA's steering vectors are per prompt: under beam search each row's beams keep
    their prompt's, so a batch of two prompts decodes each as it decodes alone."""
    method = build_method(name, **({"scale": 2.0} if name == "vhr" else {}))
    together = decode(vlm, PAIRS, method=method, max_new_tokens=5, num_beams=2)
    alone = [decode(vlm, [pair], method=method, max_new_tokens=5, num_beams=2)[0] for pair in PAIRS]
    assert together == alone
