"""CHAIR scoring with every NLP step injected: tokens, tags, lemmas and singulars are fixed by the test, so
everything after tagging (double words, exclusions, vocabulary, counting) is checked exactly against hand-computed
numbers. No NLTK data or WordNet is needed here."""

from __future__ import annotations

import doctest
import json
import math

import pandas as pd
import pytest

from halluscope.errors import InputError
from halluscope.metrics import chair, vocabulary
from halluscope.metrics.chair import chair_ground_truth, evaluate_chair, extract_objects, load_captions, score_chair
from halluscope.metrics.nlp import NLPComponents
from halluscope.metrics.vocabulary import ObjectVocabulary, coco_vocabulary, load_vocabulary, parse_synonym_lines

# Tags and lemmas the fake tagger / lemmatiser give; everything else is "NN" and lemmatises to itself.
TAGS = {"seated": "VBN", "dogs": "NNS", "skiing": "VBG", "glasses": "NNS"}
LEMMAS = {("seated", "v"): "seat", ("dogs", "n"): "dog", ("skiing", "v"): "ski", ("glasses", "n"): "glass"}
# A pattern.en-like singulariser, quirks included: "glasses" -> "glas", "bus" -> "bu".
SINGULARS = {"dogs": "dog", "glasses": "glas", "bus": "bu", "tracks": "track"}


def fake_nlp() -> NLPComponents:
    return NLPComponents(
        tokenize=str.split,
        tag=lambda tokens: [TAGS.get(t, "NN") for t in tokens],
        lemmatize=lambda word, pos: LEMMAS.get((word, pos), word),
        singularize=lambda word: SINGULARS.get(word, word),
        names={"nlp": "custom", "tokenizer": "str.split"},
    )


NLP = fake_nlp()


def objects(caption: str, method: str = "opera") -> list[str]:
    return extract_objects(caption, nlp=NLP, method=method).objects


# ------------------------------------------------------------------------------------------ the vocabulary


def test_coco_vocabulary_keeps_the_reference_list_and_its_quirks():
    v = coco_vocabulary()
    assert len(v.node_words) == 80
    assert len(v.synonyms) == 403  # 416 entries, 403 distinct
    assert " motor bike" in v.synonyms and " cheesecake" in v.synonyms  # space-prefixed, so unreachable
    assert "motor bike" not in v.synonyms and "cheesecake" not in v.synonyms
    assert v.node_of("iPhone") == "cell phone" and "iphone" not in v.synonyms
    assert v.node_of("pitcher") == "person" and v.node_of("bow") == "tie" and v.node_of("orange") == "orange"
    assert v.double_words_for("opera")["train track"] == "train track"
    assert "train track" not in v.double_words_for("original")
    assert v.double_words_for("opera")["bow tie"] == "tie"
    assert v.exclusions == (("seat", "toilet"),)


def test_synonym_lines_split_like_the_reference():
    assert parse_synonym_lines(["motorcycle, scooter,  motor bike\n", "\n", "bison \n"]) == [
        ["motorcycle", "scooter", " motor bike"],
        ["bison"],
    ]


def test_a_word_listed_twice_maps_to_the_later_category():
    v = ObjectVocabulary.from_synonyms("t", [["a", "x"], ["b", "x"]])
    assert v.node_of("x") == "b"


# ------------------------------------------------------------------------------------------ word extraction


def test_double_words_merge_before_lookup():
    assert objects("a hot dog and a dog") == ["hot dog", "dog"]
    assert objects("a teddy bear") == ["teddy bear"]  # not "bear"
    assert objects("a bow tie") == ["tie"]
    assert objects("a baby elephant") == ["elephant"]  # not "person" for "baby"
    assert objects("a passenger train") == ["train"]
    assert objects("an adult cub") == []  # merged to "cub", which no category lists
    assert extract_objects("a hot dog", nlp=NLP).words == ["a", "hot dog"]


def test_merge_scans_left_to_right_and_does_not_overlap():
    # "fire hydrant" is taken first, so "hydrant stop" is never considered; "stop sign" then merges
    assert objects("fire hydrant stop sign") == ["fire hydrant", "stop sign"]
    assert objects("baby baby dog") == ["person", "dog"]  # "baby baby" is no pair; "baby dog" -> dog


def test_space_prefixed_synonyms_never_match():
    # " motor bike": the pair merges to "motor bike", which is not a synonym, so neither word counts
    assert objects("a motor bike") == []
    assert objects("a bike") == ["bicycle"]
    assert objects("a cheesecake and a cupcake") == ["cake"]  # " cheesecake" is unreachable


