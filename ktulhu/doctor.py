"""`ktulhu doctor`: can this machine serve this configuration, and if not, what to do.

Each check is one line, ok / warn / fail, with the fix when it is not ok. The same report (as JSON)
is what the running server shows: check statuses in `/readyz`, the whole report on the admin
overview. The model and router checks are the start-up proofs of `ktulhu.preflight` (cached per
model, build and CPU), so a doctor that says ok means the server will start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from . import native_build, preflight
from .settings import DEFAULT_TEMPLATE_FILE, Settings

__all__ = ["Check", "LiveDoctor", "Report", "diagnose", "static_checks"]

OK, WARN, FAIL = "ok", "warn", "fail"
_RANK = {OK: 0, WARN: 1, FAIL: 2}


@attrs.frozen
class Check:
    name: str
    status: str  # ok | warn | fail
    summary: str
    fix: str = ""
    detail: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class Report:
    checks: tuple[Check, ...]

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=_RANK.__getitem__, default=OK)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [attrs.asdict(c) for c in self.checks]}

    def statuses(self) -> dict[str, str]:
        return {c.name: c.status for c in self.checks}

    def lines(self) -> list[str]:
        width = max((len(c.name) for c in self.checks), default=0)
        out = []
        for check in self.checks:
            out.append(f"{check.status:<4}  {check.name:<{width}}  {check.summary}")
            if check.fix:
                out.append(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
        return out


# --- static checks: cheap, no child process --------------------------------------------------------


def cpu_check(flags: list[str] | None = None) -> Check:
    flags = native_build.cpu_isa_flags() if flags is None else flags
    have = set(flags)
    features = [name for name in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
                                  "avx_vnni", "amx_tile", "amx_int8", "amx_bf16") if name in have]
    amx = "amx_tile" in have
    summary = f"{os.uname().machine}, {os.cpu_count()} cores: {' '.join(features) or 'no SIMD extensions found'}"
    if amx:
        summary += " (AMX present: its llama.cpp kernels crash, so `make setup` builds without them)"
    if "avx2" not in have and os.uname().machine == "x86_64":
        return Check("cpu", WARN, summary, "no AVX2: generation runs, but several times slower",
                     {"flags": flags})
    return Check("cpu", OK, summary, detail={"flags": flags, "amx": amx})


def installed_build() -> tuple[dict | None, str, bool]:
    """(build marker, llama.cpp system info, GPU offload available) of this environment."""
    import llama_cpp

    return (native_build.read_marker(), llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            bool(llama_cpp.llama_supports_gpu_offload()))


def build_check(marker: dict | None, system_info: str, gpu_offload: bool) -> Check:
    """Is the installed llama.cpp the one `make setup` built for this CPU, without AMX kernels or OpenMP?"""
    detail = {"system_info": system_info, "gpu_offload": gpu_offload, "build": marker and marker.get("key"),
              "variant": marker and marker.get("gpu")}
    summary = (f"llama-cpp-python {native_build.LLAMA_CPP_PYTHON_VERSION}, "
               f"{(marker or {}).get('gpu', 'unknown')} variant, GPU offload {'available' if gpu_offload else 'not built'}")
    if "AMX_INT8 = 1" in system_info or "AMX = 1" in system_info:
        return Check("build", FAIL, summary + ", AMX kernels compiled in",
                     "they crash on the first batched decode (llama.cpp issue 20824): run `make setup`", detail)
    if "OPENMP = 1" in system_info:
        return Check("build", WARN, summary + ", OpenMP threads",
                     "a second llama.cpp context computing on another thread (embeddings, an engine reload) makes "
                     "every later decode step about 2.5x slower: run `make setup` (built without OpenMP)", detail)
    if marker is None:
        return Check("build", WARN, summary + ", not built by `make setup`",
                     "it may be a wheel compiled for another CPU: run `make setup`", detail)
    if not native_build.fits_this_cpu(marker):
        return Check("build", FAIL, summary + ", compiled for another CPU",
                     "run `make setup` to build for this one (the cache keeps one build per CPU)", detail)
    return Check("build", OK, summary + ", AMX kernels off, no OpenMP, built for this CPU", detail=detail)


def template_check(settings: Settings) -> Check:
    if settings.remote:
        return Check("template", OK, "remote mode: each inference worker applies its own chat template")
    if settings.chat_template_path == "gguf":
        return Check("template", OK, "the template embedded in the GGUF (CHAT_TEMPLATE_PATH=gguf)")
    if settings.chat_template_path == "auto":
        from .model_files import describe
        from .model_pull import PullError

        try:
            embedded = describe(settings.model_file).template == "gguf"
        except (PullError, OSError):
            embedded = False  # the model check reports an unreadable file
        if embedded:
            return Check("template", OK, "the model's own template, embedded in the GGUF (CHAT_TEMPLATE_PATH=auto)")
    path = settings.path(DEFAULT_TEMPLATE_FILE if settings.chat_template_path == "auto" else settings.chat_template_path)
    if not path.is_file():
        return Check("template", FAIL, f"no chat template at {path}",
                     "point CHAT_TEMPLATE_PATH at a Jinja template, or set it to `gguf`")
    from .engine.prompt import ChatMessage, PromptBuilder, PromptError

    try:
        builder = PromptBuilder.from_file(path, lambda text, special: list(text.encode()))
        builder.tokens([ChatMessage("system", "s"), ChatMessage("user", "u")])
    except (PromptError, OSError, UnicodeDecodeError) as error:
        return Check("template", FAIL, f"{path}: {error}", "fix the template or set CHAT_TEMPLATE_PATH=gguf")
    return Check("template", OK, f"{path} renders")


def store_check(settings: Settings, *, live: bool) -> Check:
    """The store directory is writable and, outside the server, not held by another process; a
    PostgreSQL store answers (checked outside the server: the server's own store is open)."""
    if settings.store_url:
        return _postgres_store_check(settings.store_url, live=live)
    path = settings.db_dir
    probe = path if path.exists() else path.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return Check("store", FAIL, f"{path} is not writable by this user",
                     "create it and give this user write access, or set KTULHU_DB_PATH")
    if live or not (path / "LOCK").is_file():
        return Check("store", OK, f"{path} writable" + ("" if path.exists() else " (created at first start)"))
    with (path / "LOCK").open("a") as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return Check("store", WARN, f"{path} is open in another process (a running server?)",
                         "one process per embedded store: stop the other server, or run several front-ends on "
                         "a shared store")
        fcntl.lockf(lock, fcntl.LOCK_UN)
    return Check("store", OK, f"{path} writable, not in use")


def _postgres_store_check(url: str, *, live: bool) -> Check:
    from .store.location import PgUrl

    shown = PgUrl.parse(url)
    if live:
        return Check("store", OK, f"{shown} (shared PostgreSQL store, open)")
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute("SELECT to_regclass('ktulhu_schema') IS NOT NULL").fetchone()
    except psycopg.Error as error:
        return Check("store", FAIL, f"{shown} cannot be reached: {shown.redact(' '.join(str(error).split()))[:300]}",
                     "start the database server, check host, port, database, user and password in KTULHU_STORE")
    created = "" if row and row[0] else " (tables created at first start)"
    return Check("store", OK, f"{shown} answers{created}")


def port_check(settings: Settings) -> Check:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((settings.host.strip("[]"), settings.port))
        except OSError as error:
            reason = "in use" if error.errno == errno.EADDRINUSE else error.strerror
            return Check("port", FAIL, f"{settings.host}:{settings.port} {reason}",
                         "stop what listens there or set KTULHU_PORT")
    return Check("port", OK, f"{settings.host}:{settings.port} free")


def mode_check(settings: Settings) -> Check:
    if settings.env == "production":
        return Check("mode", OK, "production (JWT_SECRET set)")
    return Check("mode", WARN, "development: a generated JWT secret, development defaults",
                 "before exposing the server set KTULHU_ENV=production and JWT_SECRET")


def static_checks(settings: Settings, *, live: bool) -> list[Check]:
    """Everything that needs no child process; `live` = asked by the running server itself."""
    checks = [cpu_check(), build_check(*installed_build()), template_check(settings), store_check(settings, live=live), mode_check(settings)]
    if not live:
        checks.insert(4, port_check(settings))
    return checks


# --- the proofs -----------------------------------------------------------------------------------


def model_check(settings: Settings, proof: preflight.Proof | None, error: str | None) -> Check:
    path = settings.model_file
    if error is not None:
        return Check("model", FAIL, error.split("; ", 1)[0], error.split("; ", 1)[-1] if "; " in error else "")
    assert proof is not None
    detail = proof.detail
    layers = f"{detail['layers_on_gpu']}/{detail['layers_total']} layers on the GPU"
    summary = f"{path.name} ({path.stat().st_size / 2**20:.0f} MiB): loads and decodes a batch here, {layers}"
    if not detail["gpu_offload"] and preflight.gpu_layers_requested(settings):
        return Check("model", WARN, summary, "LLAMA_CLI_NGL asks for GPU layers but this build has no GPU "
                     "backend: `make setup GPU=cuda`", detail)
    return Check("model", OK, summary, detail=detail)


def router_check(settings: Settings, proof: preflight.Proof | None, error: str | None) -> Check:
    directory = settings.router_dir
    if error is not None:
        return Check("router", FAIL, error.split("; ", 1)[0], error.split("; ", 1)[-1] if "; " in error else "")
    if proof is None:
        return Check("router", WARN, f"no router model at {directory}: every message gets the default route",
                     "build it with `make router-model` or set INTENT_ROUTER_DIR")
    return Check("router", OK, f"{directory}: onnxruntime classifies on {proof.detail['device']}",
                 detail=proof.detail)


async def workers_check(settings: Settings) -> Check:
    """Remote mode: every worker in KTULHU_WORKERS answers its health check (ok), some do (warn), none (fail)."""
    problems: dict[str, str] = {}
    limit = settings.worker_health_timeout

    async def probe(client: httpx.AsyncClient, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status = None
        with trio.move_on_after(limit):
            try:
                for path in ("/health", "/v1/models"):  # /v1/models for servers without /health (Ollama)
                    status = (await client.get(url + path, headers=headers)).status_code
                    if status != 404:
                        break
            except (httpx.HTTPError, OSError) as error:
                problems[url] = f"{type(error).__name__}: {error}".rstrip(": ")
                return
        if status != 200:
            problems[url] = "no answer in time" if status is None else f"HTTP {status}"

    async with httpx.AsyncClient(timeout=limit, trust_env=False) as client, trio.open_nursery() as nursery:
        for spec in settings.workers:
            nursery.start_soon(probe, client, spec.url, spec.key)
    total = len(settings.workers)
    up = total - len(problems)
    summary = f"{up}/{total} inference workers answer" + "".join(f"; {url}: {why}" for url, why in problems.items())
    detail = {"workers": [spec.url for spec in settings.workers], "down": problems}
    if not problems:
        return Check("workers", OK, summary, detail=detail)
    fix = "start the workers (e.g. llama-server --parallel N) or correct KTULHU_WORKERS"
    return Check("workers", WARN if up else FAIL, summary, fix, detail)


async def _proof(prove: Callable[[], Awaitable[preflight.Proof]]) -> tuple[preflight.Proof | None, str | None]:
    try:
        return await prove(), None
    except (preflight.PreflightFailed, OSError) as error:
        return None, str(error)


async def diagnose(settings: Settings, *, live: bool = False) -> Report:
    """The whole report; the model and router proofs run in child processes (or come from the cache)."""
    checks = await trio.to_thread.run_sync(lambda: static_checks(settings, live=live))
    timeout = settings.preflight_timeout
    if settings.remote:  # no model here: the workers are what must answer
        checks.append(await workers_check(settings))
    elif settings.model_file.is_file():
        model = await _proof(lambda: preflight.prove_model(settings.model_file, settings.n_gpu_layers,
                                                           timeout=timeout))
        checks.append(await trio.to_thread.run_sync(lambda: model_check(settings, *model)))
    else:
        checks.append(Check("model", FAIL, f"no GGUF at {settings.model_file}",
                            "run `ktulhu models pull` or set LLAMA_CLI_MODEL"))
    router_dir: Path = settings.router_dir
    if (router_dir / "model.onnx").is_file():
        router = await _proof(lambda: preflight.prove_router(router_dir, settings.router_device, timeout=timeout))
    else:
        router = (None, None)
    checks.append(router_check(settings, *router))
    return Report(tuple(checks))


@attrs.define
class LiveDoctor:
    """The running server's own report, made at most once per `max_age` seconds (one at a time)."""

    settings: Settings
    max_age: float = 60.0
    _report: Report | None = None
    _made_at: float = float("-inf")
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def report(self) -> Report:
        async with self._lock:
            if self._report is None or trio.current_time() - self._made_at > self.max_age:
                self._report = await diagnose(self.settings, live=True)
                self._made_at = trio.current_time()
            return self._report
