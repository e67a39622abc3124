"""Asking the model about objects it named, in its own words: POPE's question about each (image, object), the
model's greedy replies, its usual wording of "yes" and of "no" (`metrics.pope.answer_templates`), and P(yes) from
the two wordings teacher-forced after the image and the question:

    P(yes) = sigmoid(log p(yes wording) - log p(no wording))

Whole replies in the model's words work on every family without knowing its answer tokens. APASI's self-check
(`apasi data --variant self-check`) and ALEAHallu's `alea locate --doubt` use it to tell the objects the model
doubts from those it confirms.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import pandas as pd
import torch

from halluscope.errors import InputError
from halluscope.images import ImageLike
from halluscope.metrics.pope import POPE_TEMPLATE, answer_templates, fill_answer, parse_yes_no, pope_question
from halluscope.runs import Run
from halluscope.steps import Progress, sharded_step
from halluscope.training.sequences import response_ids

__all__ = ["CHECK", "check_doubt", "check_objects", "question", "separation", "yes_probabilities"]

#: How the model is asked about each object (recorded in the runs' arguments).
CHECK = {"template": POPE_TEMPLATE, "rule": "pope", "max_new_tokens": 16, "decoding": "greedy",
         "score": "P(yes) = sigmoid(log p(yes wording) - log p(no wording)), teacher-forced"}


def check_doubt(doubt: float) -> None:
    """InputError unless `doubt`, the P(yes) below which an object is doubted (`--doubt`), is strictly in (0, 1)."""
    if not 0.0 < doubt < 1.0:
        raise InputError(f"--doubt {doubt!r}; expected a probability strictly between 0 and 1, e.g. 0.5")


def question(obj: str) -> str:
    """POPE's question about `obj`, as the check asks it."""
    return pope_question(obj, CHECK["template"])


def yes_probabilities(vlm, asked: Sequence[tuple[ImageLike, str]], wordings: Mapping[str, str], *,
                      batch_size: int = 16) -> list[float]:
    """P(yes) for each (image, object) asked about: the model's "yes" and "no" `wordings` (templates with "{}"
    for the object) teacher-forced after the image and POPE's question, and sigmoid of the difference of their
    log-likelihoods. Each image and question is run once: both wordings continue from its cached prefill."""
    from halluscope.decoding.branches import Rows

    out: list[float] = []
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        n = len(chunk)
        answers = [response_ids(vlm, fill_answer(wordings[answer], obj)) for answer in ("yes", "no")
                   for _, obj in chunk]
        width = max(len(ids) for ids in answers)
        rows, first, _ = Rows.prefill(vlm, [vlm.encode([(image, question(obj)) for image, obj in chunk])], width)
        tokens = torch.tensor([ids + ids[-1:] * (width - len(ids)) for ids in answers], device=first.device)
        logits = first.repeat(2, 1)[:, None]
        if width > 1:  # the tokens after the first, each predicted by the one before it
            logits = torch.cat([logits, rows.select(torch.arange(n).repeat(2)).score(vlm, tokens[:, :-1])], 1)
        token = torch.log_softmax(logits.float(), -1).gather(2, tokens[:, :, None]).squeeze(2)
        real = torch.arange(width, device=token.device)[None] < torch.tensor([len(ids) for ids in answers],
                                                                              device=token.device)[:, None]
        logprob = torch.where(real, token, 0.0).sum(1)
        out += torch.sigmoid(logprob[:n] - logprob[n:]).tolist()
    return out


def separation(p_yes: Sequence[float], present: Sequence[bool], doubt: float) -> dict[str, float | int | None]:
    """Where the images' objects are known: how well P(yes) tells the present objects asked about from the absent
    ones. `auroc` is the chance that a present object gets a higher P(yes) than an absent one (ties count half;
    None without both kinds); `doubted_present` and `doubted_absent` are the shares of each with P(yes) < `doubt`.
    The labels a self-check makes can be no better than this."""
    table = pd.DataFrame({"p_yes": list(p_yes), "present": [bool(v) for v in present]})
    kinds = {kind: table[table["present"] == (kind == "present")] for kind in ("present", "absent")}
    n_present, n_absent = len(kinds["present"]), len(kinds["absent"])
    auroc = None
    if n_present and n_absent:
        ranks = table["p_yes"].rank()[table["present"]]
        auroc = round(float(ranks.sum() - n_present * (n_present + 1) / 2) / (n_present * n_absent), 4)

    def doubted(rows: pd.DataFrame) -> float | None:
        return round(float((rows["p_yes"] < doubt).mean()), 4) if len(rows) else None

    return {"auroc": auroc, "present": n_present, "absent": n_absent, "doubted_present": doubted(kinds["present"]),
            "doubted_absent": doubted(kinds["absent"])}


def check_objects(run: Run, vlm, asked: Sequence[tuple[ImageLike, str]], *, prefix: str, batch_size: int,
                  force: bool, progress: Progress) -> pd.DataFrame:
    """Ask the model about every (image, object) in two resumable steps of `run`: `{prefix}-check`, its greedy
    replies, and `{prefix}-score`, P(yes) from its most common wordings of the replies' two answers.

    Returns:
        One row per question, in order: reply, answer (the reply read with POPE's rule) and p_yes.
    """
    from halluscope.evaluation import iter_replies

    def reply(vlm, rows: Sequence, start: int) -> Iterator[pd.DataFrame]:
        pairs = [(image, question(obj)) for image, obj in rows]
        for replies in iter_replies(vlm, pairs, batch_size=batch_size, max_new_tokens=CHECK["max_new_tokens"]):
            yield pd.DataFrame({"row": range(start, start + len(replies)), "reply": [r for r, _ in replies]})
            start += len(replies)

    replies = sharded_step(run, f"{prefix}-check", {**CHECK, "batch_size": batch_size}, asked, reply,
                           columns=("row", "reply"), chunk=max(batch_size, 64), force=force, progress=progress,
                           vlm=vlm)["reply"].tolist()
    said = [parse_yes_no(text, CHECK["rule"]) for text in replies]
    wordings = answer_templates([(obj, text, answer) for (_, obj), text, answer in zip(asked, replies, said)])

    def score(vlm, rows: Sequence, start: int) -> Iterator[pd.DataFrame]:
        yield pd.DataFrame({"row": range(start, start + len(rows)),
                            "p_yes": yes_probabilities(vlm, list(rows), wordings, batch_size=batch_size)})

    p_yes = sharded_step(run, f"{prefix}-score", {"wordings": wordings, "batch_size": batch_size}, asked, score,
                         columns=("row", "p_yes"), chunk=max(batch_size, 64), force=force, progress=progress,
                         vlm=vlm)["p_yes"].tolist()
    return pd.DataFrame({"reply": replies, "answer": said, "p_yes": p_yes})
