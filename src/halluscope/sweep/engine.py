"""Exact head-knockout sweeps, fast.

For one prompt and a grid of (layer, head) knockouts the engine gives the same answers as the naive loop
(one hook and one full forward or generate per head), for a fraction of the cost:

- score mode teacher-forces the clean reply up to its answer word (the first number or colour it states, or the
  first reply token when it states none) and scores the truth and the claim there as whole words (their full
  token sequences, `sweep.slot`), so one forward per knockout replaces a generate;
- the clean residual stream entering layer L is captured once per prompt and reused for every head of layer L
  (a knockout in layer L cannot change anything below it), so only layers L..end are recomputed;
- the knockouts of a layer run as the rows of one batch, each row carrying its own head mask;
- generate mode treats the clean reply as a draft, as speculative decoding does: one teacher-forced pass over
  it (layers L..end, prefix reused) gives every knockout's greedy token at every reply position. Rows that
  agree to the end have the clean reply; a row that diverges keeps the key/value cache of the prompt and the
  clean tokens it shares (layers below L from the clean pass, L..end from its own) and is decoded on from
  its first differing token, batched with other diverged rows, with no second prefill. Greedy decoding is
  deterministic, so this is exact. Every row stops as soon as its answer is decided.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from num2words import num2words
from transformers import DynamicCache
from transformers.utils import ModelOutput

from halluscope.answers import classify_reply, first_colour, parse_number
from halluscope.errors import InputError
from halluscope.interventions.heads import HeadHooks, HeadIntervention
from halluscope.models.compat import cache_argument, output_cache, with_cache
from halluscope.sweep.cache import pack_caches
from halluscope.sweep.slot import AnswerSlot, append_tokens, outcome_of, place_answer, word_scores

__all__ = ["SweepItem", "answer_decided", "ScoreSetup", "prepare_score", "score_prompt",
           "GenerateSetup", "prepare_generate", "generate_prompt", "naive_score", "naive_generate"]


Reply = tuple[list[int], "int | None"]  # reply token ids, and the EOS or pad token that ended it (None: cut off)


@dataclass(frozen=True)
class SweepItem:
    """One prompt to sweep: an image, the prompt text, the truth and what the prompt claims.

    `task` is "count" (int truth and claim) or "color" (colour names).
    """

    sample_id: str
    image: Any
    prompt: str
    truth: int | str
    claim: int | str | None
    task: str = "count"
    # the un-intervened greedy reply's token ids through its EOS, when known (e.g. from the eval run): the
    # engine then reuses it instead of generating it again
    reply_ids: tuple[int, ...] | None = None
    object: str | None = None  # the prompt's noun: keeps colour words in it ("red panda") out of the answer
    truth_aliases: tuple[str, ...] = ()  # other true answers, e.g. the other colours of a multi-coloured object

    def classify(self, reply: str) -> tuple[Any, str]:
        """The parsed answer and outcome of a reply to this prompt (as the eval classifies it)."""
        truth = self.truth if self.task == "count" else (self.truth, *self.truth_aliases)
        return classify_reply(self.task, reply, truth, self.claim, self.object)

    def decided(self, reply: str) -> bool:
        """True once the reply's answer can no longer change (see `answer_decided`)."""
        return answer_decided(reply, parse_number if self.task == "count" else first_colour)

    def spellings(self) -> tuple[tuple[str, Callable[[Any], str]], ...]:
        """The answer forms scored in score mode: digits and words for counts, the word for colours."""
        return (("digit", str), ("word", num2words)) if self.task == "count" else (("word", str),)


def answer_decided(reply: str, parse: Callable[[str], Any] = parse_number) -> bool:
    """True once the reply states an answer (a number by default) that further tokens cannot change.

    The last word counts only once something follows it (a space or punctuation other than "-"), since
    "1" may become "12" and "twenty" may become "twenty-one".
    """
    ended = reply[-1:].isspace() or (reply[-1:] != "" and not reply[-1].isalnum() and reply[-1] != "-")
    words = reply.split()
    complete = reply if ended or not words else reply[: len(reply) - len(words[-1])]
    return parse(complete) is not None


