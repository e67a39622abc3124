"""Attribution patching: the first-order estimate is the knockout's derivative (checked against exact small
edits on every family), it is exact where the metric is linear in the edited head, and the estimator sweep
writes estimates and exactly verified rows side by side."""

from __future__ import annotations

import pytest
import torch

from halluscope.errors import InputError
from halluscope.sweep.attribution import ESTIMATORS, attribution_scores
from halluscope.sweep.engine import SweepItem, _patched_forward, prepare_score, score_prompt
from halluscope.tasks.scenes import count_scene


def _setup(vlm):
    item = SweepItem("s0", count_scene(4, "circle", size=112, seed=1), "Describe the 7 circles in this image.", 4, 7,
                     reply_ids=tuple(vlm.reply_token_ids("There are seven circles.")))
    return prepare_score(vlm, item, max_new_tokens=12)


def _exact_changes(vlm, setup, heads, **edit) -> dict[str, torch.Tensor]:
    clean = score_prompt(vlm, setup, [(0, 0)], mode="scale", alpha=1.0)[0]
    rows = score_prompt(vlm, setup, heads, **edit)
    return {form: torch.tensor([r[f"logit_diff_{form}"] - clean[f"logit_diff_{form}"] for r in rows])
            for form in setup.forms()}


def test_the_estimate_is_the_knockouts_derivative(vlm):
    """A knockout scaled by 1 - eps changes the metric by eps times the estimate, to first order."""
    setup = _setup(vlm)
    heads = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    eps = 1e-2
    estimates, clean = attribution_scores(vlm, setup, estimator="atp", mode="scale", alpha=1 - eps)
    exact = _exact_changes(vlm, setup, heads, mode="scale", alpha=1 - eps)
    for form in setup.forms():
        estimated = torch.tensor([float(estimates[form][l, h]) for l, h in heads])
        assert torch.allclose(estimated, exact[form], rtol=0.05, atol=2e-4), (form, estimated, exact[form])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_exact_where_the_metric_is_linear_in_the_head(vlm):
    """In the last layer, with its MLP and the final norm taken out, a one-token truth - claim log-probability
    difference is a logit difference: linear in the head's output, so the estimate is the exact effect."""
    setup = _setup(vlm)
    assert all(len(w.ids) == 1 for slot in setup.slots for w in slot.words)
    last = vlm.n_layers - 1
    heads = [(last, h) for h in range(vlm.n_heads)]
    with _patched_forward(vlm.layers[last].mlp, lambda x: torch.zeros_like(x)), \
            _patched_forward(vlm.norm, lambda x: x):
        setup.captured.clear()
        estimates, _ = attribution_scores(vlm, setup, estimator="atp")
        exact = _exact_changes(vlm, setup, heads)
    setup.captured.clear()
    for form in setup.forms():
        estimated = torch.tensor([float(estimates[form][l, h]) for l, h in heads])
        assert torch.allclose(estimated, exact[form], atol=1e-4), (estimated, exact[form])


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_atp_star_keeps_the_sign_and_at_least_the_magnitude_of_atp(vlm):
    setup = _setup(vlm)
    plain, clean = attribution_scores(vlm, setup, estimator="atp")
    star, clean_star = attribution_scores(vlm, setup, estimator="atp-star")
    assert clean == pytest.approx(clean_star, abs=1e-5)
    for form in plain:
        assert torch.equal(torch.sign(star[form]), torch.sign(plain[form]))
        assert torch.allclose(star[form][-1], plain[form][-1], atol=1e-5)  # no later layer to drop


def test_grad_drop_gradient_equals_a_forward_with_the_layer_detached(vlm):
    """The dropped-layer gradients computed from the full backward, for both answer forms in one batched pass,
    equal a plain backward of each form's metric through a model whose layer d's blocks are detached (their output
    kept, their gradient cut)."""
    from halluscope.sweep.attribution import _frozen, _gradients, _tracked_heads, _tracked_residuals
    from halluscope.sweep.slot import word_scores

    setup = _setup(vlm)
    slot, batch, indices = setup.inputs()[0]
    forms = list(setup.forms())
    assert len(setup.inputs()) == 1 and len(forms) == 2  # one sequence scores both forms

    def metrics_and_heads(detach_layer: int | None):
        heads, residuals, handles = [], [], []
        if detach_layer is not None:
            for block in (vlm.layers[detach_layer].self_attn, vlm.layers[detach_layer].mlp):
                handles.append(block.register_forward_hook(
                    lambda m, a, out: (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()))
        try:
            with _tracked_heads(vlm, heads), _tracked_residuals(vlm, residuals):
                logits = vlm.forward(batch, use_cache=False, logits_to_keep=slot.window(batch)).logits
        finally:
            for h in handles:
                h.remove()
        scores = word_scores(logits, slot.words, indices)
        metrics = [sum((lp[0] if slot.words[i].role == "truth" else -lp[0])
                       for i, (lp, _) in scores.items() if slot.words[i].form == form) for form in forms]
        return metrics, heads, residuals

    with _frozen(vlm.model), torch.enable_grad():
        metrics, heads, residuals = metrics_and_heads(None)
        rows = _gradients(torch.stack(metrics), [[h] for h in heads], [[r] for r in residuals], grad_drop=True)
        for d in range(vlm.n_layers):
            metrics_d, heads_d, _ = metrics_and_heads(d if d else None)  # row 0: nothing dropped
            for f in range(len(forms)):
                expected = torch.autograd.grad(metrics_d[f], heads_d[:d or None], retain_graph=True)
                for (got,), want in zip(rows[d], expected):
                    assert torch.allclose(got[f], want, atol=1e-6)


def test_one_prefix_per_slot_equals_one_forward_per_sequence(split_vlm):
    """Answer words split into pieces give a slot several teacher-forced sequences; running their shared prefix
    once (each continued from its keys and values) gives the estimates of one whole forward and backward per
    sequence, to float32 rounding (the sums at the prefix are taken in another order)."""
    setup = _setup(split_vlm)
    assert any(len(slot.inputs) > 1 for slot in setup.slots)
    for estimator in ESTIMATORS:
        fast, clean_fast = attribution_scores(split_vlm, setup, estimator=estimator)
        naive, clean_naive = attribution_scores(split_vlm, setup, estimator=estimator, shared=False)
        assert clean_fast == pytest.approx(clean_naive, rel=1e-5, abs=1e-5)
        for form in naive:
            scale = float(naive[form].abs().max())
            assert torch.allclose(fast[form], naive[form], rtol=0, atol=1e-5 * scale), (form, fast[form], naive[form])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_a_slot_with_one_sequence_runs_it_whole(vlm):
    """Whole-word tokens give each slot one sequence: the fast path is then the naive one, bit for bit."""
    setup = _setup(vlm)
    assert all(len(slot.inputs) == 1 for slot in setup.slots)
    for estimator in ESTIMATORS:
        fast, clean_fast = attribution_scores(vlm, setup, estimator=estimator)
        naive, clean_naive = attribution_scores(vlm, setup, estimator=estimator, shared=False)
        assert clean_fast == clean_naive
        assert all(torch.equal(fast[form], naive[form]) for form in naive)


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_bad_estimator_and_mode(vlm):
    setup = _setup(vlm)
    with pytest.raises(InputError, match="unknown estimator"):
        attribution_scores(vlm, setup, estimator="ig")
    with pytest.raises(InputError, match="reference-mean"):
        attribution_scores(vlm, setup, mode="reference-mean")
    with pytest.raises(InputError, match="means"):
        attribution_scores(vlm, setup, mode="mean")
