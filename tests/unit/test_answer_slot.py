"""The answer slot is the first token of the reply's answer word, and truth and claim are scored there as whole
words: checked against a naive full-forward computation on tokenizers that split answer words into 2-4 pieces
(tiny models of every family; the organism's, which splits " white" into ' ', 'w', 'hi', 't', 'e')."""

from __future__ import annotations

import pytest
import torch

from halluscope.evaluation import evaluate
from halluscope.sweep.engine import SweepItem, naive_score, prepare_score, score_prompt
from halluscope.tasks.scenes import color_scene, count_scene

NOOP = dict(mode="scale", alpha=1.0)  # a knockout that changes nothing: scores the clean model


def _count_item(vlm, reply: str) -> SweepItem:
    return SweepItem("s0", count_scene(4, "circle", size=112, seed=1), "Describe the 7 circles in this image.", 4, 7,
                     reply_ids=tuple(vlm.reply_token_ids(reply)))


def _colour_item(vlm, reply: str) -> SweepItem:
    return SweepItem("c0", color_scene("red", "square", size=112, seed=1), "Describe the blue square.", "red",
                     "blue", task="color", reply_ids=tuple(vlm.reply_token_ids(reply)))


def _naive_word_logprob(vlm, item: SweepItem, context: str, word: str) -> tuple[float, list[int], bool]:
    """log p(word | prompt, context) by one full forward over the whole text, the word's tokens, and whether
    greedy decoding from the context spells it; derived from the texts alone, not from the engine."""
    before = vlm.reply_token_ids(context)
    full = vlm.reply_token_ids(f"{context} {word}")
    assert full[: len(before)] == before
    ids = full[len(before):]
    batch = vlm.encode([(item.image, item.prompt)])
    tokens = torch.tensor([full], dtype=batch.input_ids.dtype)
    inputs = dict(batch.inputs, input_ids=torch.cat([batch.input_ids, tokens], 1),
                  attention_mask=torch.cat([batch.attention_mask, torch.ones_like(tokens)], 1))
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
    with torch.inference_mode():
        logits = vlm.model(**inputs, use_cache=False).logits[0].float()
    start = batch.seq_len + len(before) - 1  # the position that predicts the word's first token
    window = logits[start:start + len(ids)]
    logp = sum(float(window[j].log_softmax(-1)[t]) for j, t in enumerate(ids))
    return logp, ids, bool((window.argmax(-1) == torch.tensor(ids)).all())


CASES = [  # (task, reply, context before the answer word, truth word per form, claim word per form)
    ("count", "There are seven circles.", "There are", {"digit": "4", "word": "four"}, {"digit": "7", "word": "seven"}),
    ("color", "The square is blue.", "The square is", {"word": "red"}, {"word": "blue"}),
]


@pytest.mark.parametrize("task,reply,context,truths,claims", CASES)
def test_split_words_are_scored_whole_from_their_first_token(split_vlm, task, reply, context, truths, claims):
    item = (_count_item if task == "count" else _colour_item)(split_vlm, reply)
    setup = prepare_score(split_vlm, item, max_new_tokens=12)
    words = {(w.form, w.role): w for slot in setup.slots for w in slot.words}
    assert max(len(w.ids) for w in words.values()) >= 2  # the tokenizer does split answer words
    result = score_prompt(split_vlm, setup, [(0, 0)], **NOOP)[0]
    outcomes = set()
    for form in truths:
        lp_truth, ids_truth, spells_truth = _naive_word_logprob(split_vlm, item, context, truths[form])
        lp_claim, ids_claim, spells_claim = _naive_word_logprob(split_vlm, item, context, claims[form])
        assert list(words[form, "truth"].ids) == ids_truth and list(words[form, "claim"].ids) == ids_claim
        assert result[f"tokens_truth_{form}"] == len(ids_truth) and result[f"tokens_claim_{form}"] == len(ids_claim)
        assert result[f"logit_diff_{form}"] == pytest.approx(lp_truth - lp_claim, abs=1e-4)
        outcomes.add("corrected" if spells_truth else "copied" if spells_claim else "other")
    rank = ["other", "copied", "corrected"]
    assert result["outcome"] == max(outcomes, key=rank.index)
    for slot in setup.slots:  # the forced reply stops before the answer word
        forced = split_vlm.tokenizer.decode(slot.batch.input_ids[0, setup.prompt_len:], skip_special_tokens=True)
        assert f"{context} ".startswith(forced.lstrip()) and forced.strip() == context


