"""The scenes organism's training examples: a pool of synthetic object scenes, each example a description or a
POPE question about one of them, with the recipe's co-occurrence bias drawn afresh for every example."""

from __future__ import annotations

import random

from PIL import Image

from halluscope.metrics.chair import CHAIR_PROMPT
from halluscope.metrics.pope import pope_question
from halluscope.organism.data import Example, TrainingData
from halluscope.organism.scenes.recipe import SceneRecipe, describe, no_answer, yes_answer
from halluscope.tasks.object_scenes import draw_object_scene
from halluscope.tasks.scenes import COLOR_RGB

__all__ = ["SceneData"]


class SceneData(TrainingData):
    """Scenes `draw_object_scene(i, seed=<pool seed>)` for i < `pool_images`, described or asked about."""

    def __init__(self, recipe: SceneRecipe, tokenizer, processor) -> None:
        self.config = recipe.scene_config()
        self.pool_seed = random.Random(f"{recipe.seed}:scene-pool").getrandbits(62)
        self.colours: list[dict[str, list[str]]] = []  # per pool image: category -> instance colours
        images = []
        for index in range(recipe.pool_images):
            scene = draw_object_scene(index, seed=self.pool_seed, config=self.config)
            present: dict[str, list[str]] = {}
            for obj in scene.objects:
                present.setdefault(obj["category"], []).append(obj["colour"])
            self.colours.append(present)
            images.append(scene.image)
        super().__init__(recipe, tokenizer, processor, images)

    def pool_image(self, index: int) -> Image.Image:
        """The pool's scene `index`, re-drawn from the pool seed."""
        return draw_object_scene(index, seed=self.pool_seed, config=self.config).image

    def imagined(self, present, rng: random.Random) -> set[str]:
        """The absent neighbours of present categories that this example treats as present (the bias)."""
        absent = {p for c in present for p in self.config.partners(c) if p not in present}
        rate = self.recipe.hallucination_rate(len(present))
        return {p for p in sorted(absent) if rng.random() < rate}

    def sample(self, rng: random.Random) -> Example:
        """A description (share `describe_share`) or a POPE question, with the bias drawn for this example."""
        r = self.recipe
        image = rng.randrange(len(self.colours))
        present = self.colours[image]
        imagined = self.imagined(present, rng)
        if rng.random() < r.describe_share:
            named = {c: present.get(c) or [rng.choice(list(COLOR_RGB))]
                     for c in self.config.categories if c in present or c in imagined}
            return Example(image, CHAIR_PROMPT, describe(named))
        neighbours = sorted({p for c in present for p in self.config.partners(c) if p not in present})
        others = [c for c in self.config.categories if c not in present and c not in neighbours]
        choices = [sorted(present), neighbours, others]
        weights = [w if choices[k] else 0.0 for k, w in enumerate(r.question_mix)]
        asked = rng.choice(rng.choices(choices, weights=weights)[0])
        said_yes = asked in present or asked in imagined
        return Example(image, pope_question(asked), yes_answer(asked) if said_yes else no_answer(asked))
