"""Token probabilities at the answer position: how likely the true answer and the prompted answer are when the
chosen heads are scaled by alpha (1 = unchanged, 0 = knocked out).

This module also owns what the analyses share: the prompts of a run (`RunPrompt`, `run_prompts`) and the
answer position (`answer_setup`), which is the score-mode slot of `halluscope.sweep.engine.prepare_score`: the
clean reply is teacher-forced up to its answer word (or its first token when it states none), and each answer
form (digits, words) is scored there as a whole word: `p_truth` is the probability of the truth's full token
sequence from the slot (`tokens_truth` tokens), `p_claim` the claim's.

Fixes over the reference study (pih-reference.md §7, defect 13): one position, the answer slot, is scored with
one teacher-forced forward per alpha, instead of the maximum over 75 free-running greedy steps; every alpha
sees the same context (the baseline reply's prefix), so the numbers compare the same continuation.

Base question and truthful control (no misleading claim): only `p_truth` is recorded; `p_claim` is NaN. The
`contrast` places the slot as a claim would: the claim of the same image's nearest misleading prompt (truth+1
for counts evaluated with offset 1), or truth+1 for counts without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from halluscope.errors import InputError
from halluscope.runs import locked_step

__all__ = [
    "RunPrompt",
    "run_prompts",
    "answer_setup",
    "placed_prompts",
    "VALUE",
    "PROMPT_SCHEMA",
    "value_dtype",
    "typed_table",
    "parse_alphas",
    "token_probabilities",
    "summarize_probabilities",
    "probs_step",
    "SHARD_SIZE",
    "resolve_run_heads",
    "parse_conditions",
    "prompts_of_run",
    "reply_budget",
    "compute_in_shards",
    "skip_reporter",
    "missing_prompts",
]

#: dtype of a table column that holds answer values (truth, claim, contrast); see `value_dtype`
VALUE = "value"
#: the columns every per-prompt analysis table starts with (`typed_table` schema)
PROMPT_SCHEMA: dict[str, str] = {"sample_id": "string", "condition": "string", "truth": VALUE, "claim": VALUE}
_PROB_SCHEMA = {**PROMPT_SCHEMA, "contrast": VALUE, "alpha": "float64", "form": "string", "tokens_truth": "int64",
                "tokens_claim": "int64", "p_truth": "float64", "p_claim": "float64"}
_NEEDED = ("sample_id", "image_id", "task", "condition", "truth", "claim", "prompt")


@dataclass(frozen=True)
class RunPrompt:
    """One prompt of a run as the analyses use it.

    `claim` is what the prompt asserts (None for the base question); `contrast` is the value whose spelling
    picks the scored sub-token: the claim for a misleading prompt, else the nearest misleading claim.
    """

    sample_id: str
    image_id: str
    condition: str
    task: str
    image: Any
    prompt: str
    truth: int | str
    claim: int | str | None
    contrast: int | str | None

    @property
    def misleading(self) -> bool:
        return self.claim is not None and self.claim != self.truth

    def sweep_item(self):
        """The `SweepItem` that `prepare_score` scores: truth against the contrast."""
        from halluscope.sweep.engine import SweepItem

        return SweepItem(self.sample_id, self.image, self.prompt, self.truth, self.contrast, self.task)


def _value(value: Any, task: str) -> int | str | None:
    """A truth/claim of the baseline table as the prompt holds it: int for counting tasks, else str; None if missing."""
    from halluscope.tasks.sample import INT_VALUED_TASKS

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return int(value) if task in INT_VALUED_TASKS else str(value)


def run_prompts(baseline: pd.DataFrame, samples: Iterable, *, conditions: Iterable[str] | None = None,
                limit: int | None = None) -> list[RunPrompt]:
    """The prompts of an eval run (its baseline table), with their images and contrasts, in table order.

    Args:
        baseline: the run's `baseline` table.
        samples: the run's samples (`samples_from_frame(run.read_table("samples"))`), for the images.
        conditions: keep only these conditions (e.g. ["base", "+1"]); default all.
        limit: keep the first `limit` prompts (after the condition filter).

    Raises:
        InputError: a needed column is missing, a condition filter matches nothing, or a prompt's sample is
            not among `samples`.

    Example:
        >>> prompts = run_prompts(run.read_table("baseline"), samples_from_frame(run.read_table("samples")))
    """
    missing = [c for c in _NEEDED if c not in baseline.columns]
    if missing:
        raise InputError(f"baseline table lacks columns {missing}; pass the baseline table of `halluscope eval`")
    images = {s.id: s.image for s in samples}
    table = baseline
    if conditions is not None:
        wanted = list(conditions)
        table = table[table["condition"].isin(wanted)]
        if table.empty:
            raise InputError(f"no prompts with conditions {wanted}; the run has "
                             f"{sorted(set(baseline['condition']))}")
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        table = table.head(limit)
    from halluscope.metrics.pih import condition_sort_key

    nearest: dict[str, Any] = {}
    for row in sorted(baseline.itertuples(index=False), key=lambda r: condition_sort_key(r.condition)):
        claim, truth = _value(row.claim, row.task), _value(row.truth, row.task)
        if claim is not None and claim != truth:
            nearest.setdefault(str(row.image_id), claim)
    prompts = []
    for row in table.itertuples(index=False):
        if row.sample_id not in images:
            raise InputError(f"baseline prompt {row.sample_id!r} has no sample; pass the run's samples table")
        truth, claim = _value(row.truth, row.task), _value(row.claim, row.task)
        if claim is not None and claim != truth:
            contrast = claim
        else:
            contrast = nearest.get(str(row.image_id), truth + 1 if row.task == "count" else None)
        prompts.append(RunPrompt(str(row.sample_id), str(row.image_id), str(row.condition), str(row.task),
                                 images[row.sample_id], str(row.prompt), truth, claim, contrast))
    return prompts


def answer_setup(vlm, prompt: RunPrompt, *, max_new_tokens: int = 50):
    """The teacher-forced inputs at the answer position of `prompt` (a `ScoreSetup` of `prepare_score`).

    The reply is generated greedily under whatever interventions are active.

    Raises:
        InputError: the prompt has no contrast, or the answer cannot be placed on one token.
    """
    from halluscope.sweep.engine import prepare_score

    if prompt.contrast is None:
        raise InputError(f"{prompt.sample_id}: no misleading prompt of image {prompt.image_id} gives a contrast "
                         "to score the truth against; evaluate the run with distances/offsets")
    return prepare_score(vlm, prompt.sweep_item(), max_new_tokens=max_new_tokens)


def placed_prompts(vlm, prompts: Iterable[RunPrompt], *, max_new_tokens: int = 50,
                   on_prompt: Callable[[], None] | None = None,
                   on_skip: Callable[[str, str], None] | None = None) -> Iterator[tuple[RunPrompt, Any]]:
    """Each prompt with its `answer_setup`; prompts whose answer cannot be placed go to `on_skip` instead.

    `on_prompt` is called once per prompt, after the caller has handled it (progress).
    """
    for prompt in prompts:
        try:
            setup = answer_setup(vlm, prompt, max_new_tokens=max_new_tokens)
        except InputError as exc:
            if on_skip is not None:
                on_skip(prompt.sample_id, str(exc))
        else:
            yield prompt, setup
        if on_prompt is not None:
            on_prompt()


def value_dtype(prompts: Iterable[RunPrompt]) -> str:
    """The dtype of the truth/claim/contrast columns: nullable "Int64" when every prompt's task counts (a
    `halluscope.tasks.sample.INT_VALUED_TASKS` task), else "string"."""
    from halluscope.tasks.sample import INT_VALUED_TASKS

    return "Int64" if all(p.task in INT_VALUED_TASKS for p in prompts) else "string"


def typed_table(rows: Sequence[Mapping[str, Any]], schema: Mapping[str, str],
                prompts: Sequence[RunPrompt]) -> pd.DataFrame:
    """`rows` as a frame with exactly the columns and dtypes of `schema`, whatever values a shard happens to hold.

    Columns typed `VALUE` take `value_dtype(prompts)`. None and NaN stay missing (<NA>), so every shard of a
    table has the same types, the shards concatenate without casts and parquet round-trips them.

    Raises:
        TypeError, ValueError: a value does not fit its column's dtype (e.g. 2.5 in an Int64 column).

    Example:
        >>> typed_table([{"claim": None}, {"claim": 5}], {"claim": VALUE}, prompts)["claim"].dtype
        Int64Dtype()
    """
    values = value_dtype(prompts)
    return pd.DataFrame({column: pd.Series([row[column] for row in rows], dtype=values if dtype == VALUE else dtype)
                         for column, dtype in schema.items()})


def parse_alphas(text: str) -> tuple[float, ...]:
    """Parse "0,0.25,1" into (0.0, 0.25, 1.0)."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"malformed alphas {text!r}; write comma-separated numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not values:
        raise InputError(f"no alphas in {text!r}; write comma-separated numbers, e.g. 0,0.25,0.5,0.75,1")
    if not all(np.isfinite(values)):
        raise InputError(f"alphas {text!r} must be finite numbers, e.g. 0,0.5,1")
    return tuple(dict.fromkeys(values))


