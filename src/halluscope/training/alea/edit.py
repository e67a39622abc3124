"""The edit (ALEAHallu's "edit adversarially" stage): fine-tune only the located parameters so that the model gives
the grounded responses even under the adversarial prefix, while a KL term keeps its next-token distributions on
clean inputs close to the unedited model's.

    loss = nll_weight * NLL(grounded | image, prompt, adversarial prefix)
         + kl_weight * KL(p_unedited || p_edited) over the grounded tokens after image and prompt (no prefix)

ALEAHallu weights them 0.2 and 1 and trains with SGD; its code zeroes the gradients once per epoch, here every step.
Every other parameter is frozen and left bit for bit as loaded. The unedited model's distributions come from the
same forward with the located parameters' original values put back (`torch.func.functional_call`), so nothing of
size [examples, tokens, vocabulary] is held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from halluscope.errors import InputError
from halluscope.images import ImageLike
from halluscope.training.alea.locate import located_parameters
from halluscope.training.alea.optimise import batch_of, optimise, steps_for, trainable_only
from halluscope.training.alea.prefix import SoftPrefix, inserted
from halluscope.training.sequences import encode_responses, response_kl, response_nll

__all__ = ["OPTIMIZERS", "EditConfig", "edit_parameters"]

#: The optimisers the edit can use.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")

Row = tuple[ImageLike, str, Sequence[int]]


@dataclass(frozen=True)
class EditConfig:
    """Every hyper-parameter of the prefix and the edit (recorded in the checkpoint's manifest).

    Args:
        seed: draws the prefix's starting tokens and every mini-batch.
        prefix_tokens: vectors in the adversarial prefix (ALEAHallu: 5).
        prefix_lr, prefix_epochs, prefix_batch_size: its AdamW training (ALEAHallu: 1e-3, 3, 4).
        optimizer: "sgd" (ALEAHallu) or "adamw" for the edit.
        lr, epochs, edit_batch_size: the edit's training (ALEAHallu: 1e-3, 5, 2).
        nll_weight, kl_weight: the two terms of the edit's loss (ALEAHallu: 0.2, 1.0).
    """

    seed: int = 0
    prefix_tokens: int = 5
    prefix_lr: float = 1e-3
    prefix_epochs: int = 3
    prefix_batch_size: int = 4
    optimizer: str = "sgd"
    lr: float = 1e-3
    epochs: int = 5
    edit_batch_size: int = 2
    nll_weight: float = 0.2
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown --optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        counts = ("prefix_tokens", "prefix_epochs", "prefix_batch_size", "epochs", "edit_batch_size")
        for name in counts:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected an integer >= 1")
        for name in ("prefix_lr", "lr"):
            if not getattr(self, name) > 0:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a learning rate > 0")
        if self.nll_weight < 0 or self.kl_weight < 0 or self.nll_weight + self.kl_weight == 0:
            raise InputError(f"--nll-weight {self.nll_weight}, --kl-weight {self.kl_weight}: expected weights >= 0, "
                             f"not both 0")

    def to_dict(self) -> dict:
        """The settings as plain values (what the manifest records)."""
        return asdict(self)


def _optimizer(config: EditConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


def edit_parameters(vlm, rows: Sequence[Row], names: Sequence[str], prefix: SoftPrefix, config: EditConfig, *,
                    state_path: Path, save_every: int = 50, log_every: int = 10,
                    log: Callable[[str], None] = print) -> list[dict]:
    """Edit the parameters called `names` in place on `rows` (image, prompt, grounded response ids) against the
    adversarial `prefix` (module docstring); resumes from `state_path` (`optimise`). Returns the training log
    (loss, nll and kl per logged step).

    Raises:
        InputError: a name the model does not have.
    """
    params = located_parameters(vlm, names)
    originals = {name: p.detach().clone() for name, p in params.items()}
    optimizer = _optimizer(config, list(params.values()))
    vectors = prefix.vectors.detach()

    def loss_at(step: int) -> dict[str, torch.Tensor]:
        chosen = [rows[i] for i in batch_of(step, len(rows), config.edit_batch_size, seed=config.seed, stage="edit")]
        adversarial = encode_responses(vlm, chosen, prefix.slot_ids)
        with inserted(vlm, vectors, adversarial.slots):
            nll = response_nll(vlm.model(**adversarial.inputs).logits, adversarial)
        clean = encode_responses(vlm, chosen)
        with torch.no_grad():
            reference = functional_call(vlm.model, originals, args=(), kwargs=clean.inputs).logits
        kl = response_kl(reference, vlm.model(**clean.inputs).logits, clean)
        return {"loss": config.nll_weight * nll + config.kl_weight * kl, "nll": nll, "kl": kl}

    steps = steps_for(len(rows), config.edit_batch_size, config.epochs)
    with trainable_only(vlm.model, set(names)):
        return optimise(params, optimizer, loss_at, steps=steps, state_path=state_path, stage="edit",
                        save_every=save_every, log_every=log_every, log=log)
