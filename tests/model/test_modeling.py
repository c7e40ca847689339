"""ModSquadModel (the backbone): outputs, task selection, position embeddings, attention backends, gradient
checkpointing, stochastic depth, initialisation and router behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from modsquad import ModSquadForImageClassification, ModSquadModel, RoutingStatistics
from modsquad.model.modeling_modsquad import NUM_PREFIX_TOKENS
from modsquad.model.moe import ModSquadTaskRouter


def _images(batch: int = 2, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, height, width)


def _randomise_routers(model: torch.nn.Module, std: float = 0.5) -> None:
    """Routers start small; give them strong opinions so that routing depends clearly on task and token."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModSquadTaskRouter):
                module.weight.normal_(0.0, std)


def _routers(model: torch.nn.Module) -> list[ModSquadTaskRouter]:
    return [m for m in model.modules() if isinstance(m, ModSquadTaskRouter)]


# ---------------------------------------------------------------------------------------------- output fields
@pytest.mark.parametrize("moe_attention", [False, True])
def test_output_fields_and_shapes(moe_attention, all_tasks, tiny_config):
    config = tiny_config(
        all_tasks,
        moe_attention=moe_attention,
        num_experts=[3, 4],
        attention_num_experts=[2, 5] if moe_attention else None,
        balance_loss_coef=0.5,
        output_router_logits=True,
    )
    model = ModSquadModel(config).eval()
    batch, tokens = 2, NUM_PREFIX_TOKENS + 16
    with torch.no_grad():
        out = model(_images(batch), task="seg", output_hidden_states=True)

    assert out.last_hidden_state.shape == (batch, tokens, 64)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert out.task_id == 1
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (batch, tokens, 64) for h in out.hidden_states)
    # the embeddings come first, and the final norm of the last block's output is last_hidden_state
    assert torch.allclose(model.layernorm(out.hidden_states[-1]), out.last_hidden_state)
    # embeddings: [CLS] then the task's own token, then the patches
    assert torch.equal(out.hidden_states[0][:, 1], model.embeddings.task_tokens[1].expand(batch, -1))

    # MoE blocks 1 and 3 with 3 and 4 MLP experts; with moe_attention, each block's attention router (2 and 5
    # experts) comes before its MLP router
    experts = [2, 3, 5, 4] if moe_attention else [3, 4]
    assert len(out.router_logits) == len(out.router_probs) == len(out.expert_indices) == len(experts)
    for logits, probs, indices, num_experts in zip(
        out.router_logits, out.router_probs, out.expert_indices, experts
    ):
        assert logits.shape == probs.shape == (batch * tokens, num_experts)
        assert torch.allclose(probs, torch.softmax(logits, dim=-1))
        assert indices.shape == (batch * tokens, 2)
        assert indices.min() >= 0 and indices.max() < num_experts
        assert (indices[:, 0] != indices[:, 1]).all()  # top-k picks distinct experts
    assert torch.allclose(out.aux_loss, 0.5 * out.balance_loss + config.z_loss_coef * out.z_loss)

    # without the flag no hidden states are kept; return_dict=False gives the same values as a tuple
    images = _images(batch)
    with torch.no_grad():
        plain = model(images, task="seg")
        as_tuple = model(images, task="seg", return_dict=False)
    assert plain.hidden_states is None
    assert torch.allclose(as_tuple[0], plain.last_hidden_state)


def test_model_without_moe_blocks_has_no_routing(tiny_config):
    model = ModSquadModel(tiny_config(moe_layers=[])).eval()
    out = model(_images(), output_router_logits=True)
    assert out.router_logits == () and out.aux_loss is None
    assert out.last_hidden_state.shape == (2, 18, 64)


# ------------------------------------------------------------------------------------------------------ tasks
def test_task_by_name_and_by_id_give_the_same_result(all_tasks, tiny_config):
    model = ModSquadModel(tiny_config(all_tasks, output_router_logits=True)).eval()
    _randomise_routers(model)
    images = _images()
    with torch.no_grad():
        for task_id, name in enumerate(config_names := model.config.task_names):
            by_name, by_id = model(images, task=name), model(images, task=task_id)
            assert torch.equal(by_name.last_hidden_state, by_id.last_hidden_state)
            assert all(torch.equal(a, b) for a, b in zip(by_name.expert_indices, by_id.expert_indices))
    assert config_names == ["cls", "seg", "det", "depth"]


