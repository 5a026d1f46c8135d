"""The real default model and an engine on it, started under the test's trio run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from ktulhu.engine.engine import Engine
from ktulhu.engine.model import Model
from ktulhu.settings import Settings, load_settings
from tests.paths import REPO


@pytest.fixture(scope="session")
def agent_settings() -> Settings:
    # one decode thread: the tests share a small machine, and more threads only contend
    return load_settings(environ={"LLAMA_CLI_THREADS": "1", "KTULHU_SLOTS": "2"}, root=REPO)


@pytest.fixture(scope="session")
def smol(agent_settings: Settings) -> Model:
    model = Model.load(agent_settings)
    yield model
    model.close()


@pytest.fixture
async def engine(smol: Model, agent_settings: Settings) -> AsyncIterator[Engine]:
    engine = Engine(smol, agent_settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()
