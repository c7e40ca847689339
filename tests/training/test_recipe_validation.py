"""Recipes refuse what would train silently wrong: numbers out of range or not finite, string booleans, misspelt keys
in every section (with a hint), including model.config and task heads; resume says which changes it honours."""

from __future__ import annotations

import math

import pytest

from modsquad.training.recipe import RESUMABLE_KEYS, load_recipe, recipe_changes

TASK = {"name": "cls", "type": "image-classification", "dataset": {"path": "x"}}


def recipe(**fields):
    fields.setdefault("tasks", [dict(TASK)])
    return load_recipe(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"optimization": {"max_grad_norm": -1}},
            "optimization.max_grad_norm must be a finite number >= 0 or null",
        ),
        ({"optimization": {"weight_decay": -0.01}}, "optimization.weight_decay must be a finite number >= 0"),
        (
            {"optimization": {"learning_rate": math.nan}},
            "optimization.learning_rate must be a finite number > 0",
        ),
        (
            {"optimization": {"learning_rate": math.inf}},
            "optimization.learning_rate must be a finite number > 0",
        ),
        ({"optimization": {"betas": [0.9, 1.0]}}, "optimization.betas[1] must be a finite number in [0, 1)"),
        ({"optimization": {"warmup_steps": 1.5}}, "optimization.warmup_steps must be an int >= 0"),
        (
            {"optimization": {"min_lr_ratio": math.nan}},
            "optimization.min_lr_ratio must be a finite number in [0, 1]",
        ),
        ({"mixing": {"temperature": math.inf}}, "mixing.temperature must be a finite number > 0"),
        ({"training": {"max_steps": 0}}, "training.max_steps must be a positive int"),
        ({"training": {"num_epochs": math.nan}}, "training.num_epochs must be a finite number > 0"),
        (
            {"training": {"usage_ema_decay": 1.0}},
            "training.usage_ema_decay must be a finite number in [0, 1)",
        ),
        ({"training": {"max_bad_rows": -1}}, "training.max_bad_rows must be an int >= 0"),
        ({"training": {"cpu": "no"}}, "training.cpu must be true or false, got 'no'"),
        ({"training": {"eval_at_end": "false"}}, "training.eval_at_end must be true or false"),
        ({"training": {"save_final_model": 0}}, "training.save_final_model must be true or false"),
        ({"seed": -1}, "seed must be an int in [0, 4294967295]"),
        ({"seed": 2**40}, "seed must be an int in [0, 4294967295]"),
        ({"overwrite": "yes"}, "overwrite must be true or false"),
        ({"resume": "latest", "overwrite": True}, "contradict"),
        (
            {"tasks": [{**TASK, "loss_weight": math.nan}]},
            "tasks.cls.loss_weight must be a finite number >= 0",
        ),
        ({"tasks": [{**TASK, "batch_size": 0}]}, "tasks.cls.batch_size must be a positive int, got 0"),
        ({"tasks": [{**TASK, "augment": "no"}]}, "tasks.cls.augment must be true or false"),
        ({"tasks": [{**TASK, "labels": []}]}, "tasks.cls.labels must be a non-empty list of class names"),
        ({"tasks": [{**TASK, "labels": ["a", "a"]}]}, "tasks.cls.labels has duplicate class names ['a']"),
        ({"tasks": [{**TASK, "name": "forward"}]}, "'forward' is reserved"),
        (
            {"tasks": [{**TASK, "batchsize": 8}]},
            "unknown tasks.cls key(s) 'batchsize' (did you mean 'batch_size'?)",
        ),
        (
            {"tasks": [{**TASK, "head": {"max_depht": 5}}]},
            "unknown tasks.cls.head (image-classification) key(s)",
        ),
        ({"tasks": [{**TASK, "type": "image-classifcation"}]}, "(did you mean 'image-classification'?)"),
        ({"model": {"config": {"hiden_size": 8}}}, "'hiden_size' (did you mean 'hidden_size'?)"),
        ({"model": {"config": {"tasks": []}}}, "model.config.tasks comes from the recipe's `tasks`"),
        ({"trainig": {}}, "unknown recipe key(s) 'trainig' (did you mean 'training'?)"),
        ({"training": {"max_step": 3}}, "'max_step' (did you mean 'max_steps'?)"),
    ],
)
def test_bad_recipes_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError) as error:
        recipe(**fields)
    assert message in str(error.value)


def test_head_keys_of_demo_tasks_are_checked_against_their_type():
    demo = {"name": "depth", "dataset": {"demo": True}, "head": {"max_depth": 5.0, "depth_scale": 0.001}}
    assert recipe(tasks=[demo]).tasks[0].head["depth_scale"] == 0.001
    with pytest.raises(ValueError, match=r"'decoder_chanels' \(did you mean 'decoder_channels'\?\)"):
        recipe(tasks=[{**demo, "head": {"decoder_chanels": 8}}])


def test_yaml_booleans_still_read_as_booleans(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "tasks: [{name: cls, type: image-classification, dataset: {path: x}}]\ntraining: {cpu: no}\n"
    )
    assert load_recipe(path).training.cpu is False
    assert load_recipe(path, ["training.cpu=yes"]).training.cpu is True


def test_recipe_changes_split_into_honoured_and_refused():
    before = recipe().to_dict()
    after = recipe(
        training={"max_steps": 10, "log_every": 5},
        optimization={"learning_rate": 0.1},
        tasks=[{**TASK, "batch_size": 8, "eval_batch_size": 4}],
        seed=3,
    ).to_dict()
    honoured, refused = recipe_changes(before, after)
    assert "training.max_steps: None -> 10" in honoured and "training.log_every: 10 -> 5" in honoured
    assert "tasks.cls.eval_batch_size: None -> 4" in honoured
    assert refused == [
        "optimization.learning_rate: 0.001 -> 0.1",
        "seed: 0 -> 3",
        "tasks.cls.batch_size: 32 -> 8",
    ]
    assert "training.max_steps" in RESUMABLE_KEYS and "optimization.learning_rate" not in RESUMABLE_KEYS


def test_task_resolutions_must_be_whole_patches():
    from modsquad.training.task_data import TaskData, build_model

    task = {"name": "depth", "type": "depth-estimation", "dataset": {"path": "x"}, "image_size": 30}
    model = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "num_experts": 2,
             "num_experts_per_tok": 1, "expert_intermediate_size": 8, "image_size": 32}  # fmt: skip
    data = TaskData(
        "depth", [], lambda rows, epoch: [], 1, config_entry={"name": "depth", "type": "depth-estimation"}
    )
    with pytest.raises(
        ValueError,
        match=r"tasks.depth.image_size=30 is not a multiple of the patch size 8; accepted: multiples of 8",
    ):
        build_model(recipe(tasks=[task], model={"config": model}), [data])


def test_a_task_option_written_inside_dataset_is_named_with_where_it_belongs(tmp_path):
    import datasets

    from modsquad.training.task_data import load_task_splits

    data_file = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"image": ["a"], "label": [0]}).to_parquet(str(data_file))
    task = recipe(tasks=[dict(TASK, dataset={"path": str(data_file), "max_train_samples": 16})]).tasks[0]
    with pytest.raises(
        ValueError,
        match=r"tasks.cls.dataset: datasets.load_dataset refused a key .*max_train_samples.*; "
        r"\['max_train_samples'\] is an option of the task, written beside `dataset` "
        r"\(tasks.cls.max_train_samples=...\)",
    ):
        load_task_splits(task)
