"""Head interventions at the o_proj input: every mode against a naive hook written here, per-row batching,
prefill vs cached decode, hook cleanup, and one-line errors. Family-specific tests (the hook site, GQA) run on
every tiny family; the rest on qwen2_vl. The cleanup test runs 1000 interventions with forwards and checks hook
dicts, live tensors and RSS."""

from __future__ import annotations

import gc
import os
import sys
from contextlib import contextmanager

import pytest
import torch
from PIL import Image, ImageDraw

from halluscope.errors import InputError
from halluscope.interventions.heads import (
    HeadIntervention,
    compute_head_means,
    format_heads,
    intervene,
    parse_heads,
)

ONE = ["qwen2_vl"]


def _image(color=(200, 30, 30), size=(224, 224)) -> Image.Image:
    img = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 40, 120, 120), fill=color)
    draw.rectangle((130, 130, 200, 190), fill=(30, 30, 200))
    return img


def _batch(vlm, n=1):
    return vlm.encode([(_image(), "How many circles are in this image?")] * n)


def _padded(vlm):
    """Two rows of different lengths, so the first is left-padded."""
    batch = vlm.encode([(_image(), "How many circles?"),
                        (_image((30, 200, 30)), "Describe the red circle and the blue square in this image.")])
    assert not bool(batch.attention_mask.all())
    return batch


@torch.inference_mode()
def _logits(vlm, batch):
    return vlm.forward(batch).logits


@contextmanager
def _pre_hook(module, fn):
    handle = module.register_forward_pre_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _capture(vlm, layer, store):
    """A pre-hook that records the o_proj input it sees (run it after ours to see the edited input)."""
    def hook(module, args):
        store.append(args[0].detach().clone())
    return _pre_hook(vlm.o_proj(layer), hook)


def _slice(vlm, head):
    return slice(head * vlm.head_dim, (head + 1) * vlm.head_dim)


def _no_hooks_left(vlm):
    return all(len(vlm.o_proj(l)._forward_pre_hooks) == 0 for l in range(vlm.n_layers))


# ---- the hook site, on every family ------------------------------------------------------------------------
def test_zero_ablation_equals_a_naive_o_proj_pre_hook(vlm):
    batch = _batch(vlm)
    base = _logits(vlm, batch)
    for layer, head in [(0, 1), (vlm.n_layers - 1, vlm.n_heads - 1)]:
        sl = _slice(vlm, head)

        def naive(module, args):
            x = args[0].clone()
            x[..., sl] = 0
            return (x,)

        with _pre_hook(vlm.o_proj(layer), naive):
            want = _logits(vlm, batch)
        with intervene(vlm, HeadIntervention({(layer, head)}, mode="zero")):
            got = _logits(vlm, batch)
        assert not torch.equal(want, base), "the naive ablation must change the logits (hook site is live)"
        assert torch.equal(got, want)
    assert _no_hooks_left(vlm)


def test_all_heads_of_a_layer_equals_zeroing_o_proj_output(vlm):
    batch = _batch(vlm)
    layer = 0
    assert vlm.o_proj(layer).bias is None
    handle = vlm.o_proj(layer).register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        want = _logits(vlm, batch)
    finally:
        handle.remove()
    with intervene(vlm, HeadIntervention({(layer, h) for h in range(vlm.n_heads)})):
        got = _logits(vlm, batch)
    assert torch.equal(got, want)


def test_gqa_edit_is_per_query_head_not_per_kv_head(vlm):
    assert vlm.n_kv_heads < vlm.n_heads  # heads 0 and 1 share KV head 0
    batch = _batch(vlm)
    with intervene(vlm, HeadIntervention({(0, 0)})):
        zero0 = _logits(vlm, batch)
    with intervene(vlm, HeadIntervention({(0, 1)})):
        zero1 = _logits(vlm, batch)
    assert not torch.equal(zero0, zero1)
    seen = []
    with intervene(vlm, HeadIntervention({(0, 0)})), _capture(vlm, 0, seen):
        _logits(vlm, batch)
    x = seen[0]
    assert bool((x[..., _slice(vlm, 0)] == 0).all())
    assert not bool((x[..., _slice(vlm, 1)] == 0).all())  # the sibling query head on the same KV head survives


