"""The model fingerprint changes with the weights and the computation-defining config, and with nothing else:
not the transformers version, the load path (relative or absolute) or where the checkpoint lives. Runs made
with the earlier fingerprint still open."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from halluscope.errors import RunError
from halluscope.models import load_vlm
from halluscope.models.fingerprint import SCHEME, fingerprint, legacy_fingerprint
from halluscope.runs import Run


@pytest.fixture
def checkpoint(tiny_dirs):
    return tiny_dirs["qwen2_vl"]


def test_independent_of_path_location_and_transformers_version(checkpoint, tmp_path, monkeypatch):
    reference = load_vlm(checkpoint).fingerprint()
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(checkpoint, moved)
    config = json.loads((moved / "config.json").read_text())
    config["transformers_version"] = "5.23.0"  # written by another release
    (moved / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    relative = load_vlm(os.path.join("elsewhere", "model"))
    assert relative.model.config._name_or_path != str(checkpoint)
    assert relative.fingerprint() == reference


def test_changes_with_weights_and_computation_fields(checkpoint):
    vlm = load_vlm(checkpoint)
    before = fingerprint(vlm.model)
    text = getattr(vlm.model.config, vlm.family.text_config_field)
    eps = text.rms_norm_eps
    text.rms_norm_eps = eps * 10
    assert fingerprint(vlm.model) != before
    text.rms_norm_eps = eps
    assert fingerprint(vlm.model) == before
    with torch.no_grad():
        vlm.lm_head.weight[0, 0] += 1.0
    assert fingerprint(vlm.model) != before


def _legacy_run(checkpoint, tmp_path, vlm, transformers_version: str, fingerprint_value: str | None = None):
    """An eval run whose manifest looks as halluscope 0.1 wrote it under `transformers_version`."""
    from halluscope.steps import eval_step

    run, _ = eval_step(tmp_path / "run", model=str(checkpoint), n=2, offsets=(2,), max_new_tokens=6, vlm=vlm)
    path = run.path / "manifest.json"
    manifest = json.loads(path.read_text())
    model = manifest["model"]
    del model["fingerprint_scheme"]
    model["fingerprint"] = fingerprint_value or legacy_fingerprint(
        vlm.model, transformers_version=transformers_version, name_or_path=str(checkpoint))
    manifest["environment"]["packages"]["transformers"] = transformers_version
    path.write_text(json.dumps(manifest))
    return Run.open(run.path)


def test_a_run_made_with_the_legacy_fingerprint_opens(checkpoint, tmp_path):
    from halluscope.steps import run_model

    vlm = load_vlm(checkpoint)
    run = _legacy_run(checkpoint, tmp_path, vlm, "5.23.0")
    assert run_model(run, vlm) is vlm
    assert json.loads((run.path / "manifest.json").read_text())["model"].get("fingerprint_scheme") != SCHEME


def test_a_legacy_run_of_other_weights_is_refused(checkpoint, tmp_path):
    from halluscope.steps import run_model

    vlm = load_vlm(checkpoint)
    run = _legacy_run(checkpoint, tmp_path, vlm, "5.23.0", fingerprint_value="0123456789abcdef")
    with pytest.raises(RunError, match="changed since"):
        run_model(run, vlm)


def test_a_legacy_eval_run_resumes(checkpoint, tmp_path):
    from halluscope.steps import eval_step

    vlm = load_vlm(checkpoint)
    run = _legacy_run(checkpoint, tmp_path, vlm, "5.23.0")
    again, _ = eval_step(run.path, model=str(checkpoint), n=2, offsets=(2,), max_new_tokens=6, vlm=vlm)
    assert again.manifest["model"]["fingerprint"] == run.manifest["model"]["fingerprint"]
