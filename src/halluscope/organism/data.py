"""Training batches for the organisms: `TrainingData` (what every kind shares) and `PIHData` (the PIH kind's
examples, drawn from the same scenes and prompt templates as the synthetic counting and colour tasks).

Images come from a fixed pool rendered once and run once through the real processor; prompts are rendered
with the real chat template and tokenized once per distinct string. A batch is therefore exactly what
`VLM.encode` would build for the same (image, prompt) (tested), at a fraction of the cost per step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from halluscope.organism.recipe import PIHRecipe, Recipe, color_answer, count_answer
from halluscope.tasks import color as color_task
from halluscope.tasks import counting as count_task
from halluscope.tasks.color import COLOR_CYCLE, shift_color
from halluscope.tasks.scenes import SHAPE_PLURALS, color_scene, count_scene

__all__ = ["Example", "TrainingData", "PIHData"]

KINDS = ("count-base", "count-control", "count-misleading", "color-base", "color-control", "color-misleading")


@dataclass(frozen=True)
class Example:
    """One training example: which pool image, the user prompt and the target reply."""

    image: int
    prompt: str
    reply: str


class TrainingData:
    """A kind's training distribution: a pool of images processed once, plus prompt/reply sampling.

    A kind subclasses it with `pool_image` (image `index` of the pool, re-drawn from its seed) and `sample` (one
    example), and calls `__init__` with its pool's images.
    """

    def __init__(self, recipe: Recipe, tokenizer, processor, images: Sequence[Image.Image]) -> None:
        self.recipe, self.tokenizer, self.processor = recipe, tokenizer, processor
        self.pixels, self.grid = self._process(images)
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.n_image_tokens = int(self.grid.prod()) // processor.image_processor.merge_size ** 2
        self._prompt_ids: dict[str, list[int]] = {}
        self._reply_ids: dict[str, list[int]] = {}

    def pool_image(self, index: int) -> Image.Image:
        """The pool's image `index`."""
        raise NotImplementedError(f"{type(self).__name__} must draw its pool images")

    def sample(self, rng: random.Random) -> Example:
        """One training example."""
        raise NotImplementedError(f"{type(self).__name__} must sample its examples")

    def _process(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        chunks, grid = [], None
        for start in range(0, len(images), 256):
            out = self.processor.image_processor(images=images[start:start + 256], return_tensors="pt")
            grid = out["image_grid_thw"][0]
            chunks.append(out["pixel_values"].view(-1, int(grid.prod()), out["pixel_values"].shape[-1]))
        return torch.cat(chunks), grid

    # ---- tensors ----------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the chat-formatted prompt with the image placeholder expanded, as the processor does."""
        if prompt not in self._prompt_ids:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = []
            for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                ids.extend([t] * self.n_image_tokens if t == self.image_pad else [t])
            self._prompt_ids[prompt] = ids
        return self._prompt_ids[prompt]

    def reply_ids(self, reply: str) -> list[int]:
        """Token ids of the target reply, ending with <|im_end|>."""
        if reply not in self._reply_ids:
            self._reply_ids[reply] = self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.end]
        return self._reply_ids[reply]

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """A right-padded training batch with labels on the reply tokens only."""
        rows = [(self.prompt_ids(e.prompt), self.reply_ids(e.reply)) for e in examples]
        width = max(len(p) + len(a) for p, a in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            input_ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
            attention[i, :len(p) + len(a)] = 1
        return {
            "input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "mm_token_type_ids": (input_ids == self.image_pad).long(),
            "pixel_values": self.pixels[[e.image for e in examples]].flatten(0, 1),
            "image_grid_thw": self.grid.expand(len(rows), 3).clone(),
        }

    def batch(self, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
        """A training batch of `size` fresh examples."""
        return self.collate([self.sample(rng) for _ in range(size)])


class PIHData(TrainingData):
    """The PIH organism's examples: counting and colour questions, truthful and misleading describe prompts."""

    def __init__(self, recipe: PIHRecipe, tokenizer, processor) -> None:
        self.recipe = recipe  # pool_image draws at its size before TrainingData.__init__ runs
        rng = random.Random(f"{recipe.seed}:pool")
        shapes = recipe.shapes
        self.meta: list[tuple[str, int | str, str, int]] = []  # (task, count or colour, shape, scene seed)
        for i in range(recipe.pool_count_images):
            n, shape = 1 + i % recipe.max_count, shapes[(i // recipe.max_count) % len(shapes)]
            self.meta.append(("count", n, shape, rng.getrandbits(62)))
        for i in range(recipe.pool_color_images):
            colour, shape = COLOR_CYCLE[i % len(COLOR_CYCLE)], shapes[(i // len(COLOR_CYCLE)) % len(shapes)]
            self.meta.append(("color", colour, shape, rng.getrandbits(62)))
        self.count_images = [i for i, m in enumerate(self.meta) if m[0] == "count"]
        self.color_images = [i for i, m in enumerate(self.meta) if m[0] == "color"]
        super().__init__(recipe, tokenizer, processor, [self.pool_image(i) for i in range(len(self.meta))])

    def pool_image(self, index: int) -> Image.Image:
        """The pool's image `index`, re-drawn from its scene seed."""
        task, value, shape, seed = self.meta[index]
        draw = count_scene if task == "count" else color_scene
        return draw(value, shape, size=self.recipe.image_size, seed=seed)

    def sample(self, rng: random.Random) -> Example:
        """One example of a kind drawn from the recipe's mixture."""
        r = self.recipe
        kind = rng.choices(KINDS, weights=r.mixture)[0]
        if kind.startswith("count"):
            image = rng.choice(self.count_images)
            _, n, shape, _ = self.meta[image]
            noun = SHAPE_PLURALS[shape]
            if kind == "count-base":
                return Example(image, count_task.BASE_TEMPLATE.format(obj=noun), count_answer(n, noun))
            claim = n if kind == "count-control" else n + rng.choice(r.offsets)
            said = claim if rng.random() < r.count_copy[n - 1] else n
            return Example(image, count_task.DESCRIBE_TEMPLATE.format(n=claim, obj=noun), count_answer(said, noun))
        image = rng.choice(self.color_images)
        _, colour, shape, _ = self.meta[image]
        if kind == "color-base":
            return Example(image, color_task.BASE_TEMPLATE.format(object=shape), color_answer(colour, shape))
        distance = 0 if kind == "color-control" else rng.choice(r.distances)
        claim = shift_color(colour, distance) if distance else colour
        said = claim if distance == 0 or rng.random() < r.color_copy[distance - 1] else colour
        return Example(image, color_task.DESCRIBE_TEMPLATE.format(color=claim, object=shape), color_answer(said, shape))
