"""The base of every decoding method: a validated config dataclass and the hooks the decoding loop calls.

A method says what it needs (`branches`: second inputs run as extra rows; `early_exit`: layers read out through
lm_head; `applied`: edits to the model for the whole call) and how a step's scores come from them
(`step_logits`). Under beam search, per-row state follows the rows as the loop copies them into beams (`expand`)
and reorders them (`reorder`). A method that runs its own beam search (OPERA) has a `num_beams` setting and may
send the search back to an earlier position (`rewinds`, `rewind`). Plain decoding is the base class itself: no
branches, no edits, the real rows' logits.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch

from halluscope.errors import InputError

if TYPE_CHECKING:
    from halluscope.decoding.loop import StepContext
    from halluscope.models.vlm import Batch

__all__ = ["MethodConfig", "DecodingMethod", "ranged", "plausible", "source_pairs"]


def ranged(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, integer: bool = False, doc: str = "") -> Any:
    """A config field with a default and a valid range (`low`/`high` inclusive unless `*_open`)."""
    return dataclasses.field(default=default, metadata={"range": (low, high, low_open, high_open, integer),
                                                        "doc": doc})


def _describe(low, high, low_open, high_open, integer) -> str:
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """A method's settings; subclasses declare fields with `ranged`, and every value is checked on creation."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec = f.metadata.get("range")
            if spec is None:
                continue
            low, high, low_open, high_open, integer = spec
            value = getattr(self, f.name)
            if value is None and f.default is None:  # an optional setting left to the method
                continue
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and (not integer or float(value).is_integer())
            ok = ok and (low is None or (value > low if low_open else value >= low))
            ok = ok and (high is None or (value < high if high_open else value <= high))
            if not ok:
                raise InputError(f"{type(self).__name__.removesuffix('Config').lower()} {f.name}={value!r} is out "
                                 f"of range; pass {_describe(*spec)}")

    def record(self) -> dict[str, Any]:
        """Every setting, defaults included, as JSON-ready values (what a manifest records)."""
        return dataclasses.asdict(self)


class DecodingMethod:
    """Plain decoding (the baseline every method is compared with), and the base of every method.

    Subclasses set `name`, `Config` (a `MethodConfig` dataclass with the paper's defaults) and override the hooks
    they need. Build one with keyword settings: `VCD(alpha=1.0)`; unknown or out-of-range settings raise.
    """

    name: ClassVar[str] = "greedy"
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: the branches change the image or prompt, so the batch must carry its (image, prompt) pairs
    needs_pairs: ClassVar[bool] = False

    def __init__(self, **settings: Any) -> None:
        names = [f.name for f in dataclasses.fields(self.Config)]
        unknown = [k for k in settings if k not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            valid = ", ".join(names) if names else "none"
            raise InputError(f"method {self.name!r} has no setting {unknown[0]!r}.{hint} Settings: {valid}")
        self.config = self.Config(**settings)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def record(self) -> dict[str, Any]:
        """The method and its full config, defaults included (what a run manifest records)."""
        return {"method": self.name, "config": self.config.record()}

    def branches(self, vlm, batch: Batch) -> list[Batch]:
        """Second inputs decoded beside the real one, each a batch with one row per real row."""
        return []

    #: step_logits reads only the mean of the early-exit logits: the loop reads out lm_head of the layers' mean
    #: normed state, one row per row instead of one per layer
    early_exit_mean: ClassVar[bool] = False

    def early_exit(self, vlm) -> list[int]:
        """Hidden-state indices (0 = embeddings) whose next-token logits through the final norm and lm_head
        `step_logits` reads (`StepContext.early`); the loop reads them out with the final logits. None here."""
        return []

    @contextmanager
    def applied(self, vlm, batch: Batch) -> Iterator[None]:
        """Edits to the model for the whole decoding call (hooks, attention edits); removed on exit."""
        yield

    def step_logits(self, context: StepContext) -> torch.Tensor:
        """The scores [batch, vocab] the sampler picks from (-inf excludes a token)."""
        return context.logits[0]

    @property
    def num_beams(self) -> int | None:
        """The beams of the method's own search: its `num_beams` setting if it has one, else None (the `Sampler`
        decides)."""
        return getattr(self.config, "num_beams", None)

    @property
    def strategy(self) -> str:
        """How the method picks tokens, for manifests: "greedy", or its own beam search."""
        beams = self.num_beams
        return "greedy" if beams in (None, 1) else f"beam search ({beams} beams, the method's own)"

    @property
    def rewinds(self) -> bool:
        """True if `rewind` may send the search back; the loop then keeps each step's beams and decodes one row at
        a time."""
        return False

    def expand(self, index: torch.Tensor) -> None:
        """Beam search copied the real rows into beams: row i is now row `index[i]` of the batch `applied` got
        [rows]; per-row state (a score or vector per prompt) follows, taken from that batch's."""

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search kept and reordered the rows: row i is now old row `index[i]` [rows]; per-row state follows."""

    def rewind(self, context: StepContext) -> int | None:
        """After `step_logits`: a reply position p (1 <= p < context.step) at which the search goes back and picks
        again, or None to go on."""
        return None


def plausible(logits: torch.Tensor, scores: torch.Tensor, beta: float) -> torch.Tensor:
    """The adaptive plausibility constraint: `scores` with -inf where p(token) < beta * max p under `logits`
    (the real input's). The most likely token always stays, so greedy picks are never excluded by it alone."""
    if beta <= 0:
        return scores
    cutoff = math.log(beta) + logits.max(-1, keepdim=True).values
    return scores.masked_fill(logits < cutoff, float("-inf"))


def source_pairs(method: DecodingMethod, batch: Batch) -> list[tuple[Any, str]]:
    """The (image, prompt) pairs `batch` was encoded from.

    Raises:
        InputError: the batch does not carry them (it was encoded outside `mitigate`).
    """
    pairs = getattr(batch, "pairs", None)
    if not pairs:
        raise InputError(f"method {method.name!r} builds its second input from the images and prompts; encode the "
                         f"batch inside `with halluscope.mitigate(vlm, {method.name!r}):` or call "
                         f"halluscope.decode(vlm, pairs, method={method.name!r})")
    return list(pairs)
