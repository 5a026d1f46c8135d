"""Prove, before serving, that this machine can run the configured model and router.

Native code that crashes takes the whole process with it and says nothing (ggml's AMX kernels
segfault on the first batched decode; a wheel built for another CPU dies with SIGILL). So each is
first exercised in a short-lived child process: the model is loaded and decodes one batch and two
single tokens, the router's onnxruntime session classifies one message. A child that dies by a signal,
fails or hangs becomes one line naming the cause and the fix; the server then stops before `/readyz`
can turn green. A passing proof is cached per model file content, native build and CPU, so later
starts pay nothing.

Run as a child: `python -m ktulhu.preflight model PATH NGL` or `... router DIR DEVICE`; it prints one
JSON line on stdout and marks its stage on stderr.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from . import native_build
from .settings import Settings

__all__ = ["PreflightFailed", "Proof", "check_model", "check_router", "gpu_layers_requested", "prove_model",
           "prove_router"]

log = logging.getLogger("ktulhu.preflight")

#: Tokens decoded at once: more than the 8 that crash the AMX kernels, in one batch.
BATCH_TOKENS = 32
STAGE_PREFIX = "ktulhu-preflight stage="
_REBUILD = ("rebuild llama.cpp for this CPU with `make setup` (native build, AMX kernels off), "
            "then run `ktulhu doctor`")
_FIX = {
    "model": _REBUILD,
    "router": "reinstall onnxruntime (`make setup`) or point INTENT_ROUTER_DIR at a valid export, "
              "then run `ktulhu doctor`",
}


class PreflightFailed(Exception):
    """This machine cannot run a component; `str()` is the one line an operator needs."""


@attrs.frozen
class Proof:
    """What a passing check found (`detail`) and whether it came from the cache."""

    kind: str
    detail: dict[str, Any]
    cached: bool


def content_fingerprint(path: Path) -> str:
    """Size plus the hash of the first and last MiB: identifies a model file without reading gigabytes."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        digest.update(file.read(1 << 20))
        if size > 2 << 20:
            file.seek(-(1 << 20), os.SEEK_END)
            digest.update(file.read())
    return digest.hexdigest()


def build_identity() -> dict[str, Any]:
    """The native libraries in use (llama.cpp's and onnxruntime's), by version, file size and mtime."""
    identity: dict[str, Any] = {"cpu": native_build.cpu_isa_flags()}
    for package in ("llama_cpp", "onnxruntime"):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            identity[package] = None
            continue
        root = Path(spec.origin).parent
        identity[package] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                   for p in root.rglob("*.so*") if p.is_file())
    return identity


def cache_dir() -> Path:
    return native_build.cache_root() / "preflight"


async def prove_model(model: Path, n_gpu_layers: int, *, timeout: float,
                      cache: Path | None = None, command: list[str] | None = None) -> Proof:
    """Load `model` and decode a batch in a child process (or find a cached proof)."""
    def key() -> dict[str, Any]:
        return {"model": content_fingerprint(model), "ngl": n_gpu_layers}

    return await _prove("model", key, command or _child("model", str(model), str(n_gpu_layers)),
                        timeout=timeout, cache=cache, subject=str(model))


async def prove_router(directory: Path, device: str, *, timeout: float,
                       cache: Path | None = None, command: list[str] | None = None) -> Proof:
    """Load the router export in `directory` and classify one message in a child process."""
    def key() -> dict[str, Any]:
        return {"router": sorted((p.name, content_fingerprint(p)) for p in directory.iterdir() if p.is_file()),
                "device": device}

    return await _prove("router", key, command or _child("router", str(directory), device),
                        timeout=timeout, cache=cache, subject=str(directory))


