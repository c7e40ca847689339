"""`modsquad push` publishes an allow-list of each model folder (never a token file, never a link out of the folder),
says what it will upload before uploading, and a push that fails part of the way says exactly what was published and
is finished by running it again."""

from __future__ import annotations

import os

import pytest

from modsquad import ModSquadForImageClassification, ModSquadForSemanticSegmentation, ModSquadImageProcessor
from modsquad.cli import main
from modsquad.hub.push import PushError, code_files, plan_folder, push_run

pytestmark = pytest.mark.slow  # round trips through the local Hub server


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, fresh_tasks, make_run_folder, specialised_model):
    """A run folder with its multi-task model and one single-task model folder per task (not cut from it: what is
    published does not depend on how the task models were made)."""
    tasks = fresh_tasks(small=True)
    run = tmp_path_factory.mktemp("push") / "run"
    make_run_folder(run, [tasks["cls"], tasks["seg"]])
    processor = ModSquadImageProcessor(size={"height": 32, "width": 32})
    for task, model_class in (
        (tasks["cls"], ModSquadForImageClassification),
        (tasks["seg"], ModSquadForSemanticSegmentation),
    ):
        model_class(specialised_model([task]).config).save_pretrained(run / "tasks" / task["name"])
        processor.save_pretrained(run / "tasks" / task["name"])
    return run


def published_files(hub, repo_id: str) -> dict[str, bytes]:
    return hub.state.repos[repo_id].files


def test_only_the_allow_list_is_published_and_links_never_leave_the_folder(
    pruned_run, hub, hub_api, hub_token, tmp_path, capsys
):
    model_dir = pruned_run / "model"
    secret = tmp_path / "secret_token"
    secret.write_text("hf_secret")
    (model_dir / "loss_weights.json").write_text("{}")  # a usage file: published
    (model_dir / ".hf_token").write_text("hf_secret")
    (model_dir / "token.txt").write_text("hf_secret")
    (model_dir / "optimizer.bin").write_bytes(b"state")
    (model_dir / "unused_helper.py").write_text("x = 1\n")
    os.symlink(secret, model_dir / "preprocessor_link.json")
    os.symlink(secret, model_dir / "model-00002-of-00002.safetensors")  # an allowed name, but a link out
    try:
        files, left_out = plan_folder(model_dir, card=True)
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
        assert {"loss_weights.json", "modeling_multitask.py", "moe.py"} <= set(files)
        for name in (".hf_token", "token.txt", "optimizer.bin", "preprocessor_link.json"):
            assert name not in files and name in left_out
        assert left_out["model-00002-of-00002.safetensors"] == "a link to outside the folder"
        assert left_out["unused_helper.py"] == "code the config's auto_map does not need"
        assert set(code_files(model_dir)) == {name for name in files if name.endswith(".py")}

        assert main(["push", str(pruned_run), "--repo-id", "org/safe", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert "would upload" in out and "left out: .hf_token (not part of a published model)" in out
        assert "model-00002-of-00002.safetensors (a link to outside the folder)" in out

        push_run(pruned_run, "org/safe", api=hub_api, token=hub_token)
        published = published_files(hub, "org/safe")
        assert "token.txt" not in published and ".hf_token" not in published
        assert not any(
            b"hf_secret" in data for repo in hub.state.repos.values() for data in repo.files.values()
        )
    finally:
        for name in ("loss_weights.json", ".hf_token", "token.txt", "optimizer.bin", "unused_helper.py",
                     "preprocessor_link.json",
                     "model-00002-of-00002.safetensors"):  # fmt: skip
            (model_dir / name).unlink()


def test_a_push_that_fails_half_way_says_what_was_published_and_a_rerun_finishes(
    pruned_run, hub, hub_api, hub_token
):
    hub.state.failing_repos.add("org/half-cls")
    lines: list[str] = []
    with pytest.raises(PushError) as error:
        push_run(pruned_run, "org/half", api=hub_api, token=hub_token, log=lines.append)
    message = str(error.value)
    assert "publishing org/half-cls failed: HfHubHTTPError" in message
    assert "Published: org/half;" in message and "not attempted: org/half-seg" in message
    assert "Run the same command again" in message
    assert (error.value.published, error.value.failed, error.value.not_attempted) == (
        ["org/half"],
        "org/half-cls",
        ["org/half-seg"],
    )
    assert any(line.startswith("will upload") for line in lines)  # told before anything was uploaded
    assert hub.state.committed == ["org/half"]

    hub.state.failing_repos.clear()
    lines.clear()
    push_run(pruned_run, "org/half", api=hub_api, token=hub_token, log=lines.append)
    assert "org/half: already up to date" in lines
    assert hub.state.committed == [
        "org/half",
        "org/half-cls",
        "org/half-seg",
    ]  # the main repo was not sent again
    assert {"org/half", "org/half-cls", "org/half-seg"} <= set(hub.state.repos)
