"""Generation quotas: free accounts get `KTULHU_FREE_GENERATIONS`, paid and admin accounts no limit.

A generation is paid for before it runs: `reserve` atomically checks the limit and adds one to the
count (the store serialises it per user), so concurrent requests can never exceed the quota. When
the generation then produces nothing (the engine refused it or failed before its first token) the
reservation is refunded; a reply that was delivered, even partly or cut short by the client,
counts.

An account may carry its own cap (`User.meta["generation_limit"]`, set by `ktulhu keys create
--limit N` on a key's service account): it replaces the role's limit.

Email registration proves nothing, so one person could open many accounts for many free quotas.
Accounts registered by email from one client address therefore share a pool
(`KTULHU_FREE_ACCOUNTS_PER_ADDRESS` x `KTULHU_FREE_GENERATIONS` generations, counted in the store)
on top of their own count, until a Google/Apple sign-in verifies the account's email. OAuth accounts,
paid and admin accounts, and accounts made before pools existed are not pooled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from ..settings import Settings
from ..store.records import User
from .operator_keys import account_limit

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["FREE_POOL", "QuotaExceeded", "Reservation", "UNLIMITED_ROLES", "UserGone", "generation_limit",
           "pool_of", "refund", "reserve", "usage"]

UNLIMITED_ROLES = ("paid", "admin")
#: `User.meta` key: the shared free-quota pool of an account registered by email (set at registration).
FREE_POOL = "free_pool"
#: `User.meta` key set when an OAuth provider verified the account's email (see `auth.signin`).
_EMAIL_VERIFIED = "email_verified"


class QuotaExceeded(Exception):
    """A free account used all its generations."""


class UserGone(Exception):
    """The account was deleted while the request ran."""


def generation_limit(settings: Settings, user: User) -> int | None:
    """The user's generation limit; None = unlimited. Unknown roles count as free. An account with
    its own cap (an operator key made with `ktulhu keys create --limit N`) has that cap, whatever its role."""
    own = account_limit(user)
    if own is not None:
        return own
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


def pool_of(settings: Settings, user: User) -> str | None:
    """The shared pool `user`'s free generations also count against, or None."""
    if not settings.free_accounts_per_address or generation_limit(settings, user) is None:
        return None
    meta = user.meta if isinstance(user.meta, dict) else {}
    pool = meta.get(FREE_POOL)
    if not isinstance(pool, str) or not pool or meta.get(_EMAIL_VERIFIED) is True:
        return None
    return pool


@attrs.define
class Reservation:
    """One reserved generation; `refund()` gives it back at most once (to the pool too)."""

    store: Store
    user: User
    generation_count: int
    refunded: bool = False
    pool: str | None = None

    async def refund(self) -> None:
        if not self.refunded:
            self.refunded = True
            await refund(self.store, self.user.id)
            if self.pool is not None:
                await self.store.aio.run(self.store.spend_quota_pool, self.pool, limit=0, by=-1)


async def reserve(store: Store, settings: Settings, user: User) -> Reservation:
    """Count one generation for `user` (and its pool) if the quota allows; raises `QuotaExceeded` or
    `UserGone`."""
    limit = generation_limit(settings, user)
    result = await store.aio.increment_generation_count(user.id, limit=limit)
    if result.generation_count is None:
        raise UserGone(user.id)
    if not result.allowed:
        raise QuotaExceeded(user.id)
    pool = pool_of(settings, user)
    if pool is not None and limit is not None:
        if not await store.aio.run(store.spend_quota_pool, pool, limit=limit * settings.free_accounts_per_address):
            await refund(store, user.id)
            raise QuotaExceeded(user.id)
    return Reservation(store, user, result.generation_count, pool=pool)


async def refund(store: Store, user_id: str) -> None:
    await store.aio.increment_generation_count(user_id, by=-1)
