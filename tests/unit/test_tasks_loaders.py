"""Task loaders on tables built in the test (parquet, arrow, json, jsonl, csv, image folders, a fake hub): images
are drawn, never downloaded."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import pytest

from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes
from halluscope.tasks import SkippedRowsWarning, build_task, load_countbench, load_visual_counterfact
from halluscope.tasks.scenes import color_scene, count_scene

BROKEN = b"\x89PNG\r\n\x1a\nthis is not an image"


def png(n: int, seed: int = 0) -> bytes:
    return image_to_png_bytes(count_scene(n, "circle", size=48, seed=seed))


def countbench_frame() -> pd.DataFrame:
    """Three rows like nielsr/countbench; row 1's image is corrupt."""
    return pd.DataFrame(
        {
            "image": [{"bytes": data, "path": None} for data in (png(2), BROKEN, png(4))],
            "number": [2, 3, 4],
            "object": ["circles", "cups", "circles"],
            "text": ["two circles", "three cups", "four circles"],
        }
    )


def base_prompts(samples) -> list[tuple[str, int, str]]:
    return [(s.image_id, s.truth, s.prompt) for s in samples if s.condition == "base"]


def test_parquet_with_hf_image_dicts_skips_and_reports_the_undecodable_row(tmp_path):
    path = tmp_path / "countbench.parquet"
    countbench_frame().to_parquet(path)
    with pytest.warns(SkippedRowsWarning, match="skipped 1 of 3 rows .*image ids 0001") as record:
        samples = load_countbench(path, offsets=(1, 2))
    assert base_prompts(samples) == [
        ("0000", 2, "How many circles are in this image?"),
        ("0002", 4, "How many circles are in this image?"),
    ]
    assert len(samples) == 2 * 4
    assert [(s.row, s.image_id) for s in samples.skipped] == [(1, "0001")]
    assert "cannot decode image" in samples.skipped[0].reason
    assert record[0].message.skipped == samples.skipped
    assert isinstance(samples[0].image, bytes)


def test_json_csv_and_jsonl_tables_with_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(i + 2))
    records = [{"image": f"imgs/{i}.png", "number": i + 2, "object": "dots"} for i in range(2)]
    (tmp_path / "t.json").write_text(json.dumps(records))
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    pd.DataFrame(records).to_csv(tmp_path / "t.csv", index=False)
    expected = [("0000", 2, "How many dots are in this image?"), ("0001", 3, "How many dots are in this image?")]
    for name in ("t.json", "t.jsonl", "t.csv"):
        samples = load_countbench(tmp_path / name, offsets=(1,))
        assert base_prompts(samples) == expected, name
        assert samples[0].image == str(tmp_path / "imgs" / "0.png")  # resolved against the table's folder
        assert samples.skipped == ()


@pytest.mark.parametrize("metadata", ["metadata.csv", "metadata.jsonl"])
def test_image_folder_with_metadata(tmp_path, metadata):
    for i in range(3):
        (tmp_path / f"{i:04d}.png").write_bytes(png(i + 1))
    rows = [{"file_name": f"{i:04d}.png", "number": i + 1} for i in range(3)]
    if metadata.endswith(".csv"):
        pd.DataFrame(rows).to_csv(tmp_path / metadata, index=False)
    else:
        (tmp_path / metadata).write_text("\n".join(json.dumps(r) for r in rows))
    samples = load_countbench(tmp_path, objects={0: "stars", "0001": "moons", "0002.png": "suns"}, offsets=(1,))
    assert [s.object for s in samples if s.condition == "base"] == ["stars", "moons", "suns"]
    assert samples[0].image == str(tmp_path / "0000.png")


@pytest.mark.parametrize("writer", ["stream", "file"])
def test_arrow_files(tmp_path, writer):
    table = pa.Table.from_pandas(countbench_frame().drop(index=1).reset_index(drop=True))
    path = tmp_path / "data.arrow"
    open_writer = pyarrow.ipc.new_stream if writer == "stream" else pyarrow.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, open_writer(sink, table.schema) as out:
        out.write_table(table)
    assert [s.truth for s in load_countbench(path, offsets=(1,)) if s.condition == "base"] == [2, 4]


def test_folder_of_shards_keeps_the_requested_split(tmp_path):
    (tmp_path / "data").mkdir()
    frame = countbench_frame().drop(index=1)
    frame.iloc[:1].to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    frame.iloc[1:].to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    assert [s.truth for s in load_countbench(tmp_path, offsets=(1,)) if s.condition == "base"] == [2]


