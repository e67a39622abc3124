"""`apasi_data_step`: APASI's preference pairs for one model, made from the model's own descriptions, into a
resumable run directory (step "apasi-data"; its arguments are the run's identity).

    RUN/images.parquet        image_id, image (PNG bytes of synthetic scenes, absolute paths of a directory's)
    RUN/descriptions.parquet  item, image_id, prompt, description: the model's greedy descriptions (stage 1)
    RUN/graph.json            object counts, co-occurrences, neighbours, phrasings and order (stage 2)
    RUN/pairs.parquet         item, image_id, prompt, chosen, rejected, variant, guide_objects, n_sentences,
                              replaced (stage 3: one pair per description that could be injected; the
                              self-check variant: up to two, `selfcheck.py`)
    RUN/checks.parquet        item, object, reply, answer, p_yes, doubted: the self-check variant's questions, the
                              model's greedy replies and their reading, P(yes) and whether the object is doubted
    RUN/parts/apasi-describe/, apasi-continue/, apasi-check/, apasi-score/   finished shards of the model stages

Stage 1 and the blind continuation of stage 3 are written in shards, so an interrupted run resumes where it
stopped; stage 2 and the injection plans are recomputed (they are cheap and deterministic). Each description's
injection draws from its own generator, seeded by the run's seed and the description's index.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from halluscope.errors import InputError
from halluscope.metrics.chair import CHAIR_PROMPT
from halluscope.runs import Run, writer_lock
from halluscope.steps import Progress, load_model, no_progress, sharded_step
from halluscope.tasks.scenes import derive_seed
from halluscope.training.apasi.continuation import CONTINUATION, complete_plans
from halluscope.training.apasi.graph import Description, MentionReader, ObjectGraph, build_graph, read_description
from halluscope.training.apasi.inject import DROP_REASONS, Plan, plan_injection, surface_words
from halluscope.training.apasi.inject import VARIANTS as INJECTION_VARIANTS
from halluscope.training.apasi.selfcheck import SELF_CHECK, check_questions, read_answers, self_check_texts
from halluscope.training.apasi.sentences import join_sentences
from halluscope.training.apasi.settings import DOUBT
from halluscope.training.apasi.sources import load_images
from halluscope.training.checks import CHECK, check_doubt, check_objects, separation

__all__ = ["DATA_STEP", "DESCRIPTION_DECODING", "PAIR_COLUMNS", "VARIANTS", "apasi_data_step", "check_data_options"]

#: The run step that makes preference data (and the first step of a data run).
DATA_STEP = "apasi-data"
#: How the chosen descriptions are decoded.
DESCRIPTION_DECODING = "greedy (do_sample=False, num_beams=1; the checkpoint's sampling settings ignored)"
#: `--variant` values: the injection variants (`inject.py`) and the self-check (`selfcheck.py`).
VARIANTS = (*INJECTION_VARIANTS, SELF_CHECK)
#: The columns of `pairs.parquet`.
PAIR_COLUMNS = ("item", "image_id", "prompt", "chosen", "rejected", "variant", "guide_objects", "n_sentences",
                "replaced")


def check_data_options(*, variant: str, rate: float, top_k: int, objects: int, n: int, max_new_tokens: int,
                       batch_size: int, prompt: str, doubt: float = DOUBT) -> None:
    """InputError naming the first option that cannot be used (checked before anything loads or is written)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown --variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if not 0.0 < rate < 1.0:
        raise InputError(f"--rate {rate!r}; expected a fraction strictly between 0 and 1, e.g. 0.2")
    check_doubt(doubt)
    for name, value in (("--top-k", top_k), ("--objects", objects), ("--n", n), ("--max-new-tokens", max_new_tokens),
                        ("--batch-size", batch_size)):
        if value < 1:
            raise InputError(f"{name} {value}; expected a whole number >= 1")
    if not prompt.strip():
        raise InputError("--prompt is empty; pass the instruction the descriptions answer, e.g. 'Describe this "
                         "image.'")