# ---- score mode -----------------------------------------------------------------------------------------
@dataclass
class ScoreSetup:
    """A prompt prepared for scoring: its clean reply and the answer slots where truth and claim are scored as
    whole words (see `halluscope.sweep.slot`)."""

    item: SweepItem
    clean_reply: str
    slots: list[AnswerSlot]
    prompt_len: int  # the prompt's tokens; the rest of each sequence is teacher-forced reply
    # every input sequence's clean layer inputs, captured on first use and shared by every later call (per layer)
    captured: list[Any] = field(default_factory=list, repr=False)

    def inputs(self) -> list[tuple[AnswerSlot, Any, list[int]]]:
        """Every (slot, input sequence, indices of the slot's words it scores)."""
        return [(slot, batch, indices) for slot in self.slots for batch, indices in slot.inputs]

    def layer_inputs(self, vlm) -> list["_LayerInputs"]:
        """The clean layer inputs of every input sequence, captured once."""
        if not self.captured:
            with _vision_once(vlm):  # every sequence holds the same image: its features are computed once
                for _, batch, _ in self.inputs():
                    inputs = _LayerInputs(vlm)
                    inputs.capture(batch)
                    self.captured.append(inputs)
        return self.captured

    def prompt_mask(self, batch) -> torch.Tensor:
        """The batch's attention mask over the prompt only: where "reference-mean" averages and edits, as the
        reference study's prefill did (its reply tokens came later, in cached decode steps it left alone)."""
        mask = batch.attention_mask.clone()
        mask[:, self.prompt_len:] = 0
        return mask

    def forms(self) -> dict[str, tuple[int, int]]:
        """Per scored form: the token counts of the truth and of the claim."""
        return {form: sizes for slot in self.slots for form, sizes in slot.forms().items()}


def prepare_score(vlm, item: SweepItem, *, max_new_tokens: int = 50) -> ScoreSetup:
    """The clean reply (see `SweepItem.reply_ids`) and the answer slots at which truth and claim are scored.

    Raises:
        InputError: the prompt is not misleading, or no spelling tells truth and claim apart.
    """
    if item.claim is None or item.claim == item.truth:
        raise InputError(f"{item.sample_id}: score mode needs a misleading prompt (claim != truth), got "
                         f"truth={item.truth} claim={item.claim}")
    batch = vlm.encode([(item.image, item.prompt)])
    reply_ids = _clean_reply(vlm, item, batch, max_new_tokens)[0]
    reply = vlm.tokenizer.decode(reply_ids, skip_special_tokens=True)
    return ScoreSetup(item, reply, place_answer(vlm, item, batch, reply_ids), batch.seq_len)


