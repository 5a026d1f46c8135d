"""Store service: the store `KTULHU_STORE` names (a RocksDB directory, or a PostgreSQL database
shared with other servers) is opened before anything else and closed after everything; its sweeper
(expired rate-limit and sign-out records) runs while it is open, and so does its recovery: after a
failed write (disk full, I/O error, the database server gone) `/readyz` is 503 naming the cause
until the store takes writes again. Logs and `/readyz` name a PostgreSQL store without its password."""

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

#: First and longest wait between attempts to reopen a store whose writes failed.
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0


async def _recover_after_failed_writes(runtime: Runtime, store: Store) -> None:
    """Each time a write fails: 503 naming the engine's error, then recover until the store takes writes."""
    while True:
        await store.aio.write_failed.wait()
        log.error("store writes fail: %s; reopening until it takes writes", store.write_failure)
        runtime.readiness.mark("store", "failed", path=store.where, error=store.write_failure)
        wait = RETRY_FIRST_S
        while not await trio.to_thread.run_sync(store.recover):
            runtime.readiness.mark("store", "failed", path=store.where, error=store.write_failure)
            await trio.sleep(wait)  # the disk needs an operator (or a cleanup) to get space back
            wait = min(wait * 2, RETRY_MAX_S)
        store.aio.write_failed = trio.Event()
        runtime.readiness.mark("store", "ready", path=store.where)
        log.info("store takes writes again")


@asynccontextmanager
async def opened(runtime: Runtime) -> AsyncIterator[Store]:
    settings = runtime.settings
    runtime.readiness.mark("store", "starting")
    try:
        store = await trio.to_thread.run_sync(lambda: Store.open(settings.store_location, sync=settings.db_sync,
                                                                 connections=settings.store_pool))
    except Exception as error:
        runtime.readiness.mark("store", "failed", error=str(error))
        raise ServiceFailed("store", error) from error
    runtime.readiness.mark("store", "ready", path=store.where)
    log.info("store open at %s (%s, sync=%s)", store.where, store.engine, store.statistics().sync)
    try:
        with runtime.opened_store.providing(store):
            async with trio.open_nursery() as nursery:
                # expired rate-limit buckets and signed-out token entries go, so records do not pile up
                nursery.start_soon(Sweeper(store).run)
                nursery.start_soon(_recover_after_failed_writes, runtime, store)
                yield store
                nursery.cancel_scope.cancel()
    finally:
        runtime.readiness.mark("store", "stopped")
        # Closing flushes the memtable: finish it even while the tree is being cancelled.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(store.close)
            except Exception as error:  # e.g. the disk is still full: what the WAL holds is kept
                log.error("store closed with an error (the writes that returned are in its log): %s", error)
            else:
                log.info("store closed")
