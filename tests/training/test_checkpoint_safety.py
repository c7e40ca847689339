"""Checkpoints are safe to resume: the loop state is JSON / safetensors (no pickle is ever run), every file is
checked against the checksums written with it, the recipe may change only where a resumed run honours it, a run
folder is never silently mixed or replaced, and a failed write leaves no half checkpoint behind."""

from __future__ import annotations

import errno
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

from modsquad import ModSquadConfig, ModSquadForMultiTask
from modsquad.data.mixing import subset
from modsquad.training import checkpointing
from modsquad.training.checkpointing import CheckpointedState, CheckpointError, list_checkpoints
from modsquad.training.recipe import load_recipe
from modsquad.training.trainer import TaskData, train

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

TASKS = [
    {"name": "colour", "type": "image-classification", "num_labels": 3},
    {"name": "bright", "type": "image-classification", "num_labels": 2},
]


def tiny_model() -> ModSquadForMultiTask:
    torch.manual_seed(0)
    config = ModSquadConfig(
        tasks=TASKS,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        expert_intermediate_size=16,
        image_size=16,
        patch_size=8,
        moe_layers="all",
    )
    return ModSquadForMultiTask(config)


def tiny_tasks() -> list[TaskData]:
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for task in TASKS:
        images = torch.randn(16, 3, 16, 16, generator=generator)
        labels = torch.randint(0, task["num_labels"], (16,), generator=generator)
        dataset = TensorDataset(images, labels)

        def make_loader(rows, epoch, dataset=dataset):
            collate = lambda items: {  # noqa: E731
                "pixel_values": torch.stack([i[0] for i in items]),
                "labels": torch.stack([i[1] for i in items]),
            }
            return DataLoader(subset(dataset, rows), batch_size=4, collate_fn=collate)

        tasks.append(TaskData(task["name"], dataset, make_loader, 4))
    return tasks


def run(output_dir: Path, **recipe_fields):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    training = {"max_steps": 3, "save_every": 1, "keep_last": 3, "log_every": 1, "eval_at_end": False}
    training.update(recipe_fields.pop("training", {}))
    recipe_fields.setdefault("tasks", [{"name": t["name"]} for t in TASKS])
    recipe = load_recipe(
        output_dir=str(output_dir),
        training={**training, "tracker": "none", "cpu": True},
        **recipe_fields,
    )
    return train(recipe, tiny_model(), tiny_tasks())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step run with a checkpoint after every step (read-only: tests copy it before changing anything)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    folder = tmp_path_factory.mktemp("finished") / "run"
    run(folder)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return folder


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


