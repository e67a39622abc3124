"""The kinds of built-in model organism: one entry per kind naming its `load_vlm` name, its shipped checkpoint and
the modules that make up its recipe, training data, behaviour measurement and model card.

All kinds share the architecture, the training loop (`organism/train.py`) and the card's layout of sections;
a kind supplies what differs: what the organism is trained on and what is measured about it. Targets are
``"module:attr"`` strings imported on first use, so listing the kinds costs nothing.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halluscope.errors import InputError

__all__ = ["OrganismKind", "KINDS", "get_kind", "kind_for_name"]

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class OrganismKind:
    """A kind of organism.

    Args:
        name: the kind, as `halluscope organism train --kind` takes it ("pih", "scenes").
        model_name: what `load_vlm` takes to load the shipped checkpoint ("organism", "organism-scenes").
        checkpoint: the shipped checkpoint's directory (model, processor, trainlog.json, MODEL_CARD.md).
        recipe: ``"module:Class"`` of the kind's `Recipe` subclass.
        data: ``"module:Class"`` of its `TrainingData` subclass (what a training batch holds).
        report: ``"module:function"`` measuring the trained model: `report(vlm) -> dict` (behaviour.json).
        card: ``"module:function"`` writing MODEL_CARD.md: `card(out, recipe, report, *, train_seconds,
            command) -> Path`; the module also has `headline(report) -> str`, the line the CLI prints.
        description: one line for help texts.
    """

    name: str
    model_name: str
    checkpoint: Path
    recipe: str
    data: str
    report: str
    card: str
    description: str

    def load(self, part: str) -> Any:
        """Import and return one of the kind's parts: "recipe", "data", "report" or "card"."""
        module, _, attr = getattr(self, part).partition(":")
        return getattr(importlib.import_module(module), attr)

    def headline(self, report: dict[str, Any]) -> str:
        """The one-line summary of a behaviour report, from the kind's card module."""
        module = importlib.import_module(self.card.partition(":")[0])
        return module.headline(report)


KINDS: dict[str, OrganismKind] = {
    kind.name: kind
    for kind in (
        OrganismKind(
            name="pih",
            model_name="organism",
            checkpoint=_HERE / "checkpoint",
            recipe="halluscope.organism.recipe:PIHRecipe",
            data="halluscope.organism.data:PIHData",
            report="halluscope.organism.behaviour:behaviour_report",
            card="halluscope.organism.card:write_card",
            description="prompt-induced hallucination: copies overstated counts and colours from the prompt",
        ),
        OrganismKind(
            name="scenes",
            model_name="organism-scenes",
            checkpoint=_HERE / "scenes" / "checkpoint",
            recipe="halluscope.organism.scenes.recipe:SceneRecipe",
            data="halluscope.organism.scenes.data:SceneData",
            report="halluscope.organism.scenes.behaviour:behaviour_report",
            card="halluscope.organism.scenes.card:write_card",
            description="object hallucination: names absent objects that co-occur with present ones",
        ),
    )
}


def get_kind(name: str) -> OrganismKind:
    """The kind called `name`.

    Raises:
        InputError: an unknown kind, with a "did you mean" and the available kinds.
    """
    if name in KINDS:
        return KINDS[name]
    close = difflib.get_close_matches(str(name), list(KINDS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise InputError(f"unknown organism kind {name!r}.{hint} Available: {', '.join(KINDS)}")


def kind_for_name(model_name: str) -> OrganismKind | None:
    """The kind whose shipped checkpoint `load_vlm(model_name)` loads ("organism", "organism-scenes"), else None."""
    return next((kind for kind in KINDS.values() if kind.model_name == model_name), None)
