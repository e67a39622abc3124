"""`halluscope apasi data` and `apasi train` end to end on a tiny Qwen2-VL: pairs from every variant, two DPO rounds
through TRL and PEFT, a checkpoint that `load_vlm` opens and that generates, LoRA changes only the language model's
linear layers, reruns resume without recomputing, and bad input fails in one line before anything is written.

A random tiny model writes no sentences, so the fixture first teaches it (a few hundred plain fine-tuning steps) to
describe four solid-colour images in two styles: one list sentence for CHAIR's prompt, three sentences for
another prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from halluscope.metrics.chair import CHAIR_PROMPT
from halluscope.models import load_vlm
from halluscope.tasks.object_scenes import SCENE_SYNONYMS
from halluscope.training.apasi.data import PAIR_COLUMNS

SENTENCES_PROMPT = "Describe each object."
COLOURS = ((230, 20, 20), (20, 160, 20), (20, 20, 230), (240, 210, 0))
LISTS = ("A red circle, two squares and a star.", "Two triangles and a green diamond.",
         "A blue square, a star and two diamonds.", "A circle and two yellow triangles.")
SENTENCES = ("There is a red circle. Two squares are next to it. A star is on the right.",
             "Two triangles are at the top. A green diamond is below them. The background is white.",
             "A blue square is in the middle. A star is near it. Two diamonds are at the bottom.",
             "A circle is on the left. Two yellow triangles are on the right. Nothing else is there.")


def _teach(vlm, steps: int = 400) -> None:
    """Fine-tune every weight of `vlm` on the descriptions of the four images, one example per step."""
    examples = []
    for colour, listed, sentences in zip(COLOURS, LISTS, SENTENCES):
        image = Image.new("RGB", (56, 56), colour)
        for prompt, reply in ((CHAIR_PROMPT, listed), (SENTENCES_PROMPT, sentences)):
            user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            full = vlm.tokenizer.apply_chat_template(
                user + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}],
                chat_template=vlm.chat_template, tokenize=False)
            inputs = vlm.processor(text=[full], images=[[image]], return_tensors="pt")
            prompt_length = vlm.processor(text=[vlm.render(prompt)], images=[[image]],
                                          return_tensors="pt")["input_ids"].shape[1]
            labels = inputs["input_ids"].clone()
            labels[:, :prompt_length] = -100
            examples.append((dict(inputs), labels))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(vlm.model.parameters(), lr=3e-3)
    vlm.model.train()
    for step in range(steps):
        inputs, labels = examples[step % len(examples)]
        loss = vlm.model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vlm.model.eval()


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """A tiny qwen2_vl taught to describe the four images."""
    from halluscope.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("apasi-model")
    vlm = load_vlm(build_tiny("qwen2_vl", root / "tiny"))
    _teach(vlm)
    vlm.model.save_pretrained(root / "taught")
    vlm.processor.save_pretrained(root / "taught")
    return root / "taught"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The four images in DIR/images, with the scenes' vocabulary in DIR/annotations."""
    root = tmp_path_factory.mktemp("apasi-images")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    for k, colour in enumerate(COLOURS):
        Image.new("RGB", (56, 56), colour).save(root / "images" / f"{k}.png")
    (root / "annotations" / "vocabulary_shapes.txt").write_text(
        "".join(", ".join(words) + "\n" for words in SCENE_SYNONYMS.values()), encoding="utf-8")
    return root


def _reader():
    from halluscope.metrics.nlp import load_nlp
    from halluscope.metrics.vocabulary import ObjectVocabulary
    from halluscope.training.apasi.graph import MentionReader

    return MentionReader(ObjectVocabulary.from_synonyms("shapes", {k: list(v) for k, v in SCENE_SYNONYMS.items()}),
                         load_nlp("offline"))


