"""A small `/ws` client for tests: JSON frames in and out, every wait bounded."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

WAIT_S = 60.0


class WsClient:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        #: Frames received but not yet taken by `until_done` for another request.
        self.backlog: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = WAIT_S) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        with trio.fail_after(timeout):
            return json.loads(await self.ws.get_message())

    async def register(self, chat_id: str = "", device_hash: str = "dev1", **extra: Any) -> dict[str, Any]:
        await self.send({"msg_type": "register", "request_id": "", "chat_id": chat_id, "session_id": "s1",
                         "device_hash": device_hash, "text": "", **extra})
        with trio.fail_after(WAIT_S):
            while True:
                frame = json.loads(await self.ws.get_message())
                if frame.get("event") == "registered":
                    return frame
                self.backlog.append(frame)

    async def prompt(self, text: str, chat_id: str = "", request_id: str | None = None,
                     device_hash: str = "dev1", **extra: Any) -> str:
        request_id = request_id or str(uuid.uuid4())
        await self.send({"msg_type": "prompt", "request_id": request_id, "chat_id": chat_id, "session_id": "s1",
                         "device_hash": device_hash, "text": text, "language": "en", **extra})
        return request_id

    async def until_done(self, request_id: str, timeout: float = WAIT_S) -> list[dict[str, Any]]:
        """Every frame of `request_id` up to and including its `done`; other frames stay queued."""
        mine: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        with trio.fail_after(timeout):
            while True:
                frame = self.backlog.pop(0) if self.backlog else json.loads(await self.ws.get_message())
                if frame.get("request_id") != request_id:
                    others.append(frame)
                    continue
                mine.append(frame)
                if frame.get("done") is True:
                    self.backlog[:0] = others
                    return mine

    async def ask(self, text: str, **kwargs: Any) -> list[dict[str, Any]]:
        return await self.until_done(await self.prompt(text, **kwargs))


@asynccontextmanager
async def ws_client(url: str, **kwargs: Any) -> AsyncIterator[WsClient]:
    async with open_websocket_url(url, **kwargs) as ws:
        yield WsClient(ws)


def tokens(frames: list[dict[str, Any]]) -> str:
    return "".join(f["token"] for f in frames if f.get("type") == "assistant" and "token" in f)


def dones(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("done") is True]
