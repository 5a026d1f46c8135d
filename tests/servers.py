"""The server's supervision tree (store, model, engine, router, title worker: no HTTP) running inside
a test's trio run. The whole server with HTTP is the `live_server` fixture of `tests/conftest.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ktulhu.nurseries import tree
from ktulhu.nurseries.runtime import Runtime
from ktulhu.settings import load_settings


@asynccontextmanager
async def running_tree(root: Path, **env: str) -> AsyncIterator[Runtime]:
    """`async with running_tree(server_dir, KTULHU_SLOTS="2") as runtime:` runs the services of a
    server laid out in `root` (see the `server_dir` fixture), with the real default model.

    Every service is ready when the block starts; leaving the block cancels the tree, which stops
    the services in order and closes the store."""
    settings = load_settings(environ={"LLAMA_CLI_THREADS": "1", "JWT_SECRET": "s" * 40, "KTULHU_ANON_RATE": "0",
                                      **env}, root=root)
    runtime = Runtime(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree.run, runtime)
        with trio.fail_after(60):
            await runtime.readiness.wait_ready()
        yield runtime
        nursery.cancel_scope.cancel()
