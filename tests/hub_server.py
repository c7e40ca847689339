"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only, in memory).

It implements the part of the Hub API that `huggingface_hub` and `transformers` use to publish and fetch model
repos: repo creation, README metadata validation, repo info and file tree, pre-upload (every file "regular", i.e.
inline: the LFS/Xet upload path is not covered, so test files stay small), NDJSON commits, and HEAD/GET of
`/<repo>/resolve/<revision>/<path>` with the `X-Repo-Commit`, `ETag` and `X-Error-Code` headers clients rely on.

Tests use it through the fixtures of tests/hub/conftest.py (`hub`, `hub_api`, `validate_card`); directly:

```python
with running_hub(token="hf_test") as hub:
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}  # set before huggingface_hub is imported
```
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

# Metadata values the Hub accepts, a subset of its own lists, enough to catch a malformed card.
KNOWN_LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "openrail", "other"}
KNOWN_PIPELINE_TAGS = {
    "image-classification",
    "image-segmentation",
    "object-detection",
    "depth-estimation",
    "image-feature-extraction",
}
_YAML_BLOCK = re.compile(r"^\s*---\r?\n([\s\S]*?)\r?\n---[ \t]*(\r?\n|$)")


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as the ETag and `oid` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    private: bool = False

    @property
    def sha(self) -> str:
        return self.commits[-1]


