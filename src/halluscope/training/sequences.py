"""Teacher-forced (image, prompt, response) batches, the input every ALEA stage and APASI's self-check scoring run
on: the prompt as `VLM.encode` makes it, optional prefix slots right after the assistant prefix (where the soft
prefix goes), then the response's tokens, left-padded together; plus the per-token log-probabilities and losses
read from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from halluscope.errors import InputError
from halluscope.images import ImageLike

__all__ = ["ResponseBatch", "encode_responses", "response_ids", "response_kl", "response_logprob", "response_nll"]

IGNORE = -100  # the target of a position that predicts no response token


@dataclass
class ResponseBatch:
    """A left-padded teacher-forced batch.

    `slots` [batch, seq] is True on the prefix slots; `targets` [batch, seq] holds, at each position, the response
    token it predicts (the next one), `IGNORE` elsewhere; `predicts` is `targets != IGNORE`.
    """

    inputs: dict[str, torch.Tensor]
    slots: torch.Tensor
    targets: torch.Tensor

    @property
    def predicts(self) -> torch.Tensor:
        return self.targets != IGNORE

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def response_ids(vlm, text: str) -> list[int]:
    """The token ids of `text` as the model's reply, ended by its first end-of-reply token (so training on it
    teaches the model to stop there too).

    Example:
        >>> response_ids(vlm, "A red circle.")  # doctest: +SKIP
        [32, 118, 205, 13, 2]
    """
    eos = vlm.greedy_config(1).eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return [*vlm.reply_token_ids(text), *([] if eos is None else [eos])]


def encode_responses(vlm, rows: Sequence[tuple[ImageLike, str, Sequence[int]]],
                     slot_ids: Sequence[int] = ()) -> ResponseBatch:
    """One left-padded batch of (image, prompt, response token ids) rows, with `len(slot_ids)` prefix slots (holding
    those token ids) between each prompt and its response.

    Tensors of the processor that run along the sequence (input ids, attention mask, `mm_token_type_ids`) are laid
    out again; image tensors pass through unchanged, so positions (M-RoPE included) come out as the model computes
    them for any prompt.

    Raises:
        InputError: no rows, or a row whose response is empty.
    """
    if not rows:
        raise InputError("encode_responses() got no rows; pass at least one (image, prompt, response ids) row")
    empty = [i for i, row in enumerate(rows) if len(row[2]) == 0]
    if empty:
        raise InputError(f"row {empty[0]} has an empty response; give every row at least one response token")
    batch = vlm.encode([(image, prompt) for image, prompt, _ in rows])
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    along = [k for k, v in batch.inputs.items()
             if k not in ("input_ids", "attention_mask") and v.dim() == 2 and v.shape == ids.shape]
    pad = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else 0
    k = len(slot_ids)
    laid, lengths = [], []
    for row, (_, _, response) in enumerate(rows):
        keep = mask[row]
        prompt = ids[row][keep].tolist()
        laid.append((prompt, [*slot_ids, *response], {key: batch.inputs[key][row][keep].tolist() for key in along}))
        lengths.append(len(prompt) + k + len(response))
    width = max(lengths)
    out_ids = torch.full((len(rows), width), pad, dtype=ids.dtype)
    out_mask = torch.zeros((len(rows), width), dtype=batch.attention_mask.dtype)
    out_along = {key: torch.zeros((len(rows), width), dtype=batch.inputs[key].dtype) for key in along}
    slots = torch.zeros((len(rows), width), dtype=torch.bool)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, ((prompt, tail, per_token), length) in enumerate(zip(laid, lengths)):
        start = width - length
        out_ids[row, start:] = torch.tensor(prompt + tail, dtype=ids.dtype)
        out_mask[row, start:] = 1
        for key, values in per_token.items():
            out_along[key][row, start:start + len(values)] = torch.tensor(values)  # appended tokens are text (0)
        first_slot = start + len(prompt)
        slots[row, first_slot:first_slot + k] = True
        response = torch.tensor(tail[k:], dtype=torch.long)
        first = first_slot + k  # the response's first token, predicted by the position before it
        targets[row, first - 1:width - 1] = response
    inputs = {**batch.inputs, "input_ids": out_ids, "attention_mask": out_mask, **out_along}
    device = ids.device
    return ResponseBatch({key: value.to(device) for key, value in inputs.items()}, slots.to(device),
                         targets.to(device))


def _logprobs(logits: torch.Tensor, batch: ResponseBatch) -> torch.Tensor:
    """Log-softmax over the vocabulary at the predicting positions, [n_predicted, vocab] (float32)."""
    return torch.log_softmax(logits[batch.predicts].float(), dim=-1)


def _target_logprobs(logits: torch.Tensor, batch: ResponseBatch) -> torch.Tensor:
    """The log-probability of each response token, [n_predicted] (float32)."""
    return _logprobs(logits, batch).gather(1, batch.targets[batch.predicts][:, None]).squeeze(1)


def response_nll(logits: torch.Tensor, batch: ResponseBatch, *, per_row: bool = False) -> torch.Tensor:
    """The negative log-likelihood of the responses: the mean over all response tokens of the batch, or with
    `per_row` the mean over each row's tokens ([batch]). `logits` is [batch, seq, vocab]."""
    if not per_row:
        return -_target_logprobs(logits, batch).mean()
    return -response_logprob(logits, batch) / batch.predicts.sum(1).to(torch.float32)


def response_logprob(logits: torch.Tensor, batch: ResponseBatch) -> torch.Tensor:
    """Each row's response log-likelihood, the sum of its tokens' log-probabilities ([batch], float32)."""
    token = _target_logprobs(logits, batch)
    rows = batch.predicts.nonzero()[:, 0]
    return torch.zeros(len(batch), dtype=token.dtype, device=token.device).index_add(0, rows, token)


def response_kl(reference_logits: torch.Tensor, logits: torch.Tensor, batch: ResponseBatch) -> torch.Tensor:
    """KL(reference || model) of the next-token distributions, summed over the vocabulary and averaged over the
    response tokens: the forward KL with the reference (the unedited model) first, as ALEAHallu's edit uses it."""
    reference = _logprobs(reference_logits, batch)
    return torch.sum(reference.exp() * (reference - _logprobs(logits, batch)), dim=-1).mean()