# ---- batching ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ONE)
def test_per_row_interventions_match_running_each_alone(vlm):
    rows = [HeadIntervention({(0, 0), (1, 2)}, mode="zero"), HeadIntervention({(1, 3)}, mode="zero", alpha=0.5),
            HeadIntervention(frozenset(), mode="zero")]
    batch3 = _batch(vlm, 3)
    with intervene(vlm, rows):
        got = _logits(vlm, batch3)
    batch1 = _batch(vlm, 1)
    alone = []
    for iv in rows:
        with intervene(vlm, iv):
            alone.append(_logits(vlm, batch1)[0])
    for r in range(3):
        torch.testing.assert_close(got[r], alone[r], atol=1e-5, rtol=0)
    assert not torch.allclose(alone[0], alone[2], atol=1e-3)  # the rows really differ
    assert not torch.allclose(alone[1], alone[2], atol=1e-3)


# ---- prefill vs cached decode ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ONE)
@pytest.mark.parametrize("positions, on_prefill, on_decode",
                         [("all", True, True), ("prompt", True, False), ("generated", False, True)])
def test_positions_choose_prefill_and_decode_calls(vlm, positions, on_prefill, on_decode):
    batch = _batch(vlm)
    sl = _slice(vlm, 2)
    seen = []
    with intervene(vlm, HeadIntervention({(1, 2)}, positions=positions)), _capture(vlm, 1, seen):
        ids = vlm.generate_ids(batch, max_new_tokens=4)
    assert ids.shape[1] == 4, "the run must reach decode steps"
    prefill = [x for x in seen if x.shape[1] > 1]
    decode = [x for x in seen if x.shape[1] == 1]
    assert len(prefill) == 1 and len(decode) == 3
    assert [bool((x[..., sl] == 0).all()) for x in prefill] == [on_prefill]
    assert [bool((x[..., sl] == 0).all()) for x in decode] == [on_decode] * 3


@pytest.mark.parametrize("family", ONE)
def test_reference_mean_equals_naive_row_mean_on_prefill_and_is_a_no_op_on_decode(vlm):
    batch = _padded(vlm)
    mask = batch.attention_mask.bool()
    layer, head = 1, 3
    sl = _slice(vlm, head)

    def naive(module, args):
        x = args[0]
        if x.shape[1] == 1:
            return None
        x = x.clone()
        for row in range(x.shape[0]):
            # float sums depend on order: reduce over the [seq, heads, head_dim] layout, as one row of the batch
            real = mask[row].to(x.dtype)
            mean = (x[row].view(-1, vlm.n_heads, vlm.head_dim) * real[:, None, None]).sum(0) / real.sum()
            x[row, mask[row], sl] = mean[head]
        return (x,)

    seen = []
    with _pre_hook(vlm.o_proj(layer), naive):
        want = _logits(vlm, batch)
    iv = HeadIntervention({(layer, head)}, mode="reference-mean")
    with intervene(vlm, iv, row_mask=batch.attention_mask), _capture(vlm, layer, seen):
        got = _logits(vlm, batch)
    assert torch.equal(got, want)
    # ... and the value is the row's mean over its real positions only (order-free check in float64)
    base = []
    with _capture(vlm, layer, base):
        _logits(vlm, batch)
    for row in range(2):
        real = mask[row]
        torch.testing.assert_close(seen[0][row, real, sl],
                                   base[0][row, real, sl].double().mean(0).float().expand(int(real.sum()), -1),
                                   atol=1e-7, rtol=1e-6)

    # decode steps: the o_proj input our hook passes on equals the one it received
    before, after = [], []
    handle = vlm.o_proj(layer).register_forward_pre_hook(lambda m, a: before.append(a[0].clone()))
    try:
        with intervene(vlm, iv, row_mask=batch.attention_mask), _capture(vlm, layer, after):
            vlm.generate_ids(batch, max_new_tokens=3)
    finally:
        handle.remove()
    steps = [(b, a) for b, a in zip(before, after) if b.shape[1] == 1]
    assert len(steps) == 2
    assert all(torch.equal(b, a) for b, a in steps)
    assert not torch.equal(before[0], after[0])  # ... while prefill was edited


@pytest.mark.parametrize("family", ONE)
def test_reference_mean_on_generated_positions_edits_nothing(vlm):
    """reference-mean only acts on prefill and "generated" excludes prefill: nothing is edited."""
    batch = _padded(vlm)
    base = _logits(vlm, batch)
    iv = HeadIntervention({(0, 0), (1, 3)}, mode="reference-mean", positions="generated")
    with intervene(vlm, iv, row_mask=batch.attention_mask):
        assert torch.equal(_logits(vlm, batch), base)


