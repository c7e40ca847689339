"""A ModSquad classification head fine-tuned and evaluated with `transformers.Trainer`, as the Transformers
image-classification guide does it, `compute_metrics` included (`np.argmax` over the predictions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from modsquad import ModSquadForImageClassification

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")]


class BrightOrDark(torch.utils.data.Dataset):
    """Images that are bright (label 1) or dark (label 0), as `{"pixel_values", "labels"}` examples."""

    def __init__(self, num_images: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (num_images,), generator=generator)
        noise = 0.1 * torch.randn(num_images, 3, 32, 32, generator=generator)
        self.pixel_values = noise + (self.labels.float() * 2 - 1).view(-1, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def compute_metrics(eval_pred):
    # The image-classification guide's, with the accuracy computed here (`evaluate.load` needs the Hub).
    predictions, labels = eval_pred
    predictions = np.argmax(predictions, axis=1)
    return {"accuracy": float((predictions == labels).mean())}


@pytest.mark.parametrize("output_router_logits", [False, True], ids=["default", "with_router_losses"])
def test_trainer_fine_tunes_and_predicts_with_the_guides_compute_metrics(
    tiny_config, tmp_path, output_router_logits
):
    tasks = [{"name": "cls", "type": "image-classification", "labels": ["dark", "bright"]}]
    # With output_router_logits the loss includes the router losses and the routing tensors are returned, yet
    # Trainer leaves them out of the predictions (`config.keys_to_ignore_at_inference`).
    model = ModSquadForImageClassification(tiny_config(tasks, output_router_logits=output_router_logits))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=12,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=BrightOrDark(64, seed=0),
        eval_dataset=BrightOrDark(16, seed=1),
        compute_metrics=compute_metrics,
    )
    trainer.train()

    predicted = trainer.predict(BrightOrDark(16, seed=2))
    assert isinstance(predicted.predictions, np.ndarray)  # the logits alone, not a tuple with routing tensors
    assert predicted.predictions.shape == (16, 2) and predicted.predictions.nbytes == 16 * 2 * 4
    assert predicted.metrics["test_accuracy"] >= 0.9
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] >= 0.9 and np.isfinite(metrics["eval_loss"])
