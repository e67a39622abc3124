"""Token probabilities at the answer position: the run's prompts and their contrasts, alpha parsing, and the
probabilities against plain forwards with and without the knockout (every tiny family)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from halluscope.analysis.probabilities import (
    RunPrompt,
    answer_setup,
    parse_alphas,
    run_prompts,
    summarize_probabilities,
    token_probabilities,
)
from halluscope.errors import InputError
from halluscope.images import image_to_png_bytes
from halluscope.interventions.heads import HeadIntervention, intervene
from halluscope.sweep.slot import append_tokens
from halluscope.tasks.sample import Sample


def _samples() -> list[Sample]:
    img = Image.new("RGB", (224, 224), (245, 245, 245))
    ImageDraw.Draw(img).ellipse((40, 40, 120, 120), fill=(200, 30, 30))
    image = image_to_png_bytes(img)
    rows = [("base", None, "How many circles are in this image?"),
            ("control", 3, "Describe the 3 circles in this image."),
            ("+2", 5, "Describe the 5 circles in this image."),
            ("+1", 4, "Describe the 4 circles in this image.")]
    return [Sample(f"c-{cond}", "0000", image, "circles", 3, claim, prompt, cond, "count")
            for cond, claim, prompt in rows]


def _baseline(samples) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": [s.id for s in samples], "image_id": [s.image_id for s in samples],
                         "task": [s.task for s in samples], "condition": [s.condition for s in samples],
                         "truth": pd.array([s.truth for s in samples], dtype="Int64"),
                         "claim": pd.array([s.claim for s in samples], dtype="Int64"),
                         "prompt": [s.prompt for s in samples]})


def test_run_prompts_contrast_base_and_control_with_the_nearest_claim():
    samples = _samples()
    prompts = run_prompts(_baseline(samples), samples)
    got = {p.condition: (p.claim, p.contrast, p.misleading) for p in prompts}
    assert got == {"base": (None, 4, False), "control": (3, 4, False), "+2": (5, 5, True), "+1": (4, 4, True)}
    assert [p.condition for p in run_prompts(_baseline(samples), samples, conditions=["+1", "base"])] == ["base", "+1"]
    assert len(run_prompts(_baseline(samples), samples, limit=2)) == 2
    alone = run_prompts(_baseline(samples[:1]), samples[:1])[0]
    assert alone.contrast == 4  # no misleading prompt of that image: truth + 1


def test_run_prompts_errors_are_one_line():
    samples = _samples()
    for call in (lambda: run_prompts(_baseline(samples), samples, conditions=["+9"]),
                 lambda: run_prompts(_baseline(samples).drop(columns=["prompt"]), samples),
                 lambda: run_prompts(_baseline(samples), samples[:1]),
                 lambda: run_prompts(_baseline(samples), samples, limit=0)):
        with pytest.raises(InputError) as err:
            call()
        assert "\n" not in str(err.value)


def test_parse_alphas():
    assert parse_alphas("0, 0.25,1,1") == (0.0, 0.25, 1.0)
    for bad in ("", "a,1", "nan"):
        with pytest.raises(InputError, match="alphas"):
            parse_alphas(bad)


def test_probabilities_equal_plain_forwards_at_the_answer_slot(vlm):
    samples = _samples()
    prompts = [p for p in run_prompts(_baseline(samples), samples) if p.condition in ("base", "+1")]
    heads = {(0, 1), (1, 2)}
    table = token_probabilities(vlm, prompts, heads, alphas=(0, 1), max_new_tokens=4)
    assert set(table["alpha"]) == {0.0, 1.0} and set(table["condition"]) == {"base", "+1"}
    assert table["p_truth"].between(0, 1).all()
    assert table.loc[table["condition"] == "base", "p_claim"].isna().all()
    misleading_rows = table[table["condition"] == "+1"]
    assert misleading_rows["p_claim"].between(0, 1).all()
    assert (misleading_rows["p_truth"] + misleading_rows["p_claim"] <= 1 + 1e-6).all()  # two distinct tokens
    for prompt in prompts:  # one row per (alpha, form) of each prompt, no duplicates
        rows = table[table["sample_id"] == prompt.sample_id]
        assert len(rows) == 2 * rows["form"].nunique() and not rows.duplicated(["alpha", "form"]).any()
    misleading = prompts[1]
    setup = answer_setup(vlm, misleading, max_new_tokens=4)
    for slot in setup.slots:
        def word_probability(ids, knockout: bool) -> float:  # one plain forward over the slot and the word
            edit = intervene(vlm, HeadIntervention(heads, mode="zero")) if knockout else nullcontext()
            with edit, torch.inference_mode():
                logits = vlm.forward(append_tokens(slot.batch, ids[:-1]), use_cache=False).logits[0, -len(ids):]
            logp = logits.float().log_softmax(-1)
            return math.exp(sum(float(logp[j, t]) for j, t in enumerate(ids)))

        words = {(w.form, w.role): w.ids for w in slot.words}
        for form, (n_truth, n_claim) in slot.forms().items():
            assert words[form, "truth"] != words[form, "claim"]
            rows = table[(table["sample_id"] == misleading.sample_id) & (table["form"] == form)].set_index("alpha")
            assert (rows["tokens_truth"] == n_truth).all() and (rows["tokens_claim"] == n_claim).all()
            for alpha, knockout in ((1.0, False), (0.0, True)):
                assert rows.loc[alpha, "p_truth"] == pytest.approx(word_probability(words[form, "truth"], knockout),
                                                                   rel=1e-4)
                assert rows.loc[alpha, "p_claim"] == pytest.approx(word_probability(words[form, "claim"], knockout),
                                                                   rel=1e-4)
            assert (rows.loc[0.0, "p_truth"], rows.loc[0.0, "p_claim"]) != (rows.loc[1.0, "p_truth"],
                                                                            rows.loc[1.0, "p_claim"])
    summary = summarize_probabilities(table)
    row = summary[(summary["condition"] == "+1") & (summary["alpha"] == 0.0)].iloc[0]
    assert math.isclose(row["shift"], row["p_claim"] - row["p_truth"], abs_tol=1e-12)


def test_probability_errors(vlm):
    prompt = run_prompts(_baseline(_samples()), _samples())[0]
    with pytest.raises(InputError, match="out of range"):
        token_probabilities(vlm, [prompt], {(2, 0)})
    with pytest.raises(InputError, match="mode"):
        token_probabilities(vlm, [prompt], {(0, 0)}, mode="zero")
    skipped = []
    no_contrast = RunPrompt("x", "i", "base", "color", prompt.image, "What color is it?", "red", None, None)
    table = token_probabilities(vlm, [no_contrast], {(0, 0)}, on_skip=lambda sid, why: skipped.append(sid))
    assert table.empty and skipped == ["x"]