def token_probabilities(vlm, prompts: Sequence[RunPrompt], heads, alphas: Sequence[float] = (0, 0.25, 0.5, 0.75, 1),
                        *, mode: str = "scale", means: torch.Tensor | None = None, max_new_tokens: int = 50,
                        on_prompt: Callable[[], None] | None = None,
                        on_skip: Callable[[str, str], None] | None = None) -> pd.DataFrame:
    """Probability of the true and the prompted answer at the answer position, per alpha and answer form.

    Args:
        prompts: the run's prompts (`run_prompts`): base, control and misleading ones.
        heads: the (layer, head) set whose output is scaled.
        alphas: intervention strengths; 1 leaves the heads unchanged, 0 knocks them out ("scale") or replaces
            them with their mean ("mean", needs `means`).
        on_prompt: called after each prompt; on_skip(sample_id, reason) for prompts that cannot be scored.

    Returns:
        One row per (prompt, alpha, form): `sample_id, condition, truth, claim, contrast, alpha, form,
        p_truth, p_claim` (p_claim NaN for base and control prompts).

    Raises:
        InputError: an unknown mode, no alphas, or heads outside the model.

    Example:
        >>> token_probabilities(vlm, prompts, {(0, 3)}, alphas=(0, 1))
    """
    from halluscope.interventions.heads import HeadIntervention, intervene
    from halluscope.sweep.slot import slot_logprobs

    if mode not in ("scale", "mean"):
        raise InputError(f"token probabilities scale heads with mode 'scale' or 'mean', got {mode!r}")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise InputError("no alphas given; pass e.g. alphas=(0, 0.5, 1)")
    HeadIntervention(frozenset(heads), mode=mode).check(vlm.n_layers, vlm.n_heads)
    rows: list[dict[str, Any]] = []
    for prompt, setup in placed_prompts(vlm, prompts, max_new_tokens=max_new_tokens, on_prompt=on_prompt,
                                        on_skip=on_skip):
        for alpha in alphas:
            iv = HeadIntervention(frozenset(heads), mode=mode, alpha=alpha)
            for slot in setup.slots:
                with nullcontext() if alpha == 1 else intervene(vlm, iv, means=means), torch.inference_mode():
                    scores, _ = slot_logprobs(slot, lambda batch, m: vlm.forward(
                        batch, use_cache=False, logits_to_keep=m).logits)
                for form, (n_truth, n_claim) in slot.forms().items():
                    rows.append({"sample_id": prompt.sample_id, "condition": prompt.condition,
                                 "truth": prompt.truth, "claim": prompt.claim, "contrast": prompt.contrast,
                                 "alpha": alpha, "form": form, "tokens_truth": n_truth, "tokens_claim": n_claim,
                                 "p_truth": float(scores[form, "truth"][0].exp()),
                                 "p_claim": float(scores[form, "claim"][0].exp()) if prompt.misleading
                                 else float("nan")})
    return typed_table(rows, _PROB_SCHEMA, prompts)


