"""Fixtures of the Hub tests: a local Hub-compatible server (implemented in tests/hub_server.py) and its card checks."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
from huggingface_hub import HfApi

from hub_server import running_hub, validate_card


@pytest.fixture(name="hub_token", scope="session")
def hub_token_fixture() -> str:
    """The token the `hub` server accepts."""
    return "hf_modsquad_test_token"


@pytest.fixture(name="hub")
def hub_fixture(hub_token, monkeypatch):
    """A fresh, empty Hub-compatible server on 127.0.0.1 (a `RunningHub`: `.url`, `.state`), accepting `hub_token`.
    This process's huggingface_hub is online for the test (the suite runs with HF_HUB_OFFLINE=1, which
    huggingface_hub reads once, at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with running_hub(hub_token) as hub:
        yield hub


@pytest.fixture(name="hub_api")
def hub_api_fixture(hub, hub_token) -> HfApi:
    """An `HfApi` client of the `hub` server."""
    return HfApi(endpoint=hub.url, token=hub_token)


@pytest.fixture(name="validate_card", scope="session")
def validate_card_fixture():
    """The function `validate_card(content) -> list[str]`: the problems the Hub would find in a model card's
    metadata (none: `[]`)."""
    return validate_card
