"""`bench.compare`: per-image counts give exactly the benchmarks' own metrics (CHAIR, POPE, pih), the weighted
bootstrap equals resampling the images one by one and rescoring, an arm compared with itself changes by exactly
nothing, and arms that cannot be compared are refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from halluscope.bench.compare import Arm, arm_counts, bootstrap_weights, compare_arms, metric_values
from halluscope.errors import InputError
from halluscope.metrics.pih import summarize
from halluscope.metrics.pope import pope_metrics

SPLITS = ("random", "popular", "adversarial")


def _chair_replies(rng: np.random.Generator, n_images: int) -> pd.DataFrame:
    """Scored captions as `bench chair` writes them: one per image, its object counts."""
    mentioned = rng.integers(0, 6, n_images)
    hallucinated = rng.integers(0, mentioned + 1)
    truth = rng.integers(1, 5, n_images)
    return pd.DataFrame({"image_id": np.arange(n_images) + 10, "n_mentions": mentioned,
                         "n_hallucinated": hallucinated, "n_recalled": rng.integers(0, truth + 1),
                         "n_ground_truth": truth, "chair_s": (hallucinated > 0).astype(int),
                         "length": rng.integers(3, 30, n_images)})


def _pope_replies(rng: np.random.Generator, n_images: int) -> pd.DataFrame:
    """Read answers as `bench pope` writes them: six questions per image and split."""
    rows = [{"split": split, "image_id": image + 10, "label": label, "prediction": rng.choice(["yes", "no"])}
            for split in SPLITS for image in range(n_images) for label in ("yes", "no") * 3]
    return pd.DataFrame(rows)


def _pih_replies(rng: np.random.Generator, n_images: int) -> pd.DataFrame:
    """Classified replies as `bench pih` writes them: per image the base question, the control and two claims."""
    rows = [{"sample_id": f"{image}-{condition}", "image_id": f"img{image}", "condition": condition, "truth": 3,
             "outcome": rng.choice(["copied", "corrected", "other"])}
            for image in range(n_images) for condition in ("base", "control", "+1", "+2")]
    return pd.DataFrame(rows)


def _pih_by_hand(replies: pd.DataFrame) -> dict[str, float]:
    summary = summarize(replies)
    return {m: np.nan if summary[m] is None else summary[m] for m in ("base_accuracy", "copy_rate",
                                                                      "correction_rate")}


def _chair_by_hand(replies: pd.DataFrame) -> dict[str, float]:
    return {"chair_s": replies["chair_s"].mean(),
            "chair_i": replies["n_hallucinated"].sum() / replies["n_mentions"].sum(),
            "recall": replies["n_recalled"].sum() / replies["n_ground_truth"].sum(),
            "length": replies["length"].mean()}


def _pope_by_hand(replies: pd.DataFrame) -> dict[tuple[str, str], float]:
    values = {}
    for split, group in replies.groupby("split", sort=False):
        scores = pope_metrics(group["label"].tolist(), group["prediction"].tolist())
        values.update({(split, m): scores[m] for m in ("accuracy", "precision", "recall", "f1", "yes_ratio")})
    return values


def _by_hand(benchmark: str, replies: pd.DataFrame) -> dict:
    return {"chair": _chair_by_hand, "pope": _pope_by_hand, "pih": _pih_by_hand}[benchmark](replies)


def _replies(benchmark: str, seed: int, n_images: int) -> pd.DataFrame:
    make = {"chair": _chair_replies, "pope": _pope_replies, "pih": _pih_replies}[benchmark]
    return make(np.random.default_rng(seed), n_images)


@pytest.mark.parametrize("benchmark", ["chair", "pope", "pih"])
def test_summed_counts_give_the_benchmarks_own_metrics(benchmark):
    replies = _replies(benchmark, 0, 7)
    counts = arm_counts(benchmark, replies)
    values = metric_values(benchmark, counts.sum().to_frame().T).iloc[0]
    for key, expected in _by_hand(benchmark, replies).items():
        assert values[key] == pytest.approx(expected, rel=1e-12, abs=0)


def test_pope_f1_is_undefined_where_the_scorer_says_so():
    replies = pd.DataFrame({"split": "random", "image_id": [1, 1], "label": ["yes", "no"], "prediction": "no"})
    values = metric_values("pope", arm_counts("pope", replies).sum().to_frame().T).iloc[0]
    scores = pope_metrics(["yes", "no"], ["no", "no"])
    assert np.isnan(values[("random", "f1")]) and np.isnan(scores["f1"])
    assert np.isnan(values[("random", "precision")]) and values[("random", "accuracy")] == scores["accuracy"]


@pytest.mark.parametrize("benchmark", ["chair", "pope", "pih"])
@pytest.mark.parametrize("n_images", [1, 2, 9])
def test_weighted_resamples_equal_rescoring_the_resampled_images(benchmark, n_images):
    replies = _replies(benchmark, 1, n_images)
    counts = arm_counts(benchmark, replies)
    weights = bootstrap_weights(n_images, 25, seed=3)
    assert (weights.sum(axis=1) == n_images).all()
    drawn = metric_values(benchmark, pd.DataFrame(weights @ counts.to_numpy(dtype="float64"),
                                                  columns=counts.columns))
    images = counts.index.to_numpy()
    for b, row in enumerate(weights):
        resampled = pd.concat([replies[replies["image_id"] == image] for image in np.repeat(images, row)])
        for key, expected in _by_hand(benchmark, resampled).items():
            got = drawn[key].iloc[b]
            assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize("benchmark", ["chair", "pope", "pih"])
def test_intervals_are_the_percentiles_of_the_resampled_changes(benchmark):
    before, after = _replies(benchmark, 2, 12), _replies(benchmark, 5, 12)
    arms = [Arm("before", "m0", arm_counts(benchmark, before)), Arm("after", "m1", arm_counts(benchmark, after))]
    table = compare_arms(benchmark, arms, resamples=40, seed=7, level=0.9)
    weights = bootstrap_weights(12, 40, seed=7)
    images = arms[0].counts.index.to_numpy()
    per_draw = []
    for row in weights:
        picked = np.repeat(images, row)
        one = [_by_hand(benchmark, pd.concat([r[r["image_id"] == i] for i in picked])) for r in (before, after)]
        per_draw.append({k: one[1][k] - one[0][k] for k in one[0]})
    point = {k: _by_hand(benchmark, after)[k] - _by_hand(benchmark, before)[k] for k in per_draw[0]}
    rows = table[table["arm"] == "after"]
    for record in rows.to_dict("records"):
        key = (record["split"], record["metric"]) if benchmark == "pope" else record["metric"]
        changes = np.array([d[key] for d in per_draw], dtype="float64")
        changes = changes[np.isfinite(changes)]
        assert record["change"] == pytest.approx(point[key], rel=1e-12, abs=1e-15)
        assert record["change_low"] == pytest.approx(np.percentile(changes, 5), rel=1e-12, abs=1e-15)
        assert record["change_high"] == pytest.approx(np.percentile(changes, 95), rel=1e-12, abs=1e-15)
        assert record["model"] == "m1"


def test_an_arm_compared_with_itself_changes_by_nothing():
    counts = arm_counts("chair", _replies("chair", 4, 10))
    table = compare_arms("chair", [Arm("a", "m", counts), Arm("b", "m", counts.copy())], resamples=50)
    changes = table[["change", "change_low", "change_high", "relative", "relative_low", "relative_high"]]
    assert (changes == 0).all().all()
    assert table["value"].tolist() == table["baseline"].tolist()


def test_arms_that_cannot_be_compared_are_refused():
    counts = arm_counts("chair", _replies("chair", 4, 10))
    with pytest.raises(InputError, match="pass two or more bench runs"):
        compare_arms("chair", [Arm("a", "m", counts)])
    with pytest.raises(InputError, match="scored on other images"):
        compare_arms("chair", [Arm("a", "m", counts), Arm("b", "m", counts.iloc[:5])])
    with pytest.raises(InputError, match="--level 1.5"):
        compare_arms("chair", [Arm("a", "m", counts), Arm("b", "m", counts)], level=1.5)
