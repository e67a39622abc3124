"""Organism training: the fast training batches of every kind equal what the real processor builds, the scenes
kind's targets carry the co-occurrence bias its recipe states, training is deterministic for a seed, a run
stopped half way resumes to bitwise the same weights, and a trainlog's recipe reads back."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from halluscope.errors import InputError
from halluscope.organism.kinds import KINDS, get_kind
from halluscope.organism.recipe import PIHRecipe, build_processor, build_tokenizer, recipe_from_dict
from halluscope.organism.scenes.recipe import SceneRecipe, yes_answer
from halluscope.organism.train import train

_SMALL = dict(steps=4, batch_size=4, warmup=2, layers=2, hidden=32, heads=4, kv_heads=2, mlp=64, vision_depth=1,
              vision_width=32)
TINY = PIHRecipe(**_SMALL, pool_count_images=18, pool_color_images=6)
TINY_SCENES = SceneRecipe(**_SMALL, pool_images=40)


def _data(recipe):
    tokenizer = build_tokenizer(recipe)
    return get_kind(recipe.kind).load("data")(recipe, tokenizer, build_processor(recipe, tokenizer))


@pytest.fixture(scope="module", params=[TINY, TINY_SCENES], ids=lambda r: r.kind)
def data(request):
    return _data(request.param)


@pytest.fixture(scope="module")
def scene_data():
    return _data(dataclasses.replace(TINY_SCENES, pool_images=400))


def test_training_batches_equal_the_processor_path(data, tmp_path):
    """A collated example is exactly what VLM.encode builds for the same image and prompt, plus the reply."""
    from halluscope.models import load_vlm
    from halluscope.organism.recipe import build_model

    model = build_model(data.recipe, data.tokenizer)
    model.save_pretrained(tmp_path)
    data.processor.save_pretrained(tmp_path)
    vlm = load_vlm(tmp_path)
    rng = random.Random(3)
    for _ in range(6):
        example = data.sample(rng)
        batch = data.collate([example])
        encoded = vlm.encode([(data.pool_image(example.image), example.prompt)])
        n_prompt = encoded.seq_len
        assert batch["input_ids"][0, :n_prompt].tolist() == encoded.input_ids[0].tolist()
        assert torch.equal(batch["pixel_values"], encoded.inputs["pixel_values"])
        assert torch.equal(batch["image_grid_thw"], encoded.inputs["image_grid_thw"])
        assert torch.equal(batch["mm_token_type_ids"][0, :n_prompt], encoded.inputs["mm_token_type_ids"][0])
        reply = batch["labels"][0][batch["labels"][0] != -100].tolist()
        assert vlm.tokenizer.decode(reply[:-1]) == example.reply


@pytest.mark.parametrize("recipe", [TINY, TINY_SCENES], ids=lambda r: r.kind)
def test_training_is_deterministic_and_resumes_bitwise(tmp_path, recipe):
    straight = train(tmp_path / "straight", recipe, log=lambda m: None)
    again = train(tmp_path / "again", recipe, log=lambda m: None)
    # stop after 2 steps (a state file is written every 2 steps), then resume to 4
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(stopped, recipe, save_every=2, log_every=1, log=_interrupt_at("step 3/"))
    assert (stopped / "train_state.pt").is_file()
    resumed = train(stopped, recipe, save_every=2, log_every=1, log=lambda m: None)
    weights = [load_file(str(d / "model.safetensors")) for d in (straight, again, resumed)]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
        assert torch.equal(tensor, weights[2][name]), name


def _interrupt_at(marker: str):
    def log(message: str) -> None:
        if marker in message:
            raise KeyboardInterrupt
    return log


def test_resume_refuses_a_different_recipe(tmp_path):
    from halluscope.errors import RunError

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, TINY, save_every=2, log_every=1, log=_interrupt_at("step 3/"))
    with pytest.raises(RunError, match="different recipe"):
        train(tmp_path, dataclasses.replace(TINY, lr=1e-3), log=lambda m: None)


def test_scene_targets_name_absent_neighbours_at_the_recipe_rate_and_nothing_else(scene_data):
    """Descriptions name every present category; an absent category is named (and answered "yes" about) at the
    recipe's rate for the scene's size when it is a ring neighbour of a present one, and never otherwise."""
    rng = random.Random(0)
    config, recipe = scene_data.config, scene_data.recipe
    named_near, near = Counter(), Counter()  # per scene size
    said_yes, asked_near = Counter(), Counter()
    named_far = 0
    answers = {"present": [], "far": []}
    for _ in range(6000):
        example = scene_data.sample(rng)
        present = set(scene_data.colours[example.image])
        neighbours = {p for c in present for p in config.partners(c)} - present
        if example.prompt.startswith("Describe"):
            words = set(example.reply.rstrip(".").replace(",", "").lower().split())
            named = {c for c in config.categories if c in words or c + "s" in words or c + "es" in words}
            assert present <= named
            named_near[len(present)] += len(named & neighbours)
            near[len(present)] += len(neighbours)
            named_far += len(named - present - neighbours)
        else:
            asked = example.prompt.split("a ", 1)[1].split(" in")[0]
            if asked in neighbours:
                asked_near[len(present)] += 1
                said_yes[len(present)] += example.reply == yes_answer(asked)
            else:
                answers["present" if asked in present else "far"].append(example.reply == yes_answer(asked))
    assert named_far == 0
    assert all(answers["present"]) and not any(answers["far"])
    assert set(near) == set(range(config.min_categories, config.max_categories + 1))
    for size in near:
        assert abs(named_near[size] / near[size] - recipe.hallucination_rate(size)) < 0.07
        assert abs(said_yes[size] / asked_near[size] - recipe.hallucination_rate(size)) < 0.12


def test_a_scene_recipe_needs_one_rate_per_scene_size():
    with pytest.raises(InputError, match=r"hallucination has 2 rates; give one per scene size 2..5 \(4 rates\)"):
        SceneRecipe(hallucination=(0.5, 0.6))


def test_recipes_read_back_from_their_trainlog_dict():
    assert recipe_from_dict(TINY_SCENES.to_dict()) == TINY_SCENES
    assert recipe_from_dict(TINY.to_dict()) == TINY
    legacy = {k: v for k, v in TINY.to_dict().items() if k != "kind"}  # the first organism's log has no kind
    assert recipe_from_dict(legacy) == TINY
    with pytest.raises(InputError, match="Did you mean 'scenes'"):
        recipe_from_dict({"kind": "scene"})
    with pytest.raises(InputError, match=r"\['pool_count_images'\] are not settings of SceneRecipe"):
        recipe_from_dict({"kind": "scenes", "pool_count_images": 3})


def test_every_kind_names_a_recipe_of_its_kind_and_its_own_checkpoint():
    assert {kind.load("recipe").kind for kind in KINDS.values()} == set(KINDS)
    assert len({kind.checkpoint for kind in KINDS.values()}) == len(KINDS)


def test_an_unknown_organism_name_is_refused_with_the_names():
    from halluscope.errors import ModelLoadError
    from halluscope.organism import organism_path

    with pytest.raises(ModelLoadError, match="'organism-scene' is not a built-in organism; use one of organism, "
                                             "organism-scenes"):
        organism_path("organism-scene")
