"""Tiny random checkpoints of every supported family, built offline.

Each builder trains a small byte-level BPE tokenizer, makes the real transformers config small (fewer KV
heads than query heads, as in the real models), builds the real model class and processor, and saves them
with `save_pretrained`. Tests then load them through `load_vlm`, the same path a hub checkpoint takes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from halluscope.models.families import FAMILIES, get_family
from halluscope.models.processors import processor_class

__all__ = ["TINY_FAMILIES", "QWEN_SPECIALS", "QWEN_TEMPLATE", "build_tiny", "qwen_chat_template", "build_tiny_models", "tokenizer_corpus", "split_word_corpus",
           "train_tokenizer"]

TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)

_HIDDEN, _HEADS, _KV_HEADS, _LAYERS, _MLP = 64, 4, 2, 2, 128
_TEXT = dict(
    hidden_size=_HIDDEN, num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, num_hidden_layers=_LAYERS,
    intermediate_size=_MLP, head_dim=_HIDDEN // _HEADS, max_position_embeddings=4096,
)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)

_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
    "red orange yellow green blue purple pink brown black white gray "
    "circle circles square squares triangle triangles star stars diamond diamonds dog dogs car cars apple apples "
    "the a an is are there in this image picture I see can count describe how many what color of and with on "
    "not no yes it shows which some object objects"
).split()


def tokenizer_corpus(n: int = 3000, seed: int = 0) -> Iterator[str]:
    """Synthetic sentences covering the words, digits and prompt shapes the PIH tasks use."""
    rng = random.Random(seed)
    templates = (
        "How many {w} are in this image?", "Describe the {d} {w} in this image.", "There are {d} {w}.",
        "What color is the {w} in the image?", "Describe the {w} {w}.", "The image shows {w} {w} {w}.",
        "I can see {d} {w} and {w} {w}.", "{W} {w}, {d}.",
    )
    for _ in range(n):
        t = rng.choice(templates)
        w = rng.choice(_WORDS)
        yield t.format(w=w, W=w.capitalize(), d=rng.randint(0, 120)).replace("{w}", rng.choice(_WORDS))


_ANSWER_WORDS = frozenset(_WORDS[: _WORDS.index("gray") + 1])  # the number and colour words


def split_word_corpus() -> list[str]:
    """`tokenizer_corpus()` without the number and colour words, plus their pieces (2 for short words, 3 for
    long ones) as separate words: a tokenizer trained on it spells those words with several tokens."""
    corpus = [" ".join(w for w in line.split() if w.strip(".,?").lower() not in _ANSWER_WORDS)
              for line in tokenizer_corpus()]
    for word in sorted(_ANSWER_WORDS):
        step = -(-len(word) // (2 if len(word) < 7 else 3))
        first, *rest = [word[i:i + step] for i in range(0, len(word), step)]
        corpus += [f"x {first}"] * 20 + rest * 20  # a leading piece after a space, the others word-initially
    return corpus


def train_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, unk: str | None,
                    chat_template: str, extra: dict[str, str] | None = None,
                    corpus: Iterable[str] | None = None, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (default: `tokenizer_corpus()`), special tokens first."""
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus() if corpus is None else corpus, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad, chat_template=chat_template)
    if bos is not None:
        kwargs["bos_token"] = bos
    if unk is not None:
        kwargs["unk_token"] = unk
    if extra:
        kwargs["extra_special_tokens"] = extra
    hf = PreTrainedTokenizerFast(**kwargs)
    hf.padding_side = "left"
    return hf