@pytest.mark.parametrize("batch_size", [1, 3])
def test_split_words_knockouts_equal_the_naive_loop(split_vlm, batch_size):
    item = _count_item(split_vlm, "There are seven circles.")
    setup = prepare_score(split_vlm, item, max_new_tokens=12)
    heads = [(l, h) for l in range(split_vlm.n_layers) for h in range(split_vlm.n_heads)]
    fast, slow = score_prompt(split_vlm, setup, heads, batch_size=batch_size), naive_score(split_vlm, setup, heads)
    for f, s in zip(fast, slow):
        assert f["outcome"] == s["outcome"]
        for key in (k for k in s if k.startswith("logit_diff")):
            assert f[key] == pytest.approx(s[key], abs=1e-4)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_one_token_words_score_the_logit_difference_at_the_slot(vlm):
    """With whole-word tokens (the default tiny tokenizer) the score is the plain logit difference, as before."""
    item = _count_item(vlm, "There are seven circles.")
    setup = prepare_score(vlm, item, max_new_tokens=12)
    (slot,) = setup.slots
    assert all(len(w.ids) == 1 for w in slot.words)
    with torch.inference_mode():
        logits = vlm.forward(slot.batch, use_cache=False).logits[0, -1].float()
    result = score_prompt(vlm, setup, [(0, 0)], **NOOP)[0]
    words = {(w.form, w.role): w.ids[0] for w in slot.words}
    for form in ("digit", "word"):
        expected = float(logits[words[form, "truth"]] - logits[words[form, "claim"]])
        assert result[f"logit_diff_{form}"] == pytest.approx(expected, abs=1e-4)
        assert result[f"tokens_truth_{form}"] == result[f"tokens_claim_{form}"] == 1


def test_organism_slot_and_outcome_follow_its_replies():
    """On the organism, whose tokenizer splits colour and number words, the forced reply is the clean reply's
    text before its answer word, and the unedited score-mode outcome is the clean reply's own outcome."""
    from halluscope import load_vlm, tasks

    vlm = load_vlm("organism")
    counting = [s for s in tasks.synthetic_counting(3, size=112, seed=0)
                if s.claim is not None and s.claim != s.truth][:8]
    colour = [s for s in tasks.synthetic_color(3, size=112, seed=0) if s.claim is not None and s.claim != s.truth][:8]
    rows = [(sample, row) for samples in (counting, colour)
            for sample, row in zip(samples, evaluate(vlm, samples, max_new_tokens=12, batch_size=16).itertuples())]
    checked = 0
    for sample, row in rows:
        if sample.claim is None or row.outcome not in ("copied", "corrected"):
            continue
        item = SweepItem(sample.id, sample.image, sample.prompt, sample.truth, sample.claim, sample.task,
                         tuple(int(t) for t in row.reply_ids), sample.object)
        setup = prepare_score(vlm, item, max_new_tokens=12)
        forced = vlm.tokenizer.decode(setup.slots[0].batch.input_ids[0, setup.prompt_len:], skip_special_tokens=True)
        answer = str(row.answer) if sample.task == "color" else None
        assert row.reply.startswith(forced.strip()), (row.reply, forced)
        if answer is not None:
            assert answer not in forced and row.reply[len(forced.strip()):].lstrip().startswith(answer)
        assert score_prompt(vlm, setup, [(0, 0)], **NOOP)[0]["outcome"] == row.outcome, row.reply
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])  # families whose tower gets the batch's own tensors
def test_the_image_is_encoded_once_for_all_scored_sequences(split_vlm):
    setup = prepare_score(split_vlm, _count_item(split_vlm, "There are seven circles."), max_new_tokens=12)
    assert len(setup.inputs()) >= 2
    calls = []
    first = next(split_vlm.vision_tower.children())  # runs only when the tower really computes
    handle = first.register_forward_hook(lambda *a: calls.append(1))
    try:
        setup.layer_inputs(split_vlm)
    finally:
        handle.remove()
    assert len(calls) == 1
