"""Front-end replicas on one PostgreSQL store behave as one server.

- `TurnLocks`: one reply per chat across every replica. The local `TurnQueue` keeps arrival order
  inside a process; the prompt first in its local line then takes a session advisory lock on the
  chat, held until its reply is saved. A replica that dies releases its locks with its sessions,
  so a killed front-end never leaves a chat stuck.
- `TitleRelay`: a chat title made on one replica reaches `/chat-summary/ws` and `/ws` sockets on
  every other one, through LISTEN/NOTIFY. The notification carries ids only; receivers read the
  title from the store, so a notification can never say more than the store does.

Quotas and rate limits need nothing here: the store's read-modify-writes are transactions under
advisory locks, exact across replicas (`ktulhu/store/`).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable

import attrs
import orjson
import trio

from .chat.hub import SummaryEvent, SummaryHub
from .pg_wire import PgSession, PgWireError
from .store import AsyncStore, InvalidId, check_id

__all__ = ["TITLES_CHANNEL", "TitleRelay", "TurnLease", "TurnLocks"]

log = logging.getLogger("ktulhu.replicas")

#: The first key of every turn lock (advisory locks' two-key space; the store uses the one-key one).
TURN_LOCK_SPACE = 0x4B54  # "KT"
#: Connections kept open between turns (more are opened under load and closed after).
IDLE_SESSIONS = 8
#: How often (ms) the server checks that a session waiting for a turn lock still has its client.
CLIENT_CHECK_MS = 250
#: Bound on giving a lock back; past it the session is closed (which releases it too).
RELEASE_TIMEOUT_S = 5.0
TITLES_CHANNEL = "ktulhu_titles"
#: Titles waiting to be announced; past it the oldest waits are dropped (the sidebars of other
#: replicas then learn the title on their next reload).
OUTBOX = 256
#: First and longest pause before reconnecting the listener after the server went away.
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 10.0


def turn_lock_key(chat_id: str) -> int:
    """A stable 32-bit key for a chat (two chats sharing one only take turns together)."""
    return int.from_bytes(hashlib.blake2b(chat_id.encode(), digest_size=4).digest(), "big", signed=True)


@attrs.define(eq=False)
class TurnLease:
    """A held turn lock; give it back with `TurnLocks.release`, or `abandon` it."""

    chat_id: str
    key: int
    session: PgSession

    def abandon(self) -> None:
        """Close the session (synchronous, for cleanup paths): the server drops the lock with it."""
        self.session.close()


class TurnLocks:
    """Cross-replica turn locks on the shared PostgreSQL store (one session per held lock)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._idle: list[PgSession] = []

    async def acquire(self, chat_id: str) -> TurnLease:
        """Wait until no other replica runs a reply on `chat_id`. Cancellation closes the session,
        which withdraws the request. Raises `PgWireError` when the server cannot be reached."""
        key = turn_lock_key(chat_id)
        statement = f"SELECT pg_advisory_lock({TURN_LOCK_SPACE}, {key})"
        while self._idle:  # an idle session may have died with a server restart: try the next one
            session = self._idle.pop()
            try:
                await session.execute(statement)
                return TurnLease(chat_id, key, session)
            except PgWireError:
                continue
        session = await PgSession.connect(self._conninfo)
        try:  # a server waiting on a lock notices a closed client only when it checks for one
            await session.execute(f"SET client_connection_check_interval = {CLIENT_CHECK_MS}")
        except PgWireError:  # before PostgreSQL 14: a withdrawn request is dropped when its lock comes
            pass
        await session.execute(statement)
        return TurnLease(chat_id, key, session)

    async def release(self, lease: TurnLease) -> None:
        session = lease.session
        with trio.move_on_after(RELEASE_TIMEOUT_S):
            try:
                await session.execute(f"SELECT pg_advisory_unlock({TURN_LOCK_SPACE}, {lease.key})")
            except PgWireError as error:
                log.warning("turn lock of chat %s released by closing its session: %s", lease.chat_id, error)
        if session.closed or len(self._idle) >= IDLE_SESSIONS:
            session.close()
        else:
            self._idle.append(session)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


