"""Readiness of the tree's components, as `/readyz` reports it."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ComponentState", "Readiness"]


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

    def mark(self, name: str, status: str, **detail: Any) -> None:
        self.components[name] = ComponentState(status, detail)

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
