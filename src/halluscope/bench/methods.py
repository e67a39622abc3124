"""The methods a benchmark compares, by name: the model under plain greedy decoding, and the model with a
mitigation applied. Every method decodes greedily with the same settings; a method changes what the model
computes, not the decoder, so differences between rows of a comparison table are the method's.

    greedy                  plain greedy decoding (the baseline; always compared)
    heads:L0H1,L1H2         greedy with these attention heads knocked out (zero ablation at `o_proj`)
    heads:best3@runs/count  greedy with a ranked head set of a run (`halluscope rank` wrote it)

Method kinds register in `METHOD_KINDS` by name; decoding-time mitigations will register there.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from halluscope.errors import InputError

__all__ = ["Method", "METHOD_KINDS", "parse_method", "parse_methods"]


@dataclass(frozen=True)
class Method:
    """A parsed method.

    Args:
        name: its canonical name, the `method` column of the comparison table ("greedy", "heads:L0H1,L1H2").
        spec: what was asked for ("heads:best3@runs/count").
        heads: the (layer, head) pairs knocked out; empty for plain greedy.
    """

    name: str
    spec: str
    heads: frozenset[tuple[int, int]] = frozenset()

    @property
    def intervention(self):
        """The `HeadIntervention` this method applies, or None for plain greedy."""
        if not self.heads:
            return None
        from halluscope.interventions.heads import HeadIntervention

        return HeadIntervention(self.heads)

    @property
    def slug(self) -> str:
        """A name for the method's run step and shards: "greedy", "ablation_L0H1-L1H2"."""
        from halluscope.steps import ablation_name

        return ablation_name(self.name.partition(":")[2]) if self.heads else self.name

    def record(self) -> dict[str, Any]:
        """What a run manifest says about the method."""
        return {"method": self.name, "spec": self.spec, "intervention": "zero ablation at o_proj" if self.heads
                else None}


def _greedy(argument: str, n_layers: int, n_heads: int) -> Method:
    if argument:
        raise InputError(f"method 'greedy:{argument}' takes no argument; write greedy")
    return Method("greedy", "greedy")


def _heads(argument: str, n_layers: int, n_heads: int) -> Method:
    from halluscope.analysis.ranking import resolve_head_set
    from halluscope.interventions.heads import format_heads
    from halluscope.runs import Run

    if not argument:
        raise InputError("method 'heads' needs heads; write heads:L0H1,L1H2 or heads:best3@RUN (a ranked run)")
    heads_spec, _, run_dir = argument.partition("@")
    report = Run.open(run_dir).read_json("heads", hint="rank") if run_dir else None
    if report is None and heads_spec.strip().lower().startswith(("best", "top")):
        raise InputError(f"head set {heads_spec!r} needs the run that ranked it; write heads:{heads_spec}@RUN, "
                         f"e.g. heads:{heads_spec}@runs/count, or name heads: heads:L0H1,L1H2")
    heads = resolve_head_set(heads_spec, report, n_layers, n_heads)
    return Method(f"heads:{format_heads(heads)}", f"heads:{argument}", heads)


#: Method kind -> parser of its argument (the text after "kind:"), given the model's layers and heads.
METHOD_KINDS: dict[str, Callable[[str, int, int], Method]] = {"greedy": _greedy, "heads": _heads}


def parse_method(spec: str, n_layers: int, n_heads: int) -> Method:
    """The method `spec` names, for a model of `n_layers` x `n_heads`.

    Raises:
        InputError: an unknown kind (with a "did you mean" and the kinds), a malformed argument, heads outside
            the model, or a run without a ranking.

    Example:
        >>> parse_method("heads:L1H2,L0H1", n_layers=4, n_heads=8).name
        'heads:L0H1,L1H2'
    """
    kind, _, argument = spec.strip().partition(":")
    if kind not in METHOD_KINDS:
        close = difflib.get_close_matches(kind, list(METHOD_KINDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown method {spec!r}.{hint} Available: greedy, heads:L0H1,L1H2, heads:best3@RUN")
    return METHOD_KINDS[kind](argument.strip(), n_layers, n_heads)


def parse_methods(specs: list[str] | tuple[str, ...], n_layers: int, n_heads: int) -> list[Method]:
    """Plain greedy first, then each method of `specs` once (by canonical name), in the order given.

    Example:
        >>> [m.name for m in parse_methods(["heads:L0H1", "greedy", "heads:l0h1"], 4, 8)]
        ['greedy', 'heads:L0H1']
    """
    methods = {"greedy": parse_method("greedy", n_layers, n_heads)}
    for spec in specs:
        method = parse_method(spec, n_layers, n_heads)
        methods.setdefault(method.name, method)
    return list(methods.values())
