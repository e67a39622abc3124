"""The pieces of `halluscope bench`: method specs, where data comes from, and the scoring of POPE and CHAIR
replies into comparison tables (hand-computed), with the one-line errors for bad input."""

from __future__ import annotations

import doctest
import re

import pandas as pd
import pytest

from halluscope.bench import methods as methods_module
from halluscope.bench import step as step_module
from halluscope.bench.data import load_bench_data
from halluscope.bench.methods import parse_method, parse_methods
from halluscope.errors import InputError
from halluscope.metrics.nlp import NLPComponents
from halluscope.runs import Run
from halluscope.tasks.object_scenes import write_scene_dataset

# whitespace tokens, punctuation stripped, plurals by dropping "s": enough for "two squares"
PLAIN_NLP = NLPComponents(tokenize=lambda text: [w.strip(".,") for w in text.split()],
                          tag=lambda tokens: ["NN"] * len(tokens), lemmatize=lambda word, pos: word.removesuffix("s"),
                          singularize=lambda word: word.removesuffix("s"), names={"nlp": "custom"})


def test_methods_are_canonical_and_greedy_comes_first():
    assert [m.name for m in parse_methods(["heads:l1h2,L0H1", "heads:L0H1,L1H2", "greedy"], 2, 4)] == \
        ["greedy", "heads:L0H1,L1H2"]
    method = parse_method("heads:L0H1", 2, 4)
    assert method.heads == {(0, 1)} and method.slug == "ablation_L0H1"
    assert method.record() == {"method": "heads:L0H1", "decoder": "heads", "config": {"heads": "L0H1", "alpha": 0.0},
                               "strategy": "greedy"}
    assert parse_method("greedy", 2, 4).decoder.name == "greedy"


def test_every_registered_method_is_a_bench_method_named_by_its_non_default_settings():
    from halluscope.decoding import available_methods

    for name in available_methods():
        method = parse_method("heads:L0H1" if name == "heads" else name, 2, 4)
        expected = ("heads:L0H1", "ablation_L0H1") if name == "heads" else (name, name)
        assert method.decoder.name == name and (method.name, method.slug) == expected
    # an alias, an int for a float setting and a default written out all name the same method
    assert parse_method('vcd:{"alpha": 1, "beta": 0.1}', 2, 4).name == "vcd"
    assert parse_method('vcd:{"alpha": 0}', 2, 4).name == parse_method('vcd:{"alpha": 0.0}', 2, 4).name == \
        'vcd:{"alpha":0.0}'
    assert parse_method("clearsight", 2, 4).name == "vaf" and parse_method("pih:L0H1", 2, 4).name == "heads:L0H1"
    scaled = parse_method('heads:{"heads": "L1H0,L0H1", "alpha": 0.5}', 2, 4)
    assert scaled.name == 'heads:{"alpha":0.5,"heads":"L0H1,L1H0"}' and scaled.heads == {(0, 1), (1, 0)}
    # two configs of one method are two rows and two steps
    two = parse_methods(["vcd", 'vcd:{"alpha": 0.5}', 'vcd:{"beta": 0.2}'], 2, 4)
    assert len({m.slug for m in two}) == 4 and two[2].record()["config"]["alpha"] == 0.5


def test_a_ranked_head_set_comes_from_its_run(tmp_path):
    run = Run.create(tmp_path / "ranked", step="eval", arguments={})
    run.write_json("heads", {"top": {}, "best": {"best2": [[1, 0], [0, 3]]}})
    method = parse_method(f"heads:best2@{tmp_path / 'ranked'}", 2, 4)
    assert method.name == "heads:L0H3,L1H0" and method.spec.startswith("heads:best2@")
    assert method.record() == parse_method("heads:L1H0,L0H3", 2, 4).record()  # one method, one step


