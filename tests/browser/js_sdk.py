"""The official OpenAI JavaScript SDK (npm `openai`), unpacked once per machine outside the clone, and a
small static HTTP server that serves it with a test page from another origin than the server's.

The pinned release's ESM build (`index.mjs` and everything it imports) uses relative imports only, so
a browser loads it as plain module scripts: no bundler, no import map. `npm pack` fetches the tarball
(its sha512 is checked against the pin), Python's `tarfile` unpacks it into
`$KTULHU_NPM_CACHE` or `~/.cache/ktulhu/npm/openai-<version>/package/`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

VERSION = "5.23.2"
#: `npm view openai@5.23.2 dist.integrity`
INTEGRITY = "sha512-MQBzmTulj+MM5O8SKEk/gL8a7s5mktS9zUtAkU257WjvobGc9nKcBuVwjyEEcb9SI8a8Y2G/mzn3vm9n1Jlleg=="
ENTRY = "index.mjs"

#: Static `import ... from "x"`, `export ... from "x"`, `import "x"` and `import("x")` in the SDK's ESM files
#: (an `import(...)` right after a quote is prose in an error message, not code).
_IMPORT = re.compile(r"""(?:^|[;\s])(?:import|export)\s[^;]*?from\s*["']([^"']+)["']"""
                     r"""|(?:^|[;\s])import\s*["']([^"']+)["']|(?<![\w.$`'"])import\s*\(\s*["']([^"']+)["']""", re.M)


def cache_root() -> Path:
    configured = os.environ.get("KTULHU_NPM_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ktulhu" / "npm"


def bare_imports(package: Path, entry: str = ENTRY) -> list[str]:
    """Non-relative specifiers reachable from `entry` (each as `file: specifier`); relative ones that
    point at missing files are reported too. Empty: a browser can load the entry as it is."""
    problems: list[str] = []
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = package / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        for match in _IMPORT.finditer(path.read_text(encoding="utf-8")):
            spec = next(group for group in match.groups() if group)
            if spec.startswith(("./", "../")):
                todo.append(posixpath.normpath(posixpath.join(posixpath.dirname(name), spec)))
            else:
                problems.append(f"{name}: {spec}")
    return problems


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def openai_sdk() -> Path:
    """The unpacked `package/` directory of openai@VERSION; skips the test when npm cannot fetch it."""
    root = cache_root()
    target = root / f"openai-{VERSION}"
    package = target / "package"
    if (package / ENTRY).is_file():
        return package
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm not found: the OpenAI JS SDK test needs it once to fetch openai@" + VERSION)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".openai-") as tmp:
        work = Path(tmp)
        try:
            done = subprocess.run([npm, "pack", f"openai@{VERSION}", "--pack-destination", str(work)],
                                  cwd=work, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`npm pack openai@{VERSION}` timed out (registry unreachable?)")
        tarball = work / f"openai-{VERSION}.tgz"
        if done.returncode != 0 or not tarball.is_file():
            pytest.skip(f"`npm pack openai@{VERSION}` failed (registry unreachable?): {done.stderr.strip()[-400:]}")
        data = tarball.read_bytes()
        assert _sri(data) == INTEGRITY, f"openai-{VERSION}.tgz does not match its pinned integrity"
        unpacked = work / "unpacked"
        with tarfile.open(tarball) as archive:
            archive.extractall(unpacked, filter="data")
        problems = bare_imports(unpacked / "package")
        assert not problems, f"openai@{VERSION} {ENTRY} needs a bundler: {problems[:10]}"
        try:
            os.rename(unpacked, target)
        except OSError:  # another run unpacked it first
            if not (package / ENTRY).is_file():
                raise
    return package


class _Quiet(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".map": "application/json"}

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        pass


@contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """`directory` served on 127.0.0.1 (a free port) from a thread; yields the origin (`http://127.0.0.1:N`)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(directory)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="static-origin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
