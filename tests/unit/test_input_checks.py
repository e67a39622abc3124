"""Checks of the Python API's arguments: `HeadIntervention`'s heads, mode, alpha and positions; `load_vlm`'s
device (refused before any weights load); prompts longer than the model's positions in `VLM.encode`; and the
warning for a transformers release outside the tested range."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from halluscope.errors import InputError, ModelLoadError
from halluscope.interventions.heads import MODES, POSITIONS, HeadIntervention
from halluscope.models import load
from halluscope.models.load import load_vlm


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- HeadIntervention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("heads, shown", [
    ({(0, -1)}, "(0, -1)"), ({(-2, 3)}, "(-2, 3)"), ({(True, 1)}, "(True, 1)"), ({(0, False)}, "(0, False)"),
    ({(0.0, 1)}, "(0.0, 1)"), ({("0", 1)}, "('0', 1)"), ({(0, 1, 2)}, "(0, 1, 2)"), ([[0]], "[0]"),
    ((0, 3), "bad head 0"), ("L0H3", "parse_heads('L0H3')"), (7, "7 is not a collection"), ({None}, "None"),
])
def test_intervention_rejects_bad_heads(heads, shown):
    with pytest.raises(InputError) as excinfo:
        HeadIntervention(heads)
    message = _one_line(excinfo)
    assert shown in message and "(layer, head) pairs of non-negative integers" in message


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), "0.5", None, True, [0.5],
                                   torch.tensor([0.0, 1.0])])
def test_intervention_rejects_a_non_finite_or_non_numeric_alpha(alpha):
    with pytest.raises(InputError, match=r"^alpha .* (is not|finite)") as excinfo:
        HeadIntervention({(0, 1)}, alpha=alpha)
    _one_line(excinfo)


@pytest.mark.parametrize("kwargs, valid", [(dict(mode="Zero"), MODES), (dict(mode=None), MODES),
                                           (dict(mode=["zero"]), MODES), (dict(positions="decode"), POSITIONS),
                                           (dict(positions=1), POSITIONS)])
def test_intervention_errors_name_the_value_and_the_choices(kwargs, valid):
    with pytest.raises(InputError) as excinfo:
        HeadIntervention({(0, 1)}, **kwargs)
    message = _one_line(excinfo)
    assert repr(next(iter(kwargs.values()))) in message and ", ".join(valid) in message


def test_intervention_accepts_integer_like_heads_and_real_alphas():
    iv = HeadIntervention([(np.int64(1), 2), [0, torch.tensor(3)]], alpha=np.float32(0.5))
    assert iv.heads == {(1, 2), (0, 3)} and all(type(v) is int for pair in iv.heads for v in pair)
    assert iv.alpha == 0.5 and type(iv.alpha) is float
    assert HeadIntervention(frozenset(), mode="scale", alpha=-1).alpha == -1.0  # a sign flip is a valid edit


# ---- load_vlm(device=...) -------------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if load_vlm gets as far as reading a config or weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_vlm read the checkpoint before checking the device")

    monkeypatch.setattr(load.AutoConfig, "from_pretrained", refuse)


@pytest.mark.parametrize("device, message", [
    ("cuda", "sees no CUDA GPU"), ("cuda:3", "sees no CUDA GPU"), ("mps", "no Apple MPS"),
    ("garbage", "unknown device 'garbage'"), ("cuda:-1", "unknown device"), ("", "unknown device"),
])
def test_load_vlm_refuses_a_missing_device_before_loading(monkeypatch, no_loading, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match=message) as excinfo:
        load_vlm("organism", device=device)
    assert "'cpu'" in _one_line(excinfo)  # the fix: a device this machine has


def test_load_vlm_refuses_a_gpu_index_beyond_the_machine(monkeypatch, no_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModelLoadError, match=r"'cuda:3' does not exist: this machine has 2 CUDA devices "
                                             r"\(cuda:0, cuda:1\)") as excinfo:
        load_vlm("organism", device="cuda:3")
    _one_line(excinfo)
    assert load.check_device("cuda:1") == torch.device("cuda", 1) and load.check_device("cuda").type == "cuda"


def test_check_device_accepts_cpu():
    assert load.check_device("cpu") == torch.device("cpu") and load.check_device(torch.device("cpu")).type == "cpu"


# ---- the tested transformers range -----------------------------------------------------------------------
@pytest.fixture
def transformers_version(monkeypatch):
    """Set the installed transformers version as load_vlm sees it; each test starts with no warning given."""
    monkeypatch.setattr(load, "_warned_transformers", set())

    def set_version(version: str) -> None:
        monkeypatch.setattr(sys.modules["transformers"], "__version__", version)

    return set_version


@pytest.mark.parametrize("version", ["5.22.3", "5.25.0", "5.25.0.dev0", "6.0.0", "4.57.1", "not-a-version"])
def test_an_untested_transformers_warns_once(transformers_version, version):
    transformers_version(version)
    with pytest.warns(UserWarning) as record:
        assert load.warn_if_untested_transformers() is True
        assert load.warn_if_untested_transformers() is True  # the second call stays silent
    assert len(record) == 1
    message = str(record[0].message)
    assert f"transformers {version} is installed" in message and load.TESTED_TRANSFORMERS in message
    assert "pip install -c constraints.txt" in message and "bash scripts/setup.sh" in message


@pytest.mark.parametrize("version", ["5.23.0", "5.23.4", "5.24.0", "5.24.1"])
def test_a_tested_transformers_is_silent(transformers_version, version):
    transformers_version(version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load.warn_if_untested_transformers() is False


def test_load_vlm_warns_about_an_untested_transformers(transformers_version, tiny_dirs):
    transformers_version("5.99.0")
    with pytest.warns(UserWarning, match=r"transformers 5\.99\.0 is installed"):
        load_vlm(tiny_dirs["qwen2_vl"])


# ---- VLM.encode: prompts longer than the model's positions ------------------------------------------------
def _image() -> Image.Image:
    return Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.mark.parametrize("family", ["qwen2_vl"])
def test_encode_refuses_a_prompt_longer_than_the_models_positions(vlm):
    limit = vlm.text_config.max_position_embeddings
    prompt = "How many circles are there? " + "apple " * (limit + 10)
    with pytest.raises(InputError, match=rf"pair 1 encodes to \d+ tokens .* this model's {limit} positions") as ex:
        vlm.encode([(_image(), "How many circles?"), (_image(), prompt)])
    assert int(_one_line(ex).split(" encodes to ")[1].split()[0]) > limit


def test_encode_checks_the_limit_of_every_family(vlm, monkeypatch):
    batch = vlm.encode([(_image(), "How many circles?")])
    length = int(batch.attention_mask.sum())
    monkeypatch.setattr(vlm.text_config, "max_position_embeddings", length)
    assert vlm.encode([(_image(), "How many circles?")]).seq_len == length  # exactly at the limit: accepted
    monkeypatch.setattr(vlm.text_config, "max_position_embeddings", length - 1)
    with pytest.raises(InputError, match=rf"pair 0 encodes to {length} tokens .* {length - 1} positions"):
        vlm.encode([(_image(), "How many circles?")])
