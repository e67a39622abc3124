"""The README's CLI quickstart end to end on the organism, as a user types it: relative paths, every condition
(base and control prompts share resumable shards with misleading ones), every step after eval with its default
options. Every table keeps its column types: truth and claim are nullable Int64 like the baseline's (a base
prompt's claim is <NA>, never "nan" or "5.0")."""

from __future__ import annotations

import json

import pandas as pd
import pytest

RUN = "runs/count"
#: the README's sequence, smaller: 5 images (counts 1..5; the organism copies some +1 claims from 4 up, so rank
#: finds heads) x base, control, +1 = 15 prompts, two shards of the analysis steps
SEQUENCE = (
    ("eval", "--model", "organism", "--task", "count", "--data", "synthetic", "--n", "5", "--offsets", "1",
     "--size", "112", "--max-new-tokens", "12", "--out", RUN),
    ("sweep", "--run", RUN),
    ("rank", "--run", RUN),
    ("confirm", "--run", RUN, "--heads", "best3"),
    ("ablate", "--run", RUN, "--heads", "best3"),
    ("attention", "--run", RUN, "--heads", "best3"),
    ("probs", "--run", RUN, "--heads", "best3", "--alphas", "0,0.5,1"),
    ("lens", "--run", RUN),
    ("attention-maps", "--run", RUN, "--heads", "best3"),
    ("report", "--run", RUN),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The README's sequence run once from a fresh working directory; returns the run directory."""
    from halluscope.cli import main

    cwd = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for args in SEQUENCE:
            patch.setattr("sys.argv", ["halluscope", *args])
            try:
                main()
            except SystemExit as exc:
                assert not exc.code, f"`halluscope {' '.join(args)}` exited with {exc.code}"
    return cwd / RUN


def _best3(run) -> set[tuple[int, int]]:
    """The heads of the ranking's "best3" set (fewer than 3 when fewer heads correct any prompt)."""
    return {tuple(head) for head in json.loads((run / "heads.json").read_text())["best"]["best3"]}


def _prompt_values(table: pd.DataFrame) -> pd.DataFrame:
    return table[["sample_id", "truth", "claim"]].drop_duplicates("sample_id").set_index("sample_id").sort_index()


def _assert_prompt_columns(table: pd.DataFrame, baseline: pd.DataFrame) -> None:
    """truth/claim are Int64 and equal the baseline's for every prompt (base claims <NA>)."""
    assert str(table["truth"].dtype) == str(table["claim"].dtype) == "Int64", table.dtypes
    got = _prompt_values(table)
    pd.testing.assert_frame_equal(got, _prompt_values(baseline).loc[got.index], check_index_type=False)
    assert got.loc[got.index.str.endswith("-base"), "claim"].isna().all()


def test_baseline_and_sweep_tables(run):
    baseline = pd.read_parquet(run / "baseline.parquet")
    assert set(baseline["condition"]) >= {"base", "control", "+1"}
    assert str(baseline["truth"].dtype) == str(baseline["claim"].dtype) == "Int64"
    assert baseline.loc[baseline["condition"] == "base", "claim"].isna().all()
    sweep = pd.read_parquet(run / "sweep.parquet")
    assert pd.api.types.is_integer_dtype(sweep["claim"]) and pd.api.types.is_integer_dtype(sweep["layer"])
    assert _best3(run)
    assert len(pd.read_parquet(run / "confirm.parquet"))
    assert [len(pd.read_parquet(path)) for path in run.glob("ablation*.parquet")] == [len(baseline)]


@pytest.mark.parametrize("name", ["attention_samples", "probs", "lens", "attention_maps"])
def test_analysis_tables_keep_prompt_types(run, name):
    baseline = pd.read_parquet(run / "baseline.parquet")
    table = pd.read_parquet(run / f"{name}.parquet")
    _assert_prompt_columns(table, baseline)
    expected = baseline["sample_id"] if name != "attention_maps" else baseline["sample_id"].head(20)
    assert set(table["sample_id"]) <= set(expected) and table["sample_id"].nunique() > 8  # more than one shard
    assert set(table["condition"]) >= {"base", "control", "+1"}
    assert "layer" not in table.columns or pd.api.types.is_integer_dtype(table["layer"])


def test_analysis_table_contents(run):
    attention = pd.read_parquet(run / "attention.parquet")
    shares = attention[["image_share", "text_share", "template_share", "reply_share"]].sum(axis=1)
    assert set(attention["setting"]) == {"baseline", "ablated"} and shares.between(0.999, 1.001).all()
    assert pd.api.types.is_integer_dtype(attention["head"]) and pd.api.types.is_integer_dtype(attention["n"])
    probs = pd.read_parquet(run / "probs.parquet")
    assert sorted(set(probs["alpha"])) == [0.0, 0.5, 1.0] and probs["p_truth"].between(0, 1).all()
    assert probs.loc[probs["claim"].isna(), "p_claim"].isna().all()
    assert probs.loc[probs["claim"] > probs["truth"], "p_claim"].between(0, 1).all()
    lens = pd.read_parquet(run / "lens.parquet")
    assert set(lens["setting"]) == {"baseline"} and str(lens["rank_claim"].dtype) == "Int64"
    assert lens.loc[lens["claim"].isna(), "rank_claim"].isna().all()
    maps = pd.read_parquet(run / "attention_maps.parquet")
    assert set(zip(maps["layer"], maps["head"])) == _best3(run)
    assert len(maps) == maps["sample_id"].nunique() * len(_best3(run))  # one row per prompt and head


def test_report_page_shows_every_step(run):
    text = (run / "report.html").read_text(encoding="utf-8")
    assert "<script src" not in text and 'class="absent"' not in text  # self-contained, every section filled
    comparison = text.split('<section id="comparison">')[1].split("</section>")[0]
    assert "<td>best3 knocked out</td>" in comparison  # the ablation named by its head set
