"""The sections of a run's HTML report, each built from whatever tables the run has: PIH rates, the head
heatmap, attention maps, attention and probability shifts, the comparison of settings, and the manifest.

A section whose step has not run says which command fills it, so the page always has the same outline.
Figures come from `interactive_figures`, numbers with intervals from `intervals`; nothing here writes a file.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from halluscope.metrics.pih import base_accuracy, pih_rates, select_misleading
from halluscope.plots.figure import axis_labels
from halluscope.plots.intervals import with_intervals
from halluscope.runs import Run

__all__ = ["Plot", "Section", "SECTIONS", "build_sections", "head_examples", "headline", "outcome_tables"]

_RATES = ["copy_rate", "correction_rate"]
_EXAMPLES_PER_HEAD = 3
_MAX_MAP_SAMPLES = 20


@dataclass(frozen=True)
class Plot:
    """An interactive figure of a section and the id of the element it is drawn in."""

    div_id: str
    figure: Any


@dataclass(frozen=True)
class Section:
    """One part of the page: an anchor id, a heading, and its body (HTML fragments and plots, in order)."""

    id: str
    title: str
    body: list[str | Plot] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- helpers


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _absent(what: str, command: str) -> str:
    """The note a section shows when its step has not run."""
    return (f'<p class="absent">This run has no {html.escape(what)}; <code>{html.escape(command)}</code> '
            "adds it.</p>")


def _task(run: Run) -> str | None:
    return ((run.manifest.get("steps") or {}).get("eval") or {}).get("arguments", {}).get("task")


def _step_arguments(run: Run, step: str) -> dict[str, Any]:
    return ((run.manifest.get("steps") or {}).get(step) or {}).get("arguments") or {}


def _pct(value: Any) -> str:
    return "-" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"


def _rate_cell(value: Any, low: Any, high: Any, n: Any) -> str:
    """A rate with its 95% interval and n, as a table cell's text."""
    if value is None or pd.isna(value):
        return "-"
    return f"{_pct(value)} [{_pct(low)}, {_pct(high)}] n={int(n)}"


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="table", na_rep="-", escape=True)


def outcome_tables(run: Run) -> dict[str, pd.DataFrame]:
    """The run's outcome tables by setting: "baseline" (eval), then each ablation ("best3 knocked out"), in
    the order they ran. Only finished steps whose table exists count.

    Example:
        >>> list(outcome_tables(Run.open("runs/demo")))
        ['baseline', 'best1 knocked out', 'best3 knocked out', 'best5 knocked out']
    """
    tables: dict[str, pd.DataFrame] = {}
    if run.has_table("baseline"):
        tables["baseline"] = run.read_table("baseline")
    for step, entry in (run.manifest.get("steps") or {}).items():
        if not (step == "ablate" or step.startswith("ablate-")) or entry.get("status") != "finished":
            continue
        name = "ablation" if step == "ablate" else step[len("ablate-"):]
        if run.has_table(name):
            label = _ablation_label(entry.get("arguments") or {}, name)
            tables[label if label not in tables else name] = run.read_table(name)
    return tables


def _ablation_label(arguments: dict[str, Any], name: str) -> str:
    """What an ablation did to which heads: "best3 knocked out", "best3 set to their mean", "best3 scale,
    alpha 0.5"."""
    heads = arguments.get("spec") or arguments.get("heads") or name
    mode, alpha = arguments.get("intervention", "zero"), arguments.get("alpha", 0.0)
    if not alpha and mode in ("zero", "scale"):
        return f"{heads} knocked out"
    if not alpha and mode == "mean":
        return f"{heads} set to their mean"
    return f"{heads} {mode}, alpha {alpha:g}"


def headline(run: Run) -> list[str]:
    """The few numbers a reader wants first: the demo's headline if the run has one, else the eval summary."""
    if (run.path / "demo.json").is_file():
        from halluscope.report import headline_lines

        return headline_lines(run.read_json("demo"))
    if not (run.path / "summary.json").is_file():
        return []
    summary = run.read_json("summary")
    return [f"{summary.get('n_rows')} prompts on {summary.get('n_images')} images",
            f"copy rate on misleading prompts: {_pct(summary.get('copy_rate'))}",
            f"base accuracy: {_pct(summary.get('base_accuracy'))}"]


