"""Second branches of a decoding run as extra batch rows: their inputs, positions and one joint key/value cache.

A contrastive method compares the model's next-token logits on the real input with those on a second input:
the image perturbed or augmented, no image at all, or a disturbance instruction before the prompt. Each such
branch is a `Batch` with one row per real row, wrapped in the model's chat template (`branch_batch`). All rows
of all branches are prefilled (branches whose inputs have the same shapes in one forward), then packed into one
left-padded cache (`Rows`). A branch whose rows hold no image after the tokens they share with the real rows (a
text-only branch; the same image under changed prompt text, as in ICD) continues from the real rows' keys and
values over those tokens instead (`shared_prefixes`): causal attention makes them the same, and the vision tower
does not run again. Attention edits see each row's own columns, so under an edit every branch is prefilled in
full. Every decoding step is one forward of (1 + branches) x batch rows, each with its
own cache rows, attention mask and position ids. A no-image branch on an M-RoPE model (Qwen2-VL, Qwen2.5-VL)
gets the text-only positions of its own input. Beam search copies and reorders rows with their cache
(`Rows.select`); a search that looks one token ahead or goes back (OPERA) feeds a token without keeping it
(`Rows.peek`) or restarts the rows from the end of their prompts (`Rows.rewind`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from halluscope.decoding.attention import editing, set_columns
from halluscope.decoding.methods.early_exit import early_exit_logits
from halluscope.errors import InputError
from halluscope.images import ImageLike
from halluscope.models.compat import cache_argument, output_cache
from halluscope.models.vlm import Batch
from halluscope.sweep.cache import BufferedLayer, pack_caches

__all__ = ["SourcedBatch", "Rows", "branch_batch", "encode_text", "join_batches", "prefill_positions",
           "uses_mrope"]


@dataclass
class SourcedBatch(Batch):
    """A `Batch` that remembers the (image, prompt) pairs it was encoded from, which branches that change the
    image or the prompt need (`VLM.encode` inside `mitigate` returns one)."""

    pairs: list[tuple[ImageLike, str]] = field(default_factory=list)


def encode_text(vlm, prompts: Sequence[str]) -> Batch:
    """Prompts without an image, each wrapped in the model's chat template as a text-only user turn: [batch, seq]."""
    texts = [vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": p}]}], chat_template=vlm.chat_template,
        tokenize=False, add_generation_prompt=True) for p in prompts]
    inputs = vlm.processor(text=texts, padding=True, return_tensors="pt")
    inputs = {k: v.to(vlm.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    no_image = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    return Batch(inputs, no_image, [[] for _ in prompts])


def branch_batch(vlm, pairs: Sequence[tuple[ImageLike | None, str]]) -> SourcedBatch:
    """A branch's rows, carrying their pairs: `VLM.encode` when every pair has an image, `encode_text` when none
    has.

    Raises:
        InputError: some pairs have an image and others not (a branch is one kind of input).
    """
    with_image = [image is not None for image, _ in pairs]
    if all(with_image) or not any(with_image):
        batch = vlm.encode(list(pairs)) if all(with_image) else encode_text(vlm, [prompt for _, prompt in pairs])
        return SourcedBatch(batch.inputs, batch.image_mask, batch.image_spans, pairs=list(pairs))
    raise InputError("a branch mixes rows with and without an image; give every row of a branch an image or none")


def join_batches(batches: Sequence[Batch]) -> Batch:
    """Batches of the same sequence length as one batch (rows stacked in order; image tensors concatenated
    along their first dimension, which is how every family batches them)."""
    keys = batches[0].inputs.keys()
    inputs = {k: torch.cat([b.inputs[k] for b in batches]) for k in keys}
    return Batch(inputs, torch.cat([b.image_mask for b in batches]), [s for b in batches for s in b.image_spans])


def uses_mrope(vlm) -> bool:
    """True for models with 3-D multimodal rotary positions (Qwen2-VL, Qwen2.5-VL): their model computes them."""
    return hasattr(vlm.model.model, "get_rope_index")


def _text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def prefill_positions(vlm, batch: Batch) -> torch.Tensor:
    """The position ids of a left-padded prefill, as generate computes them: [batch, seq] counting from each
    row's first real token, or [3, batch, seq] M-RoPE ids (from the image grid when the rows hold images, the
    text positions repeated when they do not)."""
    text = _text_positions(batch.attention_mask)
    if not uses_mrope(vlm):
        return text
    if "image_grid_thw" not in batch.inputs:
        return text[None].expand(3, -1, -1)
    inputs = batch.inputs
    return vlm.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])[0]