async def check_model(settings: Settings) -> Proof:
    """The configured model's check, logged with the one GPU line operators need."""
    proof = await prove_model(settings.model_file, settings.n_gpu_layers, timeout=settings.preflight_timeout)
    detail = proof.detail
    log.info("model check passed%s: batch decode ok, %s/%s layers on the GPU", _when(proof),
             detail["layers_on_gpu"], detail["layers_total"])
    if not detail["gpu_offload"] and gpu_layers_requested(settings):
        log.warning("LLAMA_CLI_NGL=%d asks for GPU layers, but this llama.cpp build has no GPU backend: the "
                    "model runs on the CPU; build the GPU variant with `make setup GPU=cuda`", settings.n_gpu_layers)
    return proof


async def check_router(settings: Settings) -> Proof:
    """The configured router's check, logged."""
    proof = await prove_router(settings.router_dir, settings.router_device, timeout=settings.preflight_timeout)
    log.info("router check passed%s: onnxruntime classifies on %s", _when(proof), proof.detail["device"])
    return proof


def gpu_layers_requested(settings: Settings) -> bool:
    """Did the operator ask for GPU layers? (The -1 in the shipped config/llamacpp.env is the
    original's default, not a request: a CPU-only build must not warn about it on every start.)"""
    source = settings.sources.get("LLAMA_CLI_NGL", "default")
    return settings.n_gpu_layers > 0 or (settings.n_gpu_layers < 0 and source in ("environment", ".env"))


def _when(proof: Proof) -> str:
    return " (cached)" if proof.cached else f" in {proof.detail.get('seconds', 0)} s"


def _child(*args: str) -> list[str]:
    return [sys.executable, "-m", "ktulhu.preflight", *args]


async def _prove(kind: str, key: Callable[[], dict[str, Any]], command: list[str], *, timeout: float,
                 cache: Path | None, subject: str) -> Proof:
    cache = cache_dir() if cache is None else cache
    # hashing the model's ends and listing the native libraries is file I/O: off the trio thread
    cached = await trio.to_thread.run_sync(_cache_file, kind, key, cache)
    known = _PROVEN.get(cached)
    if known is None:
        known = await trio.to_thread.run_sync(_read_proof, cached)
    if known is not None:
        _PROVEN[cached] = known
        return Proof(kind, known, cached=True)
    started = time.monotonic()
    with trio.move_on_after(timeout) as scope:
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False,
                                        stdin=subprocess.DEVNULL, deliver_cancel=_kill)
    if scope.cancelled_caught:
        raise PreflightFailed(f"the {kind} check of {subject} did not finish in {timeout:g} s "
                              f"(KTULHU_PREFLIGHT_TIMEOUT); {_FIX[kind]}")
    detail = _verdict(kind, subject, result)
    detail["seconds"] = round(time.monotonic() - started, 2)
    _PROVEN[cached] = detail
    await trio.to_thread.run_sync(_write_proof, cached, detail)
    return Proof(kind, detail, cached=False)


#: Proofs this process has made or read, by cache file: a running server asking again (its doctor
#: report) never starts another child, even where the cache directory cannot be written.
_PROVEN: dict[Path, dict[str, Any]] = {}


def _cache_file(kind: str, key: Callable[[], dict[str, Any]], cache: Path) -> Path:
    digest = hashlib.sha256(json.dumps({"kind": kind, **key(), "build": build_identity()},
                                       sort_keys=True).encode()).hexdigest()[:32]
    return cache / f"{kind}-{digest}.json"


