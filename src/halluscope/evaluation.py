"""Baseline evaluation: batched greedy replies to every sample, parsed and classified.

`evaluate` returns the whole table; `iter_evaluate` yields it chunk by chunk so the CLI can store finished
chunks and resume after a crash.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable, Iterator, Sequence

import pandas as pd

from halluscope.answers import classify_reply
from halluscope.errors import InputError
from halluscope.images import open_image
from halluscope.tasks.sample import Sample

__all__ = ["BASELINE_COLUMNS", "evaluate", "iter_evaluate", "iter_replies", "classify", "readable_samples",
           "vlm_object_namer"]

BASELINE_COLUMNS = ("sample_id", "image_id", "task", "condition", "object", "truth", "claim", "prompt", "reply",
                    "answer", "outcome", "reply_ids")


def classify(sample: Sample, reply: str) -> tuple[object, str]:
    """The parsed answer and outcome ("copied", "corrected", "other", "none", "negated") of a reply."""
    truth = sample.truth if sample.task == "count" else (sample.truth, *sample.truth_aliases)
    return classify_reply(sample.task, reply, truth, sample.claim, sample.object)


def readable_samples(samples: Sequence[Sample]) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Split samples into those whose image decodes and (sample_id, reason) for those that do not."""
    ok, bad = [], []
    decoded: dict[object, str | None] = {}
    for sample in samples:
        key = sample.image if isinstance(sample.image, str) else hash(sample.image)
        if key not in decoded:
            try:
                open_image(sample.image)
                decoded[key] = None
            except InputError as exc:
                decoded[key] = str(exc)
        (bad.append((sample.id, decoded[key])) if decoded[key] else ok.append(sample))
    return ok, bad


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(BASELINE_COLUMNS))
    if len(frame) and frame["task"].iloc[0] == "count":
        for column in ("truth", "claim", "answer"):
            frame[column] = frame[column].astype("Int64")
    return frame


def iter_replies(vlm, pairs: Sequence[tuple[object, str]], *, batch_size: int = 8, max_new_tokens: int = 50,
                 intervention=None, means=None, method=None) -> Iterator[list[tuple[str, list[int]]]]:
    """Yield the greedy (reply text, reply token ids) of each batch of (image, prompt) `pairs`, in order.

    With `intervention` (a `HeadIntervention`) the replies are generated with those heads edited (`means` for
    mode "mean"); with `method` (a `halluscope.decoding` method) they are decoded under it.

    Raises:
        InputError: batch_size < 1, or a pair `VLM.encode` refuses.
    """
    from halluscope.decoding.api import mitigate
    from halluscope.interventions.heads import intervene

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(pairs), batch_size):
        with nullcontext() if method is None else mitigate(vlm, method):
            batch = vlm.encode(list(pairs[start:start + batch_size]))
            edit = nullcontext() if intervention is None else intervene(vlm, intervention, means=means,
                                                                          row_mask=batch.attention_mask)
            with edit:
                ids = vlm.generate_ids(batch, max_new_tokens=max_new_tokens)
        yield list(zip(vlm.decode(ids), vlm.reply_ids(ids)))


def iter_evaluate(vlm, samples: Sequence[Sample], *, batch_size: int = 8, max_new_tokens: int = 50,
                  intervention=None, means=None, method=None) -> Iterator[pd.DataFrame]:
    """Yield the rows of each batch of `samples` (greedy decoding), in order.

    With `intervention` (a `HeadIntervention`) the replies are generated with those heads edited; with `method`
    they are decoded under that mitigation method.
    """
    pairs = [(s.image, s.prompt) for s in samples]
    start = 0
    for replies in iter_replies(vlm, pairs, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                intervention=intervention, means=means, method=method):
        chunk = samples[start:start + len(replies)]
        start += len(replies)
        rows = []
        for sample, (reply, reply_ids) in zip(chunk, replies):
            answer, outcome = classify(sample, reply)
            rows.append({"sample_id": sample.id, "image_id": sample.image_id, "task": sample.task,
                         "condition": sample.condition, "object": sample.object, "truth": sample.truth,
                         "claim": sample.claim, "prompt": sample.prompt, "reply": reply, "answer": answer,
                         "outcome": outcome, "reply_ids": reply_ids})
        yield _frame(rows)


def evaluate(vlm, samples: Sequence[Sample], *, batch_size: int = 8, max_new_tokens: int = 50,
             intervention=None, means=None, method=None) -> pd.DataFrame:
    """Greedy replies to every sample, parsed and classified: one row per sample (`BASELINE_COLUMNS`).

    Samples whose image cannot be decoded are skipped with a warning that names them. Pass a
    `HeadIntervention` to evaluate with heads knocked out (`means` for mode "mean"), or a decoding `method`
    (`halluscope.decoding.build_method("vcd")`) to decode under it.

    Example:
        >>> table = halluscope.evaluate(vlm, halluscope.tasks.synthetic_counting(10))
    """
    ok, bad = readable_samples(samples)
    if bad:
        warnings.warn(f"skipped {len(bad)} samples with unreadable images: " +
                      "; ".join(f"{sid}: {why}" for sid, why in bad[:5]), stacklevel=2)
    parts = list(iter_evaluate(vlm, ok, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               intervention=intervention, means=means, method=method))
    return pd.concat(parts, ignore_index=True) if parts else _frame([])


def vlm_object_namer(vlm, *, batch_size: int = 8) -> Callable[[list], list[str]]:
    """A `name_objects` callable for the CountBench loader that asks the VLM itself what is repeated.

    It replaces the reference study's GPT-4o call: the reply's last word, lowercased, is the noun.
    """
    question = ("What kind of object appears several times in this image? Answer with one word, a plural noun.")

    def name(images: list) -> list[str]:
        nouns = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            replies = vlm.generate(vlm.encode([(img, question) for img in chunk]), max_new_tokens=8)
            for reply in replies:
                words = [w.strip(".,!?;:\"'").lower() for w in reply.split()]
                words = [w for w in words if w.isalpha()]
                nouns.append(words[-1] if words else "objects")
        return nouns

    return name
