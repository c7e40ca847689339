"""PEFT LoRA adapters on ModSquad models: targets, training, save / load / merge round trips."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils import ModulesToSaveWrapper

from modsquad import (
    ModSquadForDepthEstimation,
    ModSquadForImageClassification,
    ModSquadForMultiTask,
    ModSquadForObjectDetection,
    ModSquadForSemanticSegmentation,
)
from modsquad.adaptation.lora import lora_config_for
from modsquad.pruning.prune import prune_for_task
from modsquad.pruning.usage import collect_expert_usage

PETS = {"name": "pets", "type": "image-classification", "labels": ["cat", "dog", "fish"]}


@pytest.fixture(name="pruned_model")
def pruned_model_fixture(tiny_config, all_tasks):
    """The factory `pruned_model(moe_attention=False)`: a task model cut out of a two-task model by
    `prune_for_task`: one task, fewer experts in each MoE block."""

    def pruned_model(moe_attention: bool = False) -> ModSquadForImageClassification:
        extra = dict(moe_attention=True) if moe_attention else {}
        parent = ModSquadForMultiTask(tiny_config(tasks=[all_tasks[0], PETS], num_experts=6, **extra)).eval()
        with torch.no_grad():
            for name, parameter in parent.named_parameters():
                if "router" in name:
                    parameter.normal_(0.0, 1.0)
        usage = collect_expert_usage(parent, [torch.randn(4, 3, 32, 32)], task="pets")
        model = prune_for_task(parent, "pets", usage, threshold=0.16)
        assert sum(model.config.experts_per_layer) < 12  # something was cut
        return model.eval()

    return pruned_model


MODELS = [
    "classification",
    "segmentation",
    "detection",
    "depth",
    "multitask",
    "pruned",
    "pruned-attention-experts",
]


@pytest.fixture(name="make_model")
def make_model_fixture(request, tiny_config, all_tasks, pruned_model):
    """The model factory of the `MODELS` entry the test is parametrised with (indirectly)."""
    cls, seg, det, depth = all_tasks
    return {
        "classification": lambda: ModSquadForImageClassification(tiny_config()),
        "segmentation": lambda: ModSquadForSemanticSegmentation(tiny_config(tasks=[seg])),
        "detection": lambda: ModSquadForObjectDetection(tiny_config(tasks=[det])),
        "depth": lambda: ModSquadForDepthEstimation(tiny_config(tasks=[depth])),
        "multitask": lambda: ModSquadForMultiTask(tiny_config(tasks=[cls, depth])),
        "pruned": pruned_model,
        "pruned-attention-experts": lambda: pruned_model(moe_attention=True),
    }[request.param]


def first_output(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.predicted_depth


def pets_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by which colour channel is bright."""
    labels = torch.arange(6) % 3
    pixel_values = torch.randn(6, 3, 32, 32) * 0.1
    pixel_values[torch.arange(6), labels] += 1.0
    return pixel_values, labels


def base_parameters(peft_model) -> dict[str, torch.Tensor]:
    """The base model's own parameters inside a PEFT model, under their original names."""
    base = {}
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.removeprefix("base_model.model.")
        name = name.replace(".base_layer", "").replace(".original_module", "")
        base[name] = parameter.detach().clone()
    return base


