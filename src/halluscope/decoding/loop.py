"""The one KV-cache-aware decoding loop every mitigation method runs on.

Each step: the method's branches and the real rows go through one forward (`branches.Rows`), the method turns
the per-branch logits into one row of next-token scores (`DecodingMethod.step_logits`), the sampler picks a
token (`Sampler`: greedy, or seeded sampling with temperature and top-p), and every branch of a row is fed the
token its real row picked. A method that edits the model (heads, attention scores, steering) does so inside
`DecodingMethod.applied` for the whole call, through the `o_proj` hooks or the attention-function interface.
Rows that reach an end token are padded afterwards, as `generate` pads them, and the loop stops when all have
ended, so with no method it gives `VLM.generate_ids` token for token.

Beam search (`Sampler(num_beams=N)`, or a method's own `num_beams`) keeps N beams per row as rows of the same
forward, scores them as transformers' `generate(num_beams=N, do_sample=False)` does (summed log-softmax of the
method's scores; length penalty and early stopping on finished beams) and reorders the rows, cache included,
after every step; with no method it gives `generate`'s sequences token for token. A method that sends the search
back (OPERA's retrospection) has each row searched on its own: the loop keeps every step's beams and, at a
rewind, restores them, rebuilds their cache and picks again from the model's own log-probabilities without the
continuations it picked there before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from halluscope.decoding.branches import Rows
from halluscope.errors import InputError

if TYPE_CHECKING:
    from halluscope.decoding.methods.base import DecodingMethod
    from halluscope.models.vlm import Batch

__all__ = ["Sampler", "StepContext", "decode_ids"]

#: transformers' beam search: the score of an empty finished slot, and the penalty that rules a candidate out
_NONE = -1.0e9


@dataclass(frozen=True)
class Sampler:
    """How tokens are picked from the method's scores: greedy (the default baseline), sampling, or beam search.

    Args:
        do_sample: sample from softmax(scores / temperature) instead of taking the argmax.
        temperature: > 0; only used when sampling.
        top_p: in (0, 1]; sample from the smallest set of tokens whose probability reaches it.
        seed: seeds the sampler's own generator, so a call is reproducible and touches no global state.
        num_beams: >= 1; above 1, beam search as transformers runs it (not with `do_sample`).
        length_penalty: a finished beam scores its summed log-probability / length ** length_penalty.
        early_stopping: True ends a row's search once it has num_beams finished beams; False once no running beam
            can beat them at its current length; "never" once none can at the longest length (transformers' terms).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature {self.temperature!r} is out of range; pass a float > 0")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p {self.top_p!r} is out of range; pass a float in (0, 1]")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise InputError(f"num_beams {self.num_beams!r} is out of range; pass an integer >= 1")
        if self.do_sample and self.num_beams > 1:
            raise InputError(f"do_sample with num_beams={self.num_beams} (beam sampling) is not supported; pass "
                             f"num_beams=1 to sample or do_sample=False for beam search")
        if not math.isfinite(self.length_penalty):
            raise InputError(f"length_penalty {self.length_penalty!r} is not a finite number; pass e.g. 1.0")
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise InputError(f"early_stopping {self.early_stopping!r} is not valid; pass True, False or 'never'")

    def generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def pick(self, scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token per row of `scores` [rows, vocab] (-inf marks excluded tokens)."""
        if not self.do_sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores.float() / self.temperature, -1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            # keep a token while the mass before it is below top_p (the most likely token always stays)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0))
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class StepContext:
    """What a method sees at one decoding step.

    `logits[b]` is branch b's [batch, vocab] (branch 0 the real input; under beam search one row per beam, the
    beams of a row next to each other); `early` [layers, batch, vocab] float32 the real rows' early-exit logits at
    the hidden-state indices the method's `early_exit` asked for (their mean [1, batch, vocab] if its
    `early_exit_mean`; None if none); `step` is the number of tokens generated before this one (0 at the
    prefill).
    """

    logits: list[torch.Tensor]
    early: torch.Tensor | None
    step: int
    rows: Rows


def _context(logits: torch.Tensor, early: torch.Tensor | None, n: int, step: int, rows: Rows) -> StepContext:
    """The step's all-row logits [rows, vocab] split into one block of `n` rows per branch."""
    return StepContext(list(logits.split(n)), early, step, rows)