# The relations the Hub defines between a model and its base_model.
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def validate_card(content: str) -> list[str]:
    """Errors the Hub would report for the YAML metadata of a model card (a simplified check)."""
    match = _YAML_BLOCK.match(content)
    if not match:
        return []
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        return [f"invalid YAML: {error}"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    if "license" in data and data["license"] not in KNOWN_LICENSES:
        errors.append(f'"license" must be one of {sorted(KNOWN_LICENSES)}')
    if "pipeline_tag" in data and data["pipeline_tag"] not in KNOWN_PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be one of {sorted(KNOWN_PIPELINE_TAGS)}')
    for key in ("tags", "datasets", "metrics"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            errors.append(f'"{key}" must be a list of strings')
    base = data.get("base_model")
    if base is not None and not all(
        isinstance(b, str) and b.count("/") == 1 for b in ([base] if isinstance(base, str) else base)
    ):
        errors.append('"base_model" must be one or more Hub model ids (namespace/name)')
    relation = data.get("base_model_relation")
    if relation is not None and (relation not in BASE_MODEL_RELATIONS or base is None):
        errors.append(
            f'"base_model_relation" must be one of {list(BASE_MODEL_RELATIONS)}, next to "base_model"'
        )
    for example in data.get("widget") or []:
        if not isinstance(example, dict) or not str(example.get("src", "")).startswith("https://"):
            errors.append('"widget" examples of image pipelines need a "src" URL')
    for entry in data.get("model-index") or []:
        for result in entry.get("results", []):
            if "type" not in result.get("task", {}) or "type" not in result.get("dataset", {}):
                errors.append('"model-index" results need task.type and dataset.type')
            if any(
                "type" not in m or not isinstance(m.get("value"), (int, float))
                for m in result.get("metrics", [])
            ):
                errors.append('"model-index" metrics need a type and a numeric value')
    return errors


class HubState:
    """All repos, by id; one lock serialises the handlers' changes."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "METHOD path" of every request, for tests to look at
        self.committed: list[str] = []  # repo id of every accepted commit, in order
        # Commits to these repos are refused (403, as for a namespace the token may not write to; a 5xx would be
        # retried by huggingface_hub for a while).
        self.failing_repos: set[str] = set()

    def commit(self, repo: Repo, changes: dict[str, bytes | None], message: str) -> str:
        for path, data in changes.items():
            if data is None:
                repo.files.pop(path, None)
            else:
                repo.files[path] = data
        parent = repo.commits[-1] if repo.commits else ""
        sha = hashlib.sha1(f"{parent}:{message}:{sorted(repo.files)}".encode()).hexdigest()
        repo.commits.append(sha)
        return sha


class HubHandler(BaseHTTPRequestHandler):
    server_version = "ModsquadTestHub/1.0"
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the class made for each server

    def log_message(self, format: str, *args) -> None:
        pass  # quiet test output

    # ------------------------------------------------------------------------------------------------ helpers
    def _send(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False
    ):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False):
        self._send(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
            head,
        )

    def _error(self, status: int, code: str, message: str, head: bool = False):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorised(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised()):
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            return None
        return repo

    def _check_revision(self, repo: Repo, revision: str, head: bool = False) -> bool:
        if revision in ("main", repo.sha) or revision in repo.commits:
            return True
        self._error(404, "RevisionNotFound", f"Revision {revision} not found", head)
        return False

    def _info(self, repo_id: str, repo: Repo) -> dict:
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": repo.private,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(repo.files)],
            "lastModified": "2024-01-01T00:00:00.000Z",
        }

    # ---------------------------------------------------------------------------------------------- routes
    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def _route(self, method: str):
        path = unquote(urlsplit(self.path).path)
        self.state.requests.append(f"{method} {path}")
        head = method == "HEAD"
        with self.state.lock:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            match = re.fullmatch(
                r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|preupload|commit)/([^/]+)(/.*)?)?", path
            )
            if match:
                repo_id, action, revision, rest = match.groups()
                return self._api(method, repo_id, action, revision, (rest or "").lstrip("/"))
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if match and method in ("GET", "HEAD"):
                return self._resolve(head, *match.groups())
            self._error(404, "EntryNotFound", f"no route for {method} {path}", head)

    def _create_repo(self):
        if not self._authorised():
            return self._error(401, "Unauthorized", "Invalid credentials")
        payload = json.loads(self._body() or b"{}")
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        )
        url = f"http://{self.headers['Host']}/{repo_id}"
        if repo_id in self.state.repos:
            # The Hub answers 409 with the url too; create_repo(exist_ok=True) relies on the status only.
            return self._json(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self.state.commit(
            repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "init"
        )
        self.state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        payload = json.loads(self._body() or b"{}")
        errors = validate_card(payload.get("content", ""))
        if errors:
            if "text/plain" in self.headers.get("Accept", ""):
                return self._send(400, "\n".join(errors).encode(), {"Content-Type": "text/plain"})
            return self._json(400, {"errors": [{"message": e} for e in errors], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _api(self, method: str, repo_id: str, action: str | None, revision: str | None, rest: str):
        repo = self._repo(repo_id, method == "HEAD")
        if repo is None or (revision and not self._check_revision(repo, revision)):
            return None
        if method == "GET" and action in (None, "revision"):
            return self._json(200, self._info(repo_id, repo))
        if method == "GET" and action == "tree":
            prefix = f"{rest}/" if rest else ""
            entries = [
                {"type": "file", "path": p, "size": len(d), "oid": git_blob_sha(d)}
                for p, d in sorted(repo.files.items())
                if p.startswith(prefix)
            ]
            if rest and not entries:
                return self._error(404, "EntryNotFound", f"{rest} does not exist on {revision}")
            return self._json(200, entries)
        if not self._authorised():
            return self._error(401, "Unauthorized", "Invalid credentials")
        if method == "POST" and action == "preupload":
            files = json.loads(self._body())["files"]
            return self._json(
                200,
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_sha(repo.files[f["path"]]) if f["path"] in repo.files else None,
                        }
                        for f in files
                    ]
                },
            )
        if method == "POST" and action == "commit":
            return self._commit(repo_id, repo)
        return self._error(405, "MethodNotAllowed", f"{method} {action}")

    def _commit(self, repo_id: str, repo: Repo):
        if repo_id in self.state.failing_repos:
            self._body()
            return self._error(
                403, "Forbidden", f"no write access to {repo_id} (test server told to refuse it)"
            )
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        changes: dict[str, bytes | None] = {}
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                changes[value["path"]] = None
            elif key == "deletedFolder":
                changes.update({p: None for p in repo.files if p.startswith(value["path"].rstrip("/") + "/")})
            elif key != "header":
                return self._error(
                    400, "BadRequest", f"this test server takes regular files only, not {key!r}"
                )
        for path, data in changes.items():
            if path == "README.md" and data is not None and validate_card(data.decode()):
                return self._error(400, "BadRequest", "; ".join(validate_card(data.decode())))
        sha = self.state.commit(repo, changes, header.get("summary", ""))
        self.state.committed.append(repo_id)
        url = f"http://{self.headers['Host']}/{repo_id}"
        self._json(200, {"commitUrl": f"{url}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _resolve(self, head: bool, repo_id: str, revision: str, path: str):
        repo = self._repo(repo_id, head)
        if repo is None or not self._check_revision(repo, revision, head):
            return None
        headers = {"X-Repo-Commit": repo.sha}
        if path not in repo.files:
            self.send_response(404)
            for key, value in {**headers, "X-Error-Code": "EntryNotFound", "Content-Length": "0"}.items():
                self.send_header(key, value)
            self.end_headers()
            return None
        data = repo.files[path]
        headers.update({"ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"})
        self._send(200, data, headers, head)


@dataclass
class RunningHub:
    url: str
    state: HubState


@contextlib.contextmanager
def running_hub(token: str = "hf_modsquad_test") -> Iterator[RunningHub]:
    """Serves a fresh, empty Hub on 127.0.0.1 (a free port) in a background thread for the duration of the block."""
    state = HubState(token)
    handler = type("BoundHubHandler", (HubHandler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield RunningHub(f"http://127.0.0.1:{server.server_address[1]}", state)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
