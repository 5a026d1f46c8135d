"""What the tree provides to request handlers: settings, readiness and the running services."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..chat.hub import SummaryHub
from ..chat.turns import TurnQueue
from ..doctor import LiveDoctor
from ..engine.arrivals import Arrivals
from ..settings import Settings
from .provided import Provided
from .readiness import Readiness

if TYPE_CHECKING:
    from ..chat.summaries import SummaryWorker
    from ..engine.engine import Engine
    from ..engine.remote import RemoteEngine
    from ..engine.model import Model
    from ..engine.embeddings import LocalEmbedder, RemoteEmbedder
    from ..engine.pool import ModelPool
    from ..router.service import Router
    from ..store import Store

__all__ = ["Runtime", "ServiceFailed"]


class ServiceFailed(Exception):
    """A service of the tree failed; the server stops. `str()` is the one log line operators see."""

    def __init__(self, service: str, error: BaseException) -> None:
        self.service = service
        self.error = error
        super().__init__(f"{service} service failed: {type(error).__name__}: {error}")


def _provided(name: str) -> Any:
    return attrs.field(factory=lambda: Provided(name), init=False)


@attrs.define
class Runtime:
    """One per process: what the tree gives request handlers. Each service provides its value for the
    scope in which it is usable (`Provided`); the store is open whenever HTTP serves."""

    settings: Settings
    readiness: Readiness = attrs.field(factory=Readiness)
    #: Set on SIGINT/SIGTERM: long-lived handlers (WS sessions, streams) end their work with final frames.
    shutting_down: trio.Event = attrs.field(factory=trio.Event)
    #: The open store (`store` reads it): opened before HTTP serves, closed after it stops.
    opened_store: Provided[Store] = _provided("chat store")
    model: Provided[Model] = _provided("model")
    #: The local batching engine, or in remote mode (`KTULHU_ENGINE=remote`) the client of the workers.
    engine: Provided[Engine | RemoteEngine] = _provided("engine")
    #: The local models by name (the default is `engine`; KTULHU_MODELS' load on first use); not
    #: provided in remote mode.
    models: Provided[ModelPool] = _provided("model pool")
    #: What computes `/v1/embeddings` (a context beside the local model, or the workers).
    embedder: Provided[LocalEmbedder | RemoteEmbedder] = _provided("embedder")
    router: Provided[Router] = _provided("intent router")
    summaries: Provided[SummaryWorker] = _provided("title worker")
    #: New chat titles, for `/chat-summary/ws` and `/ws` sessions.
    summary_hub: SummaryHub = attrs.field(factory=SummaryHub)
    #: One reply per chat at a time (`/ws` prompts queue behind a chat's running reply).
    turns: TurnQueue = attrs.field(factory=TurnQueue)
    #: Generation requests between their arrival and the engine (the local engine's idle workers
    #: wait briefly for them, so a burst is prefilled together).
    arrivals: Arrivals = attrs.field(factory=Arrivals)
    #: `ktulhu doctor`'s report as this server sees itself (`/readyz`, admin overview).
    doctor: LiveDoctor = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.doctor = LiveDoctor(self.settings)

    @property
    def store(self) -> Store:
        """The open store; `NotRunning` (a 503) only outside the tree's life, never while HTTP serves."""
        return self.opened_store.get()

    def request_shutdown(self) -> None:
        """Stop accepting work: `/readyz` turns 503 and long-lived handlers wrap up."""
        self.readiness.stop()
        self.shutting_down.set()
