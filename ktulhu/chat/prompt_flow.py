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
from ..engine.prompt import ChatMessage, ContextTooLong, PromptError, render_content
from ..engine.request import Busy, EngineClosed, EngineError, Generation
from ..engine.sampling import SamplingParams
from ..nurseries.runtime import Runtime
from ..prompts import system_prompt
from ..router.result import IntentRoutingResult, default_result
from ..router.routing import normalise_language
from ..store.records import Chat, Message, MessageAttachment, now_ms
from . import frames
from .access import may_use_chat
from .attachments import attachment_notes, classification_text
from .frames import PromptFrame
from .turns import Ticket

__all__ = ["PromptContext", "Refused", "run_prompt"]

log = logging.getLogger("ktulhu.chat")

Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Bound on the final store writes of a prompt that is being torn down (disconnect, shutdown).
PERSIST_TIMEOUT_S = 5.0
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
    #: Chats this socket prompted on (their titles are pushed to it).
    chats: set[str] = attrs.field(factory=set)


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

    def frame(self, **fields: Any) -> dict[str, Any]:
        return {**fields, "request_id": self.request_id, "chat_id": self.chat_id}


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
        if scope.cancelled_caught:
            reason = cancel_reason()
    finally:
        # Runs on every path, also when the socket's nursery is being cancelled: what was generated
        # is kept, and an unused quota unit is given back.
        with trio.CancelScope(shield=True), trio.move_on_after(PERSIST_TIMEOUT_S):
            await _finish(ctx, reply, reason)
        ctx.runtime.turns.leave(ticket)  # the next prompt of the chat sees this reply in its history
    metrics.WS_PROMPTS.labels(reason).inc()
    usage = None
    if reply.generation is not None:
        counts = reply.generation.metrics
        usage = {"prompt_tokens": counts.prompt_tokens, "cached_tokens": counts.cached_tokens,
                 "generated_tokens": counts.generated_tokens}
    await ctx.send(frames.done(reply.request_id, reply.chat_id, reason, usage))


async def _flow(ctx: PromptContext, frame: PromptFrame, reply: _Reply) -> str:
    runtime = ctx.runtime
    store = runtime.store
    assert store is not None
    if frame.chat_id:
        _check_access(ctx.principal, await store.aio.load_chat(frame.chat_id))
    await _admit(ctx, frame, reply)

    stored_attachments = frame.stored_attachments()
    notes = attachment_notes(stored_attachments)
    result = await _route(runtime, classification_text(frame.text, notes), frame.language)
    await ctx.send(reply.frame(type="classifier_debug", intent_result=result.to_json()))

    chat, _ = await store.aio.ensure_chat_for_device(reply.chat_id, frame.device_hash or None,
                                                      user_id=ctx.principal.user_id)
    _check_access(ctx.principal, chat)  # someone else may have created it since the first check
    ctx.chats.add(chat.id)
    if chat.id != frame.chat_id:
        await ctx.send(reply.frame(type="system", event="chat_created"))
    if notes:
        await ctx.send(reply.frame(type="vision_summary", summary="\n".join(notes)))

    await reply.ticket.ready.wait()  # the chat's previous prompts have ended and are saved
    return await _generate(ctx, frame, reply, chat, result, stored_attachments)


def _check_access(principal: Principal, chat: Chat | None) -> None:
    if not may_use_chat(principal, chat):
        raise Refused("chat_forbidden", "this chat belongs to another account")


async def _admit(ctx: PromptContext, frame: PromptFrame, reply: _Reply) -> None:
    """Anonymous sessions are rate-limited per device and per address; accounts spend their quota
    (`ktulhu/auth/quota.py`, shared with the integrator APIs)."""
    runtime = ctx.runtime
    settings = runtime.settings
    store = runtime.store
    assert store is not None
    user = ctx.principal.user
    if ctx.principal.is_admin:
        return
    if user is None:
        rate = settings.anon_rate
        if not rate:
            return
        subjects = [("anon_ip", ctx.client)] + ([("anon_device", frame.device_hash)] if frame.device_hash else [])
        for scope, subject in subjects:
            decision = await store.aio.take_rate_token(scope, subject, capacity=rate, refill_per_s=rate / 60)
            if not decision.allowed:
                seconds = max(1, round(decision.retry_after_ms / 1000))
                raise Refused("rate_limited", f"too many messages; try again in {seconds} s or sign in")
        return
    try:
        reply.reservation = await quota.reserve(runtime, user)
    except quota.UserGone:
        raise Refused("user_not_found", "the signed-in account no longer exists") from None
    except quota.QuotaExceeded:
        raise Refused("quota_exceeded", f"the free plan allows {settings.free_generations} messages; "
                                        "upgrade to continue") from None


