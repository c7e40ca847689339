"""Transformers' own image processor contract (`ImageProcessingTestMixin` of tests/test_image_processing_common.py,
from the sdist of the installed transformers, fetched by `.ci/transformers_tests/fetch.py`) held against
`ModSquadImageProcessor`, laid out like transformers' tests/models/vit/test_image_processing_vit.py.

Every upstream test that does not apply is skipped below with its reason.
"""

from __future__ import annotations

import unittest

from modsquad import ModSquadImageProcessor
from transformers_common import import_common

common = import_common("test_image_processing_common")


class ModSquadImageProcessingTester(common.ImageProcessingTester):
    def __init__(self, **kwargs):
        kwargs.setdefault("size", {"height": 18, "width": 18})
        kwargs.setdefault("num_labels", 3)  # for the semantic-segmentation post-processing tests
        super().__init__(**kwargs)

    def _get_image_processing_classes(self) -> dict:
        # Upstream finds the classes from the test folder's model name in Transformers' own table; ModSquad registers
        # its one (PIL) backend with `AutoImageProcessor` instead.
        return {"pil": ModSquadImageProcessor}


class ModSquadImageProcessingTest(
    common.ImageProcessingTestMixin, common.PostProcessSemanticSegmentationTestMixin, unittest.TestCase
):
    image_processor_tester_class = ModSquadImageProcessingTester

    @unittest.skip(
        reason="ModSquad ships the PIL backend only: the package does not depend on torchvision (whose default "
        "wheel pulls the CUDA build); upstream asks it of models added to Transformers after 2025-09"
    )
    def test_new_models_require_torchvision_backend(self):
        pass
