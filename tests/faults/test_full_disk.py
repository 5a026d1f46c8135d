"""A full disk under a serving store: prompts end with `error` + `done`, `/readyz` is 503 naming
the cause, and the server recovers by itself once space is back; SIGTERM still exits 0.

The store lives on a 24 MB tmpfs that the test mounts (root, as in CI); without the right to mount,
the test is skipped with the reason."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from test_serve import BIN, spawn, stop, wait_for_line, wait_ready

from chat.wsclient import dones, ws_client

pytestmark = pytest.mark.model


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_is_reported_and_recovered_from(server_dir: Path, small_disk: Path) -> None:
    proc = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir,
                 KTULHU_DB_PATH=str(small_disk / "chatdb"), LLAMA_CLI_MAX_TOKENS="8", KTULHU_ANON_RATE="0")
    try:
        match, _ = wait_for_line(proc, r"listening on (http://127\.0\.0\.1:(\d+))")
        base, port = match.group(1), int(match.group(2))
        wait_ready(base)
        chat_id = str(uuid.uuid4())
        async with ws_client(f"ws://127.0.0.1:{port}/ws") as ws:
            assert dones(await ws.ask("Hello!", chat_id=chat_id))[0]["reason"] in ("eos", "length", "stop")
            filler = small_disk / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
            frames = await ws.ask("Are you there?", chat_id=chat_id)
            assert len(dones(frames)) == 1 and dones(frames)[0]["reason"] == "store_unavailable", frames
            assert any(f.get("type") == "error" and f.get("message") == "store_unavailable" for f in frames)
            async with httpx.AsyncClient(base_url=base) as http:
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                store = ready.json()["components"]["store"]
                assert store["status"] == "failed" and "No space left on device" in store["error"]
                os.remove(filler)
                with trio.fail_after(60):  # a bound on the wait, not a timing assertion
                    while (await http.get("/readyz")).status_code != 200:
                        await trio.sleep(0.2)
            frames = await ws.ask("And now?", chat_id=chat_id)
            assert dones(frames)[0]["reason"] in ("eos", "length", "stop")
        code, _, out = stop(proc, signal.SIGTERM)
        assert code == 0, out
        assert "store takes writes again" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
