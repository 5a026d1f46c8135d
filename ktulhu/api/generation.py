"""One quota-paid generation for the integrator APIs: reserve, route, submit, stream, refund.

Order: the user's quota is reserved first (atomic; `Problem` 403 `free_quota_exceeded` when used
up), then the prompt is built and submitted (engine refusals are `Problem`s with a status), then
the text is read. The reservation is refunded when no text reached the caller: the engine refused,
failed or was stopped before the first piece, or the caller went away before it. A reply that was
delivered, even partly, counts. A generation that ends other than by itself (an engine error, a
cancellation the caller did not ask for) is a `Problem`, never a quietly shorter reply.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import attrs
import orjson
import trio
from quart import Response, has_request_context, request

from ..auth.quota import QuotaExceeded, Reservation, UserGone, reserve
from ..engine.prompt import ChatMessage
from ..engine.request import EngineClosed, EngineError, Generation, GrammarDeadEnd
from ..engine.sampling import SamplingParams
from ..logs import note_generation
from ..nurseries.provided import Provided
from ..nurseries.runtime import Runtime
from ..refusals import ENGINE_REFUSALS, http_problem
from ..prompts import system_prompt
from ..router.result import IntentRoutingResult
from ..store.records import User
from .problems import Problem

__all__ = ["SSE_DONE", "PaidGeneration", "begin", "routed_system_prompt", "running", "sse_event", "sse_response"]

T = TypeVar("T")


def running(runtime: Runtime, provided: Provided[T]) -> T:
    """What the engine service provides (the engine, the embedder), or a 503 while the model starts
    or the server stops."""
    value = provided.current
    if value is None or runtime.shutting_down.is_set():
        raise Problem(503, "engine_unavailable", "the model is not running (starting or shutting down)",
                      headers={"Retry-After": "5"})
    return value

#: Seconds a refund may take when the request is being cancelled (it runs shielded).
REFUND_TIMEOUT_S = 5.0


async def routed_system_prompt(runtime: Runtime, text: str, language: str | None) -> tuple[IntentRoutingResult | None, str]:
    """The router's decision for `text` and the system prompt in the caller's language."""
    router = runtime.router.current
    if router is None:
        raise Problem(503, "router_unavailable", "the intent router is not running; try again shortly")
    result = await router.classify(text, language)
    return result, system_prompt(result, language or result.language)


async def _submit(runtime: Runtime, messages: Sequence[ChatMessage], params: SamplingParams,
                  chat_id: str | None, *, prompt: str | Sequence[int] | None = None,
                  model: str | None = None) -> tuple[Generation, str]:
    """`engine.chat(messages)`, or with `prompt` `engine.complete(prompt)` (a raw completion), on the
    model `model` picks (`ModelPool.resolve`; remote mode: the one model), and that model's name."""
    engine = running(runtime, runtime.engine)
    pool = runtime.models.current
    if pool is None:
        return await _submit_to(engine, messages, params, chat_id, prompt), runtime.settings.model_name
    try:
        lease = await pool.acquire(model)
    except ENGINE_REFUSALS as refused:
        raise http_problem(refused, "model") from None
    try:
        generation = await _submit_to(lease.engine, messages, params, chat_id, prompt)
    except BaseException:
        lease.release()
        raise
    lease.follow(generation)  # the model stays loaded until the generation ends
    return generation, lease.name


async def _submit_to(engine: Any, messages: Sequence[ChatMessage], params: SamplingParams, chat_id: str | None,
                     prompt: str | Sequence[int] | None) -> Generation:
    param = "messages" if prompt is None else "prompt"
    try:
        if prompt is not None:
            return await engine.complete(prompt, params, chat_id=chat_id)
        return await engine.chat(messages, params, chat_id=chat_id)
    except ENGINE_REFUSALS as refused:
        raise http_problem(refused, param) from None
    except ValueError as exc:  # e.g. a grammar that this model's vocabulary cannot express
        raise Problem(400, "invalid_request", str(exc)) from None


