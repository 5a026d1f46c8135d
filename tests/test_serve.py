"""`ktulhu serve` and `hypercorn --worker-class trio ktulhu.asgi:app` as real processes on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


BIN = Path(sys.executable).parent


def spawn(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
    full_env.update({"KTULHU_LOG": "info", **env})
    return subprocess.Popen(args, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 60.0) -> tuple[re.Match, list[str]]:
    """Read the server's log until `pattern` matches (bounded); returns the match and lines so far."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match, seen
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; log was:\n{''.join(seen)}")


def wait_ready(base: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{base}/readyz", timeout=5)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 503
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s: {response.json()}")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, float, str]:
    started = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=15)
    seconds = time.monotonic() - started
    # read through the same buffered pipe wait_for_line used (communicate() would skip its buffer)
    return proc.returncode, seconds, proc.stdout.read()


def test_serve_health_ready_and_sigterm_exit(server_dir: Path) -> None:
    proc = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir)
    match, log = wait_for_line(proc, r"listening on (http://127\.0\.0\.1:\d+)")
    base = match.group(1)
    early = httpx.get(f"{base}/readyz", timeout=5)
    assert early.status_code in (200, 503) and "components" in early.json()
    assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "alive"}
    ready = wait_ready(base)
    assert ready["status"] == "ready"
    assert set(ready["components"]) == {"store", "model", "router", "summaries"}
    assert ready["components"]["model"]["n_vocab"] == 49152
    code, seconds, out = stop(proc)
    out = "".join(log) + out
    assert code == 0, out
    assert seconds < 5, out
    assert "route group payments: off" in out and "route group sign-in google: off" in out
    assert "JWT_SECRET is not set: generated one" in out
    assert "store closed" in out and "Traceback" not in out
    assert (server_dir / ".ktulhu/jwt_secret").is_file()


def test_sigint_also_stops_cleanly(server_dir: Path) -> None:
    proc = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir)
    match, _ = wait_for_line(proc, r"listening on (http://\S+)")
    wait_ready(match.group(1))
    code, seconds, out = stop(proc, signal.SIGINT)
    assert code == 0 and seconds < 5, out


def test_second_server_on_the_same_store_exits_with_one_clear_line(server_dir: Path) -> None:
    first = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir)
    wait_for_line(first, r"listening on")
    try:
        second = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1
        assert "ktulhu stopped: store service failed" in out
        assert "locked by another process; run one server per store" in out
        assert "Traceback" not in out
    finally:
        stop(first)


def test_bad_configuration_exits_2_naming_the_variable(server_dir: Path) -> None:
    proc = spawn([str(BIN / "ktulhu"), "serve"], server_dir, LLAMA_CLI_TEMP="abc", LLAMA_CLI_CTX_POOL="0")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "LLAMA_CLI_TEMP='abc' (from environment): not a number" in out
    assert "LLAMA_CLI_CTX_POOL='0'" in out


def test_missing_model_tells_how_to_get_one(server_dir: Path) -> None:
    proc = spawn([str(BIN / "ktulhu"), "serve"], server_dir, LLAMA_CLI_MODEL="models/missing.gguf")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "run `ktulhu models pull` or set LLAMA_CLI_MODEL" in out


def test_model_that_fails_to_load_stops_the_server(server_dir: Path) -> None:
    (server_dir / "models" / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    proc = spawn([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"], server_dir,
                 LLAMA_CLI_MODEL="models/broken.gguf")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    lines = [line for line in out.splitlines() if "ktulhu stopped" in line]
    # the start-up check found it in a child process: /readyz never turned green
    assert len(lines) == 1 and "model service failed: PreflightFailed" in lines[0]
    assert "LLAMA_CLI_MODEL" in lines[0] and "Traceback" not in out


def test_hypercorn_trio_worker_runs_the_same_tree(server_dir: Path, free_port: int) -> None:
    port = free_port
    proc = spawn([str(BIN / "hypercorn"), "--worker-class", "trio", "--bind", f"127.0.0.1:{port}",
                  "ktulhu.asgi:app"], server_dir, KTULHU_DB_PATH="asgi-db")
    base = f"http://127.0.0.1:{port}"
    wait_for_line(proc, r"Running on")
    assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "alive"}
    ready = wait_ready(base)
    assert set(ready["components"]) == {"store", "model", "router", "summaries"}
    assert (server_dir / "asgi-db").is_dir()
    code, seconds, out = stop(proc)
    assert code == 0 and seconds < 5, out
    assert "store closed" in out


@pytest.mark.parametrize("workers", [[], ["--workers", "0"]])
def test_hypercorn_stops_when_a_service_crashes(server_dir: Path, free_port: int, workers: list[str]) -> None:
    """hypercorn would keep serving after a failed lifespan task; our supervisor ends the worker.

    In-process (`--workers 0`) the exit code is ours (3). hypercorn's master process reports 0 for a
    worker that died (its own bookkeeping), so there the test checks that the server did stop.
    """
    (server_dir / "models" / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    proc = spawn([str(BIN / "hypercorn"), "--worker-class", "trio", *workers, "--bind",
                  f"127.0.0.1:{free_port}", "ktulhu.asgi:app"], server_dir, LLAMA_CLI_MODEL="models/broken.gguf")
    out, _ = proc.communicate(timeout=60)
    if workers:
        assert proc.returncode == 3, out
    lines = [line for line in out.splitlines() if "ktulhu stopped" in line]
    assert len(lines) == 1 and "model service failed: PreflightFailed" in lines[0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{free_port}/healthz", timeout=2)


def test_hypercorn_with_several_workers_refuses_with_one_line(server_dir: Path, free_port: int) -> None:
    """The embedded store admits one process: the second worker says so and the master stops them all."""
    proc = spawn([str(BIN / "hypercorn"), "--worker-class", "trio", "--workers", "2", "--bind",
                  f"127.0.0.1:{free_port}", "ktulhu.asgi:app"], server_dir)
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.splitlines() if "ktulhu stopped" in line]
    assert len(lines) == 1, out
    assert "StoreLockedError" in lines[0] and "run one worker (`hypercorn --workers 1` or `ktulhu serve`)" in lines[0]
    assert "Traceback" not in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{free_port}/healthz", timeout=2)
