"""One rule for where a reply ends (its first EOS or pad token), shared by eval, sweeps and ablations: a reply's
text, its token ids and its outcome agree row by row, also for a model that emits its pad token mid-reply."""

from __future__ import annotations

import pytest
import torch

from halluscope.evaluation import classify, evaluate
from halluscope.tasks import synthetic_counting


def _pad_emitting_model(tiny_dirs):
    """The tiny Qwen2-VL with the pad token's output row set to 1.5x that of a token it emits early in its
    replies: wherever that token would win (with a positive logit), pad wins, and decoding goes on after it."""
    from halluscope import load_vlm

    vlm = load_vlm(tiny_dirs["qwen2_vl"])
    samples = synthetic_counting(5, size=112, seed=0)[:15]
    first = vlm.generate_ids(vlm.encode([(samples[0].image, samples[0].prompt)]), max_new_tokens=4)[0].tolist()
    with torch.no_grad():
        weight = vlm.lm_head.weight
        weight[vlm.tokenizer.pad_token_id] = 1.5 * weight[first[2]]
    return vlm, samples


def test_reply_text_ids_and_outcome_agree_when_pad_comes_before_eos(tiny_dirs):
    vlm, samples = _pad_emitting_model(tiny_dirs)
    raw = vlm.generate_ids(vlm.encode([(s.image, s.prompt) for s in samples]), max_new_tokens=12).tolist()
    pad = vlm.tokenizer.pad_token_id
    assert sum(pad in row and any(t not in vlm.end_token_ids for t in row[row.index(pad):]) for row in raw) >= 3
    table = evaluate(vlm, samples, max_new_tokens=12, batch_size=5)
    for sample, row in zip(samples, table.itertuples()):
        ids = list(row.reply_ids)
        text = vlm.tokenizer.decode(ids[:-1] if ids and ids[-1] in vlm.end_token_ids else ids,
                                    skip_special_tokens=True).strip()
        assert row.reply == text
        assert row.outcome == classify(sample, text)[1]


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_decode_stops_at_the_first_end_token(vlm):
    pad = vlm.tokenizer.pad_token_id
    word = vlm.tokenizer(" circles", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([word + [pad] + word, word + word + word])
    assert vlm.decode(ids) == [vlm.tokenizer.decode(word).strip(), vlm.tokenizer.decode(word * 3).strip()]
