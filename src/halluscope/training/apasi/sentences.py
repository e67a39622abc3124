"""Sentence-level choices of APASI's `replace` variant: where a description splits into sentences, how many of them
are replaced, and which ones (later sentences more often, since hallucinations gather late in long descriptions).

Each sentence keeps the whitespace that followed it, so a description rebuilt from its sentences is the
description itself, and a rejected response differs from its chosen one only in the replaced sentences (the
reference strips the sentences and joins them with one space, so its rejected side also loses paragraph breaks).
"""

from __future__ import annotations

import math
import random
import re
from typing import NamedTuple

from halluscope.errors import InputError

__all__ = ["Sentence", "choose_sentences", "first_sentence", "join_sentences", "replace_count", "sentence_weights",
           "split_sentences"]

#: A sentence ends at a '.' with no digit right before or after it, so "3.5" stays in one sentence.
_END = re.compile(r"(?<!\d)\.(?!\d)")


class Sentence(NamedTuple):
    """One sentence of a description: its text (stripped, the '.' kept) and the whitespace after it."""

    text: str
    tail: str


def split_sentences(text: str) -> list[Sentence]:
    """Split a description at every '.' not next to a digit; '!' and '?' do not split.

    Text after the last '.' is a sentence of its own; pieces that are only whitespace are dropped.

    Example:
        >>> [s.text for s in split_sentences("A cat is 2.5 m long. It sleeps.\\n\\nA dog")]
        ['A cat is 2.5 m long.', 'It sleeps.', 'A dog']
    """
    pieces, start = [], 0
    for end in [m.end() for m in _END.finditer(text)] + [len(text)]:
        pieces.append(text[start:end])
        start = end
    sentences: list[Sentence] = []
    for piece in pieces:
        body = piece.lstrip()
        if sentences:  # the whitespace that opens a piece follows the sentence before it
            sentences[-1] = Sentence(sentences[-1].text, sentences[-1].tail + piece[: len(piece) - len(body)])
        if body.strip():
            sentences.append(Sentence(body.strip(), body[len(body.rstrip()):]))
    return sentences


def join_sentences(sentences: list[Sentence]) -> str:
    """The text of `sentences`, each followed by its own whitespace, without whitespace at the end; it gives back
    the description `split_sentences` split (less its outer whitespace).

    Example:
        >>> join_sentences(split_sentences("One. Two.\\n\\nThree. "))
        'One. Two.\\n\\nThree.'
    """
    return "".join(s.text + s.tail for s in sentences).rstrip()


def first_sentence(text: str) -> str:
    """`text` up to and including its first sentence-ending '.' (all of it when it has none), unstripped.

    Example:
        >>> first_sentence(" on a 2.5 m table. Then more")
        ' on a 2.5 m table.'
    """
    end = _END.search(text)
    return text[: end.end()] if end else text


def replace_count(n_sentences: int, rate: float, *, skip: int = 1) -> int:
    """How many of `n_sentences` to replace: round(rate * n) (Python's round), or 0 when that is below 1 or
    leaves fewer than `skip` sentences untouched (the reference drops such descriptions).

    Example:
        >>> [replace_count(n, 0.2) for n in (2, 3, 7, 8, 13)]
        [0, 1, 1, 2, 3]
    """
    if not 0.0 < rate < 1.0:
        raise InputError(f"replace rate {rate!r}; expected a fraction strictly between 0 and 1, e.g. 0.2")
    count = round(rate * n_sentences)
    return count if 1 <= count <= n_sentences - skip else 0


def sentence_weights(n_sentences: int, *, skip: int = 1) -> list[float]:
    """Sampling weights of the candidate sentences `skip`..n-1: w_i = a*sqrt(i) + b with a = 1/(sqrt(n-1) - 1),
    b = 1 - a, rising from 1 at i = 1 to 2 at i = n-1 in a square-root shape (equal weights when one or two
    candidates would make a undefined).

    Example:
        >>> [round(w, 3) for w in sentence_weights(5)]
        [1.0, 1.414, 1.732, 2.0]
    """
    candidates = range(skip, n_sentences)
    last = n_sentences - 1
    if last < 2:
        return [1.0 for _ in candidates]
    a = 1.0 / (math.sqrt(last) - 1.0)
    return [a * math.sqrt(i) + 1.0 - a for i in candidates]


def choose_sentences(n_sentences: int, count: int, rng: random.Random, *, skip: int = 1) -> list[int]:
    """`count` distinct sentence indices from skip..n-1, drawn one after another with `sentence_weights`
    (without replacement, as `torch.multinomial` draws), sorted.

    Raises:
        InputError: more indices asked for than there are candidates.
    """
    candidates = list(range(skip, n_sentences))
    if count > len(candidates):
        raise InputError(f"cannot replace {count} of {n_sentences} sentences when the first {skip} are kept; "
                         f"use replace_count() to size the draw")
    weights = sentence_weights(n_sentences, skip=skip)
    chosen = []
    for _ in range(count):
        k = rng.choices(range(len(candidates)), weights=weights)[0]
        chosen.append(candidates.pop(k))
        weights.pop(k)
    return sorted(chosen)
