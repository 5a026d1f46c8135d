"""Key layout and id validation.

Keys are UTF-8 bytes. The original server's prefixes are kept unchanged (records written by it
read as they are); everything added by Ktulhu lives under prefixes the original never wrote:

=====================================================  ===========================================
key                                                    value
=====================================================  ===========================================
``chat:<chat_id>:msg:<ts s, 20 digits>:<message_id>``  Message JSON (original; read, never written)
``chat:meta:<chat_id>``                                Chat JSON (original)
``user:<user_id>``                                     User JSON (original)
``user_device:<user_id>:<device_id>``                  UserDevice JSON (original)
``device_lookup:<device_hash>``                        user id, raw (original; device -> last user)
``device_chat:<device_hash>:<chat_id>``                chat id, raw (original device -> chat index)
``device_chat_index:built``                            ``1`` (original)
``meta:schema_version``                                decimal schema version (new)
``meta:copy_progress``                                 JSON: an unfinished `ktulhu store copy` (new)
``msg:<chat_id>:<seq, 12 digits>``                     Message JSON (new messages, ts in ms)
``apikey:<key_id>``                                    ApiKey JSON
``stripe_event:<event_id>``                            StripeEvent JSON
``ratelimit:<scope>:<subject>``                        RateBucket JSON
``revoked_jwt:<jti>``                                  decimal expiry (ms) of a signed-out app JWT
``quota_pool:<subject>``                               decimal count of a shared free quota
``ix:...``                                             indexes, all rebuildable from the records
=====================================================  ===========================================

Indexes (values are the primary key they point to, or an id):

- ``ix:msg_id:<chat_id>:<message_id>`` -> message key (either layout)
- ``ix:recent:<ts ms, 16 digits>:<chat_id>:<message_id>`` -> message key
- ``ix:summary:<chat_id>`` -> key of the chat's last ``summary`` message
- ``ix:chat_updated:<updated ms, 16 digits>:<chat_id>`` -> chat id
- ``ix:user_chat:<user_id>:<chat_id>`` -> chat id
- ``ix:user_email:<normalised email>`` -> user id
- ``ix:user_provider:<provider id, e.g. google:123>`` -> user id
- ``ix:device:<device_hash>:<user_id>:<device_id>`` -> user_device key
- ``ix:user_apikey:<user_id>:<key_id>`` -> key id

Every id that becomes part of a key is validated first (`check_id`); ids cannot contain ``:``, so
no id can reach into another record's prefix. Free-text lookups (emails, provider ids, rate-limit
subjects) only ever form the *last* component of a key and are used for exact gets, never for
prefix scans.
"""

from __future__ import annotations

import re

from .errors import InvalidId

__all__ = [
    "ID_PATTERN",
    "MAX_TEXT_KEY",
    "check_id",
    "check_text_key",
    "next_prefix",
]

#: What an id must look like before it is allowed into a key.
ID_PATTERN = re.compile(r"\A[A-Za-z0-9_-]{1,128}\Z")
#: Ids that would collide with a fixed key component of the original layout.
RESERVED_IDS = frozenset({"meta", "msg", "built"})
#: Longest free-text key component (emails, provider ids, rate-limit subjects), in bytes.
MAX_TEXT_KEY = 512

SCHEMA_VERSION = b"meta:schema_version"
#: Written by `Store.recover` to prove the reopened store takes writes (the time, ms).
WRITE_PROBE = b"meta:write_probe"
#: In a store `ktulhu store copy` is writing, until the copy is complete (`copy.py`).
COPY_PROGRESS = b"meta:copy_progress"
DEVICE_INDEX_BUILT = b"device_chat_index:built"

CHAT_META = b"chat:meta:"
USER = b"user:"
USER_DEVICE = b"user_device:"
DEVICE_LOOKUP = b"device_lookup:"
DEVICE_CHAT = b"device_chat:"
MSG = b"msg:"
APIKEY = b"apikey:"
STRIPE_EVENT = b"stripe_event:"
RATELIMIT = b"ratelimit:"
REVOKED_JWT = b"revoked_jwt:"
QUOTA_POOL = b"quota_pool:"

IX = b"ix:"
IX_MSG_ID = b"ix:msg_id:"
IX_RECENT = b"ix:recent:"
IX_SUMMARY = b"ix:summary:"
IX_CHAT_UPDATED = b"ix:chat_updated:"
IX_USER_CHAT = b"ix:user_chat:"
IX_USER_EMAIL = b"ix:user_email:"
IX_USER_PROVIDER = b"ix:user_provider:"
IX_DEVICE = b"ix:device:"
IX_USER_APIKEY = b"ix:user_apikey:"


def check_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a safe id, else raise `InvalidId` naming `what`."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or value in RESERVED_IDS:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else repr(value[:40]) + "..."
        raise InvalidId(f"invalid {what} {shown}: use 1-128 characters from A-Z a-z 0-9 _ - (not 'meta')")
    return value


