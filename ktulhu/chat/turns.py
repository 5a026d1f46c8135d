"""One reply per chat at a time, in the order the prompts arrived.

A second prompt on a chat that is still generating (from the same socket or another) waits until
the first has ended *and its reply is saved*, so replies are never interleaved and each prompt sees
the previous exchange in its history. The place in line is taken when the frame arrives
(`ticket`, synchronous), so the order is arrival order whatever routing takes; the wait itself
(`Ticket.ready`) happens later. The line is bounded: past `max_waiting` tickets, `ChatBusy`.
"""

from __future__ import annotations

from collections import deque

import attrs
import trio

__all__ = ["ChatBusy", "Ticket", "TurnQueue"]


class ChatBusy(Exception):
    """Too many prompts are already waiting on this chat."""


@attrs.define(eq=False)
class Ticket:
    chat_id: str
    #: Set when this ticket is first in its chat's line.
    ready: trio.Event = attrs.field(factory=trio.Event)


class TurnQueue:
    def __init__(self, max_waiting: int = 4) -> None:
        self.max_waiting = max_waiting
        self._lines: dict[str, deque[Ticket]] = {}

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

    def leave(self, ticket: Ticket) -> None:
        """Give up the place (after the turn, or without having waited for it); the next one goes."""
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
