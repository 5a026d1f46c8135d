"""Inference on a fleet of OpenAI-compatible servers (llama-server, vLLM, SGLang, Ollama).

    RemoteEngine.run (engine nursery, one httpx client)
    ├── health[w]      GET /health (or /v1/models) every KTULHU_WORKER_HEALTH_INTERVAL: eject / re-admit
    └── stream[...]    one per accepted request: SSE from <worker>/v1/chat/completions (raw prompts:
                       /v1/completions) -> Generation

`chat()` takes a slot on the chat's worker (`routing.Router`: rendezvous hashing with bounded load,
a bounded FIFO, `Busy` beyond it), then starts the request's stream task in the engine nursery with
`nursery.start`: it reports started once the worker answered 200 with an event stream, so what
fails before any text (the worker is down, refuses the key, the prompt is too long) is raised by
`chat()` itself, and a worker that fails then is ejected and the request tried on the next one.
After that the task feeds the same `Generation` handle the local engine returns; it never raises.
A request counts as in flight from its wait for a slot until its handle ends (`wait_idle`).

`Generation.cancel()` (leaving `with`, a stop frame, a disconnect) sets the handle's cancel event;
the stream task awaits it and closes the HTTP stream at once, and the worker stops generating for
that slot. A worker that dies or turns silent mid-reply is ejected and the generation fails with an
`EngineError` naming it; the chat's next prompt goes to the next worker in its order. Every read is
bounded by KTULHU_WORKER_TIMEOUT, every health check by KTULHU_WORKER_HEALTH_TIMEOUT.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import httpx
import orjson
import trio

from ..settings import Settings
from .engine import EngineStats
from .in_flight import InFlight
from .prompt import ChatMessage, ContextTooLong, PromptError
from .request import Busy, EngineClosed, EngineError, EngineEvents, Finished, Generation, TokenLogprob
from .routing import Lease, Router, WorkerState
from .sampling import SamplingParams

__all__ = ["RemoteEngine", "RemoteWorkerStats", "WorkerContextTooLong", "WorkerFailed", "WorkerLacks", "prefix_key"]

log = logging.getLogger("ktulhu.engine.remote")

#: Longest line of an event stream, and most bytes of an error body read.
MAX_LINE_BYTES = 1 << 20
MAX_ERROR_BYTES = 64 << 10
#: Chats whose last worker and cached length are remembered (for `own_cached_tokens`).
AFFINITY_CHATS = 8192
#: Pieces a worker may send beyond the request's max_tokens before its stream counts as invalid.
PIECE_SLACK = 64


class WorkerFailed(EngineError):
    """An inference worker could not serve a request (unreachable, silent, HTTP 5xx, invalid stream)."""


class WorkerContextTooLong(ContextTooLong):
    """The worker's slot cannot hold even the system prompt and the newest message."""

    def __init__(self, needed: int | None, available: int | None) -> None:
        PromptError.__init__(
            self,
            f"the message needs {needed or 'more'} tokens with the system prompt, but the inference "
            f"worker's slot holds {available or 'fewer'}; shorten the message (or give the workers a larger "
            "context, llama-server's -c)",
        )
        self.needed = needed or 0
        self.available = available or 0


class WorkerLacks(EngineError):
    """The inference worker has no such endpoint (e.g. `/tokenize` on vLLM or Ollama)."""


class _ContextExceeded(Exception):
    """The worker refused the prompt as too long (before any text): trim and retry."""

    def __init__(self, n_prompt: int | None, n_ctx: int | None) -> None:
        super().__init__(f"prompt of {n_prompt} tokens, context {n_ctx}")
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


@attrs.frozen
class RemoteWorkerStats:
    """A snapshot of one worker for `/metrics` and the admin panel (EngineStats.workers)."""

    url: str
    healthy: bool
    slots: int
    busy_slots: int
    requests: int
    generated_tokens: int
    failures: int
    last_error: str | None
    last_error_at: float | None
    model: str | None
    #: The remote KV cache is the worker's own business: not counted here.
    kv_tokens: int = 0
    kv_capacity: int = 0
    stored_bytes: int = 0
    prefix_restores: int = 0


