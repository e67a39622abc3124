"""`locate_step` and `edit_step`: ALEAHallu's stages as run directories, what `halluscope alea locate` and
`halluscope alea edit` do.

A locate run (step "alea-locate") holds the images and items asked (`images.parquet`, `items.parquet`,
`annotations.json`), the model's replies (resumable shards under `parts/alea-replies/`, then `replies.parquet`),
the activation dataset (`pairs.parquet`), the per-pair, per-layer differentials (`layers.parquet`), the located
layers and parameters with the model they were located on (`located.json`) and `plots/differential.png`. With
`doubt`, it also holds the model's answers about the absent objects its captions name (`checks.parquet`, from the
shards under `parts/alea-check/` and `parts/alea-score/`).

An edit run (step "alea-edit") is at the same time a checkpoint that `load_vlm` opens: `config.json`,
`model.safetensors` and the processor files (`save_pretrained`), plus the adversarial prefix (`prefix.safetensors`),
the training log (`trainlog.json`), each edited parameter's change (`changes.parquet`) and the manifest with every
hyper-parameter. While it trains, a state file under `parts/alea-edit/` is rewritten every `save_every` steps; a
killed edit resumes from it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from halluscope.errors import InputError
from halluscope.runs import Run, writer_lock
from halluscope.steps import Progress, load_model, no_progress, sharded_step
from halluscope.training.alea.activations import KINDS, caption_pairs, pope_pairs
from halluscope.training.alea.edit import EditConfig, edit_parameters
from halluscope.training.alea.locate import (DEFAULT_MODULES, SCORES, layer_differentials, located_parameters,
                                             parameter_names, select_layers)
from halluscope.training.alea.prefix import SoftPrefix, initial_prefix, mean_nll, train_prefix
from halluscope.training.checks import CHECK, check_doubt, check_objects
from halluscope.training.sequences import response_ids

__all__ = ["LOCATED", "edit_step", "locate_step", "read_located"]

#: The document of a locate run that `edit` reads.
LOCATED = "located"
#: The answer rule POPE replies are read with while building pairs.
_RULE = "pope"
#: Reply budgets: room for a caption of every object in a scene, and for "No, there is no hexagon." (the
#: benchmarks' defaults).
CAPTION_TOKENS, ANSWER_TOKENS = 64, 16


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InputError(f"unknown --kind {(unknown or [''])[0]!r}; use one or more of {', '.join(KINDS)}")
    return [k for k in KINDS if k in kinds]


def _items(images: str, *, kinds: list[str], n: int, seed: int, prompt: str | None,
           template: str | None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The captions and POPE questions asked (item, kind, image_id, prompt, object, label, max_new_tokens), their
    images and annotations. Every image is captioned (a directory's: `n` drawn with `seed`) and asked POPE's
    questions of all three splits, each (image, object) once."""
    import random

    from halluscope.bench.data import load_bench_data
    from halluscope.metrics.chair import CHAIR_PROMPT
    from halluscope.metrics.coco import image_objects
    from halluscope.metrics.pope import POPE_TEMPLATE, build_pope

    synthetic = images == "synthetic"
    source = load_bench_data(images, n=n, seed=seed, min_categories=3 if "pope" in kinds else 2)
    ids = [image["id"] for image in source.instances["images"]]
    if not synthetic:
        if n > len(ids):
            raise InputError(f"--n {n} is more than the {len(ids)} images of {images}; pass --n <= {len(ids)}")
        ids = sorted(random.Random(seed).sample(ids, n))
    frames = []
    if "caption" in kinds:
        frames.append(pd.DataFrame({"kind": "caption", "image_id": ids, "prompt": prompt or CHAIR_PROMPT,
                                    "object": "", "label": "", "max_new_tokens": CAPTION_TOKENS}))
    if "pope" in kinds:
        chosen = set(ids)
        questions = build_pope([entry for entry in image_objects(source.instances) if entry["image_id"] in chosen],
                               n_images=None, seed=seed, template=template or POPE_TEMPLATE)
        questions = questions.drop_duplicates(["image_id", "object"]).rename(columns={"text": "prompt"})
        frames.append(questions.assign(kind="pope", max_new_tokens=ANSWER_TOKENS)[
            ["kind", "image_id", "prompt", "object", "label", "max_new_tokens"]])
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "item", range(len(table)))
    used = list(dict.fromkeys(table["image_id"]))
    pictures = pd.DataFrame({"image_id": used, "image": [source.image(i) for i in used]})
    return table, pictures, source.annotations(set(used))


