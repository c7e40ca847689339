"""ModSquadConfig: validation errors, MoE layer selection, serialisation, top-level labels."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from modsquad import ModSquadConfig


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # (field, bad value, what is accepted) must all be in the message
        ({"num_experts_per_tok": 5}, ["num_experts_per_tok=5", "num_experts=4", "at most"]),
        ({"num_experts": [4, 1]}, ["num_experts_per_tok=2", "[4, 1]", "at most"]),
        (
            {"tasks": [{"name": "cap", "type": "image-captioning"}]},
            ["image-captioning", "semantic-segmentation"],
        ),
        ({"tasks": [{"name": "my-task", "type": "depth-estimation"}]}, ["'my-task'", "identifier"]),
        ({"tasks": []}, ["tasks", "non-empty list"]),
        ({"tasks": "cls"}, ["tasks", "'cls'"]),
        ({"tasks": ["cls"]}, ["tasks[0]", "dict"]),
        (
            {"hidden_size": 60, "num_attention_heads": 7},
            ["hidden_size=60", "num_attention_heads=7", "divide 60"],
        ),
        ({"hidden_size": 0}, ["hidden_size", "positive int", "0"]),
        ({"num_experts_per_tok": 2.0}, ["num_experts_per_tok", "positive int", "2.0"]),
        ({"image_size": 36}, ["image_size=36", "patch_size=8", "multiple"]),
        ({"image_size": [48, 36]}, ["image_size=[48, 36]", "patch_size=8"]),
        ({"image_size": [48]}, ["image_size", "[48]", "[height, width]"]),
        ({"image_size": 0}, ["image_size", "positive int", "0"]),
        ({"image_size": [-8, 32]}, ["image_size", "[-8, 32]", "positive int"]),
        ({"moe_layers": "odd"}, ["moe_layers='odd'", "'all'", "'every_other'", "list of block indices"]),
        ({"moe_layers": [1, 1]}, ["moe_layers=[1, 1]", "distinct", "0..3"]),
        ({"moe_layers": [4]}, ["moe_layers=[4]", "0..3"]),
        ({"moe_layers": [-1]}, ["moe_layers=[-1]", "0..3"]),
        ({"num_experts": [4, 4, 4]}, ["num_experts", "3 entries", "2 MoE blocks"]),
        ({"num_experts": [4, 0]}, ["num_experts", "positive int", "[4, 0]"]),
        (
            {"moe_attention": True, "attention_num_experts": [4]},
            ["attention_num_experts", "1 entries", "2 MoE"],
        ),
        ({"moe_attention": True, "attention_experts_per_tok": 5}, ["attention_experts_per_tok=5", "exceeds"]),
        (
            {"moe_attention": True, "attention_experts_per_tok": 0},
            ["attention_experts_per_tok", "positive int"],
        ),
        (
            {"moe_attention": True, "attention_experts_per_tok": 3},
            ["num_attention_heads=4", "attention_expert_heads"],
        ),
        (
            {"moe_attention": True, "attention_expert_heads": -1},
            ["attention_expert_heads", "positive int", "-1"],
        ),
        ({"hidden_act": "swishy"}, ["hidden_act='swishy'", "gelu"]),
        ({"drop_path_rate": 1.0}, ["drop_path_rate", "[0, 1)", "1.0"]),
        ({"mi_loss_coef": -1.0}, ["mi_loss_coef", ">= 0", "-1.0"]),
        ({"feature_layers": [4]}, ["feature_layers=[4]", "0..3"]),
    ],
)
def test_invalid_config_raises_value_error_naming_field_value_and_accepted(overrides, expected, tiny_config):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (
            {"name": "c", "type": "image-classification", "labels": ["a", "b"], "num_labels": 3},
            ["num_labels=3", "2 labels"],
        ),
        ({"name": "c", "type": "image-classification"}, ["'c'", "num_labels", "labels", "id2label"]),
        ({"name": "c", "type": "image-classification", "num_labels": 0}, ["num_labels=0", "positive int"]),
        ({"name": "c", "type": "image-classification", "id2label": {0: "a", 2: "b"}}, ["0..1", "[0, 2]"]),
        (
            {"name": "c", "type": "image-classification", "num_labels": 2, "problem_type": "ranking"},
            ["'ranking'", "multi_label_classification", "regression"],
        ),
        (
            {"name": "s", "type": "semantic-segmentation", "num_labels": 2, "ignore_index": "x"},
            ["ignore_index"],
        ),
    ],
)
def test_invalid_task_entry_raises_value_error(task, expected, tiny_config):
    with pytest.raises(ValueError) as error:
        tiny_config(tasks=[task])
    for fragment in expected:
        assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("moe_layers", "num_hidden_layers", "expected"),
    [
        ("all", 4, [0, 1, 2, 3]),
        ("every_other", 4, [1, 3]),
        ("every_other", 5, [1, 3]),
        ([2, 0], 4, [0, 2]),
        ([], 4, []),
    ],
)
def test_moe_layers_select_the_moe_blocks(moe_layers, num_hidden_layers, expected, tiny_config):
    from modsquad import ModSquadModel

    config = tiny_config(moe_layers=moe_layers, num_hidden_layers=num_hidden_layers)
    assert config.moe_layer_indices == expected
    model = ModSquadModel(config)
    assert [i for i, block in enumerate(model.layers) if block.is_moe] == expected


def test_per_layer_expert_counts_reach_the_blocks(tiny_config):
    from modsquad import ModSquadModel

    config = tiny_config(moe_layers="all", num_experts=[2, 3, 4, 5])
    model = ModSquadModel(config)
    assert [block.mlp.experts.up_proj.shape[0] for block in model.layers] == [2, 3, 4, 5]
    assert [block.mlp.router.weight.shape[1] for block in model.layers] == [2, 3, 4, 5]


def test_defaults_are_derived(all_tasks, tiny_config):
    config = tiny_config(moe_attention=True, attention_experts_per_tok=2)
    assert config.intermediate_size == config.num_experts_per_tok * config.expert_intermediate_size == 64
    assert config.attention_num_experts == config.num_experts
    # experts per token given: each expert gets the heads that keep a dense block's width
    assert config.attention_expert_heads == config.num_attention_heads // 2
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.router_init_std == config.initializer_range
    assert config.num_prefix_tokens == 2  # [CLS] and the task token
    assert config.feature_layers == [0, 1, 2, 3]
    assert tiny_config(num_hidden_layers=12).feature_layers == [2, 5, 8, 11]
    # labels given as a list become int-keyed id2label / label2id
    task = tiny_config().tasks[0]
    assert task["id2label"] == {0: "circle", 1: "square", 2: "triangle"}
    assert task["label2id"] == {"circle": 0, "square": 1, "triangle": 2}
    assert task["problem_type"] == "single_label_classification"
    assert tiny_config([all_tasks[1]]).tasks[0]["ignore_index"] == 255


def test_task_lookup_by_name_and_id(all_tasks, tiny_config):
    config = tiny_config(all_tasks)
    assert config.task_names == ["cls", "seg", "det", "depth"]
    assert config.task_index("det") == config.task_index(2) == 2
    assert config.get_task("depth")["type"] == "depth-estimation"
    for bad in ("nope", 4, -1, True):
        with pytest.raises(ValueError, match=r"cls.*seg.*det.*depth"):
            config.task_index(bad)


def test_duplicate_task_names_raise_value_error(all_tasks, tiny_config):
    cls = all_tasks[0]
    with pytest.raises(ValueError) as error:
        tiny_config(tasks=[cls, dict(cls)])
    for part in ["duplicate", "'cls'"]:
        assert part in str(error.value)


@pytest.mark.parametrize(
    ("num_tasks", "overrides"),
    [
        (4, {}),
        (1, {"moe_layers": [0, 3], "num_experts": [3, 4], "image_size": [48, 32]}),
        (2, {"moe_attention": True, "attention_num_experts": [2, 4]}),
    ],
)
def test_save_and_from_pretrained_round_trip_keeps_tasks_and_labels(
    tmp_path, num_tasks, overrides, all_tasks, tiny_config
):
    """Over the first `num_tasks` of the four tasks."""
    config = tiny_config(all_tasks[:num_tasks], **overrides)
    config.save_pretrained(tmp_path)
    loaded = ModSquadConfig.from_pretrained(tmp_path)
    auto_loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(auto_loaded) is ModSquadConfig
    for other in (loaded, auto_loaded, ModSquadConfig.from_dict(config.to_dict())):
        assert other.tasks == config.tasks  # int-keyed id2label again after JSON's string keys
        assert _without_path(other.to_dict()) == _without_path(config.to_dict())
        assert other.moe_layer_indices == config.moe_layer_indices
        assert other.experts_per_layer == config.experts_per_layer
        assert other.image_size_hw == config.image_size_hw


def _without_path(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k != "_name_or_path"}


def test_single_task_config_exposes_labels_at_top_level(tmp_path, all_tasks, tiny_config):
    config = tiny_config()
    assert config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    assert config.label2id == {"circle": 0, "square": 1, "triangle": 2}
    assert config.num_labels == 3
    assert config.problem_type == "single_label_classification"
    config.save_pretrained(tmp_path)
    assert ModSquadConfig.from_pretrained(tmp_path).id2label == config.id2label

    multi_label = tiny_config([{**all_tasks[0], "problem_type": "multi_label_classification"}])
    assert multi_label.problem_type == "multi_label_classification"
    # A depth task has no labels: the only labelled task still provides the top-level ones.
    assert tiny_config([all_tasks[3], all_tasks[1]]).id2label == {0: "background", 1: "shape"}


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (
            {"output_stride": 3},
            r"output_stride=3 must divide patch_size=8; accepted strides are \[1, 2, 4, 8\]",
        ),
        ({"head_channels": 0}, "head_channels must be a positive int, got 0"),
        ({"box_loss_coef": "big"}, "box_loss_coef must be a positive number, got 'big'"),
    ],
)
def test_head_options_are_checked_when_the_config_is_built(task, message, tiny_config):
    with pytest.raises(ValueError, match=message):
        tiny_config([{"name": "det", "type": "object-detection", "num_labels": 2, **task}])
    with pytest.raises(ValueError, match="silog_lambda must be a number in"):
        tiny_config([{"name": "depth", "type": "depth-estimation", "silog_lambda": -1}])
    with pytest.raises(ValueError, match="decoder_channels must be a positive int"):
        tiny_config(
            [{"name": "seg", "type": "semantic-segmentation", "num_labels": 2, "decoder_channels": 1.5}]
        )
