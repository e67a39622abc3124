"""APASI's stage 2: which objects a model's own descriptions name, and which objects they name together.

Object mentions are CHAIR's (`metrics.chair.extract_objects`: the OPERA word extraction with the vocabulary that
fits the images, the scene shapes for synthetic scenes and the 80 COCO categories for COCO images), read per
sentence. The graph counts, over all descriptions, how many descriptions name each object and each pair of
objects, and keeps each object's neighbours sorted by co-count. Two more tables serve the `insert` variant: the
phrases with which the model itself names an object in its list sentences ("two blue squares"), and how often one
object is named before another (the model's own order of listing).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from halluscope.metrics.chair import extract_objects
from halluscope.metrics.nlp import NLPComponents
from halluscope.metrics.vocabulary import ObjectVocabulary
from halluscope.training.apasi.sentences import Sentence, split_sentences

__all__ = ["Description", "ListSentence", "MentionReader", "ObjectGraph", "build_graph", "inner_phrase",
           "read_description", "split_list"]

#: List items are separated by ", ", ", and " or " and ".
_ITEM_SEPARATOR = re.compile(r",\s+and\s+|,\s+|\s+and\s+")
#: What may open a list item that stands at the start of a sentence and can swap places with another item.
_ITEM_OPENERS = frozenset(("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                           "some", "several", "many", "few"))


class MentionReader:
    """CHAIR's object extraction with one vocabulary and NLP, remembered per text (descriptions repeat phrases).

    Example:
        >>> reader = MentionReader(vocabulary, nlp)  # doctest: +SKIP
        >>> reader.objects("A red circle and two moons.")  # doctest: +SKIP
        ('circle', 'crescent')
    """

    def __init__(self, vocabulary: ObjectVocabulary, nlp: NLPComponents, method: str = "opera") -> None:
        self.vocabulary, self.nlp, self.method = vocabulary, nlp, method
        self._seen: dict[str, tuple[str, ...]] = {}

    def objects(self, text: str) -> tuple[str, ...]:
        """The node word of every object mention in `text`, in order (repeats kept, as CHAIR counts them)."""
        if text not in self._seen:
            found = extract_objects(text, vocabulary=self.vocabulary, nlp=self.nlp, method=self.method)
            self._seen[text] = tuple(found.objects)
        return self._seen[text]


class ListSentence(NamedTuple):
    """A sentence that lists objects, "A red circle, two blue squares and a star.": its items, the one object each
    names, whether it writes ", and" before the last item, and the punctuation that ends it."""

    items: list[str]
    objects: list[str]
    oxford: bool
    end: str

    def can_open(self) -> bool:
        """Whether the first item is a bare noun phrase ("A red circle"), so another item may go before it."""
        first = self.items[0].split()[0].lower()
        return first in _ITEM_OPENERS or first.isdigit()


class Description(NamedTuple):
    """One description read for injection: its sentences, the objects each sentence names, the objects of the
    whole description, and its list sentences by sentence index."""

    sentences: list[Sentence]
    sentence_objects: list[tuple[str, ...]]
    objects: tuple[str, ...]
    lists: dict[int, ListSentence]


def split_list(sentence: str, reader: MentionReader) -> ListSentence | None:
    """The sentence as a list of object phrases, or None unless every item names exactly one object and ends with
    the word that names it ("two blue squares", not "a square on the left").

    Example:
        >>> split_list("A red circle, two blue squares and a star.", reader).items  # doctest: +SKIP
        ['A red circle', 'two blue squares', 'a star']
    """
    body = sentence.rstrip()
    end = body[-1] if body and body[-1] in ".!?" else ""
    body = body[: len(body) - len(end)].strip()
    items = [item.strip() for item in _ITEM_SEPARATOR.split(body)]
    if not items or any(not item for item in items):
        return None
    objects = []
    for item in items:
        named = reader.objects(item)
        tail = " ".join(item.split()[-2:])
        if len(named) != 1 or reader.objects(tail)[-1:] != named:
            return None
        objects.append(named[0])
    return ListSentence(items, objects, ", and " in body, end)


def read_description(text: str, reader: MentionReader) -> Description:
    """Split `text` into sentences and read the objects of each, of the whole, and of its list sentences."""
    sentences = split_sentences(text)
    per_sentence = [reader.objects(s.text) for s in sentences]
    lists = {k: found for k, s in enumerate(sentences) if (found := split_list(s.text, reader)) is not None}
    return Description(sentences, per_sentence, reader.objects(text), lists)


def inner_phrase(phrase: str) -> str:
    """A phrase as it reads inside a sentence: "Two blue squares" -> "two blue squares" (only a capital that
    starts a plain word is lowered, so "TV" stays).

    Example:
        >>> inner_phrase("A red circle"), inner_phrase("TV screen")
        ('a red circle', 'TV screen')
    """
    first = phrase.split(" ", 1)[0]
    plain = first[:1].isupper() and (len(first) == 1 or first[1:].islower())
    return phrase[0].lower() + phrase[1:] if plain else phrase


@dataclass(frozen=True)
class ObjectGraph:
    """Object statistics of a set of descriptions (stage 2).

    Args:
        vocabulary: the vocabulary's name ("shapes", "coco80").
        n_descriptions: how many descriptions were read.
        counts: object -> descriptions that name it (once per description).
        co_counts: object -> other object -> descriptions that name both.
        neighbours: object -> the objects named with it, most co-counted first (ties by name).
        phrasings: object -> every list item that names it alone, as written inside a sentence, one entry per use.
        order: object -> other object -> descriptions that name the first before the second (first mentions).
    """

    vocabulary: str
    n_descriptions: int
    counts: Mapping[str, int]
    co_counts: Mapping[str, Mapping[str, int]]
    neighbours: Mapping[str, Sequence[str]]
    phrasings: Mapping[str, Sequence[str]]
    order: Mapping[str, Mapping[str, int]]

    @property
    def nodes(self) -> list[str]:
        """The objects named at least once, most frequent first (ties by name)."""
        return sorted(self.counts, key=lambda o: (-self.counts[o], o))

    def to_dict(self) -> dict[str, Any]:
        """The graph as JSON-ready data (`graph.json`)."""
        return {"vocabulary": self.vocabulary, "n_descriptions": self.n_descriptions,
                "mean_objects_per_description": self.mean_objects(), "counts": dict(self.counts),
                "co_counts": {o: dict(c) for o, c in self.co_counts.items()},
                "neighbours": {o: list(n) for o, n in self.neighbours.items()},
                "phrasings": {o: list(p) for o, p in self.phrasings.items()},
                "order": {o: dict(c) for o, c in self.order.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectGraph:
        """The graph `to_dict` wrote."""
        return cls(data["vocabulary"], data["n_descriptions"], data["counts"], data["co_counts"],
                   data["neighbours"], data["phrasings"], data["order"])

    def mean_objects(self) -> float:
        """Mean number of distinct objects per description."""
        return sum(self.counts.values()) / self.n_descriptions if self.n_descriptions else 0.0


def build_graph(descriptions: Iterable[Description], vocabulary: str) -> ObjectGraph:
    """Count objects, co-occurrences, phrasings and listing order over `descriptions` (from `read_description`).

    Example:
        >>> graph = build_graph([read_description(t, reader) for t in texts], "shapes")  # doctest: +SKIP
        >>> graph.neighbours["circle"][:2]  # doctest: +SKIP
        ['square', 'bolt']
    """
    counts: Counter[str] = Counter()
    co_counts: dict[str, Counter[str]] = {}
    order: dict[str, Counter[str]] = {}
    phrasings: dict[str, list[str]] = {}
    n = 0
    for description in descriptions:
        n += 1
        named = list(dict.fromkeys(description.objects))  # distinct, in order of first mention
        counts.update(named)
        for k, a in enumerate(named):
            co = co_counts.setdefault(a, Counter())
            co.update(b for b in named if b != a)
            order.setdefault(a, Counter()).update(named[k + 1:])
        for listed in description.lists.values():
            for item, obj in zip(listed.items, listed.objects):
                phrasings.setdefault(obj, []).append(inner_phrase(item))
    neighbours = {o: sorted(c, key=lambda b: (-c[b], b)) for o, c in co_counts.items()}
    return ObjectGraph(vocabulary, n, dict(counts), {o: dict(c) for o, c in co_counts.items()}, neighbours,
                       phrasings, {o: dict(c) for o, c in order.items()})
