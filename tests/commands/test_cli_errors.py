"""The command line: a user error is one line on stderr and exit status 2 (a bug keeps its traceback), `KEY=VALUE`
overrides go anywhere, `--resume KEY=VALUE` is an override and not a path, a missing local folder is called one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modsquad import cli
from modsquad.cli import main
from modsquad.commands import train as train_command

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
MODEL = {
    "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "num_experts": 2,
    "num_experts_per_tok": 1, "expert_intermediate_size": 16, "moe_layers": "all",
}  # fmt: skip


def recipe_file(tmp_path: Path) -> Path:
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"config": MODEL},
        "tasks": [
            {
                "name": "cls",
                "dataset": {"demo": True, "num_train": 8, "num_val": 2, "image_size": 32},
                "batch_size": 4,
                "image_size": 32,
                "eval_split": None,
            }
        ],
        "training": {"max_steps": 2, "tracker": "none", "cpu": True, "eval_at_end": False, "log_every": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["training.max_stpes=3"], "unknown training key(s) 'max_stpes' (did you mean 'max_steps'?)"),
        (["optimization.max_grad_norm=-1"], "optimization.max_grad_norm must be a finite number >= 0"),
        (["model.config.layer_norm_eps=0"], "layer_norm_eps must be a finite number > 0"),
        (["training.cpu='no'"], "training.cpu must be true or false, got 'no'"),
        (["tasks.cls.labels=[]"], "tasks.cls.labels must be a non-empty list"),
        (["tasks.cls.name=train"], "'train' is reserved"),
    ],
)
def test_a_bad_recipe_value_is_one_line_and_exit_status_2(tmp_path, capsys, args, expected):
    assert main(["train", "--config", str(recipe_file(tmp_path)), *args]) == 2
    line = one_error_line(capsys)
    assert line.startswith("modsquad train: error: ") and expected in line


def test_missing_files_and_folders_are_named_as_such(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file" in one_error_line(capsys)
    assert main(["evaluate", "./no/such/checkpoint", "--dataset", "x"]) == 2
    line = one_error_line(capsys)
    assert "checkpoint './no/such/checkpoint' does not exist" in line and "Repo id must" not in line
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in one_error_line(capsys)
    (tmp_path / "broken.yaml").write_text("tasks: [unclosed\n")
    assert main(["train", "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "while parsing" in one_error_line(capsys)


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(train_command, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["train", "--config", "x.yaml"])
    assert cli.error_status(TypeError()) is None and cli.error_status(ValueError()) == 2


@pytest.mark.slow
def test_overrides_anywhere_and_resume_followed_by_an_override(tmp_path):
    parser = cli.build_parser("train")
    args = cli.parse_args(
        parser,
        ["train", "a.x=1", "--config", "r.yaml", "b.y=2", "--max-steps", "3", "tasks.cls.batch_size=4"],
    )
    assert args.overrides == ["a.x=1", "b.y=2", "tasks.cls.batch_size=4"] and args.max_steps == 3
    args = cli.parse_args(parser, ["train", "--config", "r.yaml", "--resume", "training.max_steps=4"])
    assert args.resume == "latest" and args.resume_overrides == ["training.max_steps=4"]
    args = cli.parse_args(
        parser, ["train", "--config", "r.yaml", "--resume", "runs/x/checkpoints/step_00000002"]
    )
    assert args.resume == "runs/x/checkpoints/step_00000002"
    with pytest.raises(SystemExit):
        cli.parse_args(parser, ["train", "--config", "r.yaml", "--bogus"])

    recipe = recipe_file(tmp_path)
    assert (
        main(
            ["train", "--config", str(recipe), "training.save_every=1", "--seed", "0", "training.max_steps=1"]
        )
        == 0
    )
    # The folder holds a run now: a plain start is refused, `--resume KEY=VALUE` continues it with the override.
    assert main(["train", "--config", str(recipe)]) == 2
    assert main(["train", "--config", str(recipe), "--resume", "training.max_steps=2"]) == 0
    log = (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2]
    assert main(["train", "--config", str(recipe), "--overwrite", "training.max_steps=1"]) == 0


@pytest.mark.slow
def test_the_console_script_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "modsquad.cli", "train", "--config", str(recipe_file(tmp_path)), "seed=-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "modsquad train: error: seed must be an int in [0, 4294967295], got -1"
    ]
