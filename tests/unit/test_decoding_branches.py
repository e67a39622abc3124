"""Second branches decode as extra rows of the real rows' forwards, each exactly as if run alone: at every step,
every branch's logits equal one full forward (no cache, no padding, no other rows) of that branch's own input,
on every family, in a batch of prompts of unequal length; teacher-forced continuations likewise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from halluscope.decoding import decode_ids
from halluscope.decoding.branches import SourcedBatch, branch_batch, encode_text
from halluscope.decoding.methods.base import DecodingMethod
from halluscope.sweep.slot import append_tokens
from halluscope.tasks.scenes import count_scene

PAIRS = [(count_scene(3, "circle", size=112, seed=1), "How many circles?"),
         (count_scene(5, "star", size=112, seed=2), "Describe the 7 stars in this image, one by one.")]


def _noised(image: Image.Image) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 60, (image.height, image.width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# one builder per kind of branch: perturbed image, augmented image, no image, disturbance instruction
BRANCHES = {
    "perturbed": lambda pairs: [(_noised(image), prompt) for image, prompt in pairs],
    "augmented": lambda pairs: [(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), prompt) for image, prompt in pairs],
    "no-image": lambda pairs: [(None, prompt) for _, prompt in pairs],
    "disturbed": lambda pairs: [(image, f"You are a confused object detector. {prompt}") for image, prompt in pairs],
}


class _Recorder(DecodingMethod):
    """Every branch of BRANCHES beside the real rows; records each step's logits and follows the real rows."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[torch.Tensor]] = []

    def branches(self, vlm, batch):
        return [branch_batch(vlm, build(batch.pairs)) for build in BRANCHES.values()]

    def step_logits(self, context):
        self.seen.append([logits.clone() for logits in context.logits])
        return context.logits[0]


def test_every_branch_equals_its_own_full_forward_at_every_step(vlm):
    encoded = vlm.encode(PAIRS)
    batch = SourcedBatch(encoded.inputs, encoded.image_mask, encoded.image_spans, pairs=PAIRS)
    recorder = _Recorder()
    tokens = decode_ids(vlm, batch, recorder, max_new_tokens=6).tolist()
    inputs = [PAIRS, *(build(PAIRS) for build in BRANCHES.values())]
    assert len(recorder.seen) == len(tokens[0])
    for b, pairs in enumerate(inputs):
        for r, pair in enumerate(pairs):
            alone = branch_batch(vlm, [pair])
            for step, seen in enumerate(recorder.seen):
                full = append_tokens(alone, tokens[r][:step])
                with torch.inference_mode():
                    expected = vlm.model(**full.inputs).logits[0, -1]
                torch.testing.assert_close(seen[b][r], expected, atol=1e-4, rtol=0,
                                           msg=f"branch {b} row {r} step {step}")


def test_branch_rows_reuse_the_real_rows_keys_over_their_common_prefix(vlm):
    """A branch with the same image continues from the real rows' cache past the image (no second vision pass);
    a text-only branch shares the text before the image; a changed image shares nothing (its tokens come after
    text the real rows share, but its image tokens need their own vision pass). The first test checks the
    logits of every such branch against full forwards."""
    from halluscope.decoding.branches import shared_prefixes

    encoded = vlm.encode(PAIRS)
    batch = SourcedBatch(encoded.inputs, encoded.image_mask, encoded.image_spans, pairs=PAIRS)
    disturbed = shared_prefixes(vlm, batch, branch_batch(vlm, BRANCHES["disturbed"](PAIRS)))
    no_image = shared_prefixes(vlm, batch, branch_batch(vlm, BRANCHES["no-image"](PAIRS)))
    for r in range(len(PAIRS)):
        image_columns = batch.image_mask[r][batch.attention_mask[r].bool()].nonzero().flatten()
        assert disturbed[r] > int(image_columns[-1])
        assert no_image is None or no_image[r] <= int(image_columns[0])
    assert shared_prefixes(vlm, batch, branch_batch(vlm, BRANCHES["perturbed"](PAIRS))) is None


def test_a_branch_image_with_the_same_raw_bytes_but_other_colours_is_not_shared(vlm):
    """Two palette images with the same indices and different palettes are different pictures: a branch of the
    second image may share only the text before the image."""
    from halluscope.decoding.branches import shared_prefixes

    indices = np.arange(112 * 112, dtype=np.uint8).reshape(112, 112) % 4
    first, second = (Image.fromarray(indices, mode="P") for _ in range(2))
    first.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    second.putpalette([255, 255, 255, 0, 0, 255, 0, 255, 0, 255, 0, 0] + [0] * 756)
    assert first.tobytes() == second.tobytes()
    pairs = [(first, "How many circles?")]
    encoded = vlm.encode(pairs)
    batch = SourcedBatch(encoded.inputs, encoded.image_mask, encoded.image_spans, pairs=pairs)
    image_start = int(batch.image_mask[0][batch.attention_mask[0].bool()].nonzero()[0])
    same = shared_prefixes(vlm, batch, branch_batch(vlm, [(first.copy(), "Be vague. How many circles?")]))
    assert same is not None and same[0] > image_start
    assert shared_prefixes(vlm, batch, branch_batch(vlm, [(second, "Be vague. How many circles?")])) is None


