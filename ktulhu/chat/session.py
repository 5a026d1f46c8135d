"""One `/ws` connection: a reader, a writer, and one task per prompt, all in the session's nursery.

    ChatSession.run (session nursery)
    ├── writer              outbox -> socket; a reader that accepts nothing for
    │                       KTULHU_WS_SEND_TIMEOUT is disconnected (its prompts are cancelled)
    ├── titles              titles of this socket's chats -> `summary` frames
    ├── shutdown watch      on SIGTERM: cancel the prompts (each still sends its `done`), then close
    └── prompts nursery
        └── prompt[request_id]  its own cancel scope: `cancel` with that id cancels it alone

The outbox is a bounded channel (`KTULHU_WS_QUEUE`). When it is full a prompt waits before sending
its next token frame; meanwhile the engine keeps generating into the `Generation`, which hands over
everything produced since the last read as one piece. A slow reader therefore gets fewer, longer
token frames, never lost ones; nothing grows without bound.

Frames are read and answered in order; prompts run concurrently (prompts on the same chat take
turns, see `turns.py`). Leaving the session (disconnect) cancels every prompt of the socket; their
partial replies are saved.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Protocol

import attrs
import orjson
import trio

from ..auth.principal import AuthError, Principal, authenticate_bearer
from ..logs import PromptAccessLog
from ..nurseries.runtime import Runtime
from ..store.codec import to_dict
from ..store.records import Message
from . import frames
from .access import ChatForbidden, chat_for
from .frames import Cancel, FrameError, Ping, PromptFrame, Register, parse_frame
from .prompt_flow import PromptContext, run_prompt
from .turns import ChatBusy

__all__ = ["ChatSession", "StalledReader"]

log = logging.getLogger("ktulhu.ws")

#: How long the close of a stalled or finished socket may take.
CLOSE_TIMEOUT_S = 1.0


class Socket(Protocol):
    """What the session needs of a WebSocket (Quart's `websocket` object provides it)."""

    async def receive(self) -> str | bytes: ...

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class StalledReader(Exception):
    """The client accepted no frame for `KTULHU_WS_SEND_TIMEOUT` seconds."""


@attrs.define(eq=False)
class _Running:
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    reason: str = "cancelled"


@attrs.frozen(eq=False)
class _Flushed:
    """Put in the outbox: the writer sets `event` once every frame queued before it was written."""

    event: trio.Event = attrs.field(factory=trio.Event)


class ChatSession:
    def __init__(self, runtime: Runtime, socket: Socket, principal: Principal, client: str,
                 credential: str | None = None) -> None:
        self.runtime = runtime
        self.socket = socket
        self.ctx = PromptContext(runtime, principal, client, self._send, credential=credential)
        self._outbox_send, self._outbox = trio.open_memory_channel[frames.ServerFrame | _Flushed](runtime.settings.ws_queue)
        self._prompts: dict[str, _Running] = {}
        self._closing = False
        #: Set when the last prompt ends after shutdown began (no new prompt starts then).
        self._drained = trio.Event()
        self.access = PromptAccessLog(client)  # one access line per prompt

    @property
    def principal(self) -> Principal:
        return self.ctx.principal

    async def run(self) -> None:
        """Serve the socket until the client leaves, the reader stalls (`StalledReader`) or the
        server stops."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write)
                nursery.start_soon(self._push_titles)
                async with trio.open_nursery() as prompts:
                    nursery.start_soon(self._stop_on_shutdown, prompts, nursery.cancel_scope)
                    await self._read(prompts)
        finally:
            self.access.end()

    async def _send(self, frame: frames.ServerFrame) -> None:
        await self._outbox_send.send(frame)

    # --- the three long-lived tasks ----------------------------------------------------------

    async def _write(self) -> None:
        timeout = self.runtime.settings.ws_send_timeout
        async with self._outbox:
            async for frame in self._outbox:
                if isinstance(frame, _Flushed):
                    frame.event.set()
                    continue
                with trio.move_on_after(timeout) as waited:
                    await self.socket.send(orjson.dumps(frame).decode())
                if waited.cancelled_caught:
                    raise StalledReader(f"the client accepted nothing for {timeout:g} s")
                self.access.sent(frame)

    async def _push_titles(self) -> None:
        with self.runtime.summary_hub.subscribe(lambda chat: chat.id in self.ctx.chats) as events:
            async for event in events:
                await self._send(frames.summary(event.message, event.request_id))

    async def _stop_on_shutdown(self, prompts: trio.Nursery, session: trio.CancelScope) -> None:
        """On SIGTERM every prompt ends with its `done` (reason `shutting_down`), then the socket closes."""
        await self.runtime.shutting_down.wait()
        self._closing = True
        for running in self._prompts.values():
            running.reason = "shutting_down"
            running.scope.cancel()
        with trio.move_on_after(self.runtime.settings.graceful_timeout):
            if self._prompts:
                await self._drained.wait()
            flushed = _Flushed()  # behind every `done` the prompts queued
            await self._outbox_send.send(flushed)
            await flushed.event.wait()
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            await self.socket.close(1001, "server shutting down")
        session.cancel()

    async def _read(self, prompts: trio.Nursery) -> None:
        while True:
            raw = await self.socket.receive()
            if not isinstance(raw, str):  # bytes, or None for an empty binary frame (Quart's reading)
                await self._send(frames.error("invalid_frame", "binary frames are not accepted; send JSON text"))
                continue
            try:
                frame = parse_frame(raw, self.runtime.settings)
            except FrameError as bad:
                await self._send(frames.error(bad.code, bad.detail, request_id=bad.request_id, chat_id=bad.chat_id))
                if bad.prompt:
                    self.access.started(bad.request_id, bad.chat_id)
                    await self._send(frames.done(bad.request_id, bad.chat_id, bad.code))
                continue
            if isinstance(frame, PromptFrame):
                self.access.started(frame.request_id, frame.chat_id)
                await self._start_prompt(prompts, frame)
            elif isinstance(frame, Register):
                await self._register(frame)
            elif isinstance(frame, Cancel):
                await self._cancel(frame)
            elif isinstance(frame, Ping):
                await self._send(frames.pong())

    # --- frames ------------------------------------------------------------------------------

    async def _register(self, frame: Register) -> None:
        if frame.token is not None:
            try:
                self.ctx.principal = await authenticate_bearer(self.runtime.store, self.runtime.settings, frame.token)
                self.ctx.credential = frame.token
            except AuthError as bad:
                await self._send(frames.error(bad.code, bad.message))
        history: list[Message] = []
        if frame.chat_id:
            try:
                await chat_for(self.runtime.store, self.principal, frame.chat_id)
            except ChatForbidden as forbidden:
                await self._send(frames.error("chat_forbidden", str(forbidden), chat_id=frame.chat_id))
            else:
                limit = self.runtime.settings.register_history
                if limit:
                    history = await self.runtime.store.aio.list_messages_for_chat(frame.chat_id, last=limit)
                self.ctx.chats.add(frame.chat_id)
        await self._send(frames.registered(frame, [history_entry(m) for m in history], self.principal.user_id))

    async def _start_prompt(self, prompts: trio.Nursery, frame: PromptFrame) -> None:
        rid = frame.request_id
        if self._closing:
            await self._send(frames.error("shutting_down", "the server is restarting; send it again shortly",
                                          request_id=rid, chat_id=frame.chat_id))
            await self._send(frames.done(rid, frame.chat_id, "shutting_down"))
            return
        if rid in self._prompts:
            # Not a new prompt: the running prompt with this id still sends its own `done`.
            await self._send(frames.error("duplicate_request", "a prompt with this request_id is still running",
                                          request_id=rid, chat_id=frame.chat_id))
            return
        if self.ctx.credential is not None:  # a key revoked or a user deleted since the socket opened
            try:
                self.ctx.principal = await authenticate_bearer(self.runtime.store, self.runtime.settings, self.ctx.credential)
            except AuthError as bad:
                await self._send(frames.error(bad.code, bad.message, request_id=rid, chat_id=frame.chat_id))
                await self._send(frames.done(rid, frame.chat_id, bad.code))
                return
        # The place in the chat's line is taken now, in arrival order (a new chat gets its id here).
        try:
            ticket = self.runtime.turns.ticket(frame.chat_id or str(uuid.uuid4()))
        except ChatBusy as busy:
            await self._send(frames.error("chat_busy", f"{busy}; wait for the current reply to finish",
                                          request_id=rid, chat_id=frame.chat_id))
            await self._send(frames.done(rid, frame.chat_id, "chat_busy"))
            return
        running = self._prompts[rid] = _Running()

        async def run() -> None:
            try:
                await run_prompt(self.ctx, frame, ticket, running.scope, lambda: running.reason)
            finally:
                del self._prompts[rid]
                if self._closing and not self._prompts:
                    self._drained.set()
                self.runtime.turns.leave(ticket)  # also when the task never ran

        prompts.start_soon(run)

    async def _cancel(self, frame: Cancel) -> None:
        if frame.request_id:
            targets = [frame.request_id] if frame.request_id in self._prompts else []
        else:
            targets = list(self._prompts)
        for rid in targets:
            self._prompts[rid].scope.cancel()
        await self._send(frames.cancel_ack(targets, frame.request_id))


def history_entry(message: Any) -> dict[str, Any]:
    """A stored message as `registered` sends it: the stored fields without attachment previews."""
    entry = to_dict(message)
    for attachment in entry.get("attachments") or []:
        attachment.pop("preview_base64", None)
    return entry
