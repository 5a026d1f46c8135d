"""Chat titles ("summaries"): made after a chat's first exchange by a low-priority background worker.

`done` is never delayed by a summary (original §8.17): the prompt flow only *requests* one with
`SummaryWorker.request`, which never waits. The worker makes one title at a time and only starts
when the engine is idle (nothing generating, nothing queued) or after `PATIENCE_S`, stores it as the
chat's `summary` message and publishes it on the `SummaryHub`, which feeds `/chat-summary/ws` and
the `/ws` session that asked (if it is still open).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import attrs
import trio

from ..engine.prompt import ChatMessage, ContextTooLong
from ..engine.request import EngineError
from ..engine.sampling import SamplingParams
from ..nurseries.provided import Provided
from ..router.routing import normalise_language
from ..settings import Settings
from ..store.errors import StoreError
from ..store.records import Message
from .hub import SummaryEvent, SummaryHub

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..engine.remote import RemoteEngine
    from ..store import Store

__all__ = ["SummaryWorker", "clean_title", "excerpt", "title_source", "wants_summary"]

log = logging.getLogger("ktulhu.summaries")

#: Titles longer than this are cut at a word boundary.
MAX_TITLE_CHARS = 48
#: User messages the title is made from (the original's choice).
SOURCE_MESSAGES = 6
MAX_TOKENS = 24
#: Longest wait for an idle engine before a title is made anyway.
PATIENCE_S = 30.0
GENERATION_TIMEOUT_S = 60.0
#: Characters of the user messages a title is made from, all together: each message gives its head
#: (a share of this), so one very long message cannot push the title prompt out of the context.
SOURCE_CHARS = 1200
#: When even that does not fit (a small LLAMA_CLI_CTX) the share is halved down to this, and below
#: it the title is the first words of the chat's first message.
MIN_SOURCE_CHARS = 100
#: Engine affinity key: titles share their system prompt, so they reuse one slot's prefix cache
#: instead of evicting a conversation's.
ENGINE_KEY = "chat-titles"

SYSTEM_PROMPT = (
    "You write short titles for chat conversations. Reply with a title of at most five words that "
    "names the topic of the user's messages, in the same language as those messages. Plain text, "
    "lowercase, no quotes, no final punctuation, nothing else."
)


def wants_summary(history: list[Message]) -> bool:
    """A chat gets a title once it has a user message and a non-empty reply, and no title yet."""
    roles = {m.role for m in history if m.role != "assistant" or (m.text or "").strip()}
    return "summary" not in roles and "user" in roles and "assistant" in roles


_QUOTES = "\"'`«»“”„‘’"


def clean_title(text: str) -> str:
    """First line, without quotes, markdown or a "Title:" label, cut to `MAX_TITLE_CHARS` on a word."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(title|titulo|título|заголовок)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip(_QUOTES + "*#-_ ").rstrip(".!?;:,").strip(_QUOTES + " ")
    line = re.sub(r"\s+", " ", line)
    if len(line) > MAX_TITLE_CHARS:
        cut = line[:MAX_TITLE_CHARS]
        line = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return line.strip()


def excerpt(text: str, limit: int) -> str:
    """The head of `text` on one line, at most `limit` characters plus " …" when it was cut (at a
    word boundary when there is one in the second half)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if " " in cut[limit // 2:]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + " …"


def title_source(texts: list[str], budget: int = SOURCE_CHARS) -> str:
    """The user turn of a title prompt: each message's head, one per line, about `budget` characters."""
    share = max(1, budget // max(1, len(texts)))
    return "\n".join(excerpt(t, share) for t in texts)


@attrs.frozen
class _Job:
    chat_id: str
    request_id: str


class SummaryWorker:
    """Makes titles one at a time. `request` never blocks: a full queue skips the title, and the
    next exchange of that chat asks again."""

    def __init__(self, settings: Settings, store: Store, engine: Provided[Engine | RemoteEngine], hub: SummaryHub,
                 *, capacity: int = 64) -> None:
        self.settings = settings
        self.store = store
        #: The engine service's engine: titles wait for it, and for it to be idle.
        self.engine = engine
        self.hub = hub
        self._send, self._receive = trio.open_memory_channel[_Job](capacity)
        self._pending: set[str] = set()
        self._idle = trio.Event()
        self._idle.set()
        self.made = 0
        self.failed = 0

    def request(self, chat_id: str, request_id: str = "") -> bool:
        if chat_id in self._pending:
            return True
        try:
            self._send.send_nowait(_Job(chat_id, request_id))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        self._pending.add(chat_id)
        if self._idle.is_set():
            self._idle = trio.Event()
        return True

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def wait_idle(self) -> None:
        """Return once every requested title is made (or failed): at once when none is pending."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[dict[str, object]] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started({"queue": self._send.statistics().max_buffer_size})
        async with self._receive:
            async for job in self._receive:
                try:
                    await self._make(job)
                except (EngineError, StoreError, OSError, ValueError) as exc:  # one title failing is not fatal
                    self.failed += 1
                    log.warning("chat title failed: %s: %s", type(exc).__name__, exc)
                finally:
                    self._pending.discard(job.chat_id)
                    if not self._pending:
                        self._idle.set()

    async def _idle_engine(self) -> Engine | RemoteEngine | None:
        """The engine once nothing is generating or queued, or after `PATIENCE_S` whatever it is doing;
        None when it is not running."""
        with trio.move_on_after(PATIENCE_S):
            engine = await self.engine.wait()
            await engine.wait_idle()
        return self.engine.current

    async def _make(self, job: _Job) -> None:
        store = self.store
        history = await store.aio.list_messages_for_chat(job.chat_id)
        if not wants_summary(history):
            return
        users = [m for m in history if m.role == "user" and (m.text or "").strip()][-SOURCE_MESSAGES:]
        if not users:
            return
        language = next((normalise_language(m.language) for m in history if (m.language or "").strip()), None)
        engine = await self._idle_engine()
        if engine is None:
            return
        texts = [(m.text or "").strip() for m in users]
        params = SamplingParams.defaults(self.settings, temperature=0.0, max_tokens=MAX_TOKENS)
        budget = SOURCE_CHARS
        text: str | None = None
        with trio.move_on_after(GENERATION_TIMEOUT_S) as timer:
            while text is None:
                messages = [ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", title_source(texts, budget))]
                try:
                    with await engine.chat(messages, params, chat_id=ENGINE_KEY) as generation:
                        text = await generation.text()
                except ContextTooLong:
                    if budget <= MIN_SOURCE_CHARS:  # a tiny context: the first words of the chat
                        text = excerpt(texts[0], MAX_TITLE_CHARS)
                        break
                    budget = max(MIN_SOURCE_CHARS, budget // 2)
        if timer.cancelled_caught:  # an overloaded engine: this chat asks again after its next exchange
            self.failed += 1
            log.warning("chat title took longer than %g s; skipped", GENERATION_TIMEOUT_S)
            return
        title = clean_title(text or "")
        if not title:
            return
        if await store.aio.chat_summary(job.chat_id) is not None:  # renamed by someone meanwhile: theirs stays
            return
        message = await store.aio.replace_summary(job.chat_id, title, language=language, existing_chat_only=True)
        chat = None if message is None else await store.aio.touch_chat(job.chat_id, existing_chat_only=True)
        if chat is None:  # deleted while its title was made: it stays deleted
            return
        self.made += 1
        self.hub.publish(SummaryEvent(chat, message, job.request_id))
