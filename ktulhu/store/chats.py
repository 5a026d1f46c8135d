"""Chat operations (original §6.3 and §3.5), with the chat indexes kept in the same batch.

A chat is indexed by device (``device_chat:``, the original's index, maintained exactly as the
original did), by owner (``ix:user_chat:``) and by last update (``ix:chat_updated:``). An empty
device hash is never indexed.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable

import attrs

from . import keys
from .codec import encode
from .core import StoreCore
from .errors import CorruptRecord
from .keys import check_id, is_valid_id
from .kv import Batch, Puts
from .records import Chat, Message, now_ms


__all__ = ["ChatOps", "index_chat"]


class ChatOps(StoreCore):
    """Mixin of `Store`: every method is synchronous, thread-safe and validates its ids first."""

    def save_chat(self, chat: Chat) -> Chat:
        """Store chat metadata and update its device, owner and recency index entries atomically.

        A device hash or owner id that changes must be a valid id (`InvalidId` otherwise)."""
        chat_id = check_id(chat.id, "chat id")
        with self._locks.hold("chat:" + chat_id):
            old = self._load(Chat, keys.chat_meta_key(chat_id))
            batch = self.batch()
            self._put_chat(batch, chat, old)
            self.write(batch)
        return chat

    def update_chat(self, chat_id: str, change: Callable[[Chat], Chat]) -> Chat | None:
        """Read-modify-write chat metadata under the chat's lock; None when the chat does not exist."""
        check_id(chat_id, "chat id")
        with self._locks.hold("chat:" + chat_id):
            old = self._load(Chat, keys.chat_meta_key(chat_id))
            if old is None:
                return None
            new = change(_copy(old))
            new.id = chat_id
            batch = self.batch()
            self._put_chat(batch, new, old)
            self.write(batch)
            return new

    def ensure_chat_for_device(
        self, chat_id: str, device_hash: str | None, *, user_id: str | None = None,
    ) -> tuple[Chat, bool]:
        """The chat with `chat_id`, created for `device_hash` (and owned by `user_id`) if missing (a
        new UUID when `chat_id` is empty). An existing chat is returned unchanged. Returns (chat, created)."""
        chat_id = check_id(chat_id or str(uuid.uuid4()), "chat id")
        with self._locks.hold("chat:" + chat_id):
            old = self._load(Chat, keys.chat_meta_key(chat_id))
            if old is not None:
                return old, False
            chat = Chat(id=chat_id, device_hash=device_hash, user_id=user_id, updated_ts=now_ms())
            batch = self.batch()
            self._put_chat(batch, chat, None)
            self.write(batch)
            return chat, True

    def touch_chat(
        self, chat_id: str, device_hash: str | None = None, *, user_id: str | None = None,
        now: int | None = None, existing_chat_only: bool = False,
    ) -> Chat | None:
        """After a message: load (or create with ``meta {}``), cache ``meta.has_summary``, set the
        device hash and owner only if the chat has none, set ``updated_ts`` (ms), save.
        `existing_chat_only`: None for a chat deleted meanwhile, which stays deleted."""
        check_id(chat_id, "chat id")
        with self._locks.hold("chat:" + chat_id):
            if existing_chat_only and self._chat_gone(chat_id):
                return None
            old = self._load(Chat, keys.chat_meta_key(chat_id))
            chat = _copy(old) if old is not None else Chat(id=chat_id, updated_ts=0, meta={})
            if not isinstance(chat.meta, dict):
                chat.meta = {}
            if chat.meta.get("has_summary") is not True and self.get(keys.ix_summary(chat_id)) is not None:
                chat.meta["has_summary"] = True
            if chat.device_hash is None and device_hash is not None:
                chat.device_hash = device_hash
            if chat.user_id is None and user_id is not None:
                chat.user_id = user_id
            chat.updated_ts = now_ms() if now is None else now
            batch = self.batch()
            self._put_chat(batch, chat, old)
            self.write(batch)
            return chat

    def delete_thread(self, chat_id: str) -> int:
        """Delete the chat: its messages, metadata and every index entry, in one batch.

        Returns how many messages were deleted (0 for an unknown chat)."""
        check_id(chat_id, "chat id")
        with self._locks.hold("chat:" + chat_id):
            batch = self.batch()
            count = 0
            for prefix in (keys.legacy_msg_prefix(chat_id), keys.msg_prefix(chat_id)):
                for key, raw in self.scan(prefix):  # every key under the prefix, like the original
                    message = self.decode_or_skip(Message, key, raw)
                    batch.delete(key)
                    if message is not None:
                        batch.delete(keys.ix_recent(message.ts_ms, message.chat_id, message.id))
                    count += 1
            id_prefix = keys.ix_msg_id(chat_id, "")
            batch.delete_range(id_prefix, keys.next_prefix(id_prefix))
            batch.delete(keys.ix_summary(chat_id))
            old = self._load(Chat, keys.chat_meta_key(chat_id))
            batch.delete(keys.chat_meta_key(chat_id))
            if old is not None:
                _unindex_chat(batch, old)
            self.write(batch)
            self._tail_set(chat_id, None)
            return count

    # --- reads -------------------------------------------------------------------------------

    def load_chat(self, chat_id: str, *, strict: bool = False) -> Chat | None:
        """Chat metadata, or None when missing (or corrupt: logged and counted). `strict` raises
        `CorruptRecord` for a record that exists but cannot be read: access checks fail closed."""
        check_id(chat_id, "chat id")
        key = keys.chat_meta_key(chat_id)
        raw = self.get(key)
        chat = self.decode_or_skip(Chat, key, raw)
        if strict and chat is None and raw is not None:
            raise CorruptRecord(f"the record of chat {chat_id} cannot be read")
        return chat

    def list_chats(self) -> list[Chat]:
        """Every chat (admin use; reads the whole ``chat:meta:`` range)."""
        return [c for k, v in self.scan(keys.CHAT_META) if (c := self.decode_or_skip(Chat, k, v)) is not None]

    def list_chats_for_device(self, device_hash: str) -> list[Chat]:
        """Chats indexed for the device, ``updated_ts`` descending. Empty hash -> []."""
        if not device_hash:
            return []
        check_id(device_hash, "device hash")
        chat_ids = [v.decode(errors="replace") for _, v in self.scan(keys.device_chat_prefix(device_hash))]
        return self._chats_by_id(chat_ids)

    def list_chats_owned_by(self, user_id: str) -> list[Chat]:
        """Chats whose ``user_id`` is `user_id`, ``updated_ts`` descending."""
        check_id(user_id, "user id")
        chat_ids = [v.decode(errors="replace") for _, v in self.scan(keys.ix_user_chat_prefix(user_id))]
        return self._chats_by_id(chat_ids)

    def list_chats_for_user(self, user_id: str) -> list[Chat]:
        """Chats owned by the user plus the chats of every device the user signed in from (the
        original's definition), without duplicates, ``updated_ts`` descending."""
        check_id(user_id, "user id")
        chat_ids = [v.decode(errors="replace") for _, v in self.scan(keys.ix_user_chat_prefix(user_id))]
        for device in self.list_devices_for_user(user_id):
            if is_valid_id(device.device_hash):
                chat_ids.extend(
                    v.decode(errors="replace") for _, v in self.scan(keys.device_chat_prefix(device.device_hash))
                )
        return self._chats_by_id(list(dict.fromkeys(chat_ids)))

    def list_recent_chats(self, limit: int) -> list[Chat]:
        """The `limit` most recently updated chats, newest first (from the end of the index)."""
        if limit <= 0:
            return []
        chat_ids: list[str] = []
        for _, value in self.scan(keys.IX_CHAT_UPDATED, reverse=True, page=limit):
            chat_ids.append(value.decode(errors="replace"))
            if len(chat_ids) >= limit:
                break
        return self._chats_by_id(chat_ids)

    # --- internals -----------------------------------------------------------------------------

    def _chats_by_id(self, chat_ids: list[str]) -> list[Chat]:
        chat_keys = [keys.chat_meta_key(c) for c in chat_ids]
        chats = []
        for key, raw in zip(chat_keys, self.get_many(chat_keys)):
            if raw is None:
                self._count("stale")
                continue
            chat = self.decode_or_skip(Chat, key, raw)
            if chat is not None:
                chats.append(chat)
        chats.sort(key=lambda c: c.updated_ms, reverse=True)
        return chats

    def _put_chat(self, batch: Batch, chat: Chat, old: Chat | None) -> None:
        old_hash = old.device_hash if old else None
        old_user = old.user_id if old else None
        if chat.device_hash and chat.device_hash != old_hash:
            check_id(chat.device_hash, "device hash")
        if chat.user_id and chat.user_id != old_user:
            check_id(chat.user_id, "user id")
        if old is not None:
            if old_hash != chat.device_hash and old_hash and is_valid_id(old_hash):
                batch.delete(keys.device_chat_key(old_hash, chat.id))
            if old_user != chat.user_id and old_user and is_valid_id(old_user):
                batch.delete(keys.ix_user_chat(old_user, chat.id))
            if old.updated_ms != chat.updated_ms:
                batch.delete(keys.ix_chat_updated(old.updated_ms, chat.id))
        index_chat(batch, chat)
        batch.put(keys.chat_meta_key(chat.id), encode(chat))


def index_chat(out: Puts, chat: Chat) -> None:
    """Put the index entries of `chat` (saving it, and the migration rebuilding every index)."""
    raw_id = chat.id.encode()
    if chat.device_hash and is_valid_id(chat.device_hash):
        out.put(keys.device_chat_key(chat.device_hash, chat.id), raw_id)
        out.put(keys.DEVICE_INDEX_BUILT, b"1")
    if chat.user_id and is_valid_id(chat.user_id):
        out.put(keys.ix_user_chat(chat.user_id, chat.id), raw_id)
    out.put(keys.ix_chat_updated(chat.updated_ms, chat.id), raw_id)


def _unindex_chat(batch: Batch, chat: Chat) -> None:
    if chat.device_hash and is_valid_id(chat.device_hash):
        batch.delete(keys.device_chat_key(chat.device_hash, chat.id))
    if chat.user_id and is_valid_id(chat.user_id):
        batch.delete(keys.ix_user_chat(chat.user_id, chat.id))
    batch.delete(keys.ix_chat_updated(chat.updated_ms, chat.id))


def _copy(chat: Chat) -> Chat:
    return attrs.evolve(chat, meta=copy.deepcopy(chat.meta), extra=dict(chat.extra))
