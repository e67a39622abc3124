"""Differences between the transformers releases halluscope supports, read from the code, not from versions.

transformers 5.24 renamed the key/value cache argument of every forward from `past_key_values` to `cache` (and
the output field with it), behind a shim that keeps the new name when both are given. Code that calls decoder
layers or the text model directly must pass the cache under the name the forward declares, or the cache is
silently ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from torch import nn

from halluscope.errors import ModelLoadError

__all__ = ["CACHE_NAMES", "cache_argument", "with_cache", "output_cache"]

#: The names a forward may give its key/value cache argument, newest first.
CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_argument_of(forward: Any) -> str:
    parameters = inspect.signature(forward).parameters  # follows functools.wraps of deprecation decorators
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise ModelLoadError(f"{getattr(forward, '__qualname__', forward)} takes no key/value cache argument (looked for "
                         f"{' or '.join(CACHE_NAMES)}); this transformers release is not supported, install the "
                         f"tested stack with `bash scripts/setup.sh`")


def cache_argument(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes its key/value cache ("cache" or "past_key_values")."""
    return _cache_argument_of(type(module).forward)


def with_cache(module: nn.Module, kwargs: dict[str, Any], cache: Any) -> dict[str, Any]:
    """A copy of `kwargs` for `module` with its cache argument set to `cache` and every other cache name dropped
    (kwargs captured from a model's own call already hold a cache under one of the names)."""
    name = cache_argument(module)
    out = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}
    out[name] = cache
    return out


def output_cache(output: Any) -> Any:
    """The key/value cache of a model output, under whichever field name its class declares."""
    names = {f.name for f in dataclasses.fields(output)}
    for name in CACHE_NAMES:
        if name in names:
            return output[name] if name in output else None
    raise ModelLoadError(f"{type(output).__name__} has no cache field (looked for {' or '.join(CACHE_NAMES)}); "
                         f"install the tested stack with `bash scripts/setup.sh`")
