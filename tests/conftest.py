"""Shared fixtures: tiny checkpoints of every family, built once per test session and loaded through
`load_vlm` (the path a real checkpoint takes)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(min(2, torch.get_num_threads()))

from halluscope.models import load_vlm  # noqa: E402
from halluscope.models.fingerprint import fingerprint  # noqa: E402
from halluscope.models.tiny import TINY_FAMILIES, build_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of its tiny saved checkpoint."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


_LOADED: dict[str, object] = {}


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


def _shared(key: str, directory):
    """The session's loaded VLM under `key`, and after the test a check that the test left it as loaded: a test
    that trains, edits or wraps a model must load its own copy, or every later test of the family runs on the
    changed one."""
    if key not in _LOADED:
        _LOADED[key] = load_vlm(directory)
        _LOADED[key].fingerprint()
    shared = _LOADED[key]
    yield shared
    if fingerprint(shared.model) != shared.fingerprint() or shared.model.training:
        del _LOADED[key]
        pytest.fail(f"this test changed the session's shared {key} model (weights, modules or train mode); load "
                    f"a copy of its own with load_vlm(tiny_dirs[family])")


@pytest.fixture
def vlm(tiny_dirs, family):
    """The tiny VLM of `family`, loaded once per session."""
    yield from _shared(family, tiny_dirs[family])


@pytest.fixture(scope="session")
def split_dirs(tmp_path_factory):
    """family -> directory of a tiny checkpoint whose tokenizer spells number and colour words in 2-4 tokens."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-split"), split_answer_words=True)


@pytest.fixture
def split_vlm(split_dirs, family):
    """The tiny VLM of `family` with answer words split into pieces, loaded once per session."""
    yield from _shared(f"{family}-split", split_dirs[family])
