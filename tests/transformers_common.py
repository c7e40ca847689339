"""Access to Transformers' own common test mixins (fetched by `.ci/transformers_tests/fetch.py`).

`import_common("test_modeling_common")` returns the upstream module, or skips the calling test module with the
reason it is not there (not fetched, fetched for another transformers version, or the download failed).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import transformers

REPO = Path(__file__).resolve().parents[1]
COMMON_DIR = REPO / ".transformers_tests"
FETCH_COMMAND = "python .ci/transformers_tests/fetch.py"


def unavailable_reason() -> str | None:
    """Why the common tests cannot run here, or None when they can."""
    failure = COMMON_DIR / "FETCH_FAILED"
    if failure.exists():
        return f"Transformers' common tests could not be fetched: {failure.read_text().strip()}"
    stamp = COMMON_DIR / "TRANSFORMERS_VERSION"
    if not stamp.exists():
        return f"Transformers' common tests are not fetched; run `{FETCH_COMMAND}` (CI's .ci/run does)"
    fetched = stamp.read_text().strip()
    if fetched != transformers.__version__:
        return (
            f"Transformers' common tests were fetched for transformers {fetched} but {transformers.__version__} "
            f"is installed; run `{FETCH_COMMAND}` again"
        )
    return None


def import_common(name: str) -> ModuleType:
    """The upstream module `tests/<name>.py` as `transformers_tests.<name>`; skips the calling module without it."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    pytest.importorskip(
        "parameterized", reason="Transformers' common tests need `parameterized` (dev extras)"
    )
    if str(COMMON_DIR) not in sys.path:
        sys.path.insert(0, str(COMMON_DIR))
    return importlib.import_module(f"transformers_tests.{name}")
