"""Training-free hallucination mitigation while decoding: one cached loop (`loop`), second inputs as extra batch
rows (`branches`), methods by name (`registry`, `methods/`), and the entry points `mitigate` and `decode`."""

from __future__ import annotations

from halluscope.decoding.api import build_method, decode, method_from_options, mitigate
from halluscope.decoding.loop import Sampler, decode_ids
from halluscope.decoding.registry import MethodSpec, available_methods, get_method, register_method

__all__ = ["MethodSpec", "Sampler", "available_methods", "build_method", "decode", "decode_ids", "get_method",
           "method_from_options", "mitigate", "register_method"]
