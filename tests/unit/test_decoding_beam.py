"""Beam search and OPERA: with no method the loop's beam search gives transformers' `generate(num_beams=...)`
sequences exactly on every family (batches of one and of unequal prompts, replies ending early at different
lengths and running to the limit); OPERA's neutral setting is that beam search; its penalty and rollback rules
are computed as stated; looking ahead and rewinding leave the rows as they should; bad settings fail in one line."""

from __future__ import annotations

import pytest
import torch

import halluscope
from halluscope.decoding import Sampler, build_method, decode_ids, get_method
from halluscope.decoding.api import place_beams
from halluscope.decoding.attention import ScoreEdit, score_edit
from halluscope.decoding.branches import Rows
from halluscope.decoding.methods.opera import OPERAConfig, over_trust, rollback_position
from halluscope.errors import InputError
from halluscope.tasks.scenes import count_scene

PAIRS = [(count_scene(3, "circle", size=112, seed=1), "How many circles?"),
         (count_scene(5, "star", size=112, seed=2), "Describe the 7 stars in this image, one by one.")]
ONE_FAMILY = pytest.mark.parametrize("family", ["qwen2_vl"])
SEARCHES = [Sampler(num_beams=3), Sampler(num_beams=2, length_penalty=0.0, early_stopping=True),
            Sampler(num_beams=4, length_penalty=-1.0, early_stopping="never")]


def _generate(vlm, batch, sampler: Sampler, max_new_tokens: int) -> torch.Tensor:
    config = vlm.greedy_config(max_new_tokens)
    config.num_beams, config.length_penalty = sampler.num_beams, sampler.length_penalty
    config.early_stopping = sampler.early_stopping
    return vlm.model.generate(**batch.inputs, generation_config=config)[:, batch.seq_len:]


def test_beam_search_equals_generate(vlm, monkeypatch):
    batches = [vlm.encode(PAIRS), vlm.encode(PAIRS[1:])]
    emitted = _generate(vlm, batches[0], SEARCHES[0], 10)
    widths = []
    # the model's own EOS (replies run to the limit), then a token the beams emit (replies end early, unequally)
    for eos in (vlm.model.generation_config.eos_token_id, int(emitted[0, 2])):
        monkeypatch.setattr(vlm.model.generation_config, "eos_token_id", eos)
        for sampler in SEARCHES:
            for batch in batches:
                expected = _generate(vlm, batch, sampler, 10)
                got = decode_ids(vlm, batch, max_new_tokens=10, sampler=sampler)
                assert got.shape == expected.shape and torch.equal(got, expected), (eos, sampler, len(batch))
                widths.append(got.shape[1])
    assert min(widths) < 10  # some searches did end early


def test_opera_neutral_is_plain_beam_search(vlm):
    batch = vlm.encode(PAIRS)
    expected = decode_ids(vlm, batch, max_new_tokens=8, sampler=Sampler(num_beams=3))
    neutral = build_method("opera", num_beams=3, alpha=0.0, max_rollbacks=0)
    assert torch.equal(decode_ids(vlm, batch, neutral, max_new_tokens=8), expected)


@ONE_FAMILY
def test_opera_reading_attention_without_acting_on_it_is_plain_beam_search(vlm):
    # looks ahead at every candidate, reads the last layer's attention and searches one row at a time, but never
    # penalises nor rolls back: the cache, the rows and the beams must come out as plain beam search's
    batch = vlm.encode(PAIRS)
    expected = decode_ids(vlm, batch, max_new_tokens=8, sampler=Sampler(num_beams=3))
    watching = build_method("opera", num_beams=3, alpha=0.0, threshold=10**6)
    assert watching.rewinds
    assert torch.equal(decode_ids(vlm, batch, watching, max_new_tokens=8), expected)


