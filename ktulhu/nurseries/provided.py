"""A value one service of the tree provides while it runs, for handlers to read or await.

The service that owns the value provides it for exactly the scope that keeps it usable
(`with runtime.engine.providing(engine): ...`); readers take it (`get()`, which raises `NotRunning`
outside that scope), look at it (`current`, None outside it) or await it (`await wait()`), so
nothing polls for a service to come up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import trio

__all__ = ["NotRunning", "Provided"]

T = TypeVar("T")


class NotRunning(Exception):
    """The service asked for is not running: still starting, stopped, or not configured here."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"the {name} is not running (starting, stopping or not configured)")


class Provided(Generic[T]):
    """One service's value while it runs; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._value: T | None = None
        self._provided = trio.Event()

    @property
    def current(self) -> T | None:
        return self._value

    def get(self) -> T:
        if self._value is None:
            raise NotRunning(self.name)
        return self._value

    async def wait(self) -> T:
        """The value, once provided (at once when it is)."""
        while self._value is None:
            await self._provided.wait()
        return self._value

    @contextmanager
    def providing(self, value: T) -> Iterator[T]:
        """Provide `value` for the body of the `with`; readers see None again after it."""
        if self._value is not None:
            raise RuntimeError(f"the {self.name} is already provided")
        self._value = value
        self._provided.set()
        try:
            yield value
        finally:
            self._value = None
            self._provided = trio.Event()

    def __repr__(self) -> str:
        return f"Provided({self.name!r}, {'running' if self._value is not None else 'not running'})"