@pytest.mark.parametrize("task", ["segmentation", 4, -1])
def test_unknown_task_raises_listing_the_tasks(task, all_tasks, tiny_config):
    model = ModSquadModel(tiny_config(all_tasks))
    with pytest.raises(ValueError, match=r"unknown task.*\['cls', 'seg', 'det', 'depth'\]"):
        model(_images(), task=task)


def test_tasks_differ_only_through_their_routers_and_task_tokens(all_tasks, tiny_config):
    model = ModSquadModel(tiny_config(all_tasks[:2], router_init_std=0.0, output_router_logits=True)).eval()
    images = _images()

    def outputs():
        with torch.no_grad():
            return model(images, task="cls"), model(images, task="seg")

    # same task token and same (zero) routers: the two tasks compute the same function
    with torch.no_grad():
        model.embeddings.task_tokens[1] = model.embeddings.task_tokens[0]
    cls_out, seg_out = outputs()
    assert torch.allclose(cls_out.last_hidden_state, seg_out.last_hidden_state)

    # a different router for "seg" changes its routing and its output
    router = _routers(model)[0]
    with torch.no_grad():
        router.weight[1].normal_(0.0, 1.0)
    cls_out, seg_out = outputs()
    assert not torch.equal(cls_out.expert_indices[0], seg_out.expert_indices[0])
    assert not torch.allclose(cls_out.last_hidden_state, seg_out.last_hidden_state, atol=1e-4)

    # routers equal again, but a different task token: the token alone changes the output
    with torch.no_grad():
        router.weight.zero_()
        model.embeddings.task_tokens[1].normal_(0.0, 1.0)
    cls_out, seg_out = outputs()
    assert not torch.allclose(cls_out.last_hidden_state, seg_out.last_hidden_state, atol=1e-4)


# ----------------------------------------------------------------------------------------- position embeddings
def test_native_size_uses_the_position_embeddings_unchanged(tiny_config):
    model = ModSquadModel(tiny_config(image_size=[48, 32])).eval()
    embeddings = model.embeddings
    assert embeddings.position_embeddings.shape == (1, 1 + 6 * 4, 64)
    assert embeddings.interpolate_pos_encoding(6, 4) is embeddings.position_embeddings

    images = _images(1, 48, 32)
    with torch.no_grad():
        hidden = embeddings(images, 0)
    patches = embeddings.patch_embeddings(images)
    assert torch.allclose(hidden[:, 2:], patches + embeddings.position_embeddings[:, 1:])
    assert torch.allclose(hidden[:, 0], (embeddings.cls_token + embeddings.position_embeddings[:, :1])[:, 0])


@pytest.mark.parametrize(("height", "width"), [(48, 32), (32, 48), (64, 64), (16, 24)])
def test_position_embeddings_interpolate_for_other_sizes(height, width, tiny_config):
    model = ModSquadModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(_images(2, height, width))
    grid_h, grid_w = height // 8, width // 8
    assert out.last_hidden_state.shape == (2, NUM_PREFIX_TOKENS + grid_h * grid_w, 64)
    assert torch.isfinite(out.last_hidden_state).all()


def test_interpolation_keeps_rows_and_columns_apart(tiny_config):
    """On a 48x32 image only the height grows: embeddings that vary along the width only must be kept as they are
    in every row, and the [CLS] embedding is never touched."""
    model = ModSquadModel(tiny_config())
    embeddings = model.embeddings
    column_code = torch.randn(4, 64)  # one embedding per column of the native 4x4 grid
    with torch.no_grad():
        embeddings.position_embeddings[0, 1:] = column_code.repeat(4, 1)
        pos = embeddings.interpolate_pos_encoding(6, 4)
    assert pos.shape == (1, 1 + 24, 64)
    assert torch.equal(pos[:, 0], embeddings.position_embeddings[:, 0])
    assert torch.allclose(pos[0, 1:].view(6, 4, 64), column_code.expand(6, 4, 64), atol=1e-5)
    # and the other way round: embeddings varying along the height only stay constant along each row
    with torch.no_grad():
        embeddings.position_embeddings[0, 1:] = column_code.repeat_interleave(4, dim=0)
        grid = embeddings.interpolate_pos_encoding(6, 4)[0, 1:].view(6, 4, 64)
    assert torch.allclose(grid, grid[:, :1].expand(6, 4, 64), atol=1e-5)
    assert not torch.allclose(grid[0], grid[-1])


