"""Embeddings for `POST /v1/embeddings`: a pooled, L2-normalised vector per input.

Local mode: a separate llama.cpp context with `embeddings` on, over the loaded chat model or, when
KTULHU_EMBEDDING_MODEL names one, over that GGUF (loaded on first use). The context is created on
the first request (on a worker thread, under a trio lock) and used by one worker thread at a time
(a `CapacityLimiter(1)`); `serving` owns it for the engine service and frees it, before the model,
when the service stops. Its pooling is the GGUF's own (`<arch>.pooling_type`: mean, cls or last)
when it declares one, else mean. A model that cannot embed (a reranker, a context llama.cpp will
not create, a GGUF that does not load) raises `CannotEmbed`.

Remote mode: the input goes to the first healthy worker's `/v1/embeddings` (llama-server serves it
when started with `--embeddings`); a worker without it raises `CannotEmbed` naming the worker.

Inputs are strings (tokenised with the model's BOS/EOS and control tokens parsed, as llama-server
does) or token ids (taken as they are); each must fit the embedding context (`MAX_EMBEDDING_CTX`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import llama_cpp
import numpy as np
import orjson
import trio

from ..settings import Settings
from . import llama_log
from .model import Model, ModelLoadError
from .request import Busy, EngineClosed, EngineError
from .threadpool import ThreadPool
from .worker import physical_cores

if TYPE_CHECKING:
    from .engine import Engine
    from .remote import RemoteEngine

__all__ = ["CannotEmbed", "EmbeddingInputError", "Embeddings", "LocalEmbedder", "RemoteEmbedder", "serving"]

log = logging.getLogger("ktulhu.engine.embeddings")

#: Most tokens of the embedding context, so of one input. llama.cpp computes the logits of every
#: token of an embedding batch (n_ctx x n_vocab floats: 400 MB at 2048 tokens for the default model,
#: 1 GB for a 128k vocabulary), so the context is bounded whatever LLAMA_CLI_CTX says.
MAX_EMBEDDING_CTX = 2048
#: Sequences decoded together in one batch (their tokens together at most the context size).
MAX_SEQUENCES = 64
#: Bound on waiting, at shutdown, for an embedding thread before its context is freed.
CLOSE_TIMEOUT_S = 30.0
#: llama_decode's return code when the abort callback stopped it.
LLAMA_DECODE_ABORTED = 2
#: Most bytes of a worker's answer read (2048 inputs of 4096 floats as JSON fit).
MAX_WORKER_ANSWER_BYTES = 256 << 20

_POOLING_NAMES = {llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean", llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
                  llama_cpp.LLAMA_POOLING_TYPE_LAST: "last"}

Input = str | Sequence[int]


class CannotEmbed(EngineError):
    """The model (or the inference worker) does not produce embeddings; the message says why."""


class EmbeddingInputError(ValueError):
    """An input (or `dimensions`) cannot be embedded: `param` names it (`input[3]`), `code` says how."""

    def __init__(self, param: str, message: str, *, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@attrs.frozen
class Embeddings:
    """One unit-length float32 vector per input, in input order, and the tokens they took."""

    vectors: list[np.ndarray]
    prompt_tokens: int
    model: str


def _normalised(vector: np.ndarray) -> np.ndarray:
    """`vector` scaled to unit L2 norm (as OpenAI's vectors are), float32; a zero vector stays zero."""
    wide = vector.astype(np.float64)
    norm = float(np.linalg.norm(wide))
    return (wide / norm if norm > 0 else wide).astype(np.float32)


# --- local: one llama.cpp context with embeddings on ---------------------------------------------


def _meta(handle: llama_cpp.llama_model_p, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(handle, key.encode(), buffer, len(buffer))
    return buffer.value.decode("utf-8", "replace") if n >= 0 else None


def _pooling(model: Model) -> int:
    """The GGUF's declared pooling (`<arch>.pooling_type`) when it pools; mean otherwise. A
    reranker (rank pooling) scores pairs of texts and has no embedding: `CannotEmbed`."""
    arch = _meta(model.handle, "general.architecture")
    declared = _meta(model.handle, f"{arch}.pooling_type") if arch else None
    try:
        pooling = int(declared) if declared is not None else None
    except ValueError:
        pooling = None
    if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
        raise CannotEmbed(f"{Path(model.info.path).name} is a reranker (rank pooling): it scores text pairs and "
                          "gives no embeddings; set KTULHU_EMBEDDING_MODEL to an embedding GGUF")
    return pooling if pooling in _POOLING_NAMES else llama_cpp.LLAMA_POOLING_TYPE_MEAN


def _embedding_size(model: Model) -> int:
    size = getattr(llama_cpp, "llama_model_n_embd_out", None)
    n = int(size(model.handle)) if size is not None else 0
    return n if n > 0 else int(llama_cpp.llama_model_n_embd(model.handle))


@attrs.define(eq=False)
class _EmbeddingContext:
    """The llama context and batch; every method blocks and runs on the one embedding thread."""

    model: Model
    #: The model is KTULHU_EMBEDDING_MODEL's, loaded for this context (and freed with it).
    owns_model: bool
    ctx: llama_cpp.llama_context_p | None
    batch: llama_cpp.llama_batch
    n_ctx: int
    n_embd: int
    n_vocab: int
    pooling: int
    threads: ThreadPool
    #: The running request's cancellation check (raises `trio.Cancelled` once its caller went away).
    _check: Callable[[], None] | None = None
    #: Polled by llama.cpp between graph nodes: a long batch stops soon after its caller went away.
    _abort: Any = None

    def __attrs_post_init__(self) -> None:
        self._abort = llama_cpp.ggml_abort_callback(self._caller_gone)
        llama_cpp.llama_set_abort_callback(self.ctx, self._abort, None)

    def _caller_gone(self, _data: object) -> bool:
        check = self._check
        if check is None:
            return False
        try:
            check()
        except trio.Cancelled:
            return True
        except Exception:  # noqa: BLE001 - never raise into llama.cpp
            return False
        return False

    @classmethod
    def open(cls, chat_model: Model, settings: Settings, n_ctx_chat: int) -> "_EmbeddingContext":
        """Create the context over `chat_model`, or over KTULHU_EMBEDDING_MODEL (loaded here)."""
        model, owns = chat_model, False
        if settings.embedding_model:
            path = settings.path(settings.embedding_model)
            if not path.is_file():
                raise CannotEmbed(f"KTULHU_EMBEDDING_MODEL={settings.embedding_model!r}: no GGUF at {path}")
            try:
                model = Model.load(attrs.evolve(settings, model_path=str(path)))
            except ModelLoadError as error:
                raise CannotEmbed(f"KTULHU_EMBEDDING_MODEL: {error}") from None
            owns = True
        try:
            n_train = model.info.n_ctx_train
            n_ctx = n_ctx_chat if not owns else min(settings.ctx, n_train) if n_train > 0 else settings.ctx
            n_ctx = min(n_ctx, MAX_EMBEDDING_CTX)
            pooling = _pooling(model)
            params = llama_cpp.llama_context_default_params()
            params.embeddings = True
            params.pooling_type = pooling
            params.n_ctx = n_ctx
            params.n_batch = n_ctx  # a sequence is pooled whole: the longest input fits one micro-batch
            params.n_ubatch = n_ctx
            params.n_seq_max = MAX_SEQUENCES
            params.kv_unified = True  # the sequences of a batch share the context
            threads = settings.threads or physical_cores()
            params.n_threads = threads
            params.n_threads_batch = threads
            params.no_perf = True
            ctx = llama_cpp.llama_init_from_model(model.handle, params)
            if not ctx:
                raise CannotEmbed(f"llama.cpp could not create an embedding context for {Path(model.info.path).name} "
                                  f"({n_ctx} tokens, {_POOLING_NAMES[pooling]} pooling); the model may not support "
                                  "embeddings, or memory is short (set KTULHU_LOG=info,ktulhu.llama=debug for why)")
        except BaseException:
            if owns:
                model.close()
            raise
        log.info("embedding context ready: %s, %d tokens, %s pooling, %d dimensions", Path(model.info.path).name,
                 n_ctx, _POOLING_NAMES[pooling], _embedding_size(model))
        return cls(model=model, owns_model=owns, ctx=ctx, batch=llama_cpp.llama_batch_init(n_ctx, 0, 1), n_ctx=n_ctx,
                   n_embd=_embedding_size(model), n_vocab=model.info.n_vocab, pooling=pooling,
                   threads=ThreadPool(ctx, threads))

    def tokens_of(self, inputs: Sequence[Input]) -> list[list[int]]:
        """Each input as token ids, checked: not empty, ids in the vocabulary, within the context."""
        lists = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                tokens = self.model.tokenize(item, special=True, add_bos=True)
            else:
                tokens = list(item)
                bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
                if bad is not None:
                    raise EmbeddingInputError(f"input[{i}]", f"input[{i}] holds {str(bad)[:20]}, not a token id: ids "
                                              f"are from 0 to {self.n_vocab - 1}")
            if not tokens:
                raise EmbeddingInputError(f"input[{i}]", f"input[{i}] gives no tokens")
            if len(tokens) > self.n_ctx:
                raise EmbeddingInputError(f"input[{i}]", f"input[{i}] holds {len(tokens)} tokens, more than the "
                                          f"{self.n_ctx} the embedding context holds; shorten or split it",
                                          code="context_too_long")
            lists.append(tokens)
        return lists

    def embed(self, inputs: Sequence[Input], *, dimensions: int | None,
              check: Callable[[], None]) -> tuple[list[np.ndarray], int]:
        """The vectors of `inputs` and their token count. Several inputs share a batch (their
        tokens within the context, each its own sequence). `check` raises once the caller went
        away: it runs before each batch, and llama.cpp polls it during one (the batch stops)."""
        if self.ctx is None:
            raise EngineClosed("the engine is not running")
        if dimensions is not None and dimensions != self.n_embd:
            raise EmbeddingInputError("dimensions", f"dimensions must be the model's own size, {self.n_embd}: "
                                      "this server does not shorten embeddings")
        lists = self.tokens_of(inputs)
        vectors: list[np.ndarray] = []
        group: list[list[int]] = []
        self._check = check
        try:
            for tokens in lists:
                if group and (sum(map(len, group)) + len(tokens) > self.n_ctx or len(group) == MAX_SEQUENCES):
                    vectors += self._decode(group)
                    group = []
                group.append(tokens)
            vectors += self._decode(group)
        finally:
            self._check = None
        return vectors, sum(map(len, lists))

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        assert self.ctx is not None
        if not group:
            return []
        batch = self.batch
        j = 0
        for seq, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.token[j] = token
                batch.pos[j] = pos
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seq
                batch.logits[j] = 1  # every token is an output: the pooling reads them all
                j += 1
        batch.n_tokens = j
        memory = llama_cpp.llama_get_memory(self.ctx)
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        if self._check is not None:
            self._check()
        with llama_log.expected_failures():  # an aborted batch is logged as a failure by llama.cpp
            code = llama_cpp.llama_decode(self.ctx, batch)
        if code == LLAMA_DECODE_ABORTED and self._check is not None:
            self._check()  # raises: the caller went away
        if code != 0:
            log.warning("llama_decode returned %d for an embedding batch of %d tokens", code, j)
            raise EngineError(f"llama.cpp failed to compute the embeddings (llama_decode returned {code})")
        vectors = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            if not pointer:
                raise CannotEmbed(f"{Path(self.model.info.path).name} gave no pooled embedding; "
                                  "set KTULHU_EMBEDDING_MODEL to an embedding GGUF")
            vectors.append(_normalised(np.ctypeslib.as_array(pointer, shape=(self.n_embd,))))
        return vectors

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.threads.close()
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
            if self.owns_model:
                self.model.close()


@attrs.define(eq=False)
class LocalEmbedder:
    """Embeddings in this process. Create it with `serving`, which closes it."""

    chat_model: Model
    settings: Settings
    #: Tokens of the chat model's slot: the embedding context's size over that model.
    n_ctx: int
    _context: _EmbeddingContext | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    #: One embedding thread at a time: the context is not shared between threads.
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1))
    _closed: bool = False

    @property
    def model_name(self) -> str:
        return Path(self.settings.embedding_model).stem if self.settings.embedding_model else \
            self.settings.model_file.stem

    async def vocab_size(self) -> int | None:
        """The embedding model's vocabulary size; None while KTULHU_EMBEDDING_MODEL is not loaded yet
        (ids are then checked on the embedding thread)."""
        if not self.settings.embedding_model:
            return self.chat_model.info.n_vocab
        return self._context.n_vocab if self._context is not None else None

    async def embed(self, inputs: Sequence[Input], *, dimensions: int | None = None) -> Embeddings:
        """Raises `EmbeddingInputError` (an input at fault), `CannotEmbed`, `Busy` (KTULHU_QUEUE
        requests already wait), `EngineClosed`."""
        if self._limiter.statistics().tasks_waiting >= self.settings.queue:
            raise Busy(f"the server is busy ({self.settings.queue} embedding requests waiting); try again shortly")
        context = await self._open()
        job = functools.partial(context.embed, list(inputs), dimensions=dimensions,
                                check=trio.from_thread.check_cancelled)
        # A cancelled caller returns at once; the thread stops before its next batch, then frees the limiter.
        vectors, n_tokens = await trio.to_thread.run_sync(job, limiter=self._limiter, abandon_on_cancel=True)
        return Embeddings(vectors, n_tokens, self.model_name)

    async def _open(self) -> _EmbeddingContext:
        async with self._lock:
            if self._closed:
                raise EngineClosed("the engine is not running")
            if self._context is None:  # not abandoned on cancel: what the thread creates is always closed
                self._context = await trio.to_thread.run_sync(
                    _EmbeddingContext.open, self.chat_model, self.settings, self.n_ctx, limiter=self._limiter)
            return self._context

    async def aclose(self) -> None:
        """Refuse new requests, wait (bounded) for the one running and for a context being created,
        then free the context (and KTULHU_EMBEDDING_MODEL's model)."""
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S) as waited:
            async with self._lock:  # the same order as `_open`: lock, then the thread's token
                await self._limiter.acquire_on_behalf_of(self)
                try:
                    if self._context is not None:
                        await trio.to_thread.run_sync(self._context.close)
                        self._context = None
                finally:
                    self._limiter.release_on_behalf_of(self)
        if waited.cancelled_caught:
            log.warning("an embedding thread was still busy %g s after the engine stopped; its context is left "
                        "unfreed", CLOSE_TIMEOUT_S)


