"""deploy/nginx.conf, filled in, run by Debian's nginx over TLS in front of a real `ktulhu serve`.

The file under test is the shipped template itself: only its @NAME@ values are substituted (ports,
a self-signed certificate, the upstream, temporary directories), so what passes here is what an
operator copies.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from chat.wsclient import dones, tokens, ws_client
from ktulhu.http.openai import MAX_BODY as OPENAI_MAX_BODY
from ktulhu.ports import free_port
from tests.paths import REPO

TEMPLATE = REPO / "deploy" / "nginx.conf"
NGINX = Path("/usr/sbin/nginx")
BIN = Path(sys.executable).parent
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
#: Forces a 300-letter reply: it is still generating when the client leaves.
LONG_GRAMMAR = "root ::= [a-z]{300}"
JWT_SECRET = "deploy-test-secret-" + "0123456789abcdef" * 3
WAIT_S = 60.0

needs_nginx = pytest.mark.skipif(not NGINX.is_file(), reason="/usr/sbin/nginx is missing: `apt-get install -y "
                                                             "nginx` (make test installs it)")


# --- the pieces ------------------------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost that is its own CA (clients trust exactly it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def render(template: str, values: dict[str, str]) -> str:
    """The template with every @NAME@ replaced; each value must be used and none may be left over."""
    names = set(PLACEHOLDER.findall(template))
    assert names == set(values), f"placeholders {sorted(names)} vs values {sorted(values)}"
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@attrs.frozen
class Deployment:
    """A running `ktulhu serve` behind a running nginx."""

    https: str
    redirect: str
    upstream: str
    tls: ssl.SSLContext
    server_log: Path
    nginx_log: Path

    def client(self, source: str | None = None) -> httpx.AsyncClient:
        """A client of nginx over TLS; `source` picks the loopback address it connects from."""
        transport = httpx.AsyncHTTPTransport(verify=self.tls, local_address=source)
        return httpx.AsyncClient(base_url=self.https, transport=transport, timeout=WAIT_S)


DeploymentFactory = Callable[..., AbstractContextManager[Deployment]]


@pytest.fixture
def deployment(server_dir: Path, tmp_path: Path) -> DeploymentFactory:
    """`with deployment(KTULHU_TRUSTED_PROXIES=...) as d:` runs the server, then nginx in front of it."""

    @contextmanager
    def start(**env: str) -> Iterator[Deployment]:
        run = tmp_path / "run"
        for sub in ("run", "logs", "state", "tls"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        server_log = run / "logs" / "ktulhu.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
        full_env.update({"KTULHU_ENV": "production", "JWT_SECRET": JWT_SECRET, "LLAMA_CLI_THREADS": "1",
                         "KTULHU_LOG": "info,hypercorn.access=info", "KTULHU_ANON_RATE": "0", **env})
        with server_log.open("w") as out:
            server = subprocess.Popen([str(BIN / "ktulhu"), "serve", "--host", "127.0.0.1", "--port", "0"],
                                      cwd=server_dir, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        nginx = None
        try:
            def listening() -> re.Match | None:
                assert server.poll() is None, server_log.read_text()
                return re.search(r"listening on (http://127\.0\.0\.1:\d+)", server_log.read_text())

            upstream = _wait_for(listening, "ktulhu serve to listen").group(1)  # type: ignore[union-attr]
            _wait_for(lambda: httpx.get(f"{upstream}/readyz", timeout=5).status_code == 200, "/readyz")

            cert, key = self_signed_certificate(run / "tls")
            https_port, http_port = free_port(), free_port()
            conf = run / "nginx.conf"
            conf.write_text(render(TEMPLATE.read_text(), {
                "NGINX_USER": getpass.getuser(),  # only used when nginx starts as root
                "RUN_DIR": str(run / "run"),
                "LOG_DIR": str(run / "logs"),
                "STATE_DIR": str(run / "state"),
                "LISTEN_HTTP": f"127.0.0.1:{http_port}",
                "LISTEN_HTTPS": f"127.0.0.1:{https_port}",
                "SERVER_NAME": "localhost",
                "TLS_CERT": str(cert),
                "TLS_KEY": str(key),
                "UPSTREAM": upstream.removeprefix("http://"),
            }))
            command = [str(NGINX), "-p", str(run), "-c", str(conf)]
            checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
            assert checked.returncode == 0, checked.stderr
            nginx_log = run / "logs" / "nginx.out"
            with nginx_log.open("w") as out:
                nginx = subprocess.Popen([*command, "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)

            def accepting() -> bool:
                assert nginx.poll() is None, nginx_log.read_text() + (run / "logs" / "error.log").read_text()
                try:
                    socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                except OSError:
                    return False
                return True

            _wait_for(accepting, "nginx to accept")
            tls = ssl.create_default_context(cafile=str(cert))
            yield Deployment(f"https://127.0.0.1:{https_port}", f"http://127.0.0.1:{http_port}", upstream, tls,
                             server_log, run / "logs" / "error.log")
        finally:
            if nginx is not None:
                nginx.send_signal(signal.SIGTERM)
                nginx.wait(timeout=15)
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=15)
        log = server_log.read_text()
        assert server.returncode == 0 and "Traceback" not in log, log

    return start


async def _metric(d: Deployment, name: str) -> float:
    """Scraped like a Prometheus on the same host: directly, not through nginx (which is refused)."""
    async with httpx.AsyncClient(base_url=d.upstream, timeout=WAIT_S) as http:
        text = (await http.get("/metrics")).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _until_metric(d: Deployment, name: str, check: Callable[[float], bool], timeout: float = 10) -> float:
    with trio.fail_after(timeout):
        while not check(value := await _metric(d, name)):
            await trio.sleep(0.05)
    return value


async def _register(d: Deployment) -> str:
    async with d.client() as http:
        r = await http.post("/api/auth/register", json={"email": f"{uuid.uuid4().hex[:10]}@example.com",
                                                        "password": "correct horse battery"})
    assert r.status_code == 200, r.text
    return r.json()["jwt"]


async def _failed_login(d: Deployment, source: str, forged: str | None = "203.0.113.9") -> int:
    """A wrong password from `source` (with a forged X-Forwarded-For): 401, or 429 when its IP bucket is empty."""
    headers = {"X-Forwarded-For": forged} if forged else {}
    async with d.client(source) as http:
        r = await http.post("/api/auth/login", headers=headers,
                            json={"email": f"{uuid.uuid4().hex[:10]}@example.com", "password": "wrong password"})
    return r.status_code


async def _access_log_peers(d: Deployment, path: str, count: int) -> list[str]:
    """The client column of the server's first `count` access-log lines for `path` (waits for them)."""
    def peers() -> list[str]:
        lines = [line for line in d.server_log.read_text().splitlines()
                 if "hypercorn.access: " in line and f" {path} " in line]
        return [line.split("hypercorn.access: ", 1)[1].split(" ", 1)[0] for line in lines]

    await trio.to_thread.run_sync(_wait_for, lambda: len(peers()) >= count, f"{count} access-log lines")
    return peers()[:count]