def _joinable_groups(batches: Sequence[Batch]) -> list[list[int]]:
    """Indices of batches that can share one forward: the same tensors with the same shapes past the batch
    dimension (sequence length, image layout)."""
    groups: dict[tuple, list[int]] = {}
    for index, batch in enumerate(batches):
        key = tuple((name, tuple(value.shape[1:])) for name, value in sorted(batch.inputs.items()))
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _same_image(vlm, a: ImageLike | None, b: ImageLike | None) -> bool:
    """True if `a` and `b` reach the processor as the same pixels (after decoding, orientation and upscaling)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    a, b = vlm.prepared_image(a), vlm.prepared_image(b)
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def shared_prefixes(vlm, real: Batch, branch: Batch) -> list[int] | None:
    """Per row, how many leading tokens of the branch's row equal the real row's and may reuse its keys and
    values: the common token prefix, cut before the first image token unless both rows hold the same image, and
    short of the branch row's last token; None unless every row shares one or more and the rest of each branch
    row holds no image token (its continuation then runs without the vision tower)."""
    same = [False] * len(real)
    real_pairs, branch_pairs = getattr(real, "pairs", None), getattr(branch, "pairs", None)
    if real_pairs and branch_pairs:
        same = [_same_image(vlm, a[0], b[0]) for a, b in zip(real_pairs, branch_pairs)]
    prefixes = []
    for r in range(len(real)):
        keep_real, keep_branch = real.attention_mask[r].bool(), branch.attention_mask[r].bool()
        ids, other = real.input_ids[r][keep_real], branch.input_ids[r][keep_branch]
        image, other_image = real.image_mask[r][keep_real], branch.image_mask[r][keep_branch]
        length = min(len(ids), len(other) - 1)
        differ = (ids[:length] != other[:length]).nonzero()
        common = int(differ[0]) if len(differ) else length
        if not same[r] and bool(image.any()):
            common = min(common, int(image.nonzero()[0]))
        if common < 1 or bool(other_image[common:].any()):
            return None
        prefixes.append(common)
    return prefixes


def _continue_prefixes(vlm, branch: Batch, cached: list[list[tuple[torch.Tensor, torch.Tensor]]]):
    """Each branch row's prefill from the keys and values of its first tokens (`cached`, per row and layer
    [1, heads, prefix, head_dim]): one forward of the rest of every row, positions and mask as in a full prefill.
    Returns the last-position logits [rows, vocab], every row's whole cache (per layer keys, values) and the
    branch's prefill positions (as `prefill_positions`)."""
    prefix = [kv[0][0].shape[2] for kv in cached]
    keep = branch.attention_mask.bool()
    rests = [branch.input_ids[r][keep[r]][p:] for r, p in enumerate(prefix)]
    width = max(len(t) for t in rests)
    cache, mask, start = pack_caches(cached, width)
    tokens = branch.input_ids.new_zeros(len(rests), width)
    rest_mask = mask.new_zeros(len(rests), width)
    full_pos = prefill_positions(vlm, branch)
    pos = full_pos.new_zeros(*full_pos.shape[:-2], len(rests), width)
    for r, rest in enumerate(rests):
        tokens[r, width - len(rest):], rest_mask[r, width - len(rest):] = rest, 1
        pos[..., r, width - len(rest):] = full_pos[..., r, -len(rest):]
    out = vlm.text_model(input_ids=tokens, attention_mask=torch.cat([mask, rest_mask], 1), position_ids=pos,
                         use_cache=True, **{cache_argument(vlm.text_model): cache})
    kept = [[(torch.cat([layer.keys[r:r + 1, :, start - p:start], layer.keys[r:r + 1, :, -len(rest):]], 2),
              torch.cat([layer.values[r:r + 1, :, start - p:start], layer.values[r:r + 1, :, -len(rest):]], 2))
             for layer in cache.layers] for r, (p, rest) in enumerate(zip(prefix, rests))]
    return vlm.lm_head(out.last_hidden_state[:, -1]), kept, full_pos


