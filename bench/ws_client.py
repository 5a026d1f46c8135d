"""The benchmarks' `/ws` client (original dialect): register a socket, send a prompt and read its
reply to `done`, wait for a chat's title. Shared by bench.ws_load and bench.http so both speak the
protocol the same way."""

from __future__ import annotations

import json
import time
import uuid

import trio
from trio_websocket import WebSocketConnection

from bench.engine.workload import TokenClock

#: Longest wait for one frame: a reply queued behind a full engine still starts well within this.
FRAME_TIMEOUT_S = 300


class Checker:
    """Counts what the protocol promises: one `done` per prompt, frames naming their prompt."""

    def __init__(self) -> None:
        self.prompts = 0
        self.dones = 0
        self.bad_frames: list[str] = []
        self.ttft: list[float] = []
        self.streamed: dict[str, str] = {}
        #: Prompt tokens the engine had to compute (not served from its prefix cache).
        self.prefilled = 0
        #: Every `done`'s `usage` (prompt, cached and generated tokens).
        self.usages: list[dict[str, int]] = []


async def register(ws: WebSocketConnection, session_id: str, device_hash: str = "bench") -> dict:
    """`register` without a chat (an anonymous socket): the `registered` frame."""
    await ws.send_message(json.dumps({"msg_type": "register", "chat_id": "", "session_id": session_id,
                                      "device_hash": device_hash, "request_id": "", "text": ""}))
    with trio.fail_after(FRAME_TIMEOUT_S):
        return json.loads(await ws.get_message())


async def ask(ws: WebSocketConnection, checker: Checker, text: str, chat_id: str,
              clock: TokenClock | None = None) -> tuple[str, int, float]:
    """Send one prompt and read to its `done`: (chat id, generated tokens, seconds). `clock`, when
    given, ticks at every token frame (started by the caller just before)."""
    rid = str(uuid.uuid4())
    checker.prompts += 1
    started = time.perf_counter()
    await ws.send_message(json.dumps({"msg_type": "prompt", "request_id": rid, "chat_id": chat_id,
                                      "session_id": "bench", "device_hash": "bench", "text": text,
                                      "language": "en"}))
    parts: list[str] = []
    first = None
    while True:
        with trio.fail_after(FRAME_TIMEOUT_S):
            raw = await ws.get_message()
        frame = json.loads(raw)
        if frame.get("type") == "summary":
            continue
        if frame.get("request_id") != rid:
            checker.bad_frames.append(raw[:200])
            continue
        chat_id = frame.get("chat_id", chat_id)
        if "token" in frame:
            if first is None:
                first = time.perf_counter() - started
            if clock is not None:
                clock.tick()
            parts.append(frame["token"])
        if frame.get("done") is True:
            checker.dones += 1
            if first is not None:
                checker.ttft.append(first)
            checker.streamed[f"{chat_id}:{rid}"] = "".join(parts)
            usage = frame.get("usage") or {}
            checker.usages.append(usage)
            checker.prefilled += usage.get("prompt_tokens", 0) - usage.get("cached_tokens", 0)
            return chat_id, usage.get("generated_tokens", 0), time.perf_counter() - started


async def wait_title(ws: WebSocketConnection) -> None:
    """Read until the socket's chat title (`summary`) arrives; the server makes none for an empty
    reply or when its title worker fails, so the caller bounds the wait."""
    while json.loads(await ws.get_message()).get("type") != "summary":
        pass