def test_raw_bytes_column_limit_and_bad_counts(tmp_path):
    frame = pd.DataFrame(
        {"img": [png(1), png(2), png(3), png(4)], "n": [1.0, 2.5, 3.0, 4.0], "object": ["a", "b", "c", "d"]}
    )
    frame.to_parquet(tmp_path / "t.parquet")
    with pytest.warns(SkippedRowsWarning):
        samples = load_countbench(tmp_path / "t.parquet", image_column="img", count_column="n", limit=2, offsets=(1,))
    assert [s.image_id for s in samples if s.condition == "base"] == ["0000", "0002"]
    assert samples.skipped[0].image_id == "0001" and "2.5" in samples.skipped[0].reason
    assert [s.truth for s in samples if s.condition == "base"] == [1, 3]


def test_name_objects_is_asked_once_for_the_rows_without_a_noun(tmp_path):
    frame = countbench_frame().drop(index=1).reset_index(drop=True)
    frame["object"] = [None, "circles"]
    frame.to_parquet(tmp_path / "t.parquet")
    calls = []

    def name_objects(images):
        calls.append(images)
        return ["rings"] * len(images)

    samples = load_countbench(tmp_path / "t.parquet", name_objects=name_objects, offsets=(1,))
    assert [s.object for s in samples if s.condition == "base"] == ["rings", "circles"]
    assert len(calls) == 1 and calls[0] == [frame["image"][0]["bytes"]]
    with pytest.raises(InputError, match="name_objects returned 0 names for 1 images"):
        load_countbench(tmp_path / "t.parquet", name_objects=lambda images: [])
    with pytest.warns(SkippedRowsWarning, match="image ids 0000"):
        only_column = load_countbench(tmp_path / "t.parquet", offsets=(1,))
    assert "no object noun" in only_column.skipped[0].reason


def test_loader_errors(tmp_path):
    countbench_frame().drop(columns=["object"]).to_parquet(tmp_path / "noobj.parquet")
    countbench_frame().rename(columns={"number": "count"}).to_parquet(tmp_path / "nonumber.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet")
    (tmp_path / "t.xlsx").write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    pd.DataFrame({"image": [BROKEN], "number": [2], "object": ["x"]}).to_parquet(tmp_path / "allbad.parquet")
    cases = [
        (tmp_path / "missing.parquet", {}, "dataset path not found: '.*missing.parquet'"),
        (tmp_path / "noobj.parquet", {}, r"no object column 'object' \(found \['image', 'number', 'text'\]\)"),
        (tmp_path / "nonumber.parquet", {}, r"lacks columns \['number'\] .*found \['image', 'count', 'object', 't"),
        (tmp_path / "corrupt.parquet", {}, "cannot read .* as parquet"),
        (tmp_path / "t.xlsx", {}, "unknown table format '.xlsx'"),
        (tmp_path / "empty_dir", {}, "has no metadata.csv"),
        (tmp_path / "allbad.parquet", {}, "no usable rows .* all 1 were skipped"),
        (tmp_path / "noobj.parquet", {"objects": ["cats"]}, "objects is a list"),
        (tmp_path / "noobj.parquet", {"limit": 0}, "limit = 0"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            load_countbench(source, **kwargs)


def test_missing_image_file_is_skipped_not_fatal(tmp_path):
    (tmp_path / "a.png").write_bytes(png(2))
    pd.DataFrame({"image": ["a.png", "gone.png"], "number": [2, 3], "object": ["o", "o"]}).to_csv(tmp_path / "t.csv")
    with pytest.warns(SkippedRowsWarning):
        samples = load_countbench(tmp_path / "t.csv", offsets=(1,))
    assert "image file not found" in samples.skipped[0].reason and "gone.png" in samples.skipped[0].reason


# --- the hub, through a stand-in `datasets` module ---------------------------------------------------------------


def fake_datasets(frame: pd.DataFrame | None = None, error: Exception | None = None) -> types.ModuleType:
    module = types.ModuleType("datasets")
    calls = []

    class FakeDataset:
        def with_format(self, kind):
            assert kind == "arrow"
            return self

        def __getitem__(self, item):
            return pa.Table.from_pandas(frame)

    def load_dataset(name, split):
        calls.append((name, split))
        if error is not None:
            raise error
        return FakeDataset()

    module.load_dataset = load_dataset
    module.calls = calls
    return module


def test_hub_ids_load_through_datasets(monkeypatch):
    module = fake_datasets(countbench_frame().drop(index=1))
    monkeypatch.setitem(sys.modules, "datasets", module)
    samples = load_countbench("nielsr/countbench", offsets=(1,))
    assert module.calls == [("nielsr/countbench", "train")] and len(samples) == 6


def test_hub_failures_become_input_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(error=ConnectionError("Network\nis unreachable")))
    with pytest.raises(InputError, match="cannot load 'nielsr/countbench' .*Network is unreachable; .*pass a local"):
        load_countbench("nielsr/countbench")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError, match="optional `datasets` package"):
        load_visual_counterfact("mgolov/Visual-Counterfact")


