"""Records and their JSON codec, with the original server's field names and field order.

`encode(record)` writes compact JSON (like serde_json: no spaces, non-ASCII kept as UTF-8); optional
fields of the original are written as ``null``, never omitted. Fields Ktulhu added (``seq``) are
written only when set, so a record written by the original decodes and re-encodes to the same bytes.
Unknown fields are kept in ``extra`` and written back, so nothing a newer or older writer stored is
lost on a read-modify-write.

`decode(cls, raw)` accepts what the original wrote (fields with serde defaults may be missing) and
raises `CorruptRecord` for anything else: bad JSON, a missing required field, a wrong type.
"""

from __future__ import annotations

import json
import time
from typing import Any, TypeVar

import attrs

from .errors import CorruptRecord

try:  # orjson is 3-5x faster; the stdlib writes the same JSON (compact, UTF-8) when it is absent
    import orjson

    def _dumps(data: Any) -> bytes:
        return orjson.dumps(data)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - exercised where orjson is not installed

    def _dumps(data: Any) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads

__all__ = [
    "ApiKey",
    "Chat",
    "Message",
    "MessageAttachment",
    "RateBucket",
    "StripeEvent",
    "User",
    "UserDevice",
    "decode",
    "encode",
    "now_ms",
    "ts_ms",
]

ANY = None  # field metadata: any JSON value
_NOTHING = attrs.NOTHING
R = TypeVar("R")


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


# --- codec ---------------------------------------------------------------------------------------


@attrs.frozen
class _Spec:
    name: str
    types: tuple[type, ...] | None
    optional: bool
    new: bool
    nested: type | None
    required: bool
    default: Any  # a zero-argument callable giving the default, None when required


_SPECS: dict[type, tuple[_Spec, ...]] = {}


def _specs(cls: type) -> tuple[_Spec, ...]:
    try:
        return _SPECS[cls]
    except KeyError:
        pass
    specs = tuple(
        _Spec(
            name=a.name,
            types=a.metadata["types"],
            optional=a.metadata["optional"],
            new=a.metadata["new"],
            nested=a.metadata["nested"],
            required=a.default is _NOTHING,
            default=_default_maker(a.default),
        )
        for a in attrs.fields(cls)
        if not a.metadata.get("extra")
    )
    _SPECS[cls] = specs
    return specs


def _default_maker(default: Any) -> Any:
    if default is _NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory
    return lambda: default


def to_dict(record: Any) -> dict[str, Any]:
    """The record as a JSON-ready dict in the original's field order (``extra`` fields last)."""
    out: dict[str, Any] = {}
    for spec in _specs(type(record)):
        value = getattr(record, spec.name)
        if spec.new and value is None:
            continue
        if spec.nested is not None:
            value = [to_dict(item) for item in value]
        out[spec.name] = value
    for name, value in record.extra.items():
        out.setdefault(name, value)
    return out


def encode(record: Any) -> bytes:
    """Compact UTF-8 JSON of `record`."""
    return _dumps(to_dict(record))


_MISSING = object()
# Per class: (name, exact JSON types or None for any, optional, required, default maker, nested class)
_Step = tuple[str, "frozenset[type] | None", bool, bool, Any, "type | None"]
_PLANS: dict[type, tuple[tuple[_Step, ...], frozenset[str]]] = {}


def _plan(cls: type) -> Any:
    try:
        return _PLANS[cls]
    except KeyError:
        pass
    steps = tuple(
        (s.name, None if s.types is None else frozenset(s.types), s.optional, s.required, s.default, s.nested)
        for s in _specs(cls)
    )
    plan = _PLANS[cls] = (steps, frozenset(s.name for s in _specs(cls)))
    return plan


def from_dict(cls: type[R], data: Any) -> R:
    """Build `cls` from a decoded JSON object; raise `CorruptRecord` when it does not fit.

    Types are checked exactly as JSON produces them (so ``true`` is not an int). The record is
    filled in directly (the records have no validators), which is several times faster than
    calling the generated ``__init__`` with keywords; reading long histories is dominated by this.
    """
    if type(data) is not dict:
        raise CorruptRecord(f"{cls.__name__} is not a JSON object")
    steps, names = _plan(cls)
    record = object.__new__(cls)
    known = 0
    for name, types, optional, required, default, nested in steps:
        value = data.get(name, _MISSING)
        if value is _MISSING or value is None:
            if value is None:
                known += 1
                if optional:
                    setattr(record, name, None)
                    continue
            if required:
                raise CorruptRecord(f"{cls.__name__}.{name} is {'null' if value is None else 'missing'}")
            setattr(record, name, default())  # a missing field, or a null where a default exists
            continue
        known += 1
        if types is not None and type(value) not in types:
            raise CorruptRecord(f"{cls.__name__}.{name} has type {type(value).__name__}")
        if nested is not None:
            value = [from_dict(nested, item) for item in value]
        setattr(record, name, value)
    extra = {k: v for k, v in data.items() if k not in names} if known != len(data) else {}
    record.extra = extra  # type: ignore[attr-defined]
    return record


def decode(cls: type[R], raw: bytes) -> R:
    """Decode stored bytes into `cls`; raise `CorruptRecord` on anything that is not such a record."""
    try:
        data = _loads(raw)
    except (ValueError, UnicodeDecodeError, TypeError) as error:
        raise CorruptRecord(f"{cls.__name__}: not JSON ({error})") from None
    return from_dict(cls, data)
