"""Shared fixtures: tiny checkpoints of every family, built once per test session and loaded through
`load_vlm` (the path a real checkpoint takes)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))

from halluscope.models import load_vlm  # noqa: E402
from halluscope.models.tiny import TINY_FAMILIES, build_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of its tiny saved checkpoint."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


_LOADED: dict[str, object] = {}


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def vlm(tiny_dirs, family):
    """The tiny VLM of `family`, loaded once per session."""
    if family not in _LOADED:
        _LOADED[family] = load_vlm(tiny_dirs[family])
    return _LOADED[family]


@pytest.fixture(scope="session")
def split_dirs(tmp_path_factory):
    """family -> directory of a tiny checkpoint whose tokenizer spells number and colour words in 2-4 tokens."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-split"), split_answer_words=True)


@pytest.fixture
def split_vlm(split_dirs, family):
    """The tiny VLM of `family` with answer words split into pieces, loaded once per session."""
    key = f"{family}-split"
    if key not in _LOADED:
        _LOADED[key] = load_vlm(split_dirs[family])
    return _LOADED[key]
