"""The reference implementation's variants, as config: task embedding added before every block, one-head attention
experts over a shared key/value head, attention and MLP experts interleaved, wider heads; random router init. Each
variant must still prune exactly, grow by a task without touching the old ones, and upcycle where it can."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTModel

from modsquad import (
    ModSquadConfig,
    ModSquadForMultiTask,
    ModSquadModel,
    collect_expert_usage,
    compare_pruned_outputs,
    prune_for_task,
)
from modsquad.adaptation.continual import add_task
from modsquad.pruning.usage import router_layout

TWO_TASKS = [
    {"name": "cls", "type": "image-classification", "num_labels": 3},
    {"name": "seg", "type": "semantic-segmentation", "num_labels": 2, "decoder_channels": 16},
]
# The reference's Mod-Squad layout on a tiny ViT: task embedding, MoA attention experts in even blocks (one head of
# twice the usual width each, one shared key/value head), MLP experts in odd blocks.
REFERENCE = dict(
    task_conditioning="embedding",
    moe_attention=True,
    moe_layers="every_other",
    attention_moe_layers="even",
    attention_num_experts=6,
    head_dim=32,
)


def images(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_vit_s_defaults_with_attention_experts_construct_as_the_reference_moa():
    config = ModSquadConfig(moe_attention=True)  # ViT-S: 6 heads, top-4 MLP experts
    assert (config.attention_expert_heads, config.attention_experts_per_tok) == (1, 6)
    assert config.attention_num_experts == 16
    model = ModSquadModel(ModSquadConfig(moe_attention=True, num_hidden_layers=2, image_size=32))
    attention = model.layers[1].attention
    # one head per expert: each expert's query is one head; keys and values are a single head shared by all
    assert attention.q_proj.shape == (16, 64, 384)
    assert attention.k_proj.out_features == attention.v_proj.out_features == 64
    out = model(images(), task=0, output_router_logits=True)
    assert [r.shape for r in out.expert_indices] == [(2 * 6, 6), (2 * 6, 4)]  # 2 images x (2 + 4) tokens
    # Giving one of the two derives the other so that a dense block's head count stays active; a non-divisor errors.
    assert ModSquadConfig(moe_attention=True, attention_experts_per_tok=3).attention_expert_heads == 2
    assert ModSquadConfig(moe_attention=True, attention_expert_heads=3).attention_experts_per_tok == 2
    with pytest.raises(
        ValueError, match="num_attention_heads=6 is not divisible by attention_experts_per_tok=4"
    ):
        ModSquadConfig(moe_attention=True, attention_experts_per_tok=4)


def test_interleaved_attention_and_mlp_experts(tiny_config):
    config = tiny_config(TWO_TASKS, **REFERENCE)
    assert (config.moe_layer_indices, config.attention_moe_layer_indices) == ([1, 3], [0, 2])
    model = ModSquadModel(config)
    kinds = [(type(b.attention).__name__, type(b.mlp).__name__) for b in model.layers]
    assert (
        kinds
        == [
            ("ModSquadAttentionExperts", "ModSquadMLP"),
            ("ModSquadSelfAttention", "ModSquadSparseMLP"),
        ]
        * 2
    )
    assert [(s.block, s.kind) for s in router_layout(config)] == [
        (0, "attention"),
        (1, "mlp"),
        (2, "attention"),
        (3, "mlp"),
    ]
    out = model(images(), task="seg", output_router_logits=True)
    assert [p.shape[-1] for p in out.router_probs] == [6, 4, 6, 4]
    # the reference's wider heads: 4 heads of 32 on a 64-wide model, in dense and expert attention alike
    assert model.layers[1].attention.q_proj.out_features == 128
    assert model.layers[0].attention.q_proj.shape == (
        6,
        2 * 32,
        64,
    )  # 2 heads per expert (tiny_config's top-2)
    with pytest.raises(ValueError, match="attention_moe_layers='odd'"):
        tiny_config(TWO_TASKS, moe_attention=True, attention_moe_layers="odd")
    with pytest.raises(ValueError, match="attention_moe_layers set but moe_attention=False"):
        tiny_config(TWO_TASKS, attention_moe_layers="even")
    with pytest.raises(ValueError, match="attention_num_experts has 1 entries but there are 2 MoE attention"):
        tiny_config(TWO_TASKS, moe_attention=True, attention_moe_layers="even", attention_num_experts=[4])


def test_task_embedding_is_added_to_every_token_before_every_block(tiny_config):
    config = tiny_config(TWO_TASKS, task_conditioning="embedding")
    assert config.num_prefix_tokens == 1
    model = ModSquadModel(config).eval()
    x = images()
    with torch.no_grad():
        out = model(x, task="seg", output_hidden_states=True)
        assert out.last_hidden_state.shape == (2, 1 + 16, 64)  # [CLS] and the patches, no task token
        embedding = model.embeddings.task_tokens[1]
        hidden = out.hidden_states[0]
        for block, expected in zip(model.layers, out.hidden_states[1:]):
            hidden = block(hidden + embedding, 1)
            assert torch.allclose(hidden, expected, atol=1e-6)
        # each task computes with its own embedding: give seg another one and only seg changes
        cls_before = model(x, task="cls").last_hidden_state
        model.embeddings.task_tokens[1].normal_()
        assert torch.equal(model(x, task="cls").last_hidden_state, cls_before)
        assert not torch.allclose(model(x, task="seg").last_hidden_state, out.last_hidden_state, atol=1e-4)
    with pytest.raises(ValueError, match=r"task_conditioning='prompt'; accepted: \['token', 'embedding'\]"):
        tiny_config(TWO_TASKS, task_conditioning="prompt")


def test_routers_start_random_so_tokens_spread_over_experts(tiny_config):
    model = ModSquadModel(tiny_config(TWO_TASKS)).eval()
    with torch.no_grad():
        out = model(images(4), task="cls", output_router_logits=True)
    # at initialisation tokens already use every expert, each task in its own way
    assert all(torch.unique(indices).numel() == 4 for indices in out.expert_indices)
    zero = ModSquadModel(tiny_config(TWO_TASKS, router_init_std=0.0)).eval()
    with torch.no_grad():
        tied = zero(images(4), task="cls", output_router_logits=True)
    assert all(
        torch.unique(indices).numel() == 2 for indices in tied.expert_indices
    )  # everyone on the same 2
    with pytest.raises(ValueError, match=r"router_init_std must be a finite number >= 0 or null, got -0.1"):
        tiny_config(TWO_TASKS, router_init_std=-0.1)


def test_reference_variant_prunes_exactly_and_grows_by_a_task(tiny_config, specialise):
    model = specialise(
        ModSquadForMultiTask(tiny_config(TWO_TASKS, **REFERENCE))
    )  # tasks on their own experts
    data = [images(4, seed) for seed in range(2)]
    usage = collect_expert_usage(model, data, "seg")
    pruned = prune_for_task(model, "seg", usage)
    assert sum(pruned.config.attention_experts_per_layer) < 12 and sum(pruned.config.experts_per_layer) < 8
    assert pruned.config.task_conditioning == "embedding"
    report = compare_pruned_outputs(model, pruned, data)
    assert report["max_abs_diff"] < 1e-5 and report["routing_agreement"] == 1.0

    x = images(2, 7)
    with torch.no_grad():
        before = model(x, task="cls").logits
    add_task(model, {"name": "extra", "type": "image-classification", "num_labels": 2}, new_experts=1)
    assert model.config.attention_experts_per_layer == [7, 7] and model.config.experts_per_layer == [5, 5]
    with torch.no_grad():
        assert torch.equal(model(x, task="cls").logits, before)
        assert model(x, task="extra").logits.shape == (2, 2)


def vit(**overrides) -> ViTModel:
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, **overrides,
    )  # fmt: skip
    return ViTModel(config, add_pooling_layer=False).eval()


def test_upcycled_vit_in_the_reference_layout_equals_the_dense_vit():
    # Task embedding (starts at zero: no extra token), attention experts in even blocks, MLP experts in odd ones.
    dense = vit()
    model = ModSquadModel.from_dense(
        dense, task_conditioning="embedding", num_experts=4, num_experts_per_tok=2, moe_layers="every_other",
        moe_attention=True, attention_moe_layers="even", attention_num_experts=3,
    )  # fmt: skip
    assert [type(b.attention).__name__ for b in model.layers] == [
        "ModSquadAttentionExperts",
        "ModSquadSelfAttention",
    ]
    # an upcycled attention expert copies the whole dense attention, so one per token keeps the dense width
    assert (model.config.attention_expert_heads, model.config.attention_experts_per_tok) == (4, 1)
    x = images()
    with torch.no_grad():
        expected = dense(x).last_hidden_state
        got = model(x, task=0).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        ModSquadModel.from_dense(dense, head_dim=32, num_experts=4, num_experts_per_tok=2)
