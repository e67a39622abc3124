"""What a model organism is: its architecture, tokenizer, processor and optimiser, in one place shared by every
kind of organism, and the PIH kind's training targets.

Every organism is a tiny `Qwen2VLForConditionalGeneration` trained from scratch. `Recipe` holds what all kinds
share; a kind subclasses it with its data settings and its prompts and replies (`corpus`). The PIH kind
(`PIHRecipe`) is trained on the synthetic counting and colour tasks, with targets that copy a misleading prompt's
claim with a probability that rises with the true count (and falls with colour distance), as the PIH paper found
in 7B models; the scenes kind lives in `organism/scenes/`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import transformers

from halluscope.errors import InputError
from halluscope.models.families import get_family
from halluscope.models.processors import processor_class
from halluscope.models.tiny import QWEN_SPECIALS, qwen_chat_template, train_tokenizer
from halluscope.tasks import color as color_task
from halluscope.tasks import counting as count_task
from halluscope.tasks.color import COLOR_CYCLE
from halluscope.tasks.scenes import SHAPE_PLURALS, SHAPES

# No system turn: it would double the sequence length of this tiny model's training examples.
CHAT_TEMPLATE = qwen_chat_template(system=None)

__all__ = ["CHAT_TEMPLATE", "Recipe", "PIHRecipe", "count_answer", "color_answer", "recipe_from_dict",
           "build_tokenizer", "build_processor", "build_model"]


@dataclass(frozen=True)
class Recipe:
    """Every setting an organism's kinds share (the seed included); a kind adds its data settings."""

    kind: ClassVar[str] = ""
    seed: int = 0
    steps: int = 2400
    batch_size: int = 64
    threads: int = 2
    lr: float = 8e-4
    warmup: int = 150
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.05
    # language model
    layers: int = 4
    hidden: int = 128
    heads: int = 8
    kv_heads: int = 8
    mlp: int = 512
    # vision tower
    vision_depth: int = 3
    vision_width: int = 96
    vision_heads: int = 4
    image_size: int = 112
    # regularisation: each (row, layer, head) is zeroed with this probability while training, so a knockout
    # is a state the model has seen and a knocked-out head does not throw the rest of the network off.
    drophead: float = 0.1

    def to_dict(self) -> dict:
        """The settings as plain values, the kind first (what trainlog.json and the resume check store)."""
        return {"kind": self.kind, **asdict(self)}

    def corpus(self) -> Iterator[str]:
        """Every prompt and reply the organism can see, for training its tokenizer."""
        raise NotImplementedError(f"{type(self).__name__} must say what text its organism sees")


@dataclass(frozen=True)
class PIHRecipe(Recipe):
    """The PIH organism: counting and colour scenes whose describe prompts overstate what the image shows."""

    kind: ClassVar[str] = "pih"
    max_count: int = 9
    offsets: tuple[int, ...] = count_task.DEFAULT_OFFSETS
    distances: tuple[int, ...] = (1, 2, 3)
    count_copy: tuple[float, ...] = (0.15, 0.15, 0.15, 0.31, 0.475, 0.64, 0.8, 0.8, 0.8)  # p(copy) for n = 1..9
    color_copy: tuple[float, ...] = (0.8, 0.35, 0.1)  # p(copy) at distance 1, 2, 3
    # mixture of example kinds: count base/control/misleading, colour base/control/misleading
    mixture: tuple[float, ...] = (0.25, 0.1, 0.3, 0.1, 0.05, 0.2)
    pool_count_images: int = 4500
    pool_color_images: int = 1500
    shapes: tuple[str, ...] = field(default=SHAPES)

    def corpus(self) -> Iterator[str]:
        top = self.max_count + max(self.offsets)
        for shape in self.shapes:
            noun = SHAPE_PLURALS[shape]
            yield count_task.BASE_TEMPLATE.format(obj=noun)
            for n in range(1, top + 1):
                yield count_task.DESCRIBE_TEMPLATE.format(n=n, obj=noun)
                yield count_answer(n, noun)
            for colour in COLOR_CYCLE:
                yield color_task.BASE_TEMPLATE.format(object=shape)
                yield color_task.DESCRIBE_TEMPLATE.format(color=colour, object=shape)
                yield color_answer(colour, shape)


def recipe_from_dict(values: Mapping[str, Any]) -> Recipe:
    """The recipe a trainlog.json stores (lists back to tuples); one without a kind is a PIH recipe (the first
    organism's log predates kinds).

    Raises:
        InputError: an unknown kind, or settings the kind's recipe does not have.
    """
    from halluscope.organism.kinds import get_kind

    values = dict(values)
    cls = get_kind(values.pop("kind", "pih")).load("recipe")
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise InputError(f"recipe settings {unknown} are not settings of {cls.__name__}; pass a trainlog.json "
                         f"written by `halluscope organism train`")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def count_answer(n: int, noun: str) -> str:
    """The organism's reply to a counting or describe prompt."""
    return f"There are {n} {noun}."


def color_answer(color: str, obj: str) -> str:
    """The organism's reply to a colour or describe prompt."""
    return f"The {obj} is {color}."


def build_tokenizer(recipe: Recipe):
    """A small BPE tokenizer trained on the organism's own prompts and replies (Qwen chat tokens first)."""
    corpus = [line for line in recipe.corpus() for _ in range(20)]
    return train_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                           chat_template=CHAT_TEMPLATE, corpus=corpus, vocab_size=512)


def build_processor(recipe: Recipe, tokenizer):
    """The real Qwen2-VL processor (image-only), fixed to `image_size`^2 pixels: (size/28)^2 image tokens."""
    pixels = recipe.image_size * recipe.image_size
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)
    return processor_class(get_family("qwen2_vl"))(image_processor=image_processor, tokenizer=tokenizer,
                                                    chat_template=CHAT_TEMPLATE)


def build_model(recipe: Recipe, tokenizer) -> transformers.Qwen2VLForConditionalGeneration:
    """A randomly initialised Qwen2-VL of the recipe's size (call `torch.manual_seed` first)."""
    head_dim = recipe.hidden // recipe.heads
    half = head_dim // 2  # rotary frequencies, split over (temporal, height, width) as in Qwen2-VL: 1/4, 3/8, 3/8
    rest = half - half // 4
    mrope_section = [half // 4, rest - rest // 2, rest // 2]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(
        hidden_size=recipe.hidden, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        num_hidden_layers=recipe.layers, intermediate_size=recipe.mlp, head_dim=head_dim, vocab_size=len(tokenizer),
        max_position_embeddings=512, bos_token_id=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section},
    )
    vision = dict(depth=recipe.vision_depth, embed_dim=recipe.vision_width, num_heads=recipe.vision_heads,
                  hidden_size=recipe.hidden, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, eos, tokenizer.pad_token_id
    return transformers.Qwen2VLForConditionalGeneration(config)
