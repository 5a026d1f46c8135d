"""Shared fixtures: the repository root, the default model, and isolated server directories."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from ktulhu.settings import default_model_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def default_model() -> Path:
    path = REPO / default_model_path()
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make test` (it pulls the model) or `ktulhu models pull`")
    return path


@pytest.fixture
def server_dir(tmp_path: Path, default_model: Path) -> Path:
    """A working directory laid out like a checkout: config files, template, model reachable."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copy(REPO / "chat_template.jinja", tmp_path / "chat_template.jinja")
    (tmp_path / "models").mkdir()
    os.symlink(default_model, tmp_path / default_model_path())
    return tmp_path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every Ktulhu/original variable from the process environment for this test."""
    for name in list(os.environ):
        if name.startswith(("KTULHU_", "LLAMA_CLI_", "STRIPE_", "INTENT_ROUTER_")) or name in (
            "JWT_SECRET", "GOOGLE_CLIENT_ID", "APPLE_CLIENT_ID", "CHAT_TEMPLATE_PATH", "RUST_LOG",
            "PHATIC_MODEL_DIR",
        ):
            monkeypatch.delenv(name)


@pytest.fixture
def free_port() -> int:
    """A loopback port that was free a moment ago (for servers that must be told their port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
