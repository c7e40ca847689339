"""Transformers' own model contract (`ModelTesterMixin` of tests/test_modeling_common.py, from the sdist of the
installed transformers, fetched by `.ci/transformers_tests/fetch.py`) held against `ModSquadModel` and every
single-task head, with dense attention and with attention experts. Laid out like transformers'
tests/models/vit/test_modeling_vit.py: a model tester that builds a tiny config and inputs, and a test class.

Every upstream test that does not apply is skipped below with its reason.
"""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
import torch
from parameterized import parameterized
from torch import nn
from transformers import PreTrainedModel

from modsquad import (
    ModSquadConfig,
    ModSquadForDepthEstimation,
    ModSquadForImageClassification,
    ModSquadForObjectDetection,
    ModSquadForSemanticSegmentation,
    ModSquadModel,
)
from transformers_common import import_common

common = import_common("test_modeling_common")
ModelTesterMixin, floats_tensor = common.ModelTesterMixin, common.floats_tensor
# `parameterized` is in the dev extras; without it `import_common` has already skipped this module.

# Some 400 upstream tests over five model classes, twice: minutes on a CPU, so with the slow tests.
pytestmark = pytest.mark.slow

HEAD_CLASSES = (
    ModSquadForImageClassification,
    ModSquadForSemanticSegmentation,
    ModSquadForObjectDetection,
    ModSquadForDepthEstimation,
)


class ModSquadModelTester:
    """A 2-block, 32-wide ModSquad on 16x16 images with 4-pixel patches, one task of every type (about 0.1 M
    parameters; the upstream suite keeps models under 1 M)."""

    def __init__(
        self,
        parent,
        batch_size=3,
        image_size=16,
        patch_size=4,
        num_channels=3,
        is_training=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        expert_intermediate_size=16,
        moe_layers="every_other",
        moe_attention=False,
        num_labels=3,
        decoder_channels=8,
        initializer_range=0.02,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.expert_intermediate_size = expert_intermediate_size
        self.moe_layers = moe_layers
        self.moe_attention = moe_attention
        self.num_labels = num_labels
        self.decoder_channels = decoder_channels
        self.initializer_range = initializer_range
        # [CLS], the task token, then the patches
        self.seq_length = (image_size // patch_size) ** 2 + 2

    def get_config(self) -> ModSquadConfig:
        dense = {"decoder_channels": self.decoder_channels}
        return ModSquadConfig(
            tasks=[
                {"name": "cls", "type": "image-classification", "num_labels": self.num_labels},
                {"name": "seg", "type": "semantic-segmentation", "num_labels": self.num_labels, **dense},
                {
                    "name": "det",
                    "type": "object-detection",
                    "num_labels": self.num_labels,
                    "head_channels": 8,
                },
                {"name": "depth", "type": "depth-estimation", **dense},
            ],
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            expert_intermediate_size=self.expert_intermediate_size,
            moe_layers=self.moe_layers,
            moe_attention=self.moe_attention,
            initializer_range=self.initializer_range,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def labels_for(self, model_class, pixel_values: torch.Tensor):
        """Targets of the head's task type for `pixel_values`, as its `labels` argument takes them."""
        batch, _, height, width = pixel_values.shape
        if model_class is ModSquadForImageClassification:
            return torch.zeros(batch, dtype=torch.long)
        if model_class is ModSquadForSemanticSegmentation:
            return torch.zeros(batch, height, width, dtype=torch.long)
        if model_class is ModSquadForObjectDetection:
            box = {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}
            return [dict(box) for _ in range(batch)]
        if model_class is ModSquadForDepthEstimation:
            return torch.ones(batch, height, width)
        return None

    def create_and_check_model(self, config, pixel_values):
        model = ModSquadModel(config).eval()
        result = model(pixel_values, task="seg", output_router_logits=True)
        self.parent.assertEqual(
            result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size)
        )
        # one router per MoE block (block 1), two with attention experts
        self.parent.assertEqual(len(result.router_logits), 2 if self.moe_attention else 1)


class ModSquadModelTest(ModelTesterMixin, unittest.TestCase):
    """ModSquad models with dense attention in every block (MoE MLP in block 1)."""

    all_model_classes = (ModSquadModel, *HEAD_CLASSES)
    moe_attention = False
    test_resize_embeddings = False
    # Upstream runs the `_init_weights` coverage check only for models it dates after 2022 by their copyright line.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = ModSquadModelTester(self, moe_attention=self.moe_attention)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # Upstream builds labels for the heads it knows by name; a model outside Transformers brings its own.
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=False)
        if return_labels and model_class in HEAD_CLASSES:
            inputs_dict["labels"] = self.model_tester.labels_for(model_class, inputs_dict["pixel_values"])
        return inputs_dict

    def _heads_only(self):
        # Upstream leaves base models out of its training tests by their names in MODEL_MAPPING_NAMES, which a
        # model outside Transformers is not in; the backbone has no loss to train.
        return mock.patch.object(type(self), "all_model_classes", HEAD_CLASSES)

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_training(self):
        with self._heads_only():
            super().test_training()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs=None):
        with self._heads_only():
            super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    @unittest.skip(
        reason="Refused on purpose (a ValueError): reentrant checkpointing runs the blocks without autograd, so the "
        "router outputs recorded inside them would carry no gradient and the router losses would stop training "
        "the routers (tests/model/test_modeling.py::test_reentrant_checkpointing_is_refused)"
    )
    def test_training_gradient_checkpointing_use_reentrant_true(self):
        pass

    @unittest.skip(
        reason="Does not apply: ModSquad's one conversion mapping (LEGACY_KEY_RENAMES) renames the weights of older "
        "checkpoints on loading only; checkpoints are saved under today's names (save_original_format=False), so "
        "there is no saved format to reverse to"
    )
    def test_reverse_loading_mapping(self):
        pass

    @unittest.skip(reason="ModSquad takes pixel_values; there are no inputs_embeds (as for ViT)")
    def test_inputs_embeds(self):
        pass

    @parameterized.expand(common.TEST_EAGER_MATCHES_BATCHED_AND_GROUPED_INFERENCE_PARAMETERIZATION)
    def test_eager_matches_batched_and_grouped_inference(self, name, dtype):
        # Upstream compares `logits` and `last_hidden_state`; a depth model's prediction is `predicted_depth`.
        compared = common._get_output_tensors

        def output_tensors(outputs):
            depth = getattr(outputs, "predicted_depth", None)
            return compared(outputs) + ([depth] if depth is not None else [])

        with mock.patch.object(common, "_get_output_tensors", output_tensors):
            common._test_eager_matches_batched_and_grouped_inference(self, name, dtype)

    def test_moe_models_record_router_logits(self):
        # Upstream runs this check only when "@use_experts_implementation" appears in the module of the first model
        # class; ModSquad's experts live in moe.py. The same check: every model records the router logits.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            recordable = set().union(
                *(
                    (m._can_record_outputs or {}).keys()
                    for m in model.modules()
                    if isinstance(m, PreTrainedModel)
                )
            )
            self.assertIn("router_logits", recordable, f"{model_class.__name__} does not record them.")

    def test_model_get_set_embeddings(self):
        # As ViT's: the input embeddings are the patch embeddings, and there are no output embeddings.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            self.assertIsNone(model.get_output_embeddings())


class ModSquadAttentionExpertsModelTest(ModSquadModelTest):
    """The same contract with `moe_attention=True`: the attention of the MoE block is a mixture of attention
    experts (2 heads each, 2 per token: as many attention heads per token as the dense blocks)."""

    moe_attention = True