class _EarlyRecorder(_Recorder):
    """The disturbed branch beside the real rows, and the real rows' early exits at hidden states 0 and 1."""

    def branches(self, vlm, batch):
        return [branch_batch(vlm, BRANCHES["disturbed"](batch.pairs))]

    def early_exit(self, vlm):
        return [0, 1]

    def step_logits(self, context):
        self.seen.append([context.logits[0].clone(), context.early.clone()])
        return context.logits[0]


@pytest.mark.parametrize("mean", [False, True])
def test_early_exits_read_out_with_the_final_logits_equal_a_full_forward_at_every_step(vlm, mean):
    """The loop reads a method's early-exit layers out in the final lm_head call: each real row's final and
    early-exit logits (or, for a method that reads only their mean, the mean) equal lm_head(norm(h_j)) of its own
    full forward, at the prefill and every later step."""
    encoded = vlm.encode(PAIRS)
    batch = SourcedBatch(encoded.inputs, encoded.image_mask, encoded.image_spans, pairs=PAIRS)
    recorder = _EarlyRecorder()
    recorder.early_exit_mean = mean
    tokens = decode_ids(vlm, batch, recorder, max_new_tokens=4).tolist()
    assert recorder.seen[0][1].shape == (1 if mean else 2, len(PAIRS), vlm.lm_head.out_features)
    for r, pair in enumerate(PAIRS):
        alone = vlm.encode([pair])
        for step, (final, early) in enumerate(recorder.seen):
            with torch.inference_mode():
                out = vlm.model(**append_tokens(alone, tokens[r][:step]).inputs, output_hidden_states=True)
                exits = torch.stack([vlm.lm_head(vlm.norm(out.hidden_states[j][0, -1])).float() for j in (0, 1)])
            torch.testing.assert_close(final[r], out.logits[0, -1], atol=1e-4, rtol=0, msg=f"row {r} step {step}")
            torch.testing.assert_close(early[:, r], exits.mean(0, keepdim=True) if mean else exits, atol=1e-4,
                                       rtol=0, msg=f"row {r} step {step}")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_no_image_branch_gets_text_only_mrope_positions(vlm):
    """A text-only row's 3-D positions count 0, 1, 2, ... in every component, from its own first token."""
    from halluscope.decoding.branches import prefill_positions

    batch = encode_text(vlm, ["How many circles?", "Describe the 7 stars in this image, one by one."])
    positions = prefill_positions(vlm, batch)
    assert positions.shape == (3, 2, batch.seq_len)
    for row in range(2):
        n = int(batch.attention_mask[row].sum())
        assert positions[:, row, -n:].tolist() == [list(range(n))] * 3


def test_every_branch_is_wrapped_in_the_chat_template(vlm):
    """The no-image branch renders the same user turn as `VLM.render`, minus the image part."""
    text = vlm.tokenizer.decode(encode_text(vlm, ["How many circles?"]).input_ids[0], skip_special_tokens=False)
    rendered = vlm.render("How many circles?")
    tail = rendered[rendered.index("How many circles?"):]
    assert text.rstrip().endswith(tail.rstrip())
    assert vlm.image_token_id not in encode_text(vlm, ["How many circles?"]).input_ids[0].tolist()


def test_scored_continuations_equal_full_forwards_at_every_position(vlm):
    """`Rows.score` teacher-forces k tokens per row after one prefill, rows copied by `select` (the self-check
    continues two answers from each prompt): the logits after every fed token equal one full forward of that
    row's prompt and tokens, for prompts of unequal length."""
    from halluscope.decoding.branches import Rows

    rows, _, _ = Rows.prefill(vlm, [vlm.encode(PAIRS)], 3)
    words = vlm.reply_token_ids("Three red circles, a blue star and two squares.")
    assert len(words) >= 6
    fed = torch.tensor([words[:3], words[3:6], words[1:4], words[2:3] * 3], device=vlm.device)
    logits = rows.select(torch.tensor([0, 1, 0, 1])).score(vlm, fed)
    assert logits.shape == (4, 3, vlm.lm_head.out_features)
    for row, tokens in enumerate(fed.tolist()):
        full = append_tokens(vlm.encode([PAIRS[row % 2]]), tokens)
        with torch.inference_mode():
            expected = vlm.model(**full.inputs).logits[0, -3:]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=0, msg=f"row {row}")