def _data(cli, taught, images, out, *extra):
    return cli("apasi", "data", "--model", taught, "--images", images, "--n", "4", "--max-new-tokens", "40",
               "--out", out, *extra)


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_apasi_data_and_train_end_to_end_and_rerun_resumes(cli, taught, images, tmp_path):
    data = tmp_path / "data"
    code, out, err = _data(cli, taught, images, data)
    assert code == 0, err
    pairs = pd.read_parquet(data / "pairs.parquet")
    assert list(pairs.columns) == list(PAIR_COLUMNS) and len(pairs) >= 2
    assert set(pairs["variant"]) == {"insert"} and "pairs, insert" in out
    for row in pairs.itertuples():
        assert row.rejected.count(",") + row.rejected.count(" and ") == row.chosen.count(",") + \
            row.chosen.count(" and ") + 1  # one more list item, still "A, B and C."
        assert not any(g in row.chosen for g in row.guide_objects)
    graph = json.loads((data / "graph.json").read_text())
    assert graph["vocabulary"] == "shapes" and graph["n_descriptions"] == 4
    manifest = json.loads((data / "manifest.json").read_text())
    arguments = manifest["steps"]["apasi-data"]["arguments"]
    assert arguments["variant"] == "auto" and arguments["continuation"]["repetition_penalty"] == 1.1
    assert manifest["steps"]["apasi-data"]["status"] == "finished"

    shards = {p: p.stat().st_mtime_ns for p in (data / "parts" / "apasi-describe").iterdir()}
    code, _, err = _data(cli, taught, images, data)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in (data / "parts" / "apasi-describe").iterdir()} == shards
    pd.testing.assert_frame_equal(pd.read_parquet(data / "pairs.parquet"), pairs)

    ckpt = tmp_path / "ckpt"
    train = ("apasi", "train", "--model", taught, "--data", data, "--out", ckpt, "--rounds", "2", "--epochs", "1",
             "--batch-size", "2", "--lr", "5e-4")
    code, out, err = cli(*train)
    assert code == 0, err
    rounds = pd.read_parquet(ckpt / "rounds.parquet")
    assert rounds["round"].tolist() == [0, 1] and rounds["rate"].tolist() == [0.2, 0.1]
    assert rounds["top_k"].tolist() == [10, 5]
    base, trained = load_vlm(taught), load_vlm(ckpt)
    reply = trained.generate(trained.encode([(Image.new("RGB", (56, 56), COLOURS[2]), CHAIR_PROMPT)]), 20)
    assert isinstance(reply[0], str)
    saved, loaded = (json.loads((path / "config.json").read_text()) for path in (ckpt, taught))
    assert saved.get("use_cache") == loaded.get("use_cache")  # training's cache switch is not saved
    before, after = _linear_weights(base.model), _linear_weights(trained.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(base.family.layers) and name.endswith("_proj.weight")
                           for name in changed)
    adapters = [json.loads((ckpt / "rounds" / f"round-{t}" / "adapter" / "adapter_config.json").read_text())
                for t in (0, 1)]
    assert adapters[0]["base_model_name_or_path"] == str(taught)
    assert adapters[1]["base_model_name_or_path"] == str(ckpt / "rounds" / "round-0" / "model")
    assert (ckpt / "rounds" / "round-1" / "data" / "pairs.parquet").is_file()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    dpo = manifest["steps"]["apasi-train"]["arguments"]["dpo"]
    assert dpo["beta"] == 0.1 and dpo["learning_rate"] == 5e-4 and dpo["device"] == "cpu"
    log = json.loads((ckpt / "train_log.json").read_text())
    assert set(log) == {"round-0", "round-1"} and any("loss" in entry for entry in log["round-0"])

    adapter = ckpt / "rounds" / "round-1" / "adapter" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    code, _, err = cli(*train)
    assert code == 0, err
    assert adapter.stat().st_mtime_ns == stamp  # finished rounds are not trained again
    assert load_vlm(ckpt).fingerprint() == trained.fingerprint()


def test_apasi_replace_variant_continues_guide_phrases(cli, taught, images, tmp_path):
    code, out, err = _data(cli, taught, images, tmp_path / "data", "--prompt", SENTENCES_PROMPT, "--variant",
                           "replace")
    assert code == 0, err
    pairs = pd.read_parquet(tmp_path / "data" / "pairs.parquet")
    assert len(pairs) >= 1 and set(pairs["variant"]) == {"replace"}
    from halluscope.training.apasi.sentences import split_sentences

    for row in pairs.itertuples():
        chosen, rejected = split_sentences(row.chosen), split_sentences(row.rejected)
        (index,) = row.replaced
        assert index != 0 and len(rejected) >= len(chosen)
        assert rejected[:index] == chosen[:index]
        assert row.guide_objects[0] in _reader().objects(rejected[index].text)  # by name or synonym ("block")