def test_other_list_quirks():
    assert objects("an iphone") == []  # the list writes "iPhone"; captions are lower-cased
    assert objects("a stove top oven") == ["oven", "oven"]  # the three-word entry never merges
    assert objects("a train track", "opera") == []  # merged and dropped by OPERA's extra double word
    assert objects("a train track", "original") == ["train"]


def test_toilet_seat():
    assert objects("a toilet seat") == ["toilet"]  # the pair merges to "toilet"
    assert objects("the seat of the toilet") == ["toilet"]  # any "seat" goes when "toilet" is present
    assert objects("a seat and a seat near a toilet") == ["toilet"]
    assert objects("a seat") == ["chair"]


def test_repeated_mentions_are_counted_each_time():
    found = extract_objects("a dog and a dog and a puppy", nlp=NLP)
    assert found.mentions == ["dog", "dog", "puppy"]
    assert found.objects == ["dog", "dog", "dog"]


def test_opera_lemmatises_with_the_tag_pos_and_original_singularises():
    assert objects("a man seated") == ["person", "chair"]  # VBN -> verb lemma "seat" -> chair
    assert objects("a man seated", "original") == ["person"]  # no POS: "seated" stays
    assert objects("two dogs skiing") == ["dog", "skis"]
    assert objects("wine glasses", "opera") == ["wine glass"]  # lemma "glass"
    assert objects("wine glasses", "original") == ["wine glass"]  # singular "glas", then "wine glas"
    assert objects("a bus", "original") == []  # the singulariser's "bu" is no synonym


def test_a_tagger_must_tag_every_token():
    bad = NLP.replace(tag=lambda tokens: ["NN"])
    with pytest.raises(InputError, match="1 tags for 3 tokens"):
        extract_objects("a dog barks", nlp=bad)


def test_unknown_method():
    with pytest.raises(InputError, match="unknown CHAIR method 'lisa'"):
        extract_objects("a dog", nlp=NLP, method="lisa")


def test_replacing_a_component_relabels_the_result():
    nlp = NLP.replace(tokenize=lambda s: s.split(","))
    assert nlp.names["nlp"] == "custom" and nlp.names["tokenizer"] == "custom"
    with pytest.raises(InputError, match="unknown NLP component"):
        NLP.replace(parse=str.split)


# ------------------------------------------------------------------------------------------ ground truth


INSTANCES = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dining table"}, {"id": 3, "name": "motorcycle"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1},
        {"id": 2, "image_id": 1, "category_id": 1},
        {"id": 3, "image_id": 2, "category_id": 2},
    ],
}
CAPTIONS = {
    "annotations": [
        {"id": 1, "image_id": 1, "caption": "A kid on a motorbike"},
        {"id": 2, "image_id": 2, "caption": "a desk with a cat"},
    ]
}


def test_ground_truth_is_instances_plus_reference_caption_objects():
    truth = chair_ground_truth(INSTANCES, CAPTIONS, nlp=NLP)
    assert truth == {1: {"person", "motorcycle"}, 2: {"dining table", "cat"}, 3: frozenset()}
    assert chair_ground_truth(INSTANCES, None, nlp=NLP)[1] == {"person"}
    assert chair_ground_truth([INSTANCES], [CAPTIONS], image_ids=[2], nlp=NLP) == {2: {"dining table", "cat"}}


