"""The scale-out topology for real: `ktulhu cluster` starts PostgreSQL, two llama-server workers,
two front-ends in remote-engine mode and nginx, all as processes on loopback; the tests drive them
the way clients do (WebSocket, REST, /v1) and kill members the way crashes do.

Assertions are on mechanisms (which worker served, cached-token counts, order of frames and of
stored messages, counts of successes), never on how long anything took.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from chat.wsclient import dones, tokens, ws_client
from ktulhu.local_cluster import NGINX, LocalCluster, postgres_bin
from ktulhu.ports import free_port

QUOTA = 7
WAIT_S = 120.0


def _missing() -> str | None:
    try:
        postgres_bin()
    except Exception as error:  # noqa: BLE001 - the reason is the skip message
        return str(error)
    if not NGINX.is_file():
        return "nginx is not installed (make test installs it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture(scope="module")
def cluster(repo_root: Path, default_model: Path) -> Iterator[LocalCluster]:
    directory = Path(tempfile.mkdtemp(prefix="ktulhu-cluster-"))
    directory.chmod(0o755)  # PostgreSQL runs as nobody below it (pytest's own temp root is private)
    local = LocalCluster(directory, repo_root, default_model, port=free_port(), slots=2, ctx=1024,
                         frontend_env={"KTULHU_FREE_GENERATIONS": str(QUOTA), "KTULHU_QUEUE": "256",
                                       "LLAMA_CLI_MAX_TOKENS": "160", "KTULHU_ANON_RATE": "0"})
    local.start()
    try:
        yield local
    finally:
        local.stop()
        shutil.rmtree(directory, ignore_errors=True)


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws"


async def _history(base: str, chat_id: str, device: str) -> list[dict[str, Any]]:
    """The chat's stored messages (an anonymous chat's id is its capability)."""
    async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
        response = await http.get(f"/api/chats/{chat_id}/messages")
        assert response.status_code == 200, response.text
        return response.json()["messages"]


async def _turn(base: str, text: str, chat_id: str, device: str, **extra: Any) -> list[dict[str, Any]]:
    async with ws_client(ws_url(base)) as ws:
        await ws.register(chat_id, device_hash=device)
        return await ws.ask(text, chat_id=chat_id, device_hash=device, **extra)


def _done(frames: list[dict[str, Any]]) -> dict[str, Any]:
    (done,) = dones(frames)
    return done


async def test_turns_alternate_front_ends_history_complete_and_affinity_kept(cluster: LocalCluster) -> None:
    device = "dev-" + uuid.uuid4().hex[:8]
    chat_id = ""
    fronts = [cluster.frontend_url(1), cluster.frontend_url(2)]
    replies = []
    for turn in range(4):
        frames = await _turn(fronts[turn % 2], f"Turn {turn}: tell me one fact about the sea.", chat_id, device)
        done = _done(frames)
        assert done["reason"] in ("eos", "length", "stop"), frames
        chat_id = done["chat_id"]
        replies.append((tokens(frames), done))
    history = await _history(fronts[0], chat_id, device)
    conversation = [m for m in history if m["role"] in ("user", "assistant")]
    assert [m["role"] for m in conversation] == ["user", "assistant"] * 4
    assert [m["text"] for m in conversation if m["role"] == "user"] == [
        f"Turn {i}: tell me one fact about the sea." for i in range(4)]
    workers = [m["meta"]["worker"] for m in conversation if m["role"] == "assistant"]
    assert len(set(workers)) == 1, workers  # every turn went where the chat's prefix is cached
    for (_, before), (_, done) in zip(replies, replies[1:]):
        # a follow-up finds at least the whole previous prompt cached on that worker, also when the
        # other front-end sent the previous turn
        assert done["usage"]["cached_tokens"] >= before["usage"]["prompt_tokens"], (before, done)


async def test_two_front_ends_prompting_one_chat_take_turns(cluster: LocalCluster) -> None:
    device = "dev-" + uuid.uuid4().hex[:8]
    first = await _turn(cluster.frontend_url(1), "Hello there.", "", device)
    chat_id = _done(first)["chat_id"]
    events: list[tuple[str, str]] = []  # (which socket, "token" | "done") in arrival order

    async def one(name: str, base: str) -> None:
        async with ws_client(ws_url(base)) as ws:
            await ws.register(chat_id, device_hash=device)
            request = await ws.prompt(f"Socket {name}: count to five.", chat_id=chat_id, device_hash=device)
            with trio.fail_after(WAIT_S):
                while True:
                    frame = await ws.recv()
                    if frame.get("request_id") != request:
                        continue
                    if frame.get("type") == "assistant" and frame.get("token"):
                        events.append((name, "token"))
                    if frame.get("done") is True:
                        events.append((name, "done"))
                        return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "a", cluster.frontend_url(1))
        nursery.start_soon(one, "b", cluster.frontend_url(2))
    first_done = next(i for i, (_, kind) in enumerate(events) if kind == "done")
    winner = events[first_done][0]
    assert all(name == winner for name, _ in events[:first_done]), events  # no token of the other before it
    history = await _history(cluster.frontend_url(2), chat_id, device)
    roles = [m["role"] for m in history if m["role"] in ("user", "assistant")]
    assert roles == ["user", "assistant"] * 3  # each prompt saw the previous exchange whole


async def test_a_killed_front_end_loses_nothing_and_the_other_answers(cluster: LocalCluster) -> None:
    device = "dev-" + uuid.uuid4().hex[:8]
    victim, survivor = cluster.frontend_url(1), cluster.frontend_url(2)
    started = await _turn(victim, "Hi.", "", device)
    chat_id = _done(started)["chat_id"]
    async with ws_client(ws_url(victim)) as ws:
        await ws.register(chat_id, device_hash=device)
        await ws.prompt("Write a long story about a lighthouse keeper.", chat_id=chat_id, device_hash=device,
                        max_tokens=400)
        with trio.fail_after(WAIT_S):
            while (await ws.recv()).get("type") != "assistant":
                pass
        cluster.members["frontend-1"].kill()  # kill -9 mid-reply
    try:
        history = await _history(survivor, chat_id, device)
        users = [m["text"] for m in history if m["role"] == "user"]
        assert users[-1] == "Write a long story about a lighthouse keeper."
        retry = await _turn(survivor, "Write a long story about a lighthouse keeper.", chat_id, device)
        assert tokens(retry) and _done(retry)["reason"] in ("eos", "length", "stop"), retry
    finally:
        cluster.restart("frontend-1")


async def _worker_metrics(base: str) -> str:
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        return (await http.get(f"{base}/metrics")).text


async def test_a_killed_worker_ends_the_reply_and_the_chat_moves_on(cluster: LocalCluster) -> None:
    device = "dev-" + uuid.uuid4().hex[:8]
    front = cluster.frontend_url(2)
    started = await _turn(front, "Hi.", "", device)
    chat_id = _done(started)["chat_id"]
    history = await _history(front, chat_id, device)
    served_by = [m for m in history if m["role"] == "assistant"][-1]["meta"]["worker"]
    index = next(i for i in (1, 2) if cluster.worker_url(i) == served_by)
    async with ws_client(ws_url(front)) as ws:
        await ws.register(chat_id, device_hash=device)
        request = await ws.prompt("Write a long story about a lighthouse keeper.", chat_id=chat_id,
                                  device_hash=device, max_tokens=400)
        with trio.fail_after(WAIT_S):
            while (await ws.recv()).get("type") != "assistant":
                pass
        cluster.members[f"worker-{index}"].kill()
        frames = await ws.until_done(request)
    assert any(f.get("type") == "error" for f in frames), frames
    assert _done(frames)["reason"] == "model_error"
    history = await _history(front, chat_id, device)
    cut = [m for m in history if m["role"] == "assistant"][-1]
    assert cut["meta"].get("incomplete") is True, cut
    after = await _turn(front, "Are you still there?", chat_id, device)
    assert tokens(after) and _done(after)["reason"] in ("eos", "length", "stop")
    history = await _history(front, chat_id, device)
    assert [m for m in history if m["role"] == "assistant"][-1]["meta"]["worker"] != served_by
    cluster.restart(f"worker-{index}")
    # Re-admitted by the health check: the front-end reports it healthy, then serves on it again.
    label = re.escape(served_by)
    with trio.fail_after(WAIT_S):
        while not re.search(rf'ktulhu_worker_healthy\{{worker="{label}"\}} 1', await _worker_metrics(front)):
            await trio.sleep(0.2)
    used = set()
    for n in range(12):
        frames = await _turn(front, f"New chat {n}.", "", device)
        chat = _done(frames)["chat_id"]
        used.add([m for m in await _history(front, chat, device) if m["role"] == "assistant"][-1]["meta"]["worker"])
        if served_by in used:
            break
    assert served_by in used


async def test_quota_is_exact_across_front_ends(cluster: LocalCluster) -> None:
    email = f"q{uuid.uuid4().hex[:10]}@example.com"
    async with httpx.AsyncClient(base_url=cluster.url, timeout=WAIT_S) as http:
        registered = await http.post("/api/auth/register", json={"email": email, "password": "a long passphrase 42"})
        assert registered.status_code in (200, 201), registered.text
        jwt = registered.json()["jwt"]
        key = (await http.post("/external/api/keys", headers={"Authorization": f"Bearer {jwt}"}, json={})).json()["key"]
    statuses: list[int] = []

    async def one(n: int) -> None:
        base = cluster.frontend_url(1 + n % 2)
        async with httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http:
            response = await http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                       json={"model": "ktulhu", "max_tokens": 4,
                                             "messages": [{"role": "user", "content": f"Say {n}."}]})
            statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for n in range(100):
            nursery.start_soon(one, n)
    assert statuses.count(200) == QUOTA, sorted(statuses)
    assert set(statuses) == {200, 429}, sorted(statuses)


async def test_a_title_made_on_one_front_end_reaches_a_sidebar_on_the_other(cluster: LocalCluster) -> None:
    device = "dev-" + uuid.uuid4().hex[:8]
    chat_id = "title-" + uuid.uuid4().hex[:12]
    sidebar_url = cluster.frontend_url(2).replace("http://", "ws://") + f"/chat-summary/ws?chat_id={chat_id}"
    async with open_websocket_url(sidebar_url) as sidebar:
        frames = await _turn(cluster.frontend_url(1), "Explain how tides work.", chat_id, device)
        assert _done(frames)["chat_id"] == chat_id
        with trio.fail_after(WAIT_S):
            pushed = json.loads(await sidebar.get_message())
    assert pushed["chat_id"] == chat_id and pushed["summary"], pushed


def test_cluster_command_rejects_bad_arguments(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ktulhu", "cluster", "up", "--workers", "0"],
                            cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 2 and "--workers 0" in result.stderr

