"""`bench_step`: one benchmark, one model, several methods, into a run directory.

The run is created by step "bench-<benchmark>" with the data, prompt and decoding as its identity; it stores the
items (`items.parquet`), their images (`images.parquet`: PNG bytes of synthetic scenes, paths of a directory's)
and the annotations of those images (`annotations.json`: instances, reference captions, CHAIR vocabulary). Each
method is a step of its own ("<benchmark>-greedy", "<benchmark>-ablation_L0H1-L1H2") whose replies are written in
resumable shards, so an interrupted run resumes and a rerun with another method adds only that method's replies.
Every invocation writes the comparison table of the methods it names: `<benchmark>.parquet`, `<benchmark>.md`,
`<benchmark>_summary.json`, `replies.parquet` (each reply, parsed) and `plots/<benchmark>.png`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from halluscope.errors import InputError
from halluscope.runs import Run, writer_lock
from halluscope.scale import LOCAL, Scale
from halluscope.steps import Progress, fill_parts, load_model, no_progress

__all__ = ["BENCHMARKS", "DECODING", "bench_step", "markdown_table", "setting_lines"]

#: Benchmark name -> its module (items and scoring).
BENCHMARKS = {"pope": "halluscope.bench.pope", "chair": "halluscope.bench.chair"}
#: The decoding every method uses; only the methods' edits of the model differ.
DECODING = "greedy (do_sample=False, num_beams=1; the checkpoint's sampling settings ignored)"


def _module(benchmark: str):
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; use one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[benchmark])


def bench_step(out: str | Path, *, benchmark: str, model: str, data: str = "synthetic",
               methods: Sequence[str] = (), n: int = 100, seed: int = 0, prompt: str | None = None,
               max_new_tokens: int | None = None, batch_size: int = 16, rule: str = "pope", nlp: str = "auto",
               chair_method: str = "opera", force: bool = False, vlm=None,
               progress: Progress = no_progress, scale: Scale = LOCAL) -> dict[str, Any]:
    """Run `benchmark` ("pope" or "chair") on `model` under plain greedy and each of `methods`, into run `out`.

    Args:
        data: "synthetic" (`n` scenes drawn from `seed`) or a COCO-format directory (`bench/data.py`).
        methods: method specs (`bench/methods.py`); plain greedy is always the first row.
        n: images (POPE: images asked about, 6 questions each per split; CHAIR: images captioned).
        prompt: CHAIR's prompt or POPE's question template (default `CHAIR_PROMPT`, `POPE_TEMPLATE`).
        max_new_tokens: the decoding length (default 16 for POPE, 64 for CHAIR), the same for every method.
        rule: POPE's answer rule. nlp: CHAIR's NLP components ("auto", "nltk", "offline").
        chair_method: CHAIR's word extraction ("opera", "original").
        scale: where the replies are computed (`halluscope.scale`).

    Returns:
        {"table": the comparison table, "summary": what the run records about it, "run": the Run}.

    Raises:
        InputError: an unknown benchmark, method, rule or data, before anything is written.
        RunError: `out` holds a different run (pass force=True to start over).
    """
    module = _module(benchmark)
    prompt = module.PROMPT if prompt is None else prompt
    tokens = module.MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    options = _options(benchmark, rule=rule, nlp=nlp, chair_method=chair_method)
    vlm = vlm if vlm is not None else load_model(model)
    from halluscope.bench.methods import parse_methods

    parsed = parse_methods(list(methods), vlm.n_layers, vlm.n_heads)
    arguments = {"benchmark": benchmark, "data": data if data == "synthetic" else str(Path(data).resolve()),
                 "n": n, "seed": seed, "prompt": prompt, "max_new_tokens": tokens, "decoding": DECODING,
                 **{k: v for k, v in options.items() if k != "nlp_components"}, "batch_size": batch_size}
    # bad data fails here, before anything is written to `out`; a run being resumed has its items already
    built = None if not force and Run.exists(out) else _build_items(module, data, n=n, seed=seed, prompt=prompt)
    with writer_lock(out, create=True):
        run = Run.create(out, step=f"bench-{benchmark}", arguments=arguments, model=vlm.describe(), force=force)
        if not run.has_table("items"):
            items, images, annotations = built or _build_items(module, data, n=n, seed=seed, prompt=prompt)
            run.write_json("annotations", annotations)
            run.write_table("images", images)
            run.write_table("items", items)  # last: its presence says the items are complete
        items = run.read_table("items")
        images = run.read_table("images")
        image_of = dict(zip(images["image_id"], images["image"]))
        pairs = [(image_of[i], p) for i, p in zip(items["image_id"], items["prompt"])]
        replies = pd.concat([_replies(run, benchmark, method, vlm, pairs, batch_size=batch_size, tokens=tokens,
                                      force=force, progress=progress, scale=scale) for method in parsed],
                            ignore_index=True)
        annotations = run.read_json("annotations")
        table, details, notes = module.score(items, replies, annotations=annotations, rule=rule,
                                             nlp=options.get("nlp_components"), chair_method=chair_method)
        summary = {"benchmark": benchmark, "model": vlm.name, "data": arguments["data"], "seed": seed,
                   "n_images": len(images), "n_items": len(items), "prompt": prompt,
                   "decoding": {"strategy": DECODING, "max_new_tokens": tokens},
                   "methods": [{"method": m.name, "spec": m.spec} for m in parsed], **notes,
                   "table": table.to_dict("records")}
        table.attrs = {k: v for k, v in summary.items() if k != "table"}
        run.write_table(benchmark, table)
        run.write_table("replies", details)
        run.write_json(f"{benchmark}_summary", summary)
        run.write_file(f"{benchmark}.md", lambda tmp: tmp.write_text(_markdown(summary, table), encoding="utf-8"))
        _plot(benchmark, table, summary, run.plots_dir / f"{benchmark}.png")
        run.finish_step(f"bench-{benchmark}", {k: v for k, v in summary.items() if k != "table"})
    return {"table": table, "summary": summary, "run": run}


def _options(benchmark: str, *, rule: str, nlp: str, chair_method: str) -> dict[str, Any]:
    """The benchmark's scoring options, checked (and CHAIR's NLP components loaded) before anything is written."""
    if benchmark == "pope":
        from halluscope.metrics.pope import ANSWER_RULES

        if rule not in ANSWER_RULES:
            raise InputError(f"unknown --rule {rule!r}; use one of {', '.join(ANSWER_RULES)}")
        return {"rule": rule}
    from halluscope.metrics.nlp import load_nlp
    from halluscope.metrics.vocabulary import check_method

    check_method(chair_method)
    return {"nlp": nlp, "chair_method": chair_method, "nlp_components": load_nlp(nlp)}


def _build_items(module, data: str, *, n: int, seed: int, prompt: str) -> tuple:
    """The benchmark's (items, images, annotations) from `data`."""
    from halluscope.bench.data import load_bench_data

    source = load_bench_data(data, n=n, seed=seed, min_categories=module.MIN_CATEGORIES)
    return module.build_items(source, n=n, seed=seed, prompt=prompt, synthetic=data == "synthetic")


