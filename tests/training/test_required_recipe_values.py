"""Recipe values marked `???` must be given as overrides: a recipe whose data lives on the user's machine says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from modsquad.training.recipe import load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "training" / "configs" / "real_shared_data.yaml"


def test_data_paths_are_required_overrides():
    expected = r"leaves \['tasks.cls.dataset.path', 'tasks.det.dataset.path', .*\] to be given.*tasks.cls.dataset.path=<value>"
    with pytest.raises(ValueError, match=expected):
        load_recipe(RECIPE)
    with pytest.raises(ValueError, match=r"leaves \['tasks.depth.dataset.path'\]"):
        load_recipe(RECIPE, [f"tasks.{t}.dataset.path=/data/{t}" for t in ("cls", "det", "seg")])
    recipe = load_recipe(
        RECIPE, [f"tasks.{t}.dataset.path=/data/{t}" for t in ("cls", "det", "seg", "depth")]
    )
    assert [task.dataset["path"] for task in recipe.tasks] == [
        "/data/cls",
        "/data/det",
        "/data/seg",
        "/data/depth",
    ]