@pytest.mark.parametrize("spec,message", [
    ("greedly", "Did you mean 'greedy'"),
    ("vdc", "Did you mean 'vcd'"),
    ("greedy:fast", "takes no argument"),
    ("heads", "needs heads"),
    ("heads:best3", "needs the run that ranked it"),
    ("heads:L5H0", "out of range"),
    ("heads:L0X1", "malformed head"),
    ("vcd:0.5", "not a JSON object of settings; write e.g. vcd:{\"alpha\": 1.0}"),
    ("vcd:{alpha: 1}", "not valid JSON"),
    ('vcd:{"alpa": 1}', "Did you mean 'alpha'"),
    ('vcd:{"alpha": -1}', "out of range"),
])
def test_bad_methods_fail_in_one_line(spec, message):
    with pytest.raises(InputError, match=re.escape(message)) as error:
        parse_method(spec, 2, 4)
    assert "\n" not in str(error.value)


def test_a_data_directory_is_read_and_its_problems_named(tmp_path):
    ds = write_scene_dataset(tmp_path / "scenes", n_images=3, seed=0)
    data = load_bench_data(str(ds.root), n=3, seed=0)
    assert data.vocabulary_name == "shapes" and data.vocabulary[0][0] == "circle"
    assert data.image(1) == str((ds.images / "shapes_000001.png").resolve())
    kept = data.annotations({2})
    assert {a["image_id"] for a in kept["instances"]["annotations"]} == {2}
    assert [i["id"] for i in kept["captions"]["images"]] == [2]
    with pytest.raises(InputError, match="neither 'synthetic' nor a directory"):
        load_bench_data(str(tmp_path / "nowhere"), n=3, seed=0)
    (ds.images / "shapes_000002.png").unlink()
    with pytest.raises(InputError, match=r"image 2 \('shapes_000002.png'\) is in neither"):
        data.image(2)
    (ds.root / "annotations" / "instances_more.json").write_text(ds.instances.read_text())
    with pytest.raises(InputError, match="2 files matching instances_"):
        load_bench_data(str(ds.root), n=3, seed=0)


def test_synthetic_data_is_drawn_with_the_minimum_categories_and_without_a_vocabulary_file():
    data = load_bench_data("synthetic", n=4, seed=1, min_categories=3)
    per_image = {}
    for annotation in data.instances["annotations"]:
        per_image.setdefault(annotation["image_id"], set()).add(annotation["category_id"])
    assert len(per_image) == 4 and min(map(len, per_image.values())) >= 3
    assert isinstance(data.image(1), bytes) and data.root is None


def test_pope_scores_each_method_and_split_as_counted_by_hand():
    from halluscope.bench.pope import COLUMNS, score

    items = pd.DataFrame({"item": range(4), "image_id": 1, "split": ["random"] * 2 + ["adversarial"] * 2,
                          "question_id": [1, 2, 1, 2], "object": ["a", "b", "a", "c"],
                          "label": ["yes", "no", "yes", "no"], "prompt": "?"})
    replies = pd.DataFrame({"method": ["greedy"] * 4 + ["heads:L0H1"] * 4, "item": [0, 1, 2, 3] * 2,
                            "reply": ["Yes.", "No.", "Yes.", "Yes, there is.", "No.", "No.", "Yes.", "No."]})
    table, details, notes = score(items, replies, rule="pope")
    assert list(table.columns) == list(COLUMNS)
    rows = table.set_index(["method", "split"])
    assert rows.loc[("greedy", "random"), "accuracy"] == 1.0
    assert rows.loc[("greedy", "adversarial"), ["accuracy", "yes_ratio", "precision"]].tolist() == [0.5, 1.0, 0.5]
    never_yes = rows.loc[("heads:L0H1", "random")]
    assert never_yes[["accuracy", "recall", "yes_ratio"]].tolist() == [0.5, 0.0, 0.0]
    assert never_yes[["precision", "f1"]].isna().all()  # no "yes" at all: precision undefined
    assert details["prediction"].tolist()[:4] == ["yes", "no", "yes", "yes"]
    assert notes == {"rule": "pope", "questions_per_split": {"random": 2, "adversarial": 2}}