@attrs.define
class TitleRelay:
    """Announces this replica's new titles and delivers the other replicas' ones to local sockets.

    Run `run` in the nursery that holds the store open; it attaches itself to the hub while it runs."""

    conninfo: str
    hub: SummaryHub
    store: AsyncStore
    #: Tells this replica's own notifications apart (they were already delivered locally).
    replica: str = attrs.field(factory=lambda: uuid.uuid4().hex)
    #: Called with "ready" / "failed: ..." as the listener connects and loses its connection.
    on_state: Callable[[str], None] = lambda state: None
    announced: int = 0
    received: int = 0
    _outbox: tuple[trio.MemorySendChannel[SummaryEvent], trio.MemoryReceiveChannel[SummaryEvent]] = attrs.field(
        init=False, factory=lambda: trio.open_memory_channel[SummaryEvent](OUTBOX))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen)
            nursery.start_soon(self._announce)
            self.hub.relay = self._queue
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.hub.relay = None

    def _queue(self, event: SummaryEvent) -> None:
        send, receive = self._outbox
        while True:
            try:
                send.send_nowait(event)
                return
            except trio.WouldBlock:
                dropped = receive.receive_nowait()
                log.warning("title of chat %s not announced to other replicas: too many waiting", dropped.chat.id)

    async def _announce(self) -> None:
        session: PgSession | None = None
        try:
            async for event in self._outbox[1]:
                payload = {"replica": self.replica, "chat_id": event.chat.id, "message_id": event.message.id}
                if len(event.request_id) <= 256:
                    payload["request_id"] = event.request_id
                statement = f"SELECT pg_notify('{TITLES_CHANNEL}', {_literal(orjson.dumps(payload).decode())})"
                for _attempt in range(2):  # a session lost since the last title: one fresh try
                    try:
                        if session is None or session.closed:
                            session = await PgSession.connect(self.conninfo)
                        await session.execute(statement)
                        self.announced += 1
                        break
                    except PgWireError as error:
                        log.warning("title of chat %s not announced to other replicas: %s", event.chat.id, error)
        finally:
            if session is not None:
                session.close()

    async def _listen(self, *, task_status: trio.TaskStatus[None]) -> None:
        wait = RETRY_FIRST_S
        started = False
        while True:
            try:
                async with await PgSession.connect(self.conninfo) as session:
                    await session.execute(f"LISTEN {TITLES_CHANNEL}")
                    self.on_state("ready")
                    wait = RETRY_FIRST_S
                    if not started:
                        started = True
                        task_status.started()
                    while True:
                        channel, payload, _pid = await session.notifications()
                        if channel == TITLES_CHANNEL:
                            await self._deliver(payload)
            except PgWireError as error:
                self.on_state(f"failed: {error}")
                log.warning("title relay lost PostgreSQL (%s); reconnecting in %g s", error, wait)
                if not started:  # the first connection must work: the store's server is this one
                    raise
            await trio.sleep(wait)
            wait = min(wait * 2, RETRY_MAX_S)

    async def _deliver(self, payload: str) -> None:
        try:
            note = orjson.loads(payload)
            if not isinstance(note, dict) or note.get("replica") == self.replica:
                return
            chat_id = check_id(note.get("chat_id"), "chat id")
            message_id = check_id(note.get("message_id"), "message id")
            request_id = note.get("request_id") if isinstance(note.get("request_id"), str) else ""
        except (orjson.JSONDecodeError, InvalidId) as bad:
            log.warning("ignored a malformed title notification: %s", bad)
            return
        chat = await self.store.load_chat(chat_id)
        message = await self.store.find_message(chat_id, message_id)
        if chat is None or message is None:  # deleted since, or already replaced by a newer title
            return
        self.received += 1
        self.hub.deliver(SummaryEvent(chat, message, request_id))


def _literal(text: str) -> str:
    """A dollar-quoted SQL literal whose tag does not occur in `text` (independent of
    standard_conforming_strings; the payload is JSON, so it has no NUL)."""
    while True:
        tag = f"$k{uuid.uuid4().hex[:12]}$"
        if tag not in text:
            return f"{tag}{text}{tag}"
