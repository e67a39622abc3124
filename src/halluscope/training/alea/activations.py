"""The activation dataset: pairs of a grounded and a hallucinated response to one (image, prompt), made from the
model's own replies on images with COCO-style ground truth (ALEAHallu's "activate" stage, B.2.1 of the spec,
with what we have offline in place of GPT-written captions).

- caption pairs: the model's caption of an image that names an object the image does not hold (CHAIR's test) is
  the hallucinated response; the same caption with every clause naming such an object removed, and (`complete`)
  the present objects it left out added to its last list, is the grounded one (kept only when it names an object
  and no absent one). Without the added objects the grounded captions are only ever shorter, and an edit learns
  to say less rather than to look.
  With `confirmed` (`alea locate --doubt`), the absent objects the model itself confirms count as present: only
  those it doubts are taken out.
- POPE pairs: the model answers POPE's questions about present and absent objects; the correct answer is the
  grounded response and the opposite answer the hallucinated one, each in the model's own words: its reply where it
  gave that answer, else its most common reply of that polarity with the object's name put in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import pandas as pd

from halluscope.metrics.pope import answer_templates, fill_answer, parse_yes_no
from halluscope.tasks.object_scenes import list_phrases

__all__ = ["KINDS", "PAIR_COLUMNS", "caption_pairs", "complete_caption",
           "ground_caption", "pope_pairs"]

#: The kinds of pair, as `halluscope alea locate --kinds` takes them.
KINDS: tuple[str, ...] = ("caption", "pope")
#: One row per pair; `*_ids` are the response token ids the later stages train on.
PAIR_COLUMNS = ("kind", "image_id", "prompt", "object", "reply", "grounded", "hallucinated", "grounded_ids",
                "hallucinated_ids")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLAUSE = re.compile(r"\s*[,;]\s*|\s+and\s+")


def ground_caption(caption: str, names_absent: Callable[[str], bool]) -> str:
    """`caption` without the clauses that name an absent object (`names_absent(clause)`): clauses are the pieces of
    a sentence between commas, semicolons and "and"; a sentence that lost clauses is rejoined as a list ("a, b and
    c"), one that lost all of them is dropped. Returns "" when nothing is left.

    Example:
        >>> ground_caption("A red circle, a blue star and two squares.", lambda clause: "star" in clause)
        'A red circle and two squares.'
    """
    sentences = []
    for sentence in _SENTENCE_END.split(caption.strip()):
        end = sentence[-1] if sentence[-1:] in (".", "!", "?") else ""
        clauses = [c for c in _CLAUSE.split(sentence[:len(sentence) - len(end)]) if c.strip()]
        kept = [c.strip() for c in clauses if not names_absent(c)]
        if len(kept) == len(clauses):
            sentences.append(sentence)
        elif kept:
            text = list_phrases(kept)
            sentences.append(text[0].upper() + text[1:] + (end or "."))
    return " ".join(sentences)


def complete_caption(caption: str, missing: Sequence[str]) -> str:
    """`caption` with the objects `missing` added to the list of its last sentence, each as "a <name>".

    Example:
        >>> complete_caption("A red circle and two squares.", ["star", "heart"])
        'A red circle, two squares, a star and a heart.'
    """
    if not missing:
        return caption
    *before, last = _SENTENCE_END.split(caption.strip())
    end = last[-1] if last[-1:] in (".", "!", "?") else "."
    clauses = [c.strip() for c in _CLAUSE.split(last.rstrip(".!?")) if c.strip()]
    added = [("an " if name[:1] in "aeiou" else "a ") + name for name in missing]
    return " ".join([*before, list_phrases(clauses + added) + end])


def caption_pairs(captions: pd.DataFrame, truth: Mapping[Any, Collection[str]],
                  extract: Callable[[str], list[str]], response_ids: Callable[[str], list[int]], *,
                  complete: bool = True, order: Sequence[str] = (),
                  confirmed: Mapping[Any, Collection[str]] | None = None) -> pd.DataFrame:
    """Caption pairs (`PAIR_COLUMNS`) from the model's captions (image_id, prompt, reply, reply_ids).

    Args:
        truth: image id -> the node words of the objects it holds (CHAIR's ground truth).
        extract: caption -> the node words of the objects it names (CHAIR's extraction).
        response_ids: text -> its token ids as a reply (for the grounded caption).
        complete: add the present objects the caption left out to the grounded caption (`complete_caption`), in
            the order of `order` (the vocabulary's node words; others after them, sorted).
        confirmed: image id -> absent objects the model says are there (`alea locate --doubt`): they stay in the
            grounded caption, and a caption naming no other absent object gives no pair.
    """
    rank = {name: k for k, name in enumerate(order)}
    rows = []
    for row in captions.itertuples(index=False):
        present = truth[row.image_id]
        kept = set(present) | set((confirmed or {}).get(row.image_id, ()))
        absent = [o for o in extract(row.reply) if o not in kept]
        if not absent:
            continue
        grounded = ground_caption(row.reply, lambda clause: any(o not in kept for o in extract(clause)))
        if grounded and complete:
            named = set(extract(grounded))
            grounded = complete_caption(grounded, sorted((o for o in present if o not in named),
                                                         key=lambda o: (rank.get(o, len(rank)), o)))
        named = extract(grounded) if grounded else []
        if not named or any(o not in kept for o in named):
            continue
        rows.append({"kind": "caption", "image_id": row.image_id, "prompt": row.prompt,
                     "object": ",".join(dict.fromkeys(absent)), "reply": row.reply, "grounded": grounded,
                     "hallucinated": row.reply, "grounded_ids": response_ids(grounded),
                     "hallucinated_ids": list(row.reply_ids)})
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def pope_pairs(questions: pd.DataFrame, response_ids: Callable[[str], list[int]], *,
               rule: str = "pope") -> pd.DataFrame:
    """POPE pairs (`PAIR_COLUMNS`) from the model's replies to POPE questions (image_id, prompt, object, label,
    reply, reply_ids), read with answer `rule`; one pair per question, whether the model was right or wrong."""
    answers = [parse_yes_no(reply, rule) for reply in questions["reply"]]
    templates = answer_templates(list(zip(questions["object"], questions["reply"], answers)))
    rows = []
    for row, answer in zip(questions.itertuples(index=False), answers):
        wrong = "no" if row.label == "yes" else "yes"
        said = {answer: (row.reply, list(row.reply_ids))}
        grounded, hallucinated = (said.get(label) or _filled(templates[label], row.object, response_ids)
                                  for label in (row.label, wrong))
        rows.append({"kind": "pope", "image_id": row.image_id, "prompt": row.prompt, "object": row.object,
                     "reply": row.reply, "grounded": grounded[0], "hallucinated": hallucinated[0],
                     "grounded_ids": grounded[1], "hallucinated_ids": hallucinated[1]})
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def _filled(template: str, name: str, response_ids: Callable[[str], list[int]]) -> tuple[str, list[int]]:
    text = fill_answer(template, name)
    return text, response_ids(text)
