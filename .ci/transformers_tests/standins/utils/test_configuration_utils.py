"""Stand-in for `tests/utils/test_configuration_utils.py`, which the transformers sdist does not ship.

Only `config_common_kwargs` is imported by `tests/test_configuration_common.py`: one non-default value for every
field of the v5 `PreTrainedConfig` base class, which `ConfigTester.check_config_arguments_init` passes to the model's
config and expects back unchanged (the same dict as upstream's file for transformers 5.x).
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