@attrs.define(eq=False)
class PaidGeneration:
    """A running generation and the quota reservation that pays for it. Use `with` (leaving cancels)."""

    generation: Generation
    reservation: Reservation
    #: The name of the model that runs it.
    model: str = ""
    delivered: bool = False

    def __enter__(self) -> PaidGeneration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.generation.cancel()

    @property
    def generation_count(self) -> int:
        return self.reservation.generation_count

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text pieces. An engine failure, or a generation cancelled by someone else
        than this reader (it ends without finishing), is a `Problem` (after the refund when nothing
        was delivered); cancellation before the first piece refunds too (shielded, bounded)."""
        try:
            async for piece in self.generation:
                self.delivered = True
                yield piece
        except EngineError as exc:
            await self._refund_if_undelivered()
            if isinstance(exc, GrammarDeadEnd):  # the request's grammar, not the server, is at fault
                raise Problem(400, "invalid_grammar", f"{exc}: the grammar cannot be completed by this model's "
                                                      "tokens") from None
            status = 503 if isinstance(exc, EngineClosed) else 500
            raise Problem(status, "generation_failed", str(exc) or "the generation failed") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._refund_if_undelivered()
            raise
        if self.finish_reason not in ("eos", "stop", "length"):
            await self._refund_if_undelivered()
            raise Problem(503, "generation_cancelled", "the server stopped this generation before it finished "
                          "(shutting down or told to); the reply is incomplete", headers={"Retry-After": "5"})

    async def text(self) -> str:
        parts = [piece async for piece in self.pieces()]
        return "".join(parts)

    async def _refund_if_undelivered(self) -> None:
        if not self.delivered:
            with trio.move_on_after(REFUND_TIMEOUT_S):
                await self.reservation.refund()

    @property
    def finish_reason(self) -> str | None:
        finished = self.generation.finished
        return None if finished is None else finished.reason

    @property
    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object. `cached_tokens` counts only the prompt tokens the same caller's
        earlier request (same `chat_id`) left in the cache: a prefix shared with someone else is
        reused but not reported, since its length would tell what their prompt began with."""
        metrics = self.generation.metrics
        prompt, completion = metrics.prompt_tokens, metrics.generated_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": metrics.own_cached_tokens}}


async def begin(runtime: Runtime, user: User, messages: Sequence[ChatMessage], params: SamplingParams, *,
                chat_id: str | None = None, prompt: str | Sequence[int] | None = None,
                model: str | None = None) -> PaidGeneration:
    """Reserve one generation of `user`'s quota and submit the prompt; raises `Problem`. `chat_id`
    keys the engine's prefix cache (slot affinity, and which cached tokens count as the caller's own).
    With `prompt` (text or token ids), a raw completion of it: no chat template, `messages` unused.
    `model` picks the model (404 `model_not_found` for an unknown one when several are configured)."""
    try:
        reservation = await reserve(runtime.store, runtime.settings, user)
    except QuotaExceeded:
        raise Problem(403, "free_quota_exceeded",
                      "the free plan's generations are used up; upgrade to continue") from None
    except UserGone:
        raise Problem(401, "user_not_found", "the account no longer exists") from None
    try:
        generation, name = await _submit(runtime, messages, params, chat_id, prompt=prompt, model=model)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(REFUND_TIMEOUT_S):
            await reservation.refund()
        raise
    if has_request_context():  # the access line of this request reports the tokens generated
        note_generation(request.scope, generation.metrics)
    return PaidGeneration(generation, reservation, name)


#: The end of an OpenAI-style stream.
SSE_DONE = b"data: [DONE]\n\n"


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One Server-Sent Event: an optional `event:` line and one `data:` line of compact JSON."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def sse_response(body: AsyncIterator[bytes], paid: PaidGeneration) -> Response:
    """A `text/event-stream` response of `body`. The generation is cancelled when the response is
    dropped, also when the client left before the body started (so it never runs unread)."""
    response = Response(body, status=200, content_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None
    weakref.finalize(response, paid.generation.cancel)
    return response
