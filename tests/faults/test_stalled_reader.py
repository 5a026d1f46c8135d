"""A `/ws` client that stops reading: disconnected within the send timeout, its prompt cancelled,
its chat freed and shutdown unblocked. Real `ktulhu serve`, a real socket with a 4 KB receive buffer."""

from __future__ import annotations

import json
import signal
import socket
import uuid
from pathlib import Path

import pytest
import wsproto
from wsproto.events import AcceptConnection, Request, TextMessage

from test_serve import BIN, spawn, stop, wait_for_line, wait_ready

from chat.wsclient import dones, ws_client

pytestmark = pytest.mark.model

STORY = "Write a very long story about a dragon and a knight, with many chapters and many characters."


def stalled_prompt(port: int, chat_id: str) -> socket.socket:
    """Open /ws with a tiny receive buffer, send one prompt, and never read again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
    accepted = False
    while not accepted:
        ws.receive_data(sock.recv(65536))
        accepted = any(isinstance(event, AcceptConnection) for event in ws.events())
    frame = {"msg_type": "prompt", "request_id": str(uuid.uuid4()), "chat_id": chat_id, "session_id": "s",
             "device_hash": "d", "text": STORY, "language": "en"}
    sock.sendall(ws.send(TextMessage(json.dumps(frame))))
    return sock


async def test_a_stalled_reader_is_dropped_and_its_chat_freed(server_dir: Path) -> None:
    proc = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir,
                 KTULHU_WS_SEND_TIMEOUT="2", LLAMA_CLI_MAX_TOKENS="1800", KTULHU_ANON_RATE="0",
                 LLAMA_CLI_THREADS="1")
    match, _ = wait_for_line(proc, r"listening on (http://127\.0\.0\.1:(\d+))")
    base, port = match.group(1), int(match.group(2))
    wait_ready(base)
    chat_id = str(uuid.uuid4())
    try:
        stalled = stalled_prompt(port, chat_id)
        try:
            # another socket prompts the same chat: it waits for the stalled prompt's turn, which must end
            async with ws_client(f"ws://127.0.0.1:{port}/ws") as ws:
                frames = await ws.until_done(await ws.prompt("Say hello.", chat_id=chat_id), timeout=240)
            assert dones(frames)[0]["reason"] in ("eos", "length", "stop"), frames[-3:]
        finally:
            stalled.close()
        code, _, out = stop(proc, signal.SIGTERM)  # shutdown is not held up by the stalled socket
        assert code == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