def _score_rows(setup: ScoreSetup, per_input: list[dict[int, tuple[torch.Tensor, torch.Tensor]]],
                rows: int) -> list[dict[str, Any]]:
    """Per row: the truth - claim word log-probability per form, the token counts, and the greedy outcome.

    A row is `corrected` if greedy decoding spells the truth in any form, else `copied` if it spells the claim in
    any, else `other`. For one-token words the log-probability difference is the logit difference.
    """
    scores: dict[tuple[str, str], tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for (slot, _, _), found in zip(setup.inputs(), per_input):
        for index, (logp, follows) in found.items():
            word = slot.words[index]
            scores[word.form, word.role] = (word, logp.tolist(), follows.tolist())
    rank = {"other": 0, "copied": 1, "corrected": 2}
    out: list[dict[str, Any]] = [{"outcome": "other"} for _ in range(rows)]
    for form, (n_truth, n_claim) in setup.forms().items():
        truth, lp_truth, follows_truth = scores[form, "truth"]
        claim, lp_claim, follows_claim = scores[form, "claim"]
        for r, result in enumerate(out):
            result[f"logit_diff_{form}"] = lp_truth[r] - lp_claim[r]
            result[f"tokens_truth_{form}"], result[f"tokens_claim_{form}"] = n_truth, n_claim
            outcome = outcome_of(truth, claim, follows_truth[r], follows_claim[r])
            if rank[outcome] > rank[result["outcome"]]:
                result["outcome"] = outcome
    return out


class _LayerInputs:
    """Every decoder layer's input (hidden states and keyword arguments) and `o_proj` input during one clean
    forward, and optionally the clean key/value cache and the position ids the text model saw."""

    def __init__(self, vlm) -> None:
        self.vlm = vlm
        self.inputs: list[tuple[tuple, dict]] = []
        self.heads: list[torch.Tensor] = []  # per layer, the o_proj input: every head's output
        self.cache: Any = None
        self.position_ids: torch.Tensor | None = None

    @torch.inference_mode()
    def capture(self, batch, *, keep_cache: bool = False) -> None:
        layers = range(self.vlm.n_layers)
        self.inputs, self.heads = [None] * len(layers), [None] * len(layers)  # type: ignore[list-item]

        def grab(layer):
            def hook(module, args, kwargs):
                self.inputs[layer] = (args, kwargs)
            return hook

        def grab_heads(layer):
            def hook(module, args):
                self.heads[layer] = args[0]
            return hook

        def positions(module, args, kwargs):
            self.position_ids = kwargs.get("position_ids")

        handles = [self.vlm.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
        handles += [self.vlm.o_proj(i).register_forward_pre_hook(grab_heads(i)) for i in layers]
        handles.append(self.vlm.text_model.register_forward_pre_hook(positions, with_kwargs=True))
        try:
            out = self.vlm.forward(batch, use_cache=keep_cache, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        self.cache = output_cache(out) if keep_cache else None

    @torch.inference_mode()
    def run_from(self, layer: int, rows: int, positions: int = 1, cache: Any = None) -> torch.Tensor:
        """The final-normed hidden states [rows, positions, hidden] at the last `positions` positions after
        running layers `layer`..end on `rows` copies of the clean input; `cache` records the keys and values
        of the layers after `layer` (those of `layer` itself are the clean ones).

        Layer `layer`'s attention is not recomputed: an edit at its o_proj input leaves everything before that
        unchanged, so the clean head outputs go straight to o_proj (and the rows' edit hooks). The last layer's
        MLP runs on the last `positions` positions only: nothing reads the others after it.
        """
        args, kwargs = self.inputs[layer]
        kwargs = with_cache(self.vlm.layers[layer], kwargs, cache)
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        hidden = hidden.expand(rows, -1, -1)  # the other inputs have batch 1 and broadcast over the rows
        with _clean_attention(self.vlm, layer, self.heads[layer].expand(rows, -1, -1)), \
                _mlp_on_last(self.vlm.layers[-1], positions):
            for i in range(layer, self.vlm.n_layers):
                hidden = self.vlm.layers[i](hidden, *args[1:], **kwargs)
                if isinstance(hidden, tuple):
                    hidden = hidden[0]
        return self.vlm.norm(hidden[:, -positions:])


@contextmanager
def _patched_forward(module, forward: Callable) -> Iterator[None]:
    """`module.forward` replaced by `forward` for the body of the `with` (an instance-level forward, such as an
    accelerate hook's wrapper, is put back afterwards)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


@contextmanager
def _vision_once(vlm) -> Iterator[None]:
    """The vision tower answering a call with the very tensors of its previous call from that call's output (the
    same inputs give the same output), for the body of the `with`."""
    tower = vlm.vision_tower
    forward = tower.forward
    last: list[Any] = []  # [argument tensors, output] of the previous call

    def tensors(args, kwargs) -> list[Any]:
        return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]

    def fresh(output: Any) -> Any:  # callers reassign fields of the output they get (Qwen splits pooler_output)
        if isinstance(output, ModelOutput):
            return type(output)(**dict(output.items()))
        return tuple(output) if isinstance(output, tuple) else output

    def remembered(*args, **kwargs):
        given = tensors(args, kwargs)
        if not (last and len(last[0]) == len(given) and all(a is b for a, b in zip(last[0], given))):
            last[:] = [given, forward(*args, **kwargs)]
        return fresh(last[1])

    with _patched_forward(tower, remembered):
        yield


def _clean_attention(vlm, layer: int, heads: torch.Tensor):
    """Layer `layer`'s self-attention answering o_proj of the given head outputs, without recomputing them."""
    attention = vlm.attention(layer)
    return _patched_forward(attention, lambda *args, **kwargs: (attention.o_proj(heads), None))


def _mlp_on_last(layer, positions: int):
    """`layer`'s MLP computing the last `positions` positions only (zeros elsewhere)."""
    mlp = layer.mlp
    full = mlp.forward

    def last_only(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        out[:, -positions:] = full(x[:, -positions:])
        return out

    return _patched_forward(mlp, last_only)


@torch.inference_mode()
def score_prompt(vlm, setup: ScoreSetup, heads: Sequence[tuple[int, int]], *, mode: str = "zero",
                 alpha: float = 0.0, means: torch.Tensor | None = None,
                 batch_size: int = 16) -> list[dict[str, Any]]:
    """Score every knockout in `heads` on one prepared prompt; one result dict per head, in order."""
    by_layer: dict[int, list[int]] = {}
    for index, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(index)
    results: list[dict[str, Any]] = [{} for _ in heads]
    captured = setup.layer_inputs(vlm)
    with HeadHooks(vlm, means=means) as hooks:
        for layer, indices in by_layer.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                per_input = []
                for (slot, batch, words), inputs in zip(setup.inputs(), captured):
                    hooks.set(_coefficients(vlm, [heads[i] for i in chunk], alpha), mode=mode,
                              row_mask=setup.prompt_mask(batch).expand(len(chunk), -1))
                    window = vlm.lm_head(inputs.run_from(layer, len(chunk), positions=slot.window(batch)))
                    per_input.append(word_scores(window, slot.words, words))
                for idx, res in zip(chunk, _score_rows(setup, per_input, len(chunk))):
                    results[idx] = res
    return results


# ---- generate mode --------------------------------------------------------------------------------------
def _greedy(vlm, batch, max_new_tokens: int, stops: Sequence[Callable[[str], bool]]) -> list[Reply]:
    """Greedy replies of a batch, row r stopping once `stops[r](reply)` holds, at EOS or at `max_new_tokens`."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    width, tokenizer = batch.seq_len, vlm.tokenizer

    class Decided(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [stop(tokenizer.decode(row[width:], skip_special_tokens=True))
                    for row, stop in zip(input_ids.tolist(), stops)]
            return torch.tensor(done, device=input_ids.device)

    with torch.inference_mode():
        out = vlm.model.generate(**batch.inputs, generation_config=vlm.greedy_config(max_new_tokens),
                                 stopping_criteria=StoppingCriteriaList([Decided()]))
    rows = []
    for row in out[:, width:].tolist():
        reply, ended = [], None
        for token in row:
            if token in vlm.end_token_ids:
                ended = token
                break
            reply.append(token)
        rows.append((reply, ended))
    return rows


def _clean_reply(vlm, item: SweepItem, batch, max_new_tokens: int) -> Reply:
    """The un-intervened greedy reply, stopped once decided: cut from `item.reply_ids` when they cover it,
    else generated."""
    if item.reply_ids is not None:
        reply: list[int] = []
        for token in item.reply_ids[:max_new_tokens]:
            if token in vlm.end_token_ids:
                return reply, token
            reply.append(token)
            if item.decided(vlm.tokenizer.decode(reply, skip_special_tokens=True)):
                return reply, None
        if len(reply) == max_new_tokens:
            return reply, None
    return _greedy(vlm, batch, max_new_tokens, [item.decided])[0]


@dataclass
class GenerateSetup:
    """A prompt prepared for generate mode: its clean greedy reply and one clean forward over the prompt and the
    reply's first `checked` tokens (every layer's input, the key/value cache, the position ids)."""

    item: SweepItem
    prompt_len: int
    clean: list[int]
    sequence: list[int]  # the clean reply and the token that ended it: what a knockout must reproduce
    inputs: _LayerInputs
    checked: int  # reply tokens the first verification pass checks (most diverging knockouts do so early)

    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """Position ids of sequence indices `prompt_len - 1 + offsets` [rows, n], in the model's format (text
        positions count on from the prompt's last one; Qwen's 3-D ids have equal components there)."""
        return _continued_positions(self.inputs.position_ids, self.prompt_len - 1, offsets)


def _continued_positions(captured: torch.Tensor | None, last: int, offsets: torch.Tensor) -> torch.Tensor:
    """Position ids of sequence indices `last + offsets` [rows, n] after a forward whose text model saw position
    ids `captured` (None: it derived them itself, counting from 0), in the model's format (text positions count
    on from the one at `last`; Qwen's 3-D ids have equal components there)."""
    if captured is None:
        return offsets + last
    return captured[..., last:last + 1] + offsets


_FIRST_CHECK = 4


def prepare_generate(vlm, item: SweepItem, *, max_new_tokens: int = 50) -> GenerateSetup:
    """The clean reply (see `SweepItem.reply_ids`) and the clean forward over it."""
    batch = vlm.encode([(item.image, item.prompt)])
    ids, ender = _clean_reply(vlm, item, batch, max_new_tokens)
    sequence = list(ids) + ([ender] if ender is not None else [])
    checked = min(_FIRST_CHECK, len(sequence))
    inputs = _LayerInputs(vlm)
    inputs.capture(append_tokens(batch, sequence[:checked - 1]), keep_cache=True)
    return GenerateSetup(item, batch.seq_len, list(ids), sequence, inputs, checked)


def _coefficients(vlm, heads: Sequence[tuple[int, int]], alpha: float) -> torch.Tensor:
    coef = torch.ones(len(heads), vlm.n_layers, vlm.n_heads)
    for row, (layer, head) in enumerate(heads):
        coef[row, layer, head] = alpha
    return coef


def generate_prompt(vlm, prompt: SweepItem | GenerateSetup, heads: Sequence[tuple[int, int]], *,
                    mode: str = "zero", alpha: float = 0.0, means: torch.Tensor | None = None,
                    batch_size: int = 16, max_new_tokens: int = 50) -> list[dict[str, Any]]:
    """Greedy replies with each knockout in `heads`, stopped once the answer is decided; one dict per head.

    `prompt` is an item, or a `prepare_generate` setup to share one clean reply across calls (e.g. per layer).
    """
    heads = list(heads)
    item = prompt.item if isinstance(prompt, GenerateSetup) else prompt
    if mode == "reference-mean":  # its edit depends on which positions share a forward: decode from scratch
        replies = _decode_from_scratch(vlm, item, heads, alpha, batch_size, max_new_tokens)
    else:
        setup = prompt if isinstance(prompt, GenerateSetup) else prepare_generate(vlm, item,
                                                                                 max_new_tokens=max_new_tokens)
        replies = _verify_then_continue(vlm, setup, heads, mode, alpha, means, batch_size, max_new_tokens)
    results = []
    for ids in replies:
        reply = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        answer, outcome = item.classify(reply)
        results.append({"reply": reply, "answer": answer, "outcome": outcome})
    return results


@dataclass
class _Row:
    """A knockout in flight: its index, head, reply so far, and its key/value cache over the prompt and the
    reply tokens before the last one, one (keys [1, kv_heads, length, head_dim], values) per layer."""

    index: int
    head: tuple[int, int]
    reply: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


def _first_divergence(vlm, normed: torch.Tensor, target: torch.Tensor) -> list[tuple[int, int] | None]:
    """Per row of final-normed hidden states [rows, S, hidden]: (position, greedy token) of the first greedy
    token that differs from `target` [S], or None if all agree. Logits are computed only while a row agrees,
    over position windows that double in size (most rows that diverge do so within a few tokens)."""
    found: list[tuple[int, int] | None] = [None] * normed.shape[0]
    active = torch.arange(normed.shape[0])
    start, step = 0, 4
    while start < normed.shape[1] and len(active):
        predicted = vlm.lm_head(normed[active, start:start + step]).argmax(-1).cpu()
        differs = predicted != target[start:start + step]
        for hit, row in enumerate(active.tolist()):
            if differs[hit].any():
                j = int(differs[hit].nonzero()[0])
                found[row] = (start + j, int(predicted[hit, j]))
        active = active[~differs.any(-1)]
        start, step = start + step, step * 2
    return found


class _Knockouts:
    """The state of one generate-mode call: finished replies, and rows waiting to be verified further
    (`drafts`: they agree with the clean reply so far) or decoded (`pending`: they left it), each flushed in
    batches."""

    def __init__(self, vlm, setup: GenerateSetup, heads, hooks: HeadHooks, mode: str, alpha: float,
                 batch_size: int, max_new_tokens: int) -> None:
        self.vlm, self.setup, self.heads, self.hooks = vlm, setup, heads, hooks
        self.mode, self.alpha, self.batch_size, self.max_new_tokens = mode, alpha, batch_size, max_new_tokens
        self.replies: list[list[int] | None] = [None] * len(heads)
        self.drafts: list[_Row] = []
        self.pending: list[_Row] = []
        self.target = torch.tensor(setup.sequence)

    def diverged(self, index: int, j: int, token: int, kv: Callable[[int], list]) -> None:
        """Row `index` agrees with the clean reply up to position j and picks `token` there; `kv(n)` gives its
        cache over the first n positions."""
        reply = self.setup.sequence[:j] + [token]
        if token in self.vlm.end_token_ids:
            self.replies[index] = reply[:-1]
        elif len(reply) >= self.max_new_tokens or self.setup.item.decided(
                self.vlm.tokenizer.decode(reply, skip_special_tokens=True)):
            self.replies[index] = reply
        else:
            self.pending.append(_Row(index, self.heads[index], reply, kv(self.setup.prompt_len + j)))

    def verify_first(self, layer: int, indices: list[int]) -> None:
        """Teacher-force the prompt and the clean reply's first tokens through layers `layer`..end."""
        setup = self.setup
        self.hooks.set(_coefficients(self.vlm, [self.heads[i] for i in indices], self.alpha), mode=self.mode)
        own = DynamicCache()
        normed = setup.inputs.run_from(layer, len(indices), positions=setup.checked, cache=own)
        clean_kv, own_kv = [(k, v) for k, v, *_ in setup.inputs.cache], [(k, v) for k, v, *_ in own]

        def kv(row: int) -> Callable[[int], list]:
            return lambda n: ([(k[:, :, :n], v[:, :, :n]) for k, v in clean_kv[:layer + 1]]
                              + [(k[row:row + 1, :, :n], v[row:row + 1, :, :n]) for k, v in own_kv[layer + 1:]])

        for row, (index, found) in enumerate(zip(indices, _first_divergence(self.vlm, normed,
                                                                            self.target[:setup.checked]))):
            if found is not None:
                self.diverged(index, *found, kv(row))
            elif setup.checked == len(setup.sequence):
                self.replies[index] = list(setup.clean)
            else:
                self.drafts.append(_Row(index, self.heads[index], setup.sequence[:setup.checked],
                                        kv(row)(setup.prompt_len + setup.checked - 1)))

    def flush(self, everything: bool = False) -> None:
        """Verify, then decode, the waiting rows in full batches (all of them if `everything`)."""
        for queue, run in ((self.drafts, self._verify_rest), (self.pending, self._decode)):
            while len(queue) >= self.batch_size or (everything and queue):
                group = queue[:self.batch_size]
                del queue[:self.batch_size]
                run(group)

    def _verify_rest(self, group: list[_Row]) -> None:
        """Teacher-force the rest of the clean reply through the whole model from the rows' caches."""
        setup, k = self.setup, self.setup.checked
        rest = setup.sequence[k - 1:-1]
        cache, mask, width = pack_caches([e.kv for e in group], len(rest))
        self.hooks.set(_coefficients(self.vlm, [e.head for e in group], self.alpha), mode=self.mode)
        offsets = torch.arange(k, k + len(rest), device=mask.device).expand(len(group), -1)
        ids = torch.tensor([rest], device=mask.device).expand(len(group), -1)
        normed = self.vlm.text_model(input_ids=ids, attention_mask=torch.cat([mask, torch.ones_like(ids)], 1),
                                     position_ids=setup.positions(offsets), use_cache=True,
                                     **{cache_argument(self.vlm.text_model): cache}).last_hidden_state
        buffers = [layer.buffers for layer in cache.layers]
        for r, (entry, found) in enumerate(zip(group, _first_divergence(self.vlm, normed, self.target[k:]))):
            if found is None:
                self.replies[entry.index] = list(setup.clean)
                continue
            pad = width - entry.kv[0][0].shape[2]
            self.diverged(entry.index, k + found[0], found[1],
                          lambda n, r=r, pad=pad: [(kb[r:r + 1, :, pad:pad + n], vb[r:r + 1, :, pad:pad + n])
                                                   for kb, vb in buffers])

    def _decode(self, group: list[_Row]) -> None:
        for entry, ids in zip(group, _continue(self.vlm, self.setup, group, self.hooks, self.mode, self.alpha,
                                               self.max_new_tokens)):
            self.replies[entry.index] = ids


@torch.inference_mode()
def _verify_then_continue(vlm, setup: GenerateSetup, heads, mode, alpha, means, batch_size,
                          max_new_tokens) -> list[list[int]]:
    """Verify every knockout against the clean reply (batched per layer) and decode on only where it differs."""
    by_layer: dict[int, list[int]] = {}
    for index, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(index)
    with HeadHooks(vlm, means=means) as hooks:
        state = _Knockouts(vlm, setup, heads, hooks, mode, alpha, batch_size, max_new_tokens)
        for layer, indices in by_layer.items():
            for start in range(0, len(indices), batch_size):
                state.verify_first(layer, indices[start:start + batch_size])
                state.flush()
        state.flush(everything=True)
    return state.replies  # type: ignore[return-value]


@torch.inference_mode()
def _continue(vlm, setup: GenerateSetup, group: list[_Row], hooks: HeadHooks, mode: str, alpha: float,
              max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding of diverged knockouts from their caches, batched, each row leaving the batch once its
    reply ends or its answer is decided."""
    item, enders, device = setup.item, vlm.end_token_ids, vlm.device
    cache, mask, _ = pack_caches([e.kv for e in group], max_new_tokens)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    # row r's next token sits at sequence index prompt_len + len(reply) - 1, i.e. offset len(reply)
    offsets = torch.tensor([[len(e.reply)] for e in group], device=device)
    replies = [list(e.reply) for e in group]
    finished = [False] * len(group)
    slots = list(range(len(group)))  # the group row in each batch slot; finished rows leave in batches
    coef = _coefficients(vlm, [e.head for e in group], alpha)
    tokens = torch.tensor([[e.reply[-1]] for e in group], device=device)
    hooks.set(coef, mode=mode)
    for step in range(max_new_tokens):
        hidden = vlm.text_model(input_ids=tokens, attention_mask=mask, position_ids=setup.positions(offsets + step),
                                use_cache=True, **{cache_argument(vlm.text_model): cache}).last_hidden_state
        chosen = vlm.lm_head(hidden[:, -1]).argmax(-1).tolist()
        growing = []
        for r, token in zip(slots, chosen):
            if finished[r]:
                continue
            if token in enders:
                finished[r] = True
            else:
                replies[r].append(token)
                growing.append(r)
        texts = vlm.tokenizer.batch_decode([replies[r] for r in growing], skip_special_tokens=True)
        for r, text in zip(growing, texts):
            finished[r] = len(replies[r]) >= max_new_tokens or item.decided(text)
        live = [slot for slot, r in enumerate(slots) if not finished[r]]
        if not live:
            break
        if len(live) <= 0.75 * len(slots):  # drop finished rows (copying the cache) once they are a quarter
            selected = torch.tensor(live, device=device)
            cache.batch_select_indices(selected)
            mask, offsets = mask[selected], offsets[selected]
            slots, chosen = [slots[s] for s in live], [chosen[s] for s in live]
            hooks.set(coef[slots], mode=mode)
        tokens = torch.tensor([[t] for t in chosen], device=device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return replies


def _decode_from_scratch(vlm, item: SweepItem, heads, alpha, batch_size, max_new_tokens) -> list[list[int]]:
    """Greedy replies with reference-mean knockouts, prefill included (that edit depends on the whole forward)."""
    batch = vlm.encode([(item.image, item.prompt)])
    out: list[list[int]] = []
    with HeadHooks(vlm) as hooks:
        for start in range(0, len(heads), batch_size):
            chunk = heads[start:start + batch_size]
            rows = _repeat_rows(batch, len(chunk))
            hooks.set(_coefficients(vlm, chunk, alpha), mode="reference-mean", row_mask=rows.attention_mask)
            out.extend(ids for ids, _ in _greedy(vlm, rows, max_new_tokens, [item.decided] * len(chunk)))
    return out


def _repeat_rows(batch, rows: int):
    """`rows` copies of a one-row batch (image tensors concatenated: Qwen flattens patches along dim 0)."""
    from halluscope.models.vlm import Batch

    inputs = {k: torch.cat([v] * rows) for k, v in batch.inputs.items()}
    return Batch(inputs, batch.image_mask.expand(rows, -1), batch.image_spans * rows)


# ---- the naive loops the engine must equal --------------------------------------------------------------
def naive_score(vlm, setup: ScoreSetup, heads: Iterable[tuple[int, int]], *, mode: str = "zero",
                alpha: float = 0.0, means: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One full forward per head and per word, with a freshly registered hook: the reference loop."""
    from halluscope.interventions.heads import intervene

    results = []
    for head in heads:
        per_input = []
        for slot, _, indices in setup.inputs():
            found = {}
            for index in indices:
                word = slot.words[index]
                batch = append_tokens(slot.batch, word.ids[:-1])
                with intervene(vlm, HeadIntervention({head}, mode=mode, alpha=alpha), means=means,
                               row_mask=setup.prompt_mask(batch)), torch.inference_mode():
                    window = vlm.forward(batch, use_cache=False).logits[:, -len(word.ids):]
                found.update(word_scores(window, slot.words, [index]))
            per_input.append(found)
        results.append(_score_rows(setup, per_input, 1)[0])
    return results


def naive_generate(vlm, item: SweepItem, heads: Iterable[tuple[int, int]], *, mode: str = "zero",
                   alpha: float = 0.0, means: torch.Tensor | None = None,
                   max_new_tokens: int = 50, stop: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """One generate per head at batch 1 with a freshly registered hook: the reference loop.

    `stop` defaults to the engine's rule (stop once the answer is decided); pass `lambda r: False` for the
    reference study's full-length generations.
    """
    from halluscope.interventions.heads import intervene

    results = []
    batch = vlm.encode([(item.image, item.prompt)])
    for head in heads:
        with intervene(vlm, HeadIntervention({head}, mode=mode, alpha=alpha), means=means,
                       row_mask=batch.attention_mask):
            ids = _greedy(vlm, batch, max_new_tokens, [stop or item.decided])[0][0]
        reply = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        answer, outcome = item.classify(reply)
        results.append({"reply": reply, "answer": answer, "outcome": outcome})
    return results