# ------------------------------------------------------------------------------------------ attention backends
@pytest.mark.parametrize("moe_attention", [False, True])
def test_sdpa_and_eager_attention_agree(tmp_path, moe_attention, all_tasks, tiny_config):
    config = tiny_config(all_tasks[:2], moe_attention=moe_attention, output_router_logits=True)
    model = ModSquadModel(config)
    _randomise_routers(model)
    model.save_pretrained(tmp_path)
    sdpa = ModSquadModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    eager = ModSquadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    images = _images(3, 48, 32)
    with torch.no_grad():
        for task in ("cls", "seg"):
            a, b = sdpa(images, task=task), eager(images, task=task)
            assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-5)
            assert all(torch.equal(x, y) for x, y in zip(a.expert_indices, b.expert_indices))


# ---------------------------------------------------------------------------------------- gradient checkpointing
def _step_loss_and_grads(model, images, labels):
    """One multi-task step as the trainer runs it: classification loss + aux loss + the step's MI loss."""
    model.zero_grad()
    cls_out = model(images, labels=labels, output_router_logits=True)
    seg_out = model.modsquad(images, task="seg", output_router_logits=True)
    stats = RoutingStatistics(num_tasks=2)
    stats.update(0, cls_out.router_probs)
    stats.update(1, seg_out.router_probs)
    loss = cls_out.loss + stats.mutual_information_loss()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("moe_attention", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(moe_attention, all_tasks, tiny_config):
    config = tiny_config(all_tasks[:2], moe_attention=moe_attention, balance_loss_coef=0.1, z_loss_coef=0.1)
    model = ModSquadForImageClassification(config).train()
    _randomise_routers(model)
    checkpointed = copy.deepcopy(model)
    with pytest.warns(FutureWarning):  # Transformers renamed it activation_checkpointing_enable
        checkpointed.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in checkpointed.modsquad.layers)

    router_calls = []
    _routers(checkpointed)[0].register_forward_hook(lambda *args: router_calls.append(1))
    images, labels = _images(4), torch.tensor([0, 1, 2, 0])
    loss, grads = _step_loss_and_grads(model, images, labels)
    checkpointed_loss, checkpointed_grads = _step_loss_and_grads(checkpointed, images, labels)

    assert len(router_calls) == 4  # two forwards, each recomputed in the backward: checkpointing is active
    assert torch.allclose(loss, checkpointed_loss)
    assert grads.keys() == checkpointed_grads.keys()
    assert all(
        f"{r}.weight" in grads for r in ("modsquad.layers.1.mlp.router", "modsquad.layers.3.mlp.router")
    )
    for name, grad in grads.items():
        assert torch.allclose(grad, checkpointed_grads[name], atol=1e-6), name


def test_reentrant_checkpointing_is_refused(tiny_config):
    model = ModSquadForImageClassification(tiny_config())
    with pytest.raises(ValueError, match="use_reentrant=True"):
        model.activation_checkpointing_enable({"use_reentrant": True})


# ---------------------------------------------------------------------------------------------- stochastic depth
def test_drop_path_is_active_only_in_training(tiny_config):
    model = ModSquadModel(tiny_config(drop_path_rate=0.5))
    reference = ModSquadModel(tiny_config(drop_path_rate=0.0))
    reference.load_state_dict(model.state_dict())
    images = _images(8)

    model.eval()
    reference.eval()
    with torch.no_grad():
        first, second = model(images).last_hidden_state, model(images).last_hidden_state
        assert torch.equal(first, second)
        assert torch.allclose(first, reference(images).last_hidden_state, atol=1e-6)

        model.train()
        reference.train()
        dropped = model(images).last_hidden_state
        assert not torch.allclose(dropped, model(images).last_hidden_state)
        assert not torch.allclose(dropped, first)
        # with no drop path (and no dropout) training mode computes the eval function
        assert torch.allclose(reference(images).last_hidden_state, first, atol=1e-6)


