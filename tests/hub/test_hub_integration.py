"""Transformers integration: Auto classes, safetensors checkpoints, remote code without the package, loading by
repo id from a local Hub cache, and the image-classification pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

from modsquad import (
    ModSquadConfig,
    ModSquadForImageClassification,
    ModSquadImageProcessor,
    ModSquadModel,
)
from modsquad.model.moe import ModSquadTaskRouter

MULTI_LABEL = {
    "name": "tags",
    "type": "image-classification",
    "labels": ["red", "round", "small", "striped"],
    "problem_type": "multi_label_classification",
}
SUBPROCESS_TIMEOUT_S = 180


def _trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero routers and a non-trivial classifier, so that a wrongly loaded weight changes the outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModSquadTaskRouter):
                module.weight.normal_(0.0, 0.5, generator=generator)
        for name, param in model.named_parameters():
            if name.startswith("heads."):
                param.normal_(0.0, 0.5, generator=generator)
    return model.eval()


def _save_classifier(folder: Path, config: ModSquadConfig) -> ModSquadForImageClassification:
    model = _trained_looking(ModSquadForImageClassification(config))
    model.save_pretrained(folder)
    ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


def _test_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory, tiny_config) -> tuple[Path, ModSquadForImageClassification]:
    folder = tmp_path_factory.mktemp("classifier")
    return folder, _save_classifier(folder, tiny_config())


def _run_python(script: str, env: dict[str, str]) -> None:
    """Runs `script` in a fresh interpreter; a failed assertion there fails the test with its output."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"


# ----------------------------------------------------------------------------------------------- Auto classes
def test_auto_classes_resolve_modsquad_classes(saved_classifier, tiny_config):
    folder, _ = saved_classifier
    fields = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("modsquad", **fields)
    assert type(config) is ModSquadConfig
    assert type(AutoModel.from_config(config)) is ModSquadModel
    assert type(AutoModelForImageClassification.from_config(config)) is ModSquadForImageClassification

    assert type(AutoConfig.from_pretrained(folder)) is ModSquadConfig
    assert type(AutoModel.from_pretrained(folder)) is ModSquadModel  # the backbone out of a head checkpoint
    assert type(AutoModelForImageClassification.from_pretrained(folder)) is ModSquadForImageClassification
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is ModSquadImageProcessor
    assert processor.size == {"height": 32, "width": 32}


# ------------------------------------------------------------------------------------------ save and reload
def test_save_pretrained_writes_safetensors_only_and_reloads_identically(tmp_path, tiny_config):
    model = _trained_looking(ModSquadForImageClassification(tiny_config(moe_attention=True)))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    # the modeling code travels with the weights, for trust_remote_code
    assert {"modeling_modsquad.py", "moe.py", "configuration_modsquad.py", "head_classification.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "head_classification.ModSquadForImageClassification"
    assert auto_map["AutoConfig"] == "configuration_modsquad.ModSquadConfig"

    loaded = ModSquadForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.tasks == model.config.tasks
    assert loaded.config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = (
            model(pixel_values, output_router_logits=True),
            loaded(pixel_values, output_router_logits=True),
        )
    assert torch.equal(got.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.expert_indices, expected.expert_indices))


# ------------------------------------------------------------------------------------------------ remote code
_BLOCK_MODSQUAD = """
    import sys

    class BlockModsquad:
        # stands in for a machine where the modsquad package was never installed
        def find_spec(self, name, path=None, target=None):
            if name == "modsquad" or name.startswith("modsquad."):
                raise ImportError(f"{name} is not installed here")
            return None

    sys.meta_path.insert(0, BlockModsquad())
    try:
        import modsquad  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("modsquad should not be importable in this process")
"""


