"""POPE as `halluscope bench pope` runs it: questions built from the data's instances (RUCAIBox/POPE's random,
popular and adversarial splits, `metrics.pope.build_pope`), each method's replies read with a reference answer
rule and scored per split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from halluscope.bench.data import load_bench_data
from halluscope.metrics.coco import image_objects
from halluscope.metrics.pope import POPE_TEMPLATE, build_pope, parse_yes_no, score_pope

__all__ = ["COLUMNS", "MAX_NEW_TOKENS", "MIN_CATEGORIES", "N_IMAGES", "PROMPT", "build_items", "plot", "score",
           "setting_lines"]

#: The comparison table: one row per method x split.
COLUMNS = ("method", "split", "accuracy", "precision", "recall", "f1", "yes_ratio")
#: Enough for "No, there is no hexagon." and for the first sentence of a chattier model.
MAX_NEW_TOKENS = 16
#: POPE asks about 3 present objects per image: synthetic scenes are drawn with at least 3 categories.
MIN_CATEGORIES = 3
#: The question template.
PROMPT = POPE_TEMPLATE
#: Images asked about unless told.
N_IMAGES = 100


def build_items(data: str, *, n: int, seed: int, prompt: str,
                **_: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The questions (one row per item: item, image_id, split, question_id, object, label, prompt), their
    images (image_id, image) and those images' annotations (kept for reference; scoring needs only the labels).

    Synthetic data (`bench/data.py`) asks about every drawn scene (all have >= 3 objects, bar a rare one left
    with fewer); a directory's `n` images are drawn with `seed` from those with >= 3 objects, as the reference
    does.
    """
    source = load_bench_data(data, n=n, seed=seed, min_categories=MIN_CATEGORIES)
    questions = build_pope(image_objects(source.instances), n_images=None if data == "synthetic" else n, seed=seed,
                           template=prompt)
    items = questions.rename(columns={"text": "prompt"}).drop(columns="image")
    items.insert(0, "item", range(len(items)))
    used = list(dict.fromkeys(items["image_id"]))
    images = pd.DataFrame({"image_id": used, "image": [source.image(i) for i in used]})
    return items, images, source.annotations(set(used))


def score(items: pd.DataFrame, replies: pd.DataFrame, *, rule: str = "pope",
          **_: Any) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Per method and split: accuracy, precision, recall, F1 and yes-ratio (fractions); each reply with its
    parsed prediction; and what was used (`rule`).

    Args:
        items: from `build_items`.
        replies: method, item, reply: every method's reply to every item.
        rule: the answer rule (`metrics.pope.ANSWER_RULES`).
    """
    rows = []
    for method, group in replies.groupby("method", sort=False):
        ordered = items.merge(group[["item", "reply"]], on="item", how="left", validate="one_to_one")
        rows.append(score_pope(ordered, ordered["reply"].tolist(), rule=rule).assign(method=method))
    table = pd.concat(rows, ignore_index=True)[list(COLUMNS)]
    details = replies.merge(items, on="item")
    details["prediction"] = [parse_yes_no(reply, rule) for reply in details["reply"]]
    per_split = items.groupby("split", sort=False).size()
    return table, details, {"rule": rule, "questions_per_split": {k: int(v) for k, v in per_split.items()}}


def setting_lines(summary: dict[str, Any]) -> list[str]:
    """How the replies were read (the lines `bench_step.setting_lines` adds for POPE)."""
    return [f"answers read with the {summary['rule']!r} rule (metrics/pope.py); 'yes' is the positive class"]


def plot(table: pd.DataFrame, summary: dict[str, Any], path: Path, *, title: str) -> Path:
    """Accuracy and yes-ratio per split, one bar per method."""
    from halluscope.plots.bench_figures import plot_pope

    return plot_pope(table, path, title=title, n_per_split=max(summary["questions_per_split"].values()))
