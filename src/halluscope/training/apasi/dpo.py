"""One APASI training round: DPO through TRL's `DPOTrainer` on a LoRA adapter from PEFT, then the adapter merged.

Nothing here re-implements DPO or LoRA. The loss is TRL's sigmoid DPO on sequence-summed log-probs,
-log sigmoid(beta * [(log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))]); the reference is the
round's starting model, which TRL gets by switching the adapter off (it cannot precompute reference log-probs for
image datasets). `DPOSettings.sft_weight` > 0 adds TRL's "sft" loss (the chosen response's token-mean NLL) with
that weight. The adapter sits on every linear layer of the language model's decoder layers (attention and
MLP projections, found under the family table's `layers` path), so every family is covered; the vision tower,
the projector and `lm_head` stay frozen.

Each pair enters TRL's `DataCollatorForVisionPreference` as its image plus texts already put in the model's
chat template by the model's tokenizer (`render_pair`): TRL's conversational path would call the processor's own
`apply_chat_template`, which some processors built without torchvision cannot run (SmolVLM's reads its video
processor), and its collator encodes without the tokenizer's special tokens, so those that `VLM.encode` adds (a
BOS) are written into the prompt text. Training runs on the CPU in float32, without workers or reporting, seeded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn
from transformers import TrainerCallback

from halluscope.errors import InputError
from halluscope.steps import Progress, no_progress
from halluscope.training.apasi.settings import DPOSettings

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["dpo_round", "lora_targets", "preference_dataset", "render_pair", "save_round"]


def lora_targets(vlm) -> list[str]:
    """Every `nn.Linear` inside the language model's decoder layers (q/k/v/o and the MLP projections), by full
    module name: the vision tower, the projector and `lm_head` lie outside `vlm.family.layers`."""
    prefix = vlm.family.layers + "."
    return sorted(name for name, module in vlm.model.named_modules()
                  if name.startswith(prefix) and isinstance(module, nn.Linear))


def render_pair(vlm, prompt: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) in the model's chat template: the prompt as one image plus text user turn and
    the open assistant turn, each response as what the template adds after it (its end-of-turn included).

    The prompt is the longest start the three renderings share, as TRL cuts it, with the special tokens the
    processor adds when `VLM.encode` encodes it (a BOS, say) written into the text: TRL's collator encodes without
    them, and training should see the tokens that generation sees.
    """
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    def full(reply: str) -> str:
        turn = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
        return vlm.tokenizer.apply_chat_template(user + [turn], chat_template=vlm.chat_template, tokenize=False)

    texts = [vlm.render(prompt), full(chosen), full(rejected)]
    shared = 0
    while shared < min(map(len, texts)) and len({t[shared] for t in texts}) == 1:
        shared += 1
    head, tail = _added_specials(vlm.tokenizer)
    return head + texts[0][:shared] + tail, texts[1][shared:], texts[2][shared:]


def _added_specials(tokenizer) -> tuple[str, str]:
    """The text of the special tokens the tokenizer puts before and after a text it encodes with its defaults."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = tokenizer("a")["input_ids"]
    start = next((k for k in range(len(added) - len(plain) + 1) if added[k:k + len(plain)] == plain), None)
    if start is None:  # the defaults change the text's own tokens: nothing is only added
        return "", ""
    return tokenizer.decode(added[:start]), tokenizer.decode(added[start + len(plain):])


def preference_dataset(vlm, pairs: pd.DataFrame, images: Mapping[Any, Any]) -> Dataset:
    """A `datasets.Dataset` of TRL's vision preference format (images, prompt, chosen, rejected) from a pairs
    table and image_id -> image (bytes or path), the images as the model's encoder takes them.

    Raises:
        InputError: no pairs, or a pair whose image is missing.
    """
    from datasets import Dataset

    if pairs.empty:
        raise InputError("no preference pairs to train on; make them with `halluscope apasi data`")
    missing = sorted({i for i in pairs["image_id"] if i not in images}, key=str)
    if missing:
        raise InputError(f"the pairs name {len(missing)} image(s) the data run lacks, e.g. {missing[:3]!r}; remake "
                         f"the data with `halluscope apasi data --force`")
    rendered = [render_pair(vlm, p, c, r) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    return Dataset.from_dict({"images": [[vlm.prepared_image(images[i])] for i in pairs["image_id"]],
                              "prompt": [r[0] for r in rendered], "chosen": [r[1] for r in rendered],
                              "rejected": [r[2] for r in rendered]})


def dpo_round(vlm, dataset: Dataset, settings: DPOSettings, *, work_dir: str | Path,
              progress: Progress = no_progress) -> tuple[Any, list[dict[str, Any]]]:
    """Train a fresh LoRA adapter on `vlm.model` with DPO over `dataset`; returns (the PEFT model, TRL's log).

    Checkpoints go to `work_dir` (TRL's output directory) four times per round, and a rerun continues from
    the last one.
    """
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig, DPOTrainer

    steps = math.ceil(settings.epochs * math.ceil(math.ceil(len(dataset) / settings.batch_size) / settings.grad_accum))
    work_dir = Path(work_dir)
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                      target_modules=lora_targets(vlm))
    config = vars(vlm.model.config)
    losses, weights = (["sigmoid", "sft"], [1.0, settings.sft_weight]) if settings.sft_weight else (["sigmoid"], None)
    use_cache = config.get("use_cache")  # the Trainer sets it for training; restored afterwards, so not saved
    vlm.model.train()
    with warnings.catch_warnings(), progress("dpo", steps) as advance:
        # transformers 5 renamed gradient checkpointing and warns whenever TRL sets or reads the old name
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*", category=FutureWarning)
        args = DPOConfig(
            output_dir=str(work_dir), per_device_train_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.grad_accum, num_train_epochs=settings.epochs,
            learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=settings.warmup,
            weight_decay=settings.weight_decay, optim="adamw_torch", beta=settings.beta, loss_type=losses,
            loss_weights=weights,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
            report_to="none", seed=settings.seed, data_seed=settings.seed, logging_steps=1, disable_tqdm=True,
            save_strategy="steps", save_steps=max(1, math.ceil(steps / 4)), save_total_limit=1, max_length=None,
            disable_dropout=False, precompute_ref_log_probs=False)
        trainer = DPOTrainer(model=vlm.model, args=args, train_dataset=dataset, processing_class=vlm.processor,
                             peft_config=lora)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_Advance(advance))
        resume = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
        trainer.train(resume_from_checkpoint=resume)
    if use_cache is None:
        config.pop("use_cache", None)
    else:
        config["use_cache"] = use_cache
    model = trainer.model
    model.eval()
    return model, list(trainer.state.log_history)


class _Advance(TrainerCallback):
    """Moves a progress bar by one per optimiser step."""

    def __init__(self, advance: Callable[..., None]) -> None:
        self.advance = advance

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.advance(1)


def save_round(model, processor, *, adapter_dir: str | Path, model_dir: str | Path, base: str) -> None:
    """Save the round's adapter (its config naming `base`, the model it applies to) to `adapter_dir`, then merge
    it into the weights and save the merged model with the processor to `model_dir`."""
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(str(adapter_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
