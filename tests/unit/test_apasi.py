"""APASI's data rules, checked by hand: sentence splitting, how many and which sentences are replaced, the guide
object's choice, the insert variant's list grammar, the self-check variant's pairs, the co-occurrence graph, the
curriculum, and the chat-template rendering that feeds TRL's collator (compared token for token with what
generation encodes, on every family)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pandas as pd
import pytest

from halluscope.errors import InputError
from halluscope.metrics.nlp import load_nlp
from halluscope.metrics.vocabulary import ObjectVocabulary
from halluscope.tasks.object_scenes import SCENE_SYNONYMS
from halluscope.training.apasi.graph import ListSentence, MentionReader, build_graph, read_description, split_list
from halluscope.training.apasi.inject import (
    choose_guide,
    choose_position,
    guide_candidates,
    insert_item,
    plan_injection,
    plan_insert,
    plan_replace,
    plan_swap,
    render_list,
)
from halluscope.training.apasi.selfcheck import check_questions, read_answers, self_check_texts
from halluscope.training.apasi.sentences import (
    choose_sentences,
    first_sentence,
    join_sentences,
    replace_count,
    sentence_weights,
    split_sentences,
)
from halluscope.training.apasi.train import round_settings


@pytest.fixture(scope="module")
def reader() -> MentionReader:
    vocabulary = ObjectVocabulary.from_synonyms("shapes", {k: list(v) for k, v in SCENE_SYNONYMS.items()})
    return MentionReader(vocabulary, load_nlp("offline"))


# ---- sentences ----------------------------------------------------------------------------------------------


def test_sentences_split_at_periods_not_next_to_digits_and_keep_their_whitespace():
    text = "The cat is 2.5 m long. It sleeps!  It has 3. A dog.\n\nVersion .5 is out"
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == ["The cat is 2.5 m long.", "It sleeps!  It has 3. A dog.",
                                           "Version .5 is out"]
    assert [s.tail for s in sentences] == [" ", "\n\n", ""]
    assert join_sentences(sentences) == text
    assert split_sentences("  \n ") == []
    assert first_sentence(" on a 2.5 m table. Then") == " on a 2.5 m table."
    assert first_sentence("no end") == "no end"


def test_replace_count_is_round_of_the_rate_and_needs_three_sentences_at_a_fifth():
    assert [replace_count(n, 0.2) for n in range(1, 14)] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3]
    assert replace_count(2, 0.5) == 1 and replace_count(2, 0.75) == 0  # never reaches the first sentence
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        replace_count(5, 1.0)


def test_sentence_weights_rise_from_one_to_two_in_a_square_root_shape():
    weights = sentence_weights(10)
    assert len(weights) == 9 and weights[0] == pytest.approx(1.0) and weights[-1] == pytest.approx(2.0)
    for i, w in zip(range(1, 10), weights):
        assert (w - 1.0) == pytest.approx((math.sqrt(i) - 1.0) / (math.sqrt(9) - 1.0))
    assert sentence_weights(2) == [1.0] and sentence_weights(3, skip=1) == pytest.approx([1.0, 2.0])


def test_chosen_sentences_skip_the_first_and_follow_the_weights():
    rng = random.Random(0)
    draws = [choose_sentences(5, 2, rng) for _ in range(4000)]
    assert all(d == sorted(set(d)) and 0 not in d and len(d) == 2 for d in draws)
    single = Counter(choose_sentences(5, 1, rng)[0] for _ in range(20000))
    weights = sentence_weights(5)
    for i, w in zip(range(1, 5), weights):
        assert single[i] / 20000 == pytest.approx(w / sum(weights), abs=0.015)
    with pytest.raises(InputError, match="cannot replace 3 of 3"):
        choose_sentences(3, 3, rng)


# ---- graph ----------------------------------------------------------------------------------------------------


def test_graph_counts_descriptions_pairs_phrasings_and_order(reader):
    texts = ["A red circle, two blue squares and a star.",
             "Two circles and a moon. A circle sits on a block.",  # "moon" is a crescent, "block" a square
             "A square and a green star."]
    graph = build_graph([read_description(t, reader) for t in texts], "shapes")
    assert graph.n_descriptions == 3
    assert graph.counts == {"circle": 2, "square": 3, "star": 2, "crescent": 1}
    assert graph.co_counts["circle"] == {"square": 2, "star": 1, "crescent": 1}
    assert graph.co_counts["square"] == {"circle": 2, "star": 2, "crescent": 1}
    assert graph.neighbours["square"] == ["circle", "star", "crescent"]  # by co-count, then name
    assert graph.nodes == ["square", "circle", "star", "crescent"]
    assert graph.phrasings["square"] == ["two blue squares", "a square"]
    assert graph.phrasings["star"] == ["a star", "a green star"]
    assert graph.order["circle"] == {"square": 2, "star": 1, "crescent": 1}
    assert graph.order["crescent"] == {"square": 1}
    assert graph.mean_objects() == pytest.approx(8 / 3)
    assert type(graph).from_dict(graph.to_dict()) == graph


def test_list_sentences_are_lists_of_single_object_phrases(reader):
    listed = split_list("A red circle, two blue squares, and a star.", reader)
    assert listed == ListSentence(["A red circle", "two blue squares", "a star"], ["circle", "square", "star"],
                                  True, ".")
    assert split_list("A circle.", reader).items == ["A circle"]
    assert split_list("A square on the left.", reader) is None  # does not end with its object
    assert split_list("A circle near a square and a star.", reader) is None  # two objects in one item
    assert split_list("The sky and the sea.", reader) is None  # no object


# ---- guide objects ------------------------------------------------------------------------------------------------


def _graph(reader, texts):
    return build_graph([read_description(t, reader) for t in texts], "shapes")


def test_guide_objects_come_from_the_top_co_occurring_absent_objects(reader):
    graph = _graph(reader, ["A circle, a square and a star."] * 3 + ["A circle and a heart."] * 2
                   + ["A circle and a bolt."])
    assert guide_candidates(graph, "circle", {"circle", "square"}, 10) == ["star", "heart", "bolt"]
    assert guide_candidates(graph, "circle", {"circle", "square"}, 1) == ["star"]
    rng = random.Random(0)
    for _ in range(200):
        assert choose_guide(graph, ["circle"], {"circle", "square", "star"}, rng, 1) == "heart"
    # no absent co-occurrer of the key: any absent object of the graph, never a present one
    picks = {choose_guide(graph, ["heart"], {"heart", "circle"}, rng, 10) for _ in range(200)}
    assert picks == {"square", "star", "bolt"}
    assert choose_guide(graph, ["circle"], set(graph.counts), rng, 10) is None


# ---- the insert variant ------------------------------------------------------------------------------------------


def test_insert_keeps_the_list_grammar():
    listed = ListSentence(["A red circle", "two blue squares"], ["circle", "square"], False, ".")
    assert render_list(insert_item(listed, 0, "a star", "star")) == "A star, a red circle and two blue squares."
    assert render_list(insert_item(listed, 1, "a star", "star")) == "A red circle, a star and two blue squares."
    assert render_list(insert_item(listed, 2, "a star", "star")) == "A red circle, two blue squares and a star."
    one = ListSentence(["A circle"], ["circle"], False, ".")
    assert render_list(insert_item(one, 1, "two moons", "crescent")) == "A circle and two moons."
    oxford = ListSentence(["A circle", "a square"], ["circle", "square"], True, ".")
    assert render_list(insert_item(oxford, 2, "a star", "star")) == "A circle, a square, and a star."
    assert render_list(ListSentence(["TV screens", "A cat"], ["tv", "cat"], False, "!")) == "TV screens and a cat!"
    with pytest.raises(InputError, match="outside the list of 2 items"):
        insert_item(listed, 3, "a star", "star")


def test_insertion_follows_the_models_own_order(reader):
    listed = ListSentence(["A circle", "a star"], ["circle", "star"], False, ".")
    order = {"circle": {"square": 5, "star": 5}, "square": {"star": 5}}
    assert {choose_position(listed, "square", order, random.Random(k)) for k in range(20)} == {1}
    assert {choose_position(listed, "heart", {}, random.Random(k)) for k in range(40)} == {0, 1, 2}
    lead_in = ListSentence(["The image shows a circle", "a star"], ["circle", "star"], False, ".")
    assert {choose_position(lead_in, "heart", {}, random.Random(k)) for k in range(40)} == {1, 2}


def test_insert_plan_names_an_absent_object_in_the_models_own_words(reader):
    graph = _graph(reader, ["A red circle and two green stars.", "A red circle and two green stars.",
                            "A square and two green stars.", "A circle and a square."])
    description = read_description("A circle and a square.", reader)
    plan = plan_insert(description, graph, random.Random(0), top_k=10)
    assert plan.variant == "insert" and plan.guides == ["star"] and plan.pending == []
    assert join_sentences(plan.sentences) == "A circle, a square and two green stars."
    assert plan_insert(read_description("A square on the left.", reader), graph, random.Random(0),
                       top_k=10) == "no_list"
    lone = _graph(reader, ["A circle and a square."])
    assert plan_insert(description, lone, random.Random(0), top_k=10) == "no_absent_object"


def test_swap_plan_trades_a_later_item_for_an_absent_object(reader):
    graph = _graph(reader, ["A circle, a square and two green stars."] * 2 + ["A circle and a heart."])
    description = read_description("A circle, a square and a bolt.", reader)
    for seed in range(20):
        plan = plan_swap(description, graph, random.Random(seed), top_k=10)
        assert plan.variant == "swap" and len(plan.guides) == 1 and plan.pending == []
        rejected = read_description(join_sentences(plan.sentences), reader)
        assert len(rejected.objects) == len(description.objects)  # as many objects as the chosen side
        assert "circle" in rejected.objects  # the first item is never taken out
        assert plan.guides[0] in rejected.objects and plan.guides[0] not in description.objects
    two = plan_swap(read_description("A circle, a square and a bolt.", reader), graph, random.Random(0),
                    top_k=10, count=5)
    assert len(two.guides) == 2  # at most every item but the first
    assert plan_swap(read_description("A circle.", reader), graph, random.Random(0), top_k=10) == "short_list"
    assert plan_swap(read_description("A square on the left.", reader), graph, random.Random(0),
                     top_k=10) == "short_list"


# ---- the self-check variant --------------------------------------------------------------------------------------

def test_self_check_leaves_out_what_the_model_doubts_and_omits_one_confirmed_phrase(reader):
    text = "A red circle, two squares, a blue hexagon and a star."
    description = read_description(text, reader)
    questions = [(0, "circle"), (0, "square"), (0, "hexagon"), (0, "star")]
    answers = read_answers(questions, [0.9, 0.5, 0.2, 0.55])
    assert answers == {0: {"circle": "yes", "square": "yes", "hexagon": "no", "star": "yes"}}
    assert read_answers(questions, [0.9, 0.5, 0.2, 0.55], doubt=0.6)[0] == {
        "circle": "yes", "square": "no", "hexagon": "no", "star": "no"}
    for seed in range(10):
        made = self_check_texts(description, answers[0], random.Random(seed))
        assert made["checked"] == "A red circle, two squares and a star."
        assert made["doubted"] == ["hexagon"] and made["reasons"] == []
        omitted = read_description(made["omit_rejected"], reader).objects
        assert len(made["omitted"]) == 1 and made["omitted"][0] not in omitted and "hexagon" not in omitted
        assert sorted([*omitted, *made["omitted"]]) == ["circle", "square", "star"]
    first = self_check_texts(description, {"circle": "no"}, random.Random(0))
    assert first["checked"] == "Two squares, a blue hexagon and a star."  # the new first item capitalised


def test_self_check_drops_whole_sentences_outside_lists_and_names_why_a_pair_is_missing(reader):
    prose = read_description("A circle is on the left. A star is near it. The sky is blue.", reader)
    made = self_check_texts(prose, {"circle": "yes", "star": "no"}, random.Random(0))
    assert made["checked"] == "A circle is on the left. The sky is blue."
    assert made["omit_rejected"] is None and made["reasons"] == ["one_phrase"]
    confirmed = self_check_texts(prose, {"circle": "yes", "star": "yes"}, random.Random(0))
    assert confirmed["checked"] == prose.sentences[0].text + " " + " ".join(s.text for s in prose.sentences[1:])
    assert confirmed["doubted"] == [] and confirmed["reasons"] == ["all_confirmed"]
    assert confirmed["omit_rejected"] in ("A star is near it. The sky is blue.",
                                          "A circle is on the left. The sky is blue.")
    doubted = self_check_texts(prose, {"circle": "no", "star": "no"}, random.Random(0))
    assert doubted["checked"] is None and doubted["omit_rejected"] is None and doubted["reasons"] == ["all_doubted"]


def test_self_check_asks_once_about_each_object_a_description_names(reader):
    read = [read_description("A circle, a star and two circles.", reader), read_description("A bolt.", reader)]
    assert check_questions(read) == [(0, "circle"), (0, "star"), (1, "bolt")]


# ---- the replace variant -----------------------------------------------------------------------------------------


def test_replace_plan_swaps_later_sentences_for_guide_phrases(reader):
    text = "A circle is here.\n\nA square is near it. A star is below. The sky is blue."
    graph = _graph(reader, [text, "A circle and a heart.", "A square and a heart.", "A star and a bolt."])
    description = read_description(text, reader)
    words = {"heart": ["heart"], "bolt": ["bolt"]}
    for seed in range(30):
        plan = plan_replace(description, graph, words, random.Random(seed), rate=0.2, top_k=10)
        (index,) = plan.pending
        assert plan.variant == "replace" and index in (1, 2, 3)
        assert plan.guides[0] in ("heart", "bolt") and plan.guides[0] in plan.sentences[index].text
        assert [s.tail for s in plan.sentences] == [s.tail for s in description.sentences]
        assert plan.sentences[0] == description.sentences[0]
    short = read_description("A circle. A square.", reader)
    assert plan_replace(short, graph, words, random.Random(0), rate=0.2, top_k=10) == "few_sentences"
    bare = read_description("A circle. The sky is blue. It is calm.", reader)
    outcomes = {plan_replace(bare, graph, words, random.Random(k), rate=0.2, top_k=10) == "nothing_left"
                for k in range(10)}
    assert outcomes == {False}  # the circle stays: the first sentence is never replaced


def test_auto_replaces_long_descriptions_and_inserts_into_short_ones(reader):
    graph = _graph(reader, ["A circle and a square.", "A circle, a square and a star."])
    long = read_description("A circle. A square is there. It is red.", reader)
    short = read_description("A circle and a square.", reader)
    assert plan_injection(long, graph, {}, random.Random(0), variant="auto", rate=0.2, top_k=10).variant == "replace"
    assert plan_injection(short, graph, {}, random.Random(0), variant="auto", rate=0.2, top_k=10).variant == "insert"
    swapped = plan_injection(short, graph, {}, random.Random(0), variant="swap", rate=0.2, top_k=10)
    assert swapped.variant == "swap"
    with pytest.raises(InputError, match="unknown variant 'shuffle'"):
        plan_injection(short, graph, {}, random.Random(0), variant="shuffle", rate=0.2, top_k=10)


# ---- curriculum -------------------------------------------------------------------------------------------------


def test_each_round_injects_less_and_from_fewer_objects():
    rounds = [round_settings(t, 3, rate=0.2, top_k=10, objects=2) for t in range(3)]
    assert rounds == [{"rate": 0.2, "top_k": 10, "objects": 2}, {"rate": 0.15, "top_k": 5, "objects": 1},
                      {"rate": 0.1, "top_k": 3, "objects": 1}]
    assert round_settings(0, 1, rate=0.2, top_k=10, objects=1) == {"rate": 0.2, "top_k": 10, "objects": 1}


# ---- what TRL's collator sees -----------------------------------------------------------------------------------


def test_trl_collator_encodes_the_prompt_as_generation_does(vlm):
    """The prompt tokens and image tensors TRL trains on are exactly those `VLM.encode` generates from, and the
    completions are the responses with the template's end of turn, on every family."""
    from PIL import Image
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from halluscope.training.apasi.dpo import lora_targets, preference_dataset

    image = Image.new("RGB", (40, 40), (200, 30, 30))
    pairs = pd.DataFrame({"image_id": [7], "prompt": ["Describe this image."], "chosen": ["A red circle."],
                          "rejected": ["A red circle and a star."]})
    batch = DataCollatorForVisionPreference(vlm.processor)([preference_dataset(vlm, pairs, {7: image})[0]])
    encoded = vlm.encode([(image, "Describe this image.")])
    for row, reply in ((0, "A red circle."), (1, "A red circle and a star.")):
        kept = batch["attention_mask"][row].bool()
        ids, completion = batch["input_ids"][row][kept], batch["completion_mask"][row][kept].bool()
        assert ids[~completion].tolist() == encoded.input_ids[0][encoded.attention_mask[0].bool()].tolist()
        assert vlm.tokenizer.decode(ids[completion]).strip().startswith(reply)
    pixels = batch["pixel_values"]
    assert pixels[: len(pixels) // 2].equal(encoded.inputs["pixel_values"].reshape(pixels[: len(pixels) // 2].shape))
    targets = lora_targets(vlm)
    assert len(targets) == 7 * vlm.n_layers and all(t.startswith(vlm.family.layers) for t in targets)
    with pytest.raises(InputError, match="no preference pairs"):
        preference_dataset(vlm, pairs.iloc[:0], {})
    with pytest.raises(InputError, match="the pairs name 1 image\\(s\\) the data run lacks, e.g. \\[7\\]"):
        preference_dataset(vlm, pairs, {})



def test_sft_weight_adds_the_chosen_replys_token_mean_nll_to_the_dpo_loss(tiny_dirs, family, tmp_path):
    """The first step's loss is log 2 (policy == reference while LoRA's B is zero) plus the weight times the
    chosen reply's mean token NLL, computed here from the model's logits on TRL's own batch. Training wraps the
    model with an adapter in place, so the test loads its own copy rather than the session's shared one."""
    import torch
    from PIL import Image
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from halluscope.models import load_vlm
    from halluscope.training.apasi.dpo import dpo_round, preference_dataset
    from halluscope.training.apasi.settings import DPOSettings

    vlm = load_vlm(tiny_dirs[family])

    pairs = pd.DataFrame({"image_id": [7], "prompt": ["Describe this image."], "chosen": ["A red circle."],
                          "rejected": ["A red circle and a star."]})
    dataset = preference_dataset(vlm, pairs, {7: Image.new("RGB", (40, 40), (200, 30, 30))})
    batch = DataCollatorForVisionPreference(vlm.processor)([dataset[0]])
    with torch.no_grad():
        logits = vlm.model(**{k: v for k, v in batch.items() if k != "completion_mask"}).logits[0, :-1]
    predicted = batch["completion_mask"][0, 1:].bool()
    logprobs = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
    nll = -logprobs[predicted].mean().item()
    settings = DPOSettings(epochs=1, batch_size=1, learning_rate=1e-6, sft_weight=0.5)
    _, log = dpo_round(vlm, dataset, settings, work_dir=tmp_path / "dpo")
    assert log[0]["loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)
    assert "0.5 x token-mean NLL of the chosen response" in settings.to_dict()["loss"]
    plain = DPOSettings().to_dict()
    assert "NLL" not in plain["loss"] and "sft_weight" not in plain  # manifests of earlier runs stay the same

# ---- errors -------------------------------------------------------------------------------------------------------


def test_bad_options_fail_with_the_option_named(tmp_path):
    from halluscope.training.apasi.continuation import continue_blind
    from halluscope.training.apasi.data import check_data_options
    from halluscope.training.apasi.settings import DPOSettings
    from halluscope.training.apasi.sources import load_images

    options = dict(variant="auto", rate=0.2, top_k=10, objects=1, n=4, max_new_tokens=8, batch_size=2, prompt="Go.")
    check_data_options(**options)
    with pytest.raises(InputError, match="--objects 0; expected a whole number >= 1"):
        check_data_options(**{**options, "objects": 0})
    with pytest.raises(InputError, match="--prompt is empty"):
        check_data_options(**{**options, "prompt": " "})
    with pytest.raises(InputError, match="--dropout 1.0; expected a fraction in \\[0, 1\\)"):
        DPOSettings(dropout=1.0)
    with pytest.raises(InputError, match="--grad-accum 0; expected a whole number >= 1"):
        DPOSettings(grad_accum=0)
    with pytest.raises(InputError, match="--sft-weight -1.0; expected a number >= 0"):
        DPOSettings(sft_weight=-1.0)
    with pytest.raises(InputError, match="2 prompts for 1 prefixes"):
        continue_blind(None, ["a", "b"], ["c"])
    with pytest.raises(InputError, match="--n 0; expected at least 1 image"):
        load_images("synthetic", n=0, seed=1)
    with pytest.raises(InputError, match="holds no images"):
        load_images(str(tmp_path), n=1, seed=1)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    (tmp_path / "annotations").mkdir()
    for name in ("vocabulary_a.txt", "vocabulary_b.txt"):
        (tmp_path / "annotations" / name).write_text("circle\n")
    with pytest.raises(InputError, match="holds 2 vocabulary files"):
        load_images(str(tmp_path), n=1, seed=1)


def test_synthetic_images_come_with_their_objects_and_the_scene_vocabulary():
    from halluscope.tasks.object_scenes import draw_object_scene
    from halluscope.training.apasi.sources import load_images

    images = load_images("synthetic", n=3, seed=1)
    assert images.source == "synthetic" and images.vocabulary.name == "shapes"
    assert images.table["image_id"].tolist() == [0, 1, 2]
    assert images.truth[2] == {o["category"] for o in draw_object_scene(2, seed=1).objects}
