"""Attention-score edits (PAI, ClearSight) through the attention-function interface: the edit sees exactly each
row's image-token columns, an identity edit equals the model's own sdpa attention, and a boost changes the
logits and leaves the model's attention implementation as it was."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from halluscope.decoding import build_method, decode_ids
from halluscope.decoding.attention import ScoreEdit, score_edit
from halluscope.decoding.methods.base import DecodingMethod
from halluscope.tasks.scenes import count_scene

PAIRS = [(count_scene(3, "circle", size=112, seed=1), "How many circles?"),
         (count_scene(5, "star", size=112, seed=2), "Describe the 7 stars in this image, one by one.")]


class _Recorded(DecodingMethod):
    """`inner`'s edits, plus (with `edit`) a score edit in every layer; records the real rows' logits and the
    columns the edit is shown."""

    name = "recorded"

    def __init__(self, inner: DecodingMethod | None = None, edit=None) -> None:
        super().__init__()
        self.inner, self.edit, self.seen, self.logits = inner or DecodingMethod(), edit, [], []

    @contextmanager
    def applied(self, vlm, batch):
        def recorded(scores, image, system):
            self.seen.append((scores.shape, image.clone(), system.clone()))
            return self.edit(scores, image, system)

        with self.inner.applied(vlm, batch):
            if self.edit is None:
                yield
                return
            with score_edit(vlm, ScoreEdit(frozenset(range(vlm.n_layers)), recorded)):
                yield

    def step_logits(self, context):
        self.logits.append(context.logits[0].clone())
        return context.logits[0]


def test_edit_sees_each_rows_image_columns_and_identity_equals_sdpa(vlm):
    batch = vlm.encode(PAIRS)
    plain = _Recorded()
    expected = decode_ids(vlm, batch, plain, max_new_tokens=4)
    method = _Recorded(edit=lambda scores, image, system: scores)
    assert torch.equal(decode_ids(vlm, batch, method, max_new_tokens=4), expected)
    for got, want in zip(method.logits, plain.logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    n_image = batch.image_mask.sum(1).tolist()
    for shape, image, system in method.seen:
        assert image.shape == (shape[0], shape[-1])
        assert image.sum(1).tolist() == n_image  # every image token, in the cache's own column layout
        first = image.long().argmax(1)
        assert all(not system[r, first[r]:].any() for r in range(2))  # system text lies before the image
    assert torch.equal(method.seen[0][1], batch.image_mask)  # the prefill's columns are the batch's own


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_pai_boost_changes_the_logits_and_restores_the_attention(vlm):
    batch = vlm.encode(PAIRS)
    before = vlm.text_config._attn_implementation
    boosted = _Recorded(build_method("pai", alpha=5.0, gamma=1.0, start_layer=0))
    plain = _Recorded()
    decode_ids(vlm, batch, boosted, max_new_tokens=2)
    decode_ids(vlm, batch, plain, max_new_tokens=2)
    assert (boosted.logits[0] - plain.logits[0]).abs().max() > 1e-3
    assert vlm.text_config._attn_implementation == before
