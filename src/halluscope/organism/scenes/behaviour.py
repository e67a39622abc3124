"""Measuring the scenes organism on held-out synthetic scenes: the figures its model card states and its
behaviour test checks. The numbers are `halluscope bench pope` and `bench chair` on the held-out seed (same
code, a temporary run), plus where the hallucinations fall: on absent objects that co-occur with present ones
(ring neighbours) or elsewhere."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from halluscope.bench.step import bench_step
from halluscope.metrics.coco import image_objects
from halluscope.tasks.object_scenes import SceneConfig

__all__ = ["HELD_OUT_SEED", "TARGETS", "behaviour_report", "meets_targets"]

HELD_OUT_SEED = 20261122  # never used in training, whose scene pool has its own 62-bit seed
#: What the organism must show: adversarial POPE >= 10 points below random, CHAIR_i >= 10%, recall >= 60%.
TARGETS = {"pope_gap": 0.10, "chair_i": 0.10, "recall": 0.60}


def _neighbour_yes(details: pd.DataFrame, instances: dict[str, Any], config: SceneConfig) -> dict[str, Any]:
    """POPE's "yes" rate on absent objects, split by whether the object co-occurs with one in the image."""
    present = {entry["image_id"]: set(entry["objects"]) for entry in image_objects(instances)}
    absent = details[details["label"] == "no"]
    near_mask = pd.Series([bool(set(config.partners(o)) & present[i])
                           for i, o in zip(absent["image_id"], absent["object"])], index=absent.index)
    said_yes = absent["prediction"] == "yes"
    return {"yes_rate_absent_neighbour": float(said_yes[near_mask].mean()),
            "yes_rate_absent_other": float(said_yes[~near_mask].mean()),
            "n_absent_neighbour": int(near_mask.sum()), "n_absent_other": int((~near_mask).sum())}


def _hallucinated_neighbours(details: pd.DataFrame, config: SceneConfig) -> dict[str, Any]:
    """The share of CHAIR's hallucinated mentions that co-occur with an object in the image."""
    total = near = 0
    for truth, hallucinated in zip(details["ground_truth"], details["hallucinated"]):
        partners = {p for obj in truth for p in config.partners(obj)}
        total += len(hallucinated)
        near += sum(obj in partners for obj in hallucinated)
    return {"hallucinated_mentions": total, "hallucinated_neighbour_share": near / total if total else None}


def behaviour_report(vlm, *, n_images: int = 100, seed: int = HELD_OUT_SEED, batch_size: int = 32) -> dict[str, Any]:
    """POPE and CHAIR of `vlm` under greedy decoding on `n_images` held-out scenes each, and where its
    hallucinations fall (what the model card states)."""
    config = SceneConfig()
    with tempfile.TemporaryDirectory(prefix="halluscope-behaviour-") as scratch:
        pope = bench_step(Path(scratch) / "pope", benchmark="pope", model=vlm.name, vlm=vlm, n=n_images, seed=seed,
                          batch_size=batch_size)
        chair = bench_step(Path(scratch) / "chair", benchmark="chair", model=vlm.name, vlm=vlm, n=n_images,
                           seed=seed, batch_size=batch_size)
        pope_details = pd.read_parquet(pope["run"].path / "replies.parquet")
        instances = pope["run"].read_json("annotations")["instances"]
        chair_details = pd.read_parquet(chair["run"].path / "replies.parquet")
    accuracy = pope["table"].set_index("split")["accuracy"]
    chair_row = chair["table"].iloc[0]
    return {
        "pope": pope["table"].drop(columns="method").to_dict("records"),
        "pope_gap": float(accuracy["random"] - accuracy["adversarial"]),
        **_neighbour_yes(pope_details, instances, config),
        "chair": {k: float(chair_row[k]) for k in ("chair_s", "chair_i", "recall", "length")},
        **_hallucinated_neighbours(chair_details, config),
        "examples": [{"image_id": int(row.image_id), "caption": row.caption, "ground_truth": list(row.ground_truth),
                      "hallucinated": list(row.hallucinated)} for row in chair_details.head(5).itertuples()],
        # without the path the model was loaded from: the card sits in the model's directory, and a path of the
        # machine that wrote it would say nothing elsewhere
        "settings": {name: {k: v for k, v in run["summary"].items() if k not in ("table", "model")}
                     for name, run in (("pope", pope), ("chair", chair))},
        "n_parameters": sum(p.numel() for p in vlm.model.parameters()), "held_out_seed": seed,
    }


def meets_targets(report: dict[str, Any]) -> dict[str, bool]:
    """Each behaviour target and whether `report` meets it."""
    return {"pope_gap": report["pope_gap"] >= TARGETS["pope_gap"],
            "chair_i": report["chair"]["chair_i"] >= TARGETS["chair_i"],
            "recall": report["chair"]["recall"] >= TARGETS["recall"]}
