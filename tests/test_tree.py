"""The supervision tree under trio: readiness, ordered start/stop, crashes that stop everything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ktulhu.nurseries import tree
from ktulhu.nurseries.runtime import Runtime, ServiceFailed
from ktulhu.settings import load_settings
from ktulhu.store import Store
from tests.servers import running_tree


def make_runtime(server_dir: Path, **env: str) -> Runtime:
    return Runtime(load_settings(environ={"KTULHU_DB_PATH": str(server_dir / "db"), **env}, root=server_dir))


class GatedService:
    """A service whose start-up waits for `release`, then reports `detail` (drives readiness)."""

    def __init__(self, detail: dict[str, Any] | None = None, crash_after: float | None = None) -> None:
        self.release = trio.Event()
        self.detail = detail or {"ok": True}
        self.crash_after = crash_after
        self.stopped = False

    async def run(self, runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
        await self.release.wait()
        task_status.started(dict(self.detail))
        try:
            if self.crash_after is not None:
                await trio.sleep(self.crash_after)
                raise OSError("device lost")
            await trio.sleep_forever()
        finally:
            self.stopped = True


async def test_readiness_follows_each_service_and_store_closes_last(server_dir: Path) -> None:
    runtime = make_runtime(server_dir)
    a, b = GatedService({"n_ctx": 2048}), GatedService({"status": "degraded", "reason": "no model"})
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda **kw: tree.run(runtime, services=(("a", a.run), ("b", b.run)), **kw))
        assert isinstance(runtime.store, Store)
        snap = runtime.readiness.snapshot()
        assert snap["status"] == "starting"
        assert snap["components"]["store"]["status"] == "ready"
        assert snap["components"]["a"]["status"] == "starting"
        a.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.readiness.components["a"].detail == {"n_ctx": 2048}
        assert not runtime.readiness.ready
        b.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.readiness.ready
        assert runtime.readiness.snapshot()["components"]["b"] == {"status": "degraded", "reason": "no model"}
        nursery.cancel_scope.cancel()
    assert a.stopped and b.stopped
    assert runtime.opened_store.current is None and runtime.readiness.components["store"].status == "stopped"
    assert runtime.readiness.snapshot()["status"] == "stopping"
    Store.open(runtime.settings.db_dir).close()  # the lock was released: the store reopens


async def test_crash_after_start_raises_service_failed_and_closes_store(
    server_dir: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """pytest-trio runs this under the autojump clock: the service's 30 s sleep passes at once."""
    runtime = make_runtime(server_dir)
    healthy, crashing = GatedService(), GatedService(crash_after=30.0)
    healthy.release.set()
    crashing.release.set()
    with pytest.raises(BaseException) as caught:
        await tree.run(runtime, services=(("healthy", healthy.run), ("gpu", crashing.run)))
    failure = tree.find_failure(caught.value)
    assert isinstance(failure, ServiceFailed)
    assert str(failure) == "gpu service failed: OSError: device lost"
    assert healthy.stopped
    assert runtime.readiness.components["gpu"].status == "failed"
    assert runtime.opened_store.current is None
    Store.open(runtime.settings.db_dir).close()


async def test_failure_before_ready_is_reported_with_the_service_name(server_dir: Path) -> None:
    runtime = make_runtime(server_dir)

    async def broken(runtime: Runtime, *, task_status: trio.TaskStatus[dict[str, Any]]) -> None:
        raise FileNotFoundError("weights.gguf")

    with pytest.raises(BaseException) as caught:
        await tree.run(runtime, services=(("model", broken),))
    assert str(tree.find_failure(caught.value)) == "model service failed: FileNotFoundError: weights.gguf"


async def test_store_locked_by_another_opener_fails_before_services_start(server_dir: Path) -> None:
    runtime = make_runtime(server_dir)
    holder = Store.open(runtime.settings.db_dir)
    service = GatedService()
    try:
        with pytest.raises(ServiceFailed, match="locked by another process; run one server per store"):
            await tree.run(runtime, services=(("a", service.run),))
    finally:
        holder.close()
    assert "a" not in runtime.readiness.components


async def test_real_services_load_the_default_model(server_dir: Path) -> None:
    async with running_tree(server_dir) as runtime:
        model = runtime.readiness.components["model"].detail
        assert model["n_vocab"] == 49152 and model["n_ctx_train"] >= 2048
        assert runtime.model.current is not None and runtime.model.get().tokenize("hello world", special=False)
    assert runtime.model.current is None
