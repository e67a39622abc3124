"""`halluscope alea locate` and `alea edit` end to end on a tiny model: the located set and its tables, a checkpoint
that `load_vlm` opens and that generates, every parameter outside the located set bitwise unchanged, the same
weights after a kill -9 and a rerun as without one, a finished edit left alone, and one-line errors."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from halluscope.cli import main
from halluscope.models import load_vlm

#: Small enough for a few seconds per run: 1 epoch of each stage, a state file every step.
EDIT = ("--epochs", "1", "--prefix-epochs", "1", "--edit-batch-size", "4", "--prefix-batch-size", "8",
        "--optimizer", "adamw", "--lr", "1e-2", "--prefix-lr", "1e-2")


def _run(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert not exc.code, f"halluscope {' '.join(map(str, args))} exited {exc.code}"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from halluscope.models.tiny import build_tiny

    return str(build_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl"))


@pytest.fixture(scope="module")
def located(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("alea") / "located"
    _run("alea", "locate", "--model", model, "--images", "synthetic", "--n", "8", "--kind", "caption", "--kind",
         "pope", "--locate-pairs", "8", "--batch-size", "8", "--out", out)
    return out


@pytest.fixture(scope="module")
def edited(model, located, tmp_path_factory):
    out = tmp_path_factory.mktemp("alea") / "edited"
    _run("alea", "edit", "--model", model, "--located", located, "--out", out, *EDIT, "--save-every", "1")
    return out


def test_locate_writes_the_located_set_its_tables_and_plot(located):
    document = json.loads((located / "located.json").read_text())
    assert document["layers"] and set(document["layers"]) <= {0, 1}
    assert document["parameters"] == [f"model.language_model.layers.{layer}.mlp.down_proj.weight"
                                      for layer in document["layers"]]
    assert document["located_with_pairs"] == 8 and document["model"]["fingerprint"]
    pairs = pd.read_parquet(located / "pairs.parquet")
    assert len(pairs) == sum(document["pairs"].values()) and (pairs["grounded"] != pairs["hallucinated"]).all()
    layers = pd.read_parquet(located / "layers.parquet")
    assert len(layers) == 8 * 2 and layers["pair"].isin(pairs["pair"]).all()
    assert (located / "plots" / "differential.png").is_file()
    manifest = json.loads((located / "manifest.json").read_text())
    assert manifest["steps"]["alea-locate"]["status"] == "finished"
    assert "located.json" in manifest["steps"]["alea-locate"]["outputs"]


def test_edit_writes_a_checkpoint_that_loads_generates_and_changes_only_the_located_parameters(model, located,
                                                                                               edited):
    base, after = load_vlm(model), load_vlm(edited)
    names = json.loads((located / "located.json").read_text())["parameters"]
    before_state, after_state = base.model.state_dict(), after.model.state_dict()
    assert set(before_state) == set(after_state)
    changed = {name for name in before_state if not torch.equal(before_state[name], after_state[name])}
    assert changed == set(names)
    replies = after.generate(after.encode([(Image.new("RGB", (56, 56), (200, 30, 30)), "Describe this image.")]),
                             max_new_tokens=4)
    assert len(replies) == 1 and isinstance(replies[0], str)
    manifest = json.loads((edited / "manifest.json").read_text())
    step = manifest["steps"]["alea-edit"]
    assert step["status"] == "finished" and step["arguments"]["lr"] == 1e-2 and step["arguments"]["nll_weight"] == 0.2
    assert step["arguments"]["parameters"] == names
    log = json.loads((edited / "trainlog.json").read_text())
    assert {entry["stage"] for entry in log["history"]} == {"prefix", "edit"}
    assert set(pd.read_parquet(edited / "changes.parquet")["parameter"]) == set(names)
    assert not list((edited / "parts" / "alea-edit").glob("*.pt"))  # state files go once the edit is done


def test_a_killed_edit_resumes_to_the_same_weights(model, located, edited, tmp_path, spawn, cli):
    out = tmp_path / "killed"
    process = spawn("alea", "edit", "--model", model, "--located", located, "--out", out, *EDIT, "--save-every", "1")
    state = out / "parts" / "alea-edit" / "edit_state.pt"
    deadline = time.monotonic() + 600
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert state.is_file(), "the edit ended before it wrote its first state file"
    code, out_text, err = cli("alea", "edit", "--model", model, "--located", located, "--out", out, *EDIT,
                              "--save-every", "1")
    assert code == 0, err
    assert "edit: resuming at step" in err
    assert load_file(str(out / "model.safetensors")).keys() == load_file(str(edited / "model.safetensors")).keys()
    for name, value in load_file(str(edited / "model.safetensors")).items():
        assert torch.equal(load_file(str(out / "model.safetensors"))[name], value), name


def test_a_finished_edit_is_left_alone(model, located, edited, cli):
    stamp = (edited / "model.safetensors").stat().st_mtime_ns
    code, _, err = cli("alea", "edit", "--model", model, "--located", located, "--out", edited, *EDIT,
                       "--save-every", "1")
    assert code == 0 and "nothing to do" in err
    assert (edited / "model.safetensors").stat().st_mtime_ns == stamp


def test_locate_with_doubt_asks_about_every_absent_object_the_captions_name(model, tmp_path, cli):
    out = tmp_path / "located"
    args = ("alea", "locate", "--model", model, "--images", "synthetic", "--n", "8", "--kind", "caption", "--kind",
            "pope", "--locate-pairs", "8", "--batch-size", "8", "--nlp", "offline", "--doubt", "0.5", "--out", out)
    code, printed, err = cli(*args)
    assert code == 0, err
    checks = pd.read_parquet(out / "checks.parquet")
    annotations = json.loads((out / "annotations.json").read_text())
    replies = pd.read_parquet(out / "replies.parquet").merge(pd.read_parquet(out / "items.parquet"), on="item")
    captions = replies[replies["kind"] == "caption"]
    from halluscope.metrics.chair import chair_ground_truth, extract_objects
    from halluscope.metrics.nlp import load_nlp
    from halluscope.metrics.vocabulary import ObjectVocabulary

    vocabulary = ObjectVocabulary.from_synonyms(annotations["vocabulary_name"], annotations["vocabulary"])
    nlp = load_nlp("offline")
    truth = chair_ground_truth(annotations["instances"], annotations["captions"], image_ids=set(captions["image_id"]),
                               vocabulary=vocabulary, nlp=nlp, method="opera")
    named = [(i, o) for i, r in zip(captions["image_id"], captions["reply"])
             for o in dict.fromkeys(extract_objects(r, vocabulary=vocabulary, nlp=nlp, method="opera").objects)
             if o not in truth[i]]
    assert named and list(zip(checks["image_id"], checks["object"])) == named  # the random model names some
    assert checks["p_yes"].between(0.0, 1.0).all() and (checks["confirmed"] == (checks["p_yes"] >= 0.5)).all()
    document = json.loads((out / "located.json").read_text())
    assert document["absent_objects_named"] == len(named)
    assert document["absent_objects_confirmed"] == int(checks["confirmed"].sum())
    assert (f"the model confirms {int(checks['confirmed'].sum())} of the {len(named)} absent objects"
            in " ".join(printed.split()))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"]["alea-locate"]["arguments"]["doubt"] == 0.5
    assert manifest["steps"]["alea-check"]["summary"] == manifest["steps"]["alea-score"]["summary"] == {
        "rows": len(named)}
    stamp = {p: p.stat().st_mtime_ns for p in (out / "parts" / "alea-score").iterdir()}
    code, _, err = cli(*args)
    assert code == 0, err  # a rerun asks nothing again
    assert {p: p.stat().st_mtime_ns for p in (out / "parts" / "alea-score").iterdir()} == stamp


def test_edit_errors_are_one_line(model, located, tmp_path, tiny_dirs, cli):
    code, _, err = cli("alea", "edit", "--model", model, "--located", tmp_path / "nowhere", "--out", tmp_path / "a")
    assert code == 2 and "holds no located.json" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("alea", "edit", "--model", tiny_dirs["llava"], "--located", located, "--out", tmp_path / "b")
    assert code == 2 and "was located on" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra,message", [
    (("--kind", "caption", "--kind", "vqa"), "unknown --kind 'vqa'"),
    (("--score", "norm"), "unknown --score 'norm'"),
    (("--module", "mlp.down"), "has no such module"),
    (("--images", "nowhere"), "neither 'synthetic' nor a directory"),
    (("--doubt", "1.5"), "--doubt 1.5; expected a probability strictly between 0 and 1"),
    (("--kind", "pope", "--doubt", "0.5"), "--doubt checks the objects of caption pairs"),
])
def test_locate_errors_are_one_line_and_write_nothing(model, tmp_path, cli, extra, message):
    code, _, err = cli("alea", "locate", "--model", model, "--n", "2", "--out", tmp_path / "run", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
