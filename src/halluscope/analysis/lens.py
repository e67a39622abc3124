"""Logit lens at the answer position: after every decoder layer, how high the true and the prompted answer
rank, baseline and with the chosen heads ablated.

Each layer's output is captured with a forward hook on the decoder layer and read out with the model's own
final norm and `lm_head`. `output_hidden_states=True` is not used: its last entry is already final-normed
(offline-models.md §3), so `lm_head(norm(hidden_states[-1]))` would normalise twice. With the hooks the last
layer's lens equals the model's logits exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import pandas as pd
import torch

from halluscope.analysis.probabilities import PROMPT_SCHEMA, VALUE, RunPrompt, placed_prompts, typed_table
from halluscope.errors import InputError
from halluscope.sweep.slot import slot_logprobs
from halluscope.runs import locked_step

__all__ = ["layer_logits", "logit_lens", "summarize_lens", "lens_step"]

_LENS_SCHEMA = {**PROMPT_SCHEMA, "contrast": VALUE, "setting": "string", "form": "string", "tokens_truth": "int64",
                "tokens_claim": "int64", "layer": "int64",
                "p_truth": "float64", "rank_truth": "Int64", "p_claim": "float64", "rank_claim": "Int64"}


def layer_logits(vlm, batch, positions: int | Sequence[int] = -1) -> torch.Tensor:
    """Lens logits `[batch, layer, position, vocab]`: `lm_head(norm(layer output))` at `positions`, float32.

    One forward without KV cache, under whatever interventions are active. The norm runs over the whole
    layer output and `lm_head` over the chosen positions, the same computation as the model's own head, so
    the last layer equals the model's logits at those positions bit for bit.

    Args:
        positions: position indices (negative counts from the end), shared by all rows.

    Example:
        >>> lens = layer_logits(vlm, batch)          # the last position
        >>> lens[:, -1, 0].argmax(-1)                # the model's next token
    """
    index = [positions] if isinstance(positions, int) else list(positions)
    if not index:
        raise InputError("layer_logits() got no positions; pass e.g. positions=-1")
    bad = [p for p in index if not -batch.seq_len <= p < batch.seq_len]
    if bad:
        raise InputError(f"positions {bad} fall outside the batch's {batch.seq_len} positions")
    outputs: list[Any] = [None] * vlm.n_layers

    def grab(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[layer] = vlm.lm_head(vlm.norm(hidden)[:, index]).float()
        return hook

    handles = [layer.register_forward_hook(grab(i)) for i, layer in enumerate(vlm.layers)]
    try:
        with torch.inference_mode():
            vlm.forward(batch, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(outputs, dim=1)


def _rank(logits: torch.Tensor, token: int) -> int:
    """1 + the number of vocabulary entries scored strictly higher than `token`."""
    return int((logits > logits[token]).sum()) + 1


def logit_lens(vlm, prompts: Sequence[RunPrompt], heads=None, *, mode: str = "zero",
               means: torch.Tensor | None = None, max_new_tokens: int = 50,
               on_prompt: Callable[[], None] | None = None,
               on_skip: Callable[[str, str], None] | None = None) -> pd.DataFrame:
    """Per prompt, answer form and layer: probability and rank of the truth and the claim at the answer slot.

    Both settings read the same teacher-forced context (the baseline reply up to its answer); the "ablated"
    setting (only when `heads` is given) runs it with the heads knocked out ("zero") or mean-replaced ("mean").

    Returns:
        One row per (sample_id, setting, form, layer): `sample_id, condition, truth, claim, contrast, setting,
        form, tokens_truth, tokens_claim, layer, p_truth, rank_truth, p_claim, rank_claim`. `p_truth` is the
        probability of the truth's whole word (`tokens_truth` tokens, teacher-forced) read through that layer's
        lens at each of its positions; `rank_truth` ranks the word's first token at the slot (1 = top). The claim
        columns are NaN for base and control prompts (see `halluscope.analysis.probabilities` for the contrast).

    Raises:
        InputError: an unknown mode or heads outside the model.

    Example:
        >>> logit_lens(vlm, prompts, heads={(1, 2)}).query("setting == 'ablated'")
    """
    from halluscope.interventions.heads import HeadIntervention, intervene

    if mode not in ("zero", "mean"):
        raise InputError(f"the logit lens ablates with mode 'zero' or 'mean', got {mode!r}")
    settings: list[tuple[str, Any]] = [("baseline", None)]
    if heads:
        iv = HeadIntervention(frozenset(heads), mode=mode, alpha=0.0)
        iv.check(vlm.n_layers, vlm.n_heads)
        settings.append(("ablated", iv))
    rows: list[dict[str, Any]] = []
    for prompt, setup in placed_prompts(vlm, prompts, max_new_tokens=max_new_tokens, on_prompt=on_prompt,
                                        on_skip=on_skip):
        for slot in setup.slots:
            first_ids = {(w.form, w.role): w.ids[0] for w in slot.words}
            for setting, iv in settings:
                with nullcontext() if iv is None else intervene(vlm, iv, means=means):
                    scores, at_slot = slot_logprobs(  # rows are layers
                        slot, lambda batch, m: layer_logits(vlm, batch, positions=list(range(-m, 0)))[0])
                for form, (n_truth, n_claim) in slot.forms().items():
                    truth, claim = scores[form, "truth"].exp(), scores[form, "claim"].exp()
                    for layer in range(at_slot.shape[0]):
                        rows.append({
                            "sample_id": prompt.sample_id, "condition": prompt.condition, "truth": prompt.truth,
                            "claim": prompt.claim, "contrast": prompt.contrast, "setting": setting, "form": form,
                            "tokens_truth": n_truth, "tokens_claim": n_claim, "layer": layer,
                            "p_truth": float(truth[layer]),
                            "rank_truth": _rank(at_slot[layer], first_ids[form, "truth"]),
                            "p_claim": float(claim[layer]) if prompt.misleading else float("nan"),
                            "rank_claim": _rank(at_slot[layer], first_ids[form, "claim"]) if prompt.misleading
                            else None,
                        })
    return typed_table(rows, _LENS_SCHEMA, prompts)


def summarize_lens(table: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, form, layer, kind): mean probability and median rank of truth and claim, with `n` rows.

    `kind` pools the conditions: "misleading" or "truthful" (base and control).

    Raises:
        InputError: `table` lacks the columns of `logit_lens`.
    """
    missing = [c for c in _LENS_SCHEMA if c not in table.columns]
    if missing:
        raise InputError(f"lens table lacks columns {missing}; pass the output of logit_lens()")
    kind = table["condition"].map(lambda c: "truthful" if c in ("base", "control") else "misleading")
    frame = table.assign(kind=kind)
    for column in ("rank_truth", "rank_claim"):
        frame[column] = frame[column].astype("float64")
    grouped = frame.groupby(["kind", "setting", "form", "layer"], sort=True, observed=True)
    out = grouped.agg(n=("p_truth", "size"), p_truth=("p_truth", "mean"), p_claim=("p_claim", "mean"),
                      median_rank_truth=("rank_truth", "median"), median_rank_claim=("rank_claim", "median"))
    return out.reset_index()


