"""`kill -9` mid-reply: the reply streamed so far is in the history, marked incomplete (it is
checkpointed while it streams); after a restart the chat continues."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest
import trio

from ktulhu.chat.prompt_flow import CHECKPOINT_S
from ktulhu.store import Store

from test_serve import BIN, spawn, wait_for_line, wait_ready

from chat.wsclient import dones, tokens, ws_client

pytestmark = pytest.mark.model


def serve(server_dir: Path, max_tokens: int):
    proc = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir,
                 LLAMA_CLI_MAX_TOKENS=str(max_tokens), KTULHU_ANON_RATE="0", LLAMA_CLI_THREADS="1")
    match, _ = wait_for_line(proc, r"listening on (http://127\.0\.0\.1:(\d+))")
    wait_ready(match.group(1))
    return proc, int(match.group(2))


async def test_a_killed_server_leaves_the_partial_reply_marked_incomplete(server_dir: Path) -> None:
    proc, port = serve(server_dir, 1500)
    chat_id = str(uuid.uuid4())
    streamed: list[dict] = []
    try:
        async with ws_client(f"ws://127.0.0.1:{port}/ws") as ws:
            rid = await ws.prompt("Write a very long story about a dragon and a knight, with many chapters.",
                                  chat_id=chat_id)
            # stream for longer than two checkpoint intervals (a bound on the wait, not a timing assertion)
            with trio.move_on_after(2 * CHECKPOINT_S + 1):
                while True:
                    frame = await ws.recv()
                    if frame.get("request_id") == rid:
                        streamed.append(frame)
                        assert not frame.get("done"), "the reply ended before the kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = Store.open(server_dir / "chatdb")
    try:
        history = store.list_messages_for_chat(chat_id)
    finally:
        store.close()
    assert [m.role for m in history] == ["user", "assistant"]
    reply = history[1]
    assert reply.meta["incomplete"] is True and reply.meta["finish_reason"] == "interrupted"
    assert reply.text and tokens(streamed).strip().startswith(reply.text)
    assert reply.meta["generated_tokens"] > 0

    proc, port = serve(server_dir, 16)  # the chat goes on after a restart
    try:
        async with ws_client(f"ws://127.0.0.1:{port}/ws") as ws:
            frames = await ws.ask("Thanks, that is enough.", chat_id=chat_id)
        assert dones(frames)[0]["reason"] in ("eos", "length", "stop")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
