"""Shared pieces of the chat page's browser tests: a scripted `/ws` (the test decides every frame the
page receives, so rendering and endings are checked on exact input), a scripted history route, and
page-level checks (layout overflow, accessible names, console 404s)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from playwright.sync_api import Browser, Page, Route, WebSocketRoute, sync_playwright

#: The chat socket only (not /chat-summary/ws, which stays the real server's).
CHAT_SOCKET = re.compile(r"^wss?://[^/]+/ws(\?.*)?$")
TIMEOUT_MS = 60_000


@contextmanager
def launched(chromium: str) -> Iterator[Browser]:
    """Headless Chromium, closed when the block ends."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_chat(page: Page, url: str, *, idle: bool = True) -> None:
    """Load the chat page at `url` and wait until its socket is online (and, by default, it is idle:
    history loaded, nothing streaming)."""
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector('#connection[data-state="online"]')
    if idle:
        page.wait_for_selector("body[data-idle='1']")


class ScriptedSocket:
    """Stands in for the server on `/ws`: answers `register`, records what the page sends, and
    sends what the test tells it to, when it tells it to."""

    def __init__(self, page: Page) -> None:
        self.route: WebSocketRoute | None = None
        self.sent: list[dict[str, Any]] = []
        page.route_web_socket(CHAT_SOCKET, self._connected)

    def _connected(self, route: WebSocketRoute) -> None:
        self.route = route
        route.on_message(self._received)

    def _received(self, message: str | bytes) -> None:
        frame = json.loads(message)
        self.sent.append(frame)
        if frame.get("msg_type") == "register":
            self.send({"type": "system", "event": "registered", "session_id": frame.get("session_id"),
                       "chat_id": frame.get("chat_id"), "device_hash": frame.get("device_hash"), "history": []})

    def send(self, frame: dict[str, Any]) -> None:
        assert self.route is not None, "the page has not connected"
        self.route.send(json.dumps(frame))

    def prompts(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("msg_type") == "prompt"]

    def prompt(self, page: Page, count: int) -> dict[str, Any]:
        """The page's `count`-th prompt frame (waits for it to arrive)."""
        wait_until(page, lambda: len(self.prompts()) >= count, f"prompt frame #{count}")
        return self.prompts()[count - 1]

    def cancels(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("msg_type") == "cancel"]

    def tokens(self, prompt: dict[str, Any], *pieces: str) -> None:
        for piece in pieces:
            self.send({"type": "assistant", "token": piece, "request_id": prompt["request_id"],
                       "chat_id": prompt["chat_id"]})

    def done(self, prompt: dict[str, Any], reason: str) -> None:
        self.send({"type": "assistant", "done": True, "reason": reason, "request_id": prompt["request_id"],
                   "chat_id": prompt["chat_id"]})

    def error(self, prompt: dict[str, Any], code: str, detail: str) -> None:
        self.send({"type": "error", "message": code, "detail": detail, "request_id": prompt["request_id"],
                   "chat_id": prompt["chat_id"]})


class ScriptedHistory:
    """`GET /chat-thread/{id}` answered from `threads` (what a server would have stored)."""

    def __init__(self, page: Page) -> None:
        self.threads: dict[str, list[dict[str, Any]]] = {}
        page.route(re.compile(r"/chat-thread/[A-Za-z0-9_-]+$"), self._answer)

    def _answer(self, route: Route) -> None:
        chat_id = route.request.url.rsplit("/", 1)[1]
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"chat_id": chat_id, "messages": self.threads.get(chat_id, []), "source": "db"}))


def layout_report(page: Page) -> dict[str, Any]:
    """Page width against the viewport, and controls that stick out of it."""
    return page.evaluate("""() => {
        const width = window.innerWidth;
        const outside = [];
        for (const id of ['menu', 'chat-title', 'language', 'connection', 'prompt', 'send']) {
            const node = document.getElementById(id);
            if (!node || node.offsetParent === null) continue;
            const r = node.getBoundingClientRect();
            if (r.left < 0 || r.right > width + 0.5) outside.push([id, r.left, r.right]);
        }
        return {width, scrollWidth: document.documentElement.scrollWidth, bodyScrollWidth: document.body.scrollWidth,
                outside};
    }""")


def unnamed_controls(page: Page) -> list[str]:
    """Visible buttons, fields and menus without an accessible name (label, aria-label or text)."""
    return page.evaluate("""() => {
        const bad = [];
        for (const node of document.querySelectorAll('button, input, select, textarea, a[href]')) {
            const r = node.getBoundingClientRect();
            if (!r.width || !r.height || getComputedStyle(node).visibility === 'hidden') continue;
            const name = (node.getAttribute('aria-label') || '').trim()
                || (node.labels && [...node.labels].map(l => l.textContent).join(' ').trim())
                || (node.getAttribute('aria-labelledby') || '').trim()
                || (node.textContent || '').trim() || (node.getAttribute('title') || '').trim();
            if (!name) bad.push(node.outerHTML.slice(0, 120));
        }
        return bad;
    }""")


def watch_console(page: Page) -> dict[str, list[str]]:
    """Page errors, console errors and responses >= 400 seen by `page`."""
    seen: dict[str, list[str]] = {"errors": [], "console": [], "failed": []}
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("response", lambda r: seen["failed"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return seen


def wait_until(page: Page, predicate: Callable[[], bool], what: str, tries: int = 1200) -> None:
    """Poll a Python-side condition (frames received by a scripted socket) between page events."""
    for _ in range(tries):
        if predicate():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"timed out waiting for {what}")
