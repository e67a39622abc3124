"""POPE: split construction on a tiny annotation file (hand-computed), the answer parsers, and the metrics on
known confusion matrices."""

from __future__ import annotations

import doctest
import json
import math

import pandas as pd
import pytest

from halluscope.errors import InputError
from halluscope.metrics import coco, pope
from halluscope.metrics.coco import image_objects
from halluscope.metrics.pope import (
    build_pope,
    load_pope_questions,
    parse_yes_no,
    pope_metrics,
    score_pope,
    write_pope_questions,
)

# Four images with >= 3 objects (a, b, c, d) and one with a single object (e). Duplicate annotations of one
# category count once; objects are listed in annotation order.
NAMES = ["person", "dog", "car", "cat", "bus", "apple"]
LAYOUT = {
    1: ("a.jpg", ["person", "dog", "person", "car"]),
    2: ("b.jpg", ["person", "dog", "cat"]),
    5: ("e.jpg", ["dog"]),
    3: ("c.jpg", ["person", "dog", "bus"]),
    4: ("d.jpg", ["person", "car", "apple"]),
}


def tiny_instances() -> dict:
    annotations = [
        {
            "id": len(LAYOUT) * 10 + k,
            "image_id": image_id,
            "category_id": NAMES.index(name) + 1,
            "bbox": [0, 0, 1, 1],
            "area": 1,
        }
        for image_id, (_, names) in LAYOUT.items()
        for k, name in enumerate(names)
    ]
    for n, ann in enumerate(annotations, start=1):
        ann["id"] = n
    return {
        "images": [{"id": i, "file_name": f} for i, (f, _) in LAYOUT.items()],
        "categories": [{"id": k, "name": name} for k, name in enumerate(NAMES, start=1)],
        "annotations": annotations,
    }


def negatives(questions: pd.DataFrame, split: str) -> dict[str, list[str]]:
    """image -> its "no" objects, in question order."""
    rows = questions[(questions["split"] == split) & (questions["label"] == "no")]
    return {image: group["object"].tolist() for image, group in rows.groupby("image", sort=False)}


def test_objects_per_image_from_coco_instances():
    assert image_objects(tiny_instances()) == [
        {"image": "a.jpg", "image_id": 1, "objects": ["person", "dog", "car"]},
        {"image": "b.jpg", "image_id": 2, "objects": ["person", "dog", "cat"]},
        {"image": "e.jpg", "image_id": 5, "objects": ["dog"]},
        {"image": "c.jpg", "image_id": 3, "objects": ["person", "dog", "bus"]},
        {"image": "d.jpg", "image_id": 4, "objects": ["person", "car", "apple"]},
    ]


def test_popular_and_adversarial_splits_by_hand():
    # Seed 0 draws the eligible images (a, b, c, d) in the order d, b, a, c (random.Random(0).sample). So objects
    # are first seen as person, car, apple, dog, cat, bus; counts 4, 2, 1, 3, 1, 1; popularity order person, dog,
    # car, then the ties apple, cat, bus in first-seen order.
    q = build_pope(image_objects(tiny_instances()), n_images=4, seed=0)
    assert q.groupby("split", sort=False).size().to_dict() == {"random": 24, "popular": 24, "adversarial": 24}
    popular = q[q["split"] == "popular"]
    assert popular["image"].tolist()[::6] == ["d.jpg", "b.jpg", "a.jpg", "c.jpg"]
    assert popular["question_id"].tolist() == list(range(1, 25))
    assert popular["label"].tolist() == ["yes", "no"] * 12
    assert popular[popular["label"] == "yes"]["object"].tolist()[:3] == ["person", "car", "apple"]
    assert negatives(q, "popular") == {
        "d.jpg": ["dog", "cat", "bus"],
        "b.jpg": ["car", "apple", "bus"],
        "a.jpg": ["apple", "cat", "bus"],
        "c.jpg": ["car", "apple", "cat"],
    }
    # Co-occurrence ranks: person -> dog 3, car 2, apple / cat / bus 1; dog -> person 3, cat, car, bus 1;
    # car -> person, apple, dog; cat, bus -> person, dog; apple -> person, car. A positive whose partners are all
    # used falls back to a random absent object (here forced when only one is left).
    adversarial = negatives(q, "adversarial")
    assert adversarial["b.jpg"] == ["car", "bus", "apple"]
    assert adversarial["a.jpg"] == ["apple", "cat", "bus"]
    assert adversarial["c.jpg"] == ["car", "cat", "apple"]
    assert adversarial["d.jpg"][0] == "dog" and sorted(adversarial["d.jpg"][1:]) == ["bus", "cat"]


def test_random_split_draws_absent_unused_objects_reproducibly():
    objects = image_objects(tiny_instances())
    q = build_pope(objects, n_images=4, seed=0)
    present = {entry["image"]: set(entry["objects"]) for entry in objects}
    for image, chosen in negatives(q, "random").items():
        assert len(set(chosen)) == 3 and not set(chosen) & present[image]
    assert q.equals(build_pope(objects, n_images=4, seed=0))
    other = build_pope(objects, n_images=4, seed=1)
    assert other[other["split"] == "popular"]["image"].tolist()[::6] == ["b.jpg", "c.jpg", "a.jpg", "d.jpg"]


def test_strategies_share_one_random_stream_in_order():
    # The reference generates random, then popular, then adversarial from one generator: adversarial's random
    # fall-backs depend on what the random split drew before it.
    objects = image_objects(tiny_instances())
    alone = build_pope(objects, n_images=4, seed=0, strategies=["adversarial"])
    assert alone["question_id"].tolist() == list(range(1, 25))
    together = build_pope(objects, n_images=4, seed=0)
    assert negatives(alone, "adversarial")["b.jpg"] == negatives(together, "adversarial")["b.jpg"]


def test_question_text_and_the_article_rules():
    objects = [
        {"image": "x.jpg", "objects": ["apple", "umbrella", "dog"]},
        {"image": "y.jpg", "objects": ["cat", "cow", "pig"]},
    ]
    q = build_pope(objects, n_images=2, strategies=["popular"])
    texts = dict(zip(q["object"], q["text"]))
    assert texts["apple"] == "Is there an apple in the image?"
    assert texts["dog"] == "Is there a dog in the image?"
    quirky = build_pope(objects, n_images=2, strategies=["popular"], article="reference")
    assert dict(zip(quirky["object"], quirky["text"]))["apple"] == "Is there an apple in the imange?"
    assert dict(zip(quirky["object"], quirky["text"]))["dog"] == "Is there a dog in the image?"
    own = build_pope(objects, n_images=2, strategies=["popular"], template="Do you see a {}?")
    assert dict(zip(own["object"], own["text"]))["umbrella"] == "Do you see an umbrella?"


def test_build_errors():
    objects = image_objects(tiny_instances())
    with pytest.raises(InputError, match="only 4 images have >= 3 objects, fewer than n_images = 5"):
        build_pope(objects, n_images=5)
    with pytest.raises(InputError, match="unknown POPE strategy"):
        build_pope(objects, n_images=4, strategies=["hard"])
    with pytest.raises(InputError, match="exactly one"):
        build_pope(objects, n_images=4, template="Is there an object?")
    with pytest.raises(InputError, match="unknown article rule"):
        build_pope(objects, n_images=4, article="fix")
    with pytest.raises(InputError, match="n_images = 0"):
        build_pope(objects, n_images=0)
    with pytest.raises(InputError, match="image entry 0 has keys \\['file', 'objects'\\]"):
        build_pope([{"file": "x.jpg", "objects": []}])
    crowded = [
        {"image": "x.jpg", "objects": ["a1", "b1", "c1", "d1"]},
        {"image": "y.jpg", "objects": ["a1", "b1", "c1"]},
    ]
    with pytest.raises(InputError, match="image '[xy].jpg': no absent object is left"):
        build_pope(crowded, n_images=None, strategies=["random"])


def test_write_and_load_round_trip(tmp_path):
    q = build_pope(image_objects(tiny_instances()), n_images=4, seed=0)
    paths = write_pope_questions(q, tmp_path, prefix="tiny")
    assert sorted(p.name for p in paths.values()) == [
        "tiny_pope_adversarial.json",
        "tiny_pope_popular.json",
        "tiny_pope_random.json",
    ]
    first = json.loads(paths["random"].read_text().splitlines()[0])
    assert list(first) == ["question_id", "image", "text", "label"]
    loaded = load_pope_questions(tmp_path)
    assert sorted(loaded["split"].unique()) == ["adversarial", "popular", "random"]
    merged = loaded.merge(q, on=["split", "question_id"], suffixes=("", "_built"))
    assert len(merged) == 72 and (merged["text"] == merged["text_built"]).all()
    one = load_pope_questions(paths["popular"], split="dev")
    assert set(one["split"]) == {"dev"}


def test_load_errors(tmp_path):
    (tmp_path / "odd.json").write_text('{"question_id": 1, "image": "x", "text": "t", "label": "yes"}\n')
    with pytest.raises(InputError, match="cannot tell the split of odd.json"):
        load_pope_questions(tmp_path / "odd.json")
    (tmp_path / "a_pope_random.json").write_text('{"question_id": 1, "image": "x", "text": "t"}\n')
    with pytest.raises(InputError, match="lacks \\['label'\\]"):
        load_pope_questions(tmp_path / "a_pope_random.json")
    (tmp_path / "b_pope_random.json").write_text('{"question_id": 1, "image": "x", "text": "t", "label": "Yes"}\n')
    with pytest.raises(InputError, match="label 'Yes'"):
        load_pope_questions(tmp_path / "b_pope_random.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no \\*_pope_<split>.json files"):
        load_pope_questions(tmp_path / "empty")