@locked_step  # one writer per run, for the whole step
def lens_step(run_dir, *, heads: str | None = None, intervention: str = "zero", conditions=None,
              limit: int | None = None, max_new_tokens: int | None = None, force: bool = False, vlm=None,
              progress=None, warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`halluscope lens`: the logit lens at the answer position of a run's prompts (and with `heads` ablated).

    Writes lens.parquet (`logit_lens`) and plots/lens_<form>.png. Resumes from finished shards under
    RUN/parts/lens/.

    Args:
        run_dir: an eval run.
        heads: optional set name ("best3") or "L0H3,L11H15" for the ablated setting.
        intervention: "zero" or "mean" (needs `halluscope means`).
        conditions, limit: which prompts (default all).
        max_new_tokens: reply budget for placing the answer (default: the eval run's).
        vlm: the run's model if already loaded; progress: a `halluscope.steps.Progress`; warn: gets one line per
            skipped prompt.

    Returns:
        {"heads", "prompts", "rows", "skipped"}.

    Raises:
        RunError: no run, no baseline table, or every prompt skipped. InputError: bad heads or conditions.

    Example:
        >>> lens_step("runs/count", heads="best3")
    """
    from halluscope.analysis.probabilities import compute_in_shards, missing_prompts, open_analysis, skip_reporter
    from halluscope.errors import RunError
    from halluscope.interventions.heads import format_heads
    from halluscope.plots.analysis_figures import plot_lens
    from halluscope.steps import no_progress

    a = open_analysis(run_dir, "lens", heads=heads, intervention=intervention, conditions=conditions, limit=limit,
                      max_new_tokens=max_new_tokens, force=force, vlm=vlm, optional_heads=True)
    run, head_set, prompts, vlm = a.run, a.head_set, a.prompts, a.vlm
    on_skip = skip_reporter(warn, [])
    table = compute_in_shards(
        run, "lens", prompts, progress=progress or no_progress, description="lens",
        compute=lambda chunk, advance: logit_lens(vlm, chunk, head_set, mode=intervention, means=a.means,
                                                  max_new_tokens=a.budget, on_prompt=advance, on_skip=on_skip))
    if table.empty:
        raise RunError(f"no prompt of {run.path} could be scored (all skipped); see the skip messages")
    run.write_table("lens", table)
    summary = summarize_lens(table)
    label = f", {format_heads(head_set)} ablated dashed" if head_set else ""
    for form in sorted(set(summary["form"])):
        plot_lens(summary, run.plots_dir / f"lens_{form}.png", form=form,
                  title=f"logit lens at the answer position ({form} form{label})")
    result = {"heads": format_heads(head_set) or None, "prompts": int(table["sample_id"].nunique()),
              "rows": len(table), "skipped": missing_prompts(prompts, table)}
    run.finish_step("lens", result)
    return result
