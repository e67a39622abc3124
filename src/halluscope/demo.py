"""`halluscope demo`: the whole PIH pipeline on the built-in organism, into one run directory with a report.

synthetic counting task -> baseline eval -> full single-head sweep (score mode) -> rank -> the top heads
confirmed in generate mode -> joint knockout of the best-k sets -> attention mass before/after -> attention
maps of the chosen heads -> answer probabilities vs knockout strength -> report.md with the figures and the
headline numbers, and the interactive report.html.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from halluscope import steps
from halluscope.runs import Run, writer_lock
from halluscope.steps import Progress, no_progress

__all__ = ["run_demo", "pick_head_set"]

_TOKENS = 12  # the organism's replies are short ("There are 7 circles.")


def pick_head_set(ablations: list[dict[str, Any]], max_accuracy_drop: float = 0.10) -> dict[str, Any]:
    """The ablated set with the largest relative copy-rate cut among those that cost at most
    `max_accuracy_drop` of base accuracy (or the largest cut overall if none qualifies)."""
    def drop(a):
        return -(a["base_accuracy_change"] or 0.0)

    fair = [a for a in ablations if drop(a) <= max_accuracy_drop] or ablations
    return max(fair, key=lambda a: (a["copy_rate_relative_reduction"] or 0.0, -len(a["heads"].split(","))))


def _attention_shift(run) -> dict[str, float]:
    """Mean share of attention from the answer position to image tokens, baseline vs heads knocked out."""
    table = run.read_table("attention")
    answer = table[table["query"] == "answer"]
    return {f"image_share_{label}": float(answer.loc[answer["setting"] == setting, "image_share"].mean())
            for label, setting in (("before", "baseline"), ("after", "ablated"))}


def _probability_shift(run) -> dict[str, float]:
    """Mean p(true answer) and p(prompted answer) on misleading prompts, heads unchanged vs knocked out."""
    table = run.read_table("probs")
    table = table[table["claim"].notna() & (table["condition"] != "control")]
    out = {}
    for label, alpha in (("unchanged", 1.0), ("knocked_out", 0.0)):
        rows = table[table["alpha"] == alpha]
        out[f"p_truth_{label}"] = float(rows["p_truth"].mean())
        out[f"p_claim_{label}"] = float(rows["p_claim"].mean())
    return out


def run_demo(out: str | Path = "runs/demo", *, n: int = 36, offsets: tuple[int, ...] = (1, 2, 3, 5, 10),
             max_heads: int = 5, analysis_prompts: int = 60, map_samples: int = 6, force: bool = False,
             progress: Progress = no_progress) -> dict[str, Any]:
    """Run the pipeline on the organism into `out`; returns the headline numbers (also in report.md and
    report.html). `map_samples` images get attention maps of the chosen heads."""
    from halluscope.analysis.attention import attention_step
    from halluscope.analysis.maps import attention_maps_step
    from halluscope.analysis.probabilities import probs_step
    from halluscope.plots.html_report import report_step
    from halluscope.report import write_report

    vlm = steps.load_model("organism")
    with writer_lock(out, create=True):  # no other command writes the run between the demo's steps
        run, summary = steps.eval_step(out, model="organism", task="count", data="synthetic", n=n, offsets=offsets,
                                       size=112, batch_size=32, max_new_tokens=_TOKENS, force=force, vlm=vlm,
                                       progress=progress)
        steps.sweep_step(out, mode="score", batch_size=32, max_new_tokens=_TOKENS, force=force, vlm=vlm,
                         progress=progress)
        report, ranking = steps.rank_step(out)
        confirm = steps.confirm_step(out, heads=f"best{max_heads}", max_new_tokens=_TOKENS, force=force, vlm=vlm,
                                     progress=progress)
        ablations = [steps.ablate_step(out, heads=f"best{k}", name=f"ablation_best{k}", batch_size=32, force=force,
                                       vlm=vlm, progress=progress)
                     for k in range(1, max_heads + 1) if report["best"].get(f"best{k}")]
        chosen = pick_head_set(ablations)
        misleading = ",".join(f"+{k}" for k in offsets)
        attention_step(out, heads=chosen["heads"], conditions=misleading, limit=analysis_prompts, force=force, vlm=vlm,
                       progress=progress)
        attention_maps_step(out, heads=chosen["heads"], samples=map_samples, conditions=f"+{offsets[0]}",
                            force=force, vlm=vlm, progress=progress)  # one offset: one prompt per image
        probs_step(out, heads=chosen["heads"], conditions=misleading, limit=analysis_prompts, force=force, vlm=vlm,
                   progress=progress)
        attention, probs = _attention_shift(run), _probability_shift(run)
        headline = {
            "run": str(run.path), "model": vlm.describe(),
            "base_accuracy": summary["base_accuracy"], "copy_rate": summary["copy_rate"],
            "copy_rate_by_truth": summary["copy_rate_by_truth"],
            "ranking_top": report["ranking"][:max_heads],
            "confirm_agreement": confirm["agreement"],
            "ablations": [{k: a[k] for k in ("spec", "heads", "copy_rate_relative_reduction", "base_accuracy_change")}
                          | {"copy_rate": a["after"]["copy_rate"], "base_accuracy": a["after"]["base_accuracy"]}
                          for a in ablations],
            "chosen": {"heads": chosen["heads"], "spec": chosen["spec"],
                       "copy_rate_before": chosen["before"]["copy_rate"],
                       "copy_rate_after": chosen["after"]["copy_rate"],
                       "copy_rate_by_truth_after": chosen["after"]["copy_rate_by_truth"],
                       "base_accuracy_before": chosen["before"]["base_accuracy"],
                       "base_accuracy_after": chosen["after"]["base_accuracy"]},
            "attention": attention, "probabilities": probs,
        }
        demo = Run.open(out)  # the demo's own step records demo.json and report.md, so --force removes them
        demo.begin_step("demo", {"n": n, "offsets": offsets, "max_heads": max_heads,
                                 "analysis_prompts": analysis_prompts, "map_samples": map_samples}, force=True)
        demo.write_json("demo", headline)
        write_report(demo, headline)
        demo.finish_step("demo", {"heads": chosen["heads"], "spec": chosen["spec"]})
        report_step(out)
        return headline
