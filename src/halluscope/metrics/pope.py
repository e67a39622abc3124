"""POPE (Li et al., 2023): yes/no questions "Is there a <object> in the image?" about present and absent objects.

Three parts, all pure functions with no model:
- building question sets from per-image object lists (from COCO-format instances via pycocotools), sampling
  negatives at random, by frequency ("popular") or by co-occurrence ("adversarial") exactly as RUCAIBox/POPE
  does, with a seeded generator;
- loading the published question files (JSON Lines: question_id, image, text, label);
- reading answers with the reference parsers (named rules) and scoring each split: accuracy, precision, recall,
  F1 and yes-ratio, with "yes" the positive class; and the model's own wording of each answer, for training
  methods that need the answer it did not give.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import pandas as pd

from halluscope.errors import InputError
from halluscope.metrics.coco import read_records

__all__ = [
    "ANSWER_RULES",
    "ARTICLE_RULES",
    "POPE_STRATEGIES",
    "FALLBACK_ANSWERS",
    "POPE_TEMPLATE",
    "answer_templates",
    "build_pope",
    "fill_answer",
    "load_pope_questions",
    "parse_yes_no",
    "pope_metrics",
    "pope_question",
    "score_pope",
    "write_pope_questions",
]

#: Negative sampling strategies, in the order the reference generates them (they share one random stream).
POPE_STRATEGIES: tuple[str, ...] = ("random", "popular", "adversarial")
#: The reference question template.
POPE_TEMPLATE = "Is there a {} in the image?"
#: What a yes/no answer says when the model never gave that polarity in its own words (`answer_templates`).
FALLBACK_ANSWERS = {"yes": "Yes", "no": "No"}
_ANSWER_SLOT = "{}"
#: Answer parsers: "pope" (RUCAIBox/POPE evaluate.py = LLaVA eval_pope.py), "opera" (OPERA pope_eval.py),
#: "apasi" (APASI eval_pope.py: LLaVA's rule without the first-sentence cut).
ANSWER_RULES: tuple[str, ...] = ("pope", "opera", "apasi")
#: How "a" becomes "an" before a vowel-initial object: "article" (only the article before the slot) or
#: "reference" (every "a" in the template, which turns "image" into "imange" as in the LLaVA-era files).
ARTICLE_RULES: tuple[str, ...] = ("article", "reference")

_NEGATIONS = {"pope": frozenset({"No", "not", "no"}), "apasi": frozenset({"No", "not", "no"})}
_OPERA_NEGATIONS = frozenset({"No", "not", "no", "NO"})
_ARTICLE_BEFORE_SLOT = re.compile(r"\ba(\s+\{\})")

#: Per-image objects: dicts with "image" (file name), "objects" (names, in listed order) and optionally "image_id".
ImageObjects = Sequence[Mapping[str, Any]]
Answers = Union[Sequence[str], pd.Series, pd.DataFrame]


# ------------------------------------------------------------------------------------------ building


def pope_question(name: str, template: str = POPE_TEMPLATE, article: str = "article") -> str:
    """The question about object `name`: the template with "a" made "an" before a vowel (`ARTICLE_RULES`).

    Example:
        >>> pope_question("apple"), pope_question("apple", article="reference")
        ('Is there an apple in the image?', 'Is there an apple in the imange?')
    """
    if name[:1] not in ("a", "e", "i", "o", "u"):
        return template.format(name)
    if article == "reference":
        return template.replace("a", "an").format(name)
    return _ARTICLE_BEFORE_SLOT.sub(r"an\1", template).format(name)


def build_pope(
    image_objects: ImageObjects,
    *,
    n_images: int | None = 500,
    n_positive: int = 3,
    strategies: Sequence[str] = POPE_STRATEGIES,
    seed: int = 0,
    template: str = POPE_TEMPLATE,
    article: str = "article",
) -> pd.DataFrame:
    """POPE questions for each strategy, built as RUCAIBox/POPE (`main.py`, `utils.py`) builds them.

    Images with at least `n_positive` objects are kept and `n_images` of them drawn. For each drawn image and each
    of its first `n_positive` listed objects, a "yes" question about the object is followed by a "no" question
    about an object not in the image and not yet asked about for this image: drawn uniformly from all objects
    seen in the drawn images ("random"), the most frequent one ("popular"), or the one that co-occurs most often
    with the positive object ("adversarial"; "popular" and "adversarial" fall back to a random draw). Ties keep
    first-seen order. One `random.Random(seed)` serves the image draw and then each strategy in turn, so with the
    default strategy order the questions equal the reference's after `random.seed(seed)`.

    Args:
        image_objects: per image {"image", "objects"[, "image_id"]}, e.g. `coco.image_objects(instances)`.
        n_images: images to draw (reference 500); None draws all eligible images (in shuffled order).
        n_positive: positives per image, also the minimum object count (reference 3).
        strategies: any of `POPE_STRATEGIES`, in generation order.
        seed: seeds the draws; the same seed gives the same questions.
        template: a question with one "{}" slot for the object name.
        article: one of `ARTICLE_RULES`.

    Returns:
        One row per question: split, question_id (1.. within a split), image, image_id, object, text, label.

    Raises:
        InputError: too few eligible images, an unknown strategy or article rule, a template without "{}", or an
            image for which no unused absent object is left (the reference would loop forever).

    Example:
        >>> lists = [["cat", "dog", "cup"], ["cow"], ["fork", "bowl", "cat"], ["ox", "pig", "hen"]]
        >>> imgs = [{"image": f"{k}.png", "objects": objects} for k, objects in enumerate(lists)]
        >>> q = build_pope(imgs, n_images=3)
        >>> len(q), q["label"].tolist()[:2]
        (54, ['yes', 'no'])
    """
    _check_build_args(strategies, n_positive, template, article)
    for n, entry in enumerate(image_objects):
        if "image" not in entry or "objects" not in entry:
            raise InputError(
                f"image entry {n} has keys {sorted(entry)}; expected 'image' and 'objects' (a list of names)"
            )
    eligible = [dict(entry) for entry in image_objects if len(entry["objects"]) >= n_positive]
    count = len(eligible) if n_images is None else n_images
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InputError(f"n_images = {n_images!r}; expected a positive integer or None (all eligible images)")
    if len(eligible) < count:
        raise InputError(
            f"only {len(eligible)} images have >= {n_positive} objects, fewer than n_images = {count}; "
            f"pass n_images <= {len(eligible)} (or None for all)"
        )
    rng = random.Random(seed)
    chosen = rng.sample(eligible, count)

    frequency: dict[str, int] = {}
    cooccurrence: dict[str, dict[str, int]] = {}
    for entry in chosen:
        for name in entry["objects"]:
            frequency[name] = frequency.get(name, 0) + 1
            partners = cooccurrence.setdefault(name, {})
            for other in entry["objects"]:
                if other != name:
                    partners[other] = partners.get(other, 0) + 1
    pool = list(frequency)
    by_frequency = [name for name, _ in sorted(frequency.items(), key=lambda kv: kv[1], reverse=True)]
    by_partner = {
        name: [other for other, _ in sorted(partners.items(), key=lambda kv: kv[1], reverse=True)]
        for name, partners in cooccurrence.items()
    }

    rows = []
    for strategy in strategies:
        question_id = 0
        for entry in chosen:
            present = set(entry["objects"])
            asked: list[str] = []
            for positive in entry["objects"][:n_positive]:
                asked.append(positive)
                ranked = (
                    by_frequency if strategy == "popular" else by_partner[positive] if strategy == "adversarial" else []
                )
                negative = next((o for o in ranked if o not in asked and o not in present), None)
                if negative is None:
                    negative = _draw_absent(rng, pool, asked, present, entry["image"])
                asked.append(negative)
                for name, label in ((positive, "yes"), (negative, "no")):
                    question_id += 1
                    rows.append(
                        {
                            "split": strategy,
                            "question_id": question_id,
                            "image": entry["image"],
                            "image_id": entry.get("image_id"),
                            "object": name,
                            "text": pope_question(name, template, article),
                            "label": label,
                        }
                    )
    return pd.DataFrame(rows, columns=["split", "question_id", "image", "image_id", "object", "text", "label"])


def _draw_absent(rng: random.Random, pool: list[str], asked: list[str], present: set[str], image: str) -> str:
    """Draw uniformly from `pool` until an object neither asked about nor present comes up (the reference's loop)."""
    if all(o in asked or o in present for o in pool):
        raise InputError(
            f"image {image!r}: no absent object is left to ask about (all {len(pool)} objects seen in the drawn "
            "images are in it or already asked); use a smaller n_positive or images with fewer objects"
        )
    while True:
        candidate = rng.choice(pool)
        if candidate not in asked and candidate not in present:
            return candidate


def _check_build_args(strategies: Sequence[str], n_positive: int, template: str, article: str) -> None:
    unknown = [s for s in strategies if s not in POPE_STRATEGIES]
    if unknown or not strategies:
        raise InputError(f"unknown POPE strategy {unknown or strategies!r}; expected some of {list(POPE_STRATEGIES)}")
    if not isinstance(n_positive, int) or isinstance(n_positive, bool) or n_positive < 1:
        raise InputError(f"n_positive = {n_positive!r}; expected a positive integer (reference 3)")
    if template.count("{}") != 1:
        raise InputError(f"template {template!r} needs exactly one '{{}}' slot for the object, e.g. {POPE_TEMPLATE!r}")
    if article not in ARTICLE_RULES:
        raise InputError(f"unknown article rule {article!r}; expected one of {list(ARTICLE_RULES)}")


# ------------------------------------------------------------------------------------------ files


def write_pope_questions(questions: pd.DataFrame, out_dir: str | Path, *, prefix: str = "coco") -> dict[str, Path]:
    """Write each split as the reference does: `<prefix>_pope_<split>.json`, JSON Lines with question_id, image,
    text and label. Returns split -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, group in questions.groupby("split", sort=False):
        path = out / f"{prefix}_pope_{split}.json"
        lines = [
            json.dumps({"question_id": int(r.question_id), "image": r.image, "text": r.text, "label": r.label})
            for r in group.itertuples()
        ]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[str(split)] = path
    return paths


def load_pope_questions(paths: str | Path | Iterable[str | Path], *, split: str | None = None) -> pd.DataFrame:
    """Published or written POPE question files as one table: split, question_id, image, text, label.

    Args:
        paths: a file, several files, or a directory (every `*_pope_*.json` in it).
        split: the split name for a single file; by default taken from a `..._pope_<split>.json` file name.

    Raises:
        InputError: a record without the four keys, a label other than yes/no, or no split name.
    """
    if isinstance(paths, (str, Path)) and Path(paths).is_dir():
        files = sorted(Path(paths).glob("*_pope_*.json"))
        if not files:
            raise InputError(f"no *_pope_<split>.json files in {paths}; pass the POPE question files")
    else:
        files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if split is not None and len(files) != 1:
        raise InputError(f"split={split!r} names one file but {len(files)} were given; drop split= to use file names")
    frames = []
    for path in files:
        name = split or (path.stem.rsplit("_pope_", 1)[1] if "_pope_" in path.stem else None)
        if not name:
            raise InputError(f"cannot tell the split of {path.name}; name it <prefix>_pope_<split>.json or pass split=")
        records = read_records(path)
        for n, record in enumerate(records):
            missing = {"question_id", "image", "text", "label"} - set(record)
            if missing:
                raise InputError(
                    f"{path.name} record {n} lacks {sorted(missing)}; expected question_id, image, text, label"
                )
            if record["label"] not in ("yes", "no"):
                raise InputError(f"{path.name} record {n} has label {record['label']!r}; expected 'yes' or 'no'")
        frame = pd.DataFrame(records, columns=["question_id", "image", "text", "label"])
        frame.insert(0, "split", name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ scoring


def parse_yes_no(answer: str, rule: str = "pope") -> str:
    """Read a free-form answer as "yes" or "no" with a reference parser.

    Rules (words are split on single spaces, as in the references):
    - "pope": keep the text before the first ".", drop ",", "no" if a word is "No", "not" or "no".
    - "opera": drop "." and ",", "no" if a word is "No", "not", "no" or "NO", or ends in "n't".
    - "apasi": drop ",", keep ".", "no" if a word is "No", "not" or "no" (so "No." reads as yes).
    Anything else is "yes".

    Example:
        >>> parse_yes_no("No, there is not."), parse_yes_no("There isn't one."), parse_yes_no("There isn't.", "opera")
        ('no', 'yes', 'no')
    """
    if rule not in ANSWER_RULES:
        raise InputError(f"unknown answer rule {rule!r}; expected one of {list(ANSWER_RULES)}")
    if not isinstance(answer, str):
        raise InputError(f"answer {answer!r} is {type(answer).__name__}; expected the model's reply text")
    text = answer
    if rule == "pope" and "." in text:
        text = text.split(".")[0]
    if rule == "opera":
        text = text.replace(".", "")
    words = text.replace(",", "").split(" ")
    if rule == "opera":
        negative = any(w in _OPERA_NEGATIONS or w.endswith("n't") for w in words)
    else:
        negative = any(w in _NEGATIONS[rule] for w in words)
    return "no" if negative else "yes"


def _template(reply: str, name: str) -> str | None:
    """`reply` with the object's name as the slot, or None when the reply does not say the name."""
    found = re.search(rf"\b{re.escape(name)}\b", reply, flags=re.IGNORECASE)
    if found is None:
        return None
    return reply[:found.start()] + _ANSWER_SLOT + reply[found.end():]


def answer_templates(answers: Sequence[tuple[str, str, str]]) -> dict[str, str]:
    """The model's most common wording of "yes" and of "no" (ties: the first seen), from its (object, reply,
    parsed answer) triples, with "{}" where it names the object; `FALLBACK_ANSWERS` for a polarity it never gave.

    Example:
        >>> answer_templates([("star", "Yes, there is a star.", "yes"), ("bolt", "No, there is no bolt.", "no")])
        {'yes': 'Yes, there is a {}.', 'no': 'No, there is no {}.'}
    """
    counts: dict[str, Counter] = {"yes": Counter(), "no": Counter()}
    for name, reply, answer in answers:
        counts[answer][_template(reply, name) or reply] += 1
    return {answer: (found.most_common(1)[0][0] if found else FALLBACK_ANSWERS[answer])
            for answer, found in counts.items()}


def fill_answer(template: str, name: str) -> str:
    """An `answer_templates` wording about object `name`."""
    return template.replace(_ANSWER_SLOT, name, 1)


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float | int]:
    """Confusion counts and rates with "yes" as the positive class (fractions, not percentages).

    precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), accuracy = (TP+TN)/N, yes_ratio = yes
    predictions / N. A rate with a zero denominator is NaN; F1 is 0 when P and R are both 0.

    Example:
        >>> pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "yes", "no"])["accuracy"]
        0.5
    """
    if len(labels) != len(predictions):
        raise InputError(f"{len(labels)} labels but {len(predictions)} predictions; pass one prediction per question")
    for value in (*labels, *predictions):
        if value not in ("yes", "no"):
            raise InputError(f"label or prediction {value!r}; expected 'yes' or 'no' (parse replies with parse_yes_no)")
    pairs = list(zip(labels, predictions))
    tp = sum(1 for label, pred in pairs if label == "yes" and pred == "yes")
    fp = sum(1 for label, pred in pairs if label == "no" and pred == "yes")
    tn = sum(1 for label, pred in pairs if label == "no" and pred == "no")
    fn = sum(1 for label, pred in pairs if label == "yes" and pred == "no")
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / n if n else math.nan,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else math.nan,
    }