def apasi_data_step(out: str | Path, *, model: str, images: str = "synthetic", n: int = 500, seed: int = 1,
                    prompt: str | None = None, variant: str = "auto", rate: float = 0.2, top_k: int = 10,
                    objects: int = 1, doubt: float = DOUBT, max_new_tokens: int = 64, nlp: str = "auto",
                    batch_size: int = 16, force: bool = False, vlm=None, progress: Progress = no_progress
                    ) -> dict[str, Any]:
    """Make APASI preference pairs for `model` from `n` images into run `out`.

    Args:
        images: "synthetic" or a directory of images (`sources.load_images`).
        seed: the synthetic scenes, the directory's image draw and every injection draw. `bench` uses 0: keep
            the training images apart from the benchmark's.
        prompt: the instruction the descriptions answer (default CHAIR's, `metrics.chair.CHAIR_PROMPT`).
        variant: "replace", "insert", "swap" or "auto" (`inject.plan_injection`), or "self-check" (`selfcheck.py`).
        rate: share of sentences replaced (replace variant). top_k: how many of a remaining object's most
            co-occurring absent objects the guide object is drawn from. objects: objects injected (insert, swap).
        doubt: the self-check's P(yes) below which a named object is doubted and left out of the chosen side.
        max_new_tokens: length of the greedy descriptions.
        nlp: CHAIR's NLP components for reading object mentions ("auto", "nltk", "offline").

    Returns:
        {"pairs": the pairs table, "graph": the ObjectGraph, "summary": what the run records, "run": the Run}.

    Raises:
        InputError: a bad option or image source, before anything is written.
        RunError: `out` holds a different run (pass force=True to start over).
    """
    from halluscope.metrics.nlp import load_nlp

    prompt = CHAIR_PROMPT if prompt is None else prompt
    check_data_options(variant=variant, rate=rate, top_k=top_k, objects=objects, n=n,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, prompt=prompt, doubt=doubt)
    source = load_images(images, n=n, seed=seed)
    components = load_nlp(nlp)
    vlm = vlm if vlm is not None else load_model(model)
    began = time.time()
    arguments = {"images": source.source, "n": n, "seed": seed, "prompt": prompt,
                 "variant": variant, "rate": rate, "top_k": top_k, "objects": objects, "skip_sentences": 1,
                 "max_new_tokens": max_new_tokens, "description_decoding": DESCRIPTION_DECODING,
                 "continuation": CONTINUATION, "vocabulary": source.vocabulary.name, "chair_method": "opera",
                 "nlp": nlp, "nlp_components": dict(components.names), "batch_size": batch_size}
    if variant == SELF_CHECK:
        arguments.update(check=CHECK, doubt=doubt)
    with writer_lock(out, create=True):
        run = Run.create(out, step=DATA_STEP, arguments=arguments, model=vlm.describe(), force=force)
        if not run.has_table("images"):
            run.write_table("images", source.table)
        items = run.read_table("images")
        descriptions = _describe(run, vlm, items, prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 force=force, progress=progress)
        reader = MentionReader(source.vocabulary, components)
        read = [read_description(text, reader) for text in descriptions["description"]]
        graph = build_graph(read, source.vocabulary.name)
        run.write_json("graph", graph.to_dict())
        if variant == SELF_CHECK:
            answers, checks = _check(run, vlm, items, read, doubt=doubt, batch_size=batch_size, force=force,
                                     progress=progress)
            pairs, dropped = _self_check_pairs(descriptions, read, answers, seed)
        else:
            words = surface_words(source.vocabulary)
            plans = [plan_injection(d, graph, words, random.Random(derive_seed(seed, "apasi-inject", item)),
                                    variant=variant, rate=rate, top_k=top_k, objects=objects)
                     for item, d in enumerate(read)]
            rejected = _rejected(run, vlm, plans, prompt, batch_size=batch_size, force=force, progress=progress)
            pairs, dropped = _pairs(descriptions, read, plans, rejected, reader)
        run.write_table("pairs", pairs)
        summary = _summary(pairs, dropped, graph, n_images=len(items), seconds=time.time() - began)
        if source.truth is not None and len(pairs):
            summary["absent_mentions"] = _absent_mentions(pairs, source.truth, reader)
        if variant == SELF_CHECK and source.truth is not None:
            summary["self_check"] = _separation(checks, items, source.truth, doubt)
        run.finish_step(DATA_STEP, summary)
    return {"pairs": pairs, "graph": graph, "summary": summary, "run": run}


