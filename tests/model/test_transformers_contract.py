"""What a Transformers user does with ModSquad models, held to the behaviour of Transformers' own models: building on
the meta device, output flags from the config, attention maps, relabelling a head, re-heading one task of a
multi-task checkpoint, reloading a head saved from a config with several tasks of its type, the MoE routing outputs,
and loading processors and multi-task checkpoints with and without the package installed."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    pipeline,
)

from modsquad import (
    ModSquadConfig,
    ModSquadForDepthEstimation,
    ModSquadForImageClassification,
    ModSquadForMultiTask,
    ModSquadForObjectDetection,
    ModSquadForSemanticSegmentation,
    ModSquadImageProcessor,
    ModSquadModel,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_CLASSES = (
    ModSquadModel,
    ModSquadForImageClassification,
    ModSquadForSemanticSegmentation,
    ModSquadForObjectDetection,
    ModSquadForDepthEstimation,
    ModSquadForMultiTask,
)


@pytest.fixture(name="four_tasks")
def four_tasks_fixture(all_tasks) -> list[dict]:
    # Small heads, through each head type's own option (detection: its head width; dense heads: the decoder's).
    for task in all_tasks[1:]:
        option = "head_channels" if task["type"] == "object-detection" else "decoder_channels"
        task[option] = 8
    return all_tasks


@pytest.fixture(autouse=True)
def _no_prompt(monkeypatch):
    """Transformers asks on stdin before running remote code; none of this may ever ask."""

    def prompt(*args, **kwargs):
        raise AssertionError(f"an interactive prompt was shown: {args[0] if args else ''}")

    monkeypatch.setattr(builtins, "input", prompt)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ 1. meta device
@pytest.mark.parametrize("moe_attention", [False, True])
def test_every_model_builds_on_the_meta_device(tiny_config, four_tasks, moe_attention):
    config = tiny_config(four_tasks, moe_attention=moe_attention, drop_path_rate=0.1)
    for model_class in MODEL_CLASSES:
        with torch.device("meta"):
            model = model_class(config)
        assert all(p.is_meta for p in model.parameters()), model_class.__name__
    # The stochastic depth still rises linearly over the blocks.
    rates = [block.drop_path.drop_prob for block in ModSquadModel(config).layers]
    assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])


# ----------------------------------------------------------------------------------------- 2. output flags
def test_heads_honour_config_output_hidden_states(tiny_config, four_tasks):
    config = tiny_config(four_tasks, output_hidden_states=True)
    for model_class in MODEL_CLASSES[1:5]:
        model = model_class(config).eval()
        with torch.no_grad():
            out = model(_images())
            assert len(out.hidden_states) == config.num_hidden_layers + 1, model_class.__name__
            assert model(_images(), output_hidden_states=False).hidden_states is None  # the argument wins


# ----------------------------------------------------------------------------------------- 3. attentions
@pytest.mark.parametrize("moe_attention", [False, True])
def test_output_attentions_returns_the_attention_probabilities(tiny_config, four_tasks, moe_attention):
    config = tiny_config(four_tasks, moe_attention=moe_attention)
    model = ModSquadForSemanticSegmentation(config).eval()
    assert model.config._attn_implementation == "sdpa"
    images = _images()
    with torch.no_grad():
        plain = model(images)
        out = model(images, output_attentions=True)
    assert plain.attentions is None
    assert len(out.attentions) == config.num_hidden_layers
    tokens = 2 + 16
    for attention in out.attentions:
        assert attention.shape == (2, config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, config.num_attention_heads, tokens))
    # sdpa gives the same predictions; the probabilities come from eager attention for that call
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- 4. labels and problem types
def test_a_head_takes_top_level_labels_without_rewriting_the_callers_config(tiny_config, four_tasks):
    config = tiny_config(four_tasks)
    config.num_labels = 5
    before = config.to_dict()
    model = ModSquadForImageClassification(config)
    assert config.to_dict() == before  # the caller's config is left alone
    assert model.config is not config
    assert model(_images()).logits.shape == (2, 5)
    assert model.config.get_task("cls")["num_labels"] == 5 and model.config.num_labels == 5
    # A config without top-level labels gives each head its own task's.
    assert ModSquadForSemanticSegmentation(tiny_config(four_tasks)).config.id2label == {
        0: "background",
        1: "shape",
    }


def test_regression_with_one_label(tiny_config):
    config = tiny_config(problem_type="regression", num_labels=1)
    model = ModSquadForImageClassification(config).eval()
    assert model.config.problem_type == "regression"
    targets = torch.tensor([0.5, -1.0, 2.0])
    out = model(_images(3), labels=targets)
    assert out.logits.shape == (3, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))
    with pytest.raises(ValueError, match=r"regression labels must have shape \(3, 1\) or \(3,\)"):
        model(_images(3), labels=torch.zeros(3, 2))


# ---------------------------------------------------------------------- 6. re-heading a multi-task checkpoint
def test_one_task_of_a_multi_task_checkpoint_gets_a_new_head(tiny_config, four_tasks, tmp_path):
    multi = ModSquadForMultiTask(tiny_config(four_tasks))
    multi.save_pretrained(tmp_path)
    model = ModSquadForImageClassification.from_pretrained(
        tmp_path, num_labels=42, ignore_mismatched_sizes=True
    )
    assert model.task == "cls" and model(_images()).logits.shape == (2, 42)
    assert model.config.get_task("seg") == multi.config.get_task("seg")  # the other tasks are untouched
    old = multi.state_dict()
    for name, value in model.state_dict().items():
        if "classifier" not in name:
            assert torch.equal(value, old[name]), name

    # The per-task route: new task entries, checked and completed like the constructor's.
    tasks = [{"name": "cls", "type": "image-classification", "labels": ["ant", "bee"]}, *four_tasks[1:]]
    relabelled = AutoModelForImageClassification.from_pretrained(
        tmp_path, tasks=tasks, ignore_mismatched_sizes=True
    )
    assert relabelled.config.id2label == {0: "ant", 1: "bee"}
    assert relabelled.config.get_task("cls")["problem_type"] == "single_label_classification"
    assert relabelled(_images()).logits.shape == (2, 2)


# ------------------------------------------------------------ 8. a head saved from a config with several tasks
def test_a_head_of_one_of_several_tasks_of_its_type_loads_back(tiny_config, tmp_path):
    tasks = [
        {"name": "shapes", "type": "image-classification", "labels": ["circle", "square"]},
        {"name": "colours", "type": "image-classification", "labels": ["red", "green", "blue"]},
    ]
    config = tiny_config(tasks)
    model = AutoModelForImageClassification.from_config(config, task="colours").eval()
    model.save_pretrained(tmp_path)
    ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.task == "colours" and loaded.config.id2label == {0: "red", 1: "green", 2: "blue"}
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).logits, model(images).logits)
    classifier = pipeline("image-classification", model=str(tmp_path))
    predictions = classifier(Image.new("RGB", (48, 40), "red"))
    assert {p["label"] for p in predictions} == {"red", "green", "blue"}
    # The other task is still there to be served explicitly.
    assert AutoModelForImageClassification.from_pretrained(tmp_path, task="shapes").task == "shapes"


# ------------------------------------------------------------------------------- MoE conventions (Mixtral's)
def test_routing_outputs_only_on_request(tiny_config):
    model = ModSquadForImageClassification(tiny_config(z_loss_coef=0.1)).eval()
    images, labels = _images(), torch.tensor([0, 1])
    with torch.no_grad():
        plain = model(images, labels=labels)
        routed = model(images, labels=labels, output_router_logits=True)
        model.config.output_router_logits = True
        from_config = model(images, labels=labels)
    assert list(plain.keys()) == ["loss", "logits"]
    assert len(routed.router_logits) == len(routed.router_probs) == len(routed.expert_indices) == 2
    assert routed.aux_loss > 0 and from_config.router_logits is not None
    torch.testing.assert_close(routed.loss, plain.loss + routed.aux_loss)
    # Transformers' Trainer leaves routing out of predictions even when a config asks for it.
    assert set(model.config.keys_to_ignore_at_inference) >= {"aux_loss", "router_logits", "router_probs"}


# ------------------------------------------------------------------- 7. an image processor saved on its own
def test_a_processor_saved_alone_loads_with_the_auto_class(tmp_path):
    processor = ModSquadImageProcessor(size={"height": 24, "width": 40}, image_mean=[0.5, 0.5, 0.5])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "ModSquadImageProcessor"
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_modsquad.ModSquadImageProcessor"}
    assert (tmp_path / "image_processing_modsquad.py").is_file()

    for trust in (None, True):  # the installed package wins, without asking
        loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=trust)
        assert type(loaded) is ModSquadImageProcessor
        assert loaded.size == {"height": 24, "width": 40} and list(loaded.image_mean) == [0.5, 0.5, 0.5]


# Runs a snippet in a fresh interpreter where `import modsquad` fails, as on a machine without the package.
WITHOUT_PACKAGE = """
import importlib.abc, sys

