"""Expert usage and per-task pruning: counts, the EMA tracker, exact pruned models for every head type."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

from modsquad import (
    ExpertUsage,
    ExpertUsageTracker,
    ModSquadForImageClassification,
    ModSquadForSemanticSegmentation,
    ModSquadImageProcessor,
    collect_expert_usage,
    compare_pruned_outputs,
    prune_for_task,
)
from modsquad.pruning.prune import select_experts
from modsquad.pruning.usage import router_layout

EXACT = 1e-5


@pytest.fixture(scope="module")
def moa_model(fresh_tasks, specialised_model):
    """Four tasks, MoE MLPs and attention experts."""
    return specialised_model(list(fresh_tasks(small=True).values()), moe_attention=True)


# --------------------------------------------------------------------------------------------------- usage
def test_usage_counts_every_token_slot_per_router_in_output_order(
    moa_model, specialised_experts, pixel_loader
):
    other_task = {"pixel_values": torch.randn(2, 3, 32, 32), "task": "seg"}  # skipped
    loader = [*pixel_loader(1), other_task]
    usage = collect_expert_usage(moa_model, loader, "cls")
    tokens = 2 * 2 * (2 + 16)  # batches x images x ([CLS] + task token + 4x4 patches)
    assert usage.task == "cls" and usage.tokens == tokens
    assert [(r.slot.block, r.slot.kind) for r in usage.routers] == [
        (1, "attention"),
        (1, "mlp"),
        (3, "attention"),
        (3, "mlp"),
    ]
    for router in usage.routers:
        assert router.counts.sum() == tokens * 2  # top-2
        assert router.fractions.sum().item() == pytest.approx(1.0)
    # the counts are the model's own choices
    with torch.no_grad():
        out = moa_model(
            pixel_values=torch.cat([b["pixel_values"] for b in loader[:2]]),
            task="cls",
            output_router_logits=True,
        )
    for router, indices in zip(usage.routers, out.expert_indices):
        assert torch.equal(
            router.counts, torch.bincount(indices.flatten(), minlength=specialised_experts).double()
        )
    # a specialised task leaves experts unused, which is what pruning removes
    assert any((r.counts == 0).any() for r in usage.routers)
    assert ExpertUsage.from_dict(usage.to_dict()).to_dict() == usage.to_dict()


def test_usage_accepts_tensors_tuples_and_rejects_other_items(moa_model):
    images = torch.randn(3, 3, 32, 32)
    as_batch = collect_expert_usage(moa_model, [images], "det")
    as_images = collect_expert_usage(moa_model, list(images), "det")  # (C, H, W) items
    as_tuples = collect_expert_usage(moa_model, [(images, torch.zeros(3))], "det")  # TensorDataset-style
    for other in (as_images, as_tuples):
        assert all(torch.equal(a.counts, b.counts) for a, b in zip(as_batch.routers, other.routers))
    with pytest.raises(ValueError, match="pixel values of shape"):
        collect_expert_usage(moa_model, [torch.randn(32, 32)], "det")
    with pytest.raises(ValueError, match="'pixel_values'"):
        collect_expert_usage(moa_model, [{"image": images}], "det")
    with pytest.raises(ValueError, match="no batches of task 'det'"):
        collect_expert_usage(moa_model, [{"pixel_values": images, "task": "cls"}], "det")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        collect_expert_usage(moa_model, [images], "nope")


def test_tracker_ema_and_checkpoint_round_trip(
    moa_model, tmp_path, small_tasks, specialised_experts, tiny_config
):
    tracker = ExpertUsageTracker(moa_model.config, decay=0.5)
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    with torch.no_grad():
        outputs = [moa_model(pixel_values=b, task="seg", output_router_logits=True) for b in batches]
    for out in outputs:
        tracker.update("seg", out.expert_indices)
    tracker.update(0, outputs[0].expert_indices)  # a task id works as well as its name
    ema = tracker.usage("seg")
    assert ema.source == "ema"
    for position, router in enumerate(ema.routers):
        first, second = (
            torch.bincount(o.expert_indices[position].flatten(), minlength=specialised_experts).double()
            for o in outputs
        )
        expected = 0.5 * first / first.sum() + 0.5 * second / second.sum()
        assert torch.allclose(router.counts, expected)
    counts = tracker.usage("seg", statistic="counts")
    assert counts.tokens == 2 * 2 * 18 and counts.routers[0].counts.sum() == counts.tokens * 2

    torch.save(tracker.state_dict(), tmp_path / "tracker.pt")
    restored = ExpertUsageTracker(moa_model.config)
    restored.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    assert restored.decay == 0.5 and restored.updates == {"seg": 2, "cls": 1}
    for a, b in zip(restored.usage("seg").routers, ema.routers):
        assert torch.equal(a.counts, b.counts)
    with pytest.raises(ValueError, match="follows routers"):
        ExpertUsageTracker(tiny_config([small_tasks["cls"]])).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="no batch of task 'det'"):
        tracker.usage("det")
    with pytest.raises(ValueError, match="decay"):
        ExpertUsageTracker(moa_model.config, decay=1.0)


# ------------------------------------------------------------------------------------------------- pruning
def test_select_experts_pads_with_the_most_used_within_the_routable_ones():
    counts = torch.tensor([0.0, 5.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert select_experts(counts, 0.0, 2) == [1, 3]
    assert select_experts(counts, 0.5, 2) == [1, 3]  # only expert 1 passes; padded with the next most used
    assert select_experts(counts, 0.5, 3) == [0, 1, 3]  # then ties go to the lowest index
    assert select_experts(counts, 0.0, 2, routable=4) == [1, 3]
    with pytest.raises(ValueError, match="cannot route to"):
        select_experts(counts, 0.0, 2, routable=2)


def _check_pruned_config(pruned, full, task: str) -> None:
    config = pruned.config
    assert config.task_names == [task]
    assert isinstance(config.num_experts, list) and config.num_experts == [
        len(k) for k in config.pruned_experts
    ]
    assert sum(config.num_experts) < sum(full.config.experts_per_layer)  # something was cut
    assert config.pruned_from["tasks"] == full.config.task_names
    assert config.pruned_from["num_experts"] == full.config.experts_per_layer
    task_id = full.config.task_index(task)
    assert torch.equal(
        pruned.modsquad.embeddings.task_tokens[0], full.modsquad.embeddings.task_tokens[task_id]
    )
    for slot, kept in zip(router_layout(config), _kept(config)):
        router = getattr(pruned.modsquad.layers[slot.block], slot.kind).router
        full_router = getattr(full.modsquad.layers[slot.block], slot.kind).router
        assert router.weight.shape == (1, len(kept), config.hidden_size)
        assert torch.equal(router.weight[0], full_router.weight[task_id, kept])
    head, full_head = pruned.heads[task].state_dict(), full.heads[task].state_dict()
    assert all(torch.equal(head[k], full_head[k]) for k in full_head)


def _kept(config) -> list[list[int]]:
    kept = []
    for position in range(len(config.moe_layer_indices)):
        if config.pruned_attention_experts is not None:
            kept.append(config.pruned_attention_experts[position])
        kept.append(config.pruned_experts[position])
    return kept


@pytest.mark.parametrize("moe_attention", [False, True], ids=["mlp-experts", "attention-experts"])
def test_pruned_classifier_is_exact_on_calibration_data_and_loads_standalone(
    moe_attention, tmp_path, small_tasks, pixel_loader, specialised_model
):
    full = specialised_model([small_tasks["cls"], small_tasks["seg"]], moe_attention=moe_attention)
    calibration = pixel_loader(2)
    usage = collect_expert_usage(full, calibration, "cls")
    pruned = prune_for_task(full, "cls", usage)
    assert type(pruned) is ModSquadForImageClassification and not pruned.training
    _check_pruned_config(pruned, full, "cls")
    if moe_attention:
        assert pruned.config.attention_num_experts == [len(k) for k in pruned.config.pruned_attention_experts]
    check = compare_pruned_outputs(full, pruned, calibration)
    assert check["max_abs_diff"] <= EXACT and check["routing_agreement"] == 1.0

    pruned.save_pretrained(tmp_path)
    ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is ModSquadForImageClassification
    assert loaded.config.pruned_experts == pruned.config.pruned_experts
    assert loaded.config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    pixels = calibration[0]["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(loaded(pixels).logits, full(pixels, task="cls").logits, atol=EXACT)
    if not moe_attention:  # the pipeline path does not depend on the kind of experts
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        predictions = pipeline("image-classification", model=str(tmp_path))(image)
        assert {p["label"] for p in predictions} == {"circle", "square", "triangle"}


@pytest.mark.parametrize("name", ["seg", "det", "depth"])
def test_pruned_dense_heads_are_exact_and_wrong_pruning_is_detected(
    moa_model, name, small_tasks, pixel_loader
):
    calibration = pixel_loader(3, batches=1, batch_size=3)
    usage = collect_expert_usage(moa_model, calibration, name)
    pruned = prune_for_task(moa_model, name, usage)
    assert pruned.task == name and type(pruned).task_type == small_tasks[name]["type"]
    _check_pruned_config(pruned, moa_model, name)
    check = compare_pruned_outputs(moa_model, pruned, calibration)
    assert check["max_abs_diff"] <= EXACT and check["routing_agreement"] == 1.0

    # The check is sensitive: without the most used expert of the first router, routing and predictions change.
    wrong = ExpertUsage.from_dict(usage.to_dict())
    counts = wrong.routers[0].counts
    counts[counts.argmax()] = 0.0
    check = compare_pruned_outputs(moa_model, prune_for_task(moa_model, name, wrong), calibration)
    assert check["routing_agreement"] < 1.0 and check["max_abs_diff"] > 10 * EXACT


def test_high_threshold_keeps_top_k_most_used_experts(moa_model, pixel_loader):
    usage = collect_expert_usage(moa_model, pixel_loader(4), "cls")
    pruned = prune_for_task(moa_model, "cls", usage, threshold=0.99)
    assert pruned.config.num_experts == [2, 2] and pruned.config.attention_num_experts == [2, 2]
    for router, kept in zip(usage.routers, _kept(pruned.config)):
        top = sorted(torch.argsort(router.counts, descending=True, stable=True)[:2].tolist())
        assert kept == top
    wider = prune_for_task(moa_model, "cls", usage, threshold=0.99, min_experts=3)
    assert wider.config.num_experts == [3, 3]


def test_routable_expert_limits_of_continual_learning_are_respected(
    small_tasks, pixel_loader, specialised_model
):
    """A task trained before experts were added routes to the leading ones only; its pruned model drops the limit."""
    tasks = [{**small_tasks["cls"], "routable_experts": [5, 6]}, small_tasks["seg"]]
    full = specialised_model(tasks)
    calibration = pixel_loader(5)
    usage = collect_expert_usage(full, calibration, "cls")
    assert usage.routers[0].counts[5:].sum() == 0 and usage.routers[1].counts[6:].sum() == 0
    pruned = prune_for_task(full, "cls", usage, threshold=0.99, min_experts=6)
    assert pruned.config.num_experts == [5, 6]  # min_experts is capped by what the task may route to
    assert "routable_experts" not in pruned.config.tasks[0]
    assert max(pruned.config.pruned_experts[0]) < 5 and max(pruned.config.pruned_experts[1]) < 6
    exact = prune_for_task(full, "cls", usage)
    assert compare_pruned_outputs(full, exact, calibration)["max_abs_diff"] <= EXACT


def test_pruning_a_pruned_model_keeps_indices_of_the_original(moa_model, tmp_path, pixel_loader):
    calibration = pixel_loader(6)
    first = prune_for_task(moa_model, "seg", collect_expert_usage(moa_model, calibration, "seg"))
    first.save_pretrained(tmp_path)
    reloaded = ModSquadForSemanticSegmentation.from_pretrained(tmp_path)
    second = prune_for_task(
        reloaded, "seg", collect_expert_usage(reloaded, calibration, "seg"), threshold=0.2
    )
    for parent, child in zip(first.config.pruned_experts, second.config.pruned_experts):
        assert set(child) <= set(parent)
    assert second.config.pruned_from == first.config.pruned_from  # still the multi-task original


def test_prune_for_task_rejects_mismatched_inputs(
    moa_model, caplog, small_tasks, pixel_loader, specialised_model
):
    usage = collect_expert_usage(moa_model, pixel_loader(7, batches=1), "cls")
    with pytest.raises(ValueError, match="usage is of task 'cls', not of 'seg'"):
        prune_for_task(moa_model, "seg", usage)
    with pytest.raises(ValueError, match="threshold"):
        prune_for_task(moa_model, "cls", usage, threshold=1.0)
    with pytest.raises(ValueError, match="min_experts"):
        prune_for_task(moa_model, "cls", usage, min_experts=1)
    with pytest.raises(ValueError, match="one with heads"):
        prune_for_task(moa_model.modsquad, "cls", usage)
    with pytest.raises(ValueError, match="covers routers"):
        prune_for_task(specialised_model([small_tasks["cls"]]), "cls", usage)
    no_renorm = specialised_model([small_tasks["cls"]], norm_topk_prob=False)
    with caplog.at_level(logging.WARNING, logger="modsquad.pruning.prune"):
        prune_for_task(no_renorm, "cls", collect_expert_usage(no_renorm, pixel_loader(7), "cls"))
    assert "norm_topk_prob=False" in caplog.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pruned_experts": [[0, 1]]}, "one list of kept expert indices per MoE block"),
        ({"pruned_experts": [[1, 0], [0, 1]]}, "distinct increasing"),
        ({"pruned_experts": [[0, 1, 2], [0, 1]]}, "must list 2"),
        ({"pruned_attention_experts": [[0, 1], [0, 1]]}, "no such experts"),
        ({"pruned_from": {"name_or_path": "x"}}, "parent's 'tasks'"),
    ],
)
def test_config_validates_pruning_fields(fields, message, tiny_config):
    with pytest.raises(ValueError, match=message):
        tiny_config(num_experts=[2, 2], **fields)


def test_usage_from_trainer_fractions_round_trips_through_json(tiny_config):
    config = tiny_config()
    usage = ExpertUsage.from_fractions(config, "cls", [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    restored = ExpertUsage.from_dict(json.loads(json.dumps(usage.to_dict())))
    assert restored.source == "ema" and [r.slot for r in restored.routers] == router_layout(config)
    assert restored.routers[0].fractions.tolist() == [0.5, 0.5, 0.0, 0.0]
    assert prune_for_task(ModSquadForImageClassification(config), "cls", restored).config.num_experts == [
        2,
        4,
    ]
    with pytest.raises(ValueError, match="experts per router"):
        ExpertUsage.from_fractions(config, "cls", [[1.0, 0.0]])
