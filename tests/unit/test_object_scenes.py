"""Synthetic COCO-like scenes: deterministic files that pycocotools reads, truthful captions, the co-occurrence
structure, and POPE and CHAIR end to end on them with nothing downloaded."""

from __future__ import annotations

import doctest
import hashlib
import json

import pytest
from PIL import Image

from halluscope.errors import InputError
from halluscope.metrics.chair import chair_ground_truth, evaluate_chair, score_chair
from halluscope.metrics.coco import image_objects
from halluscope.metrics.nlp import NLPComponents, load_nlp, wordnet_available
from halluscope.metrics.pope import build_pope, load_pope_questions, score_pope, write_pope_questions
from halluscope.metrics.vocabulary import load_vocabulary
from halluscope.tasks import object_scenes
from halluscope.tasks.object_scenes import SCENE_SYNONYMS, SceneConfig, draw_object_scene, write_scene_dataset

# Every NLP step injected: whitespace tokens with punctuation stripped, and a plural rule that covers the
# scene words ("crosses" -> "cross", "discs" -> "disc").
PLAIN_NLP = NLPComponents(
    tokenize=lambda text: [w.strip(".,") for w in text.split()],
    tag=lambda tokens: ["NN"] * len(tokens),
    lemmatize=lambda word, pos: word,
    singularize=lambda w: w[:-2] if w.endswith("sses") else w if w.endswith("ss") else w.removesuffix("s"),
    names={"nlp": "custom"},
)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_scene_dataset(tmp_path_factory.mktemp("shapes"), n_images=40, seed=0)


def test_files_are_deterministic_for_a_seed(dataset, tmp_path):
    again = write_scene_dataset(tmp_path / "again", n_images=40, seed=0)
    for name in ("instances", "captions", "vocabulary"):
        assert digest(getattr(again, name)) == digest(getattr(dataset, name))
    assert digest(again.images / "shapes_000007.png") == digest(dataset.images / "shapes_000007.png")
    other = write_scene_dataset(tmp_path / "other", n_images=40, seed=1)
    assert digest(other.instances) != digest(dataset.instances)


def test_coco_format_that_pycocotools_reads(dataset):
    from pycocotools.coco import COCO

    coco = COCO(str(dataset.instances))
    assert len(coco.getImgIds()) == 40 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SCENE_SYNONYMS)
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert ann["iscrowd"] == 0 and ann["area"] > 0 and len(ann["bbox"]) == 4 and len(ann["segmentation"][0]) >= 6
    image = Image.open(dataset.images / coco.loadImgs([1])[0]["file_name"])
    assert image.size == (112, 112) and image.mode == "RGB"
    captions = json.loads(dataset.captions.read_text())["annotations"]
    assert len(captions) == 5 * 40 and {c["image_id"] for c in captions} == set(range(1, 41))


def test_category_counts_and_object_sizes(dataset):
    per_image = image_objects(dataset.instances)
    counts = [len(entry["objects"]) for entry in per_image]
    assert min(counts) >= 1 and max(counts) <= 5
    assert sum(c >= 3 for c in counts) >= 15  # enough images for POPE
    boxes = [a["bbox"] for a in json.loads(dataset.instances.read_text())["annotations"]]
    assert all(12 <= w <= 112 * 0.32 for _, _, w, _ in boxes)


def test_reference_captions_only_name_objects_that_are_there(dataset):
    vocabulary = load_vocabulary(dataset.vocabulary)
    from_instances = chair_ground_truth(
        dataset.instances, None, vocabulary=vocabulary, nlp=PLAIN_NLP, method="original"
    )
    captions = json.loads(dataset.captions.read_text())["annotations"]
    scores = score_chair(captions, from_instances, vocabulary=vocabulary, nlp=PLAIN_NLP, method="original")
    assert scores.summary["chair_i"] == 0.0 and scores.summary["n_mentions"] > 200
    assert scores.summary["recall"] > 0.7  # captions name most, not always all, of an image's objects


