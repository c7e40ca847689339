"""The command line feels right: `modsquad --help` answers without torch, long phases show progress bars, `push`
without a token says how to log in, and every heat-map says which data it counts."""

from __future__ import annotations

import subprocess
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from modsquad.commands.demo import validation_usage_title
from modsquad.hub import push as push_module
from modsquad.hub.push import push_run
from modsquad.metrics.evaluation import evaluate_model
from modsquad.pruning import run as run_module
from modsquad.pruning.run import prune_run


@pytest.mark.slow
def test_help_answers_without_importing_torch(tmp_path):
    # Run as the console script runs: a file named `modsquad` calling the entry point.
    script = tmp_path / "modsquad"
    script.write_text(
        "import sys\nfrom modsquad.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    for command in ("demo", "train", "evaluate", "prune", "inspect", "push"):
        assert command in done.stdout


def _classification_split(rows: int = 5) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(rows)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(rows)]})


def test_evaluation_shows_a_progress_bar_of_the_images(tiny_config, capsys, small_tasks):
    from modsquad import ModSquadForImageClassification, ModSquadImageProcessor

    model = ModSquadForImageClassification(tiny_config([small_tasks["cls"]]))
    processor = ModSquadImageProcessor(size={"height": 32, "width": 32})
    evaluate_model(model, processor, _classification_split(), batch_size=2)
    err = capsys.readouterr().err
    assert "evaluate cls" in err and "0/5 " in err  # the bar counts the split's 5 images
    evaluate_model(model, processor, _classification_split(), batch_size=2, progress=False)
    assert "evaluate cls" not in capsys.readouterr().err


@pytest.mark.slow
def test_pruning_shows_progress_and_titles_say_which_data(
    tmp_path, monkeypatch, capsys, small_tasks, make_run_folder, pixel_loader
):
    titles = []

    def record(usages, path, kept=None, title=None):
        titles.append(title)

    monkeypatch.setattr(run_module, "plot_router_usage", record)
    make_run_folder(tmp_path, [small_tasks["cls"], small_tasks["seg"]])
    loaders = {"cls": pixel_loader(1, batches=1), "seg": pixel_loader(2, batches=1)}
    prune_run(tmp_path, loaders, calibration_data={"cls": "the first 2 training images"})
    assert "prune" in capsys.readouterr().err
    assert titles[0] == "cls: experts kept, usage on the first 2 training images"
    assert titles[1].startswith("seg: experts kept, usage on calibration data (") and "tokens)" in titles[1]
    assert titles[2] == "expert usage (per task: see its card)"  # the two tasks' data differ


def test_demo_heatmaps_say_they_count_the_validation_split():
    class Task:
        def __init__(self, name, rows):
            self.name, self.eval_dataset = name, list(range(rows))

    same = [Task("cls", 64), Task("seg", 64)]
    assert validation_usage_title("layer3_mlp", same) == (
        "expert usage, layer3_mlp, on the validation split (64 images per task)"
    )
    assert validation_usage_title("layer1_mlp", [Task("cls", 8), Task("seg", 4)]).endswith("(cls: 8, seg: 4)")


def test_push_without_a_token_says_how_to_log_in(tmp_path, monkeypatch, small_tasks, make_run_folder):
    make_run_folder(tmp_path, [small_tasks["cls"]])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(push_module, "get_token", lambda: None)  # no saved login either
    with pytest.raises(ValueError, match=r"needs a token: log in with `hf auth login`, set the HF_TOKEN"):
        push_run(tmp_path, "org/name")
    assert push_run(tmp_path, "org/name", dry_run=True)  # a dry run needs no token


@pytest.mark.slow
def test_push_shows_a_progress_bar_of_the_repos(
    tmp_path, monkeypatch, capsys, small_tasks, make_run_folder, pixel_loader
):
    make_run_folder(tmp_path, [small_tasks["cls"], small_tasks["seg"]])
    prune_run(tmp_path, {"cls": pixel_loader(1, batches=1), "seg": pixel_loader(2, batches=1)})
    capsys.readouterr()
    calls = []
    monkeypatch.setattr(push_module.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id))
    monkeypatch.setattr(push_module.HfApi, "upload_folder", lambda self, **kw: None)
    uploaded = push_run(tmp_path, "org/name", token="hf_test")
    assert calls == ["org/name", "org/name-cls", "org/name-seg"] == list(uploaded)
    assert "push" in capsys.readouterr().err