def _describe(run: Run, vlm, items: pd.DataFrame, prompt: str, *, max_new_tokens: int, batch_size: int,
              force: bool, progress: Progress) -> pd.DataFrame:
    """Stage 1: the model's greedy description of every image (the chosen side), from finished shards plus the
    rest; also written as `descriptions.parquet`."""
    from halluscope.evaluation import iter_replies

    def compute(vlm, rows: Sequence, start: int) -> Iterator[pd.DataFrame]:
        for replies in iter_replies(vlm, list(rows), batch_size=batch_size, max_new_tokens=max_new_tokens):
            yield pd.DataFrame({"item": range(start, start + len(replies)), "description": [r for r, _ in replies]})
            start += len(replies)

    pairs = [(image, prompt) for image in items["image"]]
    arguments = {"prompt": prompt, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    table = sharded_step(run, "apasi-describe", arguments, pairs, compute, columns=("item", "description"),
                         chunk=max(batch_size, 32), force=force, progress=progress, vlm=vlm)
    table = table.assign(image_id=items["image_id"].to_numpy()[table["item"].to_numpy()], prompt=prompt)
    table = table[["item", "image_id", "prompt", "description"]]
    run.write_table("descriptions", table)
    return table


def _rejected(run: Run, vlm, plans: list[Plan | str], prompt: str, *, batch_size: int, force: bool,
              progress: Progress) -> dict[int, str]:
    """Stage 3's texts: item -> rejected text, the replace plans continued by the model (in shards), the insert
    and swap plans as they are."""
    pending = [(item, plan) for item, plan in enumerate(plans) if isinstance(plan, Plan) and plan.pending]
    texts = {item: join_sentences(plan.sentences) for item, plan in enumerate(plans)
             if isinstance(plan, Plan) and not plan.pending}

    def compute(vlm, rows: Sequence, start: int) -> Iterator[pd.DataFrame]:
        done = complete_plans(vlm, [prompt] * len(rows), [plan for _, plan in rows], batch_size=batch_size,
                              max_new_tokens=CONTINUATION["max_new_tokens"],
                              repetition_penalty=CONTINUATION["repetition_penalty"],
                              min_new_tokens=CONTINUATION["min_new_tokens"])
        yield pd.DataFrame({"item": [item for item, _ in rows], "rejected": done})

    table = sharded_step(run, "apasi-continue", {**CONTINUATION, "batch_size": batch_size}, pending, compute,
                         columns=("item", "rejected"), chunk=max(batch_size, 32), force=force, progress=progress,
                         vlm=vlm)
    texts.update(zip(table["item"].tolist(), table["rejected"].tolist()))
    return texts


def _pairs(descriptions: pd.DataFrame, read: list[Description], plans: list[Plan | str], rejected: dict[int, str],
           reader: MentionReader) -> tuple[pd.DataFrame, Counter]:
    """The pairs whose rejected text names every injected object and differs from the chosen one, and the
    number of descriptions dropped per reason."""
    rows, dropped = [], Counter()
    for item, (row, plan) in enumerate(zip(descriptions.itertuples(index=False), plans)):
        if not isinstance(plan, Plan):
            dropped[plan] += 1
            continue
        text = rejected[item]
        named = set(reader.objects(text))
        if text == row.description.strip() or not set(plan.guides) <= named:
            dropped["not_injected"] += 1
            continue
        rows.append({"item": item, "image_id": row.image_id, "prompt": row.prompt, "chosen": row.description,
                     "rejected": text, "variant": plan.variant, "guide_objects": list(plan.guides),
                     "n_sentences": len(read[item].sentences), "replaced": list(plan.pending)})
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS)), dropped


