"""APASI's stage 3 without the model: which hallucination goes where in a rejected response.

Three variants build a plan from one description (`graph.read_description`) and the object graph:

- `replace` (the reference's): about a fifth of the sentences, never the first and later ones more often, are
  replaced by a guide phrase naming an object the description does not name but that its remaining objects are
  often named with ("In the background, a microwave is visible"). The model then finishes each guide phrase
  without the image (`continuation.complete_plans`).
- `insert` (ours, for short list-style descriptions such as "A red circle, two blue squares and a star.", which
  have too few sentences to replace one): one phrase naming such an absent object goes into a list sentence, at
  the place where the model itself would list that object (from the graph's order counts; any boundary when it
  has none), in words the model itself uses for the object elsewhere ("two green stars"), and the list is
  rewritten with its commas and "and". The rejected side so stays in the model's own style and differs from the
  chosen side only by the inserted object.
- `swap` (ours, the list form of `replace`): an item of a list sentence other than the first is taken out and an
  absent object goes in as with `insert`, so both sides name as many objects. An inserted pair always names one
  object more on the rejected side, which DPO can also read as "name fewer objects"; swapped pairs leave out that
  signal, as the reference's replaced sentences do.

A plan that cannot be made names why (`DROP_REASONS`); the data step drops that description.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

from halluscope.errors import InputError
from halluscope.metrics.vocabulary import ObjectVocabulary
from halluscope.training.apasi.graph import Description, ListSentence, ObjectGraph, inner_phrase
from halluscope.training.apasi.sentences import Sentence, choose_sentences, replace_count

__all__ = ["DROP_REASONS", "GUIDE_TEMPLATES", "VARIANTS", "Plan", "choose_guide", "choose_position",
           "guide_candidates", "insert_item", "plan_injection", "plan_insert", "plan_replace", "plan_swap",
           "render_list", "surface_words", "with_article"]

#: `--variant` values: "auto" replaces where the rate leaves at least one sentence to replace, else inserts.
VARIANTS = ("auto", "replace", "insert", "swap")

#: Guide phrases that open an injected sentence; "{}" takes the object with its article ("a microwave").
GUIDE_TEMPLATES: tuple[str, ...] = (
    "There is also {} in the picture",
    "{} can be seen as well",
    "In the background, {} is visible",
    "Near the edge of the image, {} appears",
    "Next to it, there is {}",
    "{} is also present",
    "On one side, {} can be noticed",
    "Toward the bottom, {} is shown",
    "Close to the middle, {} stands out",
    "The image also contains {}",
    "Further back, {} is placed",
    "At the top, {} can be spotted",
    "Beside the other objects, {} sits",
    "One can also make out {}",
    "Partly hidden, {} is there too",
    "In one corner, {} is located",
    "Along with these, {} is included",
    "Slightly to the left, {} is drawn",
    "To the right, {} can be found",
    "A closer look reveals {}",
)

#: Why a description gives no pair.
DROP_REASONS = {
    "few_sentences": "too few sentences for the replace rate",
    "nothing_left": "no object left outside the replaced sentences",
    "no_absent_object": "no absent object in the graph",
    "no_list": "no list sentence to insert into",
    "short_list": "no list sentence of two or more items to swap an item of",
    "not_injected": "the rejected text does not name the injected object, or equals the chosen one",
    "all_confirmed": "self-check: the model confirms every object its description names",
    "all_doubted": "self-check: the model doubts every object its description names",
    "one_phrase": "omit: fewer than two confirmed phrases, so none can be left out",
}


class Plan(NamedTuple):
    """A rejected response in the making: the description's sentences with the injections in place.

    `pending` lists the sentences (replace variant) that hold a guide phrase still to be continued by the model;
    the insert variant's plan is finished (`pending` empty). `guides` are the injected objects (node words).
    """

    variant: str
    guides: list[str]
    sentences: list[Sentence]
    pending: list[int]


def with_article(word: str) -> str:
    """The word with its indefinite article: "an apple", "a star"."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def surface_words(vocabulary: ObjectVocabulary) -> dict[str, list[str]]:
    """Each node word's synonyms that can name it in a guide phrase (lower-case, no stray spaces)."""
    words: dict[str, list[str]] = {}
    for word, node in vocabulary.synonyms.items():
        if word == word.strip() and word == word.lower():
            words.setdefault(node, []).append(word)
    return words