def _end_ids(vlm) -> tuple[torch.Tensor, int]:
    """The EOS ids that end a row (as `generate` ends it) and the pad id written after them."""
    config = vlm.greedy_config(1)
    eos = config.eos_token_id
    ends = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    return torch.tensor(ends, dtype=torch.long, device=vlm.device), config.pad_token_id


def _num_beams(method: DecodingMethod, sampler: Sampler) -> int:
    """The beams of the call: those of the method's own search (OPERA), else the sampler's."""
    own = method.num_beams
    if own is None:
        return sampler.num_beams
    if sampler.num_beams not in (1, own):
        raise InputError(f"method {method.name!r} runs its own beam search with num_beams={own}, but the sampler "
                         f"asks for {sampler.num_beams}; set the method's num_beams setting instead")
    if own > 1 and sampler.do_sample:
        raise InputError(f"method {method.name!r} runs beam search (num_beams={own}), which does not sample; drop "
                         f"do_sample or set the method's num_beams=1")
    return own


@dataclass
class _Beams:
    """Beam search over `groups` rows of `beams` beams each, in the state and with the arithmetic of transformers'
    `_beam_search` (so that ties break the same way)."""

    running: torch.Tensor  # [groups, beams, max_new_tokens] token ids, `fill` past the decoded length
    running_scores: torch.Tensor  # [groups, beams] summed log-probabilities
    finished: torch.Tensor  # [groups, beams, max_new_tokens] the best finished beams, best first
    finished_scores: torch.Tensor  # [groups, beams] length-penalised scores (-1e9: an empty slot)
    finished_lengths: torch.Tensor  # [groups, beams] tokens, the end token included
    is_finished: torch.Tensor  # [groups, beams] the slot holds a finished beam
    improvable: torch.Tensor  # [groups, 1] a running beam may still beat the worst finished one
    length: int = 0  # tokens decoded
    stopped: bool = False  # every candidate of the last step ended (an end token, or the length limit)

    @classmethod
    def start(cls, groups: int, beams: int, max_new_tokens: int, fill: int, device: torch.device) -> "_Beams":
        running = torch.full((groups, beams, max_new_tokens), fill, dtype=torch.long, device=device)
        scores = torch.zeros(groups, beams, device=device)
        scores[:, 1:] = _NONE  # the beams of a row start equal: only the first one's tokens are candidates
        return cls(running, scores, running.clone(), torch.full((groups, beams), _NONE, device=device),
                   torch.zeros(groups, beams, dtype=torch.long, device=device),
                   torch.zeros(groups, beams, dtype=torch.bool, device=device),
                   torch.ones(groups, 1, dtype=torch.bool, device=device))

    def copy(self) -> "_Beams":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def advance(self, log_probs: torch.Tensor, ends: torch.Tensor, sampler: Sampler) -> torch.Tensor:
        """Extend every row by one token from its beams' `log_probs` [groups * beams, vocab]; returns the beam
        (0..beams-1) each new running beam continues, [groups, beams]."""
        groups, beams, max_new = self.running.shape
        vocab = log_probs.shape[-1]
        keep = max(2, 1 + len(ends)) * beams  # enough candidates to go on with `beams` even if some end
        scores = (log_probs.view(groups, beams, vocab) + self.running_scores[:, :, None]).view(groups, -1)
        top_scores, top = torch.topk(scores, keep)
        parents, tokens = top // vocab, top % vocab
        sequences = self.running.gather(1, parents[:, :, None].expand(-1, -1, max_new))
        sequences[:, :, self.length] = tokens
        ended = torch.isin(tokens, ends) | (self.length + 1 >= max_new)

        live = top_scores + ended.to(torch.float32) * _NONE
        chosen = torch.topk(live, beams)[1]
        self.running = sequences.gather(1, chosen[:, :, None].expand(-1, -1, max_new))
        self.running_scores = live.gather(1, chosen)

        # among the first `beams` candidates, those that ended compete with the finished beams
        candidate = top_scores / ((self.length + 1) ** sampler.length_penalty)
        full = self.is_finished.all(-1, keepdim=True) & (sampler.early_stopping is True)
        candidate += full.to(torch.float32) * _NONE
        candidate += (~self.improvable).to(torch.float32) * _NONE
        just = ended & (torch.arange(keep, device=ended.device) < beams)
        candidate += (~just) * _NONE
        merged = torch.cat([self.finished_scores, candidate], 1)
        best = torch.topk(merged, beams)[1]
        self.finished = torch.cat([self.finished, sequences], 1).gather(1, best[:, :, None].expand(-1, -1, max_new))
        self.finished_scores = merged.gather(1, best)
        self.is_finished = torch.cat([self.is_finished, just], 1).gather(1, best)
        lengths = torch.full_like(tokens, self.length + 1)
        self.finished_lengths = torch.cat([self.finished_lengths, lengths], 1).gather(1, best)

        self.length += 1
        never = sampler.early_stopping == "never" and sampler.length_penalty > 0
        best_running = self.running_scores[:, :1] / ((max_new if never else self.length) ** sampler.length_penalty)
        worst = torch.where(self.is_finished, self.finished_scores.min(1, keepdim=True)[0], _NONE)
        self.improvable = self.improvable & (best_running > worst).any(-1, keepdim=True)
        self.stopped = bool(ended.all())
        return parents.gather(1, chosen)

    def done(self, sampler: Sampler) -> bool:
        """No row can improve, or every row is full under early stopping, or nothing can go on."""
        full = bool(self.is_finished.all()) and sampler.early_stopping is True
        return not bool(self.improvable.any()) or full or self.stopped


