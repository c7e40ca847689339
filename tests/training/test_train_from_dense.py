"""Recipes that start from a dense ViT / DINOv2 checkpoint: trained through `modsquad train` from tiny random dense
folders (with their own image processors), the processor settings read from the checkpoint, the weights upcycled,
and every mistake about the starting point reported before any data is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    BertConfig,
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from modsquad import ModSquadForMultiTask
from modsquad.adaptation.upcycling import modsquad_config_from_dense
from modsquad.cli import main as modsquad_main
from modsquad.commands.train import train_recipe
from modsquad.training.recipe import load_recipe
from modsquad.training.starting_point import resolve_starting_point
from modsquad.training.task_data import build_task_data

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
DEMO = {"demo": True, "num_train": 8, "num_val": 4, "image_size": 32, "seed": 0}
# Distinctive settings, so that finding them in the trained model's processor proves where they came from.
MEAN, STD = [0.1, 0.2, 0.3], [0.6, 0.5, 0.4]


def dinov2_folder(folder: Path) -> Path:
    """A tiny random DINOv2 (14px patches, MLP 64 wide) with a DINOv2-style processor (bicubic, centre crop 28)."""
    torch.manual_seed(1)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14
    )
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(
        image_mean=MEAN, image_std=STD, size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}
    )
    processor.save_pretrained(folder)
    return folder


def vit_folder(folder: Path) -> Path:
    """A tiny random ViT (8px patches, MLP 64 wide) with a ViT processor (resize to 32x32)."""
    torch.manual_seed(1)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(image_mean=MEAN, image_std=STD, size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def recipe_file(tmp_path: Path, pretrained: str, second_size: int, **model) -> Path:
    """Two demo tasks: `cls` at the checkpoint's resolution (no image_size), `seg` at `second_size`."""
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {
            "pretrained": pretrained,
            "config": {"num_experts": 4, "num_experts_per_tok": 2, "moe_layers": "all"},
            **model,
        },
        "tasks": [
            {"name": "cls", "dataset": DEMO, "batch_size": 4},
            {
                "name": "seg",
                "dataset": DEMO,
                "batch_size": 4,
                "image_size": second_size,
                "head": {"decoder_channels": 8},
            },
        ],
        "optimization": {"learning_rate": 1e-2, "backbone_learning_rate": 1e-5, "layer_decay": 0.9},
        "training": {"max_steps": 2, "log_every": 1, "eval_at_end": False, "tracker": "none"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


CASES = {
    # name: (make folder, seg resolution, upcycling options, checkpoint resolution, patch size)
    "dinov2-partition": (dinov2_folder, 42, {"mode": "partition"}, 28, 14),
    "vit-copy": (vit_folder, 48, {}, 32, 8),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_modsquad_train_upcycles_a_dense_checkpoint_with_its_processor_settings(tmp_path, case):
    make_folder, seg_size, upcycling, resolution, patch = CASES[case]
    dense_dir = make_folder(tmp_path / "dense")
    recipe = recipe_file(tmp_path, str(dense_dir), seg_size, upcycling=upcycling)

    assert modsquad_main(["train", "--config", str(recipe)]) == 0

    final = tmp_path / "run" / "final"
    # The processor saved with the model: the dense checkpoint's mean, std and resampling, at the largest resolution.
    dense_processor = json.loads((dense_dir / "preprocessor_config.json").read_text())
    processor = AutoImageProcessor.from_pretrained(final)
    assert (list(processor.image_mean), list(processor.image_std)) == (MEAN, STD)
    assert processor.resample == dense_processor["resample"]
    assert processor.size == {"height": seg_size, "width": seg_size}
    # Each task's processor: cls at the checkpoint's own resolution (its crop or resize size), seg at the recipe's.
    tasks, _ = build_task_data(load_recipe(recipe))
    assert [task.processor.size["height"] for task in tasks] == [resolution, seg_size]
    assert all(list(task.processor.image_std) == STD for task in tasks)

    # The model: the checkpoint's shape and patch size, the recipe's experts, the dense weights (2 steps at a backbone
    # learning rate of 1e-5 move them by ~2e-5; a fresh init would be ~0.02 away).
    dense = (Dinov2Model if case.startswith("dinov2") else ViTModel).from_pretrained(dense_dir)
    model = ModSquadForMultiTask.from_pretrained(final)
    config = model.config
    assert (config.patch_size, config.hidden_size, config.num_hidden_layers) == (patch, 32, 2)
    assert (config.num_experts, config.num_experts_per_tok) == (4, 2)
    backbone = model.modsquad
    close = dict(atol=1e-4, rtol=0)
    torch.testing.assert_close(
        backbone.embeddings.patch_embeddings.projection.weight,
        dense.embeddings.patch_embeddings.projection.weight,
        **close,
    )
    dense_block = dense.encoder.layer[1] if case.startswith("dinov2") else dense.layers[1]
    experts = backbone.layers[1].mlp.experts
    fc1 = dense_block.mlp.fc1.weight
    if upcycling.get("mode") == "partition":
        assert config.expert_intermediate_size == 32  # 64 hidden units, top-2: one dense MLP per token
        for expert in range(4):
            torch.testing.assert_close(
                experts.up_proj[expert], fc1[(expert % 2) * 32 : (expert % 2 + 1) * 32], **close
            )
    else:
        assert config.expert_intermediate_size == 64
        for expert in range(4):
            torch.testing.assert_close(experts.up_proj[expert], fc1, **close)
    # The heads learned at the new-parameter rate, the backbone at its own decayed rates.
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    for line in log:
        assert line["lr/new"] == pytest.approx(line["lr"])
        assert line["lr/backbone.layer_03"] == pytest.approx(line["lr"] * 1e-3)
        assert line["lr/backbone.layer_00"] == pytest.approx(line["lr"] * 1e-3 * 0.9**3)


def write_bert_folder(folder: Path) -> Path:
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(folder)
    return folder


def weights_only_folder(folder: Path) -> Path:
    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(folder)
    return folder


ERRORS = {
    "wrong Hub id": (
        lambda d: "no-such-user/no-such-model",
        [],
        "the Hub id holds no readable checkpoint config",
    ),
    "missing folder": (lambda d: str(d / "missing"), [], "no such folder"),
    "unsupported type": (
        lambda d: str(write_bert_folder(d / "bert")),
        [],
        r"is a 'bert' checkpoint, which cannot start a ModSquad model; accepted model types: \['modsquad', 'vit'",
    ),
    "no processor": (lambda d: str(weights_only_folder(d / "bare")), [], "has no preprocessor_config.json"),
    "shape conflict": (
        lambda d: str(dinov2_folder(d / "dense")),
        ["model.config.hidden_size=48"],
        "model.config.hidden_size=48 but the checkpoint has 32",
    ),
    "patch conflict": (
        lambda d: str(dinov2_folder(d / "dense")),
        ["model.config.patch_size=16"],
        "model.config.patch_size=16 but the checkpoint has 14",
    ),
    "size not whole patches": (
        lambda d: str(dinov2_folder(d / "dense")),
        ["tasks.seg.image_size=40"],
        r"tasks.seg.image_size=40 is not a multiple of the patch size 14 of .*; "
        r"accepted: multiples of 14, e.g. 28 or 42",
    ),
    "partition top-k": (
        lambda d: str(dinov2_folder(d / "dense")),
        ["model.upcycling.mode=partition", "model.config.num_experts_per_tok=3"],
        "cuts the dense MLP's 64 hidden units into num_experts_per_tok=3 equal slices",
    ),
    "unknown upcycling option": (
        lambda d: str(dinov2_folder(d / "dense")),
        ["model.upcycling.experts=8"],
        r"unknown model.upcycling key\(s\) 'experts'; accepted: \['mode', 'router_init_std'\]",
    ),
}


@pytest.mark.parametrize("error", list(ERRORS))
def test_bad_starting_points_fail_before_any_data_is_loaded(tmp_path, error):
    make_source, overrides, message = ERRORS[error]
    recipe = recipe_file(tmp_path, make_source(tmp_path), 42)
    # Datasets that do not exist: reaching them would raise another error.
    missing = [f"tasks.{task}.dataset={{path: {tmp_path / 'no-data'}}}" for task in ("cls", "seg")]
    with pytest.raises(ValueError, match=message):
        train_recipe(load_recipe(recipe, [*missing, *overrides]))


def test_upcycling_options_need_a_dense_checkpoint():
    with pytest.raises(ValueError, match=r"model.upcycling applies when model.pretrained names a dense"):
        load_recipe(
            tasks=[{"name": "a", "type": "image-classification"}], model={"upcycling": {"mode": "copy"}}
        )
    with pytest.raises(ValueError, match=r"model.upcycling.mode='slices'; accepted: \['copy', 'partition'\]"):
        load_recipe(
            tasks=[{"name": "a", "type": "image-classification"}],
            model={"pretrained": "x", "upcycling": {"mode": "slices"}},
        )


@pytest.mark.parametrize("mode", ["copy", "partition"])
def test_shipped_dense_recipe_builds_a_valid_model_config(tmp_path, mode):
    """`training/configs/real_from_dense.yaml` with its checkpoint pointed at a local DINOv2 folder (14px patches, as
    dinov2-small): the starting point resolves and its model config (heads included) is valid in both modes."""
    folder = dinov2_folder(tmp_path / "dense")
    recipe = load_recipe(
        REPO / "training" / "configs" / "real_from_dense.yaml",
        [f"model.pretrained={folder}", f"model.upcycling.mode={mode}"],
    )
    assert (
        load_recipe(REPO / "training" / "configs" / "real_from_dense.yaml").model.pretrained
        == "facebook/dinov2-small"
    )
    start = resolve_starting_point(recipe)
    assert (start.patch_size, start.processor_settings["image_std"]) == (14, STD)
    entries = []
    for task in recipe.tasks:
        entry = {"name": task.name, "type": task.type, **task.head}
        if task.type != "depth-estimation":
            entry["num_labels"] = len(task.labels) if task.labels else 3
        entries.append(entry)
    config = modsquad_config_from_dense(start.config, mode, tasks=entries, **recipe.model.config)
    assert config.task_names == recipe.task_names and config.moe_layer_indices == [1]
    # The single-task dense baseline of the recipe's comments (`--only-task seg model.config.moe_layers=[]`): the
    # pretrained ViT itself, its MLPs at their full width.
    fields = {**recipe.model.config, "moe_layers": []}
    baseline = modsquad_config_from_dense(start.config, mode, tasks=entries[2:3], **fields)
    assert (baseline.moe_layer_indices, baseline.intermediate_size) == ([], 64)


@pytest.mark.slow
def test_accelerate_launch_trains_from_a_dense_checkpoint_on_two_processes(tmp_path, launch_two_processes):
    """`accelerate launch training/train.py` takes the same recipe: two CPU processes upcycle the same weights (the
    routers' random init included) and stay bit-identical."""
    dense_dir = dinov2_folder(tmp_path / "dense")
    recipe = recipe_file(tmp_path, str(dense_dir), 42, upcycling={"mode": "partition"})
    launch_two_processes(recipe, "training.cpu=true")
    run = tmp_path / "run"
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    processor = json.loads((run / "final" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == (MEAN, STD)
