"""A short hash that tells whether two loaded models compute the same function.

It covers every weight tensor (name, shape, dtype, sum and first values) and the config fields that change the
computation. It leaves out what does not: the transformers version that wrote the config, the path the model was
loaded from (`_name_or_path`) and other private or runtime fields, so a run still opens after an upgrade, from a
relative path, or with its checkpoint moved. Runs made before this scheme recorded `legacy_fingerprint`, which
`matches_legacy` re-creates from what their manifest recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SCHEME", "fingerprint", "legacy_fingerprint"]

#: Recorded in manifests beside the fingerprint; manifests without it hold a legacy fingerprint.
SCHEME = 2

# runtime switches and bookkeeping: they change what a forward returns or where the model came from, not its function
_RUNTIME_FIELDS = frozenset({
    "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "tokenizer_class", "id2label", "label2id",
})


def _computation_fields(value: Any) -> Any:
    """`value` (a config dict) without private (`_`-prefixed) and runtime fields, recursively."""
    if isinstance(value, dict):
        return {k: _computation_fields(v) for k, v in value.items()
                if not k.startswith("_") and k not in _RUNTIME_FIELDS}
    if isinstance(value, list):
        return [_computation_fields(v) for v in value]
    return value


def _hash_weights(digest: Any, tensors: Iterable[tuple[str, torch.Tensor]], with_dtype: bool) -> None:
    """Feed each tensor's name, shape (and dtype), float64 sum and first values to `digest`, in chunks so that a
    7B model needs no full-size temporary copy."""
    for name, tensor in tensors:
        flat = tensor.detach().flatten()
        total = sum(chunk.sum(dtype=torch.float64).item() for chunk in flat.split(1 << 22))
        dtype = str(tensor.dtype) if with_dtype else ""
        digest.update(f"{name}{tuple(tensor.shape)}{dtype}{total:.6e}".encode())
        digest.update(flat[:8].double().cpu().numpy().tobytes())


@torch.inference_mode()
def fingerprint(model: nn.Module) -> str:
    """16 hex digits over the weights and the computation-defining config fields of `model`."""
    config = json.dumps(_computation_fields(model.config.to_dict()), sort_keys=True, default=str)
    digest = hashlib.sha256(config.encode())
    _hash_weights(digest, model.state_dict().items(), with_dtype=True)
    return digest.hexdigest()[:16]


@torch.inference_mode()
def legacy_fingerprint(model: nn.Module, *, transformers_version: str, name_or_path: str) -> str:
    """The fingerprint halluscope 0.1 recorded: the full config JSON as transformers `transformers_version` wrote
    it for a model loaded from `name_or_path`, then the weights."""
    fields = json.loads(model.config.to_json_string(use_diff=False))
    fields["transformers_version"], fields["_name_or_path"] = transformers_version, name_or_path
    digest = hashlib.sha256((json.dumps(fields, indent=2, sort_keys=True) + "\n").encode())
    _hash_weights(digest, model.state_dict().items(), with_dtype=False)
    return digest.hexdigest()[:16]