async def _route(runtime: Runtime, text: str, language: str | None) -> IntentRoutingResult:
    if runtime.router is None:
        return default_result(normalise_language(language), notes=("router not running",))
    return await runtime.router.classify(text, language)


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
                    result: IntentRoutingResult, attachments: list[MessageAttachment]) -> str:
    runtime = ctx.runtime
    store = runtime.store
    engine = runtime.engine
    assert store is not None
    if engine is None:
        raise Refused("server_busy", "the model is not loaded yet; try again shortly")
    settings = runtime.settings
    history = (await store.aio.list_messages_for_chat(chat.id, last=settings.history_messages)
               if settings.history_messages else [])

    message_id = reply.request_id
    if await store.aio.find_message(chat.id, message_id) is not None:
        message_id = str(uuid.uuid4())  # a reused request id never overwrites stored history
    reply.user_message = await store.aio.save_message(Message(
        id=message_id, chat_id=chat.id, session_id=frame.session_id or None,
        user_id=ctx.principal.user_id, device_hash=frame.device_hash or None, role="user",
        text=frame.text, language=result.language, attachments=attachments, ts=now_ms(),
        meta=result.message_meta(),
    ))
    await store.aio.touch_chat(chat.id, frame.device_hash or None)

    newest = render_content(frame.text, attachment_notes(attachments))
    messages = [ChatMessage("system", system_prompt(result, frame.language)),
                *history_turns(history), ChatMessage("user", newest)]
    params = SamplingParams.defaults(settings)
    try:
        reply.generation = engine.chat(messages, params, chat_id=chat.id)
    except Busy as busy:
        raise Refused("server_busy", str(busy)) from None
    except ContextTooLong as too_long:
        raise Refused("context_too_long", str(too_long)) from None
    except PromptError as bad:
        raise Refused("model_error", str(bad)) from None
    except EngineClosed as closed:
        raise Refused("shutting_down", str(closed)) from None
    with reply.generation as generation:
        try:
            async for piece in generation:
                reply.parts.append(piece)
                await ctx.send(reply.frame(type="assistant", token=piece))
        except EngineClosed as closed:
            raise Refused("shutting_down", str(closed)) from None
        except EngineError as failed:
            raise Refused("model_error", str(failed)) from None
    assert generation.finished is not None
    return generation.finished.reason


async def _finish(ctx: PromptContext, reply: _Reply, reason: str) -> None:
    """Save the assistant turn (also a cancelled one), give back an unused quota unit, ask for a title."""
    runtime = ctx.runtime
    store = runtime.store
    assert store is not None
    generation = reply.generation
    if generation is None:
        if reply.reservation is not None:  # the model never ran: the message does not count
            await reply.reservation.refund()
        return
    generation.cancel()  # no-op when it finished; frees the slot at the next step otherwise
    cancelled = (generation.finished is None or generation.finished.reason == "cancelled"
                 or reason in ("cancelled", "shutting_down"))
    counts = generation.metrics
    meta = {"request_id": reply.request_id, "finish_reason": "cancelled" if cancelled else reason,
            "prompt_tokens": counts.prompt_tokens, "generated_tokens": counts.generated_tokens,
            "cancelled": cancelled}
    text = "".join(reply.parts).strip()
    assert reply.user_message is not None
    await store.aio.save_message(Message(
        id=str(uuid.uuid4()), chat_id=reply.chat_id, session_id=reply.user_message.session_id,
        device_hash=reply.user_message.device_hash, role="assistant", text=text,
        language=reply.user_message.language, ts=now_ms(), meta=meta,
    ))
    chat = await store.aio.touch_chat(reply.chat_id)
    summaries = runtime.summaries
    if text and summaries is not None and not (isinstance(chat.meta, dict) and chat.meta.get("has_summary")):
        summaries.request(reply.chat_id, reply.request_id)