# ------------------------------------------------------------------------------------------------ rates


def rates_section(run: Run) -> Section:
    """PIH rates by offset and by true count, baseline and each ablation, with 95% intervals."""
    from halluscope.plots.interactive_figures import rates_figure

    section = Section("rates", "Prompt-induced hallucination rates")
    tables = outcome_tables(run)
    if not tables:
        section.body.append(_absent("evaluation", "halluscope eval --model M --out RUN"))
        return section
    truth_label, condition_label = axis_labels(_task(run))
    section.body.append(_p(f"Share of misleading prompts whose reply copies the prompted value (copy) or gives "
                           f"the true one (correction), per {condition_label} and per {truth_label}. Error bars: 95% "
                           "Wilson intervals; click a legend entry to hide a setting."))
    for by, label in (("condition", condition_label), ("truth", truth_label)):
        series = {name: with_intervals(pih_rates(select_misleading(table), by=(by,)), _RATES)
                  for name, table in tables.items()}
        section.body.append(Plot(f"rates-by-{by}", rates_figure(series, by=by, xlabel=label,
                                                                title=f"PIH rates by {label}")))
    return section


# ------------------------------------------------------------------------------------------------ heads


def head_examples(sweep: pd.DataFrame, baseline: pd.DataFrame, confirm: pd.DataFrame | None = None,
                  per_head: int = _EXAMPLES_PER_HEAD) -> dict[tuple[int, int], list[Any]]:
    """Per knocked-out head, up to `per_head` prompts whose outcome the knockout changed, prompts it turned from
    copied to corrected first, as `HeadExample`s. The reply after the knockout is the generated one where
    `confirm` (generate mode) has it, else the answer score mode found at the answer slot.

    Args:
        sweep: sweep.parquet (needs `baseline_outcome`; without it there are no examples). Of an attribution
            sweep, only the exact rows (its verified heads) count: an estimate changes no reply.
        baseline: baseline.parquet (prompt and reply per sample_id).
        confirm: confirm.parquet, if the run has it.
    """
    from halluscope.plots.interactive_figures import HeadExample

    if "baseline_outcome" not in sweep.columns or sweep.empty:
        return {}
    if "estimator" in sweep.columns:  # an attribution sweep: only its exactly measured knockouts changed a reply
        sweep = sweep[sweep["estimator"] == "exact"]
    changed = sweep[sweep["outcome"] != sweep["baseline_outcome"]]
    flips = (changed["baseline_outcome"] == "copied") & (changed["outcome"] == "corrected")
    changed = changed.assign(_flip=~flips).sort_values(["layer", "head", "_flip", "sample_id"], kind="stable")
    chosen = changed.groupby(["layer", "head"], sort=False).head(per_head)
    clean = baseline.set_index("sample_id")
    generated = {} if confirm is None else {
        (r.sample_id, int(r.layer), int(r.head)): (r.reply, r.outcome) for r in confirm.itertuples(index=False)}
    examples: dict[tuple[int, int], list[Any]] = {}
    for row in chosen.itertuples(index=False):
        key = (int(row.layer), int(row.head))
        before = f"{clean.at[row.sample_id, 'reply']} ({row.baseline_outcome})"
        if (row.sample_id, *key) in generated:
            reply, outcome = generated[(row.sample_id, *key)]
            after = f"{reply} ({outcome}, generated)"
        else:
            value = {"corrected": row.truth, "copied": row.claim}.get(row.outcome)
            after = (f"answers {value} " if value is not None else "") + f"({row.outcome}, score mode)"
        prompt = f"{clean.at[row.sample_id, 'prompt']} (truth: {row.truth})"
        examples.setdefault(key, []).append(HeadExample(prompt, before, after))
    return examples


