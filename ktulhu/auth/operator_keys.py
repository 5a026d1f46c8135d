"""Operator-issued API keys (`ktulhu keys`) and the service accounts that own them and the keys of
`KTULHU_API_KEYS_FILE`.

A tool configured with a static key has nobody to sign up for it, so each key name gets its own
service account: a `User` whose provider id is `service:<name>` (CLI keys) or `keyfile:<name>`
(keys of the file). Its own account means its generations are counted apart from every other key's,
capped by the account's `GENERATION_LIMIT` when the operator set one (`--limit`), and its role is
the key's role. The keys themselves are ordinary `api_keys` records made by `create_key`: stored,
checked and revoked exactly as keys made over HTTP, so a revoked one is refused at the next request.

Blocking store work throughout: the CLI calls it directly, the server through `store.aio.run`.
"""

from __future__ import annotations

import re
import uuid

import attrs

from ..store import IdentityTaken, Store
from ..store.records import ROLES, ApiKey, User, now_ms
from .api_keys import create_key, key_id_of, list_keys
from .key_file import StaticKey, check_name

__all__ = ["GENERATION_LIMIT", "KEYFILE", "MAX_LIMIT", "SERVICE", "SERVICE_ACCOUNT", "OperatorKey",
           "OperatorKeyError", "account_limit", "check_request", "create_operator_key", "keyfile_account", "list_operator_keys", "revoke_operator_key"]

#: Provider-id prefixes of service accounts: one per CLI key name, one per keys-file name.
SERVICE = "service:"
KEYFILE = "keyfile:"
#: `User.meta` key marking a service account (value: "cli" or "keyfile").
SERVICE_ACCOUNT = "service_account"
#: `User.meta` key: the account's own cap on generations (`auth.quota` honours it for any role).
GENERATION_LIMIT = "generation_limit"
MAX_LIMIT = 1_000_000_000
_KEY_ID = re.compile(r"[0-9a-f]{32}")


class OperatorKeyError(Exception):
    """A `ktulhu keys` request that cannot be done as asked; nothing was changed."""


@attrs.frozen
class OperatorKey:
    """A stored operator key and the service account it acts as."""

    record: ApiKey
    account: User

    @property
    def limit(self) -> int | None:
        return account_limit(self.account)


def account_limit(user: User) -> int | None:
    """The account's own generation cap (None: its role decides)."""
    meta = user.meta if isinstance(user.meta, dict) else {}
    value = meta.get(GENERATION_LIMIT)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def check_request(name: str, role: str, limit: int | None) -> None:
    """Raise `OperatorKeyError` for a name, role or limit `create_operator_key` would refuse."""
    bad = check_name(name)
    if bad is not None:
        raise OperatorKeyError(bad)
    if role not in ROLES:
        shown = repr(role[:20]) + ("..." if len(role) > 20 else "")
        raise OperatorKeyError(f"unknown role {shown}; use one of {', '.join(ROLES)}")
    if limit is not None and not 0 <= limit <= MAX_LIMIT:
        raise OperatorKeyError(f"the limit must be a whole number from 0 to {MAX_LIMIT}")


def _account_meta(meta: object, limit: int | None) -> dict:
    out = dict(meta) if isinstance(meta, dict) else {}
    out[SERVICE_ACCOUNT] = "cli"
    if limit is None:
        out.pop(GENERATION_LIMIT, None)
    else:
        out[GENERATION_LIMIT] = limit
    return out


def create_operator_key(store: Store, name: str, role: str = "paid", limit: int | None = None) -> tuple[OperatorKey, str]:
    """A new key `name` with `role` (and generation cap `limit`), owned by the service account of
    that name, made now unless an earlier key of that name (all revoked) left it. Returns the key and
    the full secret key (the only time it exists). Raises `OperatorKeyError` for a bad name, role or
    limit and for a name that already has a live key; nothing is written then."""
    check_request(name, role, limit)
    provider = SERVICE + name
    account = store.find_user_by_provider(provider)
    if account is not None:
        live = [k for k in store.list_api_keys_for_user(account.id) if not k.revoked]
        if live:
            raise OperatorKeyError(f"a key named {name!r} already exists (id {live[0].id}); revoke it first "
                                   "or choose another name")
        updated = store.update_user(account.id, lambda u: attrs.evolve(u, role=role, meta=_account_meta(u.meta, limit)))
        if updated is None:
            raise OperatorKeyError(f"the service account of {name!r} was deleted meanwhile; run the command again")
        account = updated
    else:
        account = User(id=str(uuid.uuid4()), name=name, external_id=provider, created_ts=now_ms(), role=role,
                       meta=_account_meta({}, limit))
        try:
            store.save_user(account)
        except IdentityTaken:
            raise OperatorKeyError(f"a key named {name!r} was created at the same time; list the keys") from None
    record, full_key = create_key(store, account.id, name)
    return OperatorKey(record, account), full_key


def list_operator_keys(store: Store) -> list[OperatorKey]:
    """Every key of every CLI service account, revoked ones included, oldest first."""
    found = []
    for user in store.list_users():
        if isinstance(user.external_id, str) and user.external_id.startswith(SERVICE):
            found += [OperatorKey(record, user) for record in list_keys(store, user.id)]
    return sorted(found, key=lambda k: (k.record.created_ts, k.record.id))


def revoke_operator_key(store: Store, id_or_name: str) -> tuple[list[ApiKey], int]:
    """Revoke the operator key with this id (`<32 hex>` or `ktk_<32 hex>`) or every key of this name.

    Returns the keys matched and how many were live until now; raises `OperatorKeyError` when no
    operator key matches (keys of signed-up users are theirs to manage, not this command's)."""
    key_id = key_id_of(id_or_name) or (id_or_name if _KEY_ID.fullmatch(id_or_name) else None)
    if key_id is not None:
        record = store.load_api_key(key_id)
        owner = store.load_user(record.user_id) if record is not None else None
        if record is None or owner is None or not (owner.external_id or "").startswith(SERVICE):
            raise OperatorKeyError(f"no operator key has the id {key_id}; `ktulhu keys list` shows them")
        records = [record]
    else:
        if check_name(id_or_name) is not None:
            shown = repr(id_or_name[:40]) + ("..." if len(id_or_name) > 40 else "")
            raise OperatorKeyError(f"{shown} is neither a key id nor a key name; `ktulhu keys list` shows them")
        owner = store.find_user_by_provider(SERVICE + id_or_name)
        records = list_keys(store, owner.id) if owner is not None else []
        if not records:
            raise OperatorKeyError(f"no operator key is named {id_or_name!r}; `ktulhu keys list` shows them")
    revoked = 0
    for record in records:
        if not record.revoked:
            record.revoked = True
            store.save_api_key(record)
            revoked += 1
    return records, revoked


def keyfile_account(store: Store, key: StaticKey) -> User | None:
    """The service account a key of `KTULHU_API_KEYS_FILE` acts as, made at its first use and given
    the file's role whenever the file changed it; None when it was deleted meanwhile."""
    provider = KEYFILE + key.name
    user = store.find_user_by_provider(provider)
    if user is None:
        fresh = User(id=str(uuid.uuid4()), name=key.name, external_id=provider, created_ts=now_ms(), role=key.role,
                     meta={SERVICE_ACCOUNT: "keyfile"})
        try:
            user = store.save_user(fresh)
        except IdentityTaken:  # a concurrent first request made it
            user = store.find_user_by_provider(provider)
            if user is None:
                return None
    if user.role != key.role:
        user = store.update_user(user.id, lambda u: attrs.evolve(u, role=key.role))
    return user
