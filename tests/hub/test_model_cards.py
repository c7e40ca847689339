"""Pruning a run folder and its model cards: `prune_run`, the cards' metadata and text, `modsquad prune`,
`modsquad inspect` and `modsquad push --dry-run`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from modsquad.cli import main
from modsquad.hub.model_card import render_run_cards
from modsquad.hub.push import check_repo_id
from modsquad.pruning.run import format_prune_table, prune_run
from modsquad.run_folder import RunFolder

REPO = "org/modsquad-tiny"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, fresh_tasks, make_run_folder, pixel_loader):
    tasks = fresh_tasks(small=True)
    root = tmp_path_factory.mktemp("run")
    make_run_folder(root, [tasks["cls"], tasks["seg"]])
    loaders = {
        "cls": pixel_loader(10, batches=1, batch_size=3),
        "seg": pixel_loader(11, batches=1, batch_size=3),
    }
    return root, prune_run(root, loaders)


@pytest.mark.slow
def test_prune_run_saves_every_task_model_and_reports_the_gain(pruned_run, specialised_experts):
    root, rows = pruned_run
    assert [row["task"] for row in rows] == ["cls", "seg"]
    for row in rows:
        assert row["folder"] == f"tasks/{row['task']}"
        assert row["max_abs_diff"] <= 1e-5 and row["routing_agreement"] == 1.0
        assert row["params_after"] < row["params_before"] and row["bytes_after"] < row["bytes_before"]
        assert row["load_s_before"] > 0 and row["load_s_after"] > 0
        assert sum(row["experts_mlp"]) < 2 * specialised_experts
        folder = root / row["folder"]
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
        assert (folder / "expert_usage.png").read_bytes().startswith(PNG_MAGIC)
        assert json.loads((folder / "expert_usage.json").read_text())["task"] == row["task"]
    assert json.loads((root / "pruning.json").read_text()) == json.loads(json.dumps(rows))
    assert (root / "model" / "README.md").is_file()
    assert (root / "model" / "expert_usage.png").read_bytes().startswith(PNG_MAGIC)
    table = format_prune_table(rows)
    assert table.splitlines()[0].split()[:3] == ["task", "experts", "kept"] and "seg" in table


@pytest.mark.slow
def test_card_metadata_is_complete_and_valid(pruned_run, tmp_path, validate_card):
    root, _ = pruned_run
    cards = render_run_cards(RunFolder.open(root), repo_id=REPO, base_model="facebook/dinov2-small")
    assert set(cards) == {root / "model", root / "tasks" / "cls", root / "tasks" / "seg"}
    expected = {
        "model": (
            "image-classification",
            "facebook/dinov2-small",
            ["modsquad-test/shapes-cls", "modsquad-test/shapes-seg"],
        ),
        "cls": ("image-classification", REPO, ["modsquad-test/shapes-cls"]),
        "seg": ("image-segmentation", REPO, ["modsquad-test/shapes-seg"]),
    }
    for folder, card in cards.items():
        path = tmp_path / f"{folder.name}.md"
        card.save(path)
        loaded = ModelCard.load(path)  # parses and validates the metadata (model-index included)
        data = loaded.data
        pipeline_tag, base_model, datasets = expected[folder.name]
        assert data.library_name == "transformers"
        assert data.pipeline_tag == pipeline_tag and data.base_model == base_model
        assert data.datasets == datasets and data.license == "apache-2.0"
        assert {"modsquad", "mixture-of-experts"} <= set(data.tags)
        assert validate_card(str(loaded)) == []  # the Hub-side checks of the test server
        metadata = yaml.safe_load(str(loaded).split("---")[1])
        assert ModelCardData(**metadata).to_dict() == data.to_dict()
    multitask = ModelCard.load(tmp_path / "model.md").data
    assert "multi-task" in multitask.tags and multitask.eval_results[0].metric_type == "accuracy"
    assert "pruned" in ModelCard.load(tmp_path / "seg.md").data.tags


@pytest.mark.slow
def test_card_text_tells_what_was_kept_and_how_to_use_it(pruned_run, specialised_experts):
    root, rows = pruned_run
    cards = render_run_cards(RunFolder.open(root), repo_id=REPO)
    seg = cards[root / "tasks" / "seg"].text
    row = next(r for r in rows if r["task"] == "seg")
    kept = json.loads((root / "tasks" / "seg" / "config.json").read_text())["pruned_experts"]
    for block, experts in zip((1, 3), kept):
        assert (
            f"| block {block} mlp | {len(experts)} / {specialised_experts} | {', '.join(map(str, experts))} |"
            in seg
        )
    assert "![Expert usage](expert_usage.png)" in seg
    assert f'AutoModelForSemanticSegmentation.from_pretrained("{REPO}-seg")' in seg
    assert f'pipeline("image-segmentation", model="{REPO}-seg")' in seg
    assert f"[{REPO}](https://huggingface.co/{REPO})" in seg and "`background`, `shape`" in seg
    assert f"{row['max_abs_diff']:.1e}" in seg
    multitask = cards[root / "model"].text
    assert f"[{REPO}-cls](https://huggingface.co/{REPO}-cls)" in multitask
    assert (
        "ModSquadForMultiTask.from_pretrained" in multitask and "| `cls` | accuracy | 0.7500 |" in multitask
    )
    for text in (seg, multitask):
        assert "Mod-Squad: Designing Mixture of Experts As Modular Multi-Task Learners" in text
        assert "Zhao, Hengshuang" in text and "Learned-Miller, Erik" in text
        assert "An Image is Worth 16x16 Words" in text and "apache-2.0" in text


def _shapes_dataset(folder, labels: list[str], rows: int = 6) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(rows)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=labels)})
    split = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(rows)]}, features=features)
    DatasetDict({"validation": split}).save_to_disk(folder)


@pytest.mark.slow
def test_prune_cli_with_a_dataset_reports_the_metric_before_and_after(
    tmp_path, capsys, small_tasks, make_run_folder
):
    make_run_folder(tmp_path / "run", [small_tasks["cls"], small_tasks["seg"]])
    _shapes_dataset(tmp_path / "cls-data", small_tasks["cls"]["labels"])
    args = ["prune", str(tmp_path / "run"), "--task", "cls", "--dataset", f"cls={tmp_path / 'cls-data'}"]
    args += ["--threshold", "0"]
    assert main([*args, "--batch-size", "3", "--json", str(tmp_path / "rows.json")]) == 0
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["metric"] == "accuracy" and row["metric_after"] == row["metric_before"]
    assert row["max_abs_diff"] <= 1e-5  # calibrated on the same rows it is checked on
    assert "cls" in capsys.readouterr().out and (tmp_path / "run" / "tasks" / "cls" / "README.md").is_file()
    assert not (tmp_path / "run" / "tasks" / "seg").exists()


@pytest.mark.slow
def test_prune_from_training_ema_then_inspect_and_dry_run_push(
    tmp_path, capsys, small_tasks, make_run_folder
):
    run = tmp_path / "run"
    make_run_folder(run, [small_tasks["cls"], small_tasks["seg"]])
    # The trainer's EMA: per task, per router, the share of each expert (experts 6 and 7 unused by cls).
    cls_share = [[0.3, 0.2, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0]] * 2
    (run / "expert_usage_ema.json").write_text(json.dumps({"cls": cls_share, "seg": [[0.125] * 8] * 2}))
    assert main(["prune", str(run), "--threshold", "0.15"]) == 0
    cls_config = json.loads((run / "tasks" / "cls" / "config.json").read_text())
    assert cls_config["pruned_experts"] == [[0, 1, 2]] * 2 and cls_config["num_experts"] == [3, 3]
    capsys.readouterr()

    assert (
        main(
            [
                "inspect",
                str(run / "tasks" / "cls"),
                "--plot",
                str(tmp_path / "cls.png"),
                "--json",
                str(tmp_path / "d.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "kept from the parent: [0, 1, 2]" in out and "pruned from" in out
    description = json.loads((tmp_path / "d.json").read_text())
    assert [r["original_experts"] for r in description["routers"]] == [[0, 1, 2]] * 2
    assert description["parameters"] == sum(description["parameter_groups"].values())
    assert set(description["parameter_groups"]) >= {"routers", "MLP experts", "head cls"}
    assert (tmp_path / "cls.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["inspect", str(run), "--plot", str(tmp_path / "all.png")]) == 0
    assert (tmp_path / "all.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()

    assert main(["push", str(run), "--repo-id", "org/demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for repo in ("org/demo:", "org/demo-cls:", "org/demo-seg:"):
        assert "would upload" in out and repo in out
    assert "tasks/" not in out


def test_bad_folders_and_repo_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="neither a save_pretrained folder"):
        RunFolder.open(tmp_path)
    for repo_id in ("no-namespace", "a/b/c", "org/bad name"):
        with pytest.raises(ValueError, match="repo"):
            check_repo_id(repo_id)
