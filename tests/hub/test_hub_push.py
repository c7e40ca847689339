"""The real round trip through a Hub: `modsquad push` uploads a run with huggingface_hub to a local Hub-compatible
server (tests/hub_server.py), then the Auto classes, pipelines and ModelCard load the models back by repo id.

huggingface_hub reads HF_ENDPOINT / HF_TOKEN when it is imported, so both sides run in fresh interpreters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from modsquad import ModSquadForImageClassification, ModSquadForSemanticSegmentation
from modsquad.pruning.run import prune_run

pytestmark = pytest.mark.slow  # round trips through the local Hub server

REPO = "org/modsquad-tiny"
SUBPROCESS_TIMEOUT_S = 300


def _run_python(script: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"


def _hub_env(url: str, token: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_ENDPOINT": url,
        "HF_TOKEN": token,
        "HF_HUB_OFFLINE": "0",  # conftest sets 1 for the other tests
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def test_push_run_then_load_every_model_back_by_repo_id(
    tmp_path, hub, hub_token, small_tasks, make_run_folder, pixel_loader
):
    run = tmp_path / "run"
    make_run_folder(run, [small_tasks["cls"], small_tasks["seg"]])
    loaders = {
        "cls": pixel_loader(20, batches=1, batch_size=2),
        "seg": pixel_loader(21, batches=1, batch_size=2),
    }
    prune_run(run, loaders)
    pixels = loaders["cls"][0]["pixel_values"]
    with torch.no_grad():
        cls_logits = ModSquadForImageClassification.from_pretrained(run / "tasks" / "cls")(pixels).logits
        seg_logits = ModSquadForSemanticSegmentation.from_pretrained(run / "tasks" / "seg")(pixels).logits
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    np.save(tmp_path / "cls.npy", cls_logits.numpy())
    np.save(tmp_path / "seg.npy", seg_logits.numpy())

    # One interpreter pushes with the CLI, then loads everything back by repo id into an empty cache.
    _run_python(
        f"""
        import numpy as np
        import torch
        from huggingface_hub import ModelCard
        from PIL import Image
        from transformers import (
            AutoImageProcessor, AutoModelForImageClassification, AutoModelForSemanticSegmentation, pipeline,
        )
        import modsquad
        from modsquad.cli import main

        assert main(["push", {str(run)!r}, "--repo-id", "{REPO}"]) == 0
        # a plain save_pretrained folder is a run of its own
        assert main(["push", {str(run / "tasks" / "cls")!r}, "--repo-id", "org/solo-cls"]) == 0

        work = {str(tmp_path)!r}
        pixels = torch.from_numpy(np.load(work + "/pixels.npy"))
        cls = AutoModelForImageClassification.from_pretrained("{REPO}-cls").eval()
        seg = AutoModelForSemanticSegmentation.from_pretrained("{REPO}-seg").eval()
        assert type(cls) is modsquad.ModSquadForImageClassification and cls.config.task_names == ["cls"]
        assert type(seg) is modsquad.ModSquadForSemanticSegmentation and seg.config.pruned_experts
        assert cls.name_or_path == "{REPO}-cls", cls.name_or_path
        with torch.no_grad():
            np.testing.assert_allclose(cls(pixels).logits.numpy(), np.load(work + "/cls.npy"), atol=1e-6)
            np.testing.assert_allclose(seg(pixels).logits.numpy(), np.load(work + "/seg.npy"), atol=1e-6)
        # the multi-task repo serves any of its tasks too
        assert AutoModelForImageClassification.from_pretrained("{REPO}", task="cls").config.num_tasks == 2
        assert type(AutoImageProcessor.from_pretrained("{REPO}-cls")) is modsquad.ModSquadImageProcessor

        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        predictions = pipeline("image-classification", model="{REPO}-cls")(image)
        assert {{p["label"] for p in predictions}} == {{"circle", "square", "triangle"}}

        for repo, tag in (("{REPO}", "image-classification"), ("{REPO}-seg", "image-segmentation")):
            card = ModelCard.load(repo)
            assert card.data.pipeline_tag == tag and card.data.library_name == "transformers", card.data
            card.validate()  # POST /api/validate-yaml
        bad = ModelCard(str(ModelCard.load("{REPO}-cls")).replace("license: apache-2.0", "license: my-own"))
        try:
            bad.validate()
        except ValueError as error:
            assert "license" in str(error)
        else:
            raise AssertionError("an unknown license passed validation")
        """,
        _hub_env(hub.url, hub_token, tmp_path),
    )
    repos = hub.state.repos
    assert set(repos) == {REPO, f"{REPO}-cls", f"{REPO}-seg", "org/solo-cls"}
    for repo in repos.values():
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(
            repo.files
        )
        assert "expert_usage.png" in repo.files and not any(p.startswith("tasks/") for p in repo.files)
    assert f"base_model: {REPO}" in repos[f"{REPO}-cls"].files["README.md"].decode()
    # upload_folder sent every README through the metadata validation before committing
    assert sum(r == "POST /api/validate-yaml" for r in hub.state.requests) >= len(repos)
