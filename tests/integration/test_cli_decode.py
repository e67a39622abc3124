"""`decode` and `eval --method` end to end on a tiny model: replies printed under a method, one-line errors for a
bad method or config, and an eval run whose manifest records the method and its full config as part of the
step's identity."""

from __future__ import annotations

import json

import pandas as pd
import pytest

EVAL = ("--task", "count", "--data", "synthetic", "--n", "4", "--offsets", "1", "--max-new-tokens", "6")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from halluscope.models.tiny import build_tiny

    return build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from halluscope.tasks.scenes import count_scene

    path = tmp_path_factory.mktemp("images") / "circles.png"
    count_scene(3, "circle", size=112, seed=1).save(path)
    return path


def test_decode_prints_one_reply_per_prompt_under_the_method(cli, model, image):
    code, out, err = cli("decode", "--model", model, "--method", "vcd", "--method-config", '{"alpha": 0.5}',
                         "--image", image, "--prompt", "How many circles?", "--prompt", "Describe the image.",
                         "--max-new-tokens", "5")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[str(image), "How many circles?"],
                                                        [str(image), "Describe the image."]]
    assert 'vcd {"alpha": 0.5, "beta": 0.1, "noise_step": 500, "seed": 0}' in err


def test_decode_at_a_neutral_setting_prints_the_greedy_replies(cli, model, image):
    args = ("--model", model, "--image", image, "--prompt", "How many circles?", "--max-new-tokens", "6")
    greedy = cli("decode", *args)
    neutral = cli("decode", *args, "--method", "m3id", "--method-config", '{"lam": 0}')
    assert greedy[0] == neutral[0] == 0 and greedy[1] == neutral[1]


def test_decode_num_beams_runs_beam_search_and_sets_operas_own_beams(cli, model, image):
    args = ("--model", model, "--image", image, "--prompt", "How many circles?", "--max-new-tokens", "6")
    code, out, err = cli("decode", *args, "--num-beams", "3")
    assert code == 0 and "greedy; beam search, 3 beams" in err, err
    neutral = cli("decode", *args, "--num-beams", "3", "--method", "opera", "--method-config",
                  '{"alpha": 0, "max_rollbacks": 0}')
    assert neutral[0] == 0 and neutral[1] == out and '"num_beams": 3' in neutral[2]


@pytest.mark.parametrize("args, message", [
    (("--method", "vdc"), "unknown decoding method 'vdc'. Did you mean 'vcd'?"),
    (("--method", "vcd", "--method-config", '{"alpha": -2}'), "vcd alpha=-2 is out of range; pass a number >= 0.0"),
    (("--method", "vcd", "--method-config", "[1]"), "--method-config '[1]' is a list"),
])
def test_decode_errors_are_one_line(cli, model, image, args, message):
    code, _, err = cli("decode", "--model", model, "--image", image, "--prompt", "x", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_with_a_method_records_it_and_refuses_another_method_in_the_same_run(cli, model, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("eval", "--model", model, *EVAL, "--method", "vcd", "--method-config", '{"alpha": 0.5}',
                       "--out", run)
    assert code == 0, err
    manifest = json.loads((run / "manifest.json").read_text())
    decoding = manifest["steps"]["eval"]["arguments"]["decoding"]
    assert decoding == {"method": "vcd", "config": {"alpha": 0.5, "beta": 0.1, "noise_step": 500, "seed": 0},
                        "strategy": "greedy"}
    assert len(pd.read_parquet(run / "baseline.parquet")) == len(pd.read_parquet(run / "samples.parquet"))
    code, _, err = cli("eval", "--model", model, *EVAL, "--method", "m3id", "--out", run)
    assert code == 2 and "different inputs" in err and "--force" in err
    assert cli("eval", "--model", model, *EVAL, "--method", "m3id", "--out", run, "--force")[0] == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"]["eval"]["arguments"]["decoding"]["method"] == "m3id"


def test_decode_refuses_missing_images_and_mismatched_counts(cli, model, image, tmp_path):
    code, _, err = cli("decode", "--model", model, "--image", tmp_path / "none.png", "--prompt", "x")
    assert code == 2 and "does not exist" in err
    code, _, err = cli("decode", "--model", model, "--image", image, "--image", image, "--prompt", "a", "--prompt",
                       "b", "--prompt", "c")
    assert code == 2 and "got 2 --image and 3 --prompt" in err


def test_eval_method_config_needs_a_method(cli, model, tmp_path):
    code, _, err = cli("eval", "--model", model, *EVAL, "--method-config", '{"alpha": 1}', "--out", tmp_path / "r")
    assert code == 2 and "--method-config needs --method" in err and not (tmp_path / "r").exists()
