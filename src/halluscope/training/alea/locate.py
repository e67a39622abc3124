"""Locating hallucination-prone parameters from differential hidden states (ALEAHallu's "locate" stage).

Each pair's grounded and hallucinated responses are teacher-forced after their image and prompt; at every decoder
layer the hidden states over the response tokens are mean-pooled, and the layer's differential is the Euclidean
distance between the two means. Mean pooling over each response's own tokens replaces ALEAHallu's norm of padded
full-length matrices (the spec's recommended fix), so padding and length do not enter. Two readings per layer:

- "residual": the layer's output (the residual stream after it), the quantity ALEAHallu compares;
- "update": what the layer itself writes (its output minus its input), which leaves out the difference the
  layers below already carried, so it points at the layer whose computation tells the two responses apart.

Every pair votes for its layer with the largest differential; the located layers are those that won at least once
(ALEAHallu's rule) or the `max_layers` that won most often (then the largest mean differential), and the located
parameters are the named modules of those layers (ALEAHallu: the MLP's output projection, `mlp.down_proj`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import pandas as pd
import torch

from halluscope.errors import InputError
from halluscope.images import ImageLike
from halluscope.training.sequences import encode_responses

__all__ = ["DEFAULT_MODULES", "SCORES", "layer_differentials", "located_parameters", "parameter_names",
           "select_layers"]

#: The differential readings (module docstring).
SCORES: tuple[str, ...] = ("residual", "update")
#: The modules edited in each located layer, as dotted paths inside a decoder layer: ALEAHallu's MLP output.
DEFAULT_MODULES: tuple[str, ...] = ("mlp.down_proj",)

Row = tuple[ImageLike, str, Sequence[int]]


@torch.no_grad()
def _pooled(vlm, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and layer, the mean over the response's tokens of the layer's input and output hidden states:
    two [rows, layer, hidden] tensors (float32)."""
    batch = encode_responses(vlm, rows)
    holds = torch.zeros_like(batch.predicts)
    holds[:, 1:] = batch.predicts[:, :-1]  # the positions holding response tokens
    weights = (holds / holds.sum(1, keepdim=True)).float()
    inputs, outputs = [], []

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(torch.einsum("bs,bsh->bh", weights, hidden.float()))

    def after(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        outputs.append(torch.einsum("bs,bsh->bh", weights, hidden.float()))

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in vlm.layers]
    handles += [layer.register_forward_hook(after) for layer in vlm.layers]
    try:
        vlm.model(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(inputs, 1), torch.stack(outputs, 1)


def layer_differentials(vlm, grounded: Sequence[Row], hallucinated: Sequence[Row], *,
                        batch_size: int = 8) -> pd.DataFrame:
    """The differential of every layer for every pair (row k of `grounded` with row k of `hallucinated`): one row
    per (pair, layer) with the "residual" and "update" distances (module docstring).

    Raises:
        InputError: the two lists differ in length, or are empty.
    """
    if len(grounded) != len(hallucinated) or not grounded:
        raise InputError(f"got {len(grounded)} grounded and {len(hallucinated)} hallucinated responses; pass one of "
                         f"each per pair, at least one pair")
    rows = []
    for start in range(0, len(grounded), batch_size):
        g_in, g_out = _pooled(vlm, grounded[start:start + batch_size])
        h_in, h_out = _pooled(vlm, hallucinated[start:start + batch_size])
        residual = (g_out - h_out).norm(dim=-1)
        update = ((g_out - g_in) - (h_out - h_in)).norm(dim=-1)
        for k in range(residual.shape[0]):
            for layer in range(residual.shape[1]):
                rows.append({"pair": start + k, "layer": layer, "residual": float(residual[k, layer]),
                             "update": float(update[k, layer])})
    return pd.DataFrame(rows, columns=["pair", "layer", *SCORES])


def select_layers(differentials: pd.DataFrame, *, score: str = "residual",
                  max_layers: int | None = None) -> tuple[list[int], pd.DataFrame]:
    """The located layers and a per-layer summary (layer, mean and median of each score, wins).

    Each pair's winner is its layer with the largest `score`; the located layers are every layer that won (with
    `max_layers` None, ALEAHallu's rule) or the `max_layers` layers with the most wins, ties (layers that never won
    included) going to the larger mean score.

    Raises:
        InputError: an unknown score, or max_layers < 1.

    Example:
        >>> table = pd.DataFrame({"pair": [0, 0, 1, 1], "layer": [0, 1, 0, 1], "residual": [1.0, 3.0, 2.0, 5.0],
        ...                       "update": [1.0, 0.5, 2.0, 1.0]})
        >>> select_layers(table, score="update")[0]
        [0]
    """
    if score not in SCORES:
        raise InputError(f"unknown --score {score!r}; use one of {', '.join(SCORES)}")
    if max_layers is not None and max_layers < 1:
        raise InputError(f"--max-layers {max_layers}: give a count >= 1, or leave it out to keep every winning layer")
    winners = differentials.loc[differentials.groupby("pair")[score].idxmax(), "layer"]
    per_layer = differentials.groupby("layer")[list(SCORES)].agg(["mean", "median"])
    per_layer.columns = [f"{name}_{stat}" for name, stat in per_layer.columns]
    per_layer = per_layer.reset_index()
    per_layer["wins"] = per_layer["layer"].map(winners.value_counts()).fillna(0).astype(int)
    ranked = per_layer.sort_values(["wins", f"{score}_mean"], ascending=False)["layer"].tolist()
    chosen = ranked[:max_layers] if max_layers is not None else per_layer.loc[per_layer["wins"] > 0, "layer"]
    return sorted(int(layer) for layer in chosen), per_layer


def parameter_names(vlm, layers: Sequence[int], modules: Sequence[str] = DEFAULT_MODULES) -> list[str]:
    """The full names (as in `model.named_parameters()`) of every parameter of `modules` in `layers`.

    Raises:
        InputError: a layer out of range, or a module path a decoder layer does not have.

    Example:
        >>> parameter_names(vlm, [3])  # doctest: +SKIP
        ['model.language_model.layers.3.mlp.down_proj.weight']
    """
    bad = [layer for layer in layers if not 0 <= layer < vlm.n_layers]
    if bad:
        raise InputError(f"layer {bad[0]} is out of range; this model has layers 0..{vlm.n_layers - 1}")
    names = []
    for layer in layers:
        for module in modules:
            try:
                found = operator.attrgetter(module)(vlm.layers[layer])
            except AttributeError:
                raise InputError(f"--modules {module!r}: decoder layer {layer} of {vlm.family.name} has no such "
                                 f"module; give a dotted path inside a decoder layer, e.g. mlp.down_proj") from None
            names += [f"{vlm.family.layers}.{layer}.{module}.{name}" for name, _ in found.named_parameters()]
    return names


def located_parameters(vlm, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The model's parameters called `names`, in that order.

    Raises:
        InputError: a name the model does not have (a located set from another architecture).
    """
    own = dict(vlm.model.named_parameters())
    missing = [name for name in names if name not in own]
    if missing or not names:
        raise InputError(f"the located parameter {missing[0] if missing else '(none)'!r} is not a parameter of "
                         f"{vlm.name or 'this model'}; locate on this model with `halluscope alea locate`")
    return {name: own[name] for name in names}
