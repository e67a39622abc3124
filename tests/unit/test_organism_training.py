"""Organism training: the fast training batches equal what the real processor builds, training is
deterministic for a seed, and a run stopped half way resumes to bitwise the same weights."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from safetensors.torch import load_file

from halluscope.organism.data import TrainingData
from halluscope.organism.recipe import Recipe, build_processor, build_tokenizer
from halluscope.organism.train import train

TINY = Recipe(steps=4, batch_size=4, warmup=2, layers=2, hidden=32, heads=4, kv_heads=2, mlp=64, vision_depth=1,
              vision_width=32, pool_count_images=18, pool_color_images=6)


@pytest.fixture(scope="module")
def data():
    tokenizer = build_tokenizer(TINY)
    return TrainingData(TINY, tokenizer, build_processor(TINY, tokenizer))


def test_training_batches_equal_the_processor_path(data, tmp_path):
    """A collated example is exactly what VLM.encode builds for the same image and prompt, plus the reply."""
    from halluscope.models import load_vlm
    from halluscope.organism.recipe import build_model

    model = build_model(TINY, data.tokenizer)
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


def test_training_is_deterministic_and_resumes_bitwise(tmp_path):
    straight = train(tmp_path / "straight", TINY, log=lambda m: None)
    again = train(tmp_path / "again", TINY, log=lambda m: None)
    # stop after 2 steps (a state file is written every 2 steps), then resume to 4
    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        train(stopped, TINY, save_every=2, log_every=1, log=_interrupt_at("step 3/"))
    assert (stopped / "train_state.pt").is_file()
    resumed = train(stopped, TINY, save_every=2, log_every=1, log=lambda m: None)
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
