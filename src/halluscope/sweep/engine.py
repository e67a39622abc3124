"""Exact head-knockout sweeps, fast.

For one prompt and a grid of (layer, head) knockouts the engine gives the same answers as the naive loop
(one hook and one full forward or generate per head), for a fraction of the cost:

- score mode teacher-forces the clean reply up to the answer (the first number it states, or the first reply
  token when it states none) and reads the logits there, so one forward per knockout replaces a generate;
- the clean residual stream entering layer L is captured once per prompt and reused for every head of layer L
  (a knockout in layer L cannot change anything below it), so only layers L..end are recomputed;
- the knockouts of a layer run as the rows of one batch, each row carrying its own head mask;
- generate mode first checks, for every head at once, whether the knockout changes the clean greedy reply at
  all: one teacher-forced pass over the clean reply (layers L..end, prefix reused) gives each knockout's
  greedy token at every reply position. Rows that agree to the end have the clean reply; only rows that
  diverge are decoded further, batched, from their first differing token (greedy decoding is deterministic,
  so this is exact). Every row stops as soon as its answer is decided.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from num2words import num2words

from halluscope.answers import classify_reply, first_colour, parse_number
from halluscope.errors import InputError
from halluscope.interventions.heads import HeadHooks, HeadIntervention

__all__ = ["SweepItem", "answer_decided", "score_prompt", "generate_prompt", "naive_score", "naive_generate",
           "ScoreSetup", "prepare_score"]


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

    def classify(self, reply: str) -> tuple[Any, str]:
        """The parsed answer and outcome of a reply to this prompt."""
        return classify_reply(self.task, reply, self.truth, self.claim)

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
    """A prompt prepared for scoring: teacher-forced inputs per form group and the candidate token ids."""

    item: SweepItem
    clean_reply: str
    # one entry per distinct teacher-forced sequence: (batch, {form: (truth_id, claim_id)})
    groups: list[tuple[Any, dict[str, tuple[int, int]]]]


def _first_difference(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _answer_start(vlm, reply_ids: list[int], item: SweepItem) -> int | None:
    """Index of the reply token at which the reply's answer starts, or None if it states none."""
    for k in range(1, len(reply_ids) + 1):
        if item.classify(vlm.tokenizer.decode(reply_ids[:k], skip_special_tokens=True))[0] is not None:
            return k - 1
    return None


