"""The chat store: the original's key layout plus Ktulhu's indexes, on RocksDB (rocksdict, raw mode:
one server) or PostgreSQL (one ``kv`` table: several servers share it).

`Store` is the synchronous, thread-safe store (`Store.open(directory or postgresql:// URL, sync=...)`,
`close()`); trio code uses `store.aio` (`AsyncStore`), which runs every call on a bounded pool of
worker threads. See docs/store.md for the key layout, the engines, migration, concurrency model and
durability.
"""

from .accounts import RateDecision
from .aio import AsyncStore
from .db import Store, StoreStatistics
from .errors import (
    CorruptRecord,
    IdentityTaken,
    InvalidId,
    StoreClosedError,
    StoreError,
    StoreLockedError,
)
from .keys import check_id
from .records import ApiKey, Chat, Message, MessageAttachment, RateBucket, StripeEvent, User, UserDevice, now_ms, ts_ms
from .users import QuotaResult, normalise_email

__all__ = [
    "ApiKey",
    "AsyncStore",
    "Chat",
    "CorruptRecord",
    "IdentityTaken",
    "InvalidId",
    "Message",
    "MessageAttachment",
    "QuotaResult",
    "RateBucket",
    "RateDecision",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreLockedError",
    "StoreStatistics",
    "StripeEvent",
    "User",
    "UserDevice",
    "check_id",
    "normalise_email",
    "now_ms",
    "ts_ms",
]