def heads_section(run: Run) -> Section:
    """The layer x head heatmap of correction rates, with rank and changed prompts on hover."""
    from halluscope.analysis.ranking import rank_heads
    from halluscope.plots.interactive_figures import head_heatmap_figure

    section = Section("heads", "Which heads carry the hallucination")
    if not run.has_table("sweep"):
        section.body.append(_absent("head sweep", f"halluscope sweep --run {run.path}"))
        return section
    sweep = run.read_table("sweep")
    model = run.manifest.get("model") or {}
    ranked = run.read_table("ranking") if run.has_table("ranking") else rank_heads(sweep)  # as `rank` ranked them
    ranking = with_intervals(ranked, ["correction_rate"])
    confirm = run.read_table("confirm") if run.has_table("confirm") else None
    examples = head_examples(sweep, run.read_table("baseline"), confirm)
    section.body.append(_p("Correction rate when one head is knocked out: the share of misleading prompts whose "
                           "answer the knockout changed to the true one. Hover a head for its rank, its 95% interval "
                           "and prompts whose reply it changed."))
    section.body.append(Plot("heads-heatmap", head_heatmap_figure(
        ranking, examples, n_layers=int(model.get("n_layers") or ranking["layer"].max() + 1),
        n_heads=int(model.get("n_heads") or ranking["head"].max() + 1),
        title="correction rate per knocked-out head")))
    return section


# ------------------------------------------------------------------------------------------------- maps


def maps_section(run: Run) -> Section:
    """Attention maps of the chosen heads over each sample's image, one sample at a time."""
    from halluscope.analysis.maps import grid_values
    from halluscope.plots.interactive_figures import MapSample, attention_maps_figure
    from halluscope.tasks.sample import samples_from_frame

    section = Section("maps", "Where the heads look")
    if not run.has_table("attention_maps"):
        section.body.append(_absent("attention maps", f"halluscope attention-maps --run {run.path} --heads best3"))
        return section
    table = run.read_table("attention_maps")
    samples = {s.id: s for s in samples_from_frame(run.read_table("samples"))}
    maps = []
    for sample_id, rows in list(table.groupby("sample_id", sort=False))[:_MAX_MAP_SAMPLES]:
        sample = samples[sample_id]
        heads = [(f"L{r['layer']}H{r['head']}", grid_values(r)) for r in rows.to_dict("records")]
        maps.append(MapSample(f"{sample_id}: {sample.prompt}", sample.image, heads))
    heads = _step_arguments(run, "attention-maps").get("heads", "")
    section.body.append(_p("Attention from the last prompt position to the image tokens, laid over the image "
                           "(colours span each panel's own range; hover for the weights). Pick a sample in the "
                           "drop-down."))
    section.body.append(Plot("attention-maps", attention_maps_figure(maps, title=f"attention maps of {heads}")))
    return section


# ----------------------------------------------------------------------------------------------- shifts


def shifts_section(run: Run) -> Section:
    """Attention mass to the image and answer probabilities as the chosen heads are weakened."""
    from halluscope.plots.interactive_figures import layer_shares_figure, probability_figure

    section = Section("shifts", "Attention and answer probabilities under intervention")
    if run.has_table("attention"):
        heads = _step_arguments(run, "attention").get("heads", "the chosen heads")
        section.body.append(Plot("attention-mass", layer_shares_figure(
            run.read_table("attention"), title=f"attention on image tokens, baseline vs {heads} knocked out")))
    else:
        section.body.append(_absent("attention mass", f"halluscope attention --run {run.path} --heads best3"))
    if run.has_table("probs"):
        heads = _step_arguments(run, "probs").get("heads", "the chosen heads")
        section.body.append(_p("Mean probability of the true and the prompted answer at the answer position on "
                               "misleading prompts, as the heads' output is scaled by alpha (0 = knocked out). "
                               "Error bars: 95% intervals of the mean."))
        section.body.append(Plot("probabilities", probability_figure(
            run.read_table("probs"), title=f"answer probabilities vs strength of {heads}",
            condition_label=axis_labels(_task(run))[1])))
    else:
        section.body.append(_absent("answer probabilities", f"halluscope probs --run {run.path} --heads best3"))
    return section


# ------------------------------------------------------------------------------------------- comparison


