"""Engines on the real default model and on a tiny generated one, started under the test's trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.engine.request import EngineEvents
from ktulhu.settings import load_settings

from .tiny_gguf import write_tiny_gguf
from tests.paths import REPO


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def smol_model() -> Model:
    model = Model.load(load_settings(environ={}, root=REPO))
    yield model
    model.close()


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf: Path) -> Model:
    model = Model.load(load_settings(environ={"LLAMA_CLI_MODEL": str(tiny_gguf)}, root=REPO))
    yield model
    model.close()


EngineFactory = Callable[..., "asynccontextmanager[Engine]"]


@pytest.fixture
def running_engine() -> EngineFactory:
    """`async with running_engine(model, KTULHU_SLOTS="2", ...) as engine:` runs an engine in a nursery
    (reporting to `events` when given)."""

    @asynccontextmanager
    async def start(model: Model, events: EngineEvents = EngineEvents(), **env: str) -> AsyncIterator[Engine]:
        settings = load_settings(environ={"LLAMA_CLI_THREADS": "1", **env}, root=REPO)
        engine = Engine(model, settings, events=events)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield engine
            nursery.cancel_scope.cancel()

    return start
