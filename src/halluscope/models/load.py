"""`load_vlm`: one entry point for every supported checkpoint, by hub id or local directory.

The family comes from the checkpoint's `config.model_type` via the family table; the model is the real
transformers class and the processor is built without torchvision (see `processors`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from halluscope.errors import ModelLoadError
from halluscope.models.families import family_for_model_type
from halluscope.models.processors import load_processor
from halluscope.models.vlm import VLM

__all__ = ["load_vlm"]

_ATTN = ("sdpa", "eager")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve(name_or_path: str | os.PathLike) -> str:
    """The organism alias, a local directory, or a hub id (returned unchanged)."""
    name = os.fspath(name_or_path)
    if name == "organism":
        from halluscope.organism import organism_path  # imported lazily: only this alias needs it

        return str(organism_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name!r} has no config.json; pass a directory written by save_pretrained "
                                 f"(e.g. from `halluscope tiny-models DIR`) or a hub id")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model directory not found: {name!r}; pass an existing local directory or a hub id "
                             f"such as 'Qwen/Qwen2-VL-7B-Instruct'")
    return name


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_vlm(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
             attn: str = "sdpa") -> VLM:
    """Load a supported VLM from a hub id, a local directory, or "organism" (the built-in PIH model).

    Args:
        name_or_path: hub id (e.g. "Qwen/Qwen2-VL-7B-Instruct"), a `save_pretrained` directory, or "organism".
        dtype: "float32", "bfloat16", "float16", a torch dtype, or None for the checkpoint's own dtype.
        device: torch device the model is moved to.
        attn: attention implementation, "sdpa" or "eager".

    Raises:
        ModelLoadError: unknown family, missing directory, or an unreachable hub (pass a local directory).

    Example:
        >>> vlm = load_vlm("Qwen/Qwen2-VL-7B-Instruct", dtype="bfloat16", device="cuda")
    """
    if attn not in _ATTN:
        raise ModelLoadError(f"unknown attention implementation {attn!r}; use one of {', '.join(_ATTN)}")
    source = _resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the config of {source!r} (the hub is unreachable or the id is wrong: "
            f"{str(exc).splitlines()[0][:160]}); download the checkpoint elsewhere and pass its local directory"
        ) from None
    family = family_for_model_type(config.model_type)
    model_cls = getattr(transformers, family.model_class)
    try:
        model = model_cls.from_pretrained(source, dtype=_dtype(dtype), attn_implementation=attn)
        processor = load_processor(family, source)
    except OSError as exc:
        raise ModelLoadError(f"cannot load weights or processor of {source!r}: {str(exc).splitlines()[0][:160]}; "
                             f"pass a complete local checkpoint directory") from None
    model.to(device).eval()
    name = os.fspath(name_or_path)
    if name != "organism" and Path(name).expanduser().is_dir():  # recorded in run manifests: make it absolute
        name = str(Path(name).expanduser().resolve())
    return VLM(model, processor, family, name=name)