@asynccontextmanager
async def serving(engine: Engine, settings: Settings) -> AsyncIterator[LocalEmbedder]:
    """Embeddings beside `engine` while the block runs; the context is freed when it ends, so enter
    it inside the model's lifetime."""
    embedder = LocalEmbedder(engine.model, settings, engine.n_ctx_seq)
    try:
        yield embedder
    finally:
        await embedder.aclose()


# --- remote: a worker's /v1/embeddings ------------------------------------------------------------


@attrs.frozen
class RemoteEmbedder:
    """Embeddings from the first healthy inference worker's `/v1/embeddings`."""

    engine: RemoteEngine

    async def vocab_size(self) -> int | None:
        return await self.engine.vocab_size()

    async def embed(self, inputs: Sequence[Input], *, dimensions: int | None = None) -> Embeddings:
        """Raises `CannotEmbed` (the worker has no embeddings), `EmbeddingInputError` (it refused the
        input, or `dimensions` is not its size), `Busy` (no worker is up), `EngineError` (it failed)."""
        settings = self.engine.settings
        healthy = self.engine.router.healthy
        if not healthy:
            raise Busy("no inference worker is reachable right now; try again shortly")
        worker = healthy[0]
        body: dict[str, Any] = {"input": [i if isinstance(i, str) else list(i) for i in inputs],
                                "encoding_format": "float"}
        if worker.model:
            body["model"] = worker.model
        headers = {"Content-Type": "application/json"}
        if worker.spec.key:
            headers["Authorization"] = f"Bearer {worker.spec.key}"
        timeout = httpx.Timeout(settings.worker_timeout, connect=min(5.0, settings.worker_timeout))
        try:
            async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
                async with client.stream("POST", worker.url + "/v1/embeddings", content=orjson.dumps(body),
                                         headers=headers) as response:
                    content = await _read_capped(response, MAX_WORKER_ANSWER_BYTES)
        except (httpx.HTTPError, OSError) as error:
            raise EngineError(f"the inference worker {worker.url} could not take the request: "
                              f"{type(error).__name__}: {error}") from None
        status = response.status_code
        if status in (404, 405, 501):
            raise CannotEmbed(f"the inference worker {worker.url} does not serve /v1/embeddings (HTTP {status}); "
                              "llama-server serves it when started with --embeddings (and --pooling mean for a "
                              "chat model)")
        message = _worker_message(content)
        if status != 200:
            if 400 <= status < 500 and status not in (401, 403, 408, 429):
                raise EmbeddingInputError("input", f"the inference worker refused the input: "
                                          f"{message or f'HTTP {status}'}")
            raise EngineError(f"the inference worker {worker.url} answered HTTP {status}"
                              + (f": {message}" if message else ""))
        vectors, n_tokens, model = _parse_answer(content, len(inputs), worker.url)
        if dimensions is not None and vectors and dimensions != len(vectors[0]):
            raise EmbeddingInputError("dimensions", f"dimensions must be the model's own size, {len(vectors[0])}: "
                                      "this server does not shorten embeddings")
        return Embeddings(vectors, n_tokens, model or worker.model or settings.model_file.stem)


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    parts, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise EngineError(f"the inference worker's answer is larger than {limit >> 20} MiB")
        parts.append(chunk)
    return b"".join(parts)


