"""Transformers' own config contract (`ConfigTester` of tests/test_configuration_common.py, from the sdist of the
installed transformers, fetched by `.ci/transformers_tests/fetch.py`) held against `ModSquadConfig`."""

from __future__ import annotations

import unittest

from modsquad import ModSquadConfig
from transformers_common import import_common

ConfigTester = import_common("test_configuration_common").ConfigTester


class ModSquadConfigTest(unittest.TestCase):
    def setUp(self):
        # Non-default values the JSON round trips must return unchanged (a ViT has no text modality either).
        self.config_tester = ConfigTester(
            self,
            config_class=ModSquadConfig,
            has_text_modality=False,
            hidden_size=48,
            num_attention_heads=4,
            num_experts=8,
            moe_layers=[1, 3],
            output_router_logits=True,
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_config_with_attention_experts(self):
        config_tester = ConfigTester(
            self,
            config_class=ModSquadConfig,
            has_text_modality=False,
            moe_attention=True,
            num_attention_heads=8,
        )
        config_tester.run_common_tests()
