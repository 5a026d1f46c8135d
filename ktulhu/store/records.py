"""The stored records, with the original server's field names and field order.

Each field's metadata (`_f`) says how `codec` writes and checks it: its JSON types, whether the
original wrote it as ``null`` when unset (``optional``), whether it is Ktulhu's and written only when
set (``new``), and the record type of a nested list. ``extra`` keeps fields no record declares.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

__all__ = [
    "ApiKey",
    "Chat",
    "Message",
    "MessageAttachment",
    "RateBucket",
    "StripeEvent",
    "User",
    "UserDevice",
    "now_ms",
    "ts_ms",
]

ANY = None  # field metadata: any JSON value
_NOTHING = attrs.NOTHING


def now_ms() -> int:
    """Wall-clock time in Unix milliseconds: what the store writes into every timestamp it sets."""
    return time.time_ns() // 1_000_000


def ts_ms(ts: int) -> int:
    """A stored timestamp in milliseconds: the original wrote seconds, Ktulhu writes milliseconds.

    Values below 10**11 (year 5138 in seconds, 1973 in milliseconds) are seconds.
    """
    return ts * 1000 if -(10**11) < ts < 10**11 else ts


def _f(types: tuple[type, ...] | None, *, default: Any = _NOTHING, factory: Any = None,
       optional: bool = False, new: bool = False, nested: type | None = None) -> Any:
    """A JSON-mapped attrs field. `new` fields are Ktulhu's and written only when not None."""
    metadata = {"types": types, "optional": optional, "new": new, "nested": nested}
    if factory is not None:
        return attrs.field(factory=factory, kw_only=True, metadata=metadata)
    if optional and default is _NOTHING:
        default = None
    return attrs.field(default=default, kw_only=True, metadata=metadata)


def _extra() -> Any:
    return attrs.field(factory=dict, kw_only=True, metadata={"extra": True})


_STR = (str,)
_INT = (int,)
_BOOL = (bool,)
_NUM = (int, float)
_LIST = (list,)


@attrs.define
class MessageAttachment:
    """An attachment as stored on a message (snake_case; the client sends camelCase)."""

    id: str = _f(_STR)
    filename: str = _f(_STR)
    mime_type: str | None = _f(_STR, optional=True)
    preview_base64: str | None = _f(_STR, optional=True)
    path: str | None = _f(_STR, optional=True)
    size: int | None = _f(_INT, optional=True)
    description: str | None = _f(_STR, optional=True)
    ocr_text: str | None = _f(_STR, optional=True)
    labels: list[str] = _f(_LIST, factory=list)
    extra: dict[str, Any] = _extra()


@attrs.define
class Message:
    """One chat message. ``ts`` is Unix milliseconds for messages Ktulhu writes, seconds for the
    original's; compare with `ts_ms`. ``seq`` (new) orders the messages of one chat: a reply always
    has a higher ``seq`` than its prompt."""

    id: str = _f(_STR)
    chat_id: str = _f(_STR)
    session_id: str | None = _f(_STR, optional=True)
    user_id: str | None = _f(_STR, optional=True)
    device_hash: str | None = _f(_STR, optional=True)
    role: str = _f(_STR)
    text: str | None = _f(_STR, optional=True)
    language: str | None = _f(_STR, optional=True)
    attachments: list[MessageAttachment] = _f(_LIST, factory=list, nested=MessageAttachment)
    liked: bool = _f(_BOOL, default=False)
    ts: int = _f(_INT)
    meta: Any = _f(ANY, optional=True)
    seq: int | None = _f(_INT, optional=True, new=True)
    extra: dict[str, Any] = _extra()

    @property
    def ts_ms(self) -> int:
        return ts_ms(self.ts)


@attrs.define
class Chat:
    """Chat metadata. ``meta`` is ``{}`` or ``{"has_summary": true}`` once touched."""

    id: str = _f(_STR)
    title: str | None = _f(_STR, optional=True)
    user_id: str | None = _f(_STR, optional=True)
    device_hash: str | None = _f(_STR, optional=True)
    updated_ts: int = _f(_INT)
    meta: Any = _f(ANY, optional=True)
    extra: dict[str, Any] = _extra()

    @property
    def updated_ms(self) -> int:
        return ts_ms(self.updated_ts)


ROLES = ("free", "paid", "admin")


@attrs.define
class User:
    """A user. ``meta`` is ``{"email", "auth_methods": [...]}`` (legacy ``password_hash`` may live
    there); ``role`` is ``free`` | ``paid`` | ``admin``."""

    id: str = _f(_STR)
    name: str | None = _f(_STR, optional=True)
    external_id: str | None = _f(_STR, optional=True)
    created_ts: int = _f(_INT)
    meta: Any = _f(ANY, optional=True)
    email: str | None = _f(_STR, optional=True)
    password_hash: str | None = _f(_STR, optional=True)
    api_key: str | None = _f(_STR, optional=True)
    api_secret: str | None = _f(_STR, optional=True)
    generation_count: int = _f(_INT, default=0)
    role: str = _f(_STR, default="free")
    stripe_customer_id: str | None = _f(_STR, optional=True)
    stripe_subscription_id: str | None = _f(_STR, optional=True)
    extra: dict[str, Any] = _extra()

    def provider_ids(self) -> list[str]:
        """Provider ids this user signs in with (``google:<sub>``, ``apple:<sub>``, ``email:<addr>``)."""
        found: list[str] = []
        methods = self.meta.get("auth_methods") if isinstance(self.meta, dict) else None
        for value in [*(methods if isinstance(methods, list) else []), self.external_id]:
            if isinstance(value, str) and ":" in value and value not in found:
                found.append(value)
        return found


@attrs.define
class UserDevice:
    """A device registered for a user at login."""

    id: str = _f(_STR)
    user_id: str = _f(_STR)
    device_hash: str = _f(_STR)
    created_ts: int = _f(_INT)
    last_seen_ts: int = _f(_INT)
    meta: Any = _f(ANY, optional=True)
    extra: dict[str, Any] = _extra()


@attrs.define
class ApiKey:
    """An API key (new). The secret is never stored, only ``secret_hash`` (the auth layer's hash)."""

    id: str = _f(_STR)
    user_id: str = _f(_STR)
    secret_hash: str = _f(_STR)
    created_ts: int = _f(_INT)
    name: str | None = _f(_STR, optional=True)
    last_used_ts: int | None = _f(_INT, optional=True)
    revoked: bool = _f(_BOOL, default=False)
    extra: dict[str, Any] = _extra()


@attrs.define
class StripeEvent:
    """A Stripe webhook event already handled (new): makes webhook processing idempotent."""

    id: str = _f(_STR)
    type: str = _f(_STR)
    received_ts: int = _f(_INT)
    extra: dict[str, Any] = _extra()


@attrs.define
class RateBucket:
    """A token bucket (new): ``tokens`` left at ``updated_ts`` (ms). ``expires_ts`` (ms) is when it
    will have refilled to full, i.e. when the record means nothing any more and may be deleted
    (None: written before expiry was recorded, or a bucket that never refills)."""

    tokens: float = _f(_NUM)
    updated_ts: int = _f(_INT)
    expires_ts: int | None = _f(_INT, optional=True, new=True)
    extra: dict[str, Any] = _extra()
