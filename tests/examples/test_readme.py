"""Every code block of README.md runs as written, so the README cannot drift from the code.

The blocks run in README order, as a reader would run them: in one scratch folder that looks like a clone of the
repository (its top-level entries linked in), `python` blocks in one shared namespace, `bash` blocks with
`bash -euo pipefail` (the `modsquad` command included), `yaml` blocks parsed. Blocks in other languages (`text`,
`bibtex`, ...) are not code and are not run.

A block is tagged by an HTML comment on the line before its opening fence (invisible on GitHub):

    <!-- readme-test: slow -->                 runs only in the full suite (`pytest -m slow` or plain `pytest`)
    <!-- readme-test: network -->              needs the Hub or PyPI: skipped (machines here are offline)
    <!-- readme-test: skip <why> -->           never run, for the reason given (e.g. it needs the user's data)

Untagged blocks run in the fast suite too, so they must be quick and must not use names or files that only a
tagged block makes. A block added to the README is tested with no change here.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
TAG = re.compile(r"^\s*<!--\s*readme-test:\s*(?P<kind>slow|network|skip)\b\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "yaml": "yaml"}
# Entries of the repository a reader's clone has; the scratch folder links them.
NOT_LINKED = {".git", "runs", ".pytest_cache", ".ruff_cache"}


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    tag: str | None = None  # "slow", "network", "skip" or None
    reason: str = ""

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'plain'}" + (f"-{self.tag}" if self.tag else "")


def markdown_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (indented ones, e.g. inside list items, included), with the tag on
    the line before each opening fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        start, indent = index, opening["indent"]
        index += 1
        body = []
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"{path.name}:{start + 1}: code block never closed")
        index += 1
        previous = lines[start - 1] if start else ""
        tag = TAG.match(previous)
        if "readme-test" in previous and not tag:
            raise ValueError(f"{path.name}:{start}: malformed tag {previous.strip()!r}")
        code = textwrap.dedent("\n".join(line.removeprefix(indent) for line in body))
        blocks.append(
            Block(
                start + 1, opening["lang"], code, tag["kind"] if tag else None, tag["reason"] if tag else ""
            )
        )
    return blocks


def runnable(blocks: list[Block]) -> list:
    """pytest parameters of the blocks to run, marked by their tags."""
    params = []
    for block in blocks:
        if block.lang not in RUN:
            continue
        marks = []
        if block.tag == "slow":
            marks.append(pytest.mark.slow)
        elif block.tag == "network":
            marks.append(pytest.mark.skip(reason=f"needs the network {block.reason}".strip()))
        elif block.tag == "skip":
            marks.append(pytest.mark.skip(reason=block.reason or "tagged skip"))
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


BLOCKS = markdown_blocks(README)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The reader's clone (a scratch folder linking the repository's entries) and the shared Python namespace."""
    clone = tmp_path_factory.mktemp("readme-clone")
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED:
            (clone / entry.name).symlink_to(entry)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    cwd = os.getcwd()
    os.chdir(clone)
    try:
        yield {"clone": clone, "env": env, "namespace": {"__name__": "__readme__"}}
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("block", runnable(BLOCKS))
def test_readme_block_runs_as_written(block: Block, session):
    if block.lang == "yaml":
        assert yaml.safe_load(block.code) is not None
        return
    if block.lang == "python":
        exec(compile(block.code, f"README.md:{block.line}", "exec"), session["namespace"])
        return
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=session["clone"],
        env=session["env"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, f"README.md:{block.line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_readme_blocks_are_found_and_tagged_correctly(tmp_path):
    languages = {block.lang for block in BLOCKS}
    assert {"python", "bash"} <= languages and len(runnable(BLOCKS)) >= 10
    assert all(block.tag != "skip" or block.reason for block in BLOCKS), "a skipped block must say why"
    sample = tmp_path / "sample.md"
    sample.write_text(
        "text\n<!-- readme-test: slow -->\n```python\nx = 1\n```\n\n- item\n\n  ```bash\n  echo hi\n  ```\n"
        "<!-- readme-test: skip needs your data -->\n```bash\nmodsquad train\n```\n```text\nnot code\n```\n"
    )
    blocks = markdown_blocks(sample)
    assert [(b.line, b.lang, b.code, b.tag, b.reason) for b in blocks] == [
        (3, "python", "x = 1", "slow", ""),
        (9, "bash", "echo hi", None, ""),
        (13, "bash", "modsquad train", "skip", "needs your data"),
        (16, "text", "not code", None, ""),
    ]
    assert [p.id for p in runnable(blocks)] == ["L3-python-slow", "L9-bash", "L13-bash-skip"]
    sample.write_text("<!-- readme-test: later -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="malformed tag"):
        markdown_blocks(sample)