def _append(batch, ids: list[int]):
    """`batch` (one row) with `ids` appended as text tokens."""
    from halluscope.models.vlm import Batch

    if not ids:
        return batch
    extra = torch.tensor([ids], dtype=batch.input_ids.dtype, device=batch.input_ids.device)
    inputs = dict(batch.inputs)
    inputs["input_ids"] = torch.cat([batch.input_ids, extra], 1)
    inputs["attention_mask"] = torch.cat([batch.attention_mask, torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    mask = torch.cat([batch.image_mask, torch.zeros_like(extra, dtype=torch.bool)], 1)
    return Batch(inputs, mask, batch.image_spans)


def prepare_score(vlm, item: SweepItem, *, max_new_tokens: int = 50) -> ScoreSetup:
    """Generate the clean reply and build the teacher-forced inputs at which truth and claim are scored.

    For each answer form (digit, word) the scored position is the first sub-token where the truth's and the
    claim's spelling differ, after the clean reply's text that precedes its number.
    """
    if item.claim is None or item.claim == item.truth:
        raise InputError(f"{item.sample_id}: score mode needs a misleading prompt (claim != truth), got "
                         f"truth={item.truth} claim={item.claim}")
    batch = vlm.encode([(item.image, item.prompt)])
    reply_ids = _greedy(vlm, batch, max_new_tokens, item.decided)[0][0]
    reply = vlm.tokenizer.decode(reply_ids, skip_special_tokens=True)
    start = _answer_start(vlm, reply_ids, item)
    if start is None:  # no number: score the reply's first token
        context, sep = "", vlm.family.reply_separator
    else:
        context = vlm.tokenizer.decode(reply_ids[:start], skip_special_tokens=True)
        rest = reply[len(context):] if reply.startswith(context) else reply
        sep = rest[: len(rest) - len(rest.lstrip())]
    prompt_text = vlm.render(item.prompt)
    prompt_ids = vlm.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]

    def tail(n: int, spell: Callable[[int], str]) -> list[int]:
        full = vlm.tokenizer(prompt_text + context + sep + spell(n), add_special_tokens=False)["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:
            raise InputError(f"{item.sample_id}: the tokenizer merges the reply into the assistant prefix; "
                             f"score mode cannot place the answer, use --mode generate")
        return full[len(prompt_ids):]

    groups: dict[tuple[int, ...], dict[str, tuple[int, int]]] = {}
    for form, spell in item.spellings():
        t_ids, c_ids = tail(item.truth, spell), tail(item.claim, spell)
        n = _first_difference(t_ids, c_ids)
        if n >= min(len(t_ids), len(c_ids)):
            continue  # one spelling is a prefix of the other: no single position tells them apart
        groups.setdefault(tuple(t_ids[:n]), {})[form] = (t_ids[n], c_ids[n])
    if not groups:
        raise InputError(f"{item.sample_id}: truth {item.truth} and claim {item.claim} cannot be told apart by "
                         f"one token in this tokenizer; use --mode generate")
    return ScoreSetup(item, reply, [(_append(batch, list(forced)), forms) for forced, forms in groups.items()])


def _score_rows(logits: torch.Tensor, forms: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Per row of last-position logits: truth - claim logit per form and the argmax outcome."""
    rows = []
    for row in logits.float():
        out: dict[str, Any] = {}
        top = int(row.argmax())
        for form, (t, c) in forms.items():
            out[f"logit_diff_{form}"] = float(row[t] - row[c])
            if top == t:
                out["outcome"] = "corrected"
            elif top == c and out.get("outcome") != "corrected":
                out["outcome"] = "copied"
        out.setdefault("outcome", "other")
        rows.append(out)
    return rows


def _merge(per_group: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Combine per-group results (digit and word may be scored at different positions) row by row.

    A row is `corrected` if any form's argmax is the truth, else `copied` if any is the claim, else `other`.
    """
    rank = {"other": 0, "copied": 1, "corrected": 2}
    merged = []
    for rows in zip(*per_group):
        out: dict[str, Any] = {"outcome": "other"}
        for r in rows:
            out.update({k: v for k, v in r.items() if k != "outcome"})
            if rank[r["outcome"]] > rank[out["outcome"]]:
                out["outcome"] = r["outcome"]
        merged.append(out)
    return merged


class _LayerInputs:
    """Captures every decoder layer's input (hidden states and keyword arguments) during one clean forward."""

    def __init__(self, vlm) -> None:
        self.vlm = vlm
        self.inputs: list[tuple[tuple, dict]] = []

    @torch.inference_mode()
    def capture(self, batch) -> torch.Tensor:
        self.inputs = [None] * self.vlm.n_layers  # type: ignore[list-item]

        def grab(layer):
            def hook(module, args, kwargs):
                self.inputs[layer] = (args, kwargs)
            return hook

        handles = [l.register_forward_pre_hook(grab(i), with_kwargs=True) for i, l in enumerate(self.vlm.layers)]
        try:
            out = self.vlm.forward(batch, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        return out.logits[:, -1]

    @torch.inference_mode()
    def run_from(self, layer: int, rows: int, positions: int = 1) -> torch.Tensor:
        """Logits at the last `positions` positions after running layers `layer`..end on `rows` copies of the
        clean input: [rows, vocab] for one position, else [rows, positions, vocab]."""
        args, kwargs = self.inputs[layer]
        kwargs = dict(kwargs)
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        hidden = hidden.expand(rows, -1, -1)  # the other inputs have batch 1 and broadcast over the rows
        for i in range(layer, self.vlm.n_layers):
            hidden = self.vlm.layers[i](hidden, *args[1:], **kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        last = hidden[:, -1] if positions == 1 else hidden[:, -positions:]
        return self.vlm.lm_head(self.vlm.norm(last))


def score_prompt(vlm, setup: ScoreSetup, heads: Sequence[tuple[int, int]], *, mode: str = "zero",
                 alpha: float = 0.0, means: torch.Tensor | None = None,
                 batch_size: int = 16) -> list[dict[str, Any]]:
    """Score every knockout in `heads` on one prepared prompt; one result dict per head, in order."""
    by_layer: dict[int, list[int]] = {}
    for index, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(index)
    per_group: list[list[dict[str, Any]]] = []
    with HeadHooks(vlm, means=means) as hooks:
        for batch, forms in setup.groups:
            results: list[dict[str, Any]] = [{} for _ in heads]
            cache = _LayerInputs(vlm)
            hooks.clear()
            cache.capture(batch)
            for layer, indices in by_layer.items():
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    hooks.set(_coefficients(vlm, [heads[i] for i in chunk], alpha), mode=mode,
                              row_mask=batch.attention_mask.expand(len(chunk), -1))
                    for idx, res in zip(chunk, _score_rows(cache.run_from(layer, len(chunk)), forms)):
                        results[idx] = res
            per_group.append(results)
    return _merge(per_group)


# ---- generate mode --------------------------------------------------------------------------------------
def _enders(vlm) -> set[int]:
    """Tokens that end a reply: EOS, and the pad token generate() writes after a row has finished."""
    config = vlm.model.generation_config
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]) | {config.pad_token_id}


def _greedy(vlm, batch, max_new_tokens: int, stop: Callable[[str], bool],
            starts: Sequence[int] | None = None) -> list[tuple[list[int], int | None]]:
    """Greedy replies that stop once `stop(reply)` holds, at EOS, or at `max_new_tokens` reply tokens.

    A row's reply starts at `starts[row]` (default: after the prompt), so rows may carry forced reply tokens.
    Returns per row (reply ids, the EOS or pad token that ended it or None).
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    width = batch.seq_len
    starts = list(starts) if starts is not None else [width] * len(batch)
    tokenizer = vlm.tokenizer

    class Decided(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [len(row) - s >= max_new_tokens or stop(tokenizer.decode(row[s:], skip_special_tokens=True))
                    for row, s in zip(input_ids.tolist(), starts)]
            return torch.tensor(done, device=input_ids.device)

    budget = max_new_tokens - min(width - s for s in starts)
    with torch.inference_mode():
        out = vlm.model.generate(**batch.inputs, generation_config=vlm.greedy_config(max(1, budget)),
                                 stopping_criteria=StoppingCriteriaList([Decided()]))
    enders = _enders(vlm)
    rows = []
    for row, start in zip(out.tolist(), starts):
        reply, ended = [], None
        for token in row[start:][:max_new_tokens]:
            if token in enders:
                ended = token
                break
            reply.append(token)
        rows.append((reply, ended))
    return rows


def _with_replies(batch, replies: Sequence[Sequence[int]], pad: int):
    """An R-row batch of a one-row prompt batch, row r followed by `replies[r]`, left-padded.

    Returns the batch and each row's reply start.
    """
    from halluscope.models.vlm import Batch

    rows = len(replies)
    width = batch.seq_len + max(len(r) for r in replies)
    token_rows = {k: batch.inputs[k][0] for k in ("input_ids", "attention_mask", "mm_token_type_ids")
                  if k in batch.inputs}
    fills = {"input_ids": pad, "attention_mask": 0, "mm_token_type_ids": 0}
    inputs = {k: torch.full((rows, width), fills[k], dtype=v.dtype, device=v.device) for k, v in token_rows.items()}
    image_mask = torch.zeros(rows, width, dtype=torch.bool, device=batch.image_mask.device)
    starts = []
    for r, reply in enumerate(replies):
        offset = width - batch.seq_len - len(reply)
        extra = torch.tensor(list(reply), dtype=torch.long, device=batch.input_ids.device)
        inputs["input_ids"][r, offset:] = torch.cat([token_rows["input_ids"], extra])
        inputs["attention_mask"][r, offset:] = 1
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"][r, offset:offset + batch.seq_len] = token_rows["mm_token_type_ids"]
        image_mask[r, offset:offset + batch.seq_len] = batch.image_mask[0]
        starts.append(width - len(reply))
    for key, value in batch.inputs.items():
        if key not in inputs:  # image tensors: one copy per row (Qwen flattens patches along dim 0, so cat works)
            inputs[key] = torch.cat([value] * rows)
    return Batch(inputs, image_mask), starts


def _coefficients(vlm, heads: Sequence[tuple[int, int]], alpha: float) -> torch.Tensor:
    coef = torch.ones(len(heads), vlm.n_layers, vlm.n_heads)
    for row, (layer, head) in enumerate(heads):
        coef[row, layer, head] = alpha
    return coef


def generate_prompt(vlm, item: SweepItem, heads: Sequence[tuple[int, int]], *, mode: str = "zero",
                    alpha: float = 0.0, means: torch.Tensor | None = None, batch_size: int = 16,
                    max_new_tokens: int = 50) -> list[dict[str, Any]]:
    """Greedy replies with each knockout in `heads`, stopped once the answer is decided; one dict per head."""
    batch = vlm.encode([(item.image, item.prompt)])
    if mode == "reference-mean":  # its edit depends on which positions share a forward: decode step by step
        replies = _decode(vlm, item, batch, list(heads), [[] for _ in heads], mode, alpha, means, batch_size,
                          max_new_tokens)
    else:
        replies = _verify_then_decode(vlm, item, batch, list(heads), mode, alpha, means, batch_size, max_new_tokens)
    results = []
    for ids in replies:
        reply = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        answer, outcome = item.classify(reply)
        results.append({"reply": reply, "answer": answer, "outcome": outcome})
    return results


def _repeat(output: Any, rows: int) -> Any:
    """A vision-tower output for `rows` copies of its one image (tensors concatenated along dim 0)."""
    if isinstance(output, torch.Tensor):
        return torch.cat([output] * rows)
    if isinstance(output, dict):  # ModelOutput and plain dicts
        return type(output)(**{k: _repeat(v, rows) for k, v in output.items()})
    if isinstance(output, (tuple, list)):
        return type(output)(_repeat(v, rows) for v in output)
    return output


@contextmanager
def _vision_capture(vlm) -> Iterator[list]:
    """Record the vision tower's output of the forwards in the body (knockouts never change it)."""
    seen: list = []  # copies: some callers edit the returned output object in place (Qwen splits pooler_output)
    handle = vlm.vision_tower.register_forward_hook(lambda module, args, output: seen.append(_repeat(output, 1)))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def _vision_repeated(vlm, output: Any, rows: int) -> Iterator[None]:
    """Serve `output` repeated for `rows` images instead of running the vision tower again."""
    tower = vlm.vision_tower
    tower.forward = lambda *args, **kwargs: _repeat(output, rows)
    try:
        yield
    finally:
        del tower.forward


def _verify_then_decode(vlm, item, batch, heads, mode, alpha, means, batch_size, max_new_tokens) -> list[list[int]]:
    with _vision_capture(vlm) as vision:
        clean, ender = _greedy(vlm, batch, max_new_tokens, item.decided)[0]
    enders = _enders(vlm)
    sequence = clean + ([ender] if ender is not None else [])  # the tokens each knockout must reproduce
    replies: list[list[int] | None] = [None] * len(heads)
    pending: list[tuple[int, list[int]]] = []
    by_layer: dict[int, list[int]] = {}
    for index, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(index)
    with HeadHooks(vlm, means=means) as hooks:
        cache = _LayerInputs(vlm)
        cache.capture(_append(batch, sequence[:-1]))
        target = torch.tensor(sequence)
        for layer, indices in by_layer.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                hooks.set(_coefficients(vlm, [heads[i] for i in chunk], alpha), mode=mode)
                logits = cache.run_from(layer, len(chunk), positions=len(sequence))
                predicted = logits.view(len(chunk), len(sequence), -1).argmax(-1).cpu()
                for index, row in zip(chunk, predicted):
                    differs = (row != target).nonzero()
                    if len(differs) == 0:
                        replies[index] = list(clean)
                        continue
                    j = int(differs[0])
                    forced = sequence[:j] + [int(row[j])]
                    if forced[-1] in enders:
                        replies[index] = forced[:-1]
                    elif len(forced) >= max_new_tokens or item.decided(
                            vlm.tokenizer.decode(forced, skip_special_tokens=True)):
                        replies[index] = forced
                    else:
                        pending.append((index, forced))
    if pending:
        decoded = _decode(vlm, item, batch, [heads[i] for i, _ in pending], [f for _, f in pending], mode, alpha,
                          means, batch_size, max_new_tokens, vision=vision[0] if len(vision) == 1 else None)
        for (index, _), ids in zip(pending, decoded):
            replies[index] = ids
    return replies  # type: ignore[return-value]


def _decode(vlm, item, batch, heads, forced, mode, alpha, means, batch_size, max_new_tokens,
            vision: Any = None) -> list[list[int]]:
    """Greedy replies for knockouts `heads`, row r continuing from its forced reply tokens `forced[r]`.

    With `vision` (the tower's output for the prompt's image) the vision tower is not run again.
    """
    out: list[list[int]] = []
    pad = vlm.model.generation_config.pad_token_id
    with HeadHooks(vlm, means=means) as hooks:
        for start in range(0, len(heads), batch_size):
            rows, starts = _with_replies(batch, forced[start:start + batch_size], pad)
            hooks.set(_coefficients(vlm, heads[start:start + batch_size], alpha), mode=mode,
                      row_mask=rows.attention_mask)
            served = nullcontext() if vision is None else _vision_repeated(vlm, vision, len(rows))
            with served:
                out.extend(ids for ids, _ in _greedy(vlm, rows, max_new_tokens, item.decided, starts))
    return out


# ---- the naive loops the engine must equal --------------------------------------------------------------
def naive_score(vlm, setup: ScoreSetup, heads: Iterable[tuple[int, int]], *, mode: str = "zero",
                alpha: float = 0.0, means: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One full forward per head and per form group, with a freshly registered hook: the reference loop."""
    from halluscope.interventions.heads import intervene

    results = []
    for head in heads:
        parts = []
        for batch, forms in setup.groups:
            with intervene(vlm, HeadIntervention({head}, mode=mode, alpha=alpha), means=means,
                           row_mask=batch.attention_mask):
                with torch.inference_mode():
                    logits = vlm.forward(batch, use_cache=False).logits[:, -1]
            parts.append(_score_rows(logits, forms))
        results.append(_merge(parts)[0])
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
            ids = _greedy(vlm, batch, max_new_tokens, stop or item.decided)[0][0]
        reply = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        answer, outcome = item.classify(reply)
        results.append({"reply": reply, "answer": answer, "outcome": outcome})
    return results