def test_over_trust_penalty_equals_a_hand_computation():
    attention = torch.tensor([[0.5, 0.0, 0.0],
                              [0.2, 0.3, 0.0],
                              [0.1, 0.4, 0.2]])
    # scale 10: column 0: 1e-7 * 5 * 2 * 1 = 1e-6; column 1: 1e-7 * 3 * 4 = 1.2e-6; column 2: 1e-7 * 2 = 2e-7
    penalty, column = over_trust(attention[None, None], 10.0)
    torch.testing.assert_close(penalty, torch.tensor([[1.2e-6]]))
    assert column.tolist() == [[1]]
    huge, _ = over_trust(torch.full((1, 40, 40), 0.9).tril(), 1e4)  # the product overflows float32
    assert torch.isfinite(huge).all()


def test_rollback_position_rules():
    config = OPERAConfig(threshold=3, warmup=2, window=4, max_rollbacks=2)
    leads = torch.tensor([[5, 5, 5], [5, 6, 5], [4, 5, 5]])  # [beams, steps]: column 5 led 2 times in beam 2
    assert rollback_position(leads, 7, config, {}) is None
    leads = torch.tensor([[5, 5, 5, 1], [5, 5, 6, 5], [5, 5, 5, 5]])  # ... 3 times in every beam
    rollbacks: dict[int, int] = {}
    assert rollback_position(leads, 8, config, rollbacks) == 6  # back to the token after the summary token
    assert rollback_position(leads, 8, config, rollbacks) == 6
    assert rollback_position(leads, 8, config, rollbacks) == 5  # position 6 is spent: the summary token itself
    assert rollbacks == {6: 2, 5: 1}
    assert rollback_position(leads, 12, config, {}) == 8  # at most `window` tokens back
    assert rollback_position(leads, 6, config, {}) is None  # nothing to go back to
    early = torch.ones(3, 4, dtype=torch.long)
    assert rollback_position(early, 8, config, {}) is None  # column 1 lies in the warmup


@ONE_FAMILY
def test_opera_rolls_back_and_searches_each_row_alone(vlm):
    # sigma 500 makes every scaled weight > 1, so the first reply column (the most factors) leads at every step:
    # at step 2 it has led 3 times in every beam, twice the search goes back to position 1, then position 1 is
    # spent and position 0 is out of reach
    seen = []

    class Recorded(get_method("opera")):
        def rewind(self, context):
            back = super().rewind(context)
            seen.append((context.rows.n, context.step, back))
            return back

    settings = dict(num_beams=3, scale=500.0, threshold=3, warmup=0, max_rollbacks=2)
    batch = vlm.encode(PAIRS)
    rolled = decode_ids(vlm, batch, Recorded(**settings), max_new_tokens=6)
    assert {n for n, _, _ in seen} == {3}  # one row's beams at a time
    assert [(step, back) for _, step, back in seen if back is not None] == [(2, 1), (2, 1)] * 2
    assert not torch.equal(rolled, decode_ids(vlm, batch, build_method("opera", **settings | {"max_rollbacks": 0}),
                                              max_new_tokens=6))


@ONE_FAMILY
def test_peek_sees_the_step_attention_and_leaves_the_rows_as_they_were(vlm):
    batch = vlm.encode(PAIRS)
    seen = []
    last = frozenset({vlm.n_layers - 1})
    with score_edit(vlm, ScoreEdit(last, None, lambda probs: seen.append(probs[:, :, -1].clone()))):
        rows, logits, _ = Rows.prefill(vlm, [batch], 4)
        token = logits.argmax(-1)
        seen.clear()
        rows.peek(vlm, token)
        rows.peek(vlm, token + 1)
        stepped, _ = rows.step(vlm, token)
        assert torch.equal(seen[0], seen[2]) and not torch.equal(seen[0], seen[1])
        plain = Rows.prefill(vlm, [batch], 4)[0]
        assert torch.equal(stepped, plain.step(vlm, token)[0])


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("spare", [4, 1])  # room for every alternative's column in the buffers, and too little
def test_alternatives_peeked_together_see_what_each_sees_alone(vlm, spare):
    """k alternatives in one look-ahead forward: each query's attention over the cache and its own column equals
    a look-ahead of that token alone, at every layer's observer, whether the buffers have room or not."""
    batch = vlm.encode(PAIRS)
    seen = []
    last = frozenset({vlm.n_layers - 1})
    with score_edit(vlm, ScoreEdit(last, None, lambda probs: seen.append(probs.clone()))):
        rows, logits, _ = Rows.prefill(vlm, [batch], spare)
        alternatives = logits.topk(3, -1).indices
        seen.clear()
        for k in range(3):
            rows.peek(vlm, alternatives[:, k])
        rows.peek(vlm, alternatives)
        width = rows.mask.shape[1]
        together = seen[3]  # [rows, heads, 3 queries, width + 3 keys]
        for k in range(3):
            alone = seen[k][:, :, 0]  # [rows, heads, width + 1 keys]
            mine = torch.cat([together[:, :, k, :width], together[:, :, k, width + k:width + k + 1]], -1)
            torch.testing.assert_close(mine, alone, atol=1e-6, rtol=0)
            others = [width + j for j in range(3) if j != k]
            assert not together[:, :, k, others].any()
        stepped, _ = rows.step(vlm, alternatives[:, 0])
        plain = Rows.prefill(vlm, [batch], spare)[0]
        assert torch.equal(stepped, plain.step(vlm, alternatives[:, 0])[0])


