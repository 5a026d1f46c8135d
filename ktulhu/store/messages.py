"""Message operations (original §6.3, plus per-chat order, recent messages and summaries by index).

New messages are stored at ``msg:<chat_id>:<seq>``: ``seq`` is 1 + the chat's last seq, given out
under the chat's lock, and ``ts`` (ms) is raised to the chat's last ``ts`` if the clock went back, so
a reply never sorts before its prompt — by key or by time. Messages the original wrote stay at their
``chat:<id>:msg:<ts s>:<id>`` keys and read first (they are older than every new one).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from . import keys
from .codec import encode
from .core import StoreCore
from .keys import check_id
from .kv import Batch
from .records import Message, now_ms


__all__ = ["MessageOps"]

SUMMARY = "summary"


class MessageOps(StoreCore):
    """Mixin of `Store`: every method is synchronous, thread-safe and validates its ids first."""

    # --- writes ------------------------------------------------------------------------------

    def save_message(self, message: Message, *, existing_chat_only: bool = False) -> Message | None:
        """Store `message` and return it as stored (with ``seq``, and ``ts`` never before the chat's
        previous message). A message whose id the chat already has is replaced in place, keeping its
        position. Raises `InvalidId` for an unsafe chat or message id.

        `existing_chat_only`: for a reply that finishes after its chat was deleted: nothing is
        written and None is returned, instead of bringing the chat back without its owner."""
        chat_id = check_id(message.chat_id, "chat id")
        check_id(message.id, "message id")
        with self._locks.hold("chat:" + chat_id):
            if existing_chat_only and self._chat_gone(chat_id):
                return None
            batch = self.batch()
            stored, summary_changed = self._put_message(batch, message)
            self.write(batch)
            if summary_changed:
                self._refresh_summary_pointer(chat_id)
        return stored

    def delete_message(self, chat_id: str, message_id: str) -> bool:
        """Delete one message; False when the chat has no message with that id."""
        check_id(chat_id, "chat id")
        check_id(message_id, "message id")
        with self._locks.hold("chat:" + chat_id):
            key = self.get(keys.ix_msg_id(chat_id, message_id))
            if key is None:
                return False
            message = self._load(Message, key)
            batch = self.batch()
            self._drop_message(batch, chat_id, message_id, key, message)
            self.write(batch)
            if message is None or message.role == SUMMARY:
                self._refresh_summary_pointer(chat_id)
            return True

    def set_message_liked(self, chat_id: str, message_id: str, liked: bool) -> bool:
        """Set the ``liked`` flag; False when the message is not found (or unreadable)."""
        return self.update_message(chat_id, message_id, lambda m: _with(m, liked=bool(liked))) is not None

    def update_message(self, chat_id: str, message_id: str, change: Callable[[Message], Message]) -> Message | None:
        """Read-modify-write one message under the chat's lock: `change(message) -> message`.

        Id, chat and position are kept. Returns the stored message, or None when not found."""
        check_id(chat_id, "chat id")
        check_id(message_id, "message id")
        with self._locks.hold("chat:" + chat_id):
            key = self.get(keys.ix_msg_id(chat_id, message_id))
            old = None if key is None else self._load(Message, key)
            if old is None:
                return None
            new = change(_with(old))
            new.id, new.chat_id, new.seq, new.ts = old.id, old.chat_id, old.seq, old.ts
            batch = self.batch()
            batch.put(key, encode(new))
            self.write(batch)
            if (old.role == SUMMARY) != (new.role == SUMMARY):
                self._refresh_summary_pointer(chat_id)
            return new

    def remove_messages_by_role(self, chat_id: str, role: str) -> int:
        """Delete every message of the chat with `role`; returns how many (one batch)."""
        check_id(chat_id, "chat id")
        with self._locks.hold("chat:" + chat_id):
            batch = self.batch()
            count = 0
            for key, message in self._chat_entries(chat_id):
                if message.role == role:
                    self._drop_message(batch, chat_id, message.id, key, message)
                    count += 1
            if role == SUMMARY:
                batch.delete(keys.ix_summary(chat_id))
            self.write(batch)
            return count

    def replace_summary(
        self, chat_id: str, text: str, *, language: str | None = None,
        message_id: str | None = None, ts: int | None = None, existing_chat_only: bool = False,
    ) -> Message | None:
        """Atomically delete the chat's ``summary`` messages and save a new one with `text`
        (`existing_chat_only`: not for a deleted chat; None then)."""
        check_id(chat_id, "chat id")
        message = Message(
            id=check_id(message_id or str(uuid.uuid4()), "message id"), chat_id=chat_id, role=SUMMARY,
            text=text, language=language, ts=now_ms() if ts is None else ts,
        )
        with self._locks.hold("chat:" + chat_id):
            if existing_chat_only and self._chat_gone(chat_id):
                return None
            batch = self.batch()
            for key, old in self._chat_entries(chat_id):
                if old.role == SUMMARY or old.id == message.id:
                    self._drop_message(batch, chat_id, old.id, key, old)
            # the new summary is the chat's newest message, even when it reuses an old summary's id
            stored, _ = self._put_message(batch, message, fresh=True)
            self.write(batch)
            return stored

    # --- reads -------------------------------------------------------------------------------

    def list_messages_for_chat(self, chat_id: str, *, last: int | None = None) -> list[Message]:
        """The chat's messages in order (original records first, then by ``seq``).

        With `last`, only the newest `last` messages (still oldest first), read from the end."""
        check_id(chat_id, "chat id")
        if last is None:
            return [m for _, m in self._chat_entries(chat_id)]
        if last <= 0:
            return []
        newest: list[Message] = []
        for prefix in (keys.msg_prefix(chat_id), keys.legacy_msg_prefix(chat_id)):
            for key, raw in self.scan(prefix, reverse=True, page=last - len(newest)):
                message = self._message_of(chat_id, key, raw)
                if message is not None:
                    newest.append(message)
                    if len(newest) >= last:
                        return newest[::-1]
        return newest[::-1]

    def find_message(self, chat_id: str, message_id: str) -> Message | None:
        """One message by id (through the index), or None."""
        check_id(chat_id, "chat id")
        check_id(message_id, "message id")
        key = self.get(keys.ix_msg_id(chat_id, message_id))
        if key is None:
            return None
        message = self._load(Message, key)
        if message is None or message.id != message_id or message.chat_id != chat_id:
            return None
        return message

    def chat_summary(self, chat_id: str) -> Message | None:
        """The chat's last ``summary`` message, or None (one index read, no scan)."""
        check_id(chat_id, "chat id")
        key = self.get(keys.ix_summary(chat_id))
        if key is None:
            return None
        message = self._load(Message, key)
        if message is not None and message.role == SUMMARY and message.chat_id == chat_id:
            return message
        self._count("stale")
        for _, message in reversed(list(self._chat_entries(chat_id))):
            if message.role == SUMMARY:
                return message
        return None

    def list_recent_messages(self, limit: int) -> list[Message]:
        """The newest `limit` messages of the whole store, ``ts`` descending then id ascending
        (the original's order), read from the end of the recent index: no scan. limit <= 0 -> []."""
        if limit <= 0:
            return []
        found: list[Message] = []
        boundary: int | None = None  # ts of the limit-th message: ties with it are still read
        pending: list[tuple[int, bytes]] = []

        def flush() -> None:
            values = self.get_many([target for _, target in pending])
            for (ts, target), raw in zip(pending, values):
                message = self.decode_or_skip(Message, target, raw)
                if message is None:
                    self._count("stale")
                    continue
                found.append(message)
            pending.clear()

        for key, target in self.scan(keys.IX_RECENT, reverse=True, page=limit + 1):
            ts = int(key[len(keys.IX_RECENT): len(keys.IX_RECENT) + 16])
            if boundary is not None and ts != boundary:
                break
            pending.append((ts, target))
            if boundary is None and len(found) + len(pending) >= limit:
                flush()
                if len(found) >= limit:
                    boundary = found[limit - 1].ts_ms
                    if ts != boundary:
                        break
        flush()
        found.sort(key=lambda m: (-m.ts_ms, m.id))
        return found[:limit]

    def list_messages_for_device(self, device_hash: str) -> list[Message]:
        """All messages of the device's chats, ``ts`` ascending (stable)."""
        messages: list[Message] = []
        for chat in self.list_chats_for_device(device_hash):
            messages.extend(self.list_messages_for_chat(chat.id))
        messages.sort(key=lambda m: m.ts_ms)
        return messages

    # --- internals (callers hold the chat's lock) ----------------------------------------------

    def _message_of(self, chat_id: str, key: bytes, raw: bytes) -> Message | None:
        message = self.decode_or_skip(Message, key, raw)
        if message is not None and message.chat_id != chat_id:
            self._count("foreign")
            return None
        return message

    def _chat_entries(self, chat_id: str) -> Iterator[tuple[bytes, Message]]:
        """(key, message) for every readable message of the chat, in order."""
        for prefix in (keys.legacy_msg_prefix(chat_id), keys.msg_prefix(chat_id)):
            for key, raw in self.scan(prefix):
                message = self._message_of(chat_id, key, raw)
                if message is not None:
                    yield key, message

    def _chat_gone(self, chat_id: str) -> bool:
        """No metadata and no message: the chat was deleted (or never existed)."""
        if self.get(keys.chat_meta_key(chat_id)) is not None:
            return False
        return not any(True for prefix in (keys.legacy_msg_prefix(chat_id), keys.msg_prefix(chat_id))
                       for _ in self.scan(prefix, page=1))

    def _chat_tail(self, chat_id: str) -> tuple[int, int]:
        """(last seq, last ts in ms) of the chat: cached, else read from the ends of both prefixes."""
        tail = self._tail_get(chat_id)
        if tail is not None:
            return tail
        seq, last_ts = 0, 0
        for key, raw in self.scan(keys.msg_prefix(chat_id), reverse=True, page=2):
            seq = max(seq, keys.seq_of_msg_key(key))  # the last key's, even when its value is corrupt
            message = self._message_of(chat_id, key, raw)
            if message is not None:
                last_ts = message.ts_ms
                break
        if last_ts == 0:
            for key, raw in self.scan(keys.legacy_msg_prefix(chat_id), reverse=True, page=2):
                message = self._message_of(chat_id, key, raw)
                if message is not None:
                    last_ts = message.ts_ms
                    break
        return seq, last_ts

    def _put_message(
        self, batch: Batch, message: Message, *, fresh: bool = False
    ) -> tuple[Message, bool]:
        """Add the message and its index entries to `batch`; returns (stored, summary pointer stale).

        `fresh`: the caller already dropped any message with this id in `batch`; append it anew."""
        chat_id = message.chat_id
        message = _with(message)
        existing_key = None if fresh else self.get(keys.ix_msg_id(chat_id, message.id))
        old = None if existing_key is None else self._load(Message, existing_key)
        summary_changed = False
        if existing_key is not None and old is not None:
            key = existing_key
            message.seq = old.seq
            batch.delete(keys.ix_recent(old.ts_ms, chat_id, old.id))
            summary_changed = (old.role == SUMMARY) != (message.role == SUMMARY)
        else:
            if existing_key is not None:  # index points at a corrupt or vanished record
                batch.delete(existing_key)
            seq, last_ts = self._chat_tail(chat_id)
            message.seq = seq + 1
            if message.ts_ms < last_ts:
                message.ts = last_ts
            key = keys.msg_key(chat_id, message.seq)
            self._tail_set(chat_id, (message.seq, max(message.ts_ms, last_ts)))
            if message.role == SUMMARY:
                batch.put(keys.ix_summary(chat_id), key)
        batch.put(key, encode(message))
        batch.put(keys.ix_msg_id(chat_id, message.id), key)
        batch.put(keys.ix_recent(message.ts_ms, chat_id, message.id), key)
        return message, summary_changed

    def _drop_message(
        self, batch: Batch, chat_id: str, message_id: str, key: bytes, message: Message | None
    ) -> None:
        batch.delete(key)
        batch.delete(keys.ix_msg_id(chat_id, message_id))
        if message is not None:
            batch.delete(keys.ix_recent(message.ts_ms, chat_id, message.id))

    def _refresh_summary_pointer(self, chat_id: str) -> None:
        """Point ``ix:summary:<chat>`` at the chat's last summary message (after a write)."""
        last = None
        for key, message in self._chat_entries(chat_id):
            if message.role == SUMMARY:
                last = key
        batch = self.batch()
        if last is None:
            batch.delete(keys.ix_summary(chat_id))
        else:
            batch.put(keys.ix_summary(chat_id), last)
        self.write(batch)


def _with(message: Message, **changes: Any) -> Message:
    """A copy of `message` (attachments and extra copied shallowly) with `changes` applied."""
    return attrs.evolve(message, attachments=list(message.attachments), extra=dict(message.extra), **changes)
