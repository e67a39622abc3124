"""Attention mass and maps: the recomputed attention rows against eager attention weights on every family
(left padding and GQA included), token classes, the attention-mass table's settings, and the image layouts of
`analysis.maps`. The shares and the attention-mass table run on every family; the maps test on qwen2_vl only."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from halluscope.analysis.attention import (
    SHARE_COLUMNS,
    TOKEN_CLASSES,
    attention_mass,
    attention_shares,
    query_attention,
    summarize_attention,
    token_classes,
)
from halluscope.analysis.maps import attention_maps, decode_weights, grid_values, image_layout
from halluscope.analysis.probabilities import RunPrompt
from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes

ONE = ["qwen2_vl"]
PROMPTS = ("How many circles?", "Describe the 4 circles in this image, please.")


def _image(size=(300, 150), color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(img).ellipse((20, 20, 90, 90), fill=color)
    return img


def _padded(vlm):
    """Two rows of different lengths (a short prompt on a small image first), so the first is left-padded."""
    batch = vlm.encode([(_image((112, 112), (30, 30, 200)), PROMPTS[0]), (_image(), PROMPTS[1])])
    assert not bool(batch.attention_mask[0].all())
    return batch


def _eager_weights(vlm, batch) -> list[torch.Tensor]:
    """Per layer [batch, head, q, k] from eager attention (the self_attn forward hook's output[1])."""
    weights: dict[int, torch.Tensor] = {}
    vlm.model.set_attn_implementation("eager")
    handles = [vlm.attention(l).register_forward_hook(lambda m, a, out, l=l: weights.__setitem__(l, out[1]))
               for l in range(vlm.n_layers)]
    try:
        with torch.inference_mode():
            vlm.forward(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        vlm.model.set_attn_implementation("sdpa")
    return [weights[l] for l in range(vlm.n_layers)]


def test_query_rows_equal_eager_attention_weights(vlm):
    batch = _padded(vlm)
    last = batch.seq_len - 1
    first_image = [spans[0][0] for spans in batch.image_spans]
    positions = [[last, first_image[0]], [last - 2, first_image[1] + 1]]
    ours = query_attention(vlm, batch, positions)
    eager = _eager_weights(vlm, batch)
    assert vlm.model.config._attn_implementation == "sdpa"
    index = torch.tensor(positions)
    rows = torch.arange(len(batch))[:, None]
    for layer in range(vlm.n_layers):
        expected = eager[layer][rows, :, index].transpose(1, 2).float()  # [batch, head, row, key]
        assert ours[layer].shape == expected.shape
        torch.testing.assert_close(ours[layer], expected, atol=1e-5, rtol=0)


def test_token_classes_find_image_prompt_and_padding(vlm):
    batch = _padded(vlm)
    classes = token_classes(vlm, batch, PROMPTS)
    assert torch.equal(classes == TOKEN_CLASSES.index("image"), batch.image_mask.cpu())
    assert torch.equal(classes == -1, ~batch.attention_mask.bool().cpu())
    for row, prompt in enumerate(PROMPTS):
        text_ids = batch.input_ids[row][classes[row] == TOKEN_CLASSES.index("text")]
        assert vlm.tokenizer.decode(text_ids).strip() == prompt
        assert (classes[row] == TOKEN_CLASSES.index("template")).any()  # role tags, BOS, delimiters


def test_shares_are_eager_weights_summed_per_class(vlm):
    batch = _padded(vlm)
    prompt_len = batch.seq_len - 2  # pretend the last two tokens are reply tokens
    positions = [[batch.seq_len - 3, batch.seq_len - 1]] * 2
    classes = token_classes(vlm, batch, PROMPTS, prompt_len=prompt_len)
    assert (classes[:, prompt_len:] == TOKEN_CLASSES.index("reply")).all()
    shares = attention_shares(vlm, batch, positions, classes)  # [batch, layer, head, row, class]
    eager = _eager_weights(vlm, batch)
    for layer in range(vlm.n_layers):
        rows = eager[layer][:, :, positions[0]].float()  # [batch, head, row, key]
        for c in range(len(TOKEN_CLASSES)):
            expected = (rows * (classes == c)[:, None, None, :]).sum(-1)
            torch.testing.assert_close(shares[:, layer, :, :, c], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(shares.sum(-1), torch.ones(shares.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ONE)
def test_bad_query_positions_raise_one_line_errors(vlm):
    batch = _padded(vlm)
    cases = {"shape": [batch.seq_len - 1], "range": [[batch.seq_len], [0]], "pad": [[0], [0]]}
    for what, positions in cases.items():
        with pytest.raises(InputError) as err:
            query_attention(vlm, batch, positions)
        assert "\n" not in str(err.value), what


# ---- the attention-mass table ---------------------------------------------------------------------------


def _prompts() -> list[RunPrompt]:
    image = image_to_png_bytes(_image())
    return [RunPrompt("s-base", "i0", "base", "count", image, "How many circles are in this image?", 1, None, 2),
            RunPrompt("s-+1", "i0", "+1", "count", image, "Describe the 2 circles in this image.", 1, 2, 2)]


def test_attention_mass_ablation_changes_only_layers_after_the_head(vlm):
    table = attention_mass(vlm, _prompts(), {(0, 1)}, max_new_tokens=4)
    assert set(table["setting"]) == {"baseline", "ablated"}
    assert set(table["sample_id"]) == {"s-base", "s-+1"}
    # one row per (layer, head) of every (prompt, setting, query); a one-token reply has no "generated" rows
    n_cells = vlm.n_layers * vlm.n_heads
    for (_, _, query), rows in table.groupby(["sample_id", "setting", "query"]):
        assert len(rows) == n_cells and not rows.duplicated(["layer", "head"]).any()
        assert set(rows["layer"]) == set(range(vlm.n_layers)) and set(rows["head"]) == set(range(vlm.n_heads))
        assert rows["n_queries"].nunique() == 1 and (rows["n_queries"] >= 1).all()
        assert query == "generated" or (rows["n_queries"] == 1).all()
    assert set(table["query"]) >= {"prompt", "answer"}
    shares = table[list(SHARE_COLUMNS)]
    assert ((shares >= 0) & (shares <= 1 + 1e-6)).all().all()
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-5)
    assert (table["image_share"] > 0).all() and (table["text_share"] > 0).all()  # every row sees both
    prompt_rows = table[table["query"] == "prompt"].set_index(["sample_id", "setting", "layer", "head"])
    base = prompt_rows.xs("baseline", level="setting")[list(SHARE_COLUMNS)]
    ablated = prompt_rows.xs("ablated", level="setting")[list(SHARE_COLUMNS)]
    # a head's o_proj edit cannot change its own layer's attention, only the layers after it. Bit-exact when both
    # settings teacher-force replies of the same length; else (the ablated reply is generated under the ablation)
    # the recomputed softmax runs over a different number of masked keys and float sums may round differently.
    generated = table[table["query"] == "generated"].groupby(["sample_id", "setting"])["n_queries"].first()
    for sample_id in ("s-base", "s-+1"):
        lengths = {s: int(generated.get((sample_id, s), 0)) for s in ("baseline", "ablated")}
        same = lengths["baseline"] == lengths["ablated"]
        pd.testing.assert_frame_equal(base.xs((sample_id, 0), level=["sample_id", "layer"]),
                                      ablated.xs((sample_id, 0), level=["sample_id", "layer"]),
                                      check_exact=same, **({} if same else {"rtol": 0, "atol": 1e-6}))
    assert not np.allclose(base.xs(1, level="layer"), ablated.xs(1, level="layer"))
    assert (table.loc[table["query"] == "prompt", "reply_share"] == 0).all()
    twice = pd.concat([table, table.assign(sample_id=table["sample_id"] + "-b",
                                           image_share=table["image_share"] + 0.2)])
    summary = summarize_attention(twice)
    assert len(summary) == len(table) and (summary["n"] == 2).all()
    keys = ["condition", "setting", "query", "layer", "head"]
    merged = summary.merge(table, on=keys, suffixes=("", "_one"))
    np.testing.assert_allclose(merged["image_share"], merged["image_share_one"] + 0.1, atol=1e-9)


# ---- image layouts and maps -----------------------------------------------------------------------------


def test_image_layout_places_every_image_token_once(vlm):
    img = _image((300, 150))
    batch = vlm.encode([(img, PROMPTS[0])])
    grids = image_layout(vlm, batch, 0, img.size)
    n_image = int(batch.image_mask[0].sum())
    tokens = [t for g in grids for t in g.tokens]
    assert len(tokens) == len(set(tokens)) and all(0 <= t < n_image for t in tokens)
    assert all(len(g.tokens) == g.rows * g.cols for g in grids)
    uncovered = n_image - len(tokens)
    if vlm.family.name == "llava_onevision":  # one newline token per high-res row (or one after the base tile)
        assert uncovered == (grids[1].rows if len(grids) > 1 else 1)
        if len(grids) > 1:
            assert grids[1].cols > grids[1].rows  # a wide image gives a wide grid
    else:
        assert uncovered == 0
    if vlm.family.name.startswith("qwen"):
        assert grids[0].cols > grids[0].rows
    left, top, right, bottom = grids[0].box
    if vlm.family.name == "janus":  # padded to a square: the box reaches above and below the wide image
        assert (left, right) == (0.0, 1.0) and top < 0 < 1 < bottom
    if vlm.family.name == "llava":  # centre crop of the wide image
        assert 0 < left < right < 1 and (top, bottom) == (0.0, 1.0)


@pytest.mark.parametrize("family", ["idefics3"])
def test_idefics_crops_are_placed_by_their_row_col_tokens(vlm):
    split = copy.copy(vlm)
    split.processor = copy.deepcopy(vlm.processor)
    split.processor.image_processor.do_image_splitting = True
    split.processor.image_processor.size = {"longest_edge": 448}
    img = _image((300, 150))
    grids = image_layout(split, split.encode([(img, PROMPTS[0])]), 0, img.size)
    assert [(g.panel, g.box) for g in grids] == [("crops", (0.0, 0.0, 0.5, 1.0)), ("crops", (0.5, 0.0, 1.0, 1.0)),
                                                 ("global", (0.0, 0.0, 1.0, 1.0))]
    assert [g.tokens[0] for g in grids] == [0, 49, 98]


@pytest.mark.parametrize("family", ONE)
def test_attention_maps_store_the_rows_of_the_chosen_heads(vlm):
    prompt = _prompts()[1]
    table = attention_maps(vlm, [prompt], {(1, 3), (0, 1)})
    assert list(zip(table["layer"], table["head"])) == [(0, 1), (1, 3)]
    batch = vlm.encode([(prompt.image, prompt.prompt)])
    rows = query_attention(vlm, batch, [[batch.seq_len - 1]])
    for record in table.to_dict("records"):
        expected = rows[record["layer"]][0, record["head"], 0].numpy()
        np.testing.assert_allclose(decode_weights(record), expected, atol=1e-3)  # float16 storage
        on_grid = sum(float(v.sum()) for _, v in grid_values(record))
        assert on_grid == pytest.approx(record["image_share"], abs=1e-3)
    with pytest.raises(InputError, match="out of range"):
        attention_maps(vlm, [prompt], {(5, 0)})
