"""APASI's blind continuation: the model finishes each injected guide phrase as a text-only language model.

The model sees the description's prompt without its image, and as the open assistant turn the description up to
the guide phrase ("... In the background, a microwave is visible"); what it writes next comes from language
priors alone. Decoding follows the reference: greedy, at most 64 new tokens, repetition penalty 1.1, no end of
turn among the first 5 tokens, stopped at the first token that holds a '.', and cut after the first sentence end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from halluscope.errors import InputError
from halluscope.training.apasi.inject import Plan
from halluscope.training.apasi.sentences import Sentence, first_sentence, join_sentences

__all__ = ["CONTINUATION", "complete_plans", "continue_blind", "period_token_ids"]

#: The continuation's decoding, as the reference runs it.
CONTINUATION: dict[str, Any] = {"strategy": "greedy, text only (no image)", "max_new_tokens": 64,
                                "repetition_penalty": 1.1, "min_new_tokens": 5, "stop": "first token holding '.'"}


class _StopAtPeriod(StoppingCriteria):
    """Ends a row once its latest token holds a '.'."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.isin(input_ids[:, -1], self.token_ids.to(input_ids.device))


def period_token_ids(tokenizer) -> list[int]:
    """Ids of the vocabulary's tokens whose text holds a '.' (where a continuation stops)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, token in enumerate(tokens) if token and "." in token]


def continue_blind(vlm, prompts: Sequence[str], prefixes: Sequence[str], *, batch_size: int = 16,
                   max_new_tokens: int = 64, repetition_penalty: float = 1.1, min_new_tokens: int = 5) -> list[str]:
    """Each prefix's continuation by `vlm` as a text-only model: the user turn is the prompt without an image,
    the assistant turn is the prefix, left open. Returns the text after the prefix up to its first sentence end,
    unstripped (" on the counter.").

    Raises:
        InputError: prompts and prefixes of different lengths, or batch_size < 1.
    """
    if len(prompts) != len(prefixes) or batch_size < 1:
        raise InputError(f"{len(prompts)} prompts for {len(prefixes)} prefixes with batch_size {batch_size}; pass "
                         f"one prompt per prefix and batch_size >= 1")
    config = vlm.greedy_config(max_new_tokens)
    config.repetition_penalty, config.min_new_tokens = repetition_penalty, min_new_tokens
    stop = StoppingCriteriaList([_StopAtPeriod(period_token_ids(vlm.tokenizer))])
    texts = [_render(vlm, prompt, prefix) for prompt, prefix in zip(prompts, prefixes)]
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        inputs = vlm.processor(text=texts[start:start + batch_size], padding=True, return_tensors="pt")
        inputs = {k: v.to(vlm.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            ids = vlm.model.generate(**inputs, generation_config=config, stopping_criteria=stop)
        prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        for prompt, new in zip(prompt_ids, vlm.reply_ids(ids[:, inputs["input_ids"].shape[1]:])):
            out.append(first_sentence(_continuation(vlm, prompt, new)))
    return out


def _render(vlm, prompt: str, prefix: str) -> str:
    """The chat text of a text-only user turn and an open assistant turn that starts with `prefix`."""
    turn = vlm.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                             chat_template=vlm.chat_template, tokenize=False,
                                             add_generation_prompt=True)
    return turn + vlm.family.reply_separator + prefix.strip()


def _continuation(vlm, prompt: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add to the prompt, with the space that joins them kept (decoded in context, since
    some tokenizers drop a token's leading space when it is decoded alone)."""
    if new_ids and new_ids[-1] in vlm.end_token_ids:
        new_ids = new_ids[:-1]
    head = vlm.tokenizer.decode(prompt, skip_special_tokens=True)
    full = vlm.tokenizer.decode(prompt + new_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    alone = vlm.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    return alone if alone[:1] in ",;:." else " " + alone


def complete_plans(vlm, prompts: Sequence[str], plans: Sequence[Plan], *, batch_size: int = 16,
                   **settings: Any) -> list[str]:
    """The rejected text of each plan: its pending guide phrases continued in order, each continuation seeing the
    sentences before it as they stand (earlier injections included), later sentences kept as they were.

    `settings` go to `continue_blind` (max_new_tokens, repetition_penalty, min_new_tokens).
    """
    sentences = [list(plan.sentences) for plan in plans]
    for turn in range(max((len(plan.pending) for plan in plans), default=0)):
        rows = [(k, plan.pending[turn]) for k, plan in enumerate(plans) if len(plan.pending) > turn]
        prefixes = ["".join(s.text + s.tail for s in sentences[k][:index]) + sentences[k][index].text
                    for k, index in rows]
        endings = continue_blind(vlm, [prompts[k] for k, _ in rows], prefixes, batch_size=batch_size, **settings)
        for (k, index), ending in zip(rows, endings):
            text = (sentences[k][index].text + ending.rstrip()).strip()
            sentences[k][index] = Sentence(text if text.endswith(".") else text + ".", sentences[k][index].tail)
    return [join_sentences(s) for s in sentences]