def _cache(layers: Sequence[DynamicLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers.extend(layers)
    return cache


class _Lookahead(DynamicLayer):
    """A `BufferedLayer` read as it is, plus the positions of one more forward written into its spare buffer
    columns without advancing it (the layer's next real update overwrites them), or appended to a copy when the
    spare columns are too few."""

    def __init__(self, layer: BufferedLayer) -> None:
        super().__init__()
        self.layer, self.dtype, self.device, self.is_initialized = layer, layer.dtype, layer.device, True
        self.keys, self.values = layer.keys, layer.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.layer.keys.shape[2]
        end = start + key_states.shape[2]
        if end > self.layer.buffers[0].shape[2]:  # fewer spare columns than positions: a copy, near the end only
            return torch.cat([self.layer.keys, key_states], 2), torch.cat([self.layer.values, value_states], 2)
        for buffer, states in zip(self.layer.buffers, (key_states, value_states)):
            buffer[:, :, start:end] = states
        return tuple(buffer[:, :, :end] for buffer in self.layer.buffers)


@dataclass
class Rows:
    """Every row of every branch during decoding: one packed cache, its mask, each row's next position.

    Row `b * n + r` is row r of branch b (branch 0 is the real input). `image_columns` [rows, columns] marks the
    cache columns that hold image tokens and `prompt_start` [rows] the column of each row's first real token
    (attention edits read them); both cover the decoded columns too (never image tokens). The first `width`
    columns hold the prompts (left-padded); decoded tokens follow, one column per step.
    """

    cache: Any
    mask: torch.Tensor  # [rows, columns so far]
    next_position: torch.Tensor  # [rows] (or [3, rows] for M-RoPE)
    image_columns: torch.Tensor  # [rows, width + max_new_tokens]
    prompt_start: torch.Tensor  # [rows]
    n: int  # real rows per branch
    prompt_position: torch.Tensor  # next_position right after the prefill, where `rewind` restarts
    width: int  # prompt columns

    @classmethod
    @torch.inference_mode()
    def prefill(cls, vlm, batches: Sequence[Batch], max_new_tokens: int,
                early: Sequence[int] = (), mean: bool = False) -> tuple["Rows", torch.Tensor, torch.Tensor | None]:
        """Prefill every branch (one forward for all that have the same input shapes) and pack the caches.

        Returns the rows, the last-position logits [rows, vocab] and, for hidden-state indices `early`, the real
        rows' early-exit logits there [len(early), n, vocab] float32, or with `mean` their mean [1, n, vocab]
        (else None).
        """
        n = len(batches[0])
        if any(len(b) != n for b in batches):
            raise InputError(f"branches have {[len(b) for b in batches]} rows; every branch needs one row per input")
        per_row: list[Any] = [None] * (n * len(batches))
        logits: list[Any] = [None] * (n * len(batches))
        positions: list[Any] = [None] * (n * len(batches))
        images: list[Any] = [None] * (n * len(batches))
        exits = None
        shared = {} if editing() else {b: shared_prefixes(vlm, batches[0], batches[b])
                                      for b in range(1, len(batches))}
        shared = {b: prefixes for b, prefixes in shared.items() if prefixes is not None}
        full = [b for b in range(len(batches)) if b not in shared]
        for group in ([full[i] for i in g] for g in _joinable_groups([batches[b] for b in full])):
            joined = join_batches([batches[i] for i in group])
            pos = prefill_positions(vlm, joined)
            set_columns(joined.image_mask, joined.attention_mask)
            reads_early = bool(early) and 0 in group
            out = vlm.model(**joined.inputs, position_ids=pos, use_cache=True, logits_to_keep=1,
                            output_hidden_states=reads_early)
            if reads_early:  # the real rows are block `group.index(0)` of the joined batch
                start = group.index(0) * n
                exits = early_exit_logits(vlm, [h[start:, -1] for h in out.hidden_states], early, n, mean=mean)[1]
            cache = output_cache(out)
            lengths = joined.attention_mask.sum(1).tolist()
            for j, index in enumerate(group):
                for r in range(n):
                    row, g = index * n + r, j * n + r
                    length = int(lengths[g])
                    per_row[row] = [(layer.keys[g:g + 1, :, -length:], layer.values[g:g + 1, :, -length:])
                                    for layer in cache.layers]
                    logits[row] = out.logits[g, -1]
                    positions[row] = pos[..., g, -1]
                    images[row] = joined.image_mask[g, -length:]
        for b, prefixes in shared.items():
            cached = [[(k[:, :, :p], v[:, :, :p]) for k, v in per_row[r]] for r, p in enumerate(prefixes)]
            rows_b = range(b * n, (b + 1) * n)
            last, kept, pos = _continue_prefixes(vlm, batches[b], cached)
            lengths = batches[b].attention_mask.sum(1).tolist()
            for r, row in enumerate(rows_b):
                per_row[row], logits[row] = kept[r], last[r]
                positions[row] = pos[..., r, -1]
                images[row] = batches[b].image_mask[r, -int(lengths[r]):]
        packed, mask, width = pack_caches(per_row, max_new_tokens)
        image_columns = torch.zeros(len(per_row), width + max_new_tokens, dtype=torch.bool, device=vlm.device)
        for row, columns in enumerate(images):
            image_columns[row, width - len(columns):width] = columns
        start = torch.stack(positions, -1) + 1
        rows = cls(packed, mask, start, image_columns, width - mask.sum(1), n, start, width)
        return rows, torch.stack(logits), exits

    def index(self, local: torch.Tensor) -> torch.Tensor:
        """The rows of every branch [branches * len(local)] for real-row indices `local` (same order per branch)."""
        return torch.cat([local + b * self.n for b in range(self.mask.shape[0] // self.n)])

    def select(self, local: torch.Tensor) -> "Rows":
        """New rows made of real rows `local` [new n] (repeats copy a row) and the same rows of every branch, cache
        included: beam search expands each row into its beams and reorders them after every step."""
        rows = self.index(local.to(self.mask.device))
        layers = []
        for layer in self.cache.layers:
            length = layer.keys.shape[2]
            kept = [buffer.new_empty(len(rows), *buffer.shape[1:]) for buffer in layer.buffers]
            for new, old in zip(kept, layer.buffers):
                new[:, :, :length] = old[rows, :, :length]
            layers.append(BufferedLayer(*kept, length))
        return Rows(_cache(layers), self.mask[rows], self.next_position[..., rows], self.image_columns[rows],
                    self.prompt_start[rows], len(local), self.prompt_position[..., rows], self.width)

    @torch.inference_mode()
    def step(self, vlm, tokens: torch.Tensor,
             early: Sequence[int] = (), mean: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per row [rows] (or k per row, [rows, k]); the logits after the last one [rows, vocab] and,
        for hidden-state indices `early`, the real rows' early-exit logits there [len(early), n, vocab] float32,
        or with `mean` their mean [1, n, vocab] (read out in the same lm_head call; else None)."""
        out = self._feed(vlm, tokens if tokens.dim() == 2 else tokens[:, None], hidden_states=bool(early))
        final = out.last_hidden_state[:, -1]
        if not early:
            return vlm.lm_head(final), None
        return early_exit_logits(vlm, [h[:, -1] for h in out.hidden_states], early, self.n, final=final, mean=mean)

    @torch.inference_mode()
    def score(self, vlm, tokens: torch.Tensor) -> torch.Tensor:
        """Feed k tokens per row [rows, k] in one forward, as `step` does, and return the logits after each of them
        [rows, k, vocab]: teacher-forced continuations of the prompts (the cache is prefilled once for all)."""
        return vlm.lm_head(self._feed(vlm, tokens).last_hidden_state)

    def _feed(self, vlm, tokens: torch.Tensor, hidden_states: bool = False):
        """One forward of `tokens` [rows, k] after the rows' columns so far, kept in the cache."""
        k = tokens.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], k)], 1)
        set_columns(self.image_columns[:, :self.mask.shape[1]], self.mask)
        positions = self.next_position[..., None] + torch.arange(k, device=tokens.device)
        out = vlm.text_model(input_ids=tokens, attention_mask=self.mask, position_ids=positions, use_cache=True,
                             output_hidden_states=hidden_states, **{cache_argument(vlm.text_model): self.cache})
        self.next_position = self.next_position + k
        return out

    @torch.inference_mode()
    def peek(self, vlm, tokens: torch.Tensor) -> None:
        """Run one token per row [rows], or k alternatives per row [rows, k], through the model without keeping
        them (the rows are left as they were): what an attention observer sees is the attention each token would
        get if it were picked. Alternatives run in one forward at the same position, each attending to the cache
        and to itself only (a 4-D mask), so the observer sees k queries over the cache and the k new columns."""
        tokens = tokens if tokens.dim() == 2 else tokens[:, None]
        rows, k = tokens.shape
        width = self.mask.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(rows, k)], 1)
        image = self.image_columns[:, :width + k]  # decoded columns never hold image tokens
        set_columns(torch.cat([image, image.new_zeros(rows, width + k - image.shape[1])], 1), mask)
        if k > 1:
            own = torch.eye(k, dtype=torch.bool, device=tokens.device).expand(rows, k, k)
            mask = torch.cat([self.mask.bool()[:, None].expand(rows, k, width), own], 2)[:, None]
        cache = _cache([_Lookahead(layer) for layer in self.cache.layers])
        vlm.text_model(input_ids=tokens, attention_mask=mask, position_ids=self.next_position[..., None].expand(
            *self.next_position.shape, k), use_cache=True, **{cache_argument(vlm.text_model): cache})

    @torch.inference_mode()
    def rewind(self, vlm, tokens: torch.Tensor,
               early: Sequence[int] = (), mean: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drop every decoded column and feed `tokens` [rows, k] after the prompts in one forward (as `step`): a
        search that goes back rebuilds its beams' caches from their tokens. Each row keeps its prompt, so rows
        reordered since the prefill must still be copies of their own real row's."""
        self.cache = _cache([BufferedLayer(*layer.buffers, self.width) for layer in self.cache.layers])
        self.mask, self.next_position = self.mask[:, :self.width], self.prompt_position
        return self.step(vlm, tokens, early=early, mean=mean)
