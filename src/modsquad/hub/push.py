"""Publishing a run to the Hugging Face Hub: the multi-task model as `org/name` and every pruned task model as
`org/name-<task>`, each with its weights (safetensors), config, image processor, modeling code, usage heat-map and a
card rendered for its repo ids, through `huggingface_hub` (`create_repo` + `upload_folder`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id
from tqdm.auto import tqdm

from ..run_folder import LOSS_WEIGHTS_FILE, PRUNING_FILE, USAGE_FILE, USAGE_PLOT, RunFolder
from .model_card import CARD_FILE, DEFAULT_LICENSE, render_run_cards

# What to do without a Hub token: the ways `huggingface_hub` finds one.
LOGIN_HINT = "log in with `hf auth login`, set the HF_TOKEN environment variable, or pass --token"

# What a model repo may receive from a model folder: weights, config, image processor, card, usage files (and the
# remote code its config's `auto_map` needs, found by `code_files`). Anything else in the folder (a token file, notes,
# checkpoints, logs) is never published.
PUBLISHED_NAMES = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    CARD_FILE,
    USAGE_FILE,
    USAGE_PLOT,
    PRUNING_FILE,
    LOSS_WEIGHTS_FILE,
)
PUBLISHED_PATTERNS = ("model-*-of-*.safetensors",)


@dataclass
class PushTarget:
    """One folder and the repo it goes to."""

    folder: Path
    repo_id: str
    task: str | None = None  # None for the main (multi-task) model


@dataclass
class PushPlan:
    """What one repo receives: `files` (names in the folder), and the folder's files left out, with why."""

    target: PushTarget
    files: list[str]
    left_out: dict[str, str] = field(default_factory=dict)


class PushError(RuntimeError):
    """A push that failed part of the way; the message and the attributes say exactly what was published.

    Attributes:
        published (`list[str]`): repos published (or already up to date) before the failure.
        failed (`str`): the repo whose upload failed.
        not_attempted (`list[str]`): repos not reached.
    """

    def __init__(self, message: str, published: list[str], failed: str, not_attempted: list[str]):
        super().__init__(message)
        self.published, self.failed, self.not_attempted = published, failed, not_attempted


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


