"""`attention`, `attention-maps`, `probs` and `lens` end to end on a tiny eval run: tables, figures and
manifest entries, resuming from finished shards, named head sets, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pandas as pd
import pytest

from halluscope import cli as _cli
from halluscope import cli_analysis  # noqa: F401  (registers the commands until cli.py imports it)
from halluscope.runs import Run

EVAL = ("--task", "count", "--data", "synthetic", "--n", "2", "--offsets", "1,2", "--max-new-tokens", "12")


@pytest.fixture(scope="module")
def eval_run(tiny_dirs, tmp_path_factory):
    """An eval run of the tiny qwen2_vl (2 images x base, control, +1, +2); never changed by a test."""
    run = tmp_path_factory.mktemp("runs") / "count"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["halluscope", "eval", "--model", str(tiny_dirs["qwen2_vl"]), *EVAL,
                                    "--out", str(run)])
        _cli.main()
    return run


@pytest.fixture(scope="module")
def run_dir(eval_run, tmp_path_factory):
    """A copy of the eval run that the command tests below fill in, one step each."""
    return shutil.copytree(eval_run, tmp_path_factory.mktemp("shared") / "run")


@pytest.fixture
def fresh_run(eval_run, tmp_path):
    """A private copy of the eval run, for tests that rerun or change a step."""
    return shutil.copytree(eval_run, tmp_path / "run")


def _step(run, name) -> dict:
    return json.loads((run / "manifest.json").read_text())["steps"][name]


def test_attention_command(cli, run_dir):
    code, _, err = cli("attention", "--run", run_dir, "--heads", "L0H1,L1H2", "--limit", "3")
    assert code == 0, err
    summary = pd.read_parquet(run_dir / "attention.parquet")
    assert {"layer", "head", "condition", "setting", "query", "image_share", "text_share", "template_share",
            "reply_share", "n"} <= set(summary.columns)
    assert set(summary["setting"]) == {"baseline", "ablated"}
    assert pd.read_parquet(run_dir / "attention_samples.parquet")["sample_id"].nunique() == 3
    for name in ("attention_image_by_layer", "attention_image_heads", "attention_image_heads_change"):
        assert (run_dir / "plots" / f"{name}.png").is_file()
    assert _step(run_dir, "attention")["status"] == "finished"


def test_attention_maps_command(cli, run_dir):
    code, _, err = cli("attention-maps", "--run", run_dir, "--heads", "L1H3,L0H0", "--samples", "2")
    assert code == 0, err
    maps = pd.read_parquet(run_dir / "attention_maps.parquet")
    assert len(maps) == 4 and set(zip(maps["layer"], maps["head"])) == {(0, 0), (1, 3)}
    assert len(list((run_dir / "plots" / "attention_maps").glob("*.png"))) == 2


def test_probs_command(cli, run_dir):
    code, _, err = cli("probs", "--run", run_dir, "--heads", "L0H1", "--alphas", "0,0.5,1", "--limit", "3")
    assert code == 0, err
    table = pd.read_parquet(run_dir / "probs.parquet")
    assert list(table.columns)[:11] == ["sample_id", "condition", "truth", "claim", "contrast", "alpha", "form",
                                        "tokens_truth", "tokens_claim", "p_truth", "p_claim"]
    assert sorted(set(table["alpha"])) == [0.0, 0.5, 1.0]
    assert {p.name for p in (run_dir / "plots").glob("probs_*.png")} == {f"probs_{f}.png" for f in set(table["form"])}


def test_lens_command(cli, run_dir):
    code, _, err = cli("lens", "--run", run_dir, "--heads", "L1H2", "--limit", "2")
    assert code == 0, err
    table = pd.read_parquet(run_dir / "lens.parquet")
    assert set(table["setting"]) == {"baseline", "ablated"} and set(table["layer"]) == {0, 1}
    assert any((run_dir / "plots").glob("lens_*.png"))


def test_a_rerun_resumes_from_finished_shards(cli, fresh_run, monkeypatch):
    args = ("probs", "--run", fresh_run, "--heads", "L0H1", "--alphas", "1", "--limit", "2")
    assert cli(*args)[0] == 0
    first = pd.read_parquet(fresh_run / "probs.parquet")
    (fresh_run / "probs.parquet").unlink()

    def fail(*args, **kwargs):
        raise AssertionError("a finished shard was recomputed")

    monkeypatch.setattr("halluscope.analysis.probabilities.token_probabilities", fail)
    code, _, err = cli(*args)
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_parquet(fresh_run / "probs.parquet"), first)
    assert len(_step(fresh_run, "probs")["resumed"]) == 1
    code, _, err = cli("probs", "--run", fresh_run, "--heads", "L0H1", "--alphas", "0", "--limit", "2")
    assert code == 2 and "--force" in err


def test_named_head_sets_come_from_the_ranking(cli, fresh_run):
    code, _, err = cli("attention-maps", "--run", fresh_run, "--heads", "best3", "--samples", "1")
    assert code == 2 and "halluscope rank" in err
    Run.open(fresh_run).write_json("heads", {"top": {"top1": [[1, 2]]}, "best": {"best3": [[0, 1], [1, 2]]}})
    code, _, err = cli("attention-maps", "--run", fresh_run, "--heads", "best3", "--samples", "1")
    assert code == 0, err
    assert _step(fresh_run, "attention-maps")["arguments"]["heads"] == "L0H1,L1H2"


@pytest.mark.parametrize("args, message", [
    (("attention", "--heads", "L9H0"), "out of range"),
    (("probs", "--heads", "LxH1"), "malformed head"),
    (("lens", "--heads", "L0H1", "--limit", "0"), "limit"),
    (("probs", "--heads", "L0H1", "--alphas", "0,a"), "malformed alphas"),
    (("attention-maps", "--heads", "L0H1", "--conditions", "+7"), "no prompts with conditions"),
])
def test_bad_input_gives_one_line_errors(cli, run_dir, args, message):
    code, _, err = cli(args[0], "--run", run_dir, *args[1:])
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_run_without_baseline(cli, tmp_path):
    Run.create(tmp_path / "empty", step="eval", arguments={})
    for command in ("attention", "attention-maps", "probs", "lens"):
        code, _, err = cli(command, "--run", tmp_path / "empty", "--heads", "L0H1")
        assert code == 2 and "no table 'baseline'" in err and "halluscope eval" in err, err
        assert len(err.strip().splitlines()) == 1