def summarize_probabilities(table: pd.DataFrame) -> pd.DataFrame:
    """Mean p_truth, p_claim and shift = p_claim - p_truth per (condition, form, alpha), with `n` prompts.

    Raises:
        InputError: `table` lacks the columns of `token_probabilities`.
    """
    missing = [c for c in _PROB_SCHEMA if c not in table.columns]
    if missing:
        raise InputError(f"probability table lacks columns {missing}; pass the output of token_probabilities()")
    frame = table.assign(shift=table["p_claim"] - table["p_truth"])
    grouped = frame.groupby(["condition", "form", "alpha"], sort=False, observed=True)
    out = grouped[["p_truth", "p_claim", "shift"]].mean()
    out.insert(0, "n", grouped.size())
    from halluscope.metrics.pih import condition_sort_key

    out = out.reset_index()
    order = sorted(range(len(out)), key=lambda i: (condition_sort_key(out["condition"].iloc[i]),
                                                   out["form"].iloc[i], out["alpha"].iloc[i]))
    return out.iloc[order].reset_index(drop=True)



# ---- run steps: shared by the attention, maps, probs and lens steps ------------------------------------
#: prompts per resumable shard of an analysis step
SHARD_SIZE = 8


def resolve_run_heads(run, spec: str) -> frozenset[tuple[int, int]]:
    """`--heads` of a run: a set name from its heads.json ("best3") or "L0H3,L11H15", checked against its model."""
    from halluscope.analysis.ranking import resolve_head_set

    info = run.manifest.get("model") or {}
    report = run.read_json("heads") if (run.path / "heads.json").is_file() else None
    return resolve_head_set(spec, report, info["n_layers"], info["n_heads"])


