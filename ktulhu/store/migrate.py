"""The versioned schema migration, run by `Store.open` before the store is used (on PostgreSQL
under the store's migration lock, so replicas starting together migrate one after the other).

``meta:schema_version`` holds the version (absent = 0: a fresh directory or one the original wrote).

- 0 -> 1: build every index (``ix:*``) and rebuild the original's device index (``device_chat:*``)
  from the records, in place. Original records are neither moved nor rewritten.

The migration is idempotent: it first deletes the index ranges it builds, so a run interrupted by a
crash is simply run again at the next open, and `rebuild_indexes` run twice leaves the same bytes.
The version is written (synced) only after the indexes are complete.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from . import keys
from .chats import index_chat
from .errors import StoreError
from .keys import is_valid_id
from .records import ApiKey, Chat, Message, User, UserDevice
from .users import index_user

if TYPE_CHECKING:
    from .db import Store

__all__ = ["SCHEMA_VERSION", "IndexReport", "migrate", "rebuild_indexes"]

log = logging.getLogger("ktulhu.store")

SCHEMA_VERSION = 1
#: Index entries per WriteBatch while rebuilding.
BATCH_OPS = 20_000


@attrs.define
class IndexReport:
    """What a rebuild indexed and what it had to skip (each skip is logged)."""

    chats: int = 0
    messages: int = 0
    users: int = 0
    devices: int = 0
    api_keys: int = 0
    skipped_ids: int = 0
    identity_conflicts: int = 0


def read_version(store: "Store") -> int:
    raw = store.get(keys.SCHEMA_VERSION)
    if raw is None:
        return 0
    try:
        return int(raw.decode())
    except ValueError:
        raise StoreError(f"the store at {store.where} has an unreadable schema version {raw[:40]!r}") from None


def migrate(store: "Store") -> int:
    """Bring the store to `SCHEMA_VERSION`; returns the version it was at. Blocking."""
    if store.get(keys.COPY_PROGRESS) is not None:
        raise StoreError(f"the store at {store.where} is an unfinished copy (`ktulhu store copy` stopped before "
                         "the end); run the same copy command again to finish it")
    version = read_version(store)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store at {store.where} has schema version {version}, newer than this Ktulhu "
            f"understands ({SCHEMA_VERSION}); upgrade Ktulhu or use another KTULHU_STORE"
        )
    if version < 1:
        if store.is_empty():
            log.info("new store at %s: schema version %d", store.where, SCHEMA_VERSION)
        else:
            log.info("migrating the store at %s from schema version %d to 1: building indexes", store.where, version)
            report = rebuild_indexes(store)
            log.info("store indexes built: %s", report)
        _set_version(store, 1)
    store.schema_version = SCHEMA_VERSION
    return version


def _set_version(store: "Store", version: int) -> None:
    store.put_durable(keys.SCHEMA_VERSION, str(version).encode())


class _Writer:
    def __init__(self, store: "Store") -> None:
        self.store = store
        self.batch = store.batch()

    def put(self, key: bytes, value: bytes) -> None:
        self.batch.put(key, value)
        if self.batch.len() >= BATCH_OPS:
            self.flush()

    def flush(self) -> None:
        self.store.write(self.batch)
        self.batch = self.store.batch()


def rebuild_indexes(store: "Store") -> IndexReport:
    """Delete and rebuild every index from the records. Blocking; needs exclusive use of the store."""
    report = IndexReport()
    clear = store.batch()
    for prefix in (keys.IX, keys.DEVICE_CHAT):
        clear.delete_range(prefix, keys.next_prefix(prefix))
    store.write(clear)
    out = _Writer(store)

    def skip(what: str, key: bytes) -> None:
        report.skipped_ids += 1
        log.warning("not indexed (unsafe id): %s at %r", what, key[:200])

    for key, raw in store.scan(keys.CHAT_META):
        chat = store.decode_or_skip(Chat, key, raw)
        if chat is None:
            continue
        if not is_valid_id(chat.id) or key != keys.chat_meta_key(chat.id):
            skip("chat", key)
            continue
        index_chat(out, chat)
        report.chats += 1

    summaries: dict[str, bytes] = {}
    for prefix in (b"chat:", keys.MSG):
        for key, raw in store.scan(prefix):
            if key.startswith(keys.CHAT_META):
                continue
            message = store.decode_or_skip(Message, key, raw)
            if message is None:
                continue
            chat_id = message.chat_id
            expected = keys.legacy_msg_prefix(chat_id) if prefix == b"chat:" else keys.msg_prefix(chat_id)
            if not (is_valid_id(chat_id) and is_valid_id(message.id) and key.startswith(expected)):
                skip("message", key)
                continue
            out.put(keys.ix_msg_id(chat_id, message.id), key)
            out.put(keys.ix_recent(message.ts_ms, chat_id, message.id), key)
            if message.role == "summary":
                summaries[chat_id] = key
            report.messages += 1
    for chat_id, key in summaries.items():
        out.put(keys.ix_summary(chat_id), key)

    users = [u for k, v in store.scan(keys.USER) if (u := store.decode_or_skip(User, k, v)) is not None]
    users.sort(key=lambda u: (u.created_ts, u.id))  # the earliest user keeps a shared email
    taken: dict[bytes, bytes] = {}
    for user in users:
        if not is_valid_id(user.id):
            skip("user", keys.user_key(user.id))
            continue
        report.identity_conflicts += index_user(out, user, taken)
        report.users += 1

    for key, raw in store.scan(keys.USER_DEVICE):
        device = store.decode_or_skip(UserDevice, key, raw)
        if device is None:
            continue
        if not (is_valid_id(device.user_id) and is_valid_id(device.device_hash) and is_valid_id(device.id)):
            skip("device", key)
            continue
        out.put(keys.ix_device(device.device_hash, device.user_id, device.id), key)
        report.devices += 1

    for key, raw in store.scan(keys.APIKEY):
        api_key = store.decode_or_skip(ApiKey, key, raw)
        if api_key is None or not (is_valid_id(api_key.id) and is_valid_id(api_key.user_id)):
            continue
        out.put(keys.ix_user_apikey(api_key.user_id, api_key.id), api_key.id.encode())
        report.api_keys += 1

    out.put(keys.DEVICE_INDEX_BUILT, b"1")
    out.flush()
    return report
