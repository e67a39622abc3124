"""CHAIR (Rohrbach et al., 2018): how many objects a caption names that the image does not contain.

Pure functions over captions and COCO-format annotations, no model. The word extraction follows the reference
scorers step by step: lower-case, tokenise, lemmatise ("opera": POS tag + WordNet lemma, the OPERA / Maxlinn
scorer and the default) or singularise every token ("original": LisaAnne/Hallucination), merge listed
double words left to right, drop exclusion words ("seat" next to "toilet"), keep the words in the vocabulary and
map each to its node word. Mentions are not deduplicated. An image's ground truth is the union of its instance
categories and the objects extracted from its reference captions.

Metrics (fractions): CHAIR_s = captions with a hallucinated mention / captions; CHAIR_i = hallucinated mentions /
mentions; recall = distinct ground-truth objects mentioned / ground-truth objects, both summed over captions;
length = mean number of words after the double-word merge (OPERA stores 0.01 x this and prints it x100).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Union

import pandas as pd

from halluscope.errors import InputError
from halluscope.metrics.coco import CocoSource, category_name, known_image_ids, load_coco_files, read_records
from halluscope.metrics.nlp import NLPComponents, load_nlp, wordnet_pos
from halluscope.metrics.vocabulary import ObjectVocabulary, check_method, coco_vocabulary

__all__ = [
    "CHAIR_PROMPT",
    "CaptionObjects",
    "ChairScores",
    "chair_ground_truth",
    "evaluate_chair",
    "extract_objects",
    "load_captions",
    "score_chair",
]

#: The prompt `halluscope bench chair` asks by default (papers vary: OPERA asks "Please help me describe the image
#: in detail."); the scenes organism is trained on it.
CHAIR_PROMPT = "Describe this image."
#: Generated captions: a JSON list / JSONL path, a DataFrame, or records with an image id and a caption.
Captions = Union[str, Path, pd.DataFrame, Sequence[Mapping[str, Any]]]


class CaptionObjects(NamedTuple):
    """What CHAIR reads from one caption."""

    words: list[str]  # lemmas after the double-word merge, before exclusions (length counts these)
    mentions: list[str]  # the words that name an object, in caption order, after exclusions
    objects: list[str]  # the node word of each mention


class ChairScores(NamedTuple):
    """A CHAIR evaluation: overall numbers and names, and one row per caption."""

    summary: dict[str, Any]
    per_caption: pd.DataFrame


@lru_cache(maxsize=1)
def _default_nlp() -> NLPComponents:
    return load_nlp("auto")


def _resolve(
    vocabulary: ObjectVocabulary | None, nlp: NLPComponents | None, method: str
) -> tuple[ObjectVocabulary, NLPComponents]:
    check_method(method)
    return (vocabulary or coco_vocabulary()), (nlp or _default_nlp())


def extract_objects(
    caption: str,
    *,
    vocabulary: ObjectVocabulary | None = None,
    nlp: NLPComponents | None = None,
    method: str = "opera",
) -> CaptionObjects:
    """The object mentions in one caption, as the reference's `caption_to_words` finds them.

    Args:
        caption: any text; it is lower-cased first.
        vocabulary: default the COCO 80-category list (`coco_vocabulary()`).
        nlp: default `load_nlp("auto")`.
        method: "opera" (tag, then lemmatise with the tag's WordNet POS) or "original" (singularise every token).

    Returns:
        `CaptionObjects(words, mentions, objects)`.

    Raises:
        InputError: unknown method, or a tagger that returns a different number of tags than tokens.

    Example:
        >>> extract_objects("two dogs near a toilet seat", nlp=nlp).objects  # doctest: +SKIP
        ['dog', 'toilet']
    """
    vocabulary, nlp = _resolve(vocabulary, nlp, method)
    tokens = list(nlp.tokenize(caption.lower()))
    if method == "opera":
        tags = list(nlp.tag(tokens))
        if len(tags) != len(tokens):
            raise InputError(f"the tagger returned {len(tags)} tags for {len(tokens)} tokens; it must tag every token")
        lemmas = [nlp.lemmatize(token, wordnet_pos(tag)) for token, tag in zip(tokens, tags)]
    else:
        lemmas = [nlp.singularize(token) for token in tokens]

    pairs = vocabulary.double_words_for(method)
    words: list[str] = []
    i = 0
    while i < len(lemmas):
        pair = " ".join(lemmas[i : i + 2])
        if i + 1 < len(lemmas) and pair in pairs:
            words.append(pairs[pair])
            i += 2
        else:
            words.append(lemmas[i])
            i += 1

    kept = words
    for word, trigger in vocabulary.exclusions:
        if trigger in kept and word in kept:
            kept = [w for w in kept if w != word]
    mentions = [w for w in kept if w in vocabulary.synonyms]
    return CaptionObjects(words, mentions, [vocabulary.synonyms[w] for w in mentions])


def chair_ground_truth(
    instances: CocoSource | Sequence[CocoSource],
    captions: CocoSource | Sequence[CocoSource] | None,
    *,
    image_ids: Iterable[Any] | None = None,
    vocabulary: ObjectVocabulary | None = None,
    nlp: NLPComponents | None = None,
    method: str = "opera",
) -> dict[Any, frozenset[str]]:
    """Each image's ground-truth node words: its instance categories plus the objects its reference captions name.

    An image's set depends only on its own annotations, so restricting to the evaluated `image_ids` gives the
    same numbers as the reference's all-of-COCO cache, much faster. Images listed in the files but without
    annotations get an empty set. Build the ground truth with the same vocabulary, nlp and method you score with.

    Args:
        instances: COCO-format instances file(s) or dict(s), e.g. train2014 and val2014.
        captions: COCO-format captions file(s) or dict(s); None uses the instances alone (not the reference).
        image_ids: only these images (default: every image in the files).
        vocabulary, nlp, method: as in `extract_objects`.

    Raises:
        InputError: a category name missing from the vocabulary, or an unreadable file.
    """
    vocabulary, nlp = _resolve(vocabulary, nlp, method)
    instance_sets = load_coco_files(instances, kind="instances")
    caption_sets = load_coco_files(captions, kind="captions")
    wanted = None if image_ids is None else set(image_ids)
    known = known_image_ids(instance_sets + caption_sets)
    truth: dict[Any, set[str]] = {i: set() for i in known if wanted is None or i in wanted}
    for data in instance_sets:
        names = {cat["id"]: cat["name"] for cat in data["categories"]}
        for ann in data["annotations"]:
            if ann["image_id"] in truth:
                truth[ann["image_id"]].add(vocabulary.node_of(category_name(ann, names)))
    for data in caption_sets:
        for ann in data["annotations"]:
            if ann["image_id"] in truth:
                truth[ann["image_id"]].update(
                    extract_objects(ann["caption"], vocabulary=vocabulary, nlp=nlp, method=method).objects
                )
    return {image_id: frozenset(objects) for image_id, objects in truth.items()}


def load_captions(
    captions: Captions, *, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[tuple[Any, str]]:
    """(image_id, caption) pairs from a JSON list / JSONL file, a DataFrame or a list of dicts.

    Raises:
        InputError: a record without one of the two keys, or a caption that is not a string.
    """
    if isinstance(captions, (str, Path)):
        records: Sequence[Mapping[str, Any]] = read_records(captions)
    elif isinstance(captions, pd.DataFrame):
        records = captions.to_dict("records")
    else:
        records = list(captions)
    pairs = []
    for n, record in enumerate(records):
        if image_id_key not in record or caption_key not in record:
            raise InputError(
                f"caption record {n} has keys {sorted(record)}; expected {image_id_key!r} and {caption_key!r} "
                "(set image_id_key= / caption_key= to your file's names)"
            )
        if not isinstance(record[caption_key], str):
            raise InputError(
                f"caption record {n}: {caption_key!r} is {type(record[caption_key]).__name__}, expected text"
            )
        pairs.append((record[image_id_key], record[caption_key]))
    return pairs


def score_chair(
    captions: Captions,
    ground_truth: Mapping[Any, Iterable[str]],
    *,
    vocabulary: ObjectVocabulary | None = None,
    nlp: NLPComponents | None = None,
    method: str = "opera",
    image_id_key: str = "image_id",
    caption_key: str = "caption",
) -> ChairScores:
    """CHAIR_s, CHAIR_i, recall and length of generated captions against per-image ground truth.

    Args:
        captions: generated captions (see `load_captions`), from any model.
        ground_truth: image id -> node words, e.g. from `chair_ground_truth` built with the same settings.
        vocabulary, nlp, method: as in `extract_objects`.

    Returns:
        `ChairScores(summary, per_caption)`. The summary holds the four metrics as fractions, the counts behind
        them, and `method`, `vocabulary`, `nlp` and `nlp_components`. A ratio with a zero denominator is NaN
        (the reference divides by zero); a caption with no mentions has per-caption CHAIR_i NaN (reference: 0).

    Raises:
        InputError: no captions, or a caption whose image id is not in the ground truth (the reference would
            silently count all its mentions as hallucinated).

    Example:
        >>> scores = score_chair([{"image_id": 1, "caption": "a dog"}], {1: {"dog"}}, nlp=nlp)  # doctest: +SKIP
        >>> scores.summary["chair_i"]  # doctest: +SKIP
        0.0
    """
    vocabulary, nlp = _resolve(vocabulary, nlp, method)
    pairs = load_captions(captions, image_id_key=image_id_key, caption_key=caption_key)
    if not pairs:
        raise InputError("no captions to score; pass at least one {image_id, caption} record")
    missing = [image_id for image_id, _ in pairs if image_id not in ground_truth]
    if missing:
        raise InputError(
            f"{len(missing)} caption(s) have image ids without ground truth, e.g. {missing[:3]!r}; build the ground "
            "truth from annotation files that cover these images (ids must match in type: int in COCO)"
        )
    rows = []
    for image_id, caption in pairs:
        found = extract_objects(caption, vocabulary=vocabulary, nlp=nlp, method=method)
        truth = frozenset(ground_truth[image_id])
        hallucinated = [node for node in found.objects if node not in truth]
        recalled = {node for node in found.objects if node in truth}
        rows.append(
            {
                "image_id": image_id,
                "caption": caption,
                "words": found.words,
                "mentions": found.mentions,
                "objects": found.objects,
                "hallucinated": hallucinated,
                "ground_truth": sorted(truth),
                "n_mentions": len(found.objects),
                "n_hallucinated": len(hallucinated),
                "n_recalled": len(recalled),
                "n_ground_truth": len(truth),
                "length": len(found.words),
                "chair_s": int(bool(hallucinated)),
                "chair_i": _ratio(len(hallucinated), len(found.objects)),
                "recall": _ratio(len(recalled), len(truth)),
            }
        )
    table = pd.DataFrame(rows)
    summary = {
        "metric": "chair",
        "method": method,
        "vocabulary": vocabulary.name,
        "nlp": nlp.names.get("nlp", "custom"),
        "nlp_components": dict(nlp.names),
        "chair_s": float(table["chair_s"].mean()),
        "chair_i": _ratio(int(table["n_hallucinated"].sum()), int(table["n_mentions"].sum())),
        "recall": _ratio(int(table["n_recalled"].sum()), int(table["n_ground_truth"].sum())),
        "length": float(table["length"].mean()),
        "n_captions": len(table),
        "n_hallucinated_captions": int(table["chair_s"].sum()),
        "n_mentions": int(table["n_mentions"].sum()),
        "n_hallucinated": int(table["n_hallucinated"].sum()),
        "n_recalled": int(table["n_recalled"].sum()),
        "n_ground_truth": int(table["n_ground_truth"].sum()),
    }
    return ChairScores(summary, table)


def evaluate_chair(
    captions: Captions,
    instances: CocoSource | Sequence[CocoSource],
    reference_captions: CocoSource | Sequence[CocoSource] | None,
    *,
    vocabulary: ObjectVocabulary | None = None,
    nlp: NLPComponents | None = None,
    method: str = "opera",
    image_id_key: str = "image_id",
    caption_key: str = "caption",
) -> ChairScores:
    """`score_chair` with ground truth built from COCO-format files for just the captioned images.

    Example:
        >>> evaluate_chair("captions.jsonl", "instances_val2014.json", "captions_val2014.json")  # doctest: +SKIP
    """
    vocabulary, nlp = _resolve(vocabulary, nlp, method)
    pairs = load_captions(captions, image_id_key=image_id_key, caption_key=caption_key)
    truth = chair_ground_truth(
        instances,
        reference_captions,
        image_ids={image_id for image_id, _ in pairs},
        vocabulary=vocabulary,
        nlp=nlp,
        method=method,
    )
    records = [{"image_id": image_id, "caption": caption} for image_id, caption in pairs]
    return score_chair(records, truth, vocabulary=vocabulary, nlp=nlp, method=method)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan
