"""CHAIR as `halluscope bench chair` runs it: each method captions the same images with one prompt, and the
captions are scored against the images' instances and reference captions (`metrics.chair.evaluate_chair`,
OPERA's word extraction by default) with the NLP components the run names."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd

from halluscope.bench.data import load_bench_data
from halluscope.errors import InputError
from halluscope.metrics.chair import CHAIR_PROMPT, evaluate_chair

__all__ = ["COLUMNS", "MAX_NEW_TOKENS", "MIN_CATEGORIES", "N_IMAGES", "PROMPT", "build_items", "plot", "score",
           "setting_lines"]

#: The comparison table: one row per method.
COLUMNS = ("method", "chair_s", "chair_i", "recall", "length")
#: Room for a description of every object in a scene; real models' longer captions need --max-new-tokens.
MAX_NEW_TOKENS = 64
#: Synthetic scenes as the organism saw them in training.
MIN_CATEGORIES = 2
#: The default prompt.
PROMPT = CHAIR_PROMPT
#: Images captioned unless told.
N_IMAGES = 100


def build_items(data: str, *, n: int, seed: int, prompt: str,
                **_: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """One item per image (item, image_id, prompt), the images, and the annotations CHAIR scores against,
    restricted to these images (so the run holds all it needs).

    Synthetic data (`bench/data.py`) captions every drawn scene; a directory's `n` images are drawn with `seed`.

    Raises:
        InputError: a directory with fewer than `n` images.
    """
    source = load_bench_data(data, n=n, seed=seed, min_categories=MIN_CATEGORIES)
    ids = [image["id"] for image in source.instances["images"]]
    if data != "synthetic":
        if n > len(ids):
            raise InputError(f"--n {n} is more than the {len(ids)} images of the data; pass --n <= {len(ids)}")
        ids = sorted(random.Random(seed).sample(ids, n))
    items = pd.DataFrame({"item": range(len(ids)), "image_id": ids, "prompt": prompt})
    images = pd.DataFrame({"image_id": ids, "image": [source.image(i) for i in ids]})
    return items, images, source.annotations(set(ids))


def score(items: pd.DataFrame, replies: pd.DataFrame, *, annotations: dict[str, Any], nlp_components,
          chair_method: str = "opera", **_: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Per method: CHAIR_s, CHAIR_i, recall and length (fractions; length in words); each caption with its
    mentions and hallucinated objects; and what was used (nlp, nlp_components, vocabulary, chair_method).

    Args:
        items: from `build_items`.
        replies: method, item, reply: every method's caption of every image.
        annotations: from `build_items`.
        nlp_components: the `NLPComponents` to extract objects with.
        chair_method: "opera" or "original" word extraction.
    """
    from halluscope.metrics.vocabulary import ObjectVocabulary, coco_vocabulary

    rows = annotations["vocabulary"]
    vocabulary = (coco_vocabulary() if rows is None
                  else ObjectVocabulary.from_synonyms(annotations["vocabulary_name"], rows))
    table, details, summary = [], [], {}
    for method, group in replies.groupby("method", sort=False):
        captions = group.merge(items[["item", "image_id"]], on="item").rename(columns={"reply": "caption"})
        scores = evaluate_chair(captions[["image_id", "caption"]], annotations["instances"], annotations["captions"],
                                vocabulary=vocabulary, nlp=nlp_components, method=chair_method)
        summary = scores.summary
        table.append({"method": method, **{k: summary[k] for k in COLUMNS[1:]}})
        details.append(scores.per_caption.assign(method=method, item=captions["item"].to_numpy()))
    notes = {k: summary[k] for k in ("nlp", "nlp_components", "vocabulary")}
    return pd.DataFrame(table, columns=list(COLUMNS)), pd.concat(details, ignore_index=True), \
        {**notes, "chair_method": chair_method}


def setting_lines(summary: dict[str, Any]) -> list[str]:
    """How the captions were scored (the line `bench_step.setting_lines` adds for CHAIR)."""
    parts = summary["nlp_components"]
    return [f"CHAIR: {summary['chair_method']} word extraction, vocabulary {summary['vocabulary']}, "
            f"nlp: {summary['nlp']} (tokenizer {parts.get('tokenizer')}; tagger {parts.get('tagger')}; "
            f"lemmatizer {parts.get('lemmatizer')})"]


def plot(table: pd.DataFrame, summary: dict[str, Any], path: Path, *, title: str) -> Path:
    """CHAIR_s, CHAIR_i and recall, one bar per method."""
    from halluscope.plots.bench_figures import plot_chair

    return plot_chair(table, path, title=title, n_captions=summary["n_images"])