def test_cohesion_one_keeps_every_image_inside_a_group():
    config = SceneConfig(cohesion=1.0, min_categories=2, max_categories=2, max_instances=1)
    groups = [set(g) for g in config.groups]
    for index in range(30):
        present = {o["category"] for o in draw_object_scene(index, seed=3, config=config).objects}
        assert len(present) < 2 or present in groups


def test_a_scene_redraws_on_its_own():
    first = draw_object_scene(5, seed=2)
    again = draw_object_scene(5, seed=2)
    assert first.objects == again.objects and first.captions == again.captions
    assert first.image.tobytes() == again.image.tobytes()


def test_config_errors(tmp_path):
    with pytest.raises(InputError, match="expected distinct names"):
        SceneConfig(categories=("circle", "spiral"))
    with pytest.raises(InputError, match="each member must be a listed category"):
        SceneConfig(categories=("circle", "square", "star"), groups=(("circle", "heart"),))
    with pytest.raises(InputError, match="at least two distinct categories"):
        SceneConfig(categories=("circle", "square", "star"), groups=(("circle", "circle"),))
    with pytest.raises(InputError, match="1 <= min <= max <= 3"):
        SceneConfig(categories=("circle", "square", "star"), groups=(), max_categories=4)
    with pytest.raises(InputError, match="cohesion = 1.5"):
        SceneConfig(cohesion=1.5)
    with pytest.raises(InputError, match=">= 64"):
        SceneConfig(size=32)
    with pytest.raises(InputError, match="n_images = 0"):
        write_scene_dataset(tmp_path, n_images=0, seed=0)


def test_pope_end_to_end(dataset, tmp_path):
    objects = image_objects(dataset.instances)
    questions = build_pope(objects, n_images=12, seed=0)
    write_pope_questions(questions, tmp_path, prefix="shapes")
    loaded = load_pope_questions(tmp_path)
    present = {entry["image"]: set(entry["objects"]) for entry in objects}
    oracle = [
        "Yes, there is." if text.split("a ", 1)[1].split(" in")[0].removeprefix("n ") in present[image] else "No."
        for image, text in zip(loaded["image"], loaded["text"])
    ]
    scores = score_pope(loaded, oracle)
    assert (scores["accuracy"] == 1.0).all() and len(scores) == 3


def test_chair_end_to_end_with_injected_nlp(dataset):
    vocabulary = load_vocabulary(dataset.vocabulary)
    generated = [{"image_id": i, "caption": "A red heart and a blue cross."} for i in range(1, 11)]
    truth = {i: {o for o in objs["objects"]} for i, objs in enumerate(image_objects(dataset.instances), start=1)}
    scores = evaluate_chair(
        generated, dataset.instances, dataset.captions, vocabulary=vocabulary, nlp=PLAIN_NLP, method="original"
    )
    expected_hallucinated = sum(("heart" not in truth[i]) + ("cross" not in truth[i]) for i in range(1, 11))
    assert scores.summary["n_hallucinated"] == expected_hallucinated and scores.summary["n_mentions"] == 20


@pytest.mark.skipif(
    not wordnet_available(),
    reason="no WordNet: install `apt-get install -y wordnet-base wordnet-sense-index`; runs once it is present",
)
def test_chair_end_to_end_with_offline_nlp(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("HALLUSCOPE_NLTK_DATA", str(tmp_path / "nltk_data"))
    vocabulary = load_vocabulary(dataset.vocabulary)
    captions = json.loads(dataset.captions.read_text())["annotations"][::5]
    scores = evaluate_chair(
        captions, dataset.instances, dataset.captions, vocabulary=vocabulary, nlp=load_nlp("offline")
    )
    assert scores.summary["chair_i"] == 0.0 and scores.summary["nlp"] == "offline"
    assert scores.summary["vocabulary"] == "vocabulary_shapes"


def test_docstring_examples():
    assert doctest.testmod(object_scenes, raise_on_error=False).failed == 0