BUSY = "ktulhu_engine_busy_slots"
CANCELLED = 'ktulhu_engine_generations_total{reason="cancelled"}'


# --- the file itself ---------------------------------------------------------------------------------


def test_every_value_to_fill_in_is_documented_in_the_header() -> None:
    lines = TEMPLATE.read_text().splitlines()
    header = "\n".join(line for line in lines if line.startswith("#"))
    body = "\n".join(line for line in lines if not line.startswith("#"))
    assert set(PLACEHOLDER.findall(body)) == set(PLACEHOLDER.findall(header))
    # the body limit matches the largest the server accepts
    size = re.search(r"client_max_body_size (\d+)m;", body)
    assert size and int(size.group(1)) << 20 == OPENAI_MAX_BODY


@needs_nginx
def test_unfilled_template_is_refused_by_nginx(tmp_path: Path) -> None:
    """An operator who forgets a value gets an error at `nginx -t`, not a server on example values."""
    result = subprocess.run([str(NGINX), "-p", str(tmp_path), "-c", str(TEMPLATE), "-t"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


# --- through the proxy -------------------------------------------------------------------------------


@needs_nginx
@pytest.mark.model
async def test_chat_stream_and_cancel_through_tls(deployment: DeploymentFactory) -> None:
    with deployment(LLAMA_CLI_MAX_TOKENS="400", KTULHU_TRUSTED_PROXIES="127.0.0.1/32") as d:
        async with d.client() as http:
            assert (await http.get("/healthz")).json() == {"status": "alive"}
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.headers["strict-transport-security"]
        async with httpx.AsyncClient() as plain:
            moved = await plain.get(d.redirect + "/healthz")
        assert moved.status_code == 301 and moved.headers["location"].startswith("https://")

        # (a) a prompt streams tokens and ends with `done`; the browser's Origin is this same site
        url = d.https.replace("https://", "wss://") + "/ws"
        async with ws_client(url, ssl_context=d.tls, extra_headers=[("Origin", d.https)]) as ws:
            assert (await ws.register())["event"] == "registered"
            frames = await ws.ask("Say hello.")
            assert tokens(frames).strip() and len(dones(frames)) == 1
            assert frames[-1]["reason"] in ("eos", "length", "stop")

            # (c) cancel a long reply through the proxy: `done` says cancelled, the slot is freed
            cancelled_before = await _metric(d, CANCELLED)
            rid = await ws.prompt("Write a very long story about a dragon and a knight, with many chapters.")
            while "token" not in await ws.recv():
                pass
            await ws.send({"msg_type": "cancel", "request_id": rid, "chat_id": "", "session_id": "s1",
                           "device_hash": "dev1", "text": ""})
            frames = await ws.until_done(rid)
            ack = next(f for f in frames if f.get("event") == "cancel_ack")
            assert ack["cancelled"] == [rid]
            assert frames[-1]["reason"] == "cancelled" and len(dones(frames)) == 1
            await _until_metric(d, BUSY, lambda busy: busy == 0)
            await _until_metric(d, CANCELLED, lambda n: n == cancelled_before + 1)


@needs_nginx
@pytest.mark.model
async def test_sse_streams_through_tls_and_a_client_leaving_cancels(deployment: DeploymentFactory) -> None:
    with deployment(LLAMA_CLI_MAX_TOKENS="24") as d:
        token = await _register(d)
        auth = {"Authorization": f"Bearer {token}"}
        # (b) a streamed completion arrives in pieces, each `data:` event on its own, then [DONE]
        payload = {"messages": [{"role": "user", "content": "Count to ten."}], "stream": True, "max_tokens": 24}
        reads: list[bytes] = []
        async with d.client() as http:
            async with http.stream("POST", "/v1/chat/completions", json=payload, headers=auth) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                async for chunk in response.aiter_raw():
                    reads.append(chunk)
        events = [line[6:] for line in b"".join(reads).decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1] if json.loads(e)["choices"]]
        assert len(deltas) > 2 and "".join(x.get("content") or "" for x in deltas).strip()
        assert sum(b"data: " in chunk for chunk in reads) > 1  # not one buffered blob

        # Proof that nothing waits for the end: a client that leaves after four events cancels a
        # generation that was still running (a buffered reply would have finished first).
        cancelled_before = await _metric(d, CANCELLED)
        long = {"messages": [{"role": "user", "content": "Write letters."}], "stream": True, "max_tokens": 400,
                "grammar": LONG_GRAMMAR}
        got = 0
        async with d.client() as http:
            async with http.stream("POST", "/v1/chat/completions", json=long, headers=auth) as response:
                async for line in response.aiter_lines():
                    got += line.startswith("data: ")
                    assert "[DONE]" not in line
                    if got == 4:
                        break
        await _until_metric(d, CANCELLED, lambda n: n == cancelled_before + 1)
        await _until_metric(d, BUSY, lambda busy: busy == 0)

        # bodies over the server's largest limit stop at nginx
        async with d.client() as http:
            big = await http.post("/v1/chat/completions", content=b"x" * (OPENAI_MAX_BODY + 1), headers=auth)
        assert big.status_code == 413


@needs_nginx
@pytest.mark.model
async def test_trusted_proxy_passes_the_real_client_address(deployment: DeploymentFactory) -> None:
    """(d) With KTULHU_TRUSTED_PROXIES=127.0.0.1/32 (nginx's address) the server keys sign-in rate
    limits and its access log by the client behind nginx (127.0.0.2), never by a forged header."""
    with deployment(KTULHU_TRUSTED_PROXIES="127.0.0.1/32", KTULHU_LOGIN_RATE="1") as d:
        assert await _failed_login(d, "127.0.0.2") == 401
        assert await _failed_login(d, "127.0.0.2") == 429  # 127.0.0.2's bucket is empty ...
        # ... and 127.0.0.1 has its own (a client on the proxy host is a trusted proxy itself, so
        # what it sends in X-Forwarded-For would be believed: it sends none here)
        assert await _failed_login(d, "127.0.0.1", forged=None) == 401
        peers = await _access_log_peers(d, "/api/auth/login", 3)
        assert peers == ["127.0.0.2:0", "127.0.0.2:0", "127.0.0.1:0"]
        assert "203.0.113.9" not in d.server_log.read_text()


@needs_nginx
@pytest.mark.model
async def test_without_trusted_proxies_every_client_is_nginx(deployment: DeploymentFactory) -> None:
    """Unset, the headers are never read: the server sees nginx (127.0.0.1), and X-Forwarded-For,
    forged or real, moves no one into another rate-limit bucket."""
    with deployment(KTULHU_LOGIN_RATE="1") as d:
        assert await _failed_login(d, "127.0.0.2") == 401
        assert await _failed_login(d, "127.0.0.1") == 429  # the same bucket: nginx's address
        peers = await _access_log_peers(d, "/api/auth/login", 2)
        # nginx's own connections (an ephemeral port, never the :0 of a forwarded address)
        assert all(re.fullmatch(r"127\.0\.0\.1:[1-9]\d*", peer) for peer in peers), peers
        assert "203.0.113.9" not in d.server_log.read_text()