def code_files(folder: str | Path) -> list[str]:
    """The Python files the remote code of a `save_pretrained` folder needs: the modules its config's `auto_map`
    names, the modules defining the classes of its `architectures` (what `save_pretrained` ships) and, recursively,
    their relative imports (what Transformers itself fetches)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return []
    auto_map = config.get("auto_map") or {}
    references = [
        ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])
    ]
    modules = {
        folder / f"{ref.rsplit('.', 1)[0]}.py"
        for ref in references
        # None, or code in another repo ("repo--module.Class"), is not in this folder
        if isinstance(ref, str) and "--" not in ref and "." in ref
    }
    for architecture in config.get("architectures") or []:
        pattern = re.compile(rf"^class {re.escape(str(architecture))}\b", re.MULTILINE)
        modules.update(
            path for path in folder.glob("*.py") if pattern.search(path.read_text(errors="ignore"))
        )
    needed: set[str] = set()
    for module in sorted(modules):
        if not _inside(module, folder) or not module.is_file():
            continue
        needed.add(module.name)
        for path in get_relative_import_files(module):
            if _inside(Path(path), folder) and Path(path).is_file():
                needed.add(Path(path).name)
    return sorted(needed)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every link followed, lies inside `folder`."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def plan_folder(folder: str | Path, card: bool = False) -> tuple[list[str], dict[str, str]]:
    """The files of a model folder that may be published (`PUBLISHED_NAMES`, `PUBLISHED_PATTERNS`, `code_files`)
    and the others, with why they are left out. A link is followed only when it stays inside the folder.

    Args:
        folder (`str` or `Path`): a `save_pretrained` folder.
        card (`bool`, *optional*): a card is rendered for the repo (the folder's own README is replaced).
    """
    folder = Path(folder)
    allowed_code = set(code_files(folder))
    files, left_out = [], {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_symlink() and not _inside(path, folder):
            left_out[name] = "a link to outside the folder"
        elif not path.is_file():
            left_out[name] = "not a file" if not path.is_dir() else "a folder"
        elif (
            name in PUBLISHED_NAMES
            or any(fnmatch.fnmatchcase(name, p) for p in PUBLISHED_PATTERNS)
            or name in allowed_code
        ):
            files.append(name)
        elif name.endswith(".py"):
            left_out[name] = "code the config's auto_map does not need"
        else:
            left_out[name] = "not part of a published model"
    if card and CARD_FILE not in files:
        files.append(CARD_FILE)
    return sorted(files), left_out


def _stage(folder: Path, staging: Path, files: list[str], card_text: str | None) -> None:
    """Links (or copies) the planned files into `staging`, with the card rendered for the repo."""
    staging.mkdir(parents=True)
    for name in files:
        if name == CARD_FILE and card_text is not None:
            (staging / CARD_FILE).write_text(card_text, encoding="utf-8")
            continue
        source = (folder / name).resolve()  # the file itself, never a link that could be swapped
        try:
            os.link(source, staging / name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source, staging / name)


def _git_blob_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def up_to_date(api: HfApi, repo_id: str, staging: Path) -> bool:
    """Whether repo `repo_id` already holds every staged file with the same content (git blob id, or the LFS
    SHA-256 of large files), so a re-run of a push that failed part of the way skips it."""
    try:
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo_id, recursive=True)
            if hasattr(entry, "blob_id")
        }
    except Exception:  # no such repo yet, no access, no network: upload
        return False
    for path in staging.iterdir():
        entry = remote.get(path.name)
        if entry is None:
            return False
        lfs = getattr(entry, "lfs", None)
        same = lfs.sha256 == _sha256(path) if lfs is not None else entry.blob_id == _git_blob_sha(path)
        if not same:
            return False
    return True


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
    log: Callable[[str], Any] | None = None,
    api: HfApi | None = None,
) -> dict[str, list[str]]:
    """Uploads a run (or a single save_pretrained folder) to the Hub.

    The main model goes to `repo_id`; each pruned task model of `RUN/tasks/<task>/` to `<repo_id>-<task>`. Cards
    are rendered again for these repo ids (loading snippets, links between parent and task models, `base_model`).
    Only an allow-list of each folder's files is published (see [`plan_folder`]); links out of a folder are never
    followed. Repos that already hold exactly these files are skipped, so running a push again after it failed
    part of the way publishes the rest.

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
        log (`Callable[[str], Any]`, *optional*): told, before anything is uploaded, what each repo will receive
            and what is left out, then what was published.
        api (`HfApi`, *optional*): the client to use (default: `HfApi(token=token)`).

    Returns:
        `dict[str, list[str]]`: repo id -> the files uploaded to it (or found up to date).

    Raises:
        [`PushError`]: an upload failed; its message lists the repos published, the one that failed and the ones not
        attempted.
    """
    log = log or (lambda line: None)
    run = RunFolder.open(run_dir)
    targets = push_targets(run, repo_id, tasks)
    if not dry_run and token is None and get_token() is None:
        raise ValueError(f"pushing to the Hub needs a token: {LOGIN_HINT}")
    cards = render_run_cards(run, repo_id=repo_id, license=license, base_model=base_model, tasks=tasks)
    plans = []
    for target in targets:
        files, left_out = plan_folder(target.folder, card=cards.get(target.folder) is not None)
        if not any(name.endswith(".safetensors") for name in files):
            raise ValueError(f"{target.folder} holds no safetensors weights; is it a save_pretrained folder?")
        plans.append(PushPlan(target, files, left_out))
    verb = "would upload" if dry_run else "will upload"
    for plan in plans:
        log(f"{verb} {len(plan.files)} files to {plan.target.repo_id}: {', '.join(plan.files)}")
        if plan.left_out:
            log(f"  left out: {', '.join(f'{name} ({why})' for name, why in plan.left_out.items())}")
    uploaded = {plan.target.repo_id: plan.files for plan in plans}
    if dry_run:
        return uploaded
    api = api if api is not None else HfApi(token=token)
    published: list[str] = []
    bar = tqdm(plans, desc="push", unit="repo")
    with tempfile.TemporaryDirectory(prefix="modsquad-push-") as tmp:
        for index, plan in enumerate(bar):
            target = plan.target
            bar.set_postfix(repo=target.repo_id)
            card = cards.get(target.folder)
            staging = Path(tmp) / str(index)
            _stage(target.folder, staging, plan.files, str(card) if card is not None else None)
            try:
                if up_to_date(api, target.repo_id, staging):
                    log(f"{target.repo_id}: already up to date")
                else:
                    api.create_repo(target.repo_id, private=private, exist_ok=True)
                    api.upload_folder(
                        repo_id=target.repo_id, folder_path=staging, commit_message=commit_message
                    )
                    log(f"published {target.repo_id} ({len(plan.files)} files)")
            except Exception as error:
                rest = [p.target.repo_id for p in plans[index + 1 :]]
                if isinstance(error, HfHubHTTPError) and getattr(error.response, "status_code", None) == 401:
                    raise ValueError(
                        f"the Hub refused the token for {target.repo_id!r} (401): {LOGIN_HINT}. Published: "
                        f"{', '.join(published) or 'nothing'}"
                    ) from error
                raise PushError(
                    f"publishing {target.repo_id} failed: {type(error).__name__}: {error}. Published: "
                    f"{', '.join(published) or 'nothing'}; not attempted: {', '.join(rest) or 'none'}. Run the same "
                    "command again: repos already up to date are skipped and the rest is published",
                    published=list(published),
                    failed=target.repo_id,
                    not_attempted=rest,
                ) from error
            published.append(target.repo_id)
    return uploaded


__all__ = [
    "PUBLISHED_NAMES",
    "PUBLISHED_PATTERNS",
    "PushError",
    "PushPlan",
    "PushTarget",
    "check_repo_id",
    "code_files",
    "plan_folder",
    "push_run",
    "push_targets",
    "up_to_date",
]
