"""The logit lens: the last layer equals the model's logits exactly on every family, and an ablation changes
only the layers from the ablated head's layer on (qwen2_vl)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from halluscope.analysis.lens import layer_logits, logit_lens, summarize_lens
from halluscope.analysis.probabilities import RunPrompt
from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes

ONE = ["qwen2_vl"]


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


@pytest.mark.parametrize("family", ONE)
def test_lens_table_ablation_changes_layers_from_the_heads_layer(vlm):
    image = image_to_png_bytes(_image())
    prompts = [RunPrompt("s-+1", "i0", "+1", "count", image, "Describe the 4 circles in this image.", 3, 4, 4),
               RunPrompt("s-base", "i0", "base", "count", image, "How many circles are in this image?", 3, None, 4)]
    table = logit_lens(vlm, prompts, heads={(1, 2)}, max_new_tokens=6)
    assert set(table["setting"]) == {"baseline", "ablated"}
    assert set(table["layer"]) == set(range(vlm.n_layers))
    assert table["p_truth"].between(0, 1).all() and (table["rank_truth"] >= 1).all()
    assert table.loc[table["condition"] == "base", ["p_claim", "rank_claim"]].isna().all().all()
    keyed = table.set_index(["sample_id", "form", "layer", "setting"])[["p_truth", "p_claim"]]
    base, ablated = keyed.xs("baseline", level="setting"), keyed.xs("ablated", level="setting")
    # ablating a head in layer 1 cannot change what layer 0 outputs, and must change layer 1
    np.testing.assert_array_equal(base.xs(0, level="layer").to_numpy(), ablated.xs(0, level="layer").to_numpy())
    assert not np.allclose(base.xs(1, level="layer")["p_truth"], ablated.xs(1, level="layer")["p_truth"])
    summary = summarize_lens(table)
    assert set(summary["kind"]) == {"misleading", "truthful"}


@pytest.mark.parametrize("family", ONE)
def test_lens_bad_positions(vlm):
    batch = vlm.encode([(_image(), "How many?")])
    with pytest.raises(InputError, match="outside"):
        layer_logits(vlm, batch, positions=[batch.seq_len])
