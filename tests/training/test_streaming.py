"""Training on streamed datasets (`dataset: {streaming: true}`): every mixing strategy, an epoch of declared rows or
steps only, exact resume after an interruption, and two processes splitting the streams."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from modsquad.commands.train import train_recipe
from modsquad.data.demo import make_demo_datasets
from modsquad.data.mixing import STRATEGIES, MultiTaskMixer
from modsquad.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
MODEL = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "num_experts": 4,
    "num_experts_per_tok": 2, "expert_intermediate_size": 16, "moe_layers": "all", "mi_loss_coef": 0.1,
    "router_noise_std": 0.5,
}  # fmt: skip


def write_parquet_folders(root: Path, shards: int) -> dict[str, Path]:
    """The demo's cls and seg data (24 training rows each) as folders of Parquet files, the training split in
    `shards` files."""
    folders = {}
    demo = make_demo_datasets(num_train=24, num_val=4, image_size=32, tasks=["cls", "seg"])
    for task, splits in demo.items():
        folder = root / task
        folder.mkdir(parents=True)
        for shard in range(shards):
            part = splits["train"].shard(shards, shard, contiguous=True)
            part.to_parquet(folder / f"train-{shard:05d}-of-{shards:05d}.parquet")
        splits["validation"].to_parquet(folder / "validation-00000-of-00001.parquet")
        folders[task] = folder
    return folders


@pytest.fixture(scope="module")
def parquet_folders(tmp_path_factory) -> dict[str, Path]:
    # One file per split: `datasets` pauses 5 s whenever it stops reading several shards at once (an Arrow
    # workaround), which would dominate these short runs.
    return write_parquet_folders(tmp_path_factory.mktemp("stream-data"), shards=1)


def stream_recipe(folders, output_dir, rows=None, **sections):
    tasks = []
    for name in ("cls", "seg"):
        task = {"name": name, "dataset": {"path": str(folders[name]), "streaming": True}, "batch_size": 4}
        task.update({"image_size": 32, "eval_split": None, "augment": True})
        if name == "seg":
            task.update(type="semantic-segmentation", labels=["background", "circle", "square", "triangle"])
            task["head"] = {"decoder_channels": 8}
        else:
            task.update(type="image-classification", labels=["circle", "square", "triangle", "cross"])
        if rows is not None:
            task["num_train_rows"] = rows
        tasks.append(task)
    raw = {
        "output_dir": str(output_dir),
        "model": {"config": MODEL},
        "tasks": tasks,
        "optimization": {"learning_rate": 2e-3, "warmup_steps": 1},
        "training": {"log_every": 1, "eval_at_end": False, "tracker": "none", "save_final_model": False},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return load_recipe(**raw)


def fresh_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "rows"),
    [("simt", None), ("temperature", 16)],
    ids=["simt-steps-only", "temperature-declared-rows"],
)
def test_streaming_run_interrupted_and_resumed_equals_the_straight_run(
    parquet_folders, tmp_path, monkeypatch, strategy, rows
):
    # 24 rows per task, 4 per batch: steps-only passes last 6 batches, declared epochs 16 // 4 = 4 batches; the
    # 9 steps cross an epoch (pass) boundary, and the interruption at step 7 resumes in the middle of one.
    sections = {
        "mixing": {"strategy": strategy},
        "training": {"max_steps": 9, "save_every": 3, "keep_last": 3},
    }

    def run(name: str, resume: str | None = None):
        fresh_state()
        torch.manual_seed(0)
        recipe = stream_recipe(parquet_folders, tmp_path / name, rows, **sections)
        recipe.resume = resume
        return train_recipe(recipe)

    straight = run("straight")
    original = MultiTaskMixer.next_step

    def next_step_with_sigterm(self):
        if self.step == 6:
            signal.raise_signal(signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(MultiTaskMixer, "next_step", next_step_with_sigterm)
    interrupted = run("interrupted")
    monkeypatch.setattr(MultiTaskMixer, "next_step", original)
    assert interrupted.interrupted == signal.SIGTERM and interrupted.step == 7
    resumed = run("interrupted", resume="latest")
    assert resumed.step == 9

    log = [json.loads(x) for x in (tmp_path / "interrupted" / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == list(range(1, 10))
    for expected, got in zip(straight.history, log):
        for key in ("loss", "mi_loss", "loss/cls", "loss/seg", "lr"):
            assert got.get(key) == pytest.approx(expected.get(key), abs=1e-6), (expected["step"], key)
    assert ("epoch" in log[0]) == (rows is not None)  # epochs are counted only with a declared length
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_on_streams(parquet_folders, tmp_path, strategy):
    # 8 steps of one task batch at most: more than one pass of a 12-row shard under every strategy.
    recipe = stream_recipe(
        parquet_folders,
        tmp_path,
        rows=12,
        mixing={"strategy": strategy},
        training={"num_epochs": 3.0, "eval_at_end": True},
    )
    for task in recipe.tasks:
        task.eval_split = "validation"  # evaluated as a stream too
    result = train_recipe(recipe)
    assert set(result.metrics) == {"cls", "seg"} and "mean_iou" in result.metrics["seg"]
    assert result.max_steps == 9  # 3 epochs of 3 steps (12 rows / 4 per batch; 6 task batches / 2 per step)
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in result.history)


def test_stream_errors_say_what_to_declare(parquet_folders, tmp_path):
    with pytest.raises(
        ValueError, match=r"streamed tasks \['cls', 'seg'\] have no known number of rows.*max_steps"
    ):
        train_recipe(stream_recipe(parquet_folders, tmp_path / "a"))
    fresh_state()
    with pytest.raises(
        ValueError, match=r"'proportional' weighs tasks by their number of rows.*\['cls', 'seg'\]"
    ):
        train_recipe(
            stream_recipe(
                parquet_folders,
                tmp_path / "b",
                mixing={"strategy": "proportional"},
                training={"max_steps": 2},
            )
        )
    fresh_state()
    # More declared rows than the stream holds: the epoch cannot be filled.
    with pytest.raises(RuntimeError, match=r"ended after 6 of the 12 batches an epoch of num_rows=48 needs"):
        train_recipe(stream_recipe(parquet_folders, tmp_path / "c", rows=48, training={"max_steps": 8}))


@pytest.mark.slow
def test_dataloader_workers_decode_streams_without_changing_the_batches(parquet_folders, tmp_path):
    # The main process reads the stream in order; workers decode and augment: the same batches for any count.
    histories = []
    for workers in (0, 2):
        fresh_state()
        torch.manual_seed(0)
        recipe = stream_recipe(
            parquet_folders, tmp_path / f"w{workers}", training={"max_steps": 8, "num_workers": workers}
        )
        histories.append([line["loss"] for line in train_recipe(recipe).history])
    assert histories[0] == histories[1]


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_two_processes_split_the_streams_and_resume_exactly(tmp_path, launch_two_processes):
    # Two shards per training split: one for each process (`split_dataset_by_node` assigns whole shards).
    folders = write_parquet_folders(tmp_path / "data", shards=2)
    recipe = stream_recipe(
        folders,
        tmp_path / "straight",
        optimization={"warmup_steps": 0, "min_lr_ratio": 1.0},  # a constant rate: runs of any length agree
        training={"max_steps": 5, "save_every": 3, "save_final_model": True},
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe.to_yaml(recipe_path)
    launch_two_processes(recipe_path)
    straight = tmp_path / "straight"
    digests = json.loads((straight / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    # Each process has 12 rows (one shard) per pass: 3 batches, so step 4 starts the second pass.
    launch_two_processes(recipe_path, f"output_dir={tmp_path / 'split'}", "training.max_steps=3")
    launch_two_processes(recipe_path, f"output_dir={tmp_path / 'split'}", "--resume")
    expected = load_file(str(straight / "final" / "model.safetensors"))
    got = load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    straight_log = [json.loads(x) for x in (straight / "training_log.jsonl").read_text().splitlines()]
    split_log = [json.loads(x) for x in (tmp_path / "split" / "training_log.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in split_log] == pytest.approx(
        [line["loss"] for line in straight_log], abs=1e-6
    )
