"""The public entry points: `mitigate` (a context in which `vlm.generate` decodes under a method) and `decode`
(one call from pairs or a batch to replies)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

from halluscope.decoding.branches import SourcedBatch
from halluscope.decoding.loop import Sampler, decode_ids
from halluscope.decoding.methods.base import DecodingMethod
from halluscope.decoding.registry import get_method
from halluscope.errors import InputError
from halluscope.models.vlm import Batch

__all__ = ["build_method", "decode", "method_from_options", "mitigate", "place_beams"]


def build_method(method: str | DecodingMethod, **config: Any) -> DecodingMethod:
    """A configured method from its registered name (or alias) and settings, or `method` itself if built.

    Raises:
        InputError: an unknown name (did-you-mean), an unknown setting, or a value out of its range.
    """
    if isinstance(method, DecodingMethod):
        if config:
            raise InputError(f"method {method.name!r} is already configured; pass settings to its class, not here")
        return method
    return get_method(method)(**config)


def method_from_options(name: str | None, config: str | Mapping[str, Any] | None = None) -> DecodingMethod | None:
    """The method of a command's `--method NAME [--method-config JSON]`; None for plain greedy without settings
    (so runs made before methods existed keep their identity).

    Raises:
        InputError: settings without a method, JSON that is not an object, or what `build_method` refuses.

    Example:
        >>> method_from_options("vcd", '{"alpha": 0.5}').record()["config"]["alpha"]
        0.5
    """
    settings: Mapping[str, Any]
    if isinstance(config, str):
        try:
            settings = json.loads(config)
        except ValueError as exc:
            raise InputError(f"--method-config {config!r} is not valid JSON ({exc}); pass an object such as "
                             f"'{{\"alpha\": 1.0}}'") from None
    else:
        settings = config or {}
    if not isinstance(settings, Mapping):
        raise InputError(f"--method-config {config!r} is a {type(settings).__name__}; pass a JSON object such as "
                         f"'{{\"alpha\": 1.0}}'")
    if name is None:
        if settings:
            raise InputError("--method-config needs --method; name the method its settings belong to, e.g. "
                             "--method vcd")
        return None
    method = build_method(name, **settings)
    return None if method.name == "greedy" else method


def place_beams(method: DecodingMethod, sampler: Sampler | None,
                num_beams: int | None) -> tuple[DecodingMethod, Sampler]:
    """`num_beams` where it belongs: the setting of a method that runs its own beam search (OPERA), else the
    sampler's; None leaves both as they are.

    Example:
        >>> place_beams(build_method("vcd"), None, 3)[1].num_beams
        3
    """
    sampler = sampler or Sampler()
    if num_beams is None:
        return method, sampler
    if method.num_beams is None:
        return method, dataclasses.replace(sampler, num_beams=num_beams)
    return type(method)(**{**method.config.record(), "num_beams": num_beams}), sampler


@contextmanager
def mitigate(vlm, method: str | DecodingMethod, *, sampler: Sampler | None = None,
             **config: Any) -> Iterator[DecodingMethod]:
    """Inside the block, `vlm.generate` / `vlm.generate_ids` decode under `method`, and `vlm.encode` keeps each
    batch's (image, prompt) pairs for methods whose second input changes them. Restored on exit, also on errors.

    Example:
        >>> with halluscope.mitigate(vlm, "vcd", alpha=1.0):
        ...     replies = vlm.generate(vlm.encode([("dogs.jpg", "Describe the image.")]))
    """
    chosen = build_method(method, **config)
    saved = {name: vlm.__dict__[name] for name in ("encode", "generate_ids") if name in vlm.__dict__}
    encode = vlm.encode

    def encode_with_pairs(pairs: Sequence[tuple[Any, str]]) -> SourcedBatch:
        batch = encode(pairs)
        return SourcedBatch(batch.inputs, batch.image_mask, batch.image_spans, pairs=list(pairs))

    def generate_ids(batch: Batch, max_new_tokens: int = 50):
        return decode_ids(vlm, batch, chosen, max_new_tokens=max_new_tokens, sampler=sampler)

    vlm.encode, vlm.generate_ids = encode_with_pairs, generate_ids
    try:
        yield chosen
    finally:
        for name in ("encode", "generate_ids"):
            if name in saved:
                setattr(vlm, name, saved[name])
            else:
                vars(vlm).pop(name, None)


def decode(vlm, batch: Batch | Sequence[tuple[Any, str]], method: str | DecodingMethod = "greedy", *,
           max_new_tokens: int = 50, sampler: Sampler | None = None, num_beams: int | None = None,
           **config: Any) -> list[str]:
    """Replies to a batch or to (image, prompt) pairs under `method` (configured by `config`); `num_beams` runs
    beam search (for OPERA it is the method's own setting, see `place_beams`).

    Example:
        >>> halluscope.decode(vlm, [("dogs.jpg", "How many dogs?")], method="m3id", lam=0.02)
        >>> halluscope.decode(vlm, [("dogs.jpg", "Describe the image.")], num_beams=5)
    """
    chosen, sampler = place_beams(build_method(method, **config), sampler, num_beams)
    if not isinstance(batch, Batch):
        pairs = list(batch)
        encoded = vlm.encode(pairs)
        batch = SourcedBatch(encoded.inputs, encoded.image_mask, encoded.image_spans, pairs=pairs)
    return vlm.decode(decode_ids(vlm, batch, chosen, max_new_tokens=max_new_tokens, sampler=sampler))
