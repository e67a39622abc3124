"""The adapter contract every family must meet: shapes, image spans, batching exactness, save/load,
hook shapes, awkward real-world images, and one-line errors for bad input."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from halluscope.errors import HalluscopeError
from halluscope.models import load_vlm

PROMPTS = ["How many circles are in this image?", "What color is the square?", "Describe the 7 stars in this image."]


def _images():
    return [Image.new("RGB", (224, 224), (200, 10, 10)), Image.new("RGB", (300, 200), (10, 200, 10)),
            Image.new("RGB", (180, 240), (10, 10, 200))]


def test_sizes_come_from_the_config(vlm):
    text = vlm.text_config
    assert (vlm.n_layers, vlm.n_heads, vlm.n_kv_heads, vlm.head_dim) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert vlm.n_kv_heads < vlm.n_heads  # tiny configs keep grouped-query attention
    assert len(vlm.layers) == vlm.n_layers
    assert vlm.o_proj(0).in_features == vlm.n_heads * vlm.head_dim
    assert vlm.lm_head.out_features == vlm.model.config.get_text_config().vocab_size
    assert vlm.vision_tower is not None and vlm.norm is not None


def test_encode_forward_generate_shapes(vlm):
    batch = vlm.encode(list(zip(_images(), PROMPTS)))
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.image_mask.shape
    assert len(batch) == 3
    # left padding: every row ends on a real token
    assert bool(batch.attention_mask[:, -1].all())
    logits = vlm.forward(batch).logits
    assert logits.shape[:2] == batch.input_ids.shape
    replies = vlm.generate(batch, max_new_tokens=5)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)
    assert vlm.generate_ids(batch, max_new_tokens=5).shape[0] == 3


def test_image_spans_are_exactly_where_the_model_puts_image_features(vlm):
    """Positions whose decoder input differs from the token embedding are exactly the image spans."""
    batch = vlm.encode(list(zip(_images(), PROMPTS)))
    seen = {}

    def capture(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = vlm.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        vlm.forward(batch)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = vlm.embed_tokens(batch.input_ids)
    replaced = (seen["h"] - plain).abs().amax(-1) > 0
    assert torch.equal(replaced, batch.image_mask)
    for row in range(len(batch)):
        covered = torch.zeros(batch.seq_len, dtype=torch.bool)
        for start, end in batch.image_spans[row]:
            covered[start:end] = True
        assert torch.equal(covered, batch.image_mask[row])
        assert int(batch.image_mask[row].sum()) > 0


def test_batch_equals_rows_alone(vlm):
    pairs = list(zip(_images(), PROMPTS))
    batch = vlm.encode(pairs)
    logits = vlm.forward(batch).logits
    replies = vlm.generate(batch, max_new_tokens=8)
    for i, pair in enumerate(pairs):
        alone = vlm.encode([pair])
        single = vlm.forward(alone).logits[0]
        torch.testing.assert_close(logits[i, -single.shape[0]:], single, atol=1e-5, rtol=0)
        assert vlm.generate(alone, max_new_tokens=8) == [replies[i]]


def test_save_load_round_trip_gives_identical_logits(vlm, tmp_path):
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    again = load_vlm(tmp_path)
    pairs = list(zip(_images(), PROMPTS))
    a, b = vlm.encode(pairs), again.encode(pairs)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(vlm.forward(a).logits, again.forward(b).logits)


def test_o_proj_pre_hook_sees_heads_concatenated(vlm):
    batch = vlm.encode(list(zip(_images(), PROMPTS)))
    shapes = []
    handle = vlm.o_proj(vlm.n_layers - 1).register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    try:
        vlm.forward(batch)
    finally:
        handle.remove()
    assert shapes == [torch.Size([3, batch.seq_len, vlm.n_heads * vlm.head_dim])]


def _exif_rotated_jpeg() -> bytes:
    img = Image.new("RGB", (120, 60), (250, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("name,image", [
    ("rgba", Image.new("RGBA", (100, 80), (255, 0, 0, 128))),
    ("greyscale", Image.new("L", (90, 90), 128)),
    ("tiny", Image.new("RGB", (8, 8), (0, 0, 255))),
    ("very_wide", Image.new("RGB", (2000, 50), (0, 255, 0))),
    ("exif_jpeg", _exif_rotated_jpeg()),
])
def test_real_world_images(vlm, name, image):
    batch = vlm.encode([(image, "What color is the square?")])
    assert int(batch.image_mask.sum()) > 0
    assert torch.isfinite(vlm.forward(batch).logits).all()


def test_exif_orientation_is_applied():
    from halluscope.images import open_image

    assert open_image(_exif_rotated_jpeg()).size == (60, 120)


def test_answer_token_ids_match_what_the_model_would_emit(vlm):
    ids = vlm.answer_token_ids(7)
    assert set(ids) == {"digit", "word"} and all(ids.values())
    prefix = vlm.render("x")
    text = vlm.tokenizer.decode(ids["digit"])
    assert text.strip() == "7"
    full = vlm.tokenizer(prefix + vlm.family.reply_separator + "7", add_special_tokens=False)["input_ids"]
    assert full[-len(ids["digit"]):] == ids["digit"]
    assert vlm.tokenizer.decode(vlm.answer_token_ids("red")["word"]).strip() == "red"


# ---- errors -------------------------------------------------------------------------------------------
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, HalluscopeError)
    return msg


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_bad_inputs_raise_one_line_errors(vlm, tmp_path):
    with pytest.raises(HalluscopeError) as e:
        vlm.encode([(tmp_path / "missing.png", "hi")])
    assert "not found" in _one_line(e)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(HalluscopeError) as e:
        vlm.encode([(corrupt, "hi")])
    assert "cannot decode" in _one_line(e)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(HalluscopeError) as e:
        vlm.encode([(text_file, "hi")])
    assert "cannot decode" in _one_line(e)
    with pytest.raises(HalluscopeError) as e:
        vlm.encode([])
    assert "empty" in _one_line(e)
    with pytest.raises(HalluscopeError) as e:
        vlm.encode([(None, "Describe the dogs.")])
    assert "no image" in _one_line(e)


def test_unknown_model_type_and_missing_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HalluscopeError) as e:
        load_vlm(tmp_path)
    assert "Supported:" in _one_line(e)
    with pytest.raises(HalluscopeError) as e:
        load_vlm(tmp_path / "nope")
    assert "not found" in _one_line(e)


def test_unreachable_hub_says_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HalluscopeError) as e:
        load_vlm("Qwen/Qwen2-VL-7B-Instruct")
    assert "local directory" in _one_line(e)