def _template(system: str, user: str, image: str, end: str, assistant: str, bos: str = "") -> str:
    """A Jinja chat template in the shape of the family's real one (image parts, then text)."""
    return (
        bos + system
        + "{% for m in messages %}{% if m['role'] == 'user' %}" + user
        + "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + end
        + "{% else %}" + assistant + "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}" + end
        + "{% endif %}{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def qwen_chat_template(system: str | None = "You are a helpful assistant.") -> str:
    """A Qwen2-VL-style chat template, with or without a system turn."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return _template(head, "<|im_start|>user\n", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>\n",
                     "<|im_start|>assistant\n")


QWEN_TEMPLATE = qwen_chat_template()


def _qwen_like(name: str, corpus: list[str] | None) -> tuple:
    tok = train_tokenizer(QWEN_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                          chat_template=QWEN_TEMPLATE, corpus=corpus)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(_TEXT, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tok.pad_token_id, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    if name == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=_HIDDEN, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        vision = dict(depth=2, hidden_size=32, num_heads=4, out_hidden_size=_HIDDEN, intermediate_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    image_processor = transformers.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = processor_class(get_family(name))(image_processor=image_processor, tokenizer=tok,
                                                  chat_template=QWEN_TEMPLATE)
    return config, processor, tok.convert_tokens_to_ids("<|im_end|>")


def _llava(corpus: list[str] | None) -> tuple:
    template = _template("", "USER: ", "<image>\n", " ", "ASSISTANT:", bos="")
    tok = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                           unk="<unk>", chat_template=template, corpus=corpus)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**_VISION, image_size=224, patch_size=32),
        text_config=transformers.LlamaConfig(**_TEXT, vocab_size=len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=49,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    processor = transformers.LlavaProcessor(
        transformers.LlavaImageProcessorPil(), tok, patch_size=32, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=template,
    )
    return config, processor, tok.eos_token_id


def _llava_onevision(corpus: list[str] | None) -> tuple:
    template = _template("", "<|im_start|>user ", "<image>\n", "<|im_end|>\n", "<|im_start|>assistant\n")
    tok = train_tokenizer(QWEN_SPECIALS + ["<image>", "<video>"], bos=None, eos="<|im_end|>",
                           pad="<|endoftext|>", unk=None, chat_template=template, corpus=corpus)
    pinpoints = [[224, 224], [224, 448], [448, 224], [448, 448]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**_VISION, image_size=224, patch_size=32,
                                                      vision_use_head=False),
        text_config=transformers.Qwen2Config(**_TEXT, vocab_size=len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": 224, "width": 224}, image_grid_pinpoints=pinpoints)
    processor = processor_class(get_family("llava_onevision"))(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=49, vision_feature_select_strategy="full",
        chat_template=template,
    )
    return config, processor, tok.convert_tokens_to_ids("<|im_end|>")


def _idefics_like(name: str, corpus: list[str] | None) -> tuple:
    specials = ["<|endoftext|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
                "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    template = _template("", "<|im_start|>User:", "<image>", "<end_of_utterance>\n", "Assistant:", bos="")
    tok = train_tokenizer(specials, bos="<|im_start|>", eos="<end_of_utterance>", pad="<|endoftext|>", unk=None,
                           chat_template=template, corpus=corpus)
    vision = dict(_VISION, image_size=224, patch_size=16)
    text = transformers.LlamaConfig(**_TEXT, vocab_size=len(tok))
    image_id = tok.convert_tokens_to_ids("<image>")
    size = {"longest_edge": 224}
    if name == "idefics3":
        config = transformers.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_id,
                                             scale_factor=2)
        image_processor = transformers.Idefics3ImageProcessorPil(size=size, max_image_size=size,
                                                                 do_image_splitting=False)
        processor = transformers.Idefics3Processor(image_processor, tok, image_seq_len=49, chat_template=template)
    else:
        config = transformers.SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                                            scale_factor=2)
        image_processor = transformers.SmolVLMImageProcessorPil(size=size, max_image_size=size,
                                                                do_image_splitting=False)
        processor = processor_class(get_family("smolvlm"))(
            image_processor=image_processor, tokenizer=tok, image_seq_len=49, chat_template=template)
    return config, processor, tok.convert_tokens_to_ids("<end_of_utterance>")


def _janus(corpus: list[str] | None) -> tuple:
    system = ("You are a helpful language and vision assistant. You are able to understand the visual content "
              "that the user provides, and assist the user with a variety of tasks using natural language.\n\n")
    template = _template(system, "<|User|>: ", "<image_placeholder>\n", "\n\n", "<|Assistant|>:", bos="")
    specials = ["<|begin_of_sentence|>", "<|end_of_sentence|>", "<pad>", "<image_placeholder>",
                "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"]
    tok = train_tokenizer(
        specials, bos="<|begin_of_sentence|>", eos="<|end_of_sentence|>", pad="<pad>", unk=None,
        chat_template=template, corpus=corpus,
        extra={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"},
    )
    config = transformers.JanusConfig(
        text_config=transformers.LlamaConfig(**_TEXT, vocab_size=len(tok)),
        vision_config=transformers.JanusVisionConfig(**_VISION, image_size=224, patch_size=32, depth=2,
                                                     projection_dim=_HIDDEN, num_image_tokens=49),
        vq_config=transformers.JanusVQVAEConfig(
            embed_dim=8, num_embeddings=64, base_channels=32, latent_channels=32, channel_multiplier=[1, 1],
            num_res_blocks=1, projection_dim=_HIDDEN, image_token_embed_dim=_HIDDEN, num_patches=7,
            num_hidden_layers=1),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
    )
    image_processor = transformers.JanusImageProcessorPil(size={"height": 224, "width": 224})
    processor = transformers.JanusProcessor(image_processor, tok, num_image_tokens=49, chat_template=template)
    return config, processor, tok.eos_token_id


_BUILDERS: dict[str, Callable[[list[str] | None], tuple]] = {
    "qwen2_vl": lambda corpus: _qwen_like("qwen2_vl", corpus),
    "qwen2_5_vl": lambda corpus: _qwen_like("qwen2_5_vl", corpus),
    "llava": _llava,
    "llava_onevision": _llava_onevision,
    "idefics3": lambda corpus: _idefics_like("idefics3", corpus),
    "smolvlm": lambda corpus: _idefics_like("smolvlm", corpus),
    "janus": _janus,
}


def build_tiny(family: str, out: str | Path, *, seed: int = 0, split_answer_words: bool = False) -> Path:
    """Build a tiny random checkpoint of `family` and save model + processor to `out`; returns `out`.

    `split_answer_words` trains its tokenizer on `split_word_corpus()`, so that most number and colour words take
    2-4 tokens (" seven" -> " sev", "en"), as rarer words do in real tokenizers.
    """
    fam = get_family(family)
    config, processor, eos_id = _BUILDERS[fam.name](split_word_corpus() if split_answer_words else None)
    tok = processor.tokenizer
    for cfg in (config, getattr(config, fam.text_config_field)):
        for name, value in (("bos_token_id", tok.bos_token_id), ("eos_token_id", eos_id),
                            ("pad_token_id", tok.pad_token_id)):
            if not isinstance(getattr(type(cfg), name, None), property):  # deprecated aliases of the text config's
                setattr(cfg, name, value)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, do_sample=False,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_tiny_models(out: str | Path, families: tuple[str, ...] | list[str] = TINY_FAMILIES,
                      *, seed: int = 0, split_answer_words: bool = False) -> dict[str, Path]:
    """Build tiny checkpoints of several families under `out/<family>`; returns family -> directory."""
    return {name: build_tiny(name, Path(out) / name, seed=seed, split_answer_words=split_answer_words)
            for name in families}
