"""What the tree provides to request handlers: settings, readiness and the running services."""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from ..chat.hub import SummaryHub
from ..chat.turns import TurnQueue
from ..doctor import LiveDoctor
from ..settings import Settings
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


@attrs.define
class Runtime:
    """One per process. Services fill their slot when they report readiness and clear it on exit."""

    settings: Settings
    readiness: Readiness = attrs.field(factory=Readiness)
    #: Set on SIGINT/SIGTERM: long-lived handlers (WS sessions, streams) end their work with final frames.
    shutting_down: trio.Event = attrs.field(factory=trio.Event)
    store: Store | None = None
    model: Model | None = None
    #: The local batching engine, or in remote mode (`KTULHU_ENGINE=remote`) the client of the workers.
    engine: Engine | RemoteEngine | None = None
    #: The local models by name (the default is `engine`; KTULHU_MODELS' load on first use); None in
    #: remote mode and while no engine runs.
    models: ModelPool | None = None
    #: What computes `/v1/embeddings` (a context beside the local model, or the workers); None while none runs.
    embedder: LocalEmbedder | RemoteEmbedder | None = None
    router: Router | None = None
    summaries: SummaryWorker | None = None
    #: New chat titles, for `/chat-summary/ws` and `/ws` sessions.
    summary_hub: SummaryHub = attrs.field(factory=SummaryHub)
    #: One reply per chat at a time (`/ws` prompts queue behind a chat's running reply).
    turns: TurnQueue = attrs.field(factory=TurnQueue)
    #: `ktulhu doctor`'s report as this server sees itself (`/readyz`, admin overview).
    doctor: LiveDoctor = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.doctor = LiveDoctor(self.settings)

    def request_shutdown(self) -> None:
        """Stop accepting work: `/readyz` turns 503 and long-lived handlers wrap up."""
        self.readiness.stopping = True
        self.shutting_down.set()