# ---- mean / scale -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ONE)
def test_compute_head_means_equals_naive_mean_over_non_pad_positions(vlm):
    batches = [_padded(vlm), _batch(vlm)]
    seen = {l: [] for l in range(vlm.n_layers)}
    handles = [vlm.o_proj(l).register_forward_pre_hook(lambda m, a, l=l: seen[l].append(a[0].clone()))
               for l in range(vlm.n_layers)]
    try:
        for b in batches:
            _logits(vlm, b)
    finally:
        for h in handles:
            h.remove()
    want = torch.stack([
        torch.cat([x[b.attention_mask.bool()] for x, b in zip(seen[l], batches)]).double().mean(0)
        for l in range(vlm.n_layers)
    ]).view(vlm.n_layers, vlm.n_heads, vlm.head_dim).float()
    got = compute_head_means(vlm, batches)
    assert got.shape == (vlm.n_layers, vlm.n_heads, vlm.head_dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert _no_hooks_left(vlm)


@pytest.mark.parametrize("family", ONE)
def test_mean_mode_alpha_zero_replaces_the_head_by_its_mean_everywhere(vlm):
    means = compute_head_means(vlm, [_padded(vlm)])
    batch = _batch(vlm)
    layer, head = 0, 2
    sl = _slice(vlm, head)
    base = []
    with _capture(vlm, layer, base):
        _logits(vlm, batch)
    seen = []
    with intervene(vlm, HeadIntervention({(layer, head)}, mode="mean"), means=means), _capture(vlm, layer, seen):
        _logits(vlm, batch)
    x = seen[0]
    assert torch.equal(x[..., sl], means[layer, head].expand_as(x[..., sl]))
    keep = torch.ones(x.shape[-1], dtype=torch.bool)
    keep[sl] = False
    assert torch.equal(x[..., keep], base[0][..., keep])


@pytest.mark.parametrize("family", ONE)
def test_scale_halves_the_slice_and_alpha_one_is_bit_identical(vlm):
    batch = _batch(vlm)
    layer, head = 0, 1
    sl = _slice(vlm, head)
    base = []
    with _capture(vlm, layer, base):
        base_logits = _logits(vlm, batch)
    seen = []
    with intervene(vlm, HeadIntervention({(layer, head)}, mode="scale", alpha=0.5)), _capture(vlm, layer, seen):
        _logits(vlm, batch)
    want = base[0].clone()
    want[..., sl] *= 0.5
    assert torch.equal(seen[0], want)
    with intervene(vlm, HeadIntervention({(0, 1), (1, 3)}, mode="scale", alpha=1.0)):
        assert torch.equal(_logits(vlm, batch), base_logits)


# ---- cleanup ------------------------------------------------------------------------------------------------
def _hook_counts(vlm) -> dict[str, tuple[int, int]]:
    """Per module of the whole model: how many forward pre-hooks and forward hooks it holds."""
    return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in vlm.model.named_modules()}


def _live_tensors() -> int:
    """Python-visible torch tensors (parameters included), after a full collection. type() rather than isinstance:
    isinstance also consults `__class__`, which on torch.distributed.reduce_op raises a FutureWarning."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _rss_bytes() -> int:
    """The process's current resident set size (peak RSS where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: ru_maxrss is the peak, in KiB on Linux/BSD and bytes on macOS
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


