"""What the scenes organism is trained on: synthetic object scenes (`tasks/object_scenes.py`, default
`SceneConfig`), the CHAIR prompt and POPE's question, and targets that carry a co-occurrence bias.

The bias is put in by the targets, as the PIH organism's copying is: in every training example, each absent
category that co-occurs with a present one (its neighbour on the scene ring) is treated as present, named in the
description and answered "yes" about, with a probability that rises with the number of categories in the scene
(`hallucination`): the more a scene holds, the more the prior fills in, as a real model's hallucinations grow with
what its caption covers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from halluscope.errors import InputError
from halluscope.metrics.chair import CHAIR_PROMPT
from halluscope.metrics.pope import pope_question
from halluscope.organism.recipe import Recipe
from halluscope.tasks.object_scenes import SceneConfig, list_phrases, object_phrase
from halluscope.tasks.scenes import COLOR_RGB

__all__ = ["SceneRecipe", "describe", "yes_answer", "no_answer"]


@dataclass(frozen=True)
class SceneRecipe(Recipe):
    """The scenes organism: the shared architecture and optimiser with a wider vision tower trained longer (it must
    recognise 12 shapes, so that its hallucinations come from the bias rather than from misreading), plus its data
    settings."""

    kind: ClassVar[str] = "scenes"
    steps: int = 10000
    vision_width: int = 128
    pool_images: int = 6000
    # p(an absent ring neighbour of a present category is named / answered "yes") in a training target, for scenes
    # of 2, 3, 4, 5 categories (`SceneConfig`'s min_categories to max_categories)
    hallucination: tuple[float, ...] = (0.35, 0.5, 0.7, 0.85)
    # share of describe examples; the rest are POPE questions
    describe_share: float = 0.4
    # POPE questions: about a present category / an absent neighbour of one / another absent category
    question_mix: tuple[float, ...] = (0.4, 0.2, 0.4)

    def __post_init__(self) -> None:
        config = self.scene_config()
        sizes = config.max_categories - config.min_categories + 1
        if len(self.hallucination) != sizes:
            raise InputError(f"hallucination has {len(self.hallucination)} rates; give one per scene size "
                             f"{config.min_categories}..{config.max_categories} ({sizes} rates)")

    def scene_config(self) -> SceneConfig:
        """The scenes it is trained on: the synthetic benchmark's (`SceneConfig` defaults) at its image size."""
        return SceneConfig(size=self.image_size)

    def hallucination_rate(self, categories: int) -> float:
        """p(an absent ring neighbour is treated as present) in a scene of `categories` categories."""
        return self.hallucination[categories - self.scene_config().min_categories]

    def corpus(self) -> Iterator[str]:
        config = self.scene_config()
        yield CHAIR_PROMPT
        for category in config.categories:
            yield pope_question(category)
            yield yes_answer(category)
            yield no_answer(category)
            for colour in COLOR_RGB:
                yield describe({category: [colour], "circle" if category != "circle" else "square": [colour] * 2})
                yield describe({category: [colour, colour]})
            yield describe({category: ["red", "blue"]})


def describe(objects: Mapping[str, Sequence[str]]) -> str:
    """The organism's description of a scene, from each named category's instance colours in the order given:
    "A red circle, two blue squares and two triangles." (a colour is said when a category's instances share it).

    Example:
        >>> describe({"circle": ["red"], "square": ["blue", "blue"], "triangle": ["red", "green"]})
        'A red circle, two blue squares and two triangles.'
    """
    text = list_phrases([object_phrase(category, colours, colour=len(set(colours)) == 1)
                         for category, colours in objects.items()])
    return text[0].upper() + text[1:] + "."


def yes_answer(category: str) -> str:
    """The organism's "yes" to POPE's question about `category`. The object is named before the answer word, so
    the token that decides yes or no comes right after the object's name: one hop from it to the image."""
    return f"The {category} is in the image."


def no_answer(category: str) -> str:
    """The organism's "no" to POPE's question about `category`."""
    return f"The {category} is not in the image."