class Payload:
    """A pickle that touches a file when it is unpickled: proof that a pickle was run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------------ the loop state
def test_checkpoint_files_are_accelerates_plus_json_and_safetensors(finished_run):
    folder = list_checkpoints(finished_run)[-1]
    names = sorted(path.name for path in folder.iterdir())
    assert names == [
        "checkpoint_complete.json",
        "loop_state.json",
        "loop_state.safetensors",
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
    ]
    loop_state = json.loads((folder / "loop_state.json").read_text())["objects"]
    assert set(loop_state) == {"trainer_state", "lr_scheduler", "mixer"}
    assert loop_state["trainer_state"]["step"] == 3 and loop_state["mixer"]["step"] == 3
    manifest = json.loads((folder / "checkpoint_complete.json").read_text())
    assert set(manifest["files"]) == set(names) - {"checkpoint_complete.json"}
    assert manifest["num_processes"] == 1 and manifest["recipe"]["training"]["max_steps"] == 3


def test_checkpointed_state_round_trips_any_state_dict(tmp_path):
    class Holder:
        def __init__(self, state):
            self.state = state

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    state = {
        "step": 7,
        "ema": [torch.arange(6, dtype=torch.float32).view(2, 3), None],
        "seen": torch.tensor([True, False]),
        "pair": (1.5, "x"),
        "by_id": {0: torch.ones(2), 3: "three"},
        "odd": [float("nan"), float("inf"), -0.0],
        "array": np.arange(4, dtype=np.int64),
        "numpy_scalar": np.float32(0.25),
    }
    saved = CheckpointedState()
    saved.register("estimator", Holder(state))
    saved.save(tmp_path)
    restored = Holder(None)
    loader = CheckpointedState()
    loader.register("estimator", restored)
    loader.load(tmp_path)
    got = restored.state
    assert got["step"] == 7 and got["ema"][1] is None and torch.equal(got["ema"][0], state["ema"][0])
    assert torch.equal(got["seen"], state["seen"]) and got["pair"] == (1.5, "x")
    assert torch.equal(got["by_id"][0], torch.ones(2)) and got["by_id"][3] == "three"
    assert math.isnan(got["odd"][0]) and got["odd"][1] == math.inf
    assert np.array_equal(got["array"], np.arange(4)) and got["numpy_scalar"] == 0.25

    other = CheckpointedState()
    other.register("estimator", Holder(None))
    other.register("mixer", Holder(None))
    with pytest.raises(CheckpointError, match="different version"):
        other.load(tmp_path)
    with pytest.raises(TypeError, match=r"estimator/bad.*a set"):
        broken = CheckpointedState()
        broken.register("estimator", Holder({"bad": {1, 2}}))
        broken.save(tmp_path)
    with pytest.raises(ValueError, match="already checkpointed"):
        saved.register("estimator", Holder({}))


# ------------------------------------------------------------------------------------------------- no pickle runs
def test_a_planted_pickle_is_refused_and_never_run(finished_run, tmp_path):
    folder = list_checkpoints(copy_run(finished_run, tmp_path / "run"))[-1]
    marker = tmp_path / "pwned"
    (folder / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError) as error:
        run(tmp_path / "run", resume="latest")
    assert "custom_checkpoint_0.pkl was not written with this checkpoint" in str(error.value)
    assert not marker.exists()


def test_a_rewritten_manifest_cannot_smuggle_a_pickle_in(finished_run, tmp_path):
    # An attacker who can also rewrite the checksums still meets Accelerate's weights_only=True unpickler.
    folder = list_checkpoints(copy_run(finished_run, tmp_path / "run"))[-1]
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, folder / "optimizer.bin")
    manifest = json.loads((folder / "checkpoint_complete.json").read_text())
    checkpointing.write_manifest(
        folder, **{k: v for k, v in manifest.items() if k not in ("format", "files")}
    )
    with pytest.raises(
        CheckpointError, match=r"cannot load checkpoint .*step_00000003.*(Unpickl|weights_only)"
    ):
        run(tmp_path / "run", resume="latest")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("flip", "optimizer.bin has changed since it was written"),
        ("truncate", "model.safetensors has"),
        ("delete", "random_states_0.pkl is missing"),
        ("loop", "loop_state.json has"),
    ],
)
def test_a_damaged_checkpoint_names_the_file_and_the_older_intact_one(finished_run, tmp_path, damage, named):
    run_dir = copy_run(finished_run, tmp_path / "run")
    folder = list_checkpoints(run_dir)[-1]
    if damage == "flip":
        data = bytearray((folder / "optimizer.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "optimizer.bin").write_bytes(bytes(data))
    elif damage == "truncate":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "delete":
        (folder / "random_states_0.pkl").unlink()
    else:
        (folder / "loop_state.json").write_text("{}")
    with pytest.raises(CheckpointError) as error:
        run(run_dir, resume="latest")
    message = str(error.value)
    assert named in message and "step_00000003 is damaged" in message
    assert f"--resume {run_dir / 'checkpoints' / 'step_00000002'}" in message

    # The advice works: resuming the older checkpoint retrains step 3.
    resumed = run(run_dir, resume=str(run_dir / "checkpoints" / "step_00000002"))
    assert resumed.step == 3 and [line["step"] for line in resumed.history] == [3]


def test_a_checkpoint_of_an_older_layout_is_refused(finished_run, tmp_path):
    folder = list_checkpoints(copy_run(finished_run, tmp_path / "run"))[-1]
    (folder / "checkpoint_complete.json").write_text(json.dumps({"step": 3, "max_steps": 3}))
    with pytest.raises(CheckpointError, match="older version of modsquad"):
        run(tmp_path / "run", resume="latest")


# ----------------------------------------------------------------------------------------- recipe on resume
def test_resume_refuses_recipe_changes_the_checkpoint_fixes_and_honours_the_rest(
    finished_run, tmp_path, capsys
):
    run_dir = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(CheckpointError) as error:
        run(run_dir, resume="latest", optimization={"learning_rate": 0.5, "weight_decay": 0.0}, seed=1)
    message = str(error.value)
    for fragment in ("optimization.learning_rate: 0.001 -> 0.5", "optimization.weight_decay: 0.05 -> 0.0"):
        assert fragment in message
    assert "seed: 0 -> 1" in message and "training.max_steps" in message  # what may change is listed
    with pytest.raises(CheckpointError, match=r"tasks.colour.batch_size: 32 -> 8"):
        run(run_dir, resume="latest", tasks=[{"name": "colour", "batch_size": 8}, {"name": "bright"}])

    longer = run(run_dir, resume="latest", training={"max_steps": 4})
    assert longer.step == 4
    assert "honouring the changed training.max_steps: 3 -> 4" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------- run folders
def test_a_new_run_refuses_a_folder_that_holds_a_run(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = (run_dir / "training_log.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a run .*--resume.*--overwrite"):
        run(run_dir)
    assert (run_dir / "training_log.jsonl").read_text() == before  # nothing was touched
    with pytest.raises(ValueError, match="contradict"):
        run(run_dir, resume="latest", overwrite=True)

    (run_dir / "notes.txt").write_text("mine")
    fresh = run(run_dir, overwrite=True, training={"max_steps": 1, "save_every": 0})
    assert fresh.step == 1 and list_checkpoints(run_dir) == []
    assert "deleted the earlier run's" in capsys.readouterr().out
    assert (run_dir / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert [json.loads(x)["step"] for x in (run_dir / "training_log.jsonl").read_text().splitlines()] == [1]

    # A finished run without checkpoints: `--resume` has nothing to resume and must not replace its final model.
    with pytest.raises(ValueError, match="finished run without checkpoints"):
        run(run_dir, resume="latest", training={"max_steps": 1, "save_every": 0})


# ----------------------------------------------------------------------------------------- failed checkpoint writes
def test_a_full_disk_during_a_checkpoint_leaves_no_partial_folder(tmp_path, monkeypatch):
    real_save = checkpointing.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the checkpoint after step 2
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpointing, "save_file", save_file)
    with pytest.raises(OSError) as error:
        run(tmp_path / "run")
    message = str(error.value)
    assert "could not write checkpoint" in message and "step_00000002" in message
    assert "loop_state.safetensors: No space left on device" in message
    assert f"last complete checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step_00000001'}" in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]
    monkeypatch.setattr(checkpointing, "save_file", real_save)
    resumed = run(tmp_path / "run", resume="latest")
    assert resumed.step == 3


def test_a_diverging_run_stops_instead_of_training_on_nan(tmp_path):
    from modsquad.training.trainer import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"step \d+: the loss is nan .*The last checkpoint is"):
        run(
            tmp_path / "run",
            optimization={"learning_rate": 1e30, "max_grad_norm": None},
            training={"max_steps": 6},
        )