def guide_candidates(graph: ObjectGraph, key: str, present: Collection[str], top_k: int) -> list[str]:
    """The up to `top_k` objects most often named with `key` that `present` does not hold, most co-counted first.

    Example:
        >>> guide_candidates(graph, "circle", {"circle", "square"}, 2)  # doctest: +SKIP
        ['bolt', 'crescent']
    """
    return [o for o in graph.neighbours.get(key, ()) if o not in present][:top_k]


def choose_guide(graph: ObjectGraph, remaining: Sequence[str], present: Collection[str], rng: random.Random,
                 top_k: int) -> str | None:
    """An object to inject: one of the `top_k` absent co-occurrers of a random remaining object, else any absent
    object of the graph, else None. Present objects are never chosen (the reference's fallback may choose one)."""
    key = rng.choice(sorted(set(remaining)))
    candidates = guide_candidates(graph, key, present, top_k)
    if not candidates:
        candidates = [o for o in graph.nodes if o not in present]
    return rng.choice(candidates) if candidates else None


def plan_replace(description: Description, graph: ObjectGraph, words: Mapping[str, Sequence[str]],
                 rng: random.Random, *, rate: float, top_k: int, skip: int = 1) -> Plan | str:
    """The replace variant's plan, or the key of `DROP_REASONS` that stops it.

    round(rate * n) sentences (`replace_count`) other than the first `skip` are drawn (`choose_sentences`); each
    becomes a guide phrase (a random template of `GUIDE_TEMPLATES` with a random synonym of the guide object),
    keeping the whitespace that followed the sentence.
    """
    n = len(description.sentences)
    count = replace_count(n, rate, skip=skip)
    if not count:
        return "few_sentences"
    chosen = choose_sentences(n, count, rng, skip=skip)
    remaining = [o for k, found in enumerate(description.sentence_objects) if k not in chosen for o in found]
    if not remaining:
        return "nothing_left"
    sentences, guides = list(description.sentences), []
    for k in chosen:
        guide = choose_guide(graph, remaining, {*description.objects, *guides}, rng, top_k)
        if guide is None:
            return "no_absent_object"
        phrase = rng.choice(GUIDE_TEMPLATES).format(with_article(rng.choice(words.get(guide) or [guide])))
        sentences[k] = Sentence(phrase[0].upper() + phrase[1:], sentences[k].tail)
        guides.append(guide)
    return Plan("replace", guides, sentences, chosen)


def choose_position(listed: ListSentence, guide: str, order: Mapping[str, Mapping[str, int]],
                    rng: random.Random) -> int:
    """Where in the list the guide object goes: the boundary (0 = before the first item, k = after item k) that
    agrees with most of the model's own orderings of the guide and the listed objects, a random one among ties.
    Boundary 0 is allowed only before a bare noun phrase ("A red circle", not "The image shows a circle").

    Example:
        >>> choose_position(ListSentence(["A circle", "a star"], ["circle", "star"], False, "."), "square",
        ...                 {"circle": {"square": 5}, "square": {"star": 5}}, random.Random(0))
        1
    """
    allowed = ([0] if listed.can_open() else []) + list(range(1, len(listed.items) + 1))

    def agreement(j: int) -> int:
        before = sum(order.get(o, {}).get(guide, 0) for o in listed.objects[:j])
        after = sum(order.get(guide, {}).get(o, 0) for o in listed.objects[j:])
        return before + after

    best = max(agreement(j) for j in allowed)
    return rng.choice([j for j in allowed if agreement(j) == best])


def insert_item(listed: ListSentence, position: int, phrase: str, obj: str) -> ListSentence:
    """The list with `phrase` (naming `obj`) as its item number `position`."""
    if not 0 <= position <= len(listed.items):
        raise InputError(f"position {position} is outside the list of {len(listed.items)} items; "
                         f"pass 0..{len(listed.items)}")
    return listed._replace(items=[*listed.items[:position], phrase, *listed.items[position:]],
                           objects=[*listed.objects[:position], obj, *listed.objects[position:]])


