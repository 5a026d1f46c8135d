"""Services' values and readiness are awaited, never polled: `Provided` and `Readiness.wait_ready`."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ktulhu.nurseries.provided import NotRunning, Provided
from ktulhu.nurseries.readiness import NotReady, Readiness


async def test_a_provided_value_exists_only_inside_its_scope() -> None:
    engine: Provided[str] = Provided("engine")
    with pytest.raises(NotRunning, match="the engine is not running"):
        engine.get()
    assert engine.current is None
    with engine.providing("e1") as value:
        assert value == engine.get() == engine.current == "e1"
        with pytest.raises(RuntimeError, match="already provided"):
            with engine.providing("e2"):
                pass
        assert engine.get() == "e1"  # the refused second provider changed nothing
    assert engine.current is None


async def test_waiters_wake_when_the_value_is_provided_and_see_it_again_after_a_restart() -> None:
    engine: Provided[str] = Provided("engine")
    seen: list[str] = []

    async def waiter() -> None:
        seen.append(await engine.wait())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []  # nothing provided: the waiter is parked, not spinning
        with engine.providing("first"):
            await trio.testing.wait_all_tasks_blocked()
            assert seen == ["first"]
            assert await engine.wait() == "first"  # provided: no wait at all
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["first"]  # stopped: a new waiter waits for the next start
        with engine.providing("second"):
            await trio.testing.wait_all_tasks_blocked()
    assert seen == ["first", "second"]


async def test_wait_ready_returns_when_every_component_is_usable() -> None:
    readiness = Readiness()
    readiness.mark("store", "ready")
    readiness.mark("model", "starting")
    done: list[bool] = []

    async def waiter() -> None:
        await readiness.wait_ready()
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        readiness.mark("router", "degraded", reason="no model")  # usable, but the model still starts
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        readiness.mark("model", "ready")
    assert done == [True]
    await readiness.wait_ready()  # already ready: returns at once


@pytest.mark.parametrize("end", ["failed", "stopped", "stopping"])
async def test_wait_ready_gives_up_when_a_component_fails_or_the_server_stops(end: str) -> None:
    readiness = Readiness()
    readiness.mark("model", "starting")
    errors: list[NotReady] = []

    async def waiter() -> None:
        try:
            await readiness.wait_ready()
        except NotReady as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert errors == []
        if end == "stopping":
            readiness.stop()
        else:
            readiness.mark("model", end, error="boom")
    assert [str(e) for e in errors] == ["stopping" if end == "stopping" else f"model {end}"]