def _check(run: Run, vlm, items: pd.DataFrame, read: list[Description], *, doubt: float, batch_size: int,
           force: bool, progress: Progress) -> tuple[dict[int, dict[str, str]], pd.DataFrame]:
    """The self-check's model stages (`training.checks.check_objects`) on every object each description names,
    written as `checks.parquet`; returns item -> {object: "no" where P(yes) < doubt, else "yes"}, and that table."""
    questions = check_questions(read)
    images = items["image"].tolist()
    checked = check_objects(run, vlm, [(images[item], obj) for item, obj in questions], prefix="apasi",
                            batch_size=batch_size, force=force, progress=progress)
    answers = read_answers(questions, checked["p_yes"].tolist(), doubt)
    checks = checked.assign(
        item=[item for item, _ in questions], object=[obj for _, obj in questions],
        doubted=[answers[item][obj] == "no" for item, obj in questions])[
        ["item", "object", "reply", "answer", "p_yes", "doubted"]]
    run.write_table("checks", checks)
    return answers, checks


def _self_check_pairs(descriptions: pd.DataFrame, read: list[Description], answers: dict[int, dict[str, str]],
                      seed: int) -> tuple[pd.DataFrame, Counter]:
    """The self-check and omit pairs of every description (`selfcheck.self_check_texts`), and the number of
    pairs not made per reason."""
    rows, dropped = [], Counter()
    for item, row in enumerate(descriptions.itertuples(index=False)):
        made = self_check_texts(read[item], answers.get(item, {}),
                                random.Random(derive_seed(seed, "apasi-omit", item)))
        dropped.update(made["reasons"])
        common = {"item": item, "image_id": row.image_id, "prompt": row.prompt,
                  "n_sentences": len(read[item].sentences), "replaced": []}
        if made["checked"] is not None and made["doubted"]:
            # both sides without outer whitespace, so that layout tells them apart nowhere
            rows.append({**common, "chosen": made["checked"], "rejected": row.description.strip(),
                         "variant": SELF_CHECK, "guide_objects": made["doubted"]})
        if made["omit_rejected"] is not None:
            rows.append({**common, "chosen": made["checked"], "rejected": made["omit_rejected"], "variant": "omit",
                         "guide_objects": made["omitted"]})
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS)), dropped


def _summary(pairs: pd.DataFrame, dropped: Counter, graph: ObjectGraph, *, n_images: int,
             seconds: float) -> dict[str, Any]:
    """What the run records about its pairs: counts by variant, drops by reason and the graph's size."""
    return {"images": n_images, "pairs": len(pairs),
            "variants": {str(k): int(v) for k, v in pairs["variant"].value_counts().items()},
            "dropped": {DROP_REASONS[k]: int(v) for k, v in sorted(dropped.items())},
            "graph": {"objects": len(graph.counts), "mean_objects_per_description": round(graph.mean_objects(), 3)},
            "seconds": round(seconds, 1)}


def _separation(checks: pd.DataFrame, items: pd.DataFrame, truth: dict[int, frozenset[str]],
                doubt: float) -> dict[str, float | int | None]:
    """Where the images' objects are known: how well the self-check's P(yes) tells the present objects the
    descriptions name from the absent ones (`training.checks.separation`)."""
    image_ids = items["image_id"].tolist()
    present = [obj in truth[image_ids[item]] for item, obj in zip(checks["item"], checks["object"])]
    return separation(checks["p_yes"], present, doubt)


def _absent_mentions(pairs: pd.DataFrame, truth: dict[int, frozenset[str]], reader: MentionReader
                     ) -> dict[str, float]:
    """Where the images' objects are known: the share of object mentions on each side that name an object the
    image does not hold (each side's CHAIR_i against the drawn objects)."""
    shares = {}
    for side in ("chosen", "rejected"):
        mentions = absent = 0
        for image_id, text in zip(pairs["image_id"], pairs[side]):
            found = reader.objects(text)
            mentions += len(found)
            absent += sum(o not in truth[image_id] for o in found)
        shares[side] = round(absent / mentions, 4) if mentions else float("nan")
    return shares
