"""Shared fixtures: the repository root, the default model, isolated server directories, and a
whole server (store, model, router, hypercorn) running on a loopback port inside the test's trio run."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from ktulhu import ports
from ktulhu.nurseries import root
from ktulhu.nurseries.runtime import Runtime
from ktulhu.settings import default_model_path, load_settings
from tests.paths import REPO
from tests.postgres import postgres_server, postgres_url  # noqa: F401  (fixtures: a real PostgreSQL)


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
    os.symlink(REPO / "models" / "intent_router", tmp_path / "models" / "intent_router")
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
    return ports.free_port()


#: A JWT secret for servers started by tests (at least 32 bytes).
TEST_JWT_SECRET = "test-secret-" + "0123456789abcdef" * 3


@attrs.frozen
class LiveServer:
    """A server started by `live_server`: its base URLs and the runtime it serves."""

    url: str
    ws_url: str
    runtime: Runtime
    root: Path


LiveServerFactory = Callable[..., AbstractAsyncContextManager[LiveServer]]


@pytest.fixture
def live_server(server_dir: Path) -> LiveServerFactory:
    """`async with live_server(KTULHU_ANON_RATE="0", ...) as server:` runs the whole server on
    127.0.0.1 (any free port) with the real default model and router, in the test's directory.

    The server is ready (store, model and router usable) when the block starts; leaving the block
    stops it gracefully, like SIGTERM."""

    @asynccontextmanager
    async def start(**env: str) -> AsyncIterator[LiveServer]:
        settings = load_settings(
            environ={"KTULHU_HOST": "127.0.0.1", "KTULHU_PORT": "0", "LLAMA_CLI_THREADS": "1",
                     "JWT_SECRET": TEST_JWT_SECRET, "KTULHU_GRACEFUL_TIMEOUT": "1", **env},
            root=server_dir,
        )
        async with trio.open_nursery() as nursery:
            runtime, binds = await nursery.start(root.serve, settings)
            with trio.fail_after(120):
                await runtime.readiness.wait_ready()
            port = int(binds[0].rsplit(":", 1)[1])
            yield LiveServer(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", runtime, server_dir)
            runtime.request_shutdown()

    return start
