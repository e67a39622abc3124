"""Attribution patching: the first-order estimate is the knockout's derivative (checked against exact small
edits on every family), it is exact where the metric is linear in the edited head, and the estimator sweep
writes estimates and exactly verified rows side by side."""

from __future__ import annotations

import pytest
import torch

from halluscope.errors import InputError
from halluscope.sweep.attribution import attribution_scores
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
    """The dropped-layer gradients computed from the full backward equal a plain backward through a model whose
    layer d's blocks are detached (their output kept, their gradient cut)."""
    from halluscope.sweep.attribution import _frozen, _gradients, _tracked_heads, _tracked_residuals
    from halluscope.sweep.slot import word_scores

    setup = _setup(vlm)
    slot, batch, indices = setup.inputs()[0]

    def metric_and_heads(detach_layer: int | None):
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
        metric = sum((lp[0] if slot.words[i].role == "truth" else -lp[0])
                     for i, (lp, _) in scores.items() if slot.words[i].form == "digit")
        return metric, heads, residuals

    with _frozen(vlm.model), torch.enable_grad():
        metric, heads, residuals = metric_and_heads(None)
        rows = _gradients(metric, heads, residuals, grad_drop=True, keep_graph=False)
        for d in range(1, vlm.n_layers):
            metric_d, heads_d, _ = metric_and_heads(d)
            expected = torch.autograd.grad(metric_d, heads_d[:d])
            for got, want in zip(rows[d], expected):
                assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_bad_estimator_and_mode(vlm):
    setup = _setup(vlm)
    with pytest.raises(InputError, match="unknown estimator"):
        attribution_scores(vlm, setup, estimator="ig")
    with pytest.raises(InputError, match="reference-mean"):
        attribution_scores(vlm, setup, mode="reference-mean")
    with pytest.raises(InputError, match="means"):
        attribution_scores(vlm, setup, mode="mean")
