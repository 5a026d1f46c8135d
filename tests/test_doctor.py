"""`ktulhu doctor`: one line per check, the fix when it is not ok, the same report in the server."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import httpx

from ktulhu import doctor, native_build
from ktulhu.settings import load_settings
from ktulhu.store import Store

from admin.helpers import basic, write_credentials
from test_serve import BIN, spawn

NAMES = ["cpu", "build", "template", "store", "port", "mode", "model", "router"]


def run_doctor(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    proc = spawn([str(BIN / "ktulhu"), "doctor", *args], root, **env)
    out, _ = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_a_healthy_machine_passes_with_the_gpu_line(server_dir: Path, free_port: int) -> None:
    result = run_doctor(server_dir, "--json", KTULHU_PORT=str(free_port), KTULHU_HOST="127.0.0.1")
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert list(statuses) == NAMES
    assert statuses == {**dict.fromkeys(NAMES, "ok"), "mode": "warn"}  # development mode is a warning
    model = next(c for c in report["checks"] if c["name"] == "model")
    assert "0/31 layers on the GPU" in model["summary"] and "decodes a batch" in model["summary"]
    build = next(c for c in report["checks"] if c["name"] == "build")
    assert "AMX kernels off" in build["summary"] and build["detail"]["gpu_offload"] is False
    text = run_doctor(server_dir, KTULHU_PORT=str(free_port), KTULHU_HOST="127.0.0.1")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert [line.split()[:2] for line in lines if not line.startswith(" ")] == [
        [statuses[name], name] for name in NAMES]
    assert any("fix: before exposing the server set KTULHU_ENV=production" in line for line in lines)


def test_each_problem_fails_its_line_with_the_fix(server_dir: Path) -> None:
    (server_dir / "bad.jinja").write_text("{% for m in messages %}{{ m.content }")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_doctor(server_dir, "--json", KTULHU_HOST="127.0.0.1", KTULHU_PORT=str(port),
                            CHAT_TEMPLATE_PATH="bad.jinja", LLAMA_CLI_MODEL="models/missing.gguf",
                            KTULHU_ENV="production", JWT_SECRET="x" * 40)
    assert result.returncode == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert json.loads(result.stdout)["status"] == "fail"
    assert checks["port"]["status"] == "fail" and "in use" in checks["port"]["summary"]
    assert checks["template"]["status"] == "fail" and "does not compile" in checks["template"]["summary"]
    assert checks["model"]["status"] == "fail" and "ktulhu models pull" in checks["model"]["fix"]
    assert checks["mode"]["status"] == "ok"


async def test_a_store_held_by_another_process_is_a_warning(server_dir: Path) -> None:
    settings = load_settings(environ={}, root=server_dir)
    holder = subprocess.Popen([str(BIN / "python"), "-c", "import sys, time; from ktulhu.store import Store; "
                               f"s = Store.open({str(settings.db_dir)!r}); print('open', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        check = doctor.store_check(settings, live=False)
        assert check.status == "warn" and "open in another process" in check.summary
        assert doctor.store_check(settings, live=True).status == "ok"  # the server asking about itself
    finally:
        holder.communicate("", timeout=30)
    assert doctor.store_check(settings, live=False).status == "ok"
    Store.open(settings.db_dir).close()


def test_a_build_for_another_cpu_or_with_amx_fails_and_openmp_warns() -> None:
    marker = {**native_build.read_marker(), "cpu": ["sse", "sse2"]}
    info = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 |"
    other = doctor.build_check(marker, info, False)
    assert other.status == "fail" and "another CPU" in other.summary and "make setup" in other.fix
    amx = doctor.build_check(native_build.read_marker(), info + " AMX_INT8 = 1 |", False)
    assert amx.status == "fail" and "20824" in amx.fix
    openmp = doctor.build_check(native_build.read_marker(), info + " OPENMP = 1 |", False)
    assert openmp.status == "warn" and "2.5x" in openmp.fix and "make setup" in openmp.fix
    assert doctor.build_check(native_build.read_marker(), info, False).status == "ok"
    unknown = doctor.build_check(None, info, False)  # a pip-installed wheel of unknown origin
    assert unknown.status == "warn" and "make setup" in unknown.fix


def test_a_cpu_without_avx2_is_a_warning() -> None:
    assert doctor.cpu_check(["sse", "sse2", "sse4_2"]).status == "warn"
    assert doctor.cpu_check(["avx", "avx2", "fma"]).status == "ok"


async def test_the_server_shows_the_report(live_server) -> None:
    async with live_server() as server:
        write_credentials(server.root)
        async with httpx.AsyncClient(base_url=server.url) as client:
            ready = (await client.get("/readyz")).json()
            assert ready["status"] == "ready"
            assert ready["doctor"] == {"cpu": "ok", "build": "ok", "template": "ok", "store": "ok",
                                       "mode": "warn", "model": "ok", "router": "ok"}
            assert (await client.get("/internal/admin/doctor")).status_code == 401
            full = (await client.get("/internal/admin/doctor", headers=basic())).json()
            assert full["status"] == "warn"
            assert {c["name"] for c in full["checks"]} == set(ready["doctor"])
            assert all("summary" in c and "fix" in c for c in full["checks"])