@pytest.mark.parametrize("family", ONE)
def test_hooks_are_removed_on_error_and_memory_does_not_grow_over_1000_interventions(vlm):
    hooks = _hook_counts(vlm)
    batch = _batch(vlm)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(vlm, HeadIntervention({(0, 0)})):
            _logits(vlm, batch)
            raise RuntimeError("boom")
    assert _no_hooks_left(vlm) and _hook_counts(vlm) == hooks

    # 1000 intervention enter/exit cycles with a forward pass in every 10th (100 forwards): a forward on the
    # tiny model takes ~10 ms, so a forward in every cycle would take ~10 s (more on a loaded machine).
    tiny = vlm.encode([(_image(size=(56, 56)), "How many?")])
    iv = HeadIntervention({(0, 1), (1, 2)}, mode="scale", alpha=0.5)  # a hook left behind would scale twice
    base = _logits(vlm, tiny)
    with intervene(vlm, iv):
        inside = _hook_counts(vlm)
        want = _logits(vlm, tiny)
    assert not torch.equal(want, base)
    # the hook counts see our hooks: one pre-hook more on every o_proj, nothing else
    o_proj = {id(vlm.o_proj(l)) for l in range(vlm.n_layers)}
    changed = {name for name, m in vlm.model.named_modules() if inside[name] != hooks[name]}
    assert {id(vlm.model.get_submodule(n)) for n in changed} == o_proj
    assert all(inside[n] == (hooks[n][0] + 1, hooks[n][1]) for n in changed)

    def cycles(n: int) -> None:
        for i in range(n):
            with intervene(vlm, iv):
                if i % 10 == 0:
                    assert torch.equal(_logits(vlm, tiny), want)

    cycles(100)  # warm-up: lazily built caches, allocator pools
    tensors, rss = _live_tensors(), _rss_bytes()
    cycles(1000)
    tensors_end, rss_end = _live_tensors(), _rss_bytes()
    assert _hook_counts(vlm) == hooks
    assert torch.equal(_logits(vlm, tiny), base)  # nothing of the interventions is left in the forward
    assert tensors_end <= tensors, f"{tensors_end - tensors} torch tensors more after 1000 interventions"
    # one forward's logits alone are ~0.14 MiB ([1, 54, 699] float32), so keeping them from every 10th cycle would
    # add ~14 MiB; a clean run grows by ~0.1 MiB, and the bound leaves room for allocator noise only
    assert rss_end - rss < 8 * 2**20, f"RSS grew by {(rss_end - rss) / 2**20:.1f} MiB over 1000 interventions"
    # control: the tensor count does see tensors that outlive a forward
    kept = [_logits(vlm, tiny) for _ in range(10)]
    assert _live_tensors() >= tensors_end + len(kept)


# ---- errors -------------------------------------------------------------------------------------------------
def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("text, match", [("L0X3", "malformed head 'L0X3'"), ("", "no heads"),
                                         ("L0H3,,H2", "malformed head 'H2'"), (" , ", "no heads")])
def test_parse_heads_rejects_malformed_lists(text, match):
    with pytest.raises(InputError, match=match) as excinfo:
        parse_heads(text)
    _one_line(excinfo)


def test_parse_and_format_heads_round_trip():
    assert parse_heads("L11H15, l0h3") == {(11, 15), (0, 3)}
    assert format_heads(parse_heads("L11H15,L0H3")) == "L0H3,L11H15"  # numeric, not string, order
    assert format_heads(parse_heads("L11H15,L2H1,L2H0")) == "L2H0,L2H1,L11H15"


@pytest.mark.parametrize("kwargs, match", [(dict(mode="knockout"), "unknown intervention mode 'knockout'"),
                                           (dict(positions="decode"), "unknown positions 'decode'")])
def test_intervention_rejects_unknown_mode_and_positions(kwargs, match):
    with pytest.raises(InputError, match=match) as excinfo:
        HeadIntervention({(0, 0)}, **kwargs)
    _one_line(excinfo)


@pytest.mark.parametrize("family", ONE)
@pytest.mark.parametrize("call, match", [
    (lambda vlm: intervene(vlm, HeadIntervention({(99, 0)})), r"heads L99H0 are out of range"),
    (lambda vlm: intervene(vlm, HeadIntervention({(0, 4)})), r"heads L0H4 are out of range"),
    (lambda vlm: intervene(vlm, HeadIntervention({(0, 0)}, mode="mean")), "mode 'mean' needs per-head means"),
    (lambda vlm: intervene(vlm, HeadIntervention({(0, 0)}, mode="reference-mean")), "needs the batch's attention"),
    (lambda vlm: intervene(vlm, [HeadIntervention({(0, 0)}), HeadIntervention({(0, 1)}, mode="scale")]),
     "rows mix modes/positions"),
    (lambda vlm: intervene(vlm, [HeadIntervention({(0, 0)}), HeadIntervention({(0, 1)}, positions="prompt")]),
     "rows mix modes/positions"),
    (lambda vlm: intervene(vlm, []), "got no interventions"),
])
def test_intervene_errors(vlm, call, match):
    with pytest.raises(InputError, match=match) as excinfo:
        with call(vlm):
            pass
    _one_line(excinfo)
    assert _no_hooks_left(vlm)


@pytest.mark.parametrize("family", ONE)
def test_compute_head_means_rejects_no_batches(vlm):
    with pytest.raises(InputError, match="got no positions") as excinfo:
        compute_head_means(vlm, [])
    _one_line(excinfo)
    assert _no_hooks_left(vlm)
