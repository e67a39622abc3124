"""The logit lens: the last layer equals the model's logits exactly on every family, and an ablation changes
only the layers from the ablated head's layer on (every tiny family)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from halluscope.analysis.lens import layer_logits, logit_lens, summarize_lens
from halluscope.analysis.probabilities import RunPrompt, answer_setup
from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes
from halluscope.interventions.heads import HeadIntervention, intervene
from halluscope.sweep.slot import append_tokens


def _image(size=(224, 224)) -> Image.Image:
    img = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(img).ellipse((40, 40, 120, 120), fill=(200, 30, 30))
    return img


def test_last_layer_lens_equals_the_models_logits(vlm):
    batch = vlm.encode([(_image((112, 112)), "How many?"), (_image(), "Describe the 4 circles in this image.")])
    lens = layer_logits(vlm, batch, positions=-1)  # [batch, layer, 1, vocab]
    assert lens.shape[:3] == (2, vlm.n_layers, 1)
    with torch.inference_mode():  # logits_to_keep=1: the model's head on the same [batch, 1, hidden] shape
        logits = vlm.forward(batch, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    assert torch.equal(lens[:, -1, 0], logits)
    assert not torch.allclose(lens[:, 0, 0], lens[:, -1, 0])  # layers differ: the hooks are per layer


def test_lens_table_ablation_changes_layers_from_the_heads_layer(vlm):
    image = image_to_png_bytes(_image())
    prompts = [RunPrompt("s-+1", "i0", "+1", "count", image, "Describe the 4 circles in this image.", 3, 4, 4),
               RunPrompt("s-base", "i0", "base", "count", image, "How many circles are in this image?", 3, None, 4)]
    heads = {(1, 2)}
    table = logit_lens(vlm, prompts, heads=heads, max_new_tokens=4)
    assert set(table["sample_id"]) == {"s-+1", "s-base"}  # neither prompt skipped
    assert set(table["setting"]) == {"baseline", "ablated"}
    assert set(table["layer"]) == set(range(vlm.n_layers))
    for _, rows in table.groupby(["sample_id", "setting"]):  # one row per (form, layer)
        assert len(rows) == rows["form"].nunique() * vlm.n_layers
        assert not rows.duplicated(["form", "layer"]).any()
    vocab = vlm.lm_head.out_features
    assert table["p_truth"].between(0, 1).all() and table["rank_truth"].between(1, vocab).all()
    misleading = table[table["condition"] == "+1"]
    assert misleading["p_claim"].between(0, 1).all() and misleading["rank_claim"].between(1, vocab).all()
    assert table.loc[table["condition"] == "base", ["p_claim", "rank_claim"]].isna().all().all()
    keyed = table.set_index(["sample_id", "form", "layer", "setting"])[["p_truth", "p_claim"]]
    base, ablated = keyed.xs("baseline", level="setting"), keyed.xs("ablated", level="setting")
    # ablating a head in layer 1 cannot change what layer 0 outputs (same context, same computation: exact),
    # and must change layer 1
    np.testing.assert_array_equal(base.xs(0, level="layer").to_numpy(), ablated.xs(0, level="layer").to_numpy())
    assert not np.allclose(base.xs(1, level="layer")["p_truth"], ablated.xs(1, level="layer")["p_truth"])
    # the last layer's lens is the model's own answer-slot distribution, baseline and ablated, bit for bit
    last = vlm.n_layers - 1
    for slot in answer_setup(vlm, prompts[0], max_new_tokens=4).slots:
        words = {(w.form, w.role): w.ids for w in slot.words}
        for setting, knockout in (("baseline", False), ("ablated", True)):
            def word_probability(ids) -> float:  # the model's own probability of the whole word
                edit = intervene(vlm, HeadIntervention(heads, mode="zero")) if knockout else nullcontext()
                with edit, torch.inference_mode():
                    logits = vlm.forward(append_tokens(slot.batch, ids[:-1]), use_cache=False).logits[0, -len(ids):]
                logp = logits.float().log_softmax(-1)
                return math.exp(sum(float(logp[j, t]) for j, t in enumerate(ids)))

            for form in slot.forms():
                row = keyed.loc[("s-+1", form, last, setting)]
                assert row["p_truth"] == pytest.approx(word_probability(words[form, "truth"]), rel=1e-4)
                assert row["p_claim"] == pytest.approx(word_probability(words[form, "claim"]), rel=1e-4)
    summary = summarize_lens(table)
    assert set(summary["kind"]) == {"misleading", "truthful"}
    assert (summary.groupby(["kind", "setting", "form"])["layer"].nunique() == vlm.n_layers).all()


def test_lens_bad_positions(vlm):
    batch = vlm.encode([(_image(), "How many?")])
    with pytest.raises(InputError, match="outside"):
        layer_logits(vlm, batch, positions=[batch.seq_len])
