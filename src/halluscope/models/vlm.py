"""`VLM`: one handle over any supported HF vision-language model.

It turns (image, prompt) pairs into left-padded batches that know where each row's image tokens are, runs
forwards and greedy generation, and gives named access to the modules interventions hook into.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from num2words import num2words
from PIL import Image
from torch import nn
from transformers import GenerationConfig

from halluscope.errors import InputError, ModelLoadError
from halluscope.images import ImageLike, open_image
from halluscope.models.families import Family
from halluscope.models.fingerprint import SCHEME as FINGERPRINT_SCHEME
from halluscope.models.fingerprint import fingerprint

__all__ = ["Batch", "VLM"]


@dataclass
class Batch:
    """A left-padded model input: the processor's tensors plus each row's image-token positions.

    `image_mask` is [batch, seq] (True on the model's image tokens); `image_spans[row]` lists the
    half-open [start, end) runs of those positions.
    """

    inputs: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    image_spans: list[list[tuple[int, int]]] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def _spans(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """Half-open runs of True in a 1-D bool tensor."""
    padded = torch.cat([mask_row.new_zeros(1), mask_row.to(torch.int8), mask_row.new_zeros(1)])
    edges = torch.diff(padded.to(torch.int8)).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2]))


class VLM:
    """A loaded VLM: model, processor and its family entry. Build it with `halluscope.load_vlm`."""

    def __init__(self, model: nn.Module, processor: Any, family: Family, name: str = "") -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.name = name
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        text = getattr(model.config, family.text_config_field)
        self.text_config = text
        self.n_layers: int = text.num_hidden_layers
        self.n_heads: int = text.num_attention_heads
        self.n_kv_heads: int = getattr(text, "num_key_value_heads", None) or self.n_heads
        self.head_dim: int = getattr(text, "head_dim", None) or text.hidden_size // self.n_heads
        self.image_token_id: int = getattr(model.config, family.image_token_field)
        self._fingerprint: str | None = None
        self.chat_template: str = processor.chat_template or self.tokenizer.chat_template
        if not self.chat_template:
            raise ModelLoadError(f"{name or type(model).__name__} has no chat template (neither its processor nor "
                                 f"its tokenizer defines one); save the instruct checkpoint's chat_template.jinja "
                                 f"or processor chat template with it")

    def __repr__(self) -> str:
        return (f"VLM({self.name!r}, family={self.family.name}, layers={self.n_layers}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, head_dim={self.head_dim})")

    def describe(self) -> dict[str, Any]:
        """What a run manifest records about the model: name, family, class, sizes and a weight fingerprint."""
        return {
            "name": self.name, "family": self.family.name, "class": type(self.model).__name__,
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "dtype": str(self.dtype).removeprefix("torch."),
            "fingerprint": self.fingerprint(), "fingerprint_scheme": FINGERPRINT_SCHEME,
        }

    def fingerprint(self) -> str:
        """A short hash of the weights and the config fields that change the computation (see
        `models.fingerprint`), computed once per loaded model."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model)
        return self._fingerprint

    # ---- modules -------------------------------------------------------------------------------------
    def _get(self, path: str) -> nn.Module:
        return operator.attrgetter(path)(self.model)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def layers(self) -> nn.ModuleList:
        """The language model's decoder layers."""
        return self._get(self.family.layers)

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer `layer`."""
        return self.layers[layer].self_attn

    def o_proj(self, layer: int) -> nn.Linear:
        """The output projection of layer `layer`; its input is [batch, seq, n_heads * head_dim], head-major."""
        return self.layers[layer].self_attn.o_proj

    @property
    def text_model(self) -> nn.Module:
        """The language model's decoder stack (embeddings, layers, final norm; no `lm_head`)."""
        return self._get(self.family.layers.rsplit(".", 1)[0])

    @property
    def norm(self) -> nn.Module:
        """The final norm applied before `lm_head`."""
        return self._get(self.family.norm)

    @property
    def lm_head(self) -> nn.Linear:
        return self._get(self.family.lm_head)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._get(self.family.embed_tokens)

    @property
    def vision_tower(self) -> nn.Module:
        return self._get(self.family.vision)

    # ---- inputs --------------------------------------------------------------------------------------
    def render(self, prompt: str) -> str:
        """The chat-formatted text of a one-image user turn plus the assistant prefix."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def prepared_image(self, image: ImageLike) -> Image.Image:
        """The image as `encode` hands it to the processor: decoded, and upscaled if below the family's minimum."""
        img = open_image(image)
        side = self.family.min_image_side
        if min(img.size) < side:  # e.g. an 8x8 icon: upscale so the processor accepts it
            scale = side / min(img.size)
            img = img.resize((max(side, round(img.width * scale)), max(side, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
        return img

    def encode(self, pairs: Sequence[tuple[ImageLike, str]]) -> Batch:
        """Turn (image, prompt) pairs into one left-padded batch on the model's device.

        Raises:
            InputError: an empty list, a pair without an image or prompt, an image that cannot be read, or a
                prompt longer (with its image tokens and chat template) than the model's maximum positions.
        """
        if len(pairs) == 0:
            raise InputError("encode() got an empty list; pass at least one (image, prompt) pair")
        images, texts = [], []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InputError(f"pair {i} is {type(pair).__name__}, not an (image, prompt) tuple; "
                                 f"pass [(image, 'prompt'), ...]")
            image, prompt = pair
            if image is None:
                raise InputError(f"pair {i} has a prompt but no image; every prompt needs an image "
                                 f"(path, bytes or PIL.Image)")
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"pair {i} has an empty or non-text prompt {prompt!r}; pass a non-empty string")
            images.append(self.prepared_image(image))
            texts.append(self.render(prompt))
        inputs = self.processor(text=texts, images=[[img] for img in images], padding=True, return_tensors="pt")
        inputs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else None) for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        self._check_length(inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])))
        image_mask = inputs["input_ids"] == self.image_token_id
        return Batch(inputs, image_mask, [_spans(row) for row in image_mask])

    def _check_length(self, attention_mask: torch.Tensor) -> None:
        """Refuse rows with more tokens than the language model has positions (`max_position_embeddings`)."""
        limit = getattr(self.text_config, "max_position_embeddings", None)
        if not limit:
            return
        lengths = attention_mask.sum(dim=1).tolist()
        too_long = [(i, n) for i, n in enumerate(lengths) if n > limit]
        if too_long:
            row, length = too_long[0]
            raise InputError(f"pair {row} encodes to {length} tokens (image, prompt and chat template), more than "
                             f"this model's {limit} positions (max_position_embeddings); shorten the prompt or "
                             f"use a smaller image")

    # ---- running -------------------------------------------------------------------------------------
    def forward(self, batch: Batch, **kwargs: Any) -> Any:
        """One forward pass over the batch; kwargs go to the HF model (e.g. `output_hidden_states=True`)."""
        return self.model(**batch.inputs, **kwargs)

    def greedy_config(self, max_new_tokens: int) -> GenerationConfig:
        """Plain greedy decoding: the hub's sampling settings and repetition penalties are not applied."""
        own = self.model.generation_config
        return GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=own.eos_token_id,
            pad_token_id=own.pad_token_id if own.pad_token_id is not None else self.tokenizer.pad_token_id,
            bos_token_id=own.bos_token_id,
        )

    @functools.cached_property
    def end_token_ids(self) -> frozenset[int]:
        """Tokens that end a generated reply: EOS, and the pad token generate() writes after a row has ended."""
        config = self.greedy_config(1)
        eos = config.eos_token_id
        ends = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        return frozenset([*ends, config.pad_token_id])

    @torch.inference_mode()
    def generate_ids(self, batch: Batch, max_new_tokens: int = 50) -> torch.Tensor:
        """Greedy continuation token ids, [batch, new_tokens] (rows that stopped early are padded)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        out = self.model.generate(**batch.inputs, generation_config=self.greedy_config(max_new_tokens))
        return out[:, batch.seq_len:]

    def reply_ids(self, ids: torch.Tensor) -> list[list[int]]:
        """Each row of generated ids through its first end token (the pads after it dropped)."""
        rows = []
        for row in ids.tolist():
            end = next((i for i, token in enumerate(row) if token in self.end_token_ids), len(row) - 1)
            rows.append(row[:end + 1])
        return rows

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The reply text of each row of generated ids: its tokens before its first end token (EOS, or the pad
        token generate writes once a row has ended), the tokens `reply_ids` keeps, special tokens removed."""
        rows = [row[:-1] if row and row[-1] in self.end_token_ids else row for row in self.reply_ids(ids)]
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def generate(self, batch: Batch, max_new_tokens: int = 50) -> list[str]:
        """Greedy replies (the assistant's text only), one per row."""
        return self.decode(self.generate_ids(batch, max_new_tokens))

    # ---- vocabulary ----------------------------------------------------------------------------------
    def reply_token_ids(self, text: str) -> list[int]:
        """The token ids of `text` as the model would emit it as the first words of its reply."""
        prefix = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "?"}]}], chat_template=self.chat_template,
            tokenize=False, add_generation_prompt=True,
        )
        head = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(prefix + self.family.reply_separator + text, add_special_tokens=False)["input_ids"]
        if full[: len(head)] == head:
            return full[len(head):]
        return self.tokenizer(self.family.reply_separator + text, add_special_tokens=False)["input_ids"]

    def answer_token_ids(self, value: int | str) -> dict[str, list[int]]:
        """Token ids of an answer as the reply's first word: {"digit", "word"} forms for a number, {"word"} else."""
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InputError(f"answer must be an int or a word, got {value!r}")
        if isinstance(value, int):
            return {"digit": self.reply_token_ids(str(value)), "word": self.reply_token_ids(num2words(value))}
        return {"word": self.reply_token_ids(value)}