@ONE_FAMILY
def test_rewind_rebuilds_the_cache_of_its_tokens(vlm):
    batch = vlm.encode(PAIRS)
    rows, logits, _ = Rows.prefill(vlm, [batch], 6)
    tokens = [logits.argmax(-1)]
    for _ in range(3):
        logits, _ = rows.step(vlm, tokens[-1])
        tokens.append(logits.argmax(-1))
    reordered = rows.select(torch.tensor([1, 0]))  # rows trade places: each keeps its own prompt
    fed = torch.stack(tokens[:3], 1)
    again, _ = reordered.rewind(vlm, fed.flip(0))
    torch.testing.assert_close(again, logits.flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(reordered.step(vlm, tokens[3].flip(0))[0], rows.step(vlm, tokens[3])[0].flip(0),
                               atol=1e-5, rtol=0)


@ONE_FAMILY
def test_decode_places_num_beams_on_the_sampler_or_on_opera(vlm):
    replies = halluscope.decode(vlm, PAIRS, max_new_tokens=6, num_beams=3)
    assert replies == vlm.decode(_generate(vlm, vlm.encode(PAIRS), Sampler(num_beams=3), 6))
    assert place_beams(build_method("vcd"), None, 3)[1].num_beams == 3
    opera, sampler = place_beams(build_method("opera", alpha=0.5), None, 3)
    assert (opera.config.num_beams, opera.config.alpha, sampler.num_beams) == (3, 0.5, 1)


@pytest.mark.parametrize("make, message", [
    (lambda: build_method("opera", num_beams=0), r"opera num_beams=0 is out of range; pass an integer >= 1"),
    (lambda: build_method("opera", scale=0), r"opera scale=0 is out of range; pass a number > 0\.0"),
    (lambda: build_method("opera", candidates=2.5), r"opera candidates=2\.5 is out of range; pass an integer"),
    (lambda: build_method("opera", num_beams=1), r"opera max_rollbacks=5 needs beam search, but num_beams=1"),
    (lambda: Sampler(num_beams=0), r"num_beams 0 is out of range; pass an integer >= 1"),
    (lambda: Sampler(do_sample=True, num_beams=2), r"beam sampling\) is not supported"),
    (lambda: Sampler(early_stopping="sometimes"), r"early_stopping 'sometimes' is not valid"),
    (lambda: Sampler(length_penalty=float("nan")), r"length_penalty nan is not a finite number"),
])
def test_bad_beam_settings_fail_in_one_line(make, message):
    with pytest.raises(InputError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


@ONE_FAMILY
@pytest.mark.parametrize("sampler, message", [
    (Sampler(num_beams=3), r"runs its own beam search with num_beams=5, but the sampler asks for 3"),
    (Sampler(do_sample=True), r"runs beam search \(num_beams=5\), which does not sample"),
])
def test_opera_refuses_a_sampler_that_contradicts_its_search(vlm, sampler, message):
    with pytest.raises(InputError, match=message):
        decode_ids(vlm, vlm.encode(PAIRS[:1]), build_method("opera"), max_new_tokens=2, sampler=sampler)