@pytest.mark.slow
def test_remote_code_loads_without_the_package(saved_classifier, tmp_path):
    source, model = saved_classifier
    folder = tmp_path / "elsewhere" / "tiny-modsquad"
    shutil.copytree(source, folder)
    image = _test_image()
    processor = ModSquadImageProcessor.from_pretrained(source)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
    np.save(tmp_path / "pixel_values.npy", pixel_values.numpy())
    np.save(tmp_path / "logits.npy", logits.numpy())
    image.save(tmp_path / "image.png")

    script = (
        _BLOCK_MODSQUAD
        + f"""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    folder, work = {str(folder)!r}, {str(tmp_path)!r}
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "ModSquadForImageClassification", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert model.config.id2label == {{0: "circle", 1: "square", 2: "triangle"}}, model.config.id2label

    expected_pixels = np.load(work + "/pixel_values.npy")
    with torch.no_grad():
        logits = model(torch.from_numpy(expected_pixels)).logits.numpy()
    np.testing.assert_allclose(logits, np.load(work + "/logits.npy"), atol=1e-6)

    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(processor).__name__ == "ModSquadImageProcessor", type(processor)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    pixels = processor(Image.open(work + "/image.png"), return_tensors="pt")["pixel_values"].numpy()
    np.testing.assert_allclose(pixels, expected_pixels, atol=1e-6)

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "ModSquadConfig" and config.task_names == ["cls"]
    backbone = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(backbone).__name__ == "ModSquadModel", type(backbone)
    """
    )
    _run_python(script, {"HF_MODULES_CACHE": str(tmp_path / "modules")})


# ------------------------------------------------------------------------------------------- local Hub cache
def _build_hub_cache(folder: Path, cache: Path, repo_id: str) -> str:
    """Lays `folder` out as huggingface_hub's cache does after a download of `repo_id` at one commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return commit


@pytest.mark.slow
def test_from_pretrained_by_repo_id_from_local_hub_cache(saved_classifier, tmp_path):
    source, model = saved_classifier
    cache = tmp_path / "hub"
    _build_hub_cache(source, cache, "org/tiny-modsquad")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values).logits
    np.save(tmp_path / "pixel_values.npy", pixel_values.numpy())
    np.save(tmp_path / "logits.npy", logits.numpy())

    script = f"""
    import os
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    import numpy as np
    import torch
    import modsquad
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    work = {str(tmp_path)!r}
    model = AutoModelForImageClassification.from_pretrained("org/tiny-modsquad").eval()
    assert type(model) is modsquad.ModSquadForImageClassification, type(model)
    assert model.name_or_path == "org/tiny-modsquad", model.name_or_path
    with torch.no_grad():
        logits = model(torch.from_numpy(np.load(work + "/pixel_values.npy"))).logits.numpy()
    np.testing.assert_allclose(logits, np.load(work + "/logits.npy"), atol=1e-6)
    processor = AutoImageProcessor.from_pretrained("org/tiny-modsquad")
    assert type(processor) is modsquad.ModSquadImageProcessor and processor.size["height"] == 32
    """
    _run_python(script, {"HF_HUB_CACHE": str(cache), "HF_MODULES_CACHE": str(tmp_path / "modules")})


# ---------------------------------------------------------------------------------------------------- pipeline
def test_image_classification_pipeline_returns_the_config_labels(saved_classifier):
    folder, model = saved_classifier
    classifier = pipeline("image-classification", model=str(folder))
    image = _test_image(1)
    predictions = classifier(image)
    assert isinstance(predictions, list) and len(predictions) == 3
    assert all(set(p) == {"label", "score"} for p in predictions)
    assert {p["label"] for p in predictions} == {"circle", "square", "triangle"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    # the scores are the model's softmax on the processed image, best first
    pixel_values = ModSquadImageProcessor.from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixel_values).logits.softmax(-1)[0]
    for prediction in predictions:
        label_id = model.config.label2id[prediction["label"]]
        assert prediction["score"] == pytest.approx(probs[label_id].item(), abs=1e-5)
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)


def test_multi_label_pipeline_gives_sigmoid_scores(tmp_path, tiny_config):
    model = _save_classifier(tmp_path, tiny_config([MULTI_LABEL]))
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = _test_image(2)
    predictions = classifier(image, top_k=None)
    assert {p["label"] for p in predictions} == set(MULTI_LABEL["labels"])
    pixel_values = ModSquadImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        scores = model(pixel_values).logits.sigmoid()[0]
    for prediction in predictions:
        label_id = MULTI_LABEL["labels"].index(prediction["label"])
        assert prediction["score"] == pytest.approx(scores[label_id].item(), abs=1e-5)
    assert sum(p["score"] for p in predictions) != pytest.approx(1.0, abs=1e-3)


def test_pipeline_on_one_task_of_a_multi_task_checkpoint(tmp_path, all_tasks, tiny_config):
    """A head checkpoint built from a multi-task config still gives the pipeline its own task's labels."""
    model = _save_classifier(tmp_path, tiny_config(all_tasks))
    assert model.config.num_tasks == 4
    predictions = pipeline("image-classification", model=str(tmp_path))(_test_image(3))
    assert {p["label"] for p in predictions} == {"circle", "square", "triangle"}