def _worker_message(content: bytes) -> str:
    """The `error.message` of a worker's error answer (OpenAI's and llama-server's shape), if any."""
    try:
        error = orjson.loads(content[:1 << 16]).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    message = error.get("message") if isinstance(error, dict) else error
    return message[:500] if isinstance(message, str) else ""


def _parse_answer(content: bytes, n_inputs: int, url: str) -> tuple[list[np.ndarray], int, str | None]:
    def invalid(what: str) -> EngineError:
        return EngineError(f"the inference worker {url} answered /v1/embeddings with {what}")

    try:
        answer = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise invalid("something not JSON") from None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != n_inputs:
        raise invalid(f"no `data` list of {n_inputs} embeddings")
    vectors: list[np.ndarray | None] = [None] * n_inputs
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < n_inputs or vectors[index] is not None:
            raise invalid("embeddings whose `index` is missing or repeated")
        if not isinstance(vector, list) or not vector or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector):
            raise invalid(f"an embedding at index {index} that is not a list of numbers (a pooling of `none`?)")
        vectors[index] = _normalised(np.asarray(vector, dtype=np.float64))
    if len({len(v) for v in vectors if v is not None}) > 1:
        raise invalid("embeddings of different sizes")
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    model = answer.get("model")
    return ([v for v in vectors if v is not None], tokens if isinstance(tokens, int) and tokens >= 0 else 0,
            model if isinstance(model, str) and model else None)
