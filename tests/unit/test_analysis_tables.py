"""The analysis tables keep their column types whatever prompts a shard holds: truth/claim/contrast are nullable
Int64 for counts and strings for colours (a base prompt's claim is <NA>, never "nan" or a float), and shards
of base and misleading prompts concatenate and round-trip through parquet unchanged."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image, ImageDraw

from halluscope.analysis.attention import attention_mass
from halluscope.analysis.lens import logit_lens
from halluscope.analysis.maps import attention_maps
from halluscope.analysis.probabilities import VALUE, RunPrompt, token_probabilities, typed_table
from halluscope.images import image_to_png_bytes
from halluscope.runs import Run

ONE = ["qwen2_vl"]
SCHEMA = {"sample_id": "string", "truth": VALUE, "claim": VALUE, "layer": "int64", "p": "float64"}


def _image() -> bytes:
    img = Image.new("RGB", (224, 224), (245, 245, 245))
    ImageDraw.Draw(img).ellipse((40, 40, 120, 120), fill=(200, 30, 30))
    return image_to_png_bytes(img)


def _count_prompts() -> list[RunPrompt]:
    """One image's base question, control and two misleading prompts (claims None, 3, 4, 5)."""
    image = _image()
    return [RunPrompt("c-base", "i0", "base", "count", image, "How many circles are in this image?", 3, None, 4),
            RunPrompt("c-control", "i0", "control", "count", image, "Describe the 3 circles in this image.", 3, 3, 4),
            RunPrompt("c-+1", "i0", "+1", "count", image, "Describe the 4 circles in this image.", 3, 4, 4),
            RunPrompt("c-+2", "i0", "+2", "count", image, "Describe the 5 circles in this image.", 3, 5, 5)]


def _color_prompts() -> list[RunPrompt]:
    image = _image()
    return [RunPrompt("k-base", "i0", "base", "color", image, "What color is the circle?", "red", None, "blue"),
            RunPrompt("k-d1", "i0", "d1", "color", image, "Describe the blue circle.", "red", "blue", "blue")]


def _rows(prompts: list[RunPrompt]) -> list[dict]:
    return [{"sample_id": p.sample_id, "truth": p.truth, "claim": p.claim, "layer": i, "p": 0.5}
            for i, p in enumerate(prompts)]


def _through_shards(tmp_path, shards: list[pd.DataFrame]) -> pd.DataFrame:
    """The shards written and read back as an analysis step does (`Parts`), then the run's table read back."""
    run = Run.create(tmp_path / "run", step="eval", arguments={})
    parts = run.parts("analysis")
    for key, shard in enumerate(shards):
        parts.write(f"{key:06d}", shard)
    run.write_table("analysis", parts.read_all())
    return run.read_table("analysis")


def _claims(table: pd.DataFrame) -> dict[str, object]:
    return {sid: (None if pd.isna(claim) else claim)
            for sid, claim in table.drop_duplicates("sample_id")[["sample_id", "claim"]].itertuples(index=False)}


def test_count_shards_of_base_and_misleading_prompts_keep_nullable_int_claims(tmp_path):
    prompts = _count_prompts()
    shards = [typed_table(_rows(chunk), SCHEMA, chunk) for chunk in (prompts[:3], prompts[3:], prompts[:1])]
    shards.append(typed_table([], SCHEMA, prompts))  # every prompt of the shard skipped
    for shard in shards:
        assert shard.dtypes.astype(str).to_dict() == {"sample_id": "string", "truth": "Int64", "claim": "Int64",
                                                      "layer": "int64", "p": "float64"}
    table = _through_shards(tmp_path, shards)
    assert table.dtypes.astype(str).to_dict() == shards[0].dtypes.astype(str).to_dict()
    assert table["claim"].tolist() == [pd.NA, 3, 4, 5, pd.NA]
    assert table["truth"].tolist() == [3] * 5


def test_color_shards_keep_string_claims_with_missing_values(tmp_path):
    prompts = _color_prompts()
    shards = [typed_table(_rows(prompts), SCHEMA, prompts), typed_table(_rows(prompts[:1]), SCHEMA, prompts[:1])]
    table = _through_shards(tmp_path, shards)
    assert str(table["claim"].dtype) == str(table["truth"].dtype) == "string"
    assert table["claim"].tolist() == [pd.NA, "blue", pd.NA] and table["truth"].tolist() == ["red"] * 3


def test_a_value_that_does_not_fit_its_column_raises():
    with pytest.raises((TypeError, ValueError)):
        typed_table([{"claim": 4.5}], {"claim": VALUE}, _count_prompts())


def _check(table: pd.DataFrame, tmp_path, prompts: list[RunPrompt]) -> None:
    """`table` (built from base and misleading prompts at once) beside an all-misleading shard of the same
    builder keeps Int64 truth/claim(/contrast) through parquet, with the prompts' values."""
    value_columns = [c for c in ("truth", "claim", "contrast") if c in table.columns]
    assert all(str(table[c].dtype) == "Int64" for c in value_columns), table.dtypes
    expected = {p.sample_id: p.claim for p in prompts}
    assert _claims(table) == expected
    stored = _through_shards(tmp_path, [table, table[table["condition"] != "base"]])
    assert stored.dtypes.to_dict() == table.dtypes.to_dict()
    assert _claims(stored) == expected
    assert not stored[value_columns].astype("string").isin(["nan", "None", "<NA>"]).any().any()
    assert not stored["claim"].astype("string").str.contains(r"\.", regex=True).any()  # no "5.0"


@pytest.mark.parametrize("family", ONE)
def test_probability_table_types(vlm, tmp_path):
    prompts = _count_prompts()[::2]  # base and +1
    table = token_probabilities(vlm, prompts, {(0, 1)}, alphas=(0, 1), max_new_tokens=4)
    _check(table, tmp_path, prompts)
    assert str(table["alpha"].dtype) == "float64" and str(table["form"].dtype) == "string"


@pytest.mark.parametrize("family", ONE)
def test_attention_table_types(vlm, tmp_path):
    prompts = _count_prompts()[::2]
    table = attention_mass(vlm, prompts, {(0, 1)}, max_new_tokens=4)
    _check(table, tmp_path, prompts)
    assert {str(table[c].dtype) for c in ("layer", "head", "n_queries")} == {"int64"}


@pytest.mark.parametrize("family", ONE)
def test_lens_table_types(vlm, tmp_path):
    prompts = _count_prompts()[::2]
    table = logit_lens(vlm, prompts, {(1, 2)}, max_new_tokens=4)
    _check(table, tmp_path, prompts)
    assert str(table["layer"].dtype) == "int64"
    assert str(table["rank_truth"].dtype) == str(table["rank_claim"].dtype) == "Int64"
    assert table.loc[table["condition"] == "base", "rank_claim"].isna().all()


@pytest.mark.parametrize("family", ONE)
def test_attention_maps_table_types(vlm, tmp_path):
    prompts = _count_prompts()[::2]
    table = attention_maps(vlm, prompts, {(0, 1)})
    _check(table, tmp_path, prompts)
    assert {str(table[c].dtype) for c in ("layer", "head", "query_position", "n_keys")} == {"int64"}