# --- Visual-Counterfact -------------------------------------------------------------------------------------------


def counterfact_frame() -> pd.DataFrame:
    def image(color: str) -> dict:
        return {"bytes": image_to_png_bytes(color_scene(color, "circle", size=48, seed=0)), "path": "x.png"}

    return pd.DataFrame(
        {
            "original_image": [
                image("red"), image("red"), {"bytes": BROKEN, "path": None}, image("green"), image("blue")
            ],
            "counterfact_image": [None] * 5,
            "object": ["fire truck", "Arctic fox", "banana", "Granny Smith", "ball"],
            "correct_answer": ["['Red', 'purple']", "['brown', 'white']", "['yellow']", "green", "[oops"],
            "incorrect_answer": ["blue"] * 5,
        }
    )


def test_visual_counterfact_filters_skips_and_builds_prompts(tmp_path):
    counterfact_frame().to_parquet(tmp_path / "color.parquet")
    with pytest.warns(SkippedRowsWarning, match="image ids 0002, 0004"):
        samples = load_visual_counterfact(tmp_path / "color.parquet")
    truck = [s for s in samples if s.image_id == "0000"]
    # brown fox filtered out by the reference's rule; d1 for the truck would be purple, which it also is
    assert [s.condition for s in truck] == ["base", "control", "d2", "d3"]
    assert [s.prompt for s in truck] == [
        "What color is the fire truck in the image?",
        "Describe the red fire truck.",
        "Describe the blue fire truck.",
        "Describe the green fire truck.",
    ]
    assert truck[0].truth == "red" and truck[0].truth_aliases == ("purple",)
    apple = [s for s in samples if s.image_id == "0003"]
    assert [s.claim for s in apple] == [None, "green", "yellow", "orange", "red"]
    assert [s.image_id for s in samples.skipped] == ["0002", "0004"]
    assert "cannot decode" in samples.skipped[0].reason and "not a Python list literal" in samples.skipped[1].reason


def test_visual_counterfact_accepts_real_lists(tmp_path):
    frame = counterfact_frame().iloc[[0, 3]]
    frame = frame.assign(correct_answer=[["red", "white"], ["green"]])
    frame.to_parquet(tmp_path / "lists.parquet")
    samples = load_visual_counterfact(tmp_path / "lists.parquet", distances=(1,))
    assert [(s.image_id, s.truth, s.truth_aliases, s.claim) for s in samples if s.condition == "d1"] == [
        ("0000", "red", ("white",), "purple"),
        ("0001", "green", (), "yellow"),
    ]


def test_visual_counterfact_limit_and_missing_columns(tmp_path):
    counterfact_frame().to_parquet(tmp_path / "color.parquet")
    samples = load_visual_counterfact(tmp_path / "color.parquet", limit=1, distances=(3,))
    assert [s.id for s in samples] == ["color-0000-base", "color-0000-control", "color-0000-d3"]
    counterfact_frame().drop(columns=["correct_answer"]).to_parquet(tmp_path / "bad.parquet")
    message = r"lacks columns \['correct_answer'\] .*'correct_answer' looks like 'incorrect_answer'"
    with pytest.raises(InputError, match=message):
        load_visual_counterfact(tmp_path / "bad.parquet")


def test_build_task_reads_local_files(tmp_path):
    countbench_frame().to_parquet(tmp_path / "c.parquet")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        samples = build_task("count", str(tmp_path / "c.parquet"), n=1, offsets=(1,), object_column="object")
    assert [s.id for s in samples] == ["count-0000-base", "count-0000-control", "count-0000-+1"]
    with pytest.raises(InputError, match="unknown option 'max_count'"):
        build_task("count", str(tmp_path / "c.parquet"), max_count=3)


def test_remaining_loader_errors(tmp_path):
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(InputError, match="holds a JSON int; expected a list of records"):
        load_countbench(tmp_path / "scalar.json")
    no_six = counterfact_frame().iloc[[1]]  # only the brown fox: filtered out, nothing skipped
    no_six.to_parquet(tmp_path / "brown.parquet")
    with pytest.raises(InputError, match="no usable rows in .*brown.parquet"):
        load_visual_counterfact(tmp_path / "brown.parquet")
    pd.DataFrame({"image": [None, png(2)], "number": [2, 2], "object": ["o", "o"]}).to_parquet(tmp_path / "n.parquet")
    with pytest.warns(SkippedRowsWarning):
        samples = load_countbench(tmp_path / "n.parquet", offsets=(1,))
    assert samples.skipped[0].reason.startswith("empty image cell")
    with pytest.raises(InputError, match="option 'limit' is set by build_task's own argument"):
        build_task("count", str(tmp_path / "n.parquet"), limit=3)
