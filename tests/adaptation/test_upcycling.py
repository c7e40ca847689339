"""Sparse upcycling: ModSquad models built from small random dense ViT / DeiT / DINOv2 checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)

from modsquad import ModSquadForImageClassification, ModSquadForMultiTask, ModSquadModel

TOLERANCE = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(name="moe_options")
def moe_options_fixture(all_tasks) -> dict:
    """The MoE settings of the upcycled models: 4 experts, top-2, one classification task."""
    return dict(num_experts=4, num_experts_per_tok=2, tasks=[all_tasks[0]])


def dense_hidden_states(dense, sequence: torch.Tensor) -> list[torch.Tensor]:
    """The dense model's blocks run on a given token sequence: its embeddings, every block output, the final norm."""
    blocks = dense.encoder.layer if dense.config.model_type == "dinov2" else dense.layers
    states = [sequence]
    for block in blocks:
        states.append(block(states[-1]))
    return [*states, dense.layernorm(states[-1])]


def upcycled_hidden_states(model, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    output = model.base_model(pixel_values, output_hidden_states=True)
    return [*output.hidden_states, output.last_hidden_state]


@pytest.mark.parametrize("moe_layers", ["all", "every_other"])
def test_upcycled_model_reproduces_the_dense_blocks(tmp_path, make_dense, moe_layers, moe_options):
    dense = make_dense()
    dense.save_pretrained(tmp_path)
    model = ModSquadModel.from_dense(str(tmp_path), moe_layers=moe_layers, **moe_options)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = upcycled_hidden_states(model, pixel_values)
        dense_embeddings = dense.embeddings(pixel_values)
        # The embeddings are the dense ones with the task token inserted after [CLS]...
        assert torch.equal(torch.cat((ours[0][:, :1], ours[0][:, 2:]), dim=1), dense_embeddings)
        # ...and every block, fed that sequence, computes what the dense block does.
        reference = dense_hidden_states(dense, ours[0])
        routed = model(pixel_values, output_router_logits=True).expert_indices
    assert len(ours) == len(reference)
    for i, (a, b) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, i=i: f"hidden state {i}: {m}")
    # Random routers spread the tokens over the (identical) experts: the equality is not a one-expert accident.
    assert all(indices.unique().numel() == 4 for indices in routed)


def test_upcycled_deit_equals_the_dense_deit_end_to_end(moe_options, randomised, dense_shape):
    dense = randomised(DeiTModel(DeiTConfig(intermediate_size=128, **dense_shape)))
    model = ModSquadModel.from_dense(dense, moe_layers="all", **moe_options)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = dense(pixel_values, output_hidden_states=True)
        output = model(pixel_values, output_hidden_states=True)
    for a, b in zip(output.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)
    torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, **TOLERANCE)


def test_upcycled_attention_experts_copy_the_dense_attention(moe_options, dinov2):
    dense = dinov2()
    model = ModSquadModel.from_dense(dense, moe_layers=[1, 3], moe_attention=True, **moe_options)
    assert model.config.attention_expert_heads == 4
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = upcycled_hidden_states(model, pixel_values)
        reference = dense_hidden_states(dense, ours[0])
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)


def test_head_models_upcycle_from_a_dense_head_model_and_round_trip(
    tmp_path, all_tasks, randomised, dense_shape
):
    dense = randomised(
        ViTForImageClassification(ViTConfig(intermediate_size=128, num_labels=7, **dense_shape))
    )
    tasks = [all_tasks[0], all_tasks[3]]
    model = ModSquadForImageClassification.from_dense(
        dense, tasks=tasks, num_experts=4, num_experts_per_tok=2
    )
    config = model.config
    assert (config.expert_intermediate_size, config.intermediate_size, config.layer_norm_eps) == (
        128,
        128,
        1e-12,
    )
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = upcycled_hidden_states(model, pixel_values)
        reference = dense_hidden_states(dense.vit, ours[0])
        logits = model(pixel_values).logits
    torch.testing.assert_close(ours[-1], reference[-1], **TOLERANCE)

    model.save_pretrained(tmp_path)
    loaded = ModSquadForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values).logits, logits)
    assert isinstance(ModSquadForMultiTask.from_pretrained(tmp_path), ModSquadForMultiTask)


def test_from_dense_rejects_what_it_cannot_copy(moe_options, vit, dense_shape):
    with pytest.raises(ValueError, match="takes \\['hidden_size'\\] from the dense checkpoint"):
        ModSquadModel.from_dense(vit(), hidden_size=32, **moe_options)
    with pytest.raises(ValueError, match="attention_expert_heads=2"):
        ModSquadModel.from_dense(vit(), moe_attention=True, attention_expert_heads=2, **moe_options)
    swiglu = Dinov2Model(Dinov2Config(use_swiglu_ffn=True, **dense_shape))
    with pytest.raises(ValueError, match="SwiGLU"):
        ModSquadModel.from_dense(swiglu, **moe_options)
    with pytest.raises(ValueError, match="accepted dense model types"):
        ModSquadModel.from_dense(ModSquadModel.from_dense(vit(), **moe_options), **moe_options)
    with pytest.raises(ValueError, match="router_init_std must be >= 0"):
        ModSquadModel.from_dense(vit(), router_init_std=-1.0, **moe_options)