def test_ground_truth_reads_files(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    truth = chair_ground_truth(tmp_path / "instances.json", tmp_path / "captions.json", nlp=NLP)
    assert truth[1] == {"person", "motorcycle"}


def test_ground_truth_errors(tmp_path):
    unknown = {**INSTANCES, "categories": [{"id": 1, "name": "unicorn"}, *INSTANCES["categories"][1:]]}
    with pytest.raises(InputError, match="'unicorn' is not in the CHAIR vocabulary 'coco80'"):
        chair_ground_truth(unknown, None, nlp=NLP)
    orphan = {**INSTANCES, "annotations": [{"id": 9, "image_id": 1, "category_id": 7}]}
    with pytest.raises(InputError, match="category_id 7, which the file's categories do not define"):
        chair_ground_truth(orphan, None, nlp=NLP)
    with pytest.raises(InputError, match="lacks \\['categories'\\]"):
        chair_ground_truth({"images": [], "annotations": []}, None, nlp=NLP)
    with pytest.raises(InputError, match="COCO instances file not found"):
        chair_ground_truth(tmp_path / "missing.json", None, nlp=NLP)


# ------------------------------------------------------------------------------------------ scores

TRUTH = {1: {"dog", "person"}, 2: {"cat"}}
GENERATED = [
    {"image_id": 1, "caption": "a man with a dog and a dog and a cat"},  # person, dog, dog | cat hallucinated
    {"image_id": 2, "caption": "a hot dog on a toilet seat"},  # hot dog, toilet both hallucinated
    {"image_id": 2, "caption": "nothing here"},  # no mentions
]


def test_scores_by_hand():
    summary, table = score_chair(GENERATED, TRUTH, nlp=NLP)
    assert summary["chair_s"] == pytest.approx(2 / 3)
    assert summary["chair_i"] == pytest.approx(3 / 6)
    assert summary["recall"] == pytest.approx(2 / 4)  # distinct recalled {person, dog} of 2 + 1 + 1
    assert summary["length"] == pytest.approx((11 + 5 + 2) / 3)  # words after the merge ("toilet seat" is one)
    assert (summary["n_captions"], summary["n_mentions"], summary["n_hallucinated"]) == (3, 6, 3)
    assert (summary["method"], summary["vocabulary"], summary["nlp"]) == ("opera", "coco80", "custom")
    assert summary["nlp_components"]["tokenizer"] == "str.split"
    assert table["hallucinated"].tolist() == [["cat"], ["hot dog", "toilet"], []]
    assert table["chair_i"].iloc[0] == pytest.approx(1 / 4)
    assert math.isnan(table["chair_i"].iloc[2])  # no mentions: undefined (the reference writes 0)
    assert table["recall"].tolist() == [1.0, 0.0, 0.0]


def test_scores_from_a_dataframe_or_jsonl_with_other_keys(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps({"id": r["image_id"], "text": r["caption"]}) + "\n" for r in GENERATED))
    from_file = score_chair(path, TRUTH, nlp=NLP, image_id_key="id", caption_key="text").summary
    from_frame = score_chair(pd.DataFrame(GENERATED), TRUTH, nlp=NLP).summary
    assert from_file["chair_i"] == from_frame["chair_i"] == pytest.approx(0.5)


def test_zero_denominators_give_nan():
    summary = score_chair([{"image_id": 3, "caption": "nothing"}], {3: set()}, nlp=NLP).summary
    assert summary["chair_s"] == 0.0 and math.isnan(summary["chair_i"]) and math.isnan(summary["recall"])


def test_evaluate_builds_ground_truth_for_the_captioned_images():
    generated = [{"image_id": 1, "caption": "a man on a motorcycle at a table"}]
    summary = evaluate_chair(generated, INSTANCES, CAPTIONS, nlp=NLP).summary
    assert summary["chair_i"] == pytest.approx(1 / 3) and summary["recall"] == pytest.approx(1.0)


def test_a_custom_vocabulary(tmp_path):
    path = tmp_path / "vocabulary_toys.txt"
    path.write_text("ball, sphere\nblock, cube\n")
    v = load_vocabulary(path)
    assert v.name == "vocabulary_toys"
    summary = score_chair([{"image_id": 1, "caption": "a sphere and a cube"}], {1: {"ball"}}, vocabulary=v, nlp=NLP)
    assert summary.summary["chair_i"] == 0.5 and summary.summary["vocabulary"] == "vocabulary_toys"


def test_scoring_errors(tmp_path):
    with pytest.raises(InputError, match="image ids without ground truth, e.g. \\['1'\\]"):
        score_chair([{"image_id": "1", "caption": "a dog"}], TRUTH, nlp=NLP)
    with pytest.raises(InputError, match="expected 'image_id' and 'caption'"):
        score_chair([{"image": 1, "caption": "a dog"}], TRUTH, nlp=NLP)
    with pytest.raises(InputError, match="no captions to score"):
        score_chair([], TRUTH, nlp=NLP)
    with pytest.raises(InputError, match="'caption' is int"):
        load_captions([{"image_id": 1, "caption": 3}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 1}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not JSON"):
        load_captions(bad)
    with pytest.raises(InputError, match="vocabulary file not found"):
        load_vocabulary(tmp_path / "none.txt")
    with pytest.raises(InputError, match="not two words"):
        ObjectVocabulary.from_synonyms("t", {"a": ["a"]}, double_words={"x y z": "x"})


def test_docstring_examples():
    for module in (vocabulary, chair):
        assert doctest.testmod(module, raise_on_error=False).failed == 0
