"""Head ranking on hand-built sweep tables with exact expected numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from halluscope.analysis import (
    best_k_sets,
    correction_matrix,
    head_rates,
    rank_heads,
    rank_report,
    resolve_head_set,
    top_k_sets,
)
from halluscope.errors import InputError

_LETTER = {"R": "corrected", "C": "copied", "O": "other", "N": "none", "X": "negated"}


def _sweep(spec: dict[tuple[int, int], dict[int, str]], baseline: dict[tuple[int, int], dict[int, str]] | None = None
           ) -> pd.DataFrame:
    """One row per (head, truth, letter): spec[(layer, head)][truth] = "RCO" means three prompts of that truth,
    the knockout giving corrected, copied, other. Sample ids are f"t{truth}-{i}", shared across heads."""
    rows = []
    for (layer, head), by_truth in spec.items():
        for truth, letters in by_truth.items():
            for i, letter in enumerate(letters):
                row = {"sample_id": f"t{truth}-{i}", "truth": truth, "condition": "+1", "layer": layer,
                       "head": head, "outcome": _LETTER[letter]}
                if baseline is not None:
                    row["baseline_outcome"] = _LETTER[baseline[(layer, head)][truth][i]]
                rows.append(row)
    return pd.DataFrame(rows)


def _records(table: pd.DataFrame, columns: list[str]) -> list[tuple]:
    return list(table[columns].itertuples(index=False, name=None))


# ---------------------------------------------------------------------------------------------- rates


def test_head_rates_keeps_zero_correction_groups_and_uses_each_heads_own_denominator():
    # no L0H0 in the sweep (the reference needed it for DATASET_SIZE); L2H1 saw only two prompts
    sweep = _sweep({
        (0, 1): {2: "RRC", 3: "CCO"},   # truth 3: zero corrections, must still have a row
        (1, 0): {2: "CCC", 3: "CCC"},   # never corrects
        (2, 1): {2: "R", 3: "N"},
    })
    overall = head_rates(sweep)
    assert _records(overall, ["layer", "head", "n", "corrected", "copied"]) == [
        (0, 1, 6, 2, 3), (1, 0, 6, 0, 6), (2, 1, 2, 1, 0)]
    assert overall["correction_rate"].tolist() == [2 / 6, 0.0, 0.5]
    assert overall["copy_rate"].tolist() == [3 / 6, 1.0, 0.0]
    assert "flip_rate" not in overall.columns

    per_truth = head_rates(sweep, by="truth")
    assert list(per_truth.columns[:3]) == ["truth", "layer", "head"]
    assert _records(per_truth, ["truth", "layer", "head", "n", "corrected", "correction_rate"]) == [
        (2, 0, 1, 3, 2, 2 / 3), (2, 1, 0, 3, 0, 0.0), (2, 2, 1, 1, 1, 1.0),
        (3, 0, 1, 3, 0, 0.0), (3, 1, 0, 3, 0, 0.0), (3, 2, 1, 1, 0, 0.0)]


def test_flip_rate_counts_baseline_copies_the_knockout_corrected():
    sweep = _sweep(
        {(0, 0): {2: "RCRO"}, (0, 1): {2: "RROO"}},
        baseline={(0, 0): {2: "CCRC"}, (0, 1): {2: "RROO"}},
    )
    rates = head_rates(sweep)
    # L0H0: baselines copied in rows 0, 1, 3; only row 0 became "corrected". Row 2 was already right, so it is
    # no correction (nor is any L0H1 row: the knockout changed nothing)
    assert _records(rates, ["layer", "head", "corrected", "n_baseline_copied", "flipped"]) == [
        (0, 0, 1, 3, 1), (0, 1, 0, 0, 0)]
    assert rates["flip_rate"].iloc[0] == 1 / 3
    assert math.isnan(rates["flip_rate"].iloc[1])  # no baseline copied: undefined, not 0


def test_a_knockout_that_changes_nothing_corrects_nothing_and_joins_no_set():
    sweep = _sweep({(0, 0): {2: "RRCC"}, (0, 1): {2: "RRRC"}},
                   baseline={(0, 0): {2: "RRCC"}, (0, 1): {2: "RRCC"}})
    assert _records(head_rates(sweep), ["layer", "head", "corrected"]) == [(0, 0, 0), (0, 1, 1)]
    assert best_k_sets(sweep, ks=(1, 2))["best2"] == [(0, 1)]


# ---------------------------------------------------------------------------------------------- ranks


def test_rank_heads_dense_ties_share_a_rank():
    sweep = _sweep({
        (3, 0): {2: "RRCC"},  # 0.5
        (0, 2): {2: "RRCC"},  # 0.5, tie
        (1, 1): {2: "RCCC"},  # 0.25
        (0, 0): {2: "CCCC"},  # 0
        (2, 2): {2: "RRRRCCCC"},  # 0.5 over eight prompts: ties with 2/4 exactly
    })
    ranked = rank_heads(sweep)
    assert list(ranked.columns[:3]) == ["rank", "layer", "head"]
    assert _records(ranked, ["rank", "layer", "head"]) == [
        (1, 0, 2), (1, 2, 2), (1, 3, 0), (2, 1, 1), (3, 0, 0)]


def test_rank_heads_ranks_within_each_group():
    sweep = _sweep({(0, 0): {2: "RR", 3: "CC"}, (0, 1): {2: "RC", 3: "RC"}, (1, 0): {2: "CC", 3: "RR"}})
    ranked = rank_heads(sweep, by=("truth",))
    assert _records(ranked, ["truth", "rank", "layer", "head"]) == [
        (2, 1, 0, 0), (2, 2, 0, 1), (2, 3, 1, 0),
        (3, 1, 1, 0), (3, 2, 0, 1), (3, 3, 0, 0)]


# ---------------------------------------------------------------------------------------------- sets


def test_top_k_is_the_union_over_truths_and_skips_zero_corrections():
    sweep = _sweep({
        (0, 3): {2: "RRR", 3: "CCC", 4: "CCC"},  # best for 2
        (5, 1): {2: "CCC", 3: "RRR", 4: "CCC"},  # best for 3
        (4, 2): {2: "CCC", 3: "RRR", 4: "CCC"},  # ties L5H1 for 3
        (1, 0): {2: "RRC", 3: "RCC", 4: "CCC"},  # second for 2 and for 3
        (2, 0): {2: "CCC", 3: "CCC", 4: "CCC"},  # never corrects
    })
    sets = top_k_sets(sweep, ks=(2, 1))
    assert list(sets) == ["top1", "top2"]
    # three heads for k=1: one from truth 2, a tie of two from truth 3; truth 4 corrects nothing, adds none
    assert sets["top1"] == [(0, 3), (4, 2), (5, 1)]
    assert sets["top2"] == [(0, 3), (1, 0), (4, 2), (5, 1)]
    # rank 3 is a zero for truths 2 and 3, and truth 4's rank 1 is a zero: L2H0 never enters a set
    assert top_k_sets(sweep, ks=(3,))["top3"] == sets["top2"]


def test_best_k_breaks_ties_by_layer_then_head_and_never_picks_zero_heads():
    sweep = _sweep({
        (2, 1): {2: "RRRC"},  # 0.75
        (1, 0): {2: "RRCC"},  # 0.5
        (0, 2): {2: "RRCC"},  # 0.5, wins the tie for best2
        (0, 5): {2: "RCCC"},  # 0.25
        (0, 0): {2: "CCCC"},  # 0: never chosen
    })
    sets = best_k_sets(sweep, ks=(1, 2, 3, 10))
    assert sets == {
        "best1": [(2, 1)],
        "best2": [(0, 2), (2, 1)],
        "best3": [(0, 2), (1, 0), (2, 1)],
        "best10": [(0, 2), (0, 5), (1, 0), (2, 1)],
    }


@pytest.mark.parametrize("ks", [(), (0, 1), (1.5,), (True,)])
def test_bad_ks_raise(ks):
    sweep = _sweep({(0, 0): {2: "R"}})
    with pytest.raises(InputError, match="positive integers"):
        best_k_sets(sweep, ks=ks)


# ---------------------------------------------------------------------------------------------- report


def test_rank_report_is_strict_json_with_sets_and_names():
    sweep = _sweep(
        {(0, 3): {2: "RR", 3: "CC"}, (1, 0): {2: "RC", 3: "RR"}, (0, 0): {2: "CC", 3: "CC"}},
        baseline={(0, 3): {2: "CC", 3: "CC"}, (1, 0): {2: "OO", 3: "OO"}, (0, 0): {2: "CC", 3: "CC"}},
    )
    report = json.loads(json.dumps(rank_report(sweep), allow_nan=False))
    assert report["n_prompts"] == 4 and report["n_heads"] == 3
    assert [(e["name"], e["rank"], e["correction_rate"], e["n"]) for e in report["ranking"]] == [
        ("L1H0", 1, 0.75, 4), ("L0H3", 2, 0.5, 4), ("L0H0", 3, 0.0, 4)]
    first = report["ranking"][0]
    assert {k: first[k] for k in ("layer", "head", "copy_rate", "flip_rate")} == {
        "layer": 1, "head": 0, "copy_rate": 0.25, "flip_rate": None}  # L1H0's baselines never copied
    assert {t: [e["name"] for e in entries] for t, entries in report["by_truth"].items()} == {
        "2": ["L0H3", "L1H0"], "3": ["L1H0"]}
    assert report["top"]["top1"] == [[0, 3], [1, 0]]
    assert report["best"]["best1"] == [[1, 0]]
    assert report["names"]["top1"] == "L0H3,L1H0"
    assert report["names"]["best10"] == "L0H3,L1H0"
    assert set(report["names"]) == {"top1", "top2", "top3", "top4", "top5", "best1", "best3", "best5", "best10"}


# ---------------------------------------------------------------------------------------------- specs

_REPORT = {"top": {"top1": [[0, 3], [11, 15]], "top2": []}, "best": {"best3": [[0, 3], [0, 6], [11, 15]]}}


def test_resolve_head_set_names_and_lists():
    assert resolve_head_set("best3", _REPORT, 28, 28) == frozenset({(0, 3), (0, 6), (11, 15)})
    assert resolve_head_set(" TOP1 ", _REPORT, 28, 28) == frozenset({(0, 3), (11, 15)})
    assert resolve_head_set("L0H3, l27h27", None, 28, 28) == frozenset({(0, 3), (27, 27)})


def test_resolve_head_set_errors():
    with pytest.raises(InputError, match=r"run `halluscope rank --run RUN` first"):
        resolve_head_set("best3", None, 28, 28)
    with pytest.raises(InputError, match=r"unknown head set 'best5'; available: best3, top1, top2"):
        resolve_head_set("best5", _REPORT, 28, 28)
    with pytest.raises(InputError, match="'top2' is empty"):
        resolve_head_set("top2", _REPORT, 28, 28)
    with pytest.raises(InputError, match="no 'top'/'best' sets"):
        resolve_head_set("top1", {"ranking": []}, 28, 28)
    with pytest.raises(InputError, match=r"heads L28H0 in 'L0H3,L28H0' are out of range; valid layers 0\.\.27, "
                                         r"heads 0\.\.27"):
        resolve_head_set("L0H3,L28H0", None, 28, 28)
    with pytest.raises(InputError, match="out of range"):
        resolve_head_set("best3", _REPORT, 4, 8)  # a ranking from a bigger model
    with pytest.raises(InputError, match="malformed head 'L0X3'"):
        resolve_head_set("L0X3", None, 28, 28)
    with pytest.raises(InputError, match="no heads"):
        resolve_head_set(" , ", None, 28, 28)


# ---------------------------------------------------------------------------------------------- matrix


def test_correction_matrix_is_nan_where_not_swept():
    sweep = _sweep({(0, 1): {2: "RC"}, (1, 0): {2: "CC"}, (2, 2): {2: "RR"}})
    matrix = correction_matrix(sweep, n_layers=3, n_heads=3)
    expected = np.full((3, 3), np.nan)
    expected[0, 1], expected[1, 0], expected[2, 2] = 0.5, 0.0, 1.0
    np.testing.assert_array_equal(matrix, expected)  # NaNs compare equal here
    with pytest.raises(InputError, match=r"outside layers 0\.\.1, heads 0\.\.2, e\.g\. L2H2"):
        correction_matrix(sweep, n_layers=2, n_heads=3)


# ------------------------------------------------------------------------------------------ validation


def test_missing_columns_name_needed_and_found():
    sweep = _sweep({(0, 0): {2: "R"}}).drop(columns=["layer"])
    with pytest.raises(InputError, match=r"lacks column\(s\) \['layer'\]; needs .*'layer'.*found \['sample_id'"):
        head_rates(sweep)
    with pytest.raises(InputError, match=r"lacks column\(s\) \['sample_id'\]"):
        rank_report(_sweep({(0, 0): {2: "R"}}).drop(columns=["sample_id"]))


def test_empty_table_raises():
    empty = _sweep({(0, 0): {2: "R"}}).iloc[:0]
    with pytest.raises(InputError, match="has no rows; run `halluscope sweep"):
        rank_heads(empty)


def test_bad_values_raise():
    sweep = _sweep({(0, 0): {2: "RC"}})
    with pytest.raises(InputError, match=r"unknown outcome value\(s\) \['fixed'\]"):
        head_rates(sweep.assign(outcome=["fixed", "copied"]))
    with pytest.raises(InputError, match=r"unknown baseline_outcome value\(s\) \['<missing>'\]"):
        head_rates(sweep.assign(baseline_outcome=["copied", None]))
    with pytest.raises(InputError, match="'head' has 1 value"):
        head_rates(sweep.assign(head=[0, 1.5]))
    with pytest.raises(InputError, match="'layer' has 1 value"):
        head_rates(sweep.assign(layer=[0, -1]))
    with pytest.raises(InputError, match="per \\(layer, head\\)"):
        rank_heads(sweep, by=("layer",))
    with pytest.raises(InputError, match="expects a pandas DataFrame"):
        head_rates(sweep.to_dict("records"))


def test_importing_ranking_does_not_import_torch():
    code = "import sys, halluscope.analysis.ranking; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
