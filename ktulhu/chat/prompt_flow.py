"""One prompt from its frame to its single `done` (original §3.5 and §3.9, with the fixes of §8).

    access check -> rate limit / quota -> routing (`classifier_debug`) -> chat created?
    (`chat_created`) -> attachments (`vision_summary`) -> the chat's turn -> history from the store
    -> user turn saved -> engine (token frames) -> assistant turn saved -> title requested -> `done`

Every frame carries `request_id` and `chat_id`. Whatever happens (refusal, cancel, engine failure,
server shutdown) the prompt ends with exactly one `done`, unless the socket itself is gone. A reply
that was cancelled is saved with what was generated and `meta.cancelled = true`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .. import metrics
from ..auth import quota
from ..auth.principal import Principal
from ..auth.ratelimit import retry_after_s, spend
from ..engine.prompt import ChatMessage
from ..engine.request import EngineError, Generation
from ..engine.sampling import SamplingParams
from ..nurseries.runtime import Runtime
from ..pg_wire import PgWireError
from ..refusals import ENGINE_REFUSALS, ws_code
from ..prompts import system_prompt
from ..router.result import IntentRoutingResult, default_result
from ..router.routing import normalise_language
from ..store.errors import StoreError
from ..store.records import Chat, Message, now_ms
from . import frames
from .access import ChatForbidden, chat_for, may_use_chat
from .attachments import attachment_notes, classification_text, render_content
from .frames import PromptFrame
from .turns import Ticket

__all__ = ["PromptContext", "Refused", "run_prompt"]

log = logging.getLogger("ktulhu.chat")

Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Bound on the final store writes of a prompt that is being torn down (disconnect, shutdown).
PERSIST_TIMEOUT_S = 5.0
#: A streaming reply is saved this often (marked incomplete), so a killed process leaves it in the history.
CHECKPOINT_S = 2.0
#: Roles of stored messages that become turns of the prompt (`summary` and `system` are not).
_TURN_ROLES = ("user", "assistant")


class Refused(Exception):
    """The prompt cannot run: `code` goes into the `error` frame's `message`, `detail` says why."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@attrs.define
class PromptContext:
    """What a prompt needs from its socket."""

    runtime: Runtime
    principal: Principal
    client: str
    send: Send
    #: Chats this socket prompted on or registered (their titles are pushed to it), newest last.
    chats: FollowedChats = attrs.field(factory=lambda: FollowedChats())
    #: The bearer credential the socket presented: re-checked before every prompt, so a revoked
    #: key, a deleted user or a changed role takes effect on sockets that are already open.
    credential: str | None = None


