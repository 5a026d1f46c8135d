"""Sign-in: email registration and login, and Google/Apple accounts, on the store's user indexes.

Account linking rules (original §8.7 fixed):
- An OAuth sign-in is linked to an existing account by email only when the provider says the email
  is verified. An unverified email is never trusted: the new account gets no email at all (so it
  cannot claim an address someone else owns either).
- Email registration proves nothing about the address. When a verified OAuth sign-in links to an
  account whose email was never verified (a password account), the account is handed to the
  verified owner: its password is removed, its app JWTs issued before now stop working and its API
  keys are revoked, so whoever registered the address first (possibly to hijack it) loses access.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from ..store.errors import IdentityTaken
from ..store.records import User, now_ms
from .api_keys import revoke_all_keys
from .oidc import IdToken
from .passwords import stored_hash, verify_password
from .principal import SESSIONS_AFTER
from .quota import FREE_POOL

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["EmailTaken", "create_email_user", "email_login", "oauth_user"]

#: `User.meta` key: True when the account's email was verified by an OAuth provider.
EMAIL_VERIFIED = "email_verified"


class EmailTaken(Exception):
    """Registration with an email another account already has."""


def _meta(user: User) -> dict:
    if not isinstance(user.meta, dict):
        user.meta = {"email": user.email, "auth_methods": []}
    if not isinstance(user.meta.get("auth_methods"), list):
        user.meta["auth_methods"] = []
    return user.meta


async def create_email_user(store: Store, email: str, password_hash: str, *, pool: str | None = None) -> User:
    """A new free account for a normalised, validated email; raises `EmailTaken`. `pool` names the
    shared free quota of unverified accounts made from the same address (`quota.FREE_POOL`)."""
    meta: dict = {"email": email, "auth_methods": ["email"]}
    if pool:
        meta[FREE_POOL] = pool
    user = User(
        id=str(uuid.uuid4()), name=None, external_id=f"email:{email}", created_ts=now_ms(),
        meta=meta, email=email, password_hash=password_hash, generation_count=0, role="free",
    )
    try:
        return await store.aio.save_user(user)
    except IdentityTaken:
        raise EmailTaken(email) from None


async def email_login(store: Store, email: str, password: str) -> User | None:
    """The account when `password` is right; None otherwise (unknown email, OAuth-only account, wrong
    password), after the same argon2 work in every case."""
    user = await store.aio.find_user_by_email(email) if email else None
    ok = await verify_password(stored_hash(user), password)
    return user if ok else None


async def oauth_user(store: Store, token: IdToken) -> User:
    """The account of a verified ID token: the one linked to its provider id, else the one with its
    verified email (linked now), else a new one."""
    for _ in range(3):  # a concurrent first sign-in of the same person may win the index: look again
        user = await store.aio.find_user_by_provider(token.provider_id)
        if user is not None:
            return await _adopt_email(store, user, token)
        if token.email_verified and token.email:
            owner = await store.aio.find_user_by_email(token.email)
            if owner is not None:
                linked = await _link(store, owner, token)
                if linked is not None:
                    return linked
                continue
        email = token.email if token.email_verified else None
        user = User(
            id=str(uuid.uuid4()), name=None, external_id=token.provider_id, created_ts=now_ms(),
            meta={"email": email, "auth_methods": [token.provider_id], EMAIL_VERIFIED: email is not None},
            email=email, generation_count=0, role="free",
        )
        try:
            return await store.aio.save_user(user)
        except IdentityTaken:
            continue
    raise RuntimeError("the account could not be resolved (concurrent changes); try again")


async def _adopt_email(store: Store, user: User, token: IdToken) -> User:
    """A returning OAuth user without an email gets the provider's verified one, if still free."""
    if user.email or not (token.email_verified and token.email):
        return user

    def change(current: User) -> User:
        if not current.email:
            meta = _meta(current)
            current.email = token.email
            meta["email"] = token.email
            meta[EMAIL_VERIFIED] = True
        return current

    try:
        updated = await store.aio.update_user(user.id, change)  # type: ignore[union-attr]
    except IdentityTaken:
        return user
    return updated or user


async def _link(store: Store, owner: User, token: IdToken) -> User | None:
    """Link the provider id to the account owning the verified email; None when it vanished or the
    provider id was taken meanwhile."""
    took_over = False

    def change(current: User) -> User:
        nonlocal took_over
        meta = _meta(current)
        if token.provider_id not in meta["auth_methods"]:
            meta["auth_methods"].append(token.provider_id)
        if current.external_id is None:
            current.external_id = token.provider_id
        if meta.get(EMAIL_VERIFIED) is not True:
            took_over = True
            current.password_hash = None
            current.api_key = current.api_secret = None
            meta.pop("password_hash", None)
            meta[SESSIONS_AFTER] = int(time.time())
        meta["email"] = token.email
        meta[EMAIL_VERIFIED] = True
        return current

    try:
        user = await store.aio.update_user(owner.id, change)
    except IdentityTaken:
        return None
    if user is not None and took_over:
        await store.aio.run(revoke_all_keys, store, user.id)
    return user
