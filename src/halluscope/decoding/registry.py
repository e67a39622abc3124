"""The decoding-method registry: names and aliases mapped to lazily imported ``"module:Class"`` targets.

`get_method("vcd")` imports the class on first use and checks that it is a `DecodingMethod`; an unknown name
gets a did-you-mean error listing what is available; registering a taken name is an error unless replaced on
purpose. Third-party methods join with `register_method`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from halluscope.errors import InputError

__all__ = ["MethodSpec", "available_methods", "get_method", "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its canonical `name`, ``"module:Class"`` target, aliases and one-line summary."""

    name: str
    target: str
    aliases: tuple[str, ...] = ()
    summary: str = ""


_SPECS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add `spec` under its name and aliases.

    Raises:
        InputError: the target is not "module:Class", or a name is taken and `replace` is false.
    """
    if ":" not in spec.target:
        raise InputError(f"method target {spec.target!r} is not of the form 'module:Class'")
    for key in (spec.name, *spec.aliases):
        owner = _ALIASES.get(key.lower())
        if owner is not None and owner != spec.name and not replace:
            raise InputError(f"method name {key!r} is already registered by {owner!r}; pass replace=True to override")
        if owner == spec.name and key == spec.name and not replace:
            raise InputError(f"method {key!r} is already registered; pass replace=True to override")
    _SPECS[spec.name] = spec
    for key in (spec.name, *spec.aliases):
        _ALIASES[key.lower()] = spec.name
    return spec


def available_methods() -> list[str]:
    """The canonical names of every registered method, sorted."""
    return sorted(_SPECS)


def get_method(name: str) -> type:
    """The method class registered under `name` (or an alias), imported on first use.

    Raises:
        InputError: an unknown name (with a "did you mean" and the available names), or a target that is not a
            `DecodingMethod` subclass.

    Example:
        >>> get_method("VCD")(alpha=1.0).config.alpha
        1.0
    """
    from halluscope.decoding.methods.base import DecodingMethod

    key = str(name).strip().lower()
    if key not in _ALIASES:
        close = difflib.get_close_matches(key, list(_ALIASES), n=1)
        hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
        raise InputError(f"unknown decoding method {name!r}.{hint} Available: {', '.join(available_methods())}")
    spec = _SPECS[_ALIASES[key]]
    module, _, attr = spec.target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, DecodingMethod)):
        raise InputError(f"method {spec.name!r} points at {spec.target}, which is not a DecodingMethod subclass")
    return cls


_M = "halluscope.decoding.methods"
for _spec in (
    MethodSpec("greedy", f"{_M}.base:DecodingMethod", ("plain",), "plain decoding, no mitigation"),
    MethodSpec("heads", f"{_M}.heads:HeadAblation", ("head-ablation", "pih"), "heads knocked out at o_proj"),
    MethodSpec("vcd", f"{_M}.vcd:VCD", (), "visual contrastive decoding against a diffusion-noised image"),
    MethodSpec("m3id", f"{_M}.m3id:M3ID", (), "mutual-information decoding against the no-image branch"),
    MethodSpec("ritual", f"{_M}.ritual:RITUAL", (), "logits of a randomly transformed image added"),
    MethodSpec("icd", f"{_M}.icd:ICD", (), "instruction contrastive decoding against a disturbance prefix"),
    MethodSpec("pai", f"{_M}.pai:PAI", (), "image attention boosted, guided against the no-image branch"),
    MethodSpec("dola", f"{_M}.dola:DoLa", (), "final layer contrasted with the most different early layer"),
    MethodSpec("vaf", f"{_M}.vaf:VAF", ("clearsight",), "middle-layer attention to image tokens scaled up"),
    MethodSpec("vhr", f"{_M}.vhr:VHR", (), "heads most changed by removing the image amplified at o_proj"),
    MethodSpec("vista", f"{_M}.vista:VISTA", (), "visual steering vector in every layer, late-layer logits mixed in"),
    MethodSpec("deco", f"{_M}.deco:DeCo", (), "final-layer candidates rescored with the surest preceding layer"),
    MethodSpec("opera", f"{_M}.opera:OPERA", (), "beam search with an over-trust penalty and rollbacks"),
):
    register_method(_spec)
