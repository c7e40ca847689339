"""Makes Transformers' own common test mixins importable by the modsquad test suite.

`ModelTesterMixin` (tests/test_modeling_common.py), `ConfigTester` (tests/test_configuration_common.py) and
`ImageProcessingTestMixin` (tests/test_image_processing_common.py) are not in the transformers wheel, only in its
source distribution. This script downloads the sdist of the INSTALLED transformers version with pip (into a cache
folder, once), extracts those three files into `<repo>/.transformers_tests/transformers_tests/` (git-ignored) and
adds stand-ins for the few modules they import that the sdist leaves out (see `standins/`, one docstring each).

    python .ci/transformers_tests/fetch.py [--dest DIR] [--cache DIR]

Registries only (no Hub). When the download fails the script says why and exits 0: the common tests then skip
with that reason (tests/transformers_common.py) instead of breaking the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Upstream test files taken from the sdist (their path under `tests/`).
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_image_processing_common.py")
# The package name the files are imported under: not `tests`, which would clash with the project's own tests/.
PACKAGE = "transformers_tests"
STAMP = "TRANSFORMERS_VERSION"
FAILURE_NOTE = "FETCH_FAILED"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modsquad" / "transformers-sdist"


def download_sdist(version: str, cache: Path) -> Path:
    """The sdist of `transformers==version` in `cache`, downloaded with pip unless already there."""
    archive = cache / f"transformers-{version}.tar.gz"
    if archive.exists():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
    command += [f"transformers=={version}", "--dest", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.exists():
        raise RuntimeError(
            f"`pip download transformers=={version}` (sdist) failed: {(result.stderr or result.stdout).strip()[-800:]}"
        )
    return archive


def extract(archive: Path, version: str, dest: Path) -> None:
    """Writes the common files of `archive` and the stand-ins into `dest` (replacing what was there)."""
    package = dest / PACKAGE
    if dest.exists():
        shutil.rmtree(dest)
    package.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for name in COMMON_FILES:
            member = f"transformers-{version}/tests/{name}"
            try:
                source = tar.extractfile(member)
            except KeyError as error:
                raise RuntimeError(f"{archive.name} has no {member}") from error
            # Read and written by name: nothing of the archive's own paths or modes reaches the disk.
            (package / name).write_bytes(source.read())
    (package / "__init__.py").write_text("")
    standins = HERE / "standins"
    for path in standins.rglob("*.py"):
        relative = path.relative_to(standins)
        # `fetch_hub_objects_for_ci` lives in upstream's top-level utils/, which test_image_processing_common.py
        # puts on sys.path as `<tests>/../utils`.
        target = dest / "utils" / relative if relative.parent == Path(".") else package / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (dest / STAMP).write_text(version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".transformers_tests")
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args(argv)

    import transformers

    version = transformers.__version__
    try:
        archive = download_sdist(version, args.cache)
        extract(archive, version, args.dest)
    except (RuntimeError, OSError, tarfile.TarError) as error:
        # Leave the reason where the test suite finds it, so the skips say why.
        shutil.rmtree(args.dest, ignore_errors=True)
        args.dest.mkdir(parents=True, exist_ok=True)
        (args.dest / FAILURE_NOTE).write_text(str(error))
        print(f"Transformers' common tests are not available; they will be skipped: {error}", file=sys.stderr)
        return 0
    print(f"Transformers {version} common tests ready in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
