"""SIGINT/SIGTERM: the first asks for a graceful stop under a deadline, the second stops at once."""

from __future__ import annotations

import logging
import signal

import trio

from .runtime import Runtime

__all__ = ["watch"]

log = logging.getLogger("ktulhu")

#: Time the tree gets after in-flight work is cancelled, to close the store and free the model.
CLOSE_MARGIN_S = 1.0


async def watch(runtime: Runtime, root: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not runtime.shutting_down.is_set():
                grace = runtime.settings.graceful_timeout
                log.info("%s: stopping (in-flight work gets %.1f s)", name, grace)
                runtime.request_shutdown()
                root.deadline = min(root.deadline, trio.current_time() + grace + CLOSE_MARGIN_S)
            else:
                log.warning("%s again: stopping now", name)
                root.cancel()
