"""`load_vlm`: one entry point for every supported checkpoint, by hub id or local directory.

The family comes from the checkpoint's `config.model_type` via the family table; the model is the real
transformers class and the processor is built without torchvision (see `processors`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from halluscope.errors import ModelLoadError
from halluscope.models.families import family_for_model_type
from halluscope.models.processors import load_processor
from halluscope.models.vlm import VLM

__all__ = ["TESTED_TRANSFORMERS", "check_device", "load_vlm", "warn_if_untested_transformers"]

#: The transformers releases halluscope's tests pass on (a pip version specifier); others may work but are untested.
TESTED_TRANSFORMERS = ">=5.23,<5.25"
_warned_transformers: set[str] = set()  # the versions already warned about, so each warns once per process

_ATTN = ("sdpa", "eager")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve(name_or_path: str | os.PathLike) -> str:
    """A built-in organism's name, a local directory, or a hub id (returned unchanged)."""
    name = os.fspath(name_or_path)
    if name in _organism_names():
        from halluscope.organism import organism_path

        return str(organism_path(name))
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


def _organism_names() -> tuple[str, ...]:
    """The names of the built-in organisms ("organism", "organism-scenes"); the import is deferred to the call."""
    from halluscope.organism import MODEL_NAMES

    return MODEL_NAMES


def warn_if_untested_transformers() -> bool:
    """Warn once per process when the installed transformers is outside `TESTED_TRANSFORMERS`.

    Returns True if the installed version is outside the tested range (whether or not it warned this time).
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    import transformers as current  # sys.modules' entry: transformers' lazy module can replace itself there

    installed = current.__version__
    try:
        tested = SpecifierSet(TESTED_TRANSFORMERS).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        tested = False
    if tested:
        return False
    if installed not in _warned_transformers:
        _warned_transformers.add(installed)
        warnings.warn(f"transformers {installed} is installed, but halluscope is tested with transformers"
                      f"{TESTED_TRANSFORMERS}; model classes, caches and hooks may behave differently. Install a "
                      f"tested release with `pip install \"transformers{TESTED_TRANSFORMERS}\"`, or the whole "
                      f"tested stack with `pip install -c constraints.txt -e .` or `bash scripts/setup.sh`",
                      UserWarning, stacklevel=3)
    return True


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has, or a one-line ModelLoadError naming the fix.

    Example: check_device("cuda:3") on a machine with one GPU raises "... has 1 CUDA device (cuda:0) ...".
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' (N a GPU index) or 'mps'"
                             ) from None
    if parsed.type == "cuda":
        _check_cuda(device, parsed)
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} is not available: this machine or torch build has no Apple "
                             f"MPS support; pass device='cpu'")
    elif parsed.type != "cpu":
        backend = getattr(torch, parsed.type, None)
        if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
            raise ModelLoadError(f"device {device!r} is not available on this machine; pass device='cpu'")
    return parsed


def _check_cuda(device: str | torch.device, parsed: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} is not available: torch {torch.__version__} sees no CUDA GPU "
                             f"(none present, or a CPU-only build); pass device='cpu' or install a CUDA build")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        names = ", ".join(f"cuda:{i}" for i in range(count))
        raise ModelLoadError(f"device {device!r} does not exist: this machine has {count} CUDA device"
                             f"{'s' if count != 1 else ''} ({names}); pass one of those")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_vlm(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
             device: str | torch.device = "cpu", attn: str = "sdpa") -> VLM:
    """Load a supported VLM from a hub id, a local directory, or a built-in organism: "organism" (prompt-induced
    hallucination) or "organism-scenes" (object hallucination).

    Args:
        name_or_path: hub id (e.g. "Qwen/Qwen2-VL-7B-Instruct"), a `save_pretrained` directory, "organism" or
            "organism-scenes".
        dtype: "float32", "bfloat16", "float16", a torch dtype, or None for the checkpoint's own dtype.
        device: torch device the model is moved to ("cpu", "cuda", "cuda:1", "mps"); checked before loading.
        attn: attention implementation, "sdpa" or "eager".

    Raises:
        ModelLoadError: unknown family, missing directory, an unreachable hub (pass a local directory), or a
            device this machine does not have.

    Warns once if the installed transformers is outside `TESTED_TRANSFORMERS`.

    Example:
        >>> vlm = load_vlm("Qwen/Qwen2-VL-7B-Instruct", dtype="bfloat16", device="cuda")
    """
    if attn not in _ATTN:
        raise ModelLoadError(f"unknown attention implementation {attn!r}; use one of {', '.join(_ATTN)}")
    target = check_device(device)
    warn_if_untested_transformers()
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
    model.to(target).eval()
    name = os.fspath(name_or_path)
    if name not in _organism_names() and Path(name).expanduser().is_dir():  # recorded in manifests: make it absolute
        name = str(Path(name).expanduser().resolve())
    return VLM(model, processor, family, name=name)