def check_text_key(value: object, what: str) -> bytes:
    """Encode a free-text key component (email, provider id); reject empty, control chars, > 512 bytes."""
    if not isinstance(value, str) or not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidId(f"invalid {what}: must be non-empty text without control characters")
    raw = value.encode()
    if len(raw) > MAX_TEXT_KEY:
        raise InvalidId(f"invalid {what}: longer than {MAX_TEXT_KEY} bytes")
    return raw


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and bool(ID_PATTERN.match(value)) and value not in RESERVED_IDS


def next_prefix(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with `prefix` (for ``:``-ended prefixes)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _e(value: str) -> bytes:
    return value.encode()


# --- record keys ---------------------------------------------------------------------------------


def legacy_msg_prefix(chat_id: str) -> bytes:
    return b"chat:" + _e(chat_id) + b":msg:"


def legacy_msg_key(chat_id: str, ts_seconds: int, message_id: str) -> bytes:
    """The original's message key (used by tests and fixtures; the server writes `msg_key`)."""
    return legacy_msg_prefix(chat_id) + b"%020d:" % ts_seconds + _e(message_id)


def msg_prefix(chat_id: str) -> bytes:
    return MSG + _e(chat_id) + b":"


def msg_key(chat_id: str, seq: int) -> bytes:
    return msg_prefix(chat_id) + b"%012d" % seq


def seq_of_msg_key(key: bytes) -> int:
    return int(key.rsplit(b":", 1)[1])


def chat_meta_key(chat_id: str) -> bytes:
    return CHAT_META + _e(chat_id)


def user_key(user_id: str) -> bytes:
    return USER + _e(user_id)


def user_device_prefix(user_id: str) -> bytes:
    return USER_DEVICE + _e(user_id) + b":"


def user_device_key(user_id: str, device_id: str) -> bytes:
    return user_device_prefix(user_id) + _e(device_id)


def device_lookup_key(device_hash: str) -> bytes:
    return DEVICE_LOOKUP + _e(device_hash)


def device_chat_prefix(device_hash: str) -> bytes:
    return DEVICE_CHAT + _e(device_hash) + b":"


def device_chat_key(device_hash: str, chat_id: str) -> bytes:
    return device_chat_prefix(device_hash) + _e(chat_id)


def apikey_key(key_id: str) -> bytes:
    return APIKEY + _e(key_id)


def stripe_event_key(event_id: str) -> bytes:
    return STRIPE_EVENT + _e(event_id)


def ratelimit_key(scope: str, subject: str) -> bytes:
    return RATELIMIT + _e(scope) + b":" + check_text_key(subject, "rate-limit subject")


def revoked_jwt_key(jti: str) -> bytes:
    return REVOKED_JWT + _e(check_id(jti, "token id"))


def quota_pool_key(subject: str) -> bytes:
    return QUOTA_POOL + check_text_key(subject, "quota pool")


# --- index keys ----------------------------------------------------------------------------------


def ix_msg_id(chat_id: str, message_id: str) -> bytes:
    return IX_MSG_ID + _e(chat_id) + b":" + _e(message_id)


def ix_recent(ts_ms: int, chat_id: str, message_id: str) -> bytes:
    return IX_RECENT + b"%016d:" % max(ts_ms, 0) + _e(chat_id) + b":" + _e(message_id)


def ix_summary(chat_id: str) -> bytes:
    return IX_SUMMARY + _e(chat_id)


def ix_chat_updated(updated_ms: int, chat_id: str) -> bytes:
    return IX_CHAT_UPDATED + b"%016d:" % max(updated_ms, 0) + _e(chat_id)


def ix_user_chat_prefix(user_id: str) -> bytes:
    return IX_USER_CHAT + _e(user_id) + b":"


def ix_user_chat(user_id: str, chat_id: str) -> bytes:
    return ix_user_chat_prefix(user_id) + _e(chat_id)


def ix_user_email(normalised_email: str) -> bytes:
    return IX_USER_EMAIL + check_text_key(normalised_email, "email")


def ix_user_provider(provider_id: str) -> bytes:
    return IX_USER_PROVIDER + check_text_key(provider_id, "provider id")


def ix_device_prefix(device_hash: str, user_id: str | None = None) -> bytes:
    prefix = IX_DEVICE + _e(device_hash) + b":"
    return prefix if user_id is None else prefix + _e(user_id) + b":"


def ix_device(device_hash: str, user_id: str, device_id: str) -> bytes:
    return ix_device_prefix(device_hash, user_id) + _e(device_id)


def ix_user_apikey_prefix(user_id: str) -> bytes:
    return IX_USER_APIKEY + _e(user_id) + b":"


def ix_user_apikey(user_id: str, key_id: str) -> bytes:
    return ix_user_apikey_prefix(user_id) + _e(key_id)
