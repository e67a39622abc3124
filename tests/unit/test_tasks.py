"""Tasks: Sample records and their frame, synthetic scenes, prompt construction, and the task registry."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes, open_image
from halluscope.tasks import (
    COLOR_CYCLE,
    DEFAULT_OFFSETS,
    SHAPES,
    Sample,
    build_task,
    color_samples,
    color_scene,
    count_scene,
    counting_samples,
    get_task,
    register_task,
    samples_from_frame,
    samples_to_frame,
    shift_color,
    synthetic_color,
    synthetic_counting,
)
from halluscope.tasks.color import VISUAL_COUNTERFACT_HUB_ID, parse_color_list, validate_distances
from halluscope.tasks.counting import COUNTBENCH_HUB_ID, validate_offsets
from halluscope.tasks.registry import TaskSpec
from halluscope.tasks.scenes import COLOR_RGB, max_objects


def objects_in(image) -> list[tuple[int, int]]:
    """(height, width) of each 8-connected region of non-background pixels (background = the corner pixel)."""
    pixels = np.asarray(image.convert("RGB")).astype(np.int32)
    mask = np.any(pixels != pixels[0, 0], axis=-1)
    h, w = mask.shape
    empty = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), empty)
    while True:  # propagate the smallest label through each region until nothing changes
        padded = np.pad(labels, 1, constant_values=empty)
        smallest = np.min([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)
        updated = np.where(mask, smallest, empty)
        if np.array_equal(updated, labels):
            break
        labels = updated
    extents = []
    for label in np.unique(labels[mask]):
        ys, xs = np.nonzero(labels == label)
        extents.append((int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)))
    return extents


# --- scenes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [112, 224])
@pytest.mark.parametrize("shape", SHAPES)
def test_count_scene_draws_exactly_n_separate_objects(size, shape):
    for n, seed in [(1, 0), (7, 1), (20, 2)]:
        objects = objects_in(count_scene(n, shape, size=size, seed=seed))
        assert len(objects) == n, (shape, size, n)
        assert min(max(e) for e in objects) >= 10  # a 14-px-patch model must still see each object


def test_count_scene_fills_to_capacity_without_merging():
    n = max_objects(112)
    assert n >= 20
    assert len(objects_in(count_scene(n, "star", size=112, seed=5))) == n


def test_scenes_are_deterministic_by_seed():
    a = image_to_png_bytes(count_scene(6, "triangle", size=112, seed=3))
    assert a == image_to_png_bytes(count_scene(6, "triangle", size=112, seed=3))
    assert a != image_to_png_bytes(count_scene(6, "triangle", size=112, seed=4))
    b = image_to_png_bytes(color_scene("blue", "diamond", size=112, seed=3))
    assert b == image_to_png_bytes(color_scene("blue", "diamond", size=112, seed=3))
    assert b != image_to_png_bytes(color_scene("blue", "diamond", size=112, seed=4))


def test_scenes_do_not_touch_the_global_random_state():
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    count_scene(5, "circle", size=112, seed=0)
    assert random.random() == expected


@pytest.mark.parametrize("color", COLOR_CYCLE)
def test_color_scene_uses_only_the_exact_colour_on_neutral_grey(color):
    pixels = np.asarray(color_scene(color, "star", size=112, seed=1)).reshape(-1, 3)
    values = {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}
    background = tuple(int(v) for v in pixels[0])
    assert background[0] == background[1] == background[2]
    assert values == {background, COLOR_RGB[color]}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: count_scene(200, "circle", size=112, seed=0), "cannot fit n = 200"),
        (lambda: count_scene(0, "circle", seed=0), "n = 0"),
        (lambda: count_scene(3, "circel", seed=0), "did you mean 'circle'"),
        (lambda: count_scene(3, "circle", size=16, seed=0), "image size = 16"),
        (lambda: count_scene(3, "circle", seed=1.5), "seed = 1.5"),
        (lambda: color_scene("violet", "circle", seed=0), "unknown colour 'violet'"),
        (lambda: color_scene("red", "hexagon", seed=0), "unknown shape 'hexagon'"),
    ],
)
def test_scene_errors(call, message):
    with pytest.raises(InputError, match=message):
        call()


# --- counting prompts -------------------------------------------------------------------------------------------


def test_counting_prompts_are_the_reference_templates_plus_a_truthful_control():
    samples = counting_samples([("0003", b"img", 3, "apples")])
    assert [s.condition for s in samples] == ["base", "control"] + [f"+{k}" for k in DEFAULT_OFFSETS]
    assert samples[0].prompt == "How many apples are in this image?"
    assert samples[1].prompt == "Describe the 3 apples in this image."
    assert samples[3].prompt == "Describe the 5 apples in this image."
    assert samples[-1].prompt == "Describe the 53 apples in this image."
    assert [s.claim for s in samples] == [None, 3] + [3 + k for k in DEFAULT_OFFSETS]
    assert {s.truth for s in samples} == {3} and {s.task for s in samples} == {"count"}
    assert samples[3].id == "count-0003-+2"
    assert [s.kind for s in samples[:3]] == ["base", "control", "misleading"]


@pytest.mark.parametrize(
    "offsets, message",
    [
        ((), "none given"),
        ((0, 1), r"bad: \[0\]"),
        ((1, 1), r"repeat \[1\]"),
        ((1.5,), "bad"),
        ("12", "sequence"),
        ((True,), "bad"),
    ],
)
def test_offsets_are_validated(offsets, message):
    with pytest.raises(InputError, match=message):
        validate_offsets(offsets)


@pytest.mark.parametrize(
    "item, message",
    [
        (("a", b"x", 0, "apples"), "count = 0"),
        (("a", b"x", 2, " "), "object noun"),
        (("a", 3.0, 2, "apples"), "image of type float"),
        (("a", b"x", 2), "expected \\(image_id, image, count, noun\\)"),
    ],
)
def test_counting_item_errors(item, message):
    with pytest.raises(InputError, match=message):
        counting_samples([item])


def test_counting_rejects_a_repeated_image_id():
    with pytest.raises(InputError, match="'a' appears twice"):
        counting_samples([("a", b"x", 2, "cats"), ("a", b"y", 3, "dogs")])


def test_synthetic_counting_is_balanced_and_its_images_show_the_true_count():
    samples = synthetic_counting(max_count=4, size=112, seed=0, offsets=(1,))
    base = [s for s in samples if s.condition == "base"]
    pairs = Counter((s.truth, s.object) for s in base)
    assert len(base) == 4 * len(SHAPES) and set(pairs.values()) == {1}
    assert len(pairs) == 4 * len(SHAPES)
    for s in base[::3]:
        image = open_image(s.image)
        assert image.size == (112, 112)
        assert len(objects_in(image)) == s.truth
    partial = [s for s in synthetic_counting(13, max_count=9, size=112, offsets=(1,)) if s.condition == "base"]
    counts, shapes = Counter(s.truth for s in partial), Counter(s.object for s in partial)
    assert max(counts.values()) - min(counts.values()) <= 1 and set(counts) == set(range(1, 10))
    assert max(shapes.values()) - min(shapes.values()) <= 1 and len(shapes) == len(SHAPES)


def test_synthetic_counting_is_deterministic_by_seed():
    a = synthetic_counting(3, size=112, seed=7, offsets=(1,))
    assert a == synthetic_counting(3, size=112, seed=7, offsets=(1,))
    assert [s.image for s in a] != [s.image for s in synthetic_counting(3, size=112, seed=8, offsets=(1,))]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_count": 65}, "max_count = 65 objects do not fit"),
        ({"min_count": 5, "max_count": 3}, "max_count = 3 < min_count = 5"),
        ({"shapes": ("circle", "blob")}, "shapes = "),
        ({"offsets": (0,)}, "offsets"),
    ],
)
def test_synthetic_counting_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        synthetic_counting(2, size=112, **kwargs)


# --- colour prompts ---------------------------------------------------------------------------------------------

REFERENCE_TABLE = {  # the reference's d = 0, 1, 2 (ours d1, d2, d3)
    "red": ("purple", "blue", "green"),
    "orange": ("red", "purple", "blue"),
    "yellow": ("orange", "red", "purple"),
    "green": ("yellow", "orange", "red"),
    "blue": ("green", "yellow", "orange"),
    "purple": ("blue", "green", "yellow"),
}


def test_colour_distances_match_the_reference_table():
    assert COLOR_CYCLE == ("red", "orange", "yellow", "green", "blue", "purple")
    assert set(COLOR_RGB) == set(COLOR_CYCLE)
    for truth, expected in REFERENCE_TABLE.items():
        assert tuple(shift_color(truth, d) for d in (1, 2, 3)) == expected


def test_colour_prompts_and_alias_skipping():
    samples = color_samples([("0001", b"img", "red", "fire truck", ("purple", "white"))])
    # d1 would claim "purple", one of the truck's true colours: not misleading, so left out
    assert [s.condition for s in samples] == ["base", "control", "d2", "d3"]
    assert [s.prompt for s in samples] == [
        "What color is the fire truck in the image?",
        "Describe the red fire truck.",
        "Describe the blue fire truck.",
        "Describe the green fire truck.",
    ]
    assert [s.claim for s in samples] == [None, "red", "blue", "green"]
    assert samples[0].truth_aliases == ("purple", "white") and samples[2].id == "color-0001-d2"


@pytest.mark.parametrize(
    "distances, message", [((0,), "bad"), ((6,), "bad"), ((2, 2), "repeat"), ((), "none given"), ("123", "sequence")]
)
def test_distances_are_validated(distances, message):
    with pytest.raises(InputError, match=message):
        validate_distances(distances)


def test_colour_item_errors():
    with pytest.raises(InputError, match="colour 'brown' is not one of"):
        color_samples([("a", b"x", "brown", "bear")])
    with pytest.raises(InputError, match="object noun"):
        color_samples([("a", b"x", "red", "")])
    with pytest.raises(InputError, match="not in the cycle"):
        shift_color("pink", 1)


def test_parse_color_list():
    assert parse_color_list("['Brown', 'white']") == ("brown", "white")
    assert parse_color_list(np.array(["red", "blue"], dtype=object)) == ("red", "blue")
    assert parse_color_list(" Red ") == ("red",)
    for bad, message in [("['red',", "not a Python list literal"), ("[1, 2]", "non-empty strings"), (None, "empty"),
                         ("__import__('os')", None)]:
        if message is None:  # a bare word is one colour; literal_eval is never reached, eval never used
            assert parse_color_list(bad) == ("__import__('os')",)
            continue
        with pytest.raises(InputError, match=message):
            parse_color_list(bad)


def test_synthetic_colour_is_balanced_and_draws_the_true_colour():
    samples = synthetic_color(size=112, seed=0)
    base = [s for s in samples if s.condition == "base"]
    assert len(base) == 6 * len(SHAPES)
    assert set(Counter((s.truth, s.object) for s in base).values()) == {1}
    for s in base[:6]:
        pixels = {tuple(p) for p in np.asarray(open_image(s.image)).reshape(-1, 3).tolist()}
        assert tuple(COLOR_RGB[s.truth]) in pixels and len(pixels) == 2
    assert samples == synthetic_color(size=112, seed=0)


# --- Sample and its frame ---------------------------------------------------------------------------------------


def _mixed_samples(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(image_to_png_bytes(count_scene(2, "circle", size=64, seed=0)))
    count = counting_samples([("p", str(path), 2, "circles"), ("b", path.read_bytes(), 2, "circles")], offsets=(1, 50))
    color = color_samples([("c", path.read_bytes(), "blue", "ball", ("white",)), ("d", str(path), "red", "cup")])
    return list(count) + list(color)


def test_samples_frame_round_trips_exactly_through_parquet(tmp_path):
    samples = _mixed_samples(tmp_path)
    frame = samples_to_frame(samples)
    assert list(frame.columns) == [
        "id", "image_id", "task", "condition", "object", "truth", "claim", "truth_aliases", "prompt",
        "image_path", "image_bytes",
    ]
    assert frame["image_path"].notna().sum() + frame["image_bytes"].notna().sum() == len(samples)
    frame.to_parquet(tmp_path / "samples.parquet")
    back = samples_from_frame(pd.read_parquet(tmp_path / "samples.parquet"))
    assert back == samples
    assert all(type(a.truth) is type(b.truth) and type(a.image) is type(b.image) for a, b in zip(back, samples))
    only_bytes = synthetic_counting(1, size=64, offsets=(1,))
    samples_to_frame(only_bytes).to_parquet(tmp_path / "bytes.parquet")
    assert samples_from_frame(pd.read_parquet(tmp_path / "bytes.parquet")) == only_bytes


def test_samples_frame_errors(tmp_path):
    samples = _mixed_samples(tmp_path)
    with pytest.raises(InputError, match="repeated: \\['count-p-base'\\]"):
        samples_to_frame([samples[0], samples[0]])
    with pytest.raises(InputError, match="is a str, not a Sample"):
        samples_to_frame(["x"])
    frame = samples_to_frame(samples)
    with pytest.raises(InputError, match=r"lacks columns \['prompt'\]"):
        samples_from_frame(frame.drop(columns=["prompt"]))
    frame.loc[0, "truth"] = "three"
    with pytest.raises(InputError, match="row 0 .*'three' is not a number"):
        samples_from_frame(frame)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"id": ""}, "Sample.id"),
        ({"truth": "3"}, "needs an int"),
        ({"claim": 4.0}, "claim = 4.0"),
        ({"image": 5}, "image of type int"),
        ({"truth_aliases": ("",)}, "truth_aliases"),
        ({"task": "color", "truth": 3}, "needs a str"),
    ],
)
def test_sample_validation(changes, message):
    fields = dict(
        id="i", image_id="0", image=b"x", object="cats", truth=3, claim=4, prompt="p", condition="+1", task="count"
    )
    with pytest.raises(InputError, match=message):
        Sample(**{**fields, **changes})


# --- registry ---------------------------------------------------------------------------------------------------


def test_build_task_dispatches_to_synthetic_builders():
    count = build_task("counting", "synthetic", n=2, seed=1, offsets=(3,), size=112)
    assert [s.id for s in count] == ["count-0000-base", "count-0000-control", "count-0000-+3"] + [
        "count-0001-base", "count-0001-control", "count-0001-+3"]
    assert count == synthetic_counting(2, seed=1, offsets=(3,), size=112)
    color = build_task("colour", "synthetic", n=1, seed=0, distances=(3,), size=112)
    assert [s.prompt for s in color][-1] == "Describe the green circle."
    assert color.skipped == ()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_task("cout"), "unknown task 'cout'. Did you mean 'count'\\? Available: color, count"),
        (lambda: build_task("count", n=1, distances=(1,)), "distances = \\(1,\\) does not apply to task 'count'"),
        (lambda: build_task("color", n=1, offsets=(1,)), "use distances=..."),
        (lambda: build_task("count", n=1, sise=112), "unknown option 'sise' \\(did you mean 'size'\\?\\)"),
        (lambda: build_task("count", n=1, limit=3), "unknown option 'limit'"),
        (lambda: build_task("count", "synthetc"), "Did you mean 'synthetic'"),
        (lambda: build_task("count", "synthetic", n=0), "n_images = 0"),
    ],
)
def test_build_task_errors(call, message):
    with pytest.raises(InputError, match=message):
        call()


def test_reference_data_means_the_reference_hub_dataset(monkeypatch):
    assert get_task("count").hub_id == COUNTBENCH_HUB_ID
    assert get_task("color").hub_id == VISUAL_COUNTERFACT_HUB_ID
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(InputError, match="'nielsr/countbench' is not a local file .*pip install datasets"):
        build_task("count", "reference")


def test_register_task_rejects_duplicates():
    with pytest.raises(InputError, match=r"\['count'\] already registered"):
        register_task(TaskSpec(name="count", target="x:y", knob="offsets", hub_id="a/b"))
    with pytest.raises(InputError, match=r"\['colour'\] already registered"):
        register_task(TaskSpec(name="paint", target="x:y", knob="offsets", hub_id="a/b", aliases=("colour",)))
    with pytest.raises(InputError, match="not 'module:function'"):
        register_task(TaskSpec(name="paint", target="x.y", knob="offsets", hub_id="a/b"))


def test_importing_tasks_loads_neither_pandas_nor_pil():
    code = "import sys, halluscope.tasks; print('pandas' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("module", ["sample", "scenes", "counting", "color", "registry"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(f"halluscope.tasks.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_remaining_input_errors(tmp_path):
    frame = samples_to_frame(_mixed_samples(tmp_path))
    both_null = frame.copy()
    both_null.loc[0, ["image_path", "image_bytes"]] = None
    with pytest.raises(InputError, match="both image_path and image_bytes are null"):
        samples_from_frame(both_null)
    fractional = frame.copy()
    fractional.loc[0, "truth"] = "2.5"
    with pytest.raises(InputError, match="'2.5' is not an integer"):
        samples_from_frame(fractional)
    with pytest.raises(InputError, match="has 3 fields"):
        color_samples([("a", b"x", "red")])
    with pytest.raises(InputError, match="'a' appears twice"):
        color_samples([("a", b"x", "red", "cup"), ("a", b"x", "blue", "cup")])
    with pytest.raises(InputError, match="shapes = "):
        synthetic_color(1, shapes=())
    with pytest.raises(InputError, match="is not a list"):
        parse_color_list(5)
