"""`bench_step`: one benchmark, one model, several methods, into a run directory.

The run is created by step "bench-<benchmark>" with the data, prompts and decoding as its identity; it stores the
items (`items.parquet`), their images (`images.parquet`: PNG bytes of synthetic images, paths of a directory's)
and what scoring needs beside the replies (`annotations.json`: for POPE and CHAIR the images' instances,
reference captions and vocabulary; for pih the task and its version). Each method is a step of its own
("<benchmark>-greedy", "<benchmark>-vcd", "<benchmark>-ablation_L0H1-L1H2", "<benchmark>-vcd_<settings hash>")
that records the method's full config and writes its replies in resumable shards, so an interrupted run resumes
and a rerun with another method adds only that method's replies. Every invocation writes the comparison table of
the methods it names: `<benchmark>.parquet`, `<benchmark>.md`, `<benchmark>_summary.json`, `replies.parquet`
(each reply, parsed) and `plots/<benchmark>.png`.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd

from halluscope.errors import InputError
from halluscope.runs import Run, writer_lock
from halluscope.scale import LOCAL, Scale
from halluscope.steps import Progress, fill_parts, load_model, no_progress

__all__ = ["BENCHMARKS", "DECODING", "bench_step", "markdown_table", "setting_lines"]

#: Benchmark name -> its module (items, scoring, setting lines and plot).
BENCHMARKS = {"pope": "halluscope.bench.pope", "chair": "halluscope.bench.chair", "pih": "halluscope.bench.pih"}
#: The decoding every method uses; only the methods' edits of the model and of its scores differ.
DECODING = ("greedy (do_sample=False, num_beams=1; the checkpoint's sampling settings ignored), except a method "
            "that runs its own search (OPERA's beams: each method's strategy is in its record)")


def _module(benchmark: str):
    if benchmark not in BENCHMARKS:
        raise InputError(f"unknown benchmark {benchmark!r}; use one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[benchmark])


def bench_step(out: str | Path, *, benchmark: str, model: str, data: str = "synthetic",
               methods: Sequence[str] = (), n: int | None = None, seed: int = 0, prompt: str | None = None,
               max_new_tokens: int | None = None, batch_size: int = 16, rule: str = "pope", nlp: str = "auto",
               chair_method: str = "opera", task: str = "count", offsets: Sequence[int] | None = None,
               size: int | None = None, force: bool = False, vlm=None, progress: Progress = no_progress,
               scale: Scale = LOCAL) -> dict[str, Any]:
    """Run `benchmark` ("pope", "chair" or "pih") on `model` under plain greedy and each of `methods`, into `out`.

    Args:
        data: POPE, CHAIR: "synthetic" (`n` scenes drawn from `seed`) or a COCO-format directory
            (`bench/data.py`); pih: what `halluscope eval --data` takes ("synthetic", a file, folder or hub id).
        methods: method specs (`bench/methods.py`); plain greedy is always the first row.
        n: images (POPE: images asked about, 6 questions each per split; CHAIR: images captioned; pih: images,
            each asked the task's prompts). None: 100 for POPE and CHAIR, the task's default for pih.
        prompt: CHAIR's prompt or POPE's question template (default `CHAIR_PROMPT`, `POPE_TEMPLATE`); pih asks
            the task's own prompts.
        max_new_tokens: the decoding length (default 16 for POPE, 64 for CHAIR, 50 for pih), the same for every
            method.
        rule: POPE's answer rule. nlp: CHAIR's NLP components ("auto", "nltk", "offline").
        chair_method: CHAIR's word extraction ("opera", "original").
        task, offsets, size: pih's task ("count" or "color"), its count offsets or colour distances, and the
            side of synthetic images (as `halluscope eval` takes them).
        scale: where the replies are computed (`halluscope.scale`).

    Returns:
        {"table": the comparison table, "summary": what the run records about it, "run": the Run}.

    Raises:
        InputError: an unknown benchmark, method, rule, task or data, before anything is written.
        RunError: `out` holds a different run (pass force=True to start over).
    """
    module = _module(benchmark)
    if prompt is not None and module.PROMPT is None:
        raise InputError(f"bench {benchmark} asks the task's own prompts; drop the prompt or template")
    prompt = module.PROMPT if prompt is None else prompt
    n = module.N_IMAGES if n is None else n
    tokens = module.MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    options = _options(benchmark, rule=rule, nlp=nlp, chair_method=chair_method, task=task, offsets=offsets,
                       size=size)
    vlm = vlm if vlm is not None else load_model(model)
    from halluscope.bench.methods import parse_methods

    parsed = parse_methods(list(methods), vlm.n_layers, vlm.n_heads)
    arguments = {"benchmark": benchmark, "data": _data_argument(data), "n": n, "seed": seed,
                 "prompt": prompt, "max_new_tokens": tokens, "decoding": DECODING,
                 **_recorded(options), "batch_size": batch_size}
    build = functools.partial(module.build_items, data, n=n, seed=seed, prompt=prompt, **options)
    # bad data fails here, before anything is written to `out`; a run being resumed has its items already
    built = None if not force and Run.exists(out) else build()
    with writer_lock(out, create=True):
        run = Run.create(out, step=f"bench-{benchmark}", arguments=arguments, model=vlm.describe(), force=force)
        if not run.has_table("items"):
            items, images, annotations = built or build()
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
        table, details, notes = module.score(items, replies, annotations=annotations, **options)
        summary = {"benchmark": benchmark, "model": vlm.name, "data": arguments["data"], "seed": seed,
                   "n_images": len(images), "n_items": len(items), "prompt": prompt,
                   "decoding": {"strategy": DECODING, "max_new_tokens": tokens},
                   "methods": [{**m.record(), "spec": m.spec} for m in parsed], **_recorded(options), **notes,
                   "table": table.to_dict("records")}
        table.attrs = {k: v for k, v in summary.items() if k != "table"}
        run.write_table(benchmark, table)
        run.write_table("replies", details)
        run.write_json(f"{benchmark}_summary", summary)
        run.write_file(f"{benchmark}.md", lambda tmp: tmp.write_text(_markdown(summary, table), encoding="utf-8"))
        module.plot(table, summary, run.plots_dir / f"{benchmark}.png",
                    title=f"{benchmark.upper()} on {summary['model']}: greedy vs mitigation methods")
        run.finish_step(f"bench-{benchmark}", {k: v for k, v in summary.items() if k != "table"})
    return {"table": table, "summary": summary, "run": run}


def _data_argument(data: str) -> str:
    """`data` as the run records it: an existing file or directory by its absolute path, anything else as given."""
    path = Path(data).expanduser()
    return str(path.resolve()) if data != "synthetic" and path.exists() else data


def _options(benchmark: str, *, rule: str, nlp: str, chair_method: str, task: str, offsets: Sequence[int] | None,
             size: int | None) -> dict[str, Any]:
    """The benchmark's own options, checked (and CHAIR's NLP components loaded) before anything is written."""
    if benchmark == "pope":
        from halluscope.metrics.pope import ANSWER_RULES

        if rule not in ANSWER_RULES:
            raise InputError(f"unknown --rule {rule!r}; use one of {', '.join(ANSWER_RULES)}")
        return {"rule": rule}
    if benchmark == "pih":
        from halluscope.tasks import get_task

        spec = get_task(task)
        return {"task": spec.name, "task_version": spec.version,
                "offsets": None if offsets is None else list(offsets), "size": size}
    from halluscope.metrics.nlp import load_nlp
    from halluscope.metrics.vocabulary import check_method

    check_method(chair_method)
    return {"nlp": nlp, "chair_method": chair_method, "nlp_components": load_nlp(nlp)}


def _recorded(options: dict[str, Any]) -> dict[str, Any]:
    """The options as a run records them (CHAIR's loaded NLP components are named by the scoring's notes)."""
    return {k: v for k, v in options.items() if k != "nlp_components"}


def _replies(run: Run, benchmark: str, method, vlm, pairs: list, *, batch_size: int, tokens: int, force: bool,
             progress: Progress, scale: Scale) -> pd.DataFrame:
    """The method's reply to every item (method, item, reply), from its finished shards plus the rest.

    The method's step records the method's full config as its identity, so a changed setting is a different
    step, never a stale one. It is begun on its own `Run` object, so that the comparison table written afterwards
    is recorded as the benchmark step's output, not the method's.
    """
    from halluscope.evaluation import iter_replies

    step = f"{benchmark}-{method.slug}"
    run = Run.open(run.path)
    run.begin_step(step, {**method.record(), "batch_size": batch_size}, force=force)
    decoder = method.decoder

    def compute(vlm, rows: list, start: int) -> Iterator[pd.DataFrame]:
        for replies in iter_replies(vlm, rows, batch_size=batch_size, max_new_tokens=tokens, method=decoder):
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
    """What a comparison table rests on, one line each: model, data, prompt, decoding, methods, and the
    benchmark's scoring settings."""
    decoding = summary["decoding"]
    lines = [f"model: {summary['model']}",
             f"data: {summary['data']} (seed {summary['seed']}; {summary['n_images']} images, {summary['n_items']} "
             f"prompts per method)"]
    if summary["prompt"] is not None:
        lines.append(f"prompt: {summary['prompt']!r}")
    lines += [f"decoding: {decoding['strategy']}, max_new_tokens={decoding['max_new_tokens']}, the same for every "
              f"method",
              "methods: " + "; ".join(m["method"] for m in summary["methods"])]
    return lines + _module(summary["benchmark"]).setting_lines(summary)


def _markdown(summary: dict[str, Any], table: pd.DataFrame) -> str:
    title = f"# {summary['benchmark'].upper()} on {summary['model']}"
    settings = "\n".join(f"- {line}" for line in setting_lines(summary))
    return f"{title}\n\n{settings}\n\nFractions, not percentages.\n\n{markdown_table(table)}\n"