def parse_conditions(text: str | Sequence[str] | None) -> list[str] | None:
    """"base,+1" (or a list) -> ["base", "+1"]; None keeps every condition."""
    if text is None:
        return None
    values = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    if not values:
        raise InputError(f"no conditions in {text!r}; write e.g. base,control,+1")
    return values


def prompts_of_run(run, baseline: pd.DataFrame, *, conditions=None, limit: int | None = None) -> list[RunPrompt]:
    """`run_prompts` over a run's baseline and samples tables."""
    from halluscope.tasks.sample import samples_from_frame

    return run_prompts(baseline, samples_from_frame(run.read_table("samples", hint="eval")),
                       conditions=parse_conditions(conditions), limit=limit)


def reply_budget(run, given: int | None) -> int:
    """`given`, else the max_new_tokens the run's eval used (else 50)."""
    if given is not None:
        if given < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {given}")
        return given
    eval_step = run.manifest["steps"].get("eval") or {}
    return int((eval_step.get("arguments") or {}).get("max_new_tokens") or 50)


@dataclass
class AnalysisRun:
    """What every analysis step starts from: the run, the head set, the prompts, the model and its means."""

    run: Any
    head_set: frozenset
    prompts: list
    budget: int
    vlm: Any
    means: Any


def open_analysis(run_dir, step: str, *, heads: str | None, intervention: str, conditions, limit: int | None,
                  max_new_tokens: int | None, force: bool, vlm=None, optional_heads: bool = False,
                  **arguments: Any) -> AnalysisRun:
    """Open an eval run for an analysis step: resolve heads and prompts, record the step, load the model.

    With `optional_heads`, no heads means a baseline-only analysis.
    """
    from halluscope.interventions.heads import format_heads
    from halluscope.runs import Run
    from halluscope.steps import head_spec, load_means, run_model

    run = Run.open(run_dir)
    baseline = run.read_table("baseline", hint="eval")
    head_set = resolve_run_heads(run, heads) if heads or not optional_heads else frozenset()
    prompts = prompts_of_run(run, baseline, conditions=conditions, limit=limit)
    budget = reply_budget(run, max_new_tokens)
    run.begin_step(step, {"heads": format_heads(head_set) or None, "spec": head_spec(heads, head_set), **arguments,
                          "intervention": intervention, "conditions": parse_conditions(conditions), "limit": limit,
                          "max_new_tokens": budget, "shard_size": SHARD_SIZE}, force=force)
    vlm = run_model(run, vlm)
    return AnalysisRun(run, head_set, prompts, budget, vlm, load_means(run, intervention) if head_set else None)


