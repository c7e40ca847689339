"""Continual learning: add_task grows a trained model by a task without changing its old tasks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForImageClassification

from modsquad import ModSquadForImageClassification, ModSquadForMultiTask, ModSquadModel
from modsquad.adaptation.continual import add_task, merge_added_task
from modsquad.pruning.prune import prune_for_task
from modsquad.pruning.usage import collect_expert_usage

NEW_TASK = {"name": "shapes", "type": "image-classification", "labels": ["a", "b", "c", "d"]}
OLD_TASKS = ["cls", "tags"]


@pytest.fixture(name="trained_model")
def trained_model_fixture(tiny_config, all_tasks):
    """The factory `trained_model(**overrides)`: a two-task model (tasks `OLD_TASKS`) whose routers are no longer at
    their (all-tied) zero initialisation."""
    # Two old tasks with light heads: what must not change is the shared backbone.
    old_task_entries = [all_tasks[0], {"name": "tags", "type": "image-classification", "num_labels": 5}]

    def trained_model(**overrides) -> ModSquadForMultiTask:
        model = ModSquadForMultiTask(tiny_config(tasks=old_task_entries, **overrides)).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "router" in name:
                    parameter.normal_(0.0, 1.0)
        return model

    return trained_model


def old_outputs(model, pixel_values) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per old task, its logits and every block's output."""
    with torch.no_grad():
        outputs = {task: model(pixel_values, task=task, output_hidden_states=True) for task in OLD_TASKS}
    return {task: (output.logits, *output.hidden_states) for task, output in outputs.items()}


def assert_identical(outputs, reference) -> None:
    assert outputs.keys() == reference.keys()
    for task, tensors in outputs.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, reference[task], strict=True)), task


