"""report.md for a run: the headline numbers and the figures the steps wrote, as one readable page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from halluscope.runs import Run

__all__ = ["write_report", "headline_lines"]


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}%"


def _by_truth(before: dict, after: dict | None = None) -> str:
    keys = sorted(before, key=lambda k: float(k))
    head = "| true count | " + " | ".join(str(k) for k in keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    rows = "| copy rate, baseline | " + " | ".join(_pct(before[k]) for k in keys) + " |\n"
    if after is not None:
        rows += "| copy rate, heads knocked out | " + " | ".join(_pct(after.get(k)) for k in keys) + " |\n"
    return head + rows


def headline_lines(headline: dict[str, Any]) -> list[str]:
    """The few lines a researcher wants first: PIH before/after, the heads found, the image-attention shift."""
    chosen = headline["chosen"]
    lines = [
        f"copy rate on misleading prompts: {_pct(chosen['copy_rate_before'])} -> {_pct(chosen['copy_rate_after'])} "
        f"with {chosen['heads']} knocked out ({chosen['spec']})",
        "copy rate by true count (baseline -> knocked out): " + ", ".join(
            f"{k}: {_pct(v)} -> {_pct(chosen['copy_rate_by_truth_after'].get(k))}"
            for k, v in sorted(headline["copy_rate_by_truth"].items(), key=lambda kv: float(kv[0]))),
        f"base counting accuracy: {_pct(chosen['base_accuracy_before'])} -> {_pct(chosen['base_accuracy_after'])}",
        "heads ranked by correction rate: " + ", ".join(
            f"{h['name']} ({_pct(h['correction_rate'])})" for h in headline["ranking_top"]),
        f"score-mode outcomes confirmed by greedy generation on {_pct(headline['confirm_agreement'])} of rows",
    ]
    attention = headline.get("attention") or {}
    if attention.get("image_share_before") is not None:
        lines.append(f"attention from the answer position to image tokens (mean over layers and heads): "
                     f"{_pct(attention['image_share_before'])} -> {_pct(attention['image_share_after'])}")
    probs = headline.get("probabilities") or {}
    if probs.get("p_truth_knocked_out") is not None:
        lines.append(f"p(true count) at the answer position: {probs['p_truth_unchanged']:.2f} -> "
                     f"{probs['p_truth_knocked_out']:.2f}; p(prompted count): {probs['p_claim_unchanged']:.2f} -> "
                     f"{probs['p_claim_knocked_out']:.2f}")
    return lines


def write_report(run: Run, headline: dict[str, Any]) -> Path:
    """Write RUN/report.md from the demo's headline numbers and the run's plots."""
    plots = sorted(p.relative_to(run.path) for p in run.plots_dir.rglob("*.png"))
    ablations = "\n".join(
        f"| {a['spec']} | {a['heads']} | {_pct(a['copy_rate'])} | {_pct(a['copy_rate_relative_reduction'])} | "
        f"{_pct(a['base_accuracy'])} |" for a in headline["ablations"])
    text = "\n".join([
        f"# halluscope report: {headline['model']['name']} ({headline['model']['family']})",
        "",
        *[f"- {line}" for line in headline_lines(headline)],
        "",
        "## Copy (PIH) rate by true count",
        "",
        _by_truth(headline["copy_rate_by_truth"], headline["chosen"]["copy_rate_by_truth_after"]),
        "## Joint knockouts of the best-k heads",
        "",
        "The headline set is the one with the largest cut at most 10 points of counting accuracy lost, chosen on "
        "these same prompts, so its cut is an in-sample figure; the organism's model card measures its head set on "
        "scenes it was not chosen on.",
        "",
        "| set | heads | copy rate | relative cut | base accuracy |",
        "|---|---|---|---|---|",
        ablations,
        "",
        "## Figures",
        "",
        *[f"![{p.stem}]({p.as_posix()})" for p in plots],
        "",
        "Tables: `baseline.parquet`, `sweep.parquet`, `heads.json`, `confirm.parquet`, `ablation_best*.parquet`, "
        "`attention.parquet`, `attention_maps.parquet`, `probs.parquet`; `manifest.json` says what ran. "
        "The interactive figures (hover a head for the prompts it flips) are in `report.html`.",
        "",
    ])
    return run.write_file("report.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
