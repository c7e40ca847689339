"""ModSquadConfig refuses what would train silently wrong: every numeric field finite and in range, real booleans,
no unknown keyword or task key (with a "did you mean" hint), labels and ignore index that make sense, task names that
cannot collide with module attributes; and keeps accepting every standard PreTrainedConfig keyword."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoConfig, PreTrainedConfig

from modsquad import ModSquadConfig, ModSquadForImageClassification

CLS = {"name": "cls", "type": "image-classification", "labels": ["a", "b"]}
SEG = {"name": "seg", "type": "semantic-segmentation", "labels": ["bg", "fg"]}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("layer_norm_eps", 0.0, "layer_norm_eps must be a finite number > 0, got 0.0"),
        ("layer_norm_eps", -1e-6, "layer_norm_eps must be a finite number > 0"),
        ("initializer_range", math.nan, "initializer_range must be a finite number > 0, got nan"),
        ("mi_loss_coef", math.nan, "mi_loss_coef must be a finite number >= 0, got nan"),
        ("z_loss_coef", math.inf, "z_loss_coef must be a finite number >= 0, got inf"),
        ("balance_loss_coef", -0.1, "balance_loss_coef must be a finite number >= 0"),
        ("hidden_dropout_prob", 1.0, "hidden_dropout_prob must be a finite number in [0, 1)"),
        (
            "attention_probs_dropout_prob",
            -0.5,
            "attention_probs_dropout_prob must be a finite number in [0, 1)",
        ),
        ("router_jitter_noise", 1.5, "router_jitter_noise must be a finite number in [0, 1)"),
        ("router_noise_std", -1.0, "router_noise_std must be a finite number >= 0"),
        ("expert_intermediate_size", 0, "expert_intermediate_size must be a positive int, got 0"),
        ("intermediate_size", 0, "intermediate_size must be a positive int or null, got 0"),
        ("num_channels", True, "num_channels must be a positive int, got True"),
        ("chunk_size_feed_forward", -1, "chunk_size_feed_forward must be an int >= 0"),
        ("qkv_bias", "no", "qkv_bias must be true or false, got 'no' (str)"),
        ("moe_attention", "false", "moe_attention must be true or false, got 'false' (str)"),
        ("norm_topk_prob", 1, "norm_topk_prob must be true or false, got 1 (int)"),
        ("return_dict", "yes", "return_dict must be true or false"),
        ("feature_layers", [0, True], "feature_layers must be a list of block indices"),
        ("moe_layers", [True], "moe_layers=[True] must list distinct block indices"),
        ("hidden_act", ["gelu"], "hidden_act=['gelu'] is not a Transformers activation"),
        ("attention_num_experts", 4, "attention_num_experts set but moe_attention=False"),
        ("attention_expert_heads", 2, "attention_expert_heads set but moe_attention=False"),
    ],
)
def test_every_field_is_checked_by_name(tiny_config, field, value, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**{field: value})
    assert message in str(error.value)


def test_unknown_keywords_raise_with_a_hint(tiny_config):
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        tiny_config(hiden_size=64)
    with pytest.raises(ValueError, match=r"'num_expert' \(did you mean 'num_experts'"):
        tiny_config(num_expert=4)
    with pytest.raises(ValueError, match="unknown ModSquadConfig key"):
        tiny_config(max_grad_norm=1.0)


def test_every_standard_pretrained_config_keyword_is_accepted(tiny_config):
    standard = {
        "num_labels": 2, "id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1},
        "problem_type": "single_label_classification", "output_hidden_states": False, "output_attentions": False,
        "return_dict": True, "torch_dtype": "float32", "dtype": "float32", "architectures": ["ModSquadModel"],
        "auto_map": {"AutoConfig": "configuration_modsquad.ModSquadConfig"}, "transformers_version": "5.24.0",
        "experts_implementation": "eager", "attn_implementation": "eager", "name_or_path": "x", "_commit_hash": None,
        "model_type": "modsquad", "tie_word_embeddings": False, "chunk_size_feed_forward": 0,
        "is_encoder_decoder": False, "pad_token_id": None, "use_cache": False, "quantization_config": None,
        "finetuning_task": None, "task_specific_params": None, "custom_pipelines": {}, "per_layer_config": None,
    }  # fmt: skip
    config = tiny_config(tasks=[CLS], **standard)
    assert config.num_labels == 2 and config.dtype == torch.float32
    base_fields = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert base_fields <= set(ModSquadConfig.accepted_keys())


def test_a_saved_config_with_everything_transformers_writes_loads_back(tiny_config, tmp_path):
    model = ModSquadForImageClassification(tiny_config(tasks=[CLS]))
    model.save_pretrained(tmp_path)  # writes auto_map, architectures, dtype, transformers_version
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.task_names == ["cls"]
    with pytest.raises(ValueError, match="layer_norm_eps must be a finite number > 0"):
        ModSquadConfig.from_pretrained(tmp_path, layer_norm_eps=0.0)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({**CLS, "labels": []}, "labels must be a non-empty list of class names, got []"),
        ({**CLS, "labels": "ab"}, "labels must be a non-empty list"),
        ({**CLS, "labels": ["a", "b", "a"]}, "duplicate class names ['a']"),
        ({**CLS, "labels": None, "id2label": {0: "x", 1: "x"}}, "duplicate class names ['x']"),
        ({**CLS, "lables": ["a"]}, "'lables' (did you mean 'labels'?)"),
        ({**SEG, "ignore_index": 1}, "ignore_index=1 is a class id (num_labels=2)"),
        ({**SEG, "ignore_index": 0}, "ignore_index=0 is a class id"),
        ({**SEG, "ignore_index": 1.5}, "ignore_index must be an int"),
        ({**SEG, "reduce_labels": "no"}, "reduce_labels must be true or false, got 'no'"),
        ({**SEG, "decoder_chanels": 8}, "'decoder_chanels' (did you mean 'decoder_channels'?)"),
        ({**CLS, "ignore_index": 255}, "unknown task 'cls' (image-classification) key(s) 'ignore_index'"),
        (
            {"name": "depth", "type": "depth-estimation", "max_depth": math.inf},
            "max_depth must be a positive",
        ),
        ({"name": "depth", "type": "depth-estimation", "num_labels": 3}, "key(s) 'num_labels'"),
        (
            {"name": "det", "type": "object-detection", "labels": ["a"], "bbox_format": "cxcywh"},
            "bbox_format",
        ),
        (
            {"name": "det", "type": "object-detection", "labels": ["a"], "box_loss_coef": math.nan},
            "box_loss_coef",
        ),
    ],
)
def test_task_entries_that_cannot_be_right_are_refused(tiny_config, task, message):
    with pytest.raises(ValueError) as error:
        tiny_config(tasks=[task])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "name", ["train", "forward", "state_dict", "keys", "items", "update", "training", "_x"]
)
def test_task_names_that_are_module_attributes_are_refused(tiny_config, name):
    with pytest.raises(ValueError, match=rf"'{name}' is reserved"):
        tiny_config(tasks=[{"name": name, "type": "depth-estimation"}])


def test_valid_edge_values_still_pass(tiny_config):
    config = tiny_config(
        tasks=[{**SEG, "ignore_index": -100, "reduce_labels": True}],
        mi_loss_coef=0.0,
        hidden_dropout_prob=0.0,
        router_jitter_noise=0.5,
    )
    assert config.tasks[0]["ignore_index"] == -100