def new_task_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label is the quadrant holding a bright square."""
    pixel_values = torch.randn(8, 3, 32, 32) * 0.1
    labels = torch.arange(8) % 4
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        pixel_values[i, :, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16] += 1.0
    return pixel_values, labels


def train_new_task(model, steps: int = 8) -> list[float]:
    # Every parameter goes to the optimizer, frozen ones included, with weight decay: the hard case.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pixel_values, labels = new_task_batch()
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(pixel_values, task=NEW_TASK["name"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("moe_attention", [False, True], ids=["mlp-experts", "attention-experts"])
def test_training_a_new_task_leaves_old_tasks_bit_identical(moe_attention, trained_model):
    model = trained_model(moe_attention=moe_attention)
    pixel_values = torch.randn(2, 3, 32, 32)
    before = old_outputs(model, pixel_values)
    old_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    add_task(model, NEW_TASK, new_experts=2)
    grown = old_outputs(model.eval(), pixel_values)
    losses = train_new_task(model)
    after = old_outputs(model.eval(), pixel_values)

    assert losses[-1] < 0.7 * losses[0]
    assert_identical(grown, before)
    assert_identical(after, grown)
    # Every old value is still there, bit for bit, at the front of its (grown) tensor.
    state = model.state_dict()
    for name, old in old_state.items():
        index = tuple(slice(0, size) for size in old.shape)
        assert torch.equal(state[name][index], old), name
    assert not torch.equal(state["modsquad.layers.1.mlp.experts.up_proj"][4:], torch.zeros(2, 32, 64))


def test_old_tasks_never_route_to_new_experts_and_the_new_task_does(trained_model):
    model = trained_model()
    add_task(model, NEW_TASK, new_experts=3)
    pixel_values = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for task in OLD_TASKS:
            output = model(pixel_values, task=task, output_router_logits=True)
            assert all(indices.max() < 4 for indices in output.expert_indices)
            assert all(probs.shape[-1] == 7 and not probs[:, 4:].any() for probs in output.router_probs)
        new = model(pixel_values, task=NEW_TASK["name"], output_router_logits=True)
    assert any((indices >= 4).any() for indices in new.expert_indices)
    assert model.config.experts_per_layer == [7, 7]
    assert [t.get("routable_experts") for t in model.config.tasks] == [4, 4, None]


def test_only_the_new_rows_experts_token_and_head_train(trained_model):
    model = trained_model()
    add_task(model, NEW_TASK, new_experts=2)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert all(".rows" in name or name.startswith("heads.shapes.") for name in trainable)
    assert "modsquad.embeddings.parametrizations.task_tokens.0.rows" in trainable
    assert "modsquad.layers.1.mlp.router.parametrizations.weight.0.rows" in trainable
    assert "modsquad.layers.3.mlp.experts.parametrizations.down_proj.0.rows" in trainable
    assert not any(name.startswith(("heads.cls.", "heads.seg.")) for name in trainable)


def test_grown_model_saves_and_loads_like_any_other(tmp_path, trained_model):
    model = trained_model()
    add_task(model, NEW_TASK, new_experts=2)
    train_new_task(model, steps=2)
    model.eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = {task: model(pixel_values, task=task).logits for task in [*OLD_TASKS, "shapes"]}
    model.save_pretrained(tmp_path)

    loaded = ModSquadForMultiTask.from_pretrained(tmp_path).eval()
    assert loaded.config.num_experts == 6
    assert not any("parametrizations" in name for name in loaded.state_dict())
    with torch.no_grad():
        for task, logits in expected.items():
            assert torch.equal(loaded(pixel_values, task=task).logits, logits)

    single = AutoModelForImageClassification.from_pretrained(tmp_path, task="shapes").eval()
    assert isinstance(single, ModSquadForImageClassification)
    with torch.no_grad():
        assert torch.equal(single(pixel_values).logits, expected["shapes"])
    assert isinstance(AutoModel.from_pretrained(tmp_path), ModSquadModel)


def test_grown_model_resumes_from_a_grown_state_dict(trained_model):
    # What resuming a new-task run does: a freshly grown model loads the state dict of one that trained a while.
    model = trained_model()
    add_task(model, NEW_TASK, new_experts=2)
    train_new_task(model, steps=1)
    resumed = trained_model()
    add_task(resumed, NEW_TASK, new_experts=2)
    resumed.load_state_dict(model.state_dict())
    state = resumed.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_merge_and_grow_again(trained_model):
    model = trained_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    before = old_outputs(model, pixel_values)
    add_task(model, NEW_TASK, new_experts=2)
    with torch.no_grad():
        shapes_logits = model(pixel_values, task="shapes").logits
    merge_added_task(model)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())

    add_task(model, {"name": "more", "type": "image-classification", "num_labels": 2}, new_experts=1)
    assert model.config.num_experts == 7
    assert [t.get("routable_experts") for t in model.config.tasks] == [4, 4, 6, None]
    with torch.no_grad():
        assert torch.equal(model(pixel_values, task="shapes").logits, shapes_logits)
        assert model(pixel_values, task="more").logits.shape == (2, 2)
    assert_identical(old_outputs(model, pixel_values), before)


def test_backbone_alone_and_zero_new_experts(tiny_config):
    backbone = ModSquadModel(tiny_config()).eval()
    add_task(backbone, NEW_TASK, new_experts=0)
    assert backbone.config.num_experts == 4
    assert "routable_experts" not in backbone.config.tasks[0]
    assert backbone(torch.randn(1, 3, 32, 32), task="shapes").last_hidden_state.shape == (1, 18, 64)


def test_bad_arguments_are_rejected(tiny_config, trained_model):
    with pytest.raises(ValueError, match=r"ModSquadForMultiTask\.from_pretrained"):
        add_task(ModSquadForImageClassification(tiny_config()), NEW_TASK)
    model = trained_model()
    with pytest.raises(ValueError, match="duplicate names"):
        add_task(model, {"name": "cls", "type": "image-classification", "num_labels": 2})
    with pytest.raises(ValueError, match="new_experts must be a non-negative int"):
        add_task(model, NEW_TASK, new_experts=-1)
    with pytest.raises(ValueError, match="moe_attention=False"):
        add_task(model, NEW_TASK, new_attention_experts=2)
    # A rejected call leaves the model untouched.
    assert model.config.task_names == OLD_TASKS
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_routable_experts_is_validated_and_survives_a_config_round_trip(all_tasks, tiny_config):
    tasks = [{**all_tasks[0], "routable_experts": [3, 4]}, NEW_TASK]
    config = tiny_config(tasks=tasks, num_experts=[5, 4])
    assert config.routable_experts_per_layer == [[3, 5], [4, 4]]
    assert type(config).from_dict(config.to_dict()).routable_experts_per_layer == [[3, 5], [4, 4]]
    with pytest.raises(ValueError, match=r"routable_experts=\[3, 5\] must lie between"):
        tiny_config(tasks=[{**all_tasks[0], "routable_experts": [3, 5]}], num_experts=[5, 4])
    with pytest.raises(ValueError, match="must lie between the experts per token"):
        tiny_config(tasks=[{**all_tasks[0], "routable_experts": 1}])
    with pytest.raises(ValueError, match="has no such experts"):
        tiny_config(tasks=[{**all_tasks[0], "routable_attention_experts": 2}])


def test_pruned_models_grow_and_grown_models_prune(tmp_path, trained_model):
    calibration = [torch.randn(4, 3, 32, 32)]
    model = trained_model()
    pruned = prune_for_task(model, "cls", collect_expert_usage(model, calibration, task="cls"))
    pruned.save_pretrained(tmp_path)
    grown = ModSquadForMultiTask.from_pretrained(tmp_path).eval()
    pixel_values = calibration[0]
    with torch.no_grad():
        before = grown(pixel_values, task="cls").logits
    add_task(grown, NEW_TASK, new_experts=2)
    assert grown.config.pruned_experts is None and grown.config.pruned_from is None
    with torch.no_grad():
        assert torch.equal(grown(pixel_values, task="cls").logits, before)

    # Pruning the grown model again, for the new task and for the old one, gives the same outputs.
    for task in ("shapes", "cls"):
        usage = collect_expert_usage(grown, calibration, task=task)
        task_model = prune_for_task(grown, task, usage).eval()
        with torch.no_grad():
            expected = grown(pixel_values, task=task).logits
            torch.testing.assert_close(task_model(pixel_values).logits, expected, atol=1e-5, rtol=1e-5)
