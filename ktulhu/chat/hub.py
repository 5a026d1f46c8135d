"""Fan-out of new chat titles to whoever listens: `/chat-summary/ws` clients and `/ws` sessions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs
import trio

from ..store.records import Chat, Message

__all__ = ["SummaryEvent", "SummaryHub"]

log = logging.getLogger("ktulhu.summaries")


@attrs.frozen
class SummaryEvent:
    chat: Chat
    message: Message
    #: The prompt whose exchange triggered the title ("" when unknown).
    request_id: str = ""


@attrs.define(eq=False)
class _Subscriber:
    accepts: Callable[[Chat], bool]
    send: trio.MemorySendChannel[SummaryEvent]


class SummaryHub:
    """Fan-out of new titles to subscribers, each with its own bounded buffer.

    A subscriber whose buffer is full is dropped (its channel is closed, so its reader ends) rather
    than slowing everyone else or growing without bound."""

    def __init__(self) -> None:
        self._subscribers: set[_Subscriber] = set()
        #: Also told of every title published here: the other replicas' relay (`ktulhu/replicas.py`).
        self.relay: Callable[[SummaryEvent], None] | None = None

    @contextmanager
    def subscribe(self, accepts: Callable[[Chat], bool], capacity: int = 64
                  ) -> Iterator[trio.MemoryReceiveChannel[SummaryEvent]]:
        send, receive = trio.open_memory_channel[SummaryEvent](capacity)
        subscriber = _Subscriber(accepts, send)
        self._subscribers.add(subscriber)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.discard(subscriber)
            send.close()

    def publish(self, event: SummaryEvent) -> None:
        """A title made on this replica: to local subscribers, and to the other replicas."""
        self.deliver(event)
        if self.relay is not None:
            self.relay(event)

    def deliver(self, event: SummaryEvent) -> None:
        """To this replica's subscribers only."""
        for subscriber in list(self._subscribers):
            if not subscriber.accepts(event.chat):
                continue
            try:
                subscriber.send.send_nowait(event)
            except trio.WouldBlock:
                log.warning("dropping a summary subscriber that stopped reading")
                self._subscribers.discard(subscriber)
                subscriber.send.close()
            except trio.ClosedResourceError:
                self._subscribers.discard(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
