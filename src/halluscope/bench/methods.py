"""The methods a benchmark compares, by name: every method registered with `halluscope.decoding` (plain greedy is
always the baseline), with optional settings. Every method decodes greedily in the one decoding loop with the
same settings, so differences between rows of a comparison table are the method's.

    greedy                      plain greedy decoding (the baseline; always compared)
    vcd                         a registered method at its paper's defaults
    vcd:{"alpha": 0.5}          with settings (a JSON object; unnamed settings keep their defaults)
    heads:L0H1,L1H2             head ablation of these heads (zeroed at their `o_proj` input)
    heads:best3@runs/count      head ablation of a run's ranked head set (`halluscope rank` wrote it)

A method's canonical name, the `method` column of the table, is its registered name followed by the settings
that differ from the defaults: `vcd`, `vcd:{"alpha":0.5}`, `heads:L0H1,L1H2`, `heads:{"alpha":0.5,"heads":"L0H1"}`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from halluscope.errors import InputError

if TYPE_CHECKING:
    from halluscope.decoding.methods.base import DecodingMethod

__all__ = ["Method", "parse_method", "parse_methods"]

#: Method -> the setting a plain (non-JSON) argument after "name:" gives.
_ARGUMENT_SETTING = {"heads": "heads"}


@dataclass(frozen=True)
class Method:
    """A parsed method.

    Args:
        name: its canonical name, the `method` column of the comparison table ("greedy", "heads:L0H1,L1H2").
        spec: what was asked for ("heads:best3@runs/count").
        decoder: the configured decoding method (`DecodingMethod()` for plain greedy).
        heads: the (layer, head) pairs a head ablation edits; empty for every other method.
    """

    name: str
    spec: str
    decoder: DecodingMethod
    heads: frozenset[tuple[int, int]] = frozenset()

    @property
    def slug(self) -> str:
        """A name for the method's run step and shards: "greedy", "vcd", "ablation_L0H1-L1H2", or the method and
        a hash of its settings ("vcd_1f0e3dad")."""
        from halluscope.steps import ablation_name

        kind, _, argument = self.name.partition(":")
        if not argument:
            return kind
        if self.heads and not argument.startswith("{"):
            return ablation_name(argument)
        return f"{kind}_{hashlib.sha256(argument.encode()).hexdigest()[:8]}"

    def record(self) -> dict[str, Any]:
        """The method's identity in a run: its name, the decoding method and every setting, defaults included
        (not the spec, so `heads:best3@RUN` and the heads it names are one method)."""
        return {"method": self.name, "decoder": self.decoder.name, "config": self.decoder.config.record(),
                "strategy": self.decoder.strategy}


def _defaults(cls: type[DecodingMethod]) -> dict[str, Any]:
    """Every setting of the method at its default."""
    return cls.Config().record()


def _settings(cls: type[DecodingMethod], spec: str, argument: str) -> dict[str, Any]:
    """The settings the text after "name:" gives: a JSON object, or the value of the method's one argument."""
    if not argument:
        return {}
    if argument.startswith("{"):
        try:
            return json.loads(argument)  # text starting with "{" that parses is an object
        except ValueError as exc:
            raise InputError(f"method {spec!r}: the settings are not valid JSON ({exc}); write e.g. "
                             f"{cls.name}:{_example(cls)}") from None
    if cls.name in _ARGUMENT_SETTING:
        return {_ARGUMENT_SETTING[cls.name]: argument}
    if not _defaults(cls):
        raise InputError(f"method {spec!r}: {cls.name} takes no argument; write {cls.name}")
    raise InputError(f"method {spec!r}: the text after ':' is not a JSON object of settings; write e.g. "
                     f"{cls.name}:{_example(cls)}")


def _example(cls: type[DecodingMethod]) -> str:
    """A settings object naming the method's first setting with a default, e.g. '{"alpha": 1.0}'."""
    return next((json.dumps({k: v}) for k, v in _defaults(cls).items() if v not in ("", None)), "{}")


def _as_declared(cls: type[DecodingMethod], settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with whole numbers given for float settings made floats, so `{"alpha": 0}` and `{"alpha": 0.0}`
    name one method."""
    floats = {k for k, v in _defaults(cls).items() if isinstance(v, float)}
    return {k: float(v) if k in floats and type(v) is int else v for k, v in settings.items()}


def _head_set(argument: Any, n_layers: int, n_heads: int) -> frozenset[tuple[int, int]]:
    """The heads of "L0H1,L1H2" or "best3@RUN" (a run's ranked set)."""
    from halluscope.analysis.ranking import resolve_head_set
    from halluscope.runs import Run

    if not isinstance(argument, str) or not argument.strip():
        raise InputError("method 'heads' needs heads; write heads:L0H1,L1H2 or heads:best3@RUN (a ranked run)")
    heads_spec, _, run_dir = argument.strip().partition("@")
    report = Run.open(run_dir).read_json("heads", hint="rank") if run_dir else None
    if report is None and heads_spec.strip().lower().startswith(("best", "top")):
        raise InputError(f"head set {heads_spec!r} needs the run that ranked it; write heads:{heads_spec}@RUN, "
                         f"e.g. heads:{heads_spec}@runs/count, or name heads: heads:L0H1,L1H2")
    return resolve_head_set(heads_spec, report, n_layers, n_heads)


def parse_method(spec: str, n_layers: int, n_heads: int) -> Method:
    """The method `spec` names, for a model of `n_layers` x `n_heads`.

    Raises:
        InputError: an unknown method (with a "did you mean" and the registered names), malformed settings, an
            unknown setting or a value out of range, heads outside the model, or a run without a ranking.

    Example:
        >>> parse_method("heads:L1H2,L0H1", n_layers=4, n_heads=8).name
        'heads:L0H1,L1H2'
        >>> parse_method('vcd:{"alpha": 0, "beta": 0.1}', n_layers=4, n_heads=8).name
        'vcd:{"alpha":0.0}'
    """
    from halluscope.decoding.registry import get_method
    from halluscope.interventions.heads import format_heads

    kind, _, argument = spec.strip().partition(":")
    cls = get_method(kind)
    settings = _as_declared(cls, _settings(cls, spec, argument.strip()))
    heads: frozenset[tuple[int, int]] = frozenset()
    if cls.name == "heads":
        heads = _head_set(settings.get("heads"), n_layers, n_heads)
        settings["heads"] = format_heads(heads)
    decoder = cls(**settings)
    defaults = _defaults(cls)
    changed = {k: v for k, v in decoder.config.record().items() if v != defaults[k]}
    if not changed:
        name = cls.name
    elif list(changed) == [_ARGUMENT_SETTING.get(cls.name)]:
        name = f"{cls.name}:{changed[_ARGUMENT_SETTING[cls.name]]}"
    else:
        name = f"{cls.name}:{json.dumps(changed, sort_keys=True, separators=(',', ':'))}"
    return Method(name, spec.strip(), decoder, heads)


def parse_methods(specs: list[str] | tuple[str, ...], n_layers: int, n_heads: int) -> list[Method]:
    """Plain greedy first, then each method of `specs` once (by canonical name), in the order given.

    Example:
        >>> [m.name for m in parse_methods(["heads:L0H1", "greedy", "heads:l0h1", "vcd:{}"], 4, 8)]
        ['greedy', 'heads:L0H1', 'vcd']
    """
    methods = {"greedy": parse_method("greedy", n_layers, n_heads)}
    for spec in specs:
        method = parse_method(spec, n_layers, n_heads)
        methods.setdefault(method.name, method)
    return list(methods.values())
