"""One reply per chat at a time, in the order the prompts arrived.

A second prompt on a chat that is still generating (from the same socket or another) waits until
the first has ended *and its reply is saved*, so replies are never interleaved and each prompt sees
the previous exchange in its history. The place in line is taken when the frame arrives
(`ticket`, synchronous), so the order is arrival order whatever routing takes; the wait itself
(`wait`) happens later. The line is bounded: past `max_waiting` tickets, `ChatBusy`.

Replicas on one PostgreSQL store (`shared`): the first ticket of a local line also takes the chat's
cross-replica lock (`ktulhu/replicas.py`) before its turn starts, and gives it back in `finish`, so
two front-ends never run replies on one chat at the same time either.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from ..replicas import TurnLease, TurnLocks

__all__ = ["ChatBusy", "Ticket", "TurnQueue"]


class ChatBusy(Exception):
    """Too many prompts are already waiting on this chat."""


@attrs.define(eq=False)
class Ticket:
    chat_id: str
    #: Set when this ticket is first in its chat's line.
    ready: trio.Event = attrs.field(factory=trio.Event)
    #: The chat's cross-replica lock, held from `wait` to `finish`.
    lease: TurnLease | None = None


class TurnQueue:
    def __init__(self, max_waiting: int = 4) -> None:
        self.max_waiting = max_waiting
        self._lines: dict[str, deque[Ticket]] = {}
        #: Cross-replica locks, while the store is shared (set by the replicas service).
        self.shared: TurnLocks | None = None

    def ticket(self, chat_id: str) -> Ticket:
        """Take a place in `chat_id`'s line; raises `ChatBusy` when it is too long. Always `leave` it."""
        line = self._lines.setdefault(chat_id, deque())
        if len(line) > self.max_waiting:
            raise ChatBusy(f"{len(line)} prompts are already queued on this chat")
        ticket = Ticket(chat_id)
        line.append(ticket)
        if len(line) == 1:
            ticket.ready.set()
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Until it is this ticket's turn: first in its local line, then (shared store) holding the
        chat's lock across replicas. Raises `PgWireError` when the shared store cannot be reached."""
        await ticket.ready.wait()
        shared = self.shared
        if shared is not None:
            ticket.lease = await shared.acquire(ticket.chat_id)

    async def finish(self, ticket: Ticket) -> None:
        """The turn is over and its reply saved: release the cross-replica lock, then `leave`."""
        lease, ticket.lease = ticket.lease, None
        if lease is not None and self.shared is not None:
            await self.shared.release(lease)
        elif lease is not None:
            lease.abandon()
        self.leave(ticket)

    def leave(self, ticket: Ticket) -> None:
        """Give up the place (after the turn, or without having waited for it); the next one goes."""
        if ticket.lease is not None:  # a path that did not `finish`: closing the session releases it
            ticket.lease.abandon()
            ticket.lease = None
        line = self._lines.get(ticket.chat_id)
        if line is None or ticket not in line:
            return
        was_first = line[0] is ticket
        line.remove(ticket)
        if not line:
            del self._lines[ticket.chat_id]
        elif was_first:
            line[0].ready.set()

    def waiting(self, chat_id: str) -> int:
        return len(self._lines.get(chat_id, ()))