def _replies(run: Run, vlm, items: pd.DataFrame, image_of: dict, *, batch_size: int,
             progress: Progress) -> pd.DataFrame:
    """The model's greedy reply to every item (item, reply, reply_ids), from finished shards plus the rest."""
    from halluscope.evaluation import iter_replies

    rows = [(image_of[i], p, t) for i, p, t in zip(items["image_id"], items["prompt"], items["max_new_tokens"])]

    def compute(vlm, chunk: list, start: int):
        for tokens in dict.fromkeys(t for _, _, t in chunk):  # items of one kind share a budget
            part = [(k, (image, prompt)) for k, (image, prompt, t) in enumerate(chunk) if t == tokens]
            done = 0
            for replies in iter_replies(vlm, [pair for _, pair in part], batch_size=batch_size,
                                        max_new_tokens=int(tokens)):
                index = [start + k for k, _ in part[done:done + len(replies)]]
                done += len(replies)
                yield pd.DataFrame({"item": index, "reply": [r for r, _ in replies],
                                    "reply_ids": [ids for _, ids in replies]})

    return sharded_step(run, "alea-replies", {"decoding": "greedy", "batch_size": batch_size}, rows, compute,
                        columns=("item", "reply", "reply_ids"), chunk=max(batch_size, 32), force=False,
                        progress=progress, vlm=vlm)