def test_apasi_swap_variant_keeps_the_number_of_list_items(cli, taught, images, tmp_path):
    code, out, err = _data(cli, taught, images, tmp_path / "data", "--variant", "swap")
    assert code == 0, err
    pairs = pd.read_parquet(tmp_path / "data" / "pairs.parquet")
    assert len(pairs) >= 2 and set(pairs["variant"]) == {"swap"} and "pairs, swap" in out
    for row in pairs.itertuples():
        assert row.rejected.count(",") + row.rejected.count(" and ") == row.chosen.count(",") + \
            row.chosen.count(" and ")  # as many list items as the chosen side
        assert not any(g in row.chosen for g in row.guide_objects)
        assert all(g in row.rejected for g in row.guide_objects)


def test_apasi_self_check_variant_asks_about_every_named_object_and_pairs_the_checked_description(
        cli, taught, images, tmp_path):
    data = tmp_path / "data"
    code, out, err = _data(cli, taught, images, data, "--variant", "self-check")
    assert code == 0, err
    descriptions = pd.read_parquet(data / "descriptions.parquet")["description"].tolist()
    named = [dict.fromkeys(_reader().objects(text)) for text in descriptions]
    checks = pd.read_parquet(data / "checks.parquet")
    assert list(zip(checks["item"], checks["object"])) == [(k, obj) for k, objs in enumerate(named) for obj in objs]
    # the taught model answers every question with a description, which POPE's rule reads as "yes"
    assert set(checks["answer"]) == {"yes"} and checks["p_yes"].between(0.5, 1.0).all()
    assert not checks["doubted"].any()
    pairs = pd.read_parquet(data / "pairs.parquet")
    assert set(pairs["variant"]) == {"omit"} and sorted(pairs["item"]) == [0, 1, 2, 3] and "pairs, omit" in out
    for row in pairs.itertuples():  # the description itself against it with one item fewer, the left-out one named
        assert row.chosen == descriptions[row.item]
        (left,) = row.guide_objects
        assert left in named[row.item] and left not in _reader().objects(row.rejected)
        assert row.rejected.count(",") + row.rejected.count(" and ") + 1 == row.chosen.count(",") + \
            row.chosen.count(" and ")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["steps"]["apasi-data"]["arguments"]["check"]["rule"] == "pope"
    assert manifest["steps"]["apasi-data"]["arguments"]["doubt"] == 0.5
    assert manifest["steps"]["apasi-check"]["summary"] == manifest["steps"]["apasi-score"]["summary"] == {
        "rows": len(checks)}
    assert manifest["steps"]["apasi-data"]["summary"]["dropped"] == {
        "self-check: the model confirms every object its description names": 4}

    stamp = {p: p.stat().st_mtime_ns for p in (data / "parts" / "apasi-check").iterdir()}
    code, _, err = _data(cli, taught, images, data, "--variant", "self-check")
    assert code == 0, err  # a rerun asks nothing again
    assert {p: p.stat().st_mtime_ns for p in (data / "parts" / "apasi-check").iterdir()} == stamp

    # a higher --doubt leaves out the object the model is least sure of: refused on this run, made with --force
    low = checks.sort_values("p_yes").iloc[0]
    # unrounded: on some CPUs the taught model's P(yes) values differ only in the 7th digit
    doubt = repr(float(low.p_yes + checks["p_yes"][checks["p_yes"] > low.p_yes].min()) / 2)
    code, _, err = _data(cli, taught, images, data, "--variant", "self-check", "--doubt", doubt)
    assert code == 2 and "different inputs" in err and "--force" in err
    code, out, err = _data(cli, taught, images, data, "--variant", "self-check", "--doubt", doubt, "--force")
    assert code == 0, err
    rechecked = pd.read_parquet(data / "checks.parquet")
    assert rechecked["doubted"].tolist() == (rechecked["p_yes"] < float(doubt)).tolist()
    assert rechecked["doubted"].sum() == 1 and "pairs, self-check" in out
    (left_out,) = pd.read_parquet(data / "pairs.parquet").query("variant == 'self-check'").itertuples()
    assert left_out.item == low["item"] and left_out.rejected == descriptions[low["item"]]
    assert list(left_out.guide_objects) == [low.object] and low.object not in _reader().objects(left_out.chosen)

    # a second training round regenerates self-check data with the data run's --doubt; --sft-weight is recorded
    ckpt = tmp_path / "ckpt"
    code, _, err = cli("apasi", "train", "--model", taught, "--data", data, "--out", ckpt, "--rounds", "2",
                       "--epochs", "1", "--batch-size", "2", "--lr", "5e-4", "--sft-weight", "0.5")
    assert code == 0, err
    dpo = json.loads((ckpt / "manifest.json").read_text())["steps"]["apasi-train"]["arguments"]["dpo"]
    assert dpo["sft_weight"] == 0.5 and dpo["loss"].endswith("+ 0.5 x token-mean NLL of the chosen response")
    regenerated = json.loads((ckpt / "rounds" / "round-1" / "data" / "manifest.json").read_text())
    assert regenerated["steps"]["apasi-data"]["arguments"]["variant"] == "self-check"
    assert regenerated["steps"]["apasi-data"]["arguments"]["doubt"] == float(doubt)


