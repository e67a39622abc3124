"""The supported VLM families as data: one `Family` entry per architecture says where its modules live,
which config field holds the image token, how its processor is built and what its chat turn looks like.
Adding a family is adding an entry to `FAMILIES`; nothing else in the package branches on the family."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from halluscope.errors import ModelLoadError

__all__ = ["Family", "FAMILIES", "family_for_model_type", "get_family"]


@dataclass(frozen=True)
class Family:
    """Everything halluscope needs to know about one HF VLM architecture.

    Module paths are dotted attribute paths from the `*ForConditionalGeneration` model.
    """

    name: str
    model_type: str
    model_class: str
    layers: str
    norm: str
    vision: str
    image_token_field: str
    processor_class: str
    text_config_field: str = "text_config"
    lm_head: str = "lm_head"
    embed_tokens: str = "model.language_model.embed_tokens"
    processor_has_video: bool = False
    # What separates the assistant prefix from the reply's first word ("ASSISTANT: 4" vs "assistant\n4").
    reply_separator: str = ""
    # The smallest image side the family's processor accepts; smaller images are upscaled to it.
    min_image_side: int = 1
    example_hub_id: str = ""


_LANGUAGE_MODEL = "model.language_model"
_TEXT_MODEL = "model.text_model"

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="qwen2_vl",
            model_type="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            layers=f"{_LANGUAGE_MODEL}.layers",
            norm=f"{_LANGUAGE_MODEL}.norm",
            vision="model.visual",
            image_token_field="image_token_id",
            processor_class="Qwen2VLProcessor",
            processor_has_video=True,
            min_image_side=28,
            example_hub_id="Qwen/Qwen2-VL-7B-Instruct",
        ),
        Family(
            name="qwen2_5_vl",
            model_type="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            layers=f"{_LANGUAGE_MODEL}.layers",
            norm=f"{_LANGUAGE_MODEL}.norm",
            vision="model.visual",
            image_token_field="image_token_id",
            processor_class="Qwen2_5_VLProcessor",
            processor_has_video=True,
            min_image_side=28,
            example_hub_id="Qwen/Qwen2.5-VL-7B-Instruct",
        ),
        Family(
            name="llava",
            reply_separator=" ",
            model_type="llava",
            model_class="LlavaForConditionalGeneration",
            layers=f"{_LANGUAGE_MODEL}.layers",
            norm=f"{_LANGUAGE_MODEL}.norm",
            vision="model.vision_tower",
            image_token_field="image_token_index",
            processor_class="LlavaProcessor",
            example_hub_id="llava-hf/llava-1.5-7b-hf",
        ),
        Family(
            name="llava_onevision",
            model_type="llava_onevision",
            model_class="LlavaOnevisionForConditionalGeneration",
            layers=f"{_LANGUAGE_MODEL}.layers",
            norm=f"{_LANGUAGE_MODEL}.norm",
            vision="model.vision_tower",
            image_token_field="image_token_index",
            processor_class="LlavaOnevisionProcessor",
            processor_has_video=True,
            example_hub_id="llava-hf/llava-onevision-qwen2-7b-ov-hf",
        ),
        Family(
            name="idefics3",
            reply_separator=" ",
            model_type="idefics3",
            model_class="Idefics3ForConditionalGeneration",
            layers=f"{_TEXT_MODEL}.layers",
            norm=f"{_TEXT_MODEL}.norm",
            vision="model.vision_model",
            image_token_field="image_token_id",
            processor_class="Idefics3Processor",
            embed_tokens=f"{_TEXT_MODEL}.embed_tokens",
            example_hub_id="HuggingFaceM4/Idefics3-8B-Llama3",
        ),
        Family(
            name="smolvlm",
            reply_separator=" ",
            model_type="smolvlm",
            model_class="SmolVLMForConditionalGeneration",
            layers=f"{_TEXT_MODEL}.layers",
            norm=f"{_TEXT_MODEL}.norm",
            vision="model.vision_model",
            image_token_field="image_token_id",
            processor_class="SmolVLMProcessor",
            processor_has_video=True,
            embed_tokens=f"{_TEXT_MODEL}.embed_tokens",
            example_hub_id="HuggingFaceTB/SmolVLM-Instruct",
        ),
        Family(
            name="janus",
            model_type="janus",
            model_class="JanusForConditionalGeneration",
            layers=f"{_LANGUAGE_MODEL}.layers",
            norm=f"{_LANGUAGE_MODEL}.norm",
            vision="model.vision_model",
            image_token_field="image_token_id",
            processor_class="JanusProcessor",
            reply_separator=" ",
            example_hub_id="deepseek-community/Janus-Pro-7B",
        ),
    )
}

_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def _unknown(kind: str, value: str, valid: list[str]) -> ModelLoadError:
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ModelLoadError(f"unknown {kind} {value!r}.{hint} Supported: {', '.join(sorted(valid))}")


def get_family(name: str) -> Family:
    """The family entry for a halluscope family name such as "qwen2_vl"."""
    if name not in FAMILIES:
        raise _unknown("family", name, list(FAMILIES))
    return FAMILIES[name]


def family_for_model_type(model_type: str) -> Family:
    """The family entry for a checkpoint's `config.model_type`."""
    if model_type not in _BY_MODEL_TYPE:
        raise _unknown("model_type", model_type, list(_BY_MODEL_TYPE))
    return _BY_MODEL_TYPE[model_type]
