"""`StoreCore`: what the operation mixins are written against.

The mixins (`MessageOps`, `ChatOps`, `UserOps`, `AccountOps`) subclass it, so every primitive they
use is typed here once: point reads, batches, prefix scans, key locks (all delegated to the engine,
`kv.KV`), plus the decode-or-skip rule for corrupt values, the statistics counters and the per-chat
tail cache that numbers new messages. `db.Store` puts the mixins together over one engine.

The raw-key primitives (`get`, `batch`, `write`, `scan`, `decode_or_skip`, ...) are public because
work below the records needs them too: the migration that rebuilds the indexes, the backup's check
of its copy, tests. Writes through `write` are counted in the statistics like the operations' own.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, TypeVar

import attrs

from .codec import decode
from .errors import CorruptRecord
from .kv import KV, Batch, KeyLocks

if TYPE_CHECKING:
    from .records import Chat, User, UserDevice

__all__ = ["TAIL_CACHE_SIZE", "Counters", "StoreCore"]

log = logging.getLogger("ktulhu.store")
R = TypeVar("R")

#: How many chats' (last seq, last ts) the store keeps in memory to number new messages.
TAIL_CACHE_SIZE = 4096


@attrs.define
class Counters:
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    corrupt: int = 0
    foreign: int = 0
    stale: int = 0
    writes: int = 0

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class StoreCore:
    """The primitives of every store operation (see the module docstring)."""

    _kv: KV
    _counters: Counters
    _tails: OrderedDict[str, tuple[int, int]]
    _tails_lock: threading.Lock

    # --- raw keys and values: the operations' primitives, public for the migration and tools -----

    def get(self, key: bytes) -> bytes | None:
        return self._kv.get(key)

    def get_many(self, keys_: list[bytes]) -> list[bytes | None]:
        return self._kv.get_many(keys_)

    def batch(self) -> Batch:
        return self._kv.batch()

    def write(self, batch: Batch) -> None:
        """Commit `batch` (nothing for an empty one); `StoreWriteError` when it is refused."""
        if batch.len():
            self._kv.write(batch)
            self._counters.add("writes")

    def scan(self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None,
             page: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with `prefix`, in key order (or reversed), strictly
        after `after` when given; `page`: how many entries the caller expects to need."""
        return self._kv.scan(prefix, reverse=reverse, after=after, page=page)

    def is_empty(self) -> bool:
        return self._kv.is_empty()

    def put_durable(self, key: bytes, value: bytes) -> None:
        """One write that survives an OS crash whatever the sync setting (the schema version)."""
        self._kv.put_durable(key, value)

    def decode_or_skip(self, cls: type[R], key: bytes, raw: bytes | None) -> R | None:
        """Decode a stored value, or log + count + return None when it is corrupt or missing."""
        if raw is None:
            return None
        try:
            return decode(cls, raw)
        except CorruptRecord as error:
            self._counters.add("corrupt")
            log.warning("corrupt %s record at %r skipped: %s", cls.__name__, key[:200], error)
            return None

    # --- for the operations ---------------------------------------------------------------------

    @property
    def _locks(self) -> KeyLocks:
        return self._kv.locks

    def _load(self, cls: type[R], key: bytes) -> R | None:
        return self.decode_or_skip(cls, key, self.get(key))

    def _count(self, name: str, n: int = 1) -> None:
        self._counters.add(name, n)

    # --- per-chat tail (last seq, last ts in ms), cached ------------------------------------------

    def _tail_get(self, chat_id: str) -> tuple[int, int] | None:
        """The cached tail, or None: read it from the store (always so when other processes may
        write the same chats: the caller holds the chat's lock, so what it reads is current)."""
        if not self._kv.trusts_tail_cache:
            return None
        with self._tails_lock:
            tail = self._tails.get(chat_id)
            if tail is not None:
                self._tails.move_to_end(chat_id)
            return tail

    def _tail_set(self, chat_id: str, tail: tuple[int, int] | None) -> None:
        if not self._kv.trusts_tail_cache:
            return
        with self._tails_lock:
            if tail is None:
                self._tails.pop(chat_id, None)
                return
            self._tails[chat_id] = tail
            self._tails.move_to_end(chat_id)
            while len(self._tails) > TAIL_CACHE_SIZE:
                self._tails.popitem(last=False)

    if TYPE_CHECKING:  # operations of one mixin that another one calls
        def list_chats_for_device(self, device_hash: str) -> list[Chat]: ...

        def list_devices_for_user(self, user_id: str) -> list[UserDevice]: ...

        def _chat_gone(self, chat_id: str) -> bool: ...

        def _put_user(self, user: User, old: User | None, *,
                      also: list[tuple[bytes, bytes]] | tuple[()] = ()) -> None: ...

