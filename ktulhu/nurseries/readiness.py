"""Readiness of the tree's components, as `/readyz` reports it."""

from __future__ import annotations

from typing import Any

import attrs
import trio

__all__ = ["ComponentState", "NotReady", "Readiness"]


class NotReady(Exception):
    """The tree will not become ready: a component failed or stopped, or the server is stopping."""


@attrs.frozen
class ComponentState:
    #: "starting" | "ready" | "degraded" | "unavailable" (remote workers all down) | "failed" | "stopped"
    status: str
    detail: dict[str, Any] = attrs.field(factory=dict)

    @property
    def usable(self) -> bool:
        return self.status in ("ready", "degraded")


@attrs.define
class Readiness:
    """Mutable map component -> state; written by the tree, read by HTTP handlers on the same thread."""

    components: dict[str, ComponentState] = attrs.field(factory=dict)
    stopping: bool = False
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    def mark(self, name: str, status: str, **detail: Any) -> None:
        self.components[name] = ComponentState(status, detail)
        self._changed.set()
        self._changed = trio.Event()

    def stop(self) -> None:
        """The server is stopping: `/readyz` says so and waiters for readiness give up."""
        self.stopping = True
        self._changed.set()

    async def wait_ready(self) -> None:
        """Return once every component is usable (at once when it is); raise `NotReady` naming the
        component that failed or stopped instead, so a waiter never outlives a failed start."""
        while not self.ready:
            gone = {name: c for name, c in self.components.items() if c.status in ("failed", "stopped")}
            if gone or self.stopping:
                raise NotReady(", ".join(f"{name} {c.status}" for name, c in gone.items()) or "stopping")
            await self._changed.wait()

    @property
    def ready(self) -> bool:
        return (
            not self.stopping
            and bool(self.components)
            and all(c.usable for c in self.components.values())
        )

    def snapshot(self) -> dict[str, Any]:
        if self.stopping:
            status = "stopping"
        elif self.ready:
            status = "ready"
        else:
            status = "starting"
        return {
            "status": status,
            "components": {
                name: {"status": c.status, **c.detail} for name, c in self.components.items()
            },
        }