class NoModSquad(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modsquad" or name.startswith("modsquad."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoModSquad())
"""


def run_without_package(code: str, tmp_path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    script = WITHOUT_PACKAGE + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_processor_and_multi_task_checkpoint_load_without_the_package(tiny_config, four_tasks, tmp_path):
    processor = ModSquadImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "processor")
    model = ModSquadForMultiTask(tiny_config(four_tasks)).eval()
    model.save_pretrained(tmp_path / "model")
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = {task: model(pixel_values, task=task) for task in ("cls", "seg")}

    out = run_without_package(
        f"""
        import json, numpy as np, torch
        from transformers import AutoImageProcessor, AutoModelForPreTraining
        try:
            import modsquad
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("the package is importable")
        processor = AutoImageProcessor.from_pretrained({str(tmp_path / "processor")!r}, trust_remote_code=True)
        pixel_values = processor(np.load({str(tmp_path / "image.npy")!r}), return_tensors="pt")["pixel_values"]
        model = AutoModelForPreTraining.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = {{task: model(pixel_values, task=task).logits.tolist() for task in ("cls", "seg")}}
        print(json.dumps({{"processor": type(processor).__module__, "model": type(model).__name__,
                           "pixel_values": pixel_values.tolist(), "logits": logits}}))
        """,
        tmp_path,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["processor"].startswith("transformers_modules.")  # the code saved beside the weights
    assert result["model"] == "ModSquadForMultiTask"
    torch.testing.assert_close(torch.tensor(result["pixel_values"]), pixel_values)
    for task, output in expected.items():
        torch.testing.assert_close(torch.tensor(result["logits"][task]), output.logits, atol=1e-5, rtol=1e-5)


def test_multi_task_checkpoints_load_with_the_pretraining_auto_class(tiny_config, four_tasks, tmp_path):
    ModSquadForMultiTask(tiny_config(four_tasks)).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForPreTraining"] == "modeling_multitask.ModSquadForMultiTask"
    model = AutoModelForPreTraining.from_pretrained(tmp_path)
    assert type(model) is ModSquadForMultiTask and set(model.heads) == {"cls", "seg", "det", "depth"}


def test_the_config_validates_head_task(tiny_config):
    with pytest.raises(
        ValueError, match=r"head_task='nope' is not a task of this config; its tasks are \['cls'\]"
    ):
        tiny_config(head_task="nope")
    assert isinstance(tiny_config(head_task="cls"), ModSquadConfig)