def test_apasi_self_check_on_synthetic_scenes_records_how_well_p_yes_separates_present_objects(cli, taught,
                                                                                                 tmp_path):
    from halluscope.training.apasi.sources import load_images

    data = tmp_path / "data"
    code, out, err = _data(cli, taught, "synthetic", data, "--variant", "self-check")
    assert code == 0, err
    checks = pd.read_parquet(data / "checks.parquet")
    truth = load_images("synthetic", n=4, seed=1).truth
    present = [obj in truth[item] for item, obj in zip(checks["item"], checks["object"])]  # image k is item k
    yes_present = [p for p, kind in zip(checks["p_yes"], present) if kind]
    yes_absent = [p for p, kind in zip(checks["p_yes"], present) if not kind]
    assert yes_present and yes_absent  # the taught descriptions name shapes some scenes hold and others not
    wins = sum((a > b) + 0.5 * (a == b) for a in yes_present for b in yes_absent)
    separated = json.loads((data / "manifest.json").read_text())["steps"]["apasi-data"]["summary"]["self_check"]
    assert separated["auroc"] == round(wins / (len(yes_present) * len(yes_absent)), 4)
    assert (separated["present"], separated["absent"]) == (len(yes_present), len(yes_absent))
    assert separated["doubted_absent"] == round(sum(p < 0.5 for p in yes_absent) / len(yes_absent), 4)
    assert f"AUROC {separated['auroc']:.3f}" in out


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (("--variant", "shuffle"), "unknown --variant 'shuffle'"),
    (("--rate", "1.5"), "--rate 1.5; expected a fraction strictly between 0 and 1"),
    (("--top-k", "0"), "--top-k 0; expected a whole number >= 1"),
    (("--doubt", "1"), "--doubt 1.0; expected a probability strictly between 0 and 1"),
    (("--n", "9"), "--n 9 is more than the 4 images"),
])
def test_apasi_data_errors_are_one_line_and_write_nothing(cli, taught, images, tmp_path, extra, message):
    code, _, err = _data(cli, taught, images, tmp_path / "data", *extra)
    assert code == 2 and message in _one_error_line(err)
    assert not (tmp_path / "data").exists()


def test_apasi_data_names_a_missing_image_source(cli, taught, tmp_path):
    code, _, err = cli("apasi", "data", "--model", taught, "--images", tmp_path / "nowhere", "--out", tmp_path / "d")
    assert code == 2 and "is neither 'synthetic' nor a directory" in _one_error_line(err)


def test_apasi_train_errors_are_one_line(cli, taught, images, tmp_path):
    data = tmp_path / "data"
    assert _data(cli, taught, images, data)[0] == 0
    bench = tmp_path / "bench"
    assert cli("bench", "chair", "--model", taught, "--data", "synthetic", "--n", "1", "--max-new-tokens", "4",
               "--out", bench)[0] == 0
    cases = [
        ((taught, tmp_path / "nowhere"), "is not a run directory"),
        ((taught, bench), "is not a finished `halluscope apasi data` run"),
        ((taught.parent / "tiny", data), "APASI trains a model on its own descriptions"),
    ]
    for (model, source), message in cases:
        code, _, err = cli("apasi", "train", "--model", model, "--data", source, "--out", tmp_path / "ckpt")
        assert code == 2 and message in _one_error_line(err), err
    code, _, err = cli("apasi", "train", "--model", taught, "--data", data, "--out", tmp_path / "ckpt", "--lr", "0")
    assert code == 2 and "--lr 0.0; expected a number > 0" in _one_error_line(err)
    code, _, err = cli("apasi", "train", "--model", taught, "--data", data, "--out", tmp_path / "ckpt",
                       "--sft-weight", "-1")
    assert code == 2 and "--sft-weight -1.0; expected a number >= 0" in _one_error_line(err)
    assert not (tmp_path / "ckpt").exists()
