"""Fine-tune a pruned ModSquad classification model on a new dataset with LoRA.

The pruned model gets a new head for the dataset's labels (the Transformers way: `id2label` +
`ignore_mismatched_sizes=True`), LoRA adapters on its attention projections and experts (`lora_config_for`), and
trains only those and the head. Prints the trainable fraction and the validation accuracy before and after, and
saves the adapter (`PeftModel.save_pretrained`).

    python examples/finetune_pruned_lora.py runs/demo/tasks/cls ../shared/data/cls --steps 200 --output-dir lora-cls
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from peft import get_peft_model
from transformers import AutoImageProcessor, AutoModelForImageClassification

from modsquad.data import TaskDataAdapter, build_task_dataloader, load_split
from modsquad.metrics.evaluation import evaluate_model
from modsquad.adaptation.lora import lora_config_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="pruned task model folder or Hub id (e.g. runs/demo/tasks/cls)")
    parser.add_argument(
        "dataset", help="new dataset: Hub id, folder or data file with `image` and `label` columns"
    )
    parser.add_argument("--output-dir", default="lora-finetuned", help="where the adapter is saved")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the attention projections")
    parser.add_argument("--expert-rank", type=int, default=4, help="LoRA rank of every expert")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, validation = load_split(args.dataset, "train"), load_split(args.dataset, "validation")
    labels = train.features["label"].names
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(
        args.model,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )
    before = evaluate_model(model, processor, validation)["accuracy"]

    peft_model = get_peft_model(
        model, lora_config_for(model, r=args.rank, alpha=2 * args.rank, expert_r=args.expert_rank)
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapter = TaskDataAdapter(model.config.tasks[0], processor, train=True)
    loader = build_task_dataloader(train, adapter, args.batch_size, seed=args.seed)
    optimizer = torch.optim.AdamW(
        [p for p in peft_model.parameters() if p.requires_grad], lr=args.learning_rate
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    peft_model.train()
    started, step, losses = time.perf_counter(), 0, []
    while step < args.steps:
        for batch in loader:
            loss = peft_model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step == args.steps:
                break
    peft_model.eval()
    after = evaluate_model(peft_model, processor, validation)["accuracy"]
    peft_model.save_pretrained(args.output_dir)

    report = {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100 * trainable / total,
        "accuracy_before": before,
        "accuracy_after": after,
        "first_loss": sum(losses[:10]) / len(losses[:10]),
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "steps": step,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