def score_pope(questions: pd.DataFrame, answers: Answers, *, rule: str = "pope") -> pd.DataFrame:
    """Parse each answer and score every split.

    Args:
        questions: from `load_pope_questions` or `build_pope` (columns split, question_id, label).
        answers: replies in the questions' row order (a list or Series of text), or a DataFrame with
            question_id, answer and (when the questions have several splits) split columns.
        rule: one of `ANSWER_RULES`.

    Returns:
        One row per split (in first-seen order): split, rule, then the `pope_metrics` columns.

    Raises:
        InputError: answers that do not line up with the questions.
    """
    missing = {"split", "question_id", "label"} - set(questions.columns)
    if missing:
        raise InputError(f"questions lack columns {sorted(missing)}; pass load_pope_questions(...) or build_pope(...)")
    replies = _align_answers(questions, answers)
    predictions = [parse_yes_no(reply, rule) for reply in replies]
    table = questions.assign(prediction=predictions)
    rows = []
    for split, group in table.groupby("split", sort=False):
        rows.append(
            {"split": split, "rule": rule, **pope_metrics(group["label"].tolist(), group["prediction"].tolist())}
        )
    return pd.DataFrame(rows)


def _align_answers(questions: pd.DataFrame, answers: Answers) -> list[str]:
    if not isinstance(answers, pd.DataFrame):
        replies = list(answers)
        if len(replies) != len(questions):
            raise InputError(
                f"{len(replies)} answers for {len(questions)} questions; pass one answer per question, in order, "
                "or a DataFrame with question_id and answer columns"
            )
        return replies
    keys = ["split", "question_id"] if "split" in answers.columns else ["question_id"]
    if "answer" not in answers.columns or "question_id" not in answers.columns:
        raise InputError(f"answers have columns {list(answers.columns)}; expected question_id and answer (and split)")
    if keys == ["question_id"] and questions["split"].nunique() > 1:
        raise InputError("the questions have several splits; add a split column to the answers")
    if answers.duplicated(keys).any():
        raise InputError(f"answers repeat some {'/'.join(keys)} values; give one answer per question")
    merged = questions[keys].merge(answers[[*keys, "answer"]], on=keys, how="left", validate="one_to_one")
    unanswered = merged["answer"].isna().sum()
    if unanswered:
        raise InputError(f"{unanswered} of {len(questions)} questions have no answer; answer every question")
    return merged["answer"].tolist()