@pytest.mark.parametrize("make_model", MODELS, indirect=True)
def test_lora_reaches_attention_experts_and_head_of_every_model(make_model):
    model = make_model().eval()
    pixel_values = torch.randn(1, 3, 32, 32)
    task = {"task": "cls"} if isinstance(model, ModSquadForMultiTask) else {}
    with torch.no_grad():
        expected = first_output(model(pixel_values, **task))
    config = lora_config_for(model, task=task.get("task"))
    peft_model = get_peft_model(model, config)

    adapted = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    for block in (1, 3):  # the MoE blocks of the tiny config
        assert any(f"layers.{block}.mlp.experts" in name for name in adapted)
        assert any(f"layers.{block}.attention" in name for name in adapted)
    assert any("layers.0.attention.q_proj" in name for name in adapted)
    wrapped_heads = [name for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(wrapped_heads) == 1 and wrapped_heads[0].endswith(
        f"heads.{task.get('task', model.config.tasks[0]['name'])}"
    )
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)

    # LoRA starts as a no-op; one backward reaches every expert tensor's update.
    output = peft_model(pixel_values, **task)
    assert torch.equal(first_output(output), expected)
    first_output(output).float().square().mean().backward()
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name and "experts" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")
def test_adapter_training_lowers_the_loss_and_never_touches_the_base(tmp_path, pruned_model):
    model = pruned_model()
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, lora_config_for(model, r=4, alpha=8, expert_r=2))
    base_before = base_parameters(peft_model)
    pixel_values, labels = pets_batch()
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2, weight_decay=0.05)
    peft_model.train()
    losses = []
    for _ in range(10):
        loss = peft_model(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    peft_model.eval()

    assert losses[-1] < 0.5 * losses[0]
    base_after = base_parameters(peft_model)
    assert base_after.keys() == base_before.keys()
    assert all(torch.equal(base_after[name], tensor) for name, tensor in base_before.items())
    with torch.no_grad():
        tuned = peft_model(pixel_values).logits
        with peft_model.disable_adapter():
            untuned = peft_model(pixel_values).logits
    reloaded_base = ModSquadForImageClassification.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert torch.equal(reloaded_base(pixel_values).logits, untuned)

    # save -> PeftModel.from_pretrained: identical outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, tuned)

    # merge -> a plain ModSquad checkpoint with the same outputs (merging rounds once per weight)
    merged = loaded.merge_and_unload()
    assert isinstance(merged, ModSquadForImageClassification)
    with torch.no_grad():
        merged_logits = merged(pixel_values).logits
    torch.testing.assert_close(merged_logits, tuned, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = ModSquadForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, merged_logits)


def test_adapter_gives_the_same_outputs_under_every_experts_implementation(pruned_model):
    model = pruned_model()
    peft_model = get_peft_model(model, lora_config_for(model)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    pixel_values = torch.randn(2, 3, 32, 32)
    outputs = {}
    for implementation in ("eager", "grouped_mm", "sorted_mm"):
        peft_model.get_base_model().set_experts_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = peft_model(pixel_values).logits
    for logits in outputs.values():
        torch.testing.assert_close(logits, outputs["sorted_mm"], atol=1e-5, rtol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        assert not torch.allclose(peft_model(pixel_values).logits, outputs["sorted_mm"])


# PEFT 0.21 checks rank_pattern keys against the targeted modules only, so expert-tensor keys draw a false warning;
# the lora_A shape below shows that the rank is applied.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")
def test_lora_config_names_and_options(all_tasks, tiny_config, pruned_model):
    model = pruned_model(moe_attention=True)
    config = lora_config_for(model, r=4, expert_r=2, train_head=False)
    assert config.modules_to_save is None
    assert "modsquad.layers.1.attention.q_proj" in config.target_parameters
    assert "modsquad.layers.1.attention.k_proj" in config.target_modules
    assert "modsquad.layers.0.attention.q_proj" in config.target_modules
    assert "modsquad.layers.3.mlp.experts.down_proj" in config.target_parameters
    assert not any(name.endswith("_bias") for name in config.target_parameters)
    peft_model = get_peft_model(model, config)
    wrappers = {
        module.parameter_name: module
        for name, module in peft_model.named_modules()
        if "layers.3.mlp.experts" in name and isinstance(module, ParamWrapper)
    }
    block_experts = model.config.experts_per_layer[1]
    # One rank-2 update per expert: lora_A maps the input to 2 rows per expert.
    assert wrappers["up_proj"].lora_A["default"].weight.shape == (2 * block_experts, 64)
    assert wrappers["down_proj"].lora_A["default"].weight.shape == (2 * block_experts, 32)

    attention_only = lora_config_for(pruned_model(moe_attention=True), target_experts=False)
    assert attention_only.target_parameters == [n for n in config.target_parameters if ".attention." in n]
    experts_only = lora_config_for(pruned_model(), target_attention=False)
    assert experts_only.target_modules is None and len(experts_only.target_parameters) == 4

    multitask = ModSquadForMultiTask(tiny_config(tasks=[all_tasks[0], PETS]))
    assert lora_config_for(multitask).modules_to_save == ["heads.cls", "heads.pets"]
    assert lora_config_for(multitask, task="pets").modules_to_save == ["heads.pets"]


def test_lora_config_rejects_bad_requests(pruned_model):
    model = pruned_model()
    with pytest.raises(ValueError, match=r"lora_dropout=0\.1 cannot apply to expert tensors"):
        lora_config_for(model, lora_dropout=0.1)
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora_config_for(model, target_experts=False, target_attention=False)
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora_config_for(model, r=0)
    with pytest.raises(ValueError, match=r"no head for task\(s\) \['seg'\]"):
        lora_config_for(model, task="seg")
