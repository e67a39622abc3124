"""Where a reply states its answer, and how likely the true and the prompted answer words are there.

The answer slot is the position that predicts the first token of the reply's answer word: the model is
teacher-forced through the clean reply up to (not into) that word. The truth and the claim are then scored as
whole words: the log-probability of each word's full token sequence from the slot, teacher-forced, so a word the
tokenizer splits ("white" -> ' ', 'w', 'hi', 't', 'e') is compared as a word, never as one glued piece.

A word's greedy outcome is read from the same logits: greedy decoding from the slot spells the word exactly when
the argmax at every position of its teacher-forced sequence is the word's next token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from halluscope.errors import InputError

__all__ = ["AnswerWord", "AnswerSlot", "place_answer", "word_scores", "slot_logprobs", "outcome_of", "append_tokens"]

ROLES = ("truth", "claim")


@dataclass(frozen=True)
class AnswerWord:
    """One spelling of one answer: `form` ("digit" or "word"), `role` ("truth" or "claim") and its token ids
    from the slot on (the leading space included where the tokenizer folds it into the word)."""

    form: str
    role: str
    ids: tuple[int, ...]


@dataclass
class AnswerSlot:
    """A teacher-forced context ending at the answer slot, and the words scored there.

    `batch` is the prompt plus the clean reply up to the answer word (its last position predicts the word's first
    token). `inputs` are the sequences that score the words: each is `batch` plus one word without its last token,
    with the indices of the words it scores (a word shorter than another that starts with it is read from the
    longer one's sequence, as the model is causal).
    """

    batch: Any
    words: list[AnswerWord]
    inputs: list[tuple[Any, list[int]]]

    def forms(self) -> dict[str, tuple[int, int]]:
        """Per form scored here: the token counts of the truth's and the claim's word."""
        sizes = {(w.form, w.role): len(w.ids) for w in self.words}
        return {form: (sizes[form, "truth"], sizes[form, "claim"]) for form, _ in sizes}

    def window(self, batch) -> int:
        """How many last positions of an input sequence score its words (from the slot to its end)."""
        return batch.seq_len - self.batch.seq_len + 1


def append_tokens(batch, ids: Sequence[int]):
    """`batch` (one row) with `ids` appended as text tokens."""
    from halluscope.models.vlm import Batch

    if not ids:
        return batch
    extra = torch.tensor([list(ids)], dtype=batch.input_ids.dtype, device=batch.input_ids.device)
    inputs = dict(batch.inputs)
    inputs["input_ids"] = torch.cat([batch.input_ids, extra], 1)
    inputs["attention_mask"] = torch.cat([batch.attention_mask, torch.ones_like(extra)], 1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    mask = torch.cat([batch.image_mask, torch.zeros_like(extra, dtype=torch.bool)], 1)
    return Batch(inputs, mask, batch.image_spans)


def _context(vlm, reply_ids: Sequence[int], parses: Callable[[str], bool]) -> tuple[str, str] | None:
    """(text before the answer word, whitespace between it and the word), or None if the reply states no answer.

    The answer word is the word that completes the first prefix of the reply that parses: its start is found
    in the text, so a word split into several tokens is placed at its first token, not its last.
    """
    for k in range(1, len(reply_ids) + 1):
        text = vlm.tokenizer.decode(list(reply_ids[:k]), skip_special_tokens=True)
        if parses(text):
            break
    else:
        return None
    end = len(text)
    while end > 0 and not text[end - 1].isalnum():
        end -= 1
    start = end
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    before = text[:start]
    context = before.rstrip()
    return context, before[len(context):]


def place_answer(vlm, item, batch, reply_ids: Sequence[int]) -> list[AnswerSlot]:
    """The answer slots of the clean reply `reply_ids` to `item` (a `SweepItem`; `batch` is its encoded prompt),
    with the truth's and the claim's spellings (`item.spellings()`) as whole words.

    Raises:
        InputError: the tokenizer merges the reply into the assistant prefix, or no spelling tells the truth
            from the claim.
    """
    found = _context(vlm, reply_ids, lambda text: item.classify(text)[0] is not None)
    context, sep = found if found is not None else ("", vlm.family.reply_separator)  # no answer: the first token
    prompt_text = vlm.render(item.prompt)
    prompt_ids = vlm.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    lead = context + sep

    def tail(word: str) -> list[int]:
        full = vlm.tokenizer(prompt_text + lead + word, add_special_tokens=False)["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:
            raise InputError(f"{item.sample_id}: the tokenizer merges the reply into the assistant prefix; "
                             f"score mode cannot place the answer, use --mode generate")
        return full[len(prompt_ids):]

    by_prefix: dict[tuple[int, ...], list[AnswerWord]] = {}
    for form, spell in item.spellings():
        truth, claim = tail(spell(item.truth)), tail(spell(item.claim))
        shared = 0
        while shared < min(len(truth), len(claim)) and truth[shared] == claim[shared]:
            shared += 1
        # back to the word's first token: the forced tokens hold the context and separator only
        while shared and not lead.startswith(vlm.tokenizer.decode(truth[:shared], skip_special_tokens=True)):
            shared -= 1
        if truth[shared:] == claim[shared:] or not truth[shared:] or not claim[shared:]:
            continue
        words = by_prefix.setdefault(tuple(truth[:shared]), [])
        words += [AnswerWord(form, "truth", tuple(truth[shared:])), AnswerWord(form, "claim", tuple(claim[shared:]))]
    if not by_prefix:
        raise InputError(f"{item.sample_id}: truth {item.truth} and claim {item.claim} have the same tokens in "
                         f"every spelling; score mode cannot tell them apart, use --mode generate")
    return [_slot(append_tokens(batch, list(prefix)), words) for prefix, words in by_prefix.items()]


def _slot(batch, words: list[AnswerWord]) -> AnswerSlot:
    """The slot at the end of `batch` with the fewest input sequences that score all `words`."""
    inputs: list[tuple[tuple[int, ...], list[int]]] = []
    for index in sorted(range(len(words)), key=lambda i: -len(words[i].ids)):
        forced = words[index].ids[:-1]
        host = next((entry for entry in inputs if entry[0][: len(forced)] == forced), None)
        if host is None:
            inputs.append((forced, [index]))
        else:
            host[1].append(index)
    return AnswerSlot(batch, words, [(append_tokens(batch, list(forced)), sorted(indices))
                                     for forced, indices in inputs])


def word_scores(window: torch.Tensor, words: Sequence[AnswerWord],
                indices: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per word index: (log-probability of the whole word [rows], whether greedy decoding spells it [rows]),
    from logits `window` [rows, positions, vocab] whose first position is the slot."""
    logp = window.float().log_softmax(-1)
    top = window.argmax(-1)
    out = {}
    for index in indices:
        ids = torch.tensor(words[index].ids, device=window.device)
        n = len(ids)
        picked = logp[:, :n].gather(-1, ids.expand(logp.shape[0], n).unsqueeze(-1)).squeeze(-1)
        out[index] = (picked.sum(-1), (top[:, :n] == ids).all(-1))
    return out


def slot_logprobs(slot: AnswerSlot, window_of: Callable[[Any, int], torch.Tensor]
                  ) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
    """Per (form, role): the whole word's log-probability [rows]; and the logits at the slot [rows, vocab].

    `window_of(batch, m)` gives the logits [rows, m, vocab] of the last m positions of an input sequence, from a
    forward under whatever edits the caller has active (rows: e.g. one per lens layer).
    """
    scores, first = {}, None
    for batch, indices in slot.inputs:
        window = window_of(batch, slot.window(batch))
        first = window[:, 0] if first is None else first
        for index, (logp, _) in word_scores(window, slot.words, indices).items():
            scores[slot.words[index].form, slot.words[index].role] = logp
    return scores, first


def outcome_of(truth: AnswerWord, claim: AnswerWord, follows_truth: bool, follows_claim: bool) -> str:
    """"corrected" if greedy decoding spells the truth, "copied" if the claim, else "other". When one word's
    tokens start the other's, spelling the longer one decides."""
    order = [("corrected", truth, follows_truth), ("copied", claim, follows_claim)]
    order.sort(key=lambda entry: -len(entry[1].ids))
    return next((name for name, _, follows in order if follows), "other")
