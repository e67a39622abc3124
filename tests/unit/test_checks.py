"""`training.checks`: P(yes) from the model's two wordings, the same in any batch, oriented yes over no (checked
by hand against the teacher-forced log-likelihoods), on every family."""

from __future__ import annotations

import math

import pytest
import torch

from halluscope.metrics.pope import fill_answer
from halluscope.tasks.object_scenes import draw_object_scene
from halluscope.training.checks import question, yes_probabilities
from halluscope.training.sequences import encode_responses, response_ids


def test_yes_probabilities_compare_the_two_wordings_whatever_the_batch(vlm):
    images = [draw_object_scene(k, seed=0).image for k in range(3)]
    asked = [(images[0], "circle"), (images[1], "star"), (images[2], "heart"), (images[0], "bolt")]
    wordings = {"yes": "Yes, there is a {}.", "no": "No"}
    one = yes_probabilities(vlm, asked, wordings, batch_size=1)
    batched = yes_probabilities(vlm, asked, wordings, batch_size=3)
    swapped = yes_probabilities(vlm, asked, {"yes": wordings["no"], "no": wordings["yes"]}, batch_size=4)
    assert all(0.0 <= p <= 1.0 for p in one)
    assert batched == pytest.approx(one, abs=1e-5)
    assert [1.0 - p for p in swapped] == pytest.approx(one, abs=1e-5)
    # each P(yes) is the sigmoid of the two wordings' log-likelihoods, each teacher-forced in a whole forward of
    # image, question and answer (no cache), by hand: the shared prefill gives the same numbers
    for (image, obj), p_yes in zip(asked, one):
        logprob = {}
        for answer in ("yes", "no"):
            text = fill_answer(wordings[answer], obj)
            batch = encode_responses(vlm, [(image, question(obj), response_ids(vlm, text))])
            with torch.no_grad():
                logits = vlm.model(**batch.inputs).logits
            logprob[answer] = float(torch.log_softmax(logits[0], -1)[batch.predicts[0]].gather(
                1, batch.targets[0][batch.predicts[0]][:, None]).sum())
        assert p_yes == pytest.approx(1.0 / (1.0 + math.exp(logprob["no"] - logprob["yes"])), abs=1e-5)


def test_separation_counts_the_pairs_a_present_object_wins_and_the_doubted_share_of_each_kind():
    from halluscope.training.checks import separation

    p_yes = [0.9, 0.4, 0.7, 0.7, 0.2, 0.95]
    present = [True, True, False, True, False, False]
    # by hand: present 0.9, 0.4, 0.7 against absent 0.7, 0.2, 0.95 -> wins 2 + 1 + (1 + 0.5) of 9 pairs
    assert separation(p_yes, present, 0.5) == {"auroc": round(4.5 / 9, 4), "present": 3, "absent": 3,
                                               "doubted_present": round(1 / 3, 4), "doubted_absent": round(1 / 3, 4)}
    assert separation([0.3, 0.8], [True, True], 0.5) == {"auroc": None, "present": 2, "absent": 0,
                                                         "doubted_present": 0.5, "doubted_absent": None}