def test_chair_scores_each_method_as_counted_by_hand():
    from halluscope.bench.chair import COLUMNS, score

    instances = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "circle"},
                                                                  {"id": 2, "name": "square"}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1},
                                 {"id": 2, "image_id": 2, "category_id": 2}]}
    annotations = {"instances": instances, "captions": None, "vocabulary": [["circle", "disc"], ["square"]],
                   "vocabulary_name": "toy"}
    items = pd.DataFrame({"item": [0, 1], "image_id": [1, 2], "prompt": "Describe this image."})
    replies = pd.DataFrame({"method": ["greedy", "greedy", "m", "m"], "item": [0, 1, 0, 1],
                            "reply": ["A disc and two squares.", "A square.", "A circle.", "Nothing."]})
    table, details, notes = score(items, replies, annotations=annotations, nlp_components=PLAIN_NLP)
    assert list(table.columns) == list(COLUMNS)
    greedy, other = table.to_dict("records")
    # greedy: image 1 names circle (right) and square (wrong); image 2 names square (right)
    assert (greedy["chair_s"], greedy["chair_i"], greedy["recall"]) == (0.5, 1 / 3, 1.0)
    assert (other["chair_s"], other["recall"]) == (0.0, 0.5)
    assert details.groupby("method")["n_hallucinated"].sum().to_dict() == {"greedy": 1, "m": 0}
    assert notes["nlp"] == "custom" and notes["vocabulary"] == "toy" and notes["chair_method"] == "opera"


def test_pih_scores_each_method_as_eval_classifies_and_counted_by_hand():
    from halluscope.bench.pih import COLUMNS, build_items, score

    items, images, annotations = build_items("synthetic", n=2, seed=0, task="count", offsets=(1, 2), size=112)
    assert len(items) == 8 and len(images) == 2 and annotations["task"] == "count"
    assert items["condition"].tolist() == ["base", "control", "+1", "+2"] * 2

    def says(number, row) -> str:
        return f"There are {number} {row.object}."

    rows = list(items.itertuples())
    # greedy: every base question right, every misleading claim copied; m: the first base question wrong (by one),
    # misleading claims corrected on the first image and answered without a number on the second
    greedy = [says(int(r.truth) if r.condition == "base" else int(r.claim), r) for r in rows]
    other = [says(int(r.truth) + (r.item == 0), r) if r.condition in ("base", "control")
             else says(int(r.truth), r) if r.item < 4 else "I cannot tell." for r in rows]
    replies = pd.DataFrame({"method": ["greedy"] * 8 + ["m"] * 8, "item": list(range(8)) * 2,
                            "reply": greedy + other})
    table, details, notes = score(items, replies)
    assert list(table.columns) == list(COLUMNS)
    assert table.to_dict("records") == [
        {"method": "greedy", "base_accuracy": 1.0, "copy_rate": 1.0, "correction_rate": 0.0, "n_base": 2,
         "n_misleading": 4},
        {"method": "m", "base_accuracy": 0.5, "copy_rate": 0.0, "correction_rate": 0.5, "n_base": 2,
         "n_misleading": 4}]
    assert details.groupby("method")["outcome"].apply(list).to_dict() == {
        "greedy": ["corrected", "corrected", "copied", "copied"] * 2,  # a truthful control is "corrected"
        "m": ["other", "corrected", "corrected", "corrected", "corrected", "corrected", "none", "none"]}
    assert str(details["answer"].dtype) == "Int64"
    assert notes["copy_rate_by_condition"]["m"] == {"+1": 0.0, "+2": 0.0}


def test_unknown_benchmark_and_bad_options_fail_before_a_model_is_loaded(tmp_path):
    with pytest.raises(InputError, match="unknown benchmark 'mme'"):
        step_module.bench_step(tmp_path / "run", benchmark="mme", model="nowhere")
    with pytest.raises(InputError, match="unknown --rule 'strict'"):
        step_module.bench_step(tmp_path / "run", benchmark="pope", model="nowhere", rule="strict")
    with pytest.raises(InputError, match="unknown CHAIR method"):
        step_module.bench_step(tmp_path / "run", benchmark="chair", model="nowhere", chair_method="fast")
    with pytest.raises(InputError, match="unknown task 'counts'. Did you mean 'count'"):
        step_module.bench_step(tmp_path / "run", benchmark="pih", model="nowhere", task="counts")
    with pytest.raises(InputError, match="bench pih asks the task's own prompts"):
        step_module.bench_step(tmp_path / "run", benchmark="pih", model="nowhere", prompt="How many?")
    assert not (tmp_path / "run").exists()


def test_docstring_examples():
    for module in (methods_module, step_module):
        assert doctest.testmod(module, raise_on_error=False).failed == 0, module.__name__

