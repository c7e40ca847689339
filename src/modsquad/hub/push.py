"""Publishing a run to the Hugging Face Hub: the multi-task model as `org/name` and every pruned task model as
`org/name-<task>`, each with its weights (safetensors), config, image processor, modeling code, usage heat-map and a
card rendered for its repo ids, through `huggingface_hub` (`create_repo` + `upload_folder`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm

from ..run_folder import RunFolder
from .model_card import CARD_FILE, DEFAULT_LICENSE, render_run_cards

# What to do without a Hub token: the ways `huggingface_hub` finds one.
LOGIN_HINT = "log in with `hf auth login`, set the HF_TOKEN environment variable, or pass --token"

# Never published: Python caches and editor or OS leftovers.
SKIPPED_NAMES = ("__pycache__", ".DS_Store")


@dataclass
class PushTarget:
    """One folder and the repo it goes to."""

    folder: Path
    repo_id: str
    task: str | None = None  # None for the main (multi-task) model


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid `namespace/name` Hub model id, else a ValueError saying why."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be 'namespace/name' (e.g. 'my-org/modsquad-small'), got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {error}") from error
    return repo_id


def push_targets(run: RunFolder, repo_id: str, tasks: Sequence[str] | None = None) -> list[PushTarget]:
    """What [`push_run`] uploads: the main model to `repo_id`, each pruned task model to `<repo_id>-<task>`."""
    check_repo_id(repo_id)
    found = run.task_dirs()
    task_dirs = {t: found[t] for t in run.config().task_names if t in found}
    if tasks is not None:
        missing = sorted(set(tasks) - set(task_dirs))
        if missing:
            raise ValueError(
                f"no pruned model for tasks {missing} in {run.tasks_dir}; found {sorted(task_dirs)}"
            )
        task_dirs = {t: task_dirs[t] for t in tasks}
    targets = [PushTarget(run.model_dir, repo_id)]
    targets += [
        PushTarget(folder, check_repo_id(f"{repo_id}-{task}"), task) for task, folder in task_dirs.items()
    ]
    return targets


def _stage(folder: Path, staging: Path, card_text: str | None) -> list[str]:
    """Links (or copies) the files of a save_pretrained folder into `staging`, with the card for its repo. Only the
    folder's own files go: a checkpoint folder that is also the run folder keeps `tasks/`, logs and checkpoints out."""
    staging.mkdir(parents=True)
    names = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name in SKIPPED_NAMES or path.name.startswith("."):
            continue
        if path.name == CARD_FILE and card_text is not None:
            continue
        try:
            os.link(path, staging / path.name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(path, staging / path.name)
        names.append(path.name)
    if card_text is not None:
        (staging / CARD_FILE).write_text(card_text, encoding="utf-8")
        names.append(CARD_FILE)
    return sorted(names)


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    tasks: Sequence[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    commit_message: str = "Upload Mod-Squad model with modsquad",
    dry_run: bool = False,
) -> dict[str, list[str]]:
    """Uploads a run (or a single save_pretrained folder) to the Hub.

    The main model goes to `repo_id`; each pruned task model of `RUN/tasks/<task>/` to `<repo_id>-<task>`. Cards
    are rendered again for these repo ids (loading snippets, links between parent and task models, `base_model`).

    Args:
        run_dir (`str` or `Path`): a run folder or a `save_pretrained` folder.
        repo_id (`str`): `namespace/name` of the main model.
        tasks (`Sequence[str]`, *optional*): push only these task models (the main model is always pushed).
        private (`bool`, *optional*): create the repos private.
        token (`str`, *optional*): Hub token; defaults to `HF_TOKEN` or the saved login.
        license (`str`, *optional*, defaults to `"apache-2.0"`): license on the cards.
        base_model (`str`, *optional*): Hub id of the dense model the main model was upcycled from.
        commit_message (`str`, *optional*): commit message of every upload.
        dry_run (`bool`, *optional*, defaults to `False`): only return what would be uploaded.

    Returns:
        `dict[str, list[str]]`: repo id -> the files uploaded to it.
    """
    run = RunFolder.open(run_dir)
    targets = push_targets(run, repo_id, tasks)
    if not dry_run and token is None and get_token() is None:
        raise ValueError(f"pushing to the Hub needs a token: {LOGIN_HINT}")
    cards = render_run_cards(run, repo_id=repo_id, license=license, base_model=base_model, tasks=tasks)
    api = HfApi(token=token)
    uploaded = {}
    bar = tqdm(targets, desc="push", unit="repo", disable=dry_run)
    with tempfile.TemporaryDirectory(prefix="modsquad-push-") as tmp:
        for index, target in enumerate(bar):
            bar.set_postfix(repo=target.repo_id)
            card = cards.get(target.folder)
            staging = Path(tmp) / str(index)
            files = _stage(target.folder, staging, str(card) if card is not None else None)
            if "model.safetensors" not in files and not any(f.endswith(".safetensors") for f in files):
                raise ValueError(
                    f"{target.folder} holds no safetensors weights; is it a save_pretrained folder?"
                )
            uploaded[target.repo_id] = files
            if dry_run:
                continue
            try:
                api.create_repo(target.repo_id, private=private, exist_ok=True)
            except HfHubHTTPError as error:
                if error.response is not None and error.response.status_code == 401:
                    raise ValueError(
                        f"the Hub refused the token for {target.repo_id!r} (401): {LOGIN_HINT}"
                    ) from error
                raise
            api.upload_folder(repo_id=target.repo_id, folder_path=staging, commit_message=commit_message)
    return uploaded


__all__ = ["PushTarget", "check_repo_id", "push_run", "push_targets"]