def test_coco_reading_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="broken.json is not JSON"):
        image_objects(tmp_path / "broken.json")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(InputError, match="expected a list of JSON objects"):
        coco.read_records(tmp_path / "scalar.json")
    with pytest.raises(InputError, match="file not found"):
        coco.read_records(tmp_path / "none.jsonl")
    bad = tiny_instances()
    bad["annotations"][0]["category_id"] = 99
    with pytest.raises(InputError, match="category_id 99, which the file's categories do not define"):
        image_objects(bad)


@pytest.mark.parametrize(
    ("answer", "pope_rule", "opera_rule", "apasi_rule"),
    [
        ("Yes, there is a dog in the image.", "yes", "yes", "yes"),
        ("No, there is no dog.", "no", "no", "no"),
        ("No.", "no", "no", "yes"),  # APASI keeps the period: "No." is no negation word
        ("There isn't a dog.", "yes", "no", "yes"),  # only OPERA reads "n't"
        ("Yes. There is not a cat.", "yes", "no", "no"),  # the reference reads the first sentence only
        ("NO", "yes", "no", "yes"),
        ("no", "no", "no", "no"),
        ("Nope", "yes", "yes", "yes"),
        ("No\nthere is none", "yes", "yes", "yes"),  # words are split on single spaces
    ],
)
def test_answer_rules(answer, pope_rule, opera_rule, apasi_rule):
    assert (parse_yes_no(answer), parse_yes_no(answer, "opera"), parse_yes_no(answer, "apasi")) == (
        pope_rule,
        opera_rule,
        apasi_rule,
    )


def test_parse_errors():
    with pytest.raises(InputError, match="unknown answer rule 'llava'"):
        parse_yes_no("yes", "llava")
    with pytest.raises(InputError, match="expected the model's reply text"):
        parse_yes_no(None)  # type: ignore[arg-type]


def confusion(tp: int, fp: int, tn: int, fn: int) -> tuple[list[str], list[str]]:
    labels = ["yes"] * tp + ["no"] * fp + ["no"] * tn + ["yes"] * fn
    preds = ["yes"] * tp + ["yes"] * fp + ["no"] * tn + ["no"] * fn
    return labels, preds


def test_metrics_on_known_confusion_matrices():
    m = pope_metrics(*confusion(tp=3, fp=1, tn=4, fn=2))
    assert (m["n"], m["tp"], m["fp"], m["tn"], m["fn"]) == (10, 3, 1, 4, 2)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.6)
    assert (
        m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.7) and m["yes_ratio"] == pytest.approx(0.4)
    )
    always_yes = pope_metrics(*confusion(tp=5, fp=5, tn=0, fn=0))
    assert (always_yes["accuracy"], always_yes["precision"], always_yes["recall"], always_yes["yes_ratio"]) == (
        0.5,
        0.5,
        1.0,
        1.0,
    )
    assert always_yes["f1"] == pytest.approx(2 / 3)
    always_no = pope_metrics(*confusion(tp=0, fp=0, tn=5, fn=5))
    assert math.isnan(always_no["precision"]) and always_no["recall"] == 0.0 and math.isnan(always_no["f1"])
    assert always_no["yes_ratio"] == 0.0
    all_wrong = pope_metrics(*confusion(tp=0, fp=2, tn=0, fn=2))
    assert all_wrong["precision"] == 0.0 and all_wrong["recall"] == 0.0 and all_wrong["f1"] == 0.0
    with pytest.raises(InputError, match="2 labels but 1 predictions"):
        pope_metrics(["yes", "no"], ["yes"])
    with pytest.raises(InputError, match="label or prediction 'maybe'"):
        pope_metrics(["yes"], ["maybe"])


def test_score_per_split_with_answers_in_order_or_by_id():
    q = build_pope(image_objects(tiny_instances()), n_images=4, seed=0)
    truthful = ["Yes, there is." if label == "yes" else "No, there is not." for label in q["label"]]
    scores = score_pope(q, truthful)
    assert scores["split"].tolist() == ["random", "popular", "adversarial"]
    assert (scores["accuracy"] == 1.0).all() and (scores["yes_ratio"] == 0.5).all() and (scores["rule"] == "pope").all()
    by_id = q[["split", "question_id"]].assign(answer=["yes"] * len(q)).iloc[::-1]
    assert (score_pope(q, by_id, rule="opera")["precision"] == 0.5).all()
    with pytest.raises(InputError, match="questions lack columns \\['split'\\]"):
        score_pope(q.drop(columns="split"), truthful)
    with pytest.raises(InputError, match="71 answers for 72 questions"):
        score_pope(q, truthful[:-1])
    with pytest.raises(InputError, match="add a split column"):
        score_pope(q, by_id.drop(columns="split"))
    with pytest.raises(InputError, match="questions have no answer"):
        score_pope(q, by_id.iloc[1:])
    with pytest.raises(InputError, match="repeat some split/question_id"):
        score_pope(q, pd.concat([by_id, by_id.iloc[:1]]))


def test_docstring_examples():
    for module in (pope, coco):
        assert doctest.testmod(module, raise_on_error=False).failed == 0
