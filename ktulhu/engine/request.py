"""One generation as both sides see it: the decode thread fills it, a trio task reads it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .sampling import SamplingParams

__all__ = ["Busy", "EngineClosed", "EngineError", "EngineEvents", "Finished", "Generation", "RequestMetrics",
           "TokenLogprob"]


def _ignore(*_: object) -> None:
    pass


@attrs.frozen
class EngineEvents:
    """What an engine reports as it works, to whoever it was given to (the process's metrics when it
    serves: `ktulhu.metrics.ENGINE_EVENTS`). An observer that raises is ignored: observing must
    never break generation."""

    #: Once per generation, on the trio thread, with its `Finished` (latencies, token counts).
    finished: Callable[["Finished"], None] = _ignore
    #: Once per batched step, on its decode thread: (sequences in the step, prompt tokens prefilled).
    step: Callable[[int, int], None] = _ignore
    #: Once per step that verified draft tokens (speculative decoding), on its decode thread:
    #: (draft tokens verified, those accepted).
    drafted: Callable[[int, int], None] = _ignore

    def report(self, observer: Callable[..., None], *args: Any) -> None:
        try:
            observer(*args)
        except Exception:  # noqa: BLE001 - observability must not break generation
            pass


class EngineError(Exception):
    """Generation failed; the message is safe to show to the user."""


class GrammarDeadEnd(EngineError):
    """The request's grammar admits no token at some point (e.g. it demands a byte no token spells):
    the caller's grammar is at fault, not the engine."""


class Busy(EngineError):
    """The admission queue is full. Nothing was queued; the caller may retry shortly."""


class EngineClosed(EngineError):
    """The engine stopped (server shutting down) before this generation finished."""


@attrs.define
class RequestMetrics:
    """Timings (time.perf_counter seconds) and token counts of one generation."""

    submitted: float
    prompt_tokens: int
    #: When the request reached the server (its HTTP request or `/ws` frame), if the surface says:
    #: `submitted - arrived` is the work before the engine (parsing, quota, routing, the prompt).
    arrived: float | None = None
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    cached_tokens: int = 0
    #: The part of `cached_tokens` this request's own chat left in the slot: the only figure a
    #: client is shown (a prefix shared with another chat would tell what that chat's text began with).
    own_cached_tokens: int = 0
    generated_tokens: int = 0
    gaps: list[float] = attrs.field(factory=list)
    cancel_requested: float | None = None
    slot_freed: float | None = None
    #: The inference worker that served it (remote mode: its URL without credentials), else None.
    worker: str | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.admitted is None else self.admitted - self.submitted

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def cancel_latency(self) -> float | None:
        if self.cancel_requested is None or self.slot_freed is None:
            return None
        return max(0.0, self.slot_freed - self.cancel_requested)


@attrs.frozen
class Finished:
    #: "eos" (end of turn), "stop" (a stop string), "length" (max tokens or context), "cancelled",
    #: "error".
    reason: str
    metrics: RequestMetrics


@attrs.frozen
class TokenLogprob:
    """One generated token's log probability, for requests that ask (`SamplingParams.logprobs`).

    `data` is the token's own bytes (a multi-byte character may be split across tokens: only the
    concatenation of consecutive tokens' bytes is valid UTF-8). `logprob` is the natural log of the
    token's probability under the model's raw distribution (log-softmax of its logits at that step,
    before logit biases, penalties, grammar and temperature); `top` the most likely tokens of that
    distribution as (bytes, logprob), most likely first."""

    data: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@attrs.define(eq=False)
class Generation:
    """Handle of a submitted generation. Iterate it for text pieces; leaving `with` cancels it.

    Pieces are coalesced: a slow reader gets everything produced since its last read in one
    piece, never less. `finished` is set when the iteration ends. When the request asked for log
    probabilities, `take_logprobs()` after each piece (and once after the iteration) returns the
    entries of the tokens that piece holds.
    """

    tokens: tuple[int, ...]
    params: SamplingParams
    chat_id: str | None
    metrics: RequestMetrics
    #: Set by the trio side, read by the decode thread at the start of every step.
    cancelled: bool = False
    finished: Finished | None = None
    error: EngineError | None = None
    _pieces: list[str] = attrs.field(factory=list)
    #: Token entries delivered and not yet handed out with a piece, and those handed out, not yet taken.
    _logprobs: list[TokenLogprob] = attrs.field(factory=list)
    _handed: list[TokenLogprob] = attrs.field(factory=list)
    _event: trio.Event = attrs.field(factory=trio.Event)
    #: Set by `cancel()`: whoever produces the text (a remote stream) awaits it instead of polling.
    _cancel_event: trio.Event = attrs.field(factory=trio.Event)
    #: Called once, on the trio thread, when the generation ends (`when_finished`).
    _on_finish: list[Callable[[], None]] = attrs.field(factory=list)
    #: Told of the generation's end (`EngineEvents.finished`).
    events: EngineEvents = EngineEvents()

    @classmethod
    def create(cls, tokens: Sequence[int], params: SamplingParams, chat_id: str | None,
               events: EngineEvents = EngineEvents()) -> "Generation":
        return cls(tuple(tokens), params, chat_id, RequestMetrics(time.perf_counter(), len(tokens)), events=events)

    # --- trio side ----------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the decode thread to drop this sequence at its next step (idempotent)."""
        if not self.cancelled and self.finished is None:
            self.metrics.cancel_requested = time.perf_counter()
            self.cancelled = True
            try:
                self._cancel_event.set()
            except RuntimeError:  # called outside the trio thread (a finalizer): the flag still counts
                pass

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the generation has ended (at once if it has): the model pool counts
        a model's running generations with it."""
        if self.finished is not None:
            callback()
        else:
            self._on_finish.append(callback)

    def _ended(self, finished: Finished) -> None:
        self.events.report(self.events.finished, finished)
        callbacks, self._on_finish = self._on_finish, []
        for callback in callbacks:
            callback()

    async def wait_cancelled(self) -> None:
        """Return once `cancel()` was called (at once if it already was)."""
        await self._cancel_event.wait()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> str:
        while True:
            if self._pieces:
                text = "".join(self._pieces)
                self._pieces.clear()
                self._hand_logprobs()
                return text
            if self.error is not None:
                raise self.error
            if self.finished is not None:
                self._hand_logprobs()
                raise StopAsyncIteration
            await self._event.wait()
            self._event = trio.Event()

    async def text(self) -> str:
        """The whole reply (for non-streaming callers)."""
        return "".join([piece async for piece in self])

    def take_logprobs(self) -> list[TokenLogprob]:
        """The entries of the tokens in the pieces returned since the last call, in order (after the
        iteration ended: also those of tokens that added no visible text). Empty unless asked for."""
        taken, self._handed = self._handed, []
        return taken

    def _hand_logprobs(self) -> None:
        if self._logprobs:
            self._handed.extend(self._logprobs)
            self._logprobs.clear()

    # --- called on the trio thread on behalf of the decode thread (run_sync_soon) ---------------

    def deliver(self, text: str, finished: Finished | None = None, logprobs: Sequence[TokenLogprob] = ()) -> None:
        if text:
            self._pieces.append(text)
        if logprobs:
            self._logprobs.extend(logprobs)
        if finished is not None:
            first = self.finished is None
            self.finished = finished
            if first:
                self._ended(finished)
        self._event.set()

    def fail(self, error: EngineError) -> None:
        if self.finished is None:
            self.error = error
            self.finished = Finished("error", self.metrics)
            self._ended(self.finished)
        self._event.set()