def _replies(run: Run, benchmark: str, method, vlm, pairs: list, *, batch_size: int, tokens: int, force: bool,
             progress: Progress, scale: Scale) -> pd.DataFrame:
    """The method's reply to every item (method, item, reply), from its finished shards plus the rest.

    The method's step is begun on its own `Run` object, so that the comparison table written afterwards is
    recorded as the benchmark step's output, not the method's.
    """
    from halluscope.evaluation import iter_replies

    step = f"{benchmark}-{method.slug}"
    run = Run.open(run.path)
    run.begin_step(step, {"method": method.name, "intervention": method.record()["intervention"],
                          "batch_size": batch_size}, force=force)

    intervention = method.intervention

    def compute(vlm, rows: list, start: int) -> Iterator[pd.DataFrame]:
        for replies in iter_replies(vlm, rows, batch_size=batch_size, max_new_tokens=tokens,
                                    intervention=intervention):
            yield pd.DataFrame({"item": range(start, start + len(replies)), "reply": [r for r, _ in replies]})
            start += len(replies)

    table = fill_parts(run.parts(step), pairs, compute, chunk=max(batch_size, 32), progress=progress,
                       description=f"{benchmark} {method.name}", vlm=vlm, scale=scale)
    run.finish_step(step, {"replies": len(table)})
    return table.assign(method=method.name)[["method", "item", "reply"]]


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """`table` as a GitHub markdown table, floats rounded to `digits`.

    Example:
        >>> print(markdown_table(pd.DataFrame({"method": ["greedy"], "chair_i": [0.25]})))
        | method | chair_i |
        | --- | --- |
        | greedy | 0.250 |
    """
    def cell(value: Any) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "| " + " | ".join("---" for _ in table.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def setting_lines(summary: dict[str, Any]) -> list[str]:
    """What a comparison table rests on, one line each: model, data, decoding, and the scoring's settings."""
    decoding = summary["decoding"]
    lines = [f"model: {summary['model']}",
             f"data: {summary['data']} (seed {summary['seed']}; {summary['n_images']} images, {summary['n_items']} "
             f"prompts per method)",
             f"prompt: {summary['prompt']!r}",
             f"decoding: {decoding['strategy']}, max_new_tokens={decoding['max_new_tokens']}, the same for every "
             f"method",
             "methods: " + "; ".join(m["method"] for m in summary["methods"])]
    if summary["benchmark"] == "pope":
        lines.append(f"answers read with the {summary['rule']!r} rule (metrics/pope.py); 'yes' is the positive class")
    else:
        parts = summary["nlp_components"]
        lines.append(f"CHAIR: {summary['chair_method']} word extraction, vocabulary {summary['vocabulary']}, "
                     f"nlp: {summary['nlp']} (tokenizer {parts.get('tokenizer')}; tagger {parts.get('tagger')}; "
                     f"lemmatizer {parts.get('lemmatizer')})")
    return lines


def _markdown(summary: dict[str, Any], table: pd.DataFrame) -> str:
    title = f"# {summary['benchmark'].upper()} on {summary['model']}"
    settings = "\n".join(f"- {line}" for line in setting_lines(summary))
    return f"{title}\n\n{settings}\n\nFractions, not percentages.\n\n{markdown_table(table)}\n"


def _plot(benchmark: str, table: pd.DataFrame, summary: dict[str, Any], path: Path) -> None:
    from halluscope.plots.bench_figures import plot_chair, plot_pope

    title = f"{benchmark.upper()} on {summary['model']}: greedy vs mitigation methods"
    if benchmark == "pope":
        plot_pope(table, path, title=title, n_per_split=max(summary["questions_per_split"].values()))
    else:
        plot_chair(table, path, title=title, n_captions=summary["n_images"])