def _setting_row(name: str, table: pd.DataFrame, baseline_copy: float | None) -> dict[str, str]:
    """One row of the comparison: a setting's overall rates with intervals, and its cut of the baseline copy rate."""
    overall = with_intervals(pih_rates(select_misleading(table), by=()), _RATES)
    accuracy = with_intervals(base_accuracy(table, by=()), ["accuracy"])
    row = {"setting": name}
    for column, label in (("copy_rate", "copy rate"), ("correction_rate", "correction rate")):
        r = overall.iloc[0] if len(overall) else None
        row[label] = "-" if r is None else _rate_cell(r[column], r[f"{column}_low"], r[f"{column}_high"], r["n"])
    copy = float(overall["copy_rate"].iloc[0]) if len(overall) else None
    cut = None if not baseline_copy or copy is None else (baseline_copy - copy) / baseline_copy
    row["copy rate cut"] = _pct(cut)
    a = accuracy.iloc[0] if len(accuracy) else None
    row["base accuracy"] = "-" if a is None else _rate_cell(a["accuracy"], a["accuracy_low"], a["accuracy_high"],
                                                             a["n"])
    return row


def _benchmark_tables(run: Run) -> list[str]:
    """The comparison table of each `halluscope bench` step of the run (table `pope` of step "bench-pope")."""
    parts = []
    for step in run.manifest.get("steps") or {}:
        benchmark = step[len("bench-"):] if step.startswith("bench-") else None
        if benchmark and run.has_table(benchmark):
            parts.append(f"<h3>{html.escape(benchmark.upper())}: greedy vs each method</h3>"
                         + _table(run.read_table(benchmark)))
    return parts


def comparison_section(run: Run) -> Section:
    """Settings side by side (baseline, each ablation) and the comparison table of each benchmark the run holds
    (`halluscope bench`)."""
    section = Section("comparison", "Mitigations compared")
    tables = outcome_tables(run)
    benchmarks = _benchmark_tables(run)
    if len(tables) > 1:
        misleading = select_misleading(tables["baseline"]) if "baseline" in tables else None
        base_copy = float(misleading["outcome"].eq("copied").mean()) if misleading is not None and len(misleading) \
            else None
        rows = [_setting_row(name, table, None if name == "baseline" else base_copy) for name, table in tables.items()]
        section.body.append(_p("Each setting on the same prompts: rates with [95% interval] and n; the cut is the "
                               "share of the baseline copy rate removed. Head sets chosen on these prompts give "
                               "in-sample cuts."))
        section.body.append(_table(pd.DataFrame(rows)))
    elif not benchmarks:
        section.body.append(_absent("ablation or benchmark to compare",
                                    f"halluscope ablate --run {run.path} --heads best3"))
    section.body.extend(benchmarks)
    return section


# --------------------------------------------------------------------------------------------- manifest


def manifest_section(run: Run) -> Section:
    """What ran: model and fingerprint, versions, git revision, and each step's command and arguments."""
    manifest = run.manifest
    model = manifest.get("model") or {}
    environment = manifest.get("environment") or {}
    git = manifest.get("git") or {}
    facts = [("halluscope", manifest.get("halluscope")), ("created", manifest.get("created")),
             ("git revision", f"{git.get('revision', '-')}{' (uncommitted changes)' if git.get('dirty') else ''}"),
             ("python", environment.get("python")), ("platform", environment.get("platform")),
             *((name, version) for name, version in (environment.get("packages") or {}).items()),
             *((f"model {key}", value) for key, value in model.items())]
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    steps = []
    for name, entry in (manifest.get("steps") or {}).items():
        arguments = json.dumps(entry.get("arguments") or {}, sort_keys=True)
        steps.append({"step": name, "status": entry.get("status"), "command": " ".join(entry.get("command") or []),
                      "arguments": arguments, "started": entry.get("started"), "finished": entry.get("finished")})
    section = Section("manifest", "Manifest")
    section.body.append(f'<table class="table facts">{rows}</table>')
    section.body.append(_table(pd.DataFrame(steps)) if steps else _p("No step has run."))
    return section


#: The page's sections, in order.
SECTIONS: Sequence[Callable[[Run], Section]] = (rates_section, heads_section, maps_section, shifts_section,
                                                comparison_section, manifest_section)


def build_sections(run: Run) -> list[Section]:
    """Every section of the page for `run`, in order."""
    return [build(run) for build in SECTIONS]
