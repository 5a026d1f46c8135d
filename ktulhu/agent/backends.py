"""Where the agent's model runs: in this process (the local engine, or with KTULHU_ENGINE=remote
the configured inference workers) or on a Ktulhu server (/v1).

Both turn chat messages into one grammar-constrained completion. The grammar is made for the
token budget the step really gets (the local prompt builder may shrink it when the history is
long), so the action always fits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import attrs
import httpx
import trio

from ..engine.engine import Engine
from ..engine.model import Model
from ..engine.prompt import ChatMessage
from ..engine.remote import RemoteEngine
from ..engine.request import EngineError
from ..engine.sampling import SamplingParams
from ..preflight import check_model
from ..settings import Settings

__all__ = ["Backend", "Completion", "ModelError", "local_backend", "server_backend"]

GrammarFor = Callable[[int], str]  # token budget -> GBNF


class ModelError(Exception):
    """The model could not produce a step (engine or server error); the message says why."""


@attrs.frozen
class Completion:
    text: str
    #: eos | stop | length | cancelled | error (engine), or the server's finish_reason.
    finish_reason: str
    prompt_tokens: int | None = None
    generated_tokens: int | None = None


class Backend(Protocol):
    description: str

    async def complete(self, messages: Sequence[ChatMessage], *, max_tokens: int, grammar_for: GrammarFor,
                       temperature: float, seed: int | None) -> Completion: ...


@attrs.define
class LocalBackend:
    engine: Engine | RemoteEngine
    settings: Settings
    description: str

    async def complete(self, messages: Sequence[ChatMessage], *, max_tokens: int, grammar_for: GrammarFor,
                       temperature: float, seed: int | None) -> Completion:
        if isinstance(self.engine, RemoteEngine):
            return await self._complete_remote(messages, max_tokens, grammar_for, temperature, seed)
        try:
            prompt = await self.engine.build_prompt(messages, max_tokens)
            params = SamplingParams.defaults(self.settings, max_tokens=prompt.max_tokens, temperature=temperature,
                                             seed=seed, grammar=grammar_for(prompt.max_tokens))
            gen = self.engine.generate(prompt.tokens, params)
            with gen:
                text = await gen.text()
        except (ValueError, EngineError) as error:  # PromptError/ContextTooLong are ValueErrors
            raise ModelError(f"the local model failed: {error}") from error
        metrics = gen.finished.metrics
        return Completion(text, gen.finished.reason, metrics.prompt_tokens, metrics.generated_tokens)

    async def _complete_remote(self, messages: Sequence[ChatMessage], max_tokens: int, grammar_for: GrammarFor,
                               temperature: float, seed: int | None) -> Completion:
        """The worker trims nothing: the grammar is made for the whole budget (a longer history is
        refused as too long rather than shrinking the step)."""
        try:
            params = SamplingParams.defaults(self.settings, max_tokens=max_tokens, temperature=temperature,
                                             seed=seed, grammar=grammar_for(max_tokens))
            with await self.engine.chat(messages, params) as gen:
                text = await gen.text()
        except (ValueError, EngineError) as error:
            raise ModelError(f"the inference workers failed: {error}") from error
        assert gen.finished is not None
        metrics = gen.finished.metrics
        return Completion(text, gen.finished.reason, metrics.prompt_tokens, metrics.generated_tokens)


@asynccontextmanager
async def local_backend(settings: Settings) -> AsyncIterator[LocalBackend]:
    """Prove the model on this machine, load it and run an engine in a nursery for the life of the block
    (with KTULHU_ENGINE=remote: a client of the inference workers, no model here)."""
    if settings.remote:
        remote = RemoteEngine(settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(remote.run)
            urls = ", ".join(w.url for w in remote.workers)
            yield LocalBackend(remote, settings, f"inference workers {urls}")
            nursery.cancel_scope.cancel()
        return
    await check_model(settings)
    model = await trio.to_thread.run_sync(Model.load, settings, abandon_on_cancel=True)
    try:
        engine = Engine(model, settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            yield LocalBackend(engine, settings, f"local model {model.info.description} ({model.info.path})")
            nursery.cancel_scope.cancel()
    finally:
        model.close()


@attrs.define
class ServerBackend:
    client: httpx.AsyncClient
    url: str
    description: str

    async def complete(self, messages: Sequence[ChatMessage], *, max_tokens: int, grammar_for: GrammarFor,
                       temperature: float, seed: int | None) -> Completion:
        body: dict[str, object] = {
            "model": "ktulhu",
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "grammar": grammar_for(max_tokens),
            "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        try:
            response = await self.client.post(self.url, json=body)
        except httpx.HTTPError as error:
            raise ModelError(f"cannot reach {self.url}: {error or type(error).__name__}") from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code != 200:
            message = ""
            if isinstance(payload, dict):
                error = payload.get("error")
                message = payload.get("message") or (error.get("message") if isinstance(error, dict) else error) or ""
            raise ModelError(f"{self.url} answered HTTP {response.status_code}: {message or response.text[:200]}")
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            reason = choice.get("finish_reason") or "stop"
            usage = payload.get("usage") or {}
        except (TypeError, KeyError, IndexError):
            raise ModelError(f"{self.url} answered with a body that is not a chat completion") from None
        if not isinstance(text, str):
            raise ModelError(f"{self.url} answered without message text")
        return Completion(text, str(reason), usage.get("prompt_tokens"), usage.get("completion_tokens"))


@asynccontextmanager
async def server_backend(base_url: str, api_key: str | None, *, timeout: float) -> AsyncIterator[ServerBackend]:
    """A client of a Ktulhu server's OpenAI-compatible API at `base_url`."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        yield ServerBackend(client, f"{base}/v1/chat/completions", f"server {base}")