class FollowedChats:
    """The chats a socket follows, at most `limit` (the oldest is forgotten): `register` frames must
    not grow a socket's memory without bound."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._ids: dict[str, None] = {}

    def add(self, chat_id: str) -> None:
        self._ids.pop(chat_id, None)
        self._ids[chat_id] = None
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, chat_id: object) -> bool:
        return chat_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


@attrs.define
class _Reply:
    """The state of one prompt while it runs."""

    request_id: str
    chat_id: str
    ticket: Ticket
    parts: list[str] = attrs.field(factory=list)
    generation: Generation | None = None
    user_message: Message | None = None
    reservation: quota.Reservation | None = None
    #: The assistant turn's id: checkpoints and the final save replace one record in place.
    assistant_id: str = attrs.field(factory=lambda: str(uuid.uuid4()))

    def assistant_message(self, meta: dict[str, Any]) -> Message:
        assert self.user_message is not None and self.generation is not None
        counts = self.generation.metrics
        return Message(
            id=self.assistant_id, chat_id=self.chat_id, session_id=self.user_message.session_id,
            device_hash=self.user_message.device_hash, role="assistant", text="".join(self.parts).strip(),
            language=self.user_message.language, ts=now_ms(),
            meta={"request_id": self.request_id, "prompt_tokens": counts.prompt_tokens,
                  "generated_tokens": counts.generated_tokens,
                  **({"worker": counts.worker} if counts.worker else {}), **meta},
        )


async def run_prompt(ctx: PromptContext, frame: PromptFrame, ticket: Ticket, scope: trio.CancelScope,
                     cancel_reason: Callable[[], str]) -> None:
    """Run `frame` to its `done`. `ticket` is its place in its chat's line, taken on arrival (a new
    chat's id is chosen then, so every frame of the prompt carries the same chat id). `scope` is
    this prompt's own cancel scope (a `cancel` frame or a shutdown cancels it; `cancel_reason()`
    then says which); a cancel from outside (the socket went away) ends the prompt without frames,
    after saving what was generated."""
    reply = _Reply(frame.request_id, ticket.chat_id, ticket)
    reason = "error"
    try:
        with scope:
            try:
                reason = await _flow(ctx, frame, reply)
            except Refused as refused:
                reason = refused.code
                await ctx.send(frames.error(refused.code, refused.detail, request_id=reply.request_id,
                                            chat_id=reply.chat_id))
            except StoreError as failed:  # disk full, I/O error: the store service is reopening it
                log.warning("prompt ended: %s", failed)
                reason = "store_unavailable"
                await ctx.send(frames.error(reason, "the chat store cannot be written right now; try again "
                                            "shortly", request_id=reply.request_id, chat_id=reply.chat_id))
        if scope.cancelled_caught:
            reason = cancel_reason()
    finally:
        # Runs on every path, also when the socket's nursery is being cancelled: what was generated
        # is kept, and an unused quota unit is given back.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(PERSIST_TIMEOUT_S):
                try:
                    await _finish(ctx, reply, reason)
                except StoreError as failed:
                    log.warning("the reply could not be saved: %s", failed)
                    reason = "store_unavailable"
            await ctx.runtime.turns.finish(ticket)  # the next prompt of the chat sees this reply
    metrics.WS_PROMPTS.labels(reason).inc()
    usage = None
    if reply.generation is not None:
        counts = reply.generation.metrics
        usage = {"prompt_tokens": counts.prompt_tokens, "cached_tokens": counts.own_cached_tokens,
                 "generated_tokens": counts.generated_tokens}
    await ctx.send(frames.done(reply.request_id, reply.chat_id, reason, usage))


async def _flow(ctx: PromptContext, frame: PromptFrame, reply: _Reply) -> str:
    runtime = ctx.runtime
    store = runtime.store
    if frame.chat_id:
        try:
            await chat_for(runtime.store, ctx.principal, frame.chat_id)
        except ChatForbidden as forbidden:
            raise Refused("chat_forbidden", str(forbidden)) from None
    await _admit(ctx, frame, reply)

    notes = attachment_notes(frame.attachments)
    result = await _route(runtime, classification_text(frame.text, notes), frame.language)
    await ctx.send(frames.classifier_debug(reply.request_id, reply.chat_id, result.to_json()))

    chat, _ = await store.aio.ensure_chat_for_device(reply.chat_id, frame.device_hash or None,
                                                      user_id=ctx.principal.user_id)
    _check_access(ctx.principal, chat)  # someone else may have created it since the first check
    ctx.chats.add(chat.id)
    if chat.id != frame.chat_id:
        await ctx.send(frames.chat_created(reply.request_id, reply.chat_id))
    if notes:
        await ctx.send(frames.vision_summary(reply.request_id, reply.chat_id, notes))

    try:
        await runtime.turns.wait(reply.ticket)  # the chat's previous prompts have ended and are saved
    except PgWireError as failed:
        raise StoreError(f"the shared store cannot be reached: {failed}") from None
    return await _generate(ctx, frame, reply, chat, result, notes)


def _check_access(principal: Principal, chat: Chat | None) -> None:
    if not may_use_chat(principal, chat):
        raise Refused("chat_forbidden", "this chat belongs to another account")


async def _admit(ctx: PromptContext, frame: PromptFrame, reply: _Reply) -> None:
    """Anonymous sessions are rate-limited per client address (the real client behind a trusted
    proxy); accounts spend their quota (`ktulhu/auth/quota.py`, shared with the integrator APIs).
    The device hash keys no budget: it is whatever a client sends, so a bucket keyed by it let
    anyone lock a victim's device out by spending its tokens."""
    runtime = ctx.runtime
    settings = runtime.settings
    store = runtime.store
    user = ctx.principal.user
    if ctx.principal.is_admin:
        return
    if user is None:
        decision = await spend(store, "anon_ip", ctx.client, settings.anon_rate)
        if decision is not None and not decision.allowed:
            raise Refused("rate_limited", f"too many messages; try again in {retry_after_s(decision)} s or sign in")
        return
    try:
        reply.reservation = await quota.reserve(runtime.store, runtime.settings, user)
    except quota.UserGone:
        raise Refused("user_not_found", "the signed-in account no longer exists") from None
    except quota.QuotaExceeded:
        raise Refused("quota_exceeded", f"the free plan allows {settings.free_generations} messages; "
                                        "upgrade to continue") from None


async def _route(runtime: Runtime, text: str, language: str | None) -> IntentRoutingResult:
    router = runtime.router.current
    if router is None:
        return default_result(normalise_language(language), notes=("router not running",))
    return await router.classify(text, language)


def _left_on(history: list[Message]) -> tuple[str, int] | None:
    """The worker that made the chat's last reply and the tokens that exchange left there."""
    for message in reversed(history):
        if message.role == "assistant":
            meta = message.meta if isinstance(message.meta, dict) else {}
            worker, prompt, generated = meta.get("worker"), meta.get("prompt_tokens"), meta.get("generated_tokens")
            if isinstance(worker, str) and isinstance(prompt, int) and isinstance(generated, int):
                return worker, prompt + generated
            return None
    return None


