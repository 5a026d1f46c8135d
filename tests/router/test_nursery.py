"""The router service in the supervision tree: readiness detail, degraded mode, runtime slot."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ktulhu.nurseries import router as router_service
from ktulhu.nurseries.runtime import Runtime
from ktulhu.router.service import RouterLoadError
from ktulhu.settings import load_settings
from tests.paths import REPO

DEFAULT_DIR = REPO / "models" / "intent_router"


def runtime_for(tmp_path: Path, **environ: str) -> Runtime:
    return Runtime(settings=load_settings(environ=environ, root=tmp_path))


async def test_degraded_without_a_model(tmp_path):
    runtime = runtime_for(tmp_path)
    async with trio.open_nursery() as nursery:
        detail = await nursery.start(router_service.run, runtime)
        assert detail["status"] == "degraded"
        assert runtime.router.current is not None and runtime.router.get().model is None
        result = await runtime.router.get().classify("¿qué es DNS?", "es")
        assert result.language == "es" and result.prompt_key == "chat_casual"
        nursery.cancel_scope.cancel()
    assert runtime.router.current is None


@pytest.mark.skipif(not (DEFAULT_DIR / "model.onnx").is_file(), reason="models/intent_router not built")
async def test_loads_the_configured_directory(tmp_path):
    runtime = runtime_for(tmp_path, INTENT_ROUTER_DIR=str(DEFAULT_DIR), INTENT_ROUTER_DEVICE="cpu",
                          KTULHU_ROUTER_TIMEOUT="5")
    async with trio.open_nursery() as nursery:
        detail = await nursery.start(router_service.run, runtime)
        assert detail["heads"] == "speech_act,domain,expectation,phatic,support"
        assert detail["device"] == "cpu"
        assert runtime.router.get().timeout == 5.0
        result = await runtime.router.get().classify("how do I set up a Postgres database?", "en")
        assert result.prompt_key == "reasoning"
        nursery.cancel_scope.cancel()
    assert runtime.router.current is None


async def test_explicit_broken_directory_fails(tmp_path):
    (tmp_path / "broken").mkdir()
    runtime = runtime_for(tmp_path, INTENT_ROUTER_DIR=str(tmp_path / "broken"))
    with pytest.raises(RouterLoadError, match="model.onnx is missing"):
        await router_service.run(runtime, task_status=trio.TASK_STATUS_IGNORED)
