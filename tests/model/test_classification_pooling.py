"""The classification head's pooling (`pooling` in the task entry): the [CLS] token, the mean of the patch tokens, or
both concatenated; checked values, and the choice survives save/load."""

from __future__ import annotations

import pytest
import torch

from modsquad import ModSquadForImageClassification

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean"])
def test_the_head_reads_the_pooled_tokens(tiny_config, all_tasks, pooling, tmp_path):
    model = ModSquadForImageClassification(tiny_config([dict(all_tasks[0], pooling=pooling)])).eval()
    prefix = model.config.num_prefix_tokens  # [CLS] and the task token
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.modsquad(pixel_values).last_hidden_state
        pooled = {
            "cls": tokens[:, 0],
            "mean": tokens[:, prefix:].mean(dim=1),
            "cls+mean": torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1),
        }[pooling]
        expected = model.head.classifier(pooled)
        torch.testing.assert_close(model(pixel_values).logits, expected)

    model.save_pretrained(tmp_path)
    reloaded = ModSquadForImageClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.tasks[0]["pooling"] == pooling
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)


def test_an_unknown_pooling_names_the_accepted_ones(tiny_config, all_tasks):
    with pytest.raises(ValueError, match=r"pooling='avg'; accepted: \['cls', 'mean', 'cls\+mean'\]"):
        tiny_config([dict(all_tasks[0], pooling="avg")])