def compute_in_shards(run, step: str, prompts: Sequence[RunPrompt], compute, *, progress, description: str,
                      size: int = SHARD_SIZE) -> pd.DataFrame:
    """`compute(chunk, advance)` over shards of `size` prompts under RUN/parts/<step>/, skipping finished ones.

    Returns every shard's rows, in prompt order.
    """
    parts = run.parts(step)
    done = parts.done()
    with progress(description, len(prompts)) as advance:
        for start in range(0, len(prompts), size):
            chunk = list(prompts[start:start + size])
            key = f"{start:06d}"
            if key in done:
                advance(len(chunk))
                continue
            parts.write(key, compute(chunk, advance))
    return parts.read_all()


def missing_prompts(prompts: Sequence[RunPrompt], table: pd.DataFrame) -> list[str]:
    """The ids of `prompts` that have no row in `table` (skipped, in this or an earlier, resumed, invocation)."""
    present = set(table["sample_id"]) if "sample_id" in table.columns else set()
    return [p.sample_id for p in prompts if p.sample_id not in present]


def skip_reporter(warn: Callable[[str], None] | None, skipped: list[dict[str, str]]) -> Callable[[str, str], None]:
    """An `on_skip` callback that records each skipped prompt and passes a one-line message to `warn`."""
    def on_skip(sample_id: str, reason: str) -> None:
        skipped.append({"sample_id": sample_id, "reason": reason})
        if warn is not None:
            warn(f"skipped {sample_id}: {reason}")
    return on_skip


@locked_step  # one writer per run, for the whole step
def probs_step(run_dir, *, heads: str, alphas: str | Sequence[float] = (0, 0.25, 0.5, 0.75, 1),
               intervention: str = "scale", conditions=None, limit: int | None = None,
               max_new_tokens: int | None = None, force: bool = False, vlm=None, progress=None,
               warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`halluscope probs`: token probabilities of a run's prompts per alpha; writes probs.parquet and plots.

    Args:
        run_dir: an eval run.
        heads: a set name from the run's ranking ("best3") or "L0H3,L11H15".
        alphas: "0,0.5,1" or numbers; 1 leaves the heads unchanged.
        intervention: "scale" or "mean" (needs `halluscope means`).
        conditions, limit: which prompts (default all).
        max_new_tokens: reply budget for placing the answer (default: the eval run's).
        vlm: the run's model if already loaded; progress: a `halluscope.steps.Progress`; warn: gets one line per
            skipped prompt.

    Returns:
        {"heads", "alphas", "prompts" (scored), "rows", "skipped" (ids of prompts without rows)}.

    Raises:
        RunError: no run, no baseline table, or every prompt skipped. InputError: bad heads, alphas, conditions.

    Example:
        >>> probs_step("runs/count", heads="best3", alphas="0,0.5,1")
    """
    from halluscope.errors import RunError
    from halluscope.interventions.heads import format_heads
    from halluscope.plots.analysis_figures import plot_probability_shift
    from halluscope.steps import no_progress

    values = parse_alphas(alphas) if isinstance(alphas, str) else parse_alphas(",".join(map(str, alphas)))
    a = open_analysis(run_dir, "probs", heads=heads, intervention=intervention, conditions=conditions, limit=limit,
                      max_new_tokens=max_new_tokens, force=force, vlm=vlm, alphas=values)
    run, head_set, prompts = a.run, a.head_set, a.prompts
    skipped: list[dict[str, str]] = []
    on_skip = skip_reporter(warn, skipped)
    table = compute_in_shards(
        run, "probs", prompts, progress=progress or no_progress, description=f"probs {format_heads(head_set)}",
        compute=lambda chunk, advance: token_probabilities(a.vlm, chunk, head_set, values, mode=intervention,
                                                           means=a.means, max_new_tokens=a.budget,
                                                           on_prompt=advance, on_skip=on_skip))
    if table.empty:
        raise RunError(f"no prompt of {run.path} could be scored ({len(skipped)} skipped); see the skip messages")
    run.write_table("probs", table)
    for form in sorted(set(table["form"])):
        plot_probability_shift(table, run.plots_dir / f"probs_{form}.png", form=form,
                               title=f"answer probabilities vs strength of {format_heads(head_set)} ({form} form)")
    result = {"heads": format_heads(head_set), "alphas": list(values), "prompts": int(table["sample_id"].nunique()),
              "rows": len(table), "skipped": missing_prompts(prompts, table)}
    run.finish_step("probs", result)
    return result
