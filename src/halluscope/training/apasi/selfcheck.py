"""APASI's `self-check` variant (ours, not the paper's): pairs made from what the model itself says is in the image.

The model is asked POPE's question about every object its description names ("Is there a star in the image?").
Two pairs come from each description:

- `self-check`: the chosen side is the description without the phrases that name an object the model doubts (a
  list item, or a whole sentence outside a list); the rejected side is the description itself. The rejected
  side's hallucinations are the model's own, the ones it names though it can tell they are absent.
- `omit`: the chosen side is that checked description, the rejected side the same with one phrase left out whose
  objects the model confirms. Without it every rejected side would name more objects than its chosen
  side and DPO could learn "name fewer objects" (the `insert` pairs' length signal, `inject.py`); with it, a
  shorter answer is preferred only where the left-out object is one the model doubts.

The check is `training.checks`: P(yes) for each object from the model's own wordings of "yes" and "no". An object
is doubted when P(yes) is below `doubt`: at 0.5 the objects the model would answer "no" about, higher to leave out
also those it is unsure of.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from halluscope.training.apasi.graph import Description
from halluscope.training.apasi.inject import render_list
from halluscope.training.apasi.sentences import Sentence, join_sentences
from halluscope.training.apasi.settings import DOUBT

__all__ = ["SELF_CHECK", "Phrase", "check_questions", "phrases", "read_answers", "self_check_texts",
           "without"]

#: The `--variant` value.
SELF_CHECK = "self-check"


class Phrase(NamedTuple):
    """A piece of a description that can be left out: item `item` of list sentence `sentence`, or the whole
    sentence (`item` None), and the objects it names."""

    sentence: int
    item: int | None
    objects: tuple[str, ...]


def phrases(description: Description) -> list[Phrase]:
    """The phrases of `description` that name objects, in order: every item of its list sentences and every other
    sentence that names an object."""
    found = []
    for k, named in enumerate(description.sentence_objects):
        listed = description.lists.get(k)
        if listed is not None:
            found += [Phrase(k, j, (obj,)) for j, obj in enumerate(listed.objects)]
        elif named:
            found.append(Phrase(k, None, tuple(named)))
    return found


def without(description: Description, left_out: Sequence[Phrase]) -> str:
    """The description with the `left_out` phrases removed: lists rewritten with the items that remain (a list
    with none left goes), other sentences dropped whole."""
    items_out: dict[int, set[int]] = {}
    sentences_out = set()
    for phrase in left_out:
        if phrase.item is None:
            sentences_out.add(phrase.sentence)
        else:
            items_out.setdefault(phrase.sentence, set()).add(phrase.item)
    kept: list[Sentence] = []
    for k, sentence in enumerate(description.sentences):
        if k in sentences_out:
            continue
        if k in items_out:
            listed = description.lists[k]
            keep = [j for j in range(len(listed.items)) if j not in items_out[k]]
            if not keep:
                continue
            listed = listed._replace(items=[listed.items[j] for j in keep], objects=[listed.objects[j] for j in keep])
            sentence = Sentence(render_list(listed), sentence.tail)
        kept.append(sentence)
    if kept and kept[0].text[:1].islower():
        kept[0] = Sentence(kept[0].text[0].upper() + kept[0].text[1:], kept[0].tail)
    return join_sentences(kept)


def check_questions(descriptions: Sequence[Description]) -> list[tuple[int, str]]:
    """(description index, object) for every distinct object each description names, in the order named."""
    return [(item, obj) for item, d in enumerate(descriptions) for obj in dict.fromkeys(d.objects)]


def read_answers(questions: Sequence[tuple[int, str]], p_yes: Sequence[float], doubt: float = DOUBT
                 ) -> dict[int, dict[str, str]]:
    """description index -> {object: "no" where P(yes) < `doubt`, else "yes"} for the `questions`."""
    answers: dict[int, dict[str, str]] = {}
    for (item, obj), p in zip(questions, p_yes, strict=True):
        answers.setdefault(item, {})[obj] = "no" if p < doubt else "yes"
    return answers


def self_check_texts(description: Description, answers: Mapping[str, str], rng: random.Random
                     ) -> dict[str, Any]:
    """The texts of a description's two pairs, or why each cannot be made.

    Returns:
        {"checked": the description less the phrases naming a doubted object (None when every phrase does),
         "doubted": the objects answered "no" that the description names, "omitted": the objects of the phrase
         left out of the omit pair's rejected side, "omit_rejected": that text (None when the checked description
         has fewer than two phrases), "reasons": keys of `inject.DROP_REASONS` for the pairs not made}.
    """
    found = phrases(description)
    doubted = [obj for obj in dict.fromkeys(o for p in found for o in p.objects) if answers.get(obj) == "no"]
    out_phrases = [p for p in found if set(p.objects) & set(doubted)]
    kept = [p for p in found if p not in out_phrases]
    reasons = []
    checked = without(description, out_phrases) if kept else None
    if not doubted:
        reasons.append("all_confirmed")
    elif checked is None:
        reasons.append("all_doubted")
    omit_rejected, omitted = None, []
    if len(kept) >= 2:
        left = rng.choice(kept)
        omitted = list(left.objects)
        omit_rejected = without(description, [*out_phrases, left])
    elif checked is not None:
        reasons.append("one_phrase")
    return {"checked": checked, "doubted": doubted, "omitted": omitted, "omit_rejected": omit_rejected,
            "reasons": reasons}