def prefix_key(messages: Sequence[ChatMessage]) -> str:
    """Routing key of a request without a chat: its system prompt and first user message, so
    repeated API prompts land where that prefix is cached."""
    system = next((m.content for m in messages if m.role == "system"), "")
    first = next((m.content for m in messages if m.role == "user"), "")
    digest = hashlib.blake2b(f"{system}\x00{first}".encode("utf-8", "replace"), digest_size=12).hexdigest()
    return f"prefix:{digest}"


class RemoteEngine:
    """`Engine`'s face (`chat`, `stats`, `drop_cache`) over `settings.workers`. Run `run` in a nursery."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None,
                 events: EngineEvents = EngineEvents()) -> None:
        if not settings.workers:
            raise ValueError("remote mode needs at least one worker (KTULHU_WORKERS)")
        self.settings = settings
        #: Told of every generation's end (the process's metrics when serving).
        self.events = events
        self.workers = tuple(WorkerState(spec, spec.slots or settings.n_slots, model=spec.model)
                             for spec in settings.workers)
        self.router = Router(self.workers, settings.queue, affinity=settings.worker_affinity)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        self._running = False
        #: chat id -> (worker url, tokens that chat left in the worker's cache), newest last.
        self._affinity: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        #: worker url -> its model's `meta` from `/v1/models` (None: it has none).
        self._meta: dict[str, dict[str, Any] | None] = {}
        self._in_flight = InFlight()

    # --- service ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        timeout = httpx.Timeout(settings.worker_timeout, connect=min(5.0, settings.worker_timeout))
        total_slots = sum(w.slots for w in self.workers)
        limits = httpx.Limits(max_connections=total_slots + 2 * len(self.workers) + 8,
                              max_keepalive_connections=total_slots + len(self.workers))
        try:
            async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False,
                                         transport=self._transport) as client:
                self._client = client
                async with trio.open_nursery() as nursery:
                    async with trio.open_nursery() as first_round:  # readiness reports what the fleet is now
                        for worker in self.workers:
                            first_round.start_soon(self._check, worker)
                    for worker in self.workers:
                        nursery.start_soon(self._watch, worker, name=f"health {worker.url}")
                    nursery.start_soon(self._close_when_stopping, name="remote engine stop")
                    self._nursery = nursery
                    self._running = True
                    task_status.started(self.describe())
        finally:
            self._stop()

    async def _close_when_stopping(self) -> None:
        """As soon as the engine nursery is cancelled: no new requests, waiting ones told at once."""
        try:
            await trio.sleep_forever()
        finally:
            self._stop()

    def _stop(self) -> None:
        self._running = False
        self.router.close()

    def describe(self) -> dict[str, Any]:
        """The readiness entry: every worker's state; `status` is ready, degraded (some down) or
        unavailable (none answers: `/readyz` is 503 until one does)."""
        healthy = self.router.healthy
        status = "ready" if len(healthy) == len(self.workers) else "degraded" if healthy else "unavailable"
        workers = ", ".join(
            f"{w.url} ({'up' if w.healthy else 'down: ' + (w.last_error or 'not checked yet')}, {w.slots} slots)"
            for w in self.workers)
        return {"status": status, "mode": "remote", "workers": workers,
                "healthy": f"{len(healthy)}/{len(self.workers)}", "slots": sum(w.slots for w in healthy),
                "queue": self.settings.queue}

    async def wait_for_change(self) -> None:
        """Return when a worker is ejected or re-admitted."""
        await self.router.wait_for_change()

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_depth=self.router.waiting,
            queue_capacity=self.settings.queue,
            workers=tuple(RemoteWorkerStats(
                url=w.url, healthy=w.healthy, slots=w.slots, busy_slots=w.busy, requests=w.requests,
                generated_tokens=w.generated_tokens, failures=w.failures, last_error=w.last_error,
                last_error_at=w.last_error_at, model=w.model,
            ) for w in self.workers),
        )

    async def wait_idle(self) -> None:
        """Return once no request waits for a slot or streams from a worker (at once if none
        does): background work (chat titles) awaits this instead of polling `stats`."""
        await self._in_flight.wait_idle()

    def drop_cache(self) -> None:
        """Nothing to free here: each worker manages its own prompt cache."""

    # --- health ----------------------------------------------------------------------------------

    async def _watch(self, worker: WorkerState) -> None:
        while True:
            await trio.sleep(self.settings.worker_health_interval)
            await self._check(worker)

    async def _check(self, worker: WorkerState) -> None:
        """One health check, bounded: 200 admits, anything else (refused, timeout, 5xx) ejects."""
        assert self._client is not None
        error: str | None = None
        limit = self.settings.worker_health_timeout
        with trio.move_on_after(limit) as waited:
            try:
                response = await self._client.get(worker.url + worker.health_path, headers=self._headers(worker),
                                                  timeout=limit)
                if response.status_code == 404 and worker.health_path == "/health":
                    worker.health_path = "/v1/models"  # a server without /health (Ollama)
                    response = await self._client.get(worker.url + worker.health_path,
                                                      headers=self._headers(worker), timeout=limit)
                if response.status_code != 200:
                    error = f"health check answered HTTP {response.status_code}"
                elif worker.model is None:
                    await self._discover_model(worker, response if worker.health_path == "/v1/models" else None)
            except (httpx.HTTPError, OSError) as failed:
                error = f"health check failed: {_describe(failed)}"
        if waited.cancelled_caught:
            error = f"health check got no answer within {limit:g} s"
        if error is None:
            if self.router.set_health(worker, True):
                log.info("inference worker %s admitted", worker.url)
        else:
            self._eject(worker, error, count=False)

    async def _discover_model(self, worker: WorkerState, response: httpx.Response | None) -> None:
        """The worker's first listed model becomes the `model` of its requests (best effort)."""
        assert self._client is not None
        try:
            if response is None:
                response = await self._client.get(worker.url + "/v1/models", headers=self._headers(worker),
                                                  timeout=self.settings.worker_health_timeout)
            data = response.json().get("data") if response.status_code == 200 else None
            if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
                worker.model = data[0]["id"]
        except (httpx.HTTPError, OSError, ValueError, AttributeError):
            pass

    def _eject(self, worker: WorkerState, error: str, *, count: bool = True) -> None:
        if count:
            worker.failures += 1
        worker.last_error = error
        worker.last_error_at = time.time()
        if self.router.set_health(worker, False):
            log.warning("inference worker %s ejected: %s", worker.url, error)

    def _headers(self, worker: WorkerState) -> dict[str, str]:
        return {"Authorization": f"Bearer {worker.spec.key}"} if worker.spec.key else {}

    # --- requests --------------------------------------------------------------------------------

    async def chat(self, messages: Sequence[ChatMessage], params: SamplingParams, *,
                   chat_id: str | None = None, left_on: tuple[str, int] | None = None) -> Generation:
        """Send the prompt to the chat's worker and return the handle once the worker accepted it.

        `left_on`: the worker that made the chat's last reply and how many tokens that exchange left
        there, as the stored history says; it tells this front-end what the chat may find cached
        when another front-end served its previous turn.

        Raises `Busy` (queue full, no worker reachable), `WorkerContextTooLong` (even the newest
        message does not fit after the oldest turns were dropped), `PromptError` (the worker refused
        the request), `WorkerFailed` (every worker tried failed), `EngineClosed`."""
        if not self._running or self._nursery is None:
            raise EngineClosed("the engine is not running")
        messages = tuple(messages)
        if not messages:
            raise PromptError("empty prompt")
        key = chat_id or prefix_key(messages)
        if chat_id is not None and left_on is not None:  # newer than what this front-end remembers when
            self._affinity[chat_id] = left_on            # another one served the chat's last turn
        gen = Generation.create((), params, chat_id, self.events)

        def shrink(exceeded: _ContextExceeded) -> Callable[[WorkerState], bytes]:
            nonlocal messages
            trimmed = _trim(messages, exceeded, params.max_tokens)
            if trimmed is None:
                raise WorkerContextTooLong(exceeded.n_prompt, exceeded.n_ctx) from None
            messages = trimmed
            return lambda worker: self._body(worker, messages, params)

        return await self._place(gen, key, "/v1/chat/completions",
                                 lambda worker: self._body(worker, messages, params), shrink)

    async def complete(self, prompt: str | Sequence[int], params: SamplingParams, *,
                       chat_id: str | None = None) -> Generation:
        """A raw completion (`prompt` as text or token ids, no chat template) on a worker's
        `/v1/completions`, placed, retried and relayed like `chat`. Raises as `chat` does; a prompt
        the worker's context cannot hold is `ContextTooLong` (nothing is trimmed from a raw prompt)."""
        if not self._running or self._nursery is None:
            raise EngineClosed("the engine is not running")
        prompt = prompt if isinstance(prompt, str) else list(prompt)
        if not prompt:
            raise PromptError("empty prompt")
        head = prompt[:4096] if isinstance(prompt, str) else ",".join(map(str, prompt[:1024]))
        key = chat_id or "prefix:" + hashlib.blake2b(head.encode("utf-8", "replace"), digest_size=12).hexdigest()
        gen = Generation.create((), params, chat_id, self.events)

        def refuse(exceeded: _ContextExceeded) -> Callable[[WorkerState], bytes]:
            raise ContextTooLong((exceeded.n_prompt or 0) + params.max_tokens, exceeded.n_ctx or 0) from None

        return await self._place(gen, key, "/v1/completions",
                                 lambda worker: self._body(worker, (), params, prompt=prompt), refuse)

    async def _place(self, gen: Generation, key: str, path: str, body: Callable[[WorkerState], bytes],
                     shrink: Callable[[_ContextExceeded], Callable[[WorkerState], bytes]]) -> Generation:
        """`_start` counted in flight: until `gen` ends once a worker took it (its stream task ends
        it, whatever happens), else until `_start` gives up."""
        self._in_flight.enter()
        try:
            return await self._start(gen, key, path, body, shrink)
        finally:
            if gen.metrics.worker is None:
                self._in_flight.leave()
            else:
                gen.when_finished(self._in_flight.leave)

    async def _start(self, gen: Generation, key: str, path: str, body: Callable[[WorkerState], bytes],
                     shrink: Callable[[_ContextExceeded], Callable[[WorkerState], bytes]]) -> Generation:
        """Lease a worker for `key`, start the stream of `body` to its `path`; on to the next worker
        when one fails, with `shrink`'s smaller body when the worker's context is too small."""
        assert self._nursery is not None
        tried: set[str] = set()
        failure: WorkerFailed | None = None
        while True:
            try:
                lease = await self.router.lease(key, frozenset(tried))
            except Busy:
                if failure is not None:  # every worker it may use failed it: say why
                    raise failure from None
                raise
            gen.metrics.admitted = time.perf_counter()
            try:
                await self._nursery.start(self._stream, gen, lease, path, body)
                return gen
            except RuntimeError:
                if self._running:
                    raise
                raise EngineClosed("the server is shutting down") from None  # the nursery closed meanwhile
            except _ContextExceeded as exceeded:
                body = shrink(exceeded)
            except WorkerFailed as failed:
                tried.add(lease.worker.url)
                failure = failed
                log.warning("%s; trying another worker", failed)
            finally:
                if not lease.released and gen.metrics.worker != lease.worker.url:
                    lease.release()

    # --- tokenizer (llama-server's /tokenize, /detokenize on the first healthy worker) -----------

    async def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True,
                       with_pieces: bool = False) -> list[int] | list[tuple[int, bytes]]:
        """Token ids of `text` (with `with_pieces`, (id, bytes) pairs) from a worker's `/tokenize`.
        Raises `WorkerLacks` when the worker has none (vLLM, Ollama), `PromptError` when it refused
        the text, `WorkerFailed`, `Busy` (no worker up), `EngineClosed`."""
        answer = await self._tokenizer("/tokenize", {"content": text, "add_special": add_special,
                                                     "parse_special": parse_special, "with_pieces": with_pieces})
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise WorkerFailed("the inference worker's /tokenize answer holds no `tokens` list")
        if not with_pieces:
            if not all(_int_or_none(t) is not None for t in tokens):
                raise WorkerFailed("the inference worker's /tokenize answer holds other things than token ids")
            return tokens
        pairs = []
        for item in tokens:
            piece = item.get("piece") if isinstance(item, dict) else None
            if isinstance(piece, list) and all(isinstance(b, int) and 0 <= b < 256 for b in piece):
                piece = bytes(piece)  # llama-server's spelling of a piece that is not valid UTF-8
            elif isinstance(piece, str):
                piece = piece.encode("utf-8")
            if _int_or_none(item.get("id") if isinstance(item, dict) else None) is None or \
                    not isinstance(piece, bytes):
                raise WorkerFailed("the inference worker's /tokenize answer holds invalid pieces")
            pairs.append((item["id"], piece))
        return pairs

    async def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` from a worker's `/detokenize`; raises as `tokenize` does."""
        answer = await self._tokenizer("/detokenize", {"tokens": list(tokens)})
        content = answer.get("content") if isinstance(answer, dict) else None
        if not isinstance(content, str):
            raise WorkerFailed("the inference worker's /detokenize answer holds no `content` text")
        return content

    async def vocab_size(self) -> int | None:
        """The first healthy worker's vocabulary size (llama-server's `/v1/models` `meta.n_vocab`),
        None when it does not say; remembered per worker."""
        meta = await self.model_meta()
        return _int_or_none(meta.get("n_vocab")) if meta else None

    async def model_meta(self) -> dict[str, Any] | None:
        """The first healthy worker's model `meta` (llama-server's `/v1/models`), None if none says."""
        healthy = self.router.healthy
        if self._client is None or not healthy:
            return None
        worker = healthy[0]
        if worker.url not in self._meta:
            meta = None
            try:
                response = await self._client.get(worker.url + "/v1/models", headers=self._headers(worker),
                                                  timeout=self.settings.worker_health_timeout)
                data = response.json().get("data") if response.status_code == 200 else None
                first = data[0] if isinstance(data, list) and data else None
                if isinstance(first, dict) and isinstance(first.get("meta"), dict):
                    meta = first["meta"]
            except (httpx.HTTPError, OSError, ValueError, AttributeError):
                return None  # not remembered: asked again next time
            self._meta[worker.url] = meta
        return self._meta[worker.url]

    async def _tokenizer(self, path: str, payload: dict[str, Any]) -> Any:
        if not self._running or self._client is None:
            raise EngineClosed("the engine is not running")
        healthy = self.router.healthy
        if not healthy:
            raise Busy("no inference worker is reachable right now; try again shortly")
        worker = healthy[0]
        try:
            response = await self._client.post(worker.url + path, content=orjson.dumps(payload),
                                               headers={"Content-Type": "application/json", **self._headers(worker)})
        except (httpx.HTTPError, OSError) as error:
            raise WorkerFailed(f"the inference worker {worker.url} could not take the request: "
                               f"{_describe(error)}") from None
        status = response.status_code
        if status in (404, 405, 501):
            raise WorkerLacks(f"the inference worker {worker.url} has no {path} (llama-server has it; vLLM and "
                              "Ollama do not)")
        if status != 200:
            message, _ = await _error_body(response)
            if 400 <= status < 500 and status not in (401, 403, 408, 429):
                raise PromptError(f"the inference worker refused the request: {message or f'HTTP {status}'}")
            raise WorkerFailed(f"the inference worker {worker.url} answered HTTP {status}"
                               + (f": {message}" if message else ""))
        try:
            return orjson.loads(response.content[:MAX_LINE_BYTES * 16])
        except orjson.JSONDecodeError:
            raise WorkerFailed(f"the inference worker {worker.url} answered {path} with something not JSON") \
                from None

    def _body(self, worker: WorkerState, messages: Sequence[ChatMessage], params: SamplingParams, *,
              prompt: str | list[int] | None = None) -> bytes:
        """The request: OpenAI fields plus llama-server's sampling extras (others ignore them); a
        raw completion's `prompt` instead of `messages` when given."""
        body: dict[str, Any] = {
            **({"prompt": prompt} if prompt is not None else
               {"messages": [{"role": m.role, "content": m.content} for m in messages]}),
            "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "top_k": params.top_k, "min_p": params.min_p, "repeat_penalty": params.repeat_penalty,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
            "seed": params.resolved_seed(), "cache_prompt": True,
        }
        if params.repeat_penalty != 1.0:
            body["repetition_penalty"] = params.repeat_penalty  # vLLM's and SGLang's name
        if params.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.response_format is not None:  # the worker builds its own grammar from it
            body["response_format"] = orjson.loads(params.response_format)
        elif params.grammar is not None:
            body["grammar"] = params.grammar
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.logprobs is not None:
            # llama-server returns entries only when at least one alternative is asked for (its n_probs)
            body["logprobs"] = True
            body["top_logprobs"] = max(1, params.logprobs)
        if worker.model:
            body["model"] = worker.model
        return orjson.dumps(body)

    async def _stream(self, gen: Generation, lease: Lease, path: str, body: Callable[[WorkerState], bytes], *,
                      task_status: trio.TaskStatus[None]) -> None:
        """One request to one worker. Before `started` it raises (`chat` decides what next); after
        it, every outcome goes into `gen` and the slot is given back."""
        assert self._client is not None
        worker = lease.worker
        started = False
        try:
            try:
                async with self._client.stream(
                    "POST", worker.url + path, content=body(worker),
                    headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                             **self._headers(worker)},
                ) as response:
                    await self._check_accepted(worker, response)
                    worker.requests += 1
                    gen.metrics.worker = worker.url
                    task_status.started()
                    started = True
                    outcome = await self._relay(gen, worker, response)
                # the connection is closed (a cancelled reply) or complete: the slot is free again
                lease.release()
                gen.deliver("", outcome)
            except (httpx.HTTPError, OSError) as error:
                if started:
                    raise WorkerFailed(f"the inference worker {worker.url} stopped mid-reply ({_describe(error)}); "
                                       "the reply so far was kept, and the next prompt goes to another worker") \
                        from None
                raise WorkerFailed(f"the inference worker {worker.url} could not take the request: "
                                   f"{_describe(error)}") from None
        except WorkerFailed as failed:
            self._eject(worker, str(failed))
            if not started:
                raise
            gen.fail(failed)
        except EngineError as failed:  # an error the worker reported in its stream
            if not started:
                raise
            gen.fail(failed)
        except trio.Cancelled:
            if started:  # the engine is stopping (a cancelled generation ends in `_relay`)
                self._stop()  # before this slot is freed: no waiting request may take it now
                gen.fail(EngineClosed("the server is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - a bug here must end one reply, not the engine
            if not started:
                raise
            log.exception("remote generation failed")
            gen.fail(EngineError(f"the reply from {worker.url} could not be read: {type(error).__name__}"))
        finally:
            lease.release()

    async def _check_accepted(self, worker: WorkerState, response: httpx.Response) -> None:
        """Raise unless the worker answered 200 with an event stream."""
        status = response.status_code
        if status == 200:
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise WorkerFailed(f"the inference worker {worker.url} answered {kind or 'no content type'}, "
                                   "not an event stream")
            return
        message, detail = await _error_body(response)
        context = detail.get("type") == "exceed_context_size_error" or any(
            phrase in message.lower() for phrase in ("context length", "context size", "context window"))
        if status == 400 and context:
            raise _ContextExceeded(_int_or_none(detail.get("n_prompt_tokens")), _int_or_none(detail.get("n_ctx")))
        if status in (401, 403):
            raise WorkerFailed(f"the inference worker {worker.url} refused our key (HTTP {status}); check its "
                               "key= in KTULHU_WORKERS")
        if 400 <= status < 500 and status not in (404, 408, 429):
            raise PromptError(f"the inference worker refused the request: {message or f'HTTP {status}'}")
        raise WorkerFailed(f"the inference worker {worker.url} answered HTTP {status}"
                           + (f": {message}" if message else ""))

    async def _relay(self, gen: Generation, worker: WorkerState, response: httpx.Response) -> Finished:
        """Stream the worker's text into `gen` until it finishes or `gen` is cancelled; the outcome
        is delivered by the caller once the connection is closed."""
        assert self._nursery is not None
        outcome: Finished | None = None
        with trio.CancelScope() as reading:
            watcher = trio.CancelScope()  # the watcher ends with the reading, whichever way it ends
            self._nursery.start_soon(_cancel_on_request, gen, reading, watcher)
            try:
                outcome = await self._read_events(gen, worker, response)
            finally:
                watcher.cancel()
        metrics = gen.metrics
        metrics.finished = time.perf_counter()
        if outcome is None:  # cancelled: leaving the `stream` block closes the connection
            metrics.slot_freed = metrics.finished
            return Finished("cancelled", metrics)
        worker.generated_tokens += metrics.generated_tokens
        self._remember(gen, worker)
        return outcome

    async def _read_events(self, gen: Generation, worker: WorkerState, response: httpx.Response) -> Finished:
        metrics = gen.metrics
        params = gen.params
        reason: str | None = None
        usage: dict[str, Any] = {}
        cache_n: int | None = None
        pieces = 0
        entries = 0
        async for data in _sse_data(response, worker):
            if data == b"[DONE]":
                break
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise WorkerFailed(f"the inference worker {worker.url} sent an invalid event stream (not JSON: "
                                   f"{data[:60]!r})") from None
            if not isinstance(event, dict):
                raise WorkerFailed(f"the inference worker {worker.url} sent an invalid event stream")
            if "error" in event:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise EngineError(f"the inference worker {worker.url} failed: {str(message)[:300]}")
            text, finish = _choice(event, worker, params.include_thinking)
            logprobs = _logprobs(event, worker, params.logprobs) if params.logprobs is not None else []
            entries += len(logprobs)
            if logprobs and not text:  # a token whose text the worker holds back: its entry goes on now
                gen.deliver("", None, logprobs)
            if text:
                now = time.perf_counter()
                if metrics.first_token is None:
                    metrics.first_token = now
                elif metrics.last_token is not None:
                    metrics.gaps.append(now - metrics.last_token)
                metrics.last_token = now
                pieces += 1
                metrics.generated_tokens = pieces
                if pieces > params.max_tokens + PIECE_SLACK:
                    raise WorkerFailed(f"the inference worker {worker.url} sent more than the {params.max_tokens} "
                                       "tokens asked for")
                gen.deliver(text, None, logprobs)
            if finish is not None:
                reason = finish
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
            timings = event.get("timings")
            if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
                cache_n = timings["cache_n"]
        if reason is None:
            raise WorkerFailed(f"the inference worker {worker.url} stopped mid-reply (its stream ended without a "
                               "finish reason); the reply so far was kept, and the next prompt goes to another "
                               "worker")
        if params.logprobs is not None and pieces and not entries:
            raise EngineError(f"the inference worker {worker.url} returned no log probabilities although they were "
                              "asked for (it does not support `logprobs`); ask without them")
        prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
        completion = _int_or_none(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cached = _int_or_none(details.get("cached_tokens")) if isinstance(details, dict) else None
        if cached is None:
            cached = cache_n
        if prompt_tokens is not None:
            metrics.prompt_tokens = prompt_tokens
        if completion is not None:
            metrics.generated_tokens = completion
        metrics.cached_tokens = max(0, min(cached or 0, metrics.prompt_tokens or cached or 0))
        metrics.own_cached_tokens = self._own_cached(gen, worker)
        return Finished("length" if reason == "length" else "eos", metrics)

    def _own_cached(self, gen: Generation, worker: WorkerState) -> int:
        """The cached part this chat itself left on this worker (a prefix shared with another chat
        would tell what that chat's text began with)."""
        if gen.chat_id is None:
            return 0
        last = self._affinity.get(gen.chat_id)
        if last is None or last[0] != worker.url:
            return 0
        return min(gen.metrics.cached_tokens, last[1])

    def _remember(self, gen: Generation, worker: WorkerState) -> None:
        if gen.chat_id is None:
            return
        metrics = gen.metrics
        self._affinity[gen.chat_id] = (worker.url, metrics.prompt_tokens + metrics.generated_tokens)
        self._affinity.move_to_end(gen.chat_id)
        while len(self._affinity) > AFFINITY_CHATS:
            self._affinity.popitem(last=False)


async def _cancel_on_request(gen: Generation, reading: trio.CancelScope, watcher: trio.CancelScope) -> None:
    """Cancel `reading` when `gen` is cancelled (awaited, not polled); `watcher` ends this task."""
    with watcher:
        await gen.wait_cancelled()
        reading.cancel()


async def _sse_data(response: httpx.Response, worker: WorkerState):
    """The `data:` payloads of an event stream (joined per event), lines bounded in length."""
    buffer = b""
    data: list[bytes] = []
    async for chunk in response.aiter_bytes():
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line, buffer = buffer[:end].rstrip(b"\r"), buffer[end + 1:]
            if not line:  # end of an event
                if data:
                    yield b"\n".join(data)
                    data = []
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
            elif line.startswith(b":") or line.split(b":", 1)[0] in (b"event", b"id", b"retry"):
                continue
            else:
                raise WorkerFailed(f"the inference worker {worker.url} sent an invalid event stream "
                                   f"({line[:60]!r})")
        if len(buffer) > MAX_LINE_BYTES:
            raise WorkerFailed(f"the inference worker {worker.url} sent a line longer than {MAX_LINE_BYTES} bytes")
    if data:
        yield b"\n".join(data)


def _choice(event: dict[str, Any], worker: WorkerState, thinking: bool) -> tuple[str, str | None]:
    """(text, finish_reason) of a chat.completion.chunk; raises on a malformed one."""
    choices = event.get("choices")
    if choices is None or choices == []:
        return "", None
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise WorkerFailed(f"the inference worker {worker.url} sent a chunk without valid choices")
    choice = choices[0]
    if "delta" not in choice and isinstance(choice.get("text"), str):  # a text_completion chunk
        finish = choice.get("finish_reason")
        return choice["text"], finish if isinstance(finish, str) and finish else None
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise WorkerFailed(f"the inference worker {worker.url} sent a chunk without a valid delta")
    text = delta.get("content") or ""
    if thinking and isinstance(delta.get("reasoning_content"), str):
        text = delta["reasoning_content"] + (text if isinstance(text, str) else "")
    if not isinstance(text, str):
        raise WorkerFailed(f"the inference worker {worker.url} sent non-text content")
    finish = choice.get("finish_reason")
    return text, finish if isinstance(finish, str) and finish else None


def _logprobs(event: dict[str, Any], worker: WorkerState, n_top: int) -> list[TokenLogprob]:
    """The token entries of a chunk's `choices[0].logprobs.content` (OpenAI's format, which
    llama-server and vLLM send); each token's text is taken from its `bytes` where given (a token
    may hold part of a character), its alternatives cut to the `n_top` asked for."""
    choices = event.get("choices")
    logprobs = choices[0].get("logprobs") if isinstance(choices, list) and choices else None
    if logprobs is None:
        return []
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if content is None:
        return []
    if not isinstance(content, list):
        raise WorkerFailed(f"the inference worker {worker.url} sent invalid log probabilities")
    entries = []
    for item in content:
        data, logprob = _token_entry(item, worker)
        top = item.get("top_logprobs") or []
        if not isinstance(top, list):
            raise WorkerFailed(f"the inference worker {worker.url} sent invalid log probabilities")
        entries.append(TokenLogprob(data, logprob, tuple(_token_entry(t, worker) for t in top[:n_top])))
    return entries


def _token_entry(item: object, worker: WorkerState) -> tuple[bytes, float]:
    """(bytes, logprob) of one `{"token", "logprob", "bytes"}` object."""
    if not isinstance(item, dict):
        raise WorkerFailed(f"the inference worker {worker.url} sent invalid log probabilities")
    logprob = item.get("logprob")
    raw = item.get("bytes")
    token = item.get("token")
    if isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
        raise WorkerFailed(f"the inference worker {worker.url} sent a log probability that is not a number")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        data = bytes(raw)
    elif isinstance(token, str):
        data = token.encode("utf-8")
    else:
        raise WorkerFailed(f"the inference worker {worker.url} sent a log probability without its token")
    return data, float(logprob)


async def _error_body(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """(message, error object) of an error response, read up to `MAX_ERROR_BYTES`."""
    raw = b""
    async for chunk in response.aiter_bytes():
        raw += chunk
        if len(raw) >= MAX_ERROR_BYTES:
            break
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode("utf-8", "replace").strip(), {}
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "")[:300], error
    if isinstance(error, str):
        return error[:300], {}
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return payload["message"][:300], payload
    return "", {}


def _trim(messages: tuple[ChatMessage, ...], exceeded: _ContextExceeded,
          max_tokens: int) -> tuple[ChatMessage, ...] | None:
    """The prompt with its oldest turns dropped so that it (estimated from the worker's count) fits
    with room for the reply; None when only the system prompt and the newest message are left."""
    head = messages[:1] if messages[0].role == "system" else ()
    middle = list(messages[len(head):-1])
    if not middle:
        return None
    chars = sum(len(m.content) + 8 for m in messages)
    if exceeded.n_prompt and exceeded.n_ctx:
        per_char = exceeded.n_prompt / max(1, chars)
        budget = (exceeded.n_ctx - min(max_tokens, exceeded.n_ctx // 2)) / per_char
    else:
        budget = chars / 2
    chars -= len(middle.pop(0).content) + 8  # at least one turn per retry: the worker has the last word
    while middle and (chars > budget or middle[0].role != "user"):
        chars -= len(middle.pop(0).content) + 8
    return (*head, *middle, messages[-1])


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    name = type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        return f"no answer in time ({name})"
    if isinstance(error, httpx.ConnectError):
        return f"connection failed ({text or name})"
    return f"{name}: {text}" if text else name
