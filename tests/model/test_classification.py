"""ModSquadForImageClassification: outputs, single- and multi-label losses, label validation, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from modsquad import ModSquadForImageClassification, ModSquadImageClassifierOutput

MULTI_LABEL = {
    "name": "tags",
    "type": "image-classification",
    "labels": ["red", "round", "small", "striped"],
    "problem_type": "multi_label_classification",
}


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def test_output_is_an_image_classifier_output_with_routing(tiny_config):
    config = tiny_config(z_loss_coef=0.1)
    model = ModSquadForImageClassification(config).eval()
    with torch.no_grad():
        out = model(_images(3), output_hidden_states=True, output_router_logits=True)
    assert isinstance(out, ModSquadImageClassifierOutput)
    assert out.loss is None
    assert out.logits.shape == (3, 3)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.router_logits) == len(out.router_probs) == len(out.expert_indices) == 2
    assert out.aux_loss.item() > 0
    with torch.no_grad():
        plain = model(_images(3))
    # By default (Transformers' MoE convention) only the predictions come back.
    assert list(plain.keys()) == ["logits"]


def test_single_label_loss_is_cross_entropy_plus_aux_loss(tiny_config):
    model = ModSquadForImageClassification(tiny_config(balance_loss_coef=0.5, z_loss_coef=0.1)).eval()
    images, labels = _images(), torch.tensor([0, 2, 1, 2])
    out = model(images, labels=labels, output_router_logits=True)
    expected = F.cross_entropy(out.logits, labels) + out.aux_loss
    assert out.aux_loss.item() > 0.5  # the balance loss alone is >= 1 * 0.5
    assert torch.allclose(out.loss, expected)
    # plain Python lists are accepted as labels too
    assert torch.allclose(model(images, labels=[0, 2, 1, 2], output_router_logits=True).loss, out.loss)
    # Without the routing outputs (the default) the loss is the task's alone, as for Mixtral's heads.
    assert torch.allclose(model(images, labels=labels).loss, F.cross_entropy(out.logits, labels))


def test_multi_label_loss_is_binary_cross_entropy_plus_aux_loss(tiny_config):
    model = ModSquadForImageClassification(tiny_config([MULTI_LABEL])).eval()
    assert model.config.problem_type == "multi_label_classification"
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]])
    out = model(_images(), labels=labels, output_router_logits=True)
    assert out.logits.shape == (4, 4)
    expected = F.binary_cross_entropy_with_logits(out.logits, labels.float()) + out.aux_loss
    assert torch.allclose(out.loss, expected)
    # soft (float) targets are valid for BCE
    soft = model(_images(), labels=labels.float() * 0.9)
    assert torch.isfinite(soft.loss)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([[0], [1], [2], [0]]), r"shape \(4,\)"),
        (torch.tensor([0, 1, 2]), r"shape \(4,\)"),
        (torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer class ids"),
        (torch.tensor([0, 1, 3, 0]), r"\[0, 3\).*\[0, 1, 3\]"),
        (torch.tensor([0, -1, 2, 0]), r"\[0, 3\)"),
    ],
)
def test_bad_single_label_labels_raise_value_error(labels, message, tiny_config):
    model = ModSquadForImageClassification(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(_images(), labels=labels)


@pytest.mark.parametrize("labels", [torch.tensor([0, 1, 2, 3]), torch.ones(4, 3), torch.ones(3, 4)])
def test_bad_multi_label_labels_raise_value_error(labels, tiny_config):
    model = ModSquadForImageClassification(tiny_config([MULTI_LABEL]))
    with pytest.raises(ValueError, match=r"multi-hot of shape \(4, 4\)"):
        model(_images(), labels=labels)


def test_head_serves_the_chosen_task_of_a_multi_task_config(tiny_config, all_tasks):
    tasks = [*all_tasks, MULTI_LABEL]
    with pytest.raises(ValueError, match=r"several image-classification tasks \['cls', 'tags'\].*task="):
        ModSquadForImageClassification(tiny_config(tasks))
    with pytest.raises(ValueError, match="'seg' is a semantic-segmentation task"):
        ModSquadForImageClassification(tiny_config(tasks), task="seg")

    model = ModSquadForImageClassification(tiny_config(tasks), task="tags")
    assert model.task == "tags"
    # pipelines read labels and problem type from the top-level config: they are the served task's
    assert model.config.id2label == {0: "red", 1: "round", 2: "small", 3: "striped"}
    assert model.config.problem_type == "multi_label_classification"
    assert model(_images(2)).logits.shape == (2, 4)
    with pytest.raises(ValueError, match="serves task 'tags'"):
        model(_images(2), task="cls")


def _pattern_dataset(per_class: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal stripes, vertical stripes and a checkerboard, with random phase, colour and noise."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    images, labels = [], []
    for label in range(3):
        for _ in range(per_class):
            phase = int(torch.randint(0, 4, (1,), generator=generator))
            horizontal, vertical = ((rows + phase) // 2) % 2, ((cols + phase) // 2) % 2
            pattern = (horizontal, vertical, (horizontal + vertical) % 2)[label].float()
            colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=generator)
            image = pattern * colour + 0.1 * torch.randn(3, 32, 32, generator=generator)
            images.append((image - 0.5) / 0.5)
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.slow
def test_tiny_model_learns_three_visual_classes(tiny_config):
    images, labels = _pattern_dataset()
    model = ModSquadForImageClassification(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            return (model(images).logits.argmax(-1) == labels).float().mean().item()

    first_loss = None
    for step in range(80):
        model.train()
        loss = model(images, labels=labels).loss
        first_loss = loss.item() if first_loss is None else first_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and accuracy() == 1.0:
            break
    assert first_loss == pytest.approx(math.log(3), abs=0.3)  # started from chance
    assert accuracy() >= 0.9


def test_a_checkpoint_gets_a_new_head_the_transformers_way(tmp_path, tiny_config):
    """`from_pretrained(path, id2label=..., ignore_mismatched_sizes=True)` relabels the single task: new classifier,
    every other weight loaded (multi-task checkpoints: tests/model/test_transformers_contract.py)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    ModSquadForImageClassification(tiny_config()).save_pretrained(tmp_path / "model")
    labels = ["ant", "bee", "fly", "moth", "wasp"]
    model = AutoModelForImageClassification.from_pretrained(
        tmp_path / "model",
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    original = ModSquadForImageClassification.from_pretrained(tmp_path / "model")
    task = model.config.tasks[0]
    assert task["id2label"] == dict(enumerate(labels)) and task["num_labels"] == 5
    assert model.config.id2label == dict(enumerate(labels))
    assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 5)
    new_state, old_state = model.state_dict(), original.state_dict()
    for name, tensor in old_state.items():
        if "classifier" not in name:
            assert torch.equal(new_state[name], tensor), name
    assert AutoConfig.from_pretrained(tmp_path / "model", num_labels=3).tasks[0]["num_labels"] == 3
