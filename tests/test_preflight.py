"""The start-up proof: the model decodes a batch and the router classifies, in child processes,
before anything serves; a crash, failure or hang there is one line that names the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from ktulhu import preflight
from ktulhu.preflight import BATCH_TOKENS, STAGE_PREFIX, PreflightFailed, prove_model, prove_router
from tests.paths import REPO

ROUTER_DIR = REPO / "models" / "intent_router"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_the_model_decodes_a_batch_on_this_machine(default_model: Path, tmp_path: Path) -> None:
    """Fails where the native build crashes on a batched decode (the AMX kernels on Sapphire Rapids)."""
    proof = await prove_model(default_model, -1, timeout=120, cache=tmp_path)
    assert proof.cached is False
    assert proof.detail["layers_total"] == proof.detail["n_layer"] + 1 == 31
    assert "AMX_INT8 = 1" not in proof.detail["system_info"]
    # proven once per model file, build and CPU: the second start spawns nothing
    refused = _python("raise SystemExit(9)")
    again = await prove_model(default_model, -1, timeout=120, cache=tmp_path, command=refused)
    assert again.cached is True and again.detail == proof.detail
    # another layer count is another proof
    with pytest.raises(PreflightFailed, match="exit 9"):
        await prove_model(default_model, 0, timeout=120, cache=tmp_path, command=refused)


async def test_a_crashing_child_is_one_line_with_the_stage_and_the_fix(default_model: Path, tmp_path: Path) -> None:
    crash = _python(f"import os, sys; print({STAGE_PREFIX + 'decode a batch of 32 tokens'!r}, file=sys.stderr, "
                    "flush=True); os.kill(os.getpid(), 11)")
    with pytest.raises(PreflightFailed) as caught:
        await prove_model(default_model, -1, timeout=60, cache=tmp_path, command=crash)
    message = str(caught.value)
    assert "\n" not in message
    assert "crashed with SIGSEGV during 'decode a batch of 32 tokens'" in message
    assert "make setup" in message and "AMX" in message and str(default_model) in message
    assert list(tmp_path.iterdir()) == []  # a failure is never cached


async def test_a_failing_load_names_the_model_setting(tmp_path: Path) -> None:
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(PreflightFailed) as caught:
        await prove_model(garbage, 0, timeout=120, cache=tmp_path / "cache")
    message = str(caught.value)
    assert "failed during 'load'" in message and "LLAMA_CLI_MODEL" in message and "\n" not in message


async def test_a_hanging_child_is_stopped_at_the_timeout(default_model: Path, tmp_path: Path,
                                                         autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(PreflightFailed, match="did not finish in 30 s .KTULHU_PREFLIGHT_TIMEOUT."):
        await prove_model(default_model, -1, timeout=30, cache=tmp_path, command=_python("import time; time.sleep(600)"))


async def test_the_router_session_is_proven_and_a_broken_export_refused(tmp_path: Path) -> None:
    proof = await prove_router(ROUTER_DIR, "cpu", timeout=120, cache=tmp_path / "cache")
    assert proof.detail["device"] == "cpu" and "domain" in proof.detail["heads"]
    broken = tmp_path / "router"
    broken.mkdir()
    for name in ("tokenizer.json", "labels.json"):
        (broken / name).write_bytes((ROUTER_DIR / name).read_bytes())
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(PreflightFailed) as caught:
        await prove_router(broken, "cpu", timeout=120, cache=tmp_path / "cache")
    assert "failed during 'load'" in str(caught.value) and "INTENT_ROUTER_DIR" in str(caught.value)


def test_the_child_reports_json_and_its_stages(default_model: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "ktulhu.preflight", "model", str(default_model), "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["ok"] is True and report["layers_on_gpu"] == 0 and report["gpu_offload"] is False
    stages = [line for line in result.stderr.splitlines() if line.startswith(STAGE_PREFIX)]
    assert stages == [f"{STAGE_PREFIX}load", f"{STAGE_PREFIX}decode a batch of {BATCH_TOKENS} tokens",
                      f"{STAGE_PREFIX}decode single tokens"]
    bad = subprocess.run([sys.executable, "-m", "ktulhu.preflight", "model"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_gpu_layers_warning_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ktulhu.settings import load_settings

    def asked(environ: dict[str, str], files: str = "") -> bool:
        (tmp_path / "config").mkdir(exist_ok=True)
        (tmp_path / "config" / "llamacpp.env").write_text(files)
        return preflight.gpu_layers_requested(load_settings(environ=environ, root=tmp_path))

    assert asked({}) is False
    assert asked({}, "LLAMA_CLI_NGL=-1\n") is False  # the original's shipped default
    assert asked({}, "LLAMA_CLI_NGL=20\n") is True
    assert asked({"LLAMA_CLI_NGL": "-1"}) is True
    assert asked({"LLAMA_CLI_NGL": "0"}, "LLAMA_CLI_NGL=20\n") is False