def _read_proof(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_proof(path: Path, detail: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_suffix(f".{os.getpid()}.tmp")
        staged.write_text(json.dumps(detail))
        os.replace(staged, path)
    except OSError as error:  # an unwritable cache costs one child per process start, nothing else
        log.debug("preflight cache not written: %s", error)


async def _kill(process: trio.Process) -> None:
    """A check that hangs is stuck in native code: no grace period, it holds nothing worth saving."""
    process.kill()


def _verdict(kind: str, subject: str, result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The child's report, or `PreflightFailed` saying how it died and what to do."""
    stderr = result.stderr.decode("utf-8", "replace").splitlines()
    stages = [line.removeprefix(STAGE_PREFIX) for line in stderr if line.startswith(STAGE_PREFIX)]
    stage = stages[-1] if stages else "start"
    report: dict[str, Any] = {}
    for line in reversed(result.stdout.decode("utf-8", "replace").splitlines()):
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                continue
            break
    if result.returncode == 0 and report.get("ok"):
        report.pop("ok")
        return report
    if result.returncode < 0:
        name = _signal_name(-result.returncode)
        raise PreflightFailed(f"the {kind} check of {subject} crashed with {name} during '{stage}': this "
                              f"machine's native build cannot run it; {_FIX[kind]}")
    reason = report.get("error") or next((line for line in reversed(stderr) if line.strip()
                                          and not line.startswith(STAGE_PREFIX)), "no output")
    fix = _failure_fix(kind, reason)
    raise PreflightFailed(f"the {kind} check of {subject} failed during '{stage}' (exit {result.returncode}): "
                          f"{_shortened(reason)}{'; ' + fix if fix else ''}")


def _shortened(text: str, limit: int = 400) -> str:
    """One line of at most `limit` characters; the tail (where the fix usually is) is kept."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit // 2]} … {text[-limit // 2:]}"


def _failure_fix(kind: str, reason: str) -> str:
    if kind == "router":
        return "" if "INTENT_ROUTER_DIR" in reason else _FIX["router"]  # most load errors name their own fix
    if "load" in reason.lower():
        return "check LLAMA_CLI_MODEL points at a complete GGUF (`ktulhu models pull` for the default)"
    return _REBUILD


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# --- the child -------------------------------------------------------------------------------------


def _stage(name: str) -> None:
    print(f"{STAGE_PREFIX}{name}", file=sys.stderr, flush=True)


def _check_model(path: str, n_gpu_layers: int) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    _stage("load")
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=BATCH_TOKENS, n_ubatch=BATCH_TOKENS,
                          n_gpu_layers=n_gpu_layers, verbose=False)
    text = "Ktulhu checks that this machine can decode a batch of tokens before it serves anyone. " * 4
    tokens = llm.tokenize(text.encode(), add_bos=True)[: BATCH_TOKENS + 2]
    if len(tokens) < BATCH_TOKENS + 2:
        raise RuntimeError(f"the tokenizer produced {len(tokens)} tokens for a {len(text)}-character text")
    _stage(f"decode a batch of {BATCH_TOKENS} tokens")
    llm.eval(tokens[:BATCH_TOKENS])
    _stage("decode single tokens")
    llm.eval(tokens[BATCH_TOKENS:BATCH_TOKENS + 1])
    llm.eval(tokens[BATCH_TOKENS + 1:])
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    if not np.isfinite(logits).all():
        raise RuntimeError("the decoded logits are not finite: the native kernels compute wrong results here")
    n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    wanted = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    return {
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "gpu_offload": offload,
        "n_layer": n_layer,
        # llama.cpp offloads the repeating layers plus the output layer: n_layer + 1 in all
        "layers_on_gpu": min(wanted, n_layer + 1) if offload else 0,
        "layers_total": n_layer + 1,
    }


def _check_router(directory: str, device: str) -> dict[str, Any]:
    from .router.model import IntentModel

    _stage("load")
    model = IntentModel.load(Path(directory), device=device)
    _stage("classify")
    model.predict(["hello, can you help me plan a trip?"])
    return {"device": model.device, "heads": sorted(model.heads)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 3 and args[0] == "model":
            report = _check_model(args[1], int(args[2]))
        elif len(args) == 3 and args[0] == "router":
            report = _check_router(args[1], args[2])
        else:
            print("usage: python -m ktulhu.preflight model PATH NGL | router DIR DEVICE", file=sys.stderr)
            return 2
    except Exception as error:  # noqa: BLE001 - reported to the parent as the failure's reason
        print(json.dumps({"ok": False, "error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1
    print(json.dumps({"ok": True, **report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
