"""deploy/ktulhu.service: `systemd-analyze verify` on the shipped unit (paths pointed at real files),
its values against the server's settings, and the server running under MemoryDenyWriteExecute's rule."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path, PurePosixPath

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from ktulhu.settings import load_settings, setting_fields
from tests.paths import REPO

UNIT = REPO / "deploy" / "ktulhu.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
MDWE = Path(__file__).with_name("mdwe.py")
BIN = Path(sys.executable).parent

needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (Debian: systemd)")


def entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order."""
    section, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str) -> list[str]:
    return [v for _, k, v in entries(UNIT.read_text()) if k == key]


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with its checkout and env file moved to real files under `tmp_path`."""
    root = tmp_path / "opt" / "ktulhu"
    (root / ".venv" / "bin").mkdir(parents=True)
    ktulhu = root / ".venv" / "bin" / "ktulhu"
    ktulhu.write_text("#!/bin/sh\nexit 0\n")
    ktulhu.chmod(0o755)
    env_file = tmp_path / "ktulhu.env"
    env_file.write_text("JWT_SECRET=" + "x" * 64 + "\n")
    text = UNIT.read_text() if text is None else text
    assert "/opt/ktulhu" in text and "/etc/ktulhu/ktulhu.env" in text
    text = text.replace("/etc/ktulhu/ktulhu.env", str(env_file)).replace("/opt/ktulhu", str(root))
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    unit = unit_dir / "ktulhu.service"
    unit.write_text(text)
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)


@needs_analyze
def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    result = verify(local_copy(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "ktulhu" in line] == []


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported, a missing ExecStart is an error."""
    text = UNIT.read_text()
    typo = verify(local_copy(tmp_path / "typo", text.replace("NoNewPrivileges=", "NoNewPrivilegez=")))
    assert "Unknown key" in typo.stdout + typo.stderr
    missing = verify(local_copy(tmp_path / "missing", text.replace("/.venv/bin/ktulhu serve", "/.venv/bin/nope serve")))
    assert missing.returncode != 0 and "nope" in missing.stdout + missing.stderr


@needs_analyze
def test_hardening_exposure_is_low(tmp_path: Path) -> None:
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(local_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot review a unit offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for ktulhu\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_values_fit_the_server(tmp_path: Path) -> None:
    service = dict((k, v) for s, k, v in entries(UNIT.read_text()) if s == "Service" and k != "Environment")
    env = dict(assignment.split("=", 1) for assignment in values("Environment"))
    known = {f.metadata["env"] for f in setting_fields()}
    assert {k for k in env if k not in known} <= {"KTULHU_BUILD_CACHE"}
    assert "KTULHU_BUILD_CACHE" in (REPO / "ktulhu" / "native_build.py").read_text()
    # the values load (production needs the env file's JWT_SECRET)
    settings = load_settings(environ={**env, "JWT_SECRET": "x" * 64}, root=tmp_path)
    assert settings.env == "production" and settings.trusted_proxies == "127.0.0.1/32"
    assert service["User"] != "root" and service["ExecStart"] == service["WorkingDirectory"] + "/.venv/bin/ktulhu serve"
    # a graceful stop (at most KTULHU_GRACEFUL_TIMEOUT=4 s + 1 s) ends before systemd kills
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 5
    assert service["Restart"] == "on-failure" and "2" in service["RestartPreventExitStatus"].split()
    # everything the server writes is in a writable path
    writable = [PurePosixPath(p) for p in service["ReadWritePaths"].split()]
    for path in (settings.db_path, settings.admin_auth_file, env["KTULHU_BUILD_CACHE"]):
        assert any(PurePosixPath(path).is_relative_to(w) for w in writable), path
    assert service["MemoryDenyWriteExecute"] == "yes" and service["CapabilityBoundingSet"] == ""


@pytest.mark.model
async def test_server_runs_under_memory_deny_write_execute(server_dir: Path, tmp_path: Path) -> None:
    """llama.cpp and onnxruntime under the seccomp rule the unit's MemoryDenyWriteExecute=yes sets:
    the start-up check (a child, not cached here), the model, the router and a streamed reply."""
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
    env.update({"KTULHU_ENV": "production", "JWT_SECRET": "x" * 64, "KTULHU_ANON_RATE": "0",
                "LLAMA_CLI_MAX_TOKENS": "8", "LLAMA_CLI_THREADS": "1", "KTULHU_BUILD_CACHE": str(tmp_path / "cache")})
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(MDWE), str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1",
                                 "--port", "0"], cwd=server_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = None
        with trio.fail_after(120):
            while base is None:
                if proc.poll() == 77:
                    pytest.skip(log_path.read_text().strip())
                assert proc.poll() is None, log_path.read_text()
                if match := re.search(r"listening on (http://\S+)", log_path.read_text()):
                    base = match.group(1)
                await trio.sleep(0.05)
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                while (await http.get("/readyz")).status_code != 200:
                    assert proc.poll() is None, log_path.read_text()
                    await trio.sleep(0.1)
            async with open_websocket_url(base.replace("http://", "ws://") + "/ws") as ws:
                await ws.send_message(json.dumps({"msg_type": "prompt", "request_id": "r1", "chat_id": "",
                                                  "session_id": "s", "device_hash": "d", "text": "Hello there!"}))
                frames = []
                while not (frames and frames[-1].get("done")):
                    frames.append(json.loads(await ws.get_message()))
        assert any(f.get("type") == "classifier_debug" for f in frames)  # onnxruntime ran
        assert "".join(f.get("token", "") for f in frames).strip(), frames  # llama.cpp generated
        assert frames[-1]["reason"] in ("eos", "length", "stop"), frames
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    log = log_path.read_text()
    assert proc.returncode == 0 and "Traceback" not in log, log
