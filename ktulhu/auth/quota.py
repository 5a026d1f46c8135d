"""Generation quotas: free accounts get `KTULHU_FREE_GENERATIONS`, paid and admin accounts no limit.

A generation is paid for before it runs: `reserve` atomically checks the limit and adds one to the
count (the store serialises it per user), so concurrent requests can never exceed the quota. When
the generation then produces nothing (the engine refused it or failed before its first token) the
reservation is refunded; a reply that was delivered, even partly or cut short by the client,
counts.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..nurseries.runtime import Runtime
from ..settings import Settings
from ..store.records import User

__all__ = ["QuotaExceeded", "Reservation", "UNLIMITED_ROLES", "UserGone", "generation_limit", "refund", "reserve", "usage"]

UNLIMITED_ROLES = ("paid", "admin")


class QuotaExceeded(Exception):
    """A free account used all its generations."""


class UserGone(Exception):
    """The account was deleted while the request ran."""


def generation_limit(settings: Settings, user: User) -> int | None:
    """The user's generation limit; None = unlimited. Unknown roles count as free."""
    return None if user.role in UNLIMITED_ROLES else settings.free_generations


def usage(settings: Settings, user: User, count: int | None = None) -> dict[str, Any]:
    """`generation_count`, `generation_limit`, `generations_remaining` and `can_generate` (original §2.3)."""
    count = user.generation_count if count is None else count
    limit = generation_limit(settings, user)
    return {
        "generation_count": count,
        "generation_limit": limit,
        "generations_remaining": None if limit is None else limit - min(count, limit),
        "can_generate": limit is None or count < limit,
    }


@attrs.define
class Reservation:
    """One reserved generation; `refund()` gives it back at most once."""

    runtime: Runtime
    user: User
    generation_count: int
    refunded: bool = False

    async def refund(self) -> None:
        if not self.refunded:
            self.refunded = True
            await refund(self.runtime, self.user.id)


async def reserve(runtime: Runtime, user: User) -> Reservation:
    """Count one generation for `user` if the quota allows; raises `QuotaExceeded` or `UserGone`."""
    store = runtime.store
    assert store is not None
    result = await store.aio.increment_generation_count(user.id, limit=generation_limit(runtime.settings, user))
    if result.generation_count is None:
        raise UserGone(user.id)
    if not result.allowed:
        raise QuotaExceeded(user.id)
    return Reservation(runtime, user, result.generation_count)


async def refund(runtime: Runtime, user_id: str) -> None:
    store = runtime.store
    assert store is not None
    await store.aio.increment_generation_count(user_id, by=-1)
