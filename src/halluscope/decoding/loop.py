"""The one KV-cache-aware decoding loop every mitigation method runs on.

Each step: the method's branches and the real rows go through one forward (`branches.Rows`), the method turns
the per-branch logits into one row of next-token scores (`DecodingMethod.step_logits`), the sampler picks a
token (`Sampler`: greedy, or seeded sampling with temperature and top-p), and every branch of a row is fed the
token its real row picked. A method that edits the model (heads, attention scores, steering) does so inside
`DecodingMethod.applied` for the whole call, through the `o_proj` hooks or the attention-function interface.
Rows that reach an end token are padded afterwards, as `generate` pads them, and the loop stops when all have
ended, so with no method it gives `VLM.generate_ids` token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from halluscope.decoding.branches import Rows
from halluscope.errors import InputError

if TYPE_CHECKING:
    from halluscope.decoding.methods.base import DecodingMethod
    from halluscope.models.vlm import Batch

__all__ = ["Sampler", "StepContext", "decode_ids"]


@dataclass(frozen=True)
class Sampler:
    """How a token is picked from the method's scores: greedy (the default baseline) or sampling.

    Args:
        do_sample: sample from softmax(scores / temperature) instead of taking the argmax.
        temperature: > 0; only used when sampling.
        top_p: in (0, 1]; sample from the smallest set of tokens whose probability reaches it.
        seed: seeds the sampler's own generator, so a call is reproducible and touches no global state.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature {self.temperature!r} is out of range; pass a float > 0")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p {self.top_p!r} is out of range; pass a float in (0, 1]")

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

    `logits[b]` is branch b's [batch, vocab] (branch 0 the real input); `hidden[b]` its per-layer hidden
    states (a tuple, embeddings first) when the method asked for them; `step` is the number of tokens generated
    before this one (0 at the prefill).
    """

    logits: list[torch.Tensor]
    hidden: list[tuple[torch.Tensor, ...]] | None
    step: int
    rows: Rows


def _context(logits: torch.Tensor, states: tuple[torch.Tensor, ...] | None, n: int, step: int,
             rows: Rows) -> StepContext:
    """The step's all-row logits [rows, vocab] (and hidden states) split into one block of `n` rows per branch."""
    hidden = None if states is None else [tuple(s[start:start + n] for s in states)
                                          for start in range(0, logits.shape[0], n)]
    return StepContext(list(logits.split(n)), hidden, step, rows)


def _end_ids(vlm) -> tuple[torch.Tensor, int]:
    """The EOS ids that end a row (as `generate` ends it) and the pad id written after them."""
    config = vlm.greedy_config(1)
    eos = config.eos_token_id
    ends = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    return torch.tensor(ends, dtype=torch.long, device=vlm.device), config.pad_token_id


@torch.inference_mode()
def decode_ids(vlm, batch: Batch, method: DecodingMethod | None = None, *, max_new_tokens: int = 50,
               sampler: Sampler | None = None) -> torch.Tensor:
    """Continuation token ids [batch, new_tokens] under `method` (None: plain decoding), padded after each row's
    end token as `VLM.generate_ids` pads them.

    Raises:
        InputError: max_new_tokens < 1, or the method needs the batch's source pairs and `batch` lacks them.

    Example:
        >>> ids = decode_ids(vlm, vlm.encode([(image, "Describe the image.")]), get_method("vcd")(alpha=1.0))
    """
    from halluscope.decoding.methods.base import DecodingMethod

    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    method = method if method is not None else DecodingMethod()
    sampler = sampler or Sampler()
    generator = sampler.generator(vlm.device)
    ends, pad = _end_ids(vlm)
    n = len(batch)
    with method.applied(vlm, batch):
        batches = [batch, *method.branches(vlm, batch)]
        hidden = method.needs_hidden_states
        rows, logits, states = Rows.prefill(vlm, batches, max_new_tokens, hidden=hidden)
        done = torch.zeros(n, dtype=torch.bool, device=vlm.device)
        out: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            scores = method.step_logits(_context(logits, states, n, step, rows))
            token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), sampler.pick(scores, generator))
            out.append(token)
            done = done | torch.isin(token, ends)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, states = rows.step(vlm, token.repeat(len(batches)), hidden=hidden)
    return torch.stack(out, 1)
