"""`DPOSettings`: the hyper-parameters of an APASI training round, checked, and the self-check's default doubt, in a
module light enough for the CLI to read its defaults from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from halluscope.errors import InputError

__all__ = ["DOUBT", "DPOSettings"]

#: The self-check's default P(yes) below which a named object is doubted (`apasi data --doubt`, `selfcheck.py`).
DOUBT = 0.5


@dataclass(frozen=True)
class DPOSettings:
    """The hyper-parameters of one DPO round (defaults fit the 1.7M-parameter scenes organism; the paper's for
    LLaVA-1.5-7B are rank 128, alpha 256, learning rate 4e-7, 3 epochs, batch 64).

    Args:
        rank, alpha, dropout: the LoRA adapter (PEFT `LoraConfig`; bias none).
        learning_rate: AdamW's peak rate, cosine schedule after `warmup` (a fraction of the steps).
        epochs: passes over the pairs. batch_size x grad_accum pairs make one optimiser step.
        beta: DPO's temperature. weight_decay: AdamW's. seed: adapter initialisation and data order.
        sft_weight: weight of an added NLL term on the chosen response (TRL's "sft" loss, token-averaged, as in RPO
            and MPO); 0 trains on DPO alone, as APASI does.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    learning_rate: float = 5e-5
    epochs: float = 2.0
    batch_size: int = 8
    grad_accum: int = 1
    beta: float = 0.1
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise InputError(f"{_flag(name)} {getattr(self, name)}; expected a whole number >= 1")
        for name in ("alpha", "learning_rate", "epochs", "beta"):
            if not getattr(self, name) > 0:
                raise InputError(f"{_flag(name)} {getattr(self, name)}; expected a number > 0")
        if not self.sft_weight >= 0:
            raise InputError(f"--sft-weight {self.sft_weight}; expected a number >= 0 (0 trains on DPO alone)")
        for name in ("dropout", "warmup"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"{_flag(name)} {getattr(self, name)}; expected a fraction in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a manifest records them, with what is fixed: loss, optimiser, schedule, precision.
        `sft_weight` appears only when set, so runs trained before it existed still match their reruns."""
        settings, loss = asdict(self), "sigmoid DPO on summed log-probs (TRL DPOTrainer)"
        if self.sft_weight:
            loss += f" + {self.sft_weight} x token-mean NLL of the chosen response"
        else:
            del settings["sft_weight"]
        return {**settings, "loss": loss, "optimizer": "adamw_torch",
                "scheduler": "cosine", "precision": "float32", "device": "cpu", "lora_bias": "none",
                "reference": "the round's starting model (adapter disabled)"}


def _flag(field: str) -> str:
    """The `halluscope apasi train` option that sets `field`."""
    return "--lr" if field == "learning_rate" else "--" + field.replace("_", "-")
