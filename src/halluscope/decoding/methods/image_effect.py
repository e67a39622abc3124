"""What the image changes inside the model, per prompt: activations at the last prompt token with the image minus
those of the prompt's no-image twin (the same prompt as a text-only turn, as M3ID and PAI build it).

VHR ranks heads by it and VISTA steers by it. Both compute it once per decoding call, from one prefill forward of
the real rows and one of the twin, before the first token, so it costs nothing per generated token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from halluscope.decoding.methods.base import source_pairs

if TYPE_CHECKING:
    from halluscope.decoding.methods.base import DecodingMethod
    from halluscope.models.vlm import Batch

__all__ = ["image_effect", "last_token_activations", "no_image_twin"]


def no_image_twin(method: DecodingMethod, vlm, batch: Batch) -> Batch:
    """The batch's prompts without their images, one text-only row per row.

    Raises:
        InputError: the batch does not carry its (image, prompt) pairs (it was encoded outside `mitigate`).
    """
    from halluscope.decoding.branches import branch_batch

    return branch_batch(vlm, [(None, prompt) for _, prompt in source_pairs(method, batch)])


@torch.inference_mode()
def last_token_activations(vlm, batch: Batch, modules: Sequence[nn.Module], *,
                           read_input: bool = False) -> torch.Tensor:
    """Each module's output (its first input with `read_input`) at every row's last prompt token, from one prefill
    forward with the decoding loop's positions: [module, batch, features], float32."""
    from halluscope.decoding.branches import prefill_positions

    seen: list[torch.Tensor | None] = [None] * len(modules)

    def capture(index: int):
        def hook(module, args, output):
            seen[index] = (args[0] if read_input else output)[:, -1].float()  # rows are left-padded
        return hook

    handles = [module.register_forward_hook(capture(i)) for i, module in enumerate(modules)]
    try:
        vlm.model(**batch.inputs, position_ids=prefill_positions(vlm, batch), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(seen)


def image_effect(vlm, batch: Batch, twin: Batch, modules: Sequence[nn.Module], *,
                 read_input: bool = False) -> torch.Tensor:
    """`last_token_activations` of `batch` minus those of its no-image `twin`: [module, batch, features]."""
    return (last_token_activations(vlm, batch, modules, read_input=read_input) -
            last_token_activations(vlm, twin, modules, read_input=read_input))