def _beam_fill(ends: torch.Tensor, pad: int | None) -> int:
    """What `generate`'s beam search writes after a beam's end: the pad id, but the first EOS id when the pad id
    is 0 or unset, and -1 without EOS ids."""
    if len(ends) == 0:
        return -1
    return pad if pad else int(ends[0])


def _greedy(vlm, method: DecodingMethod, rows: Rows, logits: torch.Tensor, early: torch.Tensor | None,
            readout: dict[str, Any], *, max_new_tokens: int, sampler: Sampler, ends: torch.Tensor,
            pad: int) -> torch.Tensor:
    """One token per row and step, picked by `sampler`: [rows, new_tokens], padded after each row's end
    (`readout`: the method's early-exit read-out, as `Rows.step` takes it)."""
    n, branches = rows.n, rows.mask.shape[0] // rows.n
    generator = sampler.generator(vlm.device)
    done = torch.zeros(n, dtype=torch.bool, device=vlm.device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        scores = method.step_logits(_context(logits, early, n, step, rows))
        token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), sampler.pick(scores, generator))
        out.append(token)
        done = done | torch.isin(token, ends)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits, early = rows.step(vlm, token.repeat(branches), **readout)
    return torch.stack(out, 1)


def _search(vlm, method: DecodingMethod, rows: Rows, logits: torch.Tensor, early: torch.Tensor | None,
            readout: dict[str, Any], part: torch.Tensor, *,
            beams: int, max_new_tokens: int, sampler: Sampler, ends: torch.Tensor,
            fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search for the real rows `part` of `rows`: each row's best sequence [rows, max_new_tokens] (`fill`
    past its end) and its length [rows]."""
    copies = part.to(vlm.device).repeat_interleave(beams)
    index = rows.index(copies)
    rows, logits = rows.select(copies), logits[index]
    method.expand(copies)
    early = None if early is None else early[:, copies]
    branches, groups = rows.mask.shape[0] // rows.n, len(part)
    state = _Beams.start(groups, beams, max_new_tokens, fill, vlm.device)
    offsets = torch.arange(groups, device=vlm.device)[:, None] * beams
    kept: list[_Beams] = []  # with a rewinding method: the beams before each reply position
    picked: list[torch.Tensor] = []  # ... and the (beam, token) continuations picked there, as beam * vocab + token
    banned: dict[int, torch.Tensor] = {}  # the continuations a rewind to a position may not pick again
    while True:
        context = _context(logits, early, rows.n, state.length, rows)
        scores = method.step_logits(context)
        back = method.rewind(context) if method.rewinds else None
        if back is not None:
            state = kept[back].copy()
            again = picked[back] if back not in banned else torch.cat([banned[back], picked[back]], 1)
            banned = {p: b for p, b in banned.items() if p < back} | {back: again}
            del kept[back:], picked[back:]
            logits, early = rows.rewind(vlm, state.running[:, :, :back].flatten(0, 1).repeat(branches, 1), **readout)
            real = logits[:rows.n].float()
            scores = real.view(groups, -1).scatter(1, again, float("-inf")).view_as(real)
        if method.rewinds:
            kept.append(state.copy())
        log_probs = torch.log_softmax(scores.float(), -1)
        continued = state.advance(log_probs, ends, sampler)
        if method.rewinds:
            picked.append(continued * log_probs.shape[-1] + state.running[:, :, state.length - 1])
        if state.done(sampler):
            return state.finished[:, 0], state.finished_lengths[:, 0]
        order = (continued + offsets).flatten()
        rows = rows.select(order)
        method.reorder(order)
        tokens = state.running[:, :, state.length - 1].flatten()
        logits, early = rows.step(vlm, tokens.repeat(branches), **readout)


@torch.inference_mode()
def decode_ids(vlm, batch: Batch, method: DecodingMethod | None = None, *, max_new_tokens: int = 50,
               sampler: Sampler | None = None) -> torch.Tensor:
    """Continuation token ids [batch, new_tokens] under `method` (None: plain decoding), padded after each row's
    end token as `VLM.generate_ids` pads them (as `generate(num_beams=...)` pads them under beam search).

    Raises:
        InputError: max_new_tokens < 1, the method needs the batch's source pairs and `batch` lacks them, or the
            sampler asks for other beams than the method's own search.

    Example:
        >>> ids = decode_ids(vlm, vlm.encode([(image, "Describe the image.")]), get_method("vcd")(alpha=1.0))
    """
    from halluscope.decoding.methods.base import DecodingMethod

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    method = method if method is not None else DecodingMethod()
    sampler = sampler or Sampler()
    beams = _num_beams(method, sampler)
    ends, pad = _end_ids(vlm)
    n = len(batch)
    with method.applied(vlm, batch):
        batches = [batch, *method.branches(vlm, batch)]
        readout = {"early": method.early_exit(vlm), "mean": method.early_exit_mean}
        rows, logits, early = Rows.prefill(vlm, batches, max_new_tokens, **readout)
        if beams == 1:
            return _greedy(vlm, method, rows, logits, early, readout, max_new_tokens=max_new_tokens,
                           sampler=sampler, ends=ends, pad=pad)
        parts = [torch.tensor([r]) for r in range(n)] if method.rewinds else [torch.arange(n)]
        found = [_search(vlm, method, rows, logits, early, readout, part, beams=beams,
                         max_new_tokens=max_new_tokens, sampler=sampler, ends=ends, fill=_beam_fill(ends, pad))
                 for part in parts]
    sequences, lengths = (torch.cat(x) for x in zip(*found))
    return sequences[:, :int(lengths.max())]