def _pairs(vlm, items: pd.DataFrame, replies: pd.DataFrame, annotations: dict[str, Any], *, nlp: str,
           chair_method: str, complete: bool, confirm: Callable[[list[tuple[Any, str]]], dict[Any, set[str]]] | None
           ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The activation dataset from the replies, and what it was built with. `confirm`, given the (image id,
    object) of every absent object the captions name, returns those the model confirms by image id."""
    from halluscope.metrics.chair import chair_ground_truth, extract_objects
    from halluscope.metrics.nlp import load_nlp
    from halluscope.metrics.vocabulary import ObjectVocabulary, coco_vocabulary

    answered = items.merge(replies, on="item", validate="one_to_one")
    to_ids = lambda text: response_ids(vlm, text)  # noqa: E731
    frames, notes = [], {}
    captions = answered[answered["kind"] == "caption"]
    if len(captions):
        rows = annotations["vocabulary"]
        vocabulary = (coco_vocabulary() if rows is None
                      else ObjectVocabulary.from_synonyms(annotations["vocabulary_name"], rows))
        components = load_nlp(nlp)
        truth = chair_ground_truth(annotations["instances"], annotations["captions"],
                                   image_ids=set(captions["image_id"]), vocabulary=vocabulary, nlp=components,
                                   method=chair_method)

        def extract(text: str) -> list[str]:
            return extract_objects(text, vocabulary=vocabulary, nlp=components, method=chair_method).objects

        absent = [(i, o) for i, r in zip(captions["image_id"], captions["reply"])
                  for o in dict.fromkeys(extract(r)) if o not in truth[i]]
        confirmed = confirm(absent) if confirm is not None else None
        frames.append(caption_pairs(captions, truth, extract, to_ids, complete=complete,
                                    order=vocabulary.node_words, confirmed=confirmed))
        notes = {"vocabulary": vocabulary.name, "nlp_components": dict(components.names),
                 "captions_with_absent_objects": len({i for i, _ in absent})}
        if confirmed is not None:
            notes["absent_objects_named"] = len(absent)
            notes["absent_objects_confirmed"] = sum(map(len, confirmed.values()))
    questions = answered[answered["kind"] == "pope"]
    if len(questions):
        frames.append(pope_pairs(questions, to_ids, rule=_RULE))
    pairs = pd.concat(frames, ignore_index=True)
    pairs.insert(0, "pair", range(len(pairs)))
    return pairs, notes


def _confirmed(run: Run, vlm, image_of: dict, asked: list[tuple[Any, str]], *, doubt: float, batch_size: int,
               force: bool, progress: Progress) -> dict[Any, set[str]]:
    """The absent objects the model confirms (P(yes) >= doubt, `training.checks`), by image id, from the (image id,
    object) `asked`; every answer is written as `checks.parquet`."""
    checked = check_objects(run, vlm, [(image_of[i], o) for i, o in asked], prefix="alea", batch_size=batch_size,
                            force=force, progress=progress)
    checked = checked.assign(image_id=[i for i, _ in asked], object=[o for _, o in asked],
                             confirmed=checked["p_yes"] >= doubt)
    run.write_table("checks", checked[["image_id", "object", "reply", "answer", "p_yes", "confirmed"]])
    confirmed: dict[Any, set[str]] = {}
    for image_id, obj in checked.loc[checked["confirmed"], ["image_id", "object"]].itertuples(index=False):
        confirmed.setdefault(image_id, set()).add(obj)
    return confirmed


def _differentials(vlm, pairs: pd.DataFrame, image_of: dict, *, n: int, seed: int,
                   batch_size: int) -> pd.DataFrame:
    """Both differential readings of every layer (`locate.layer_differentials`) for `n` pairs drawn with `seed`,
    one row per (pair, kind, layer)."""
    chosen = pairs.iloc[sorted(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:n].tolist())]

    def rows(column: str) -> list[tuple]:
        return [(image_of[i], p, list(ids)) for i, p, ids in zip(chosen["image_id"], chosen["prompt"], chosen[column])]

    table = layer_differentials(vlm, rows("grounded_ids"), rows("hallucinated_ids"), batch_size=batch_size)
    table["pair"] = chosen["pair"].to_numpy()[table["pair"]]
    table.insert(1, "kind", chosen.set_index("pair").loc[table["pair"], "kind"].to_numpy())
    return table


def locate_step(out: str | os.PathLike, *, model: str, images: str = "synthetic", n: int = 100, seed: int = 1,
                kinds: Sequence[str] = ("caption",), complete: bool = True, doubt: float | None = None,
                prompt: str | None = None, template: str | None = None, nlp: str = "auto", chair_method: str = "opera",
                locate_pairs: int = 50, score: str = "residual",
                max_layers: int | None = None, modules: Sequence[str] = DEFAULT_MODULES, batch_size: int = 16,
                force: bool = False, vlm=None, progress: Progress = no_progress) -> dict[str, Any]:
    """Build the activation dataset of `model` on `images` and locate its hallucination-prone parameters, into run
    `out` (module docstring).

    Args:
        images: "synthetic" (`n` object scenes drawn from `seed`; `halluscope bench` draws seed 0, so the default
            seed 1 keeps these images out of the benchmark's) or a COCO-format directory (`bench/data.py`).
        kinds: the pairs built, "caption" and/or "pope" (`activations.py`); ALEAHallu edits for CHAIR on caption
            pairs and, in a separate run, for POPE on POPE pairs.
        complete: add the present objects a caption left out to its grounded version (`activations.caption_pairs`).
        doubt: ask the model about every absent object its captions name (`training.checks`) and take as
            hallucinated only those it doubts (P(yes) < doubt); the ones it confirms stay in the grounded caption,
            since it cannot tell them from present ones. None (the paper's): every absent object is hallucinated.
        prompt, template: the caption prompt and POPE's question template (default the benchmarks').
        nlp, chair_method: CHAIR's NLP components and word extraction, for finding absent objects in captions.
        locate_pairs: pairs (drawn with `seed`) whose differentials locate the layers (ALEAHallu: 50).
        score, max_layers: the differential and the layer rule (`locate.select_layers`).
        modules: the modules edited in each located layer, dotted paths inside a decoder layer.

    Returns:
        The located document (layers, modules, parameters, per-layer summary, model) with the run under "run".

    Raises:
        InputError: an unknown kind, score or module, max_layers < 1, bad images, or no pair to locate with.
        RunError: `out` holds a different run (pass force=True to start over).
    """
    kinds = _check_kinds(list(kinds))
    if score not in SCORES:
        raise InputError(f"unknown --score {score!r}; use one of {', '.join(SCORES)}")
    if locate_pairs < 1 or (max_layers is not None and max_layers < 1):
        raise InputError(f"--locate-pairs {locate_pairs}, --max-layers {max_layers}: expected counts >= 1")
    if doubt is not None:
        check_doubt(doubt)
    if doubt is not None and "caption" not in kinds:
        raise InputError("--doubt checks the objects of caption pairs; add --kind caption or leave out --doubt")
    vlm = vlm if vlm is not None else load_model(model)
    parameter_names(vlm, [0], modules)  # an unknown module fails here, before anything is written
    arguments = {"images": images if images == "synthetic" else str(Path(images).resolve()), "n": n, "seed": seed,
                 "kinds": kinds, "complete": complete, "prompt": prompt, "template": template, "answer_rule": _RULE,
                 "nlp": nlp, "chair_method": chair_method, "locate_pairs": locate_pairs, "score": score,
                 "max_layers": max_layers, "modules": list(modules), "batch_size": batch_size}
    if doubt is not None:
        arguments.update(doubt=doubt, check=CHECK)
    built = None if not force and Run.exists(out) else _items(images, kinds=kinds, n=n, seed=seed, prompt=prompt,
                                                              template=template)
    with writer_lock(out, create=True):
        run = Run.create(out, step="alea-locate", arguments=arguments, model=vlm.describe(), force=force)
        if not run.has_table("items"):
            items, pictures, annotations = built or _items(images, kinds=kinds, n=n, seed=seed, prompt=prompt,
                                                           template=template)
            run.write_json("annotations", annotations)
            run.write_table("images", pictures)
            run.write_table("items", items)  # last: its presence says the items are complete
        items, pictures = run.read_table("items"), run.read_table("images")
        image_of = dict(zip(pictures["image_id"], pictures["image"]))
        replies = _replies(run, vlm, items, image_of, batch_size=batch_size, progress=progress)
        run.write_table("replies", replies)
        confirm = None if doubt is None else functools.partial(
            _confirmed, run, vlm, image_of, doubt=doubt, batch_size=batch_size, force=force, progress=progress)
        pairs, notes = _pairs(vlm, items, replies, run.read_json("annotations"), nlp=nlp, chair_method=chair_method,
                              complete=complete, confirm=confirm)
        if pairs.empty:
            raise InputError(f"no pair to locate with: the model's replies on {len(pictures)} images gave no caption "
                             f"naming an absent object; add --kind pope or use more images (--n)")
        run.write_table("pairs", pairs)
        differentials = _differentials(vlm, pairs, image_of, n=locate_pairs, seed=seed, batch_size=batch_size)
        layers, per_layer = select_layers(differentials, score=score, max_layers=max_layers)
        names = parameter_names(vlm, layers, modules)
        size = sum(p.numel() for p in located_parameters(vlm, names).values())
        located = {"model": {k: vlm.describe()[k] for k in ("name", "family", "fingerprint", "fingerprint_scheme")},
                   "score": score, "rule": "every layer some pair's differential peaks at" if max_layers is None
                   else f"the {max_layers} layers most pairs' differentials peak at",
                   "layers": layers, "modules": list(modules), "parameters": names, "n_parameters": size,
                   "share_of_model": size / sum(p.numel() for p in vlm.model.parameters()),
                   "pairs": {kind: int((pairs["kind"] == kind).sum()) for kind in kinds},
                   "located_with_pairs": int(differentials["pair"].nunique()),
                   "per_layer": per_layer.to_dict("records"), **notes}
        run.write_table("layers", differentials)
        run.write_json(LOCATED, located)
        from halluscope.plots.alea_figures import plot_differentials

        plot_differentials(per_layer, layers, run.plots_dir / "differential.png", score=score,
                           title=f"differential hidden states of {vlm.name}")
        run.finish_step("alea-locate", {k: located[k] for k in ("layers", "modules", "n_parameters", "pairs")})
    return {**located, "run": run}


def read_located(located: str | os.PathLike) -> tuple[Run, dict[str, Any]]:
    """A finished locate run and its located document.

    Raises:
        InputError: `located` holds no located document (not a locate run, or one that did not finish).
    """
    path = Path(located)
    if not (path / f"{LOCATED}.json").is_file():
        raise InputError(f"--located {str(path)!r} holds no {LOCATED}.json; run `halluscope alea locate --model M "
                         f"--out {path}` first (or pass the directory it wrote)")
    run = Run.open(path)
    return run, run.read_json(LOCATED)


def _check_same_model(vlm, located: dict[str, Any], path: Path) -> None:
    info = located["model"]
    if info.get("fingerprint") != vlm.fingerprint():
        raise InputError(f"--located {str(path)!r} was located on {info.get('name')!r} (weights "
                         f"{info.get('fingerprint')}), not on this --model {vlm.name!r} (weights {vlm.fingerprint()}); "
                         f"locate on it first with `halluscope alea locate --model {vlm.name} --out DIR`")


def _training_rows(run: Run, pairs: pd.DataFrame, column: str) -> list[tuple]:
    pictures = run.read_table("images")
    image_of = dict(zip(pictures["image_id"], pictures["image"]))
    return [(image_of[i], p, list(ids)) for i, p, ids in zip(pairs["image_id"], pairs["prompt"], pairs[column])]


def _save_checkpoint(run: Run, vlm) -> list[str]:
    """`save_pretrained` of the model and the processor into the run, each file moved in atomically; returns the
    file names."""
    scratch = run.path / f".save-{uuid.uuid4().hex}"
    try:
        vlm.model.save_pretrained(scratch)
        vlm.processor.save_pretrained(scratch)
        names = sorted(p.name for p in scratch.iterdir() if p.is_file())
        for name in names:
            run.write_file(name, lambda tmp, source=scratch / name: os.replace(source, tmp))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return names


def _changes(names: Sequence[str], params: dict, originals: dict, layers_path: str) -> pd.DataFrame:
    rows = []
    for name in names:
        layer, module = name.removeprefix(f"{layers_path}.").split(".", 1)
        before, after = originals[name].float(), params[name].detach().float()
        change = float((after - before).norm())
        rows.append({"parameter": name, "layer": int(layer), "module": module.rsplit(".", 1)[0],
                     "numel": before.numel(), "norm": float(before.norm()), "change_norm": change,
                     "relative_change": change / max(float(before.norm()), 1e-12)})
    return pd.DataFrame(rows)


def edit_step(out: str | os.PathLike, *, located: str | os.PathLike, model: str, config: EditConfig = EditConfig(),
              save_every: int = 50, log_every: int = 10, force: bool = False, vlm=None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the adversarial prefix on the locate run's pairs, edit the located parameters, and write the edited
    model into run `out` as a checkpoint `load_vlm(out)` opens (module docstring). Rerunning a finished edit does
    nothing; a killed one resumes.

    Args:
        located: a finished `locate_step` run of the same model.
        config: every hyper-parameter (`EditConfig`).
        save_every, log_every: steps between state files and between log entries.

    Returns:
        The step's summary (what the manifest records) with the run under "run".

    Raises:
        InputError: no located document at `located`, or one located on another model.
        RunError: `out` holds a different run (pass force=True to start over).
    """
    if save_every < 1 or log_every < 1:
        raise InputError(f"--save-every {save_every}, log every {log_every}: expected step counts >= 1")
    located_run, document = read_located(located)
    vlm = vlm if vlm is not None else load_model(model)
    _check_same_model(vlm, document, Path(located))
    names = document["parameters"]
    params = located_parameters(vlm, names)
    arguments = {"located": str(Path(located).resolve()), "located_model": document["model"],
                 "parameters": names, **config.to_dict()}
    with writer_lock(out, create=True):
        done = not force and Run.exists(out) and Run.open(out).status("alea-edit") == "finished"
        run = Run.create(out, step="alea-edit", arguments=arguments, model=vlm.describe(), force=force)
        if done:  # the same arguments (Run.create refuses others): nothing to train
            summary = run.manifest["steps"]["alea-edit"]["summary"]
            run.finish_step("alea-edit", summary)
            log(f"{run.path} already holds this edit; nothing to do (pass --force to redo it)")
            return {**summary, "run": run}
        began = time.time()
        pairs = located_run.read_table("pairs")
        state_dir = run.path / "parts" / "alea-edit"
        state_dir.mkdir(parents=True, exist_ok=True)
        hallucinated = _training_rows(located_run, pairs, "hallucinated_ids")
        grounded = _training_rows(located_run, pairs, "grounded_ids")
        prefix, prefix_log, neglect = _prefix(run, vlm, hallucinated, config, state_dir=state_dir,
                                              save_every=save_every, log_every=log_every, log=log)
        originals = {name: p.detach().clone() for name, p in params.items()}
        before = {"grounded_nll_under_prefix": mean_nll(vlm, grounded, prefix),
                  "hallucinated_nll": mean_nll(vlm, hallucinated)}
        edit_log = edit_parameters(vlm, grounded, names, prefix, config, state_path=state_dir / "edit_state.pt",
                                   save_every=save_every, log_every=log_every, log=log)
        after = {"grounded_nll_under_prefix": mean_nll(vlm, grounded, prefix),
                 "hallucinated_nll": mean_nll(vlm, hallucinated)}
        changes = _changes(names, params, originals, vlm.family.layers)
        run.write_table("changes", changes)
        files = _save_checkpoint(run, vlm)
        history = prefix_log + edit_log
        seconds = round(sum(entry["seconds"] for entry in (prefix_log[-1:] + edit_log[-1:])), 1)
        summary = {"pairs": {k: int(v) for k, v in pairs["kind"].value_counts().items()}, "layers": document["layers"],
                   "n_parameters": document["n_parameters"], "visual_neglect": neglect,
                   "edit": {"before": before, "after": after},
                   "final_loss": {"prefix": prefix_log[-1]["loss"], "edit": edit_log[-1]["loss"]},
                   "train_seconds": seconds, "wall_seconds_this_invocation": round(time.time() - began, 1),
                   "torch_threads": torch.get_num_threads(), "save_every": save_every, "files": files}
        run.write_file("trainlog.json", lambda tmp: tmp.write_text(json.dumps(
            {"config": config.to_dict(), "parameters": names, "history": history, "summary": summary,
             "torch": torch.__version__}, indent=1), encoding="utf-8"))
        run.finish_step("alea-edit", summary)
    return {**summary, "run": run}


def _prefix(run: Run, vlm, rows: list[tuple], config: EditConfig, *, state_dir: Path, save_every: int,
            log_every: int, log: Callable[[str], None]) -> tuple[SoftPrefix, list[dict], dict[str, float]]:
    """The adversarial prefix: read from `prefix.safetensors` when an earlier invocation trained it, else trained
    (resumably) and written there. Also its training log and the visual-neglect objective (mean NLL of the
    hallucinated responses) without a prefix, with the starting one and with the trained one."""
    from safetensors.torch import load_file, save_file

    path = run.path / "prefix.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        prefix = SoftPrefix(stored["vectors"], stored["slot_ids"].tolist())
        record = json.loads((run.path / "prefix.json").read_text(encoding="utf-8"))
        return prefix, record["history"], record["visual_neglect"]
    start = initial_prefix(vlm, config.prefix_tokens, config.seed)
    prefix, history = train_prefix(vlm, rows, tokens=config.prefix_tokens, lr=config.prefix_lr,
                                   epochs=config.prefix_epochs, batch_size=config.prefix_batch_size, seed=config.seed,
                                   state_path=state_dir / "prefix_state.pt", save_every=save_every,
                                   log_every=log_every, log=log)
    neglect = {"no_prefix": mean_nll(vlm, rows), "initial_prefix": mean_nll(vlm, rows, start),
               "trained_prefix": mean_nll(vlm, rows, prefix)}
    log("visual neglect (NLL of the hallucinated responses): " + ", ".join(f"{k} {v:.4f}" for k, v in neglect.items()))
    run.write_json("prefix", {"slot_ids": prefix.slot_ids, "history": history, "visual_neglect": neglect})
    tensors = {"vectors": prefix.vectors.detach().contiguous(), "slot_ids": torch.tensor(prefix.slot_ids)}
    run.write_file(path.name, lambda tmp: save_file(tensors, str(tmp)))
    return prefix, history, neglect
