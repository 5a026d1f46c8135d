"""`ktulhu models pull PATH|URL`, `ktulhu models list` and `serve --model`: real files, a real HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.cli import main
from ktulhu.model_files import describe, install, list_models, read_metadata
from ktulhu.model_pull import PullError
from tests.engine.tiny_gguf import write_tiny_gguf
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("ggufs")
    return {"templated": write_tiny_gguf(where / "tiny.gguf", n_ctx=2048),
            "plain": write_tiny_gguf(where / "plain.gguf", chat_template=None)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory, ggufs: dict[str, Path]) -> Iterator[str]:
    """A real HTTP server over a directory holding the tiny GGUF (and a file that is not one)."""
    root = tmp_path_factory.mktemp("www")
    (root / "tiny.gguf").write_bytes(ggufs["templated"].read_bytes())
    (root / "fake.gguf").write_bytes(b"<html>not a model</html>" * 10)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_local_file_is_installed_verified_and_not_twice(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    models, out = tmp_path / "models", io.StringIO()
    digest = sha(ggufs["templated"])
    dest = install(str(ggufs["templated"]), models, sha256=digest.upper(), out=out)
    assert dest == models / "tiny.gguf" and sha(dest) == digest
    assert install(str(ggufs["templated"]), models, sha256=digest, out=out) == dest
    assert "already installed" in out.getvalue()
    assert sorted(p.name for p in models.iterdir()) == ["tiny.gguf"]  # no partial file left


def test_a_download_is_installed_under_its_name(tmp_path: Path, http_root: str, ggufs: dict[str, Path]) -> None:
    dest = install(f"{http_root}/tiny.gguf", tmp_path, sha256=sha(ggufs["templated"]), name="small.gguf",
                   out=io.StringIO())
    assert dest.name == "small.gguf" and sha(dest) == sha(ggufs["templated"])


@pytest.mark.parametrize("case", ["wrong sha", "not a gguf", "missing url", "missing file", "bad sha", "bad name"])
def test_refused_pulls_install_nothing(tmp_path: Path, http_root: str, ggufs: dict[str, Path], case: str) -> None:
    source, kwargs = {
        "wrong sha": (str(ggufs["templated"]), {"sha256": "0" * 64}),
        "not a gguf": (f"{http_root}/fake.gguf", {}),
        "missing url": (f"{http_root}/nothing.gguf", {}),
        "missing file": (str(tmp_path / "nothing.gguf"), {}),
        "bad sha": (str(ggufs["templated"]), {"sha256": "xyz"}),
        "bad name": (str(ggufs["templated"]), {"name": "../escape.gguf"}),
    }[case]
    models = tmp_path / "models"
    with pytest.raises(PullError) as refused:
        install(source, models, out=io.StringIO(), **kwargs)
    assert "nothing was installed" in str(refused.value) or case in ("missing file", "bad sha", "bad name")
    assert not models.exists() or list(models.iterdir()) == []
    assert not (tmp_path / "escape.gguf").exists()


def test_other_content_under_an_installed_name_needs_force(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    other = tmp_path / "src" / "tiny.gguf"
    other.parent.mkdir()
    other.write_bytes(ggufs["plain"].read_bytes())
    models = tmp_path / "models"
    install(str(ggufs["templated"]), models, out=io.StringIO())
    with pytest.raises(PullError, match="--force"):
        install(str(other), models, sha256=sha(other), out=io.StringIO())
    assert sha(models / "tiny.gguf") == sha(ggufs["templated"])
    install(str(other), models, sha256=sha(other), force=True, out=io.StringIO())
    assert sha(models / "tiny.gguf") == sha(other)


def test_list_reads_each_header(tmp_path: Path, ggufs: dict[str, Path]) -> None:
    for name in ("templated", "plain"):
        install(str(ggufs[name]), tmp_path, out=io.StringIO())
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    found = {(m.path.name if hasattr(m, "path") else m[0].name): m for m in list_models(tmp_path)}
    assert found["tiny.gguf"].template == "gguf" and found["tiny.gguf"].context == 2048
    assert found["tiny.gguf"].quant == "ALL_F32" and found["tiny.gguf"].name == "tiny-random-llama"
    assert found["plain.gguf"].template == "chat_template.jinja"
    assert "cut short" in found["broken.gguf"][1]


def test_the_default_model_is_described(default_model: Path) -> None:
    info = describe(default_model)
    assert (info.quant, info.context, info.template) == ("Q4_1", 8192, "gguf")


@hsettings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_header_is_read_or_refused(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("h") / "x.gguf"
    path.write_bytes(b"GGUF" + data)
    try:
        assert isinstance(read_metadata(path, lambda key: True), dict)
    except PullError:
        pass


def test_cli_pull_list_and_serve_model(tmp_path: Path, ggufs: dict[str, Path], capsys) -> None:
    models = tmp_path / "models"
    assert main(["models", "pull", str(ggufs["plain"]), "--sha256", sha(ggufs["plain"]), "--dir", str(models)]) == 0
    assert main(["models", "pull", str(ggufs["plain"]), "--sha256", "1" * 64, "--dir", str(models), "--force"]) == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert main(["models", "pull", "--sha256", "1" * 64, "--dir", str(models)]) == 2  # options without a SOURCE
    assert main(["models", "list", "--json", "--dir", str(models)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["file"], row["template"], row["configured"]) == ("plain.gguf", "chat_template.jinja", False)
    refused = run_cli(["serve", "--model", str(tmp_path / "absent.gguf")], cwd=tmp_path)
    assert refused.returncode == 2 and "absent.gguf" in refused.stderr