# ------------------------------------------------------------------------------------------------ initialisation
def _assert_initialised(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if "norm" in name and name.endswith("weight"):
            assert torch.all(param == 1.0), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        else:
            # normal with initializer_range=0.02 (routers: router_init_std, the same by default); torch.empty garbage
            # would be far off
            assert param.abs().max() < 0.2, name
            assert 0.01 < param.std() < 0.03, name


def test_every_parameter_is_initialised_and_zero_routers_route_uniformly(tmp_path, all_tasks, tiny_config):
    config = tiny_config(all_tasks, moe_attention=True)
    _assert_initialised(ModSquadModel(config))
    _assert_initialised(AutoModel.from_config(config))

    # a checkpoint that holds only the patch embedding: every missing weight is initialised, not left empty
    ModSquadModel(config).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if k.startswith("embeddings.patch_embeddings")}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = ModSquadModel.from_pretrained(tmp_path)
    _assert_initialised(loaded)
    for key, value in kept.items():
        assert torch.equal(loaded.state_dict()[key], value)
    # routers started at zero give uniform routing probabilities for every task
    with torch.no_grad():
        probs = ModSquadModel(tiny_config(all_tasks, router_init_std=0.0))(
            _images(), task="depth", output_router_logits=True
        ).router_probs
    assert all(torch.allclose(p, torch.full_like(p, 0.25)) for p in probs)


# ------------------------------------------------------------------------------------------------- router noise
@pytest.mark.parametrize(
    "noise", [{"router_noise_std": 1.0}, {"router_jitter_noise": 0.5}], ids=["noise_std", "jitter"]
)
def test_router_noise_only_in_training(noise, tiny_config):
    model = ModSquadModel(tiny_config(**noise, output_router_logits=True))
    reference = ModSquadModel(tiny_config(output_router_logits=True))
    _randomise_routers(model, std=0.05)
    reference.load_state_dict(model.state_dict())
    images = _images(4)

    with torch.no_grad():
        model.eval()
        reference.eval()
        clean = reference(images)
        for out in (model(images), model(images)):
            assert torch.equal(out.last_hidden_state, clean.last_hidden_state)
            assert all(torch.equal(a, b) for a, b in zip(out.expert_indices, clean.expert_indices))

        model.train()
        first, second = model(images), model(images)
    changed = [not torch.equal(a, b) for a, b in zip(first.expert_indices, second.expert_indices)]
    assert any(changed), "noise should change the routing from call to call in training"
    if "router_noise_std" in noise:
        # noisy top-k: the noise picks the experts, but the probabilities stay those of the clean logits
        assert torch.allclose(first.router_probs[0], clean.router_probs[0], atol=1e-6)


def test_norm_topk_prob_on_and_off(tiny_config):
    hidden = torch.randn(10, 64)
    weights = {}
    for norm in (True, False):
        router = ModSquadTaskRouter(tiny_config(norm_topk_prob=norm), num_experts=4, top_k=2)
        with torch.no_grad():
            router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        routing = router(hidden, task_id=0)
        expected = routing.probs.gather(-1, routing.top_k_index)
        if norm:
            expected = expected / expected.sum(dim=-1, keepdim=True)
            assert torch.allclose(routing.top_k_weights.sum(-1), torch.ones(10))
        else:
            assert (routing.top_k_weights.sum(-1) < 1).all()
        assert torch.allclose(routing.top_k_weights, expected)
        assert torch.equal(routing.top_k_index, routing.probs.topk(2).indices)
        weights[norm] = routing.top_k_weights

    # the backbone follows the flag: uniform routers give 1/2 per expert normalised, 1/4 otherwise
    normed = ModSquadModel(tiny_config(norm_topk_prob=True, router_init_std=0.0)).eval()
    unnormed = ModSquadModel(tiny_config(norm_topk_prob=False, router_init_std=0.0)).eval()
    unnormed.load_state_dict(normed.state_dict())
    images = _images()
    with torch.no_grad():
        assert not torch.allclose(normed(images).last_hidden_state, unnormed(images).last_hidden_state)
