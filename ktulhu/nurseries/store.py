"""Store service: the RocksDB directory is opened before anything else and closed after everything;
its sweeper (expired rate-limit and sign-out records) runs while it is open."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..auth.ratelimit import Sweeper
from ..store import Store
from .runtime import Runtime, ServiceFailed

__all__ = ["opened"]

log = logging.getLogger("ktulhu.store")


@asynccontextmanager
async def opened(runtime: Runtime) -> AsyncIterator[Store]:
    settings = runtime.settings
    runtime.readiness.mark("store", "starting")
    try:
        store = await trio.to_thread.run_sync(lambda: Store.open(settings.db_dir, sync=settings.db_sync))
    except Exception as error:
        runtime.readiness.mark("store", "failed", error=str(error))
        raise ServiceFailed("store", error) from error
    runtime.store = store
    runtime.readiness.mark("store", "ready", path=str(settings.db_dir))
    log.info("store open at %s (sync=%s)", settings.db_dir, settings.db_sync)
    try:
        async with trio.open_nursery() as nursery:
            # expired rate-limit buckets and signed-out token entries go, so records do not pile up
            nursery.start_soon(Sweeper(store).run)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        runtime.store = None
        runtime.readiness.mark("store", "stopped")
        # Closing flushes the memtable: finish it even while the tree is being cancelled.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
        log.info("store closed")