def history_turns(history: list[Message]) -> list[ChatMessage]:
    """Stored messages as prompt turns: user and assistant text with attachment notes; empty ones skipped."""
    turns = []
    for message in history:
        if message.role not in _TURN_ROLES:
            continue
        content = render_content(message.text, attachment_notes(message.attachments))
        if content:
            turns.append(ChatMessage(message.role, content))
    return turns


async def _generate(ctx: PromptContext, frame: PromptFrame, reply: _Reply, chat: Chat,
                    result: IntentRoutingResult, notes: list[str]) -> str:
    runtime = ctx.runtime
    store = runtime.store
    engine = runtime.engine.current
    if engine is None:
        raise Refused("server_busy", "the model is not loaded yet; try again shortly")
    settings = runtime.settings
    with runtime.arrivals.expecting():  # on its way until the engine has the prompt (`Arrivals`)
        history = (await store.aio.list_messages_for_chat(chat.id, last=settings.history_messages)
                   if settings.history_messages else [])

        newest = render_content(frame.text, notes)
        messages = [ChatMessage("system", system_prompt(result, frame.language)),
                    *history_turns(history), ChatMessage("user", newest)]
        params = SamplingParams.defaults(settings)
        lease = None
        try:
            pool = runtime.models.current
            if pool is not None:  # a configured name picks its model; any other is the default
                lease = await pool.acquire(frame.model, strict=False)
                engine = lease.engine
            reply.generation = await engine.chat(messages, params, chat_id=chat.id, left_on=_left_on(history))
        except ENGINE_REFUSALS as refused:
            raise Refused(ws_code(refused), str(refused)) from None
        finally:
            if lease is not None and reply.generation is None:
                lease.release()
    reply.generation.metrics.arrived = frame.received  # the request overhead metric starts there
    if lease is not None:
        lease.follow(reply.generation)  # the model stays loaded until the reply ends
    with reply.generation as generation:
        # The user turn is stored once the engine has taken the prompt: a refused one (busy, too
        # long) leaves no orphan turn that a retry would repeat and the model would read.
        message_id = reply.request_id
        if await store.aio.find_message(chat.id, message_id) is not None:
            message_id = str(uuid.uuid4())  # a reused request id never overwrites stored history
        reply.user_message = await store.aio.save_message(Message(
            id=message_id, chat_id=chat.id, session_id=frame.session_id or None,
            user_id=ctx.principal.user_id, device_hash=frame.device_hash or None, role="user",
            text=frame.text, language=result.language, attachments=list(frame.attachments), ts=now_ms(),
            meta=result.message_meta(),
        ))
        await store.aio.touch_chat(chat.id, frame.device_hash or None)
        checkpoint_at = trio.current_time() + CHECKPOINT_S
        try:
            async for piece in generation:
                reply.parts.append(piece)
                await ctx.send(frames.token(reply.request_id, reply.chat_id, piece))
                if trio.current_time() >= checkpoint_at:  # what a kill -9 would otherwise lose
                    await store.aio.save_message(reply.assistant_message(
                        {"finish_reason": "interrupted", "incomplete": True}), existing_chat_only=True)
                    checkpoint_at = trio.current_time() + CHECKPOINT_S
        except EngineError as failed:
            raise Refused(ws_code(failed), str(failed)) from None
    assert generation.finished is not None
    return generation.finished.reason


async def _finish(ctx: PromptContext, reply: _Reply, reason: str) -> None:
    """Save the assistant turn (also a cancelled one), give back an unused quota unit, ask for a title."""
    runtime = ctx.runtime
    store = runtime.store
    generation = reply.generation
    if generation is None or reply.user_message is None:
        if generation is not None:
            generation.cancel()
        if reply.reservation is not None:  # the model never ran: the message does not count
            await reply.reservation.refund()
        return
    generation.cancel()  # no-op when it finished; frees the slot at the next step otherwise
    cancelled = (generation.finished is None or generation.finished.reason == "cancelled"
                 or reason in ("cancelled", "shutting_down"))
    meta: dict[str, Any] = {"finish_reason": "cancelled" if cancelled else reason, "cancelled": cancelled}
    if not cancelled and reason not in ("eos", "stop", "length"):
        meta["incomplete"] = True  # cut by a failure (a worker gone, the store): what came is kept
    message = reply.assistant_message(meta)
    text = message.text
    saved = await store.aio.save_message(message, existing_chat_only=True)
    chat = None if saved is None else await store.aio.touch_chat(reply.chat_id, existing_chat_only=True)
    if chat is None:  # the chat was deleted while the reply was generated: it stays deleted
        return
    summaries = runtime.summaries.current
    if text and summaries is not None and not (isinstance(chat.meta, dict) and chat.meta.get("has_summary")):
        summaries.request(reply.chat_id, reply.request_id)