def render_list(listed: ListSentence) -> str:
    """The list sentence written out: "A, B and C." (", and" when the sentence used it), its first item
    capitalised and the others as they read inside a sentence.

    Example:
        >>> render_list(ListSentence(["a star", "A red circle", "two squares"], ["star", "circle", "square"],
        ...                          False, "."))
        'A star, a red circle and two squares.'
    """
    items = [inner_phrase(item) for item in listed.items]
    items[0] = items[0][0].upper() + items[0][1:]
    if len(items) == 1:
        return items[0] + listed.end
    return ", ".join(items[:-1]) + (", and " if listed.oxford else " and ") + items[-1] + listed.end


def plan_insert(description: Description, graph: ObjectGraph, rng: random.Random, *, top_k: int,
                count: int = 1) -> Plan | str:
    """The insert variant's plan (finished), or the key of `DROP_REASONS` that stops it.

    A random list sentence of the description receives `count` absent objects (`choose_guide`), each as one of
    the model's own phrasings of it (`ObjectGraph.phrasings`, "a <name>" when it never listed it) at the
    boundary `choose_position` picks.
    """
    if not description.lists:
        return "no_list"
    index = rng.choice(sorted(description.lists))
    return _fill_list(description, index, description.lists[index], graph, rng, "insert", top_k=top_k, count=count,
                      keys=description.objects)


def plan_swap(description: Description, graph: ObjectGraph, rng: random.Random, *, top_k: int,
              count: int = 1) -> Plan | str:
    """The swap variant's plan (finished), or the key of `DROP_REASONS` that stops it: the list form of the
    reference's sentence replacement.

    In a random list sentence of two or more items, `count` items other than the first (at most all but it) are
    taken out, and as many absent objects co-occurring with the objects left (`choose_guide`) go in as with
    `plan_insert`. The rejected side so names as many objects as the chosen side and differs in which: an inserted
    pair always names one object more, and DPO on it also learns to name fewer objects.
    """
    lists = {k: listed for k, listed in description.lists.items() if len(listed.items) > 1}
    if not lists:
        return "short_list"
    index = rng.choice(sorted(lists))
    listed = lists[index]
    out = set(rng.sample(range(1, len(listed.items)), min(count, len(listed.items) - 1)))
    kept = listed._replace(items=[item for k, item in enumerate(listed.items) if k not in out],
                           objects=[obj for k, obj in enumerate(listed.objects) if k not in out])
    taken = {listed.objects[k] for k in out}
    keys = [obj for obj in description.objects if obj not in taken] or kept.objects
    return _fill_list(description, index, kept, graph, rng, "swap", top_k=top_k, count=len(out), keys=keys)


def _fill_list(description: Description, index: int, listed: ListSentence, graph: ObjectGraph, rng: random.Random,
               variant: str, *, top_k: int, count: int, keys: Sequence[str]) -> Plan | str:
    """Put `count` absent objects co-occurring with `keys` into `listed` (sentence `index` of the description), each
    in the model's own words at the boundary `choose_position` picks; the finished plan, or "no_absent_object"."""
    guides: list[str] = []
    for _ in range(count):
        guide = choose_guide(graph, keys, {*description.objects, *guides}, rng, top_k)
        if guide is None:
            break
        phrase = rng.choice(list(graph.phrasings.get(guide) or [with_article(guide)]))
        listed = insert_item(listed, choose_position(listed, guide, graph.order, rng), phrase, guide)
        guides.append(guide)
    if not guides:
        return "no_absent_object"
    sentences = list(description.sentences)
    sentences[index] = Sentence(render_list(listed), sentences[index].tail)
    return Plan(variant, guides, sentences, [])


def plan_injection(description: Description, graph: ObjectGraph, words: Mapping[str, Sequence[str]],
                   rng: random.Random, *, variant: str, rate: float, top_k: int, objects: int = 1) -> Plan | str:
    """The plan of `variant` ("auto": replace when `replace_count` leaves a sentence to replace, else insert), or
    the key of `DROP_REASONS` that stops it.

    Raises:
        InputError: an unknown variant.
    """
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if variant == "replace" or (variant == "auto" and replace_count(len(description.sentences), rate)):
        return plan_replace(description, graph, words, rng, rate=rate, top_k=top_k)
    if variant == "swap":
        return plan_swap(description, graph, rng, top_k=top_k, count=objects)
    return plan_insert(description, graph, rng, top_k=top_k, count=objects)
