"""Installing and describing GGUF files: `ktulhu models pull PATH|URL` and `ktulhu models list`.

A pull streams the file (a local copy or an HTTP download) into `models/.<name>.partial` while its
sha256 is computed and its header checked, and only a complete GGUF whose checksum matches the
one given (`--sha256`) is renamed into place: an interrupted or refused pull leaves nothing behind,
and a file already installed with the same content is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from urllib.parse import unquote, urlsplit

import attrs
import httpx

from .model_pull import CHUNK, PullError, fsync_dir, sha256_file
from .progress import Progress

__all__ = ["ModelInfo", "describe", "install", "list_models", "read_metadata"]

GGUF_MAGIC = b"GGUF"
#: Seconds an HTTP download may wait for the next bytes.
READ_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\.gguf")
#: Longest metadata string read (chat templates are a few KiB; a corrupt length must not allocate GiBs).
MAX_METADATA_STRING = 16 << 20
_DESCRIBED = frozenset({"general.architecture", "general.name", "general.file_type", "tokenizer.chat_template"})


@attrs.frozen
class ModelInfo:
    """What `models list` shows of one GGUF (read from its header, not loaded)."""

    path: Path
    size: int
    name: str
    quant: str
    context: int | None
    #: `gguf` when the file embeds a chat template (used by default), else `chat_template.jinja` (ChatML).
    template: str


def install(source: str, models_dir: Path, *, sha256: str | None = None, name: str | None = None,
            out: TextIO, force: bool = False) -> Path:
    """Install the GGUF at `source` (a local path or an http(s) URL) as `models_dir/<name>`.

    Raises `PullError` saying what to do; nothing is installed or changed then."""
    if sha256 is not None:
        sha256 = sha256.lower()
        if not _SHA256.fullmatch(sha256):
            raise PullError(f"--sha256 {sha256[:80]!r}: not a sha256 (64 hex digits)")
    is_url = urlsplit(source).scheme in ("http", "https")
    name = name or _name_of(source, is_url)
    if not _NAME.fullmatch(name):
        raise PullError(f"{name[:80]!r} is not a usable model file name: letters, digits and ._+- ending in "
                        ".gguf (give one with --name)")
    dest = models_dir / name
    if not is_url and not Path(source).is_file():
        raise PullError(f"{source}: no such file (give a GGUF file's path or an http(s) URL)")
    if dest.exists():
        present = sha256_file(dest, out)
        if sha256 in (None, present):
            out.write(f"{dest} is already installed (sha256 {present[:12]}...)\n")
            return dest
        if not force:
            raise PullError(f"{dest} exists with another content (sha256 {present[:12]}...); use --force to replace it")
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        with _opened(source, is_url) as (stream, size), partial.open("wb") as target:
            digest = _copy_checked(stream, target, Progress(f"fetching {name}", size or 0, out))
            target.flush()
            os.fsync(target.fileno())
        if sha256 is not None and digest != sha256:
            raise PullError(f"checksum mismatch for {source}: got sha256 {digest}, expected {sha256}; "
                            "nothing was installed")
        os.replace(partial, dest)
        fsync_dir(dest.parent)
    finally:
        partial.unlink(missing_ok=True)
    out.write(f"{dest} installed (sha256 {digest}){'' if sha256 else '; pass --sha256 to have it verified'}\n")
    return dest


def _name_of(source: str, is_url: bool) -> str:
    return unquote(urlsplit(source).path.rsplit("/", 1)[-1]) if is_url else Path(source).name


@contextmanager
def _opened(source: str, is_url: bool) -> Iterator[tuple[BinaryIO | Iterator[bytes], int | None]]:
    if not is_url:
        with open(source, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
        return
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
    try:
        with httpx.stream("GET", source, follow_redirects=True, timeout=timeout) as response:
            if response.status_code != 200:
                raise PullError(f"{source}: the server answered {response.status_code}; nothing was installed")
            length = response.headers.get("content-length", "")
            yield response.iter_bytes(CHUNK), int(length) if length.isdigit() else None
    except httpx.HTTPError as error:
        raise PullError(f"{source}: download failed ({type(error).__name__}: {error}); nothing was installed") from None


def _copy_checked(src: BinaryIO | Iterator[bytes], dst: BinaryIO, progress: Progress) -> str:
    """Copy, hash and check that the bytes start like a GGUF file."""
    digest = hashlib.sha256()
    chunks = iter(lambda: src.read(CHUNK), b"") if hasattr(src, "read") else src
    head = b""
    for chunk in chunks:
        if len(head) < len(GGUF_MAGIC):
            head += chunk[: len(GGUF_MAGIC) - len(head)]
            if len(head) == len(GGUF_MAGIC) and head != GGUF_MAGIC:
                raise PullError("this is not a GGUF file (its first bytes are not `GGUF`); nothing was installed")
        digest.update(chunk)
        dst.write(chunk)
        progress.advance(len(chunk))
    if head != GGUF_MAGIC:
        raise PullError("this is not a GGUF file (too short); nothing was installed")
    progress.finish()
    return digest.hexdigest()


# GGUF metadata value types (gguf's GGUFValueType): fixed sizes by struct code, 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: Path, wanted: Callable[[str], bool]) -> dict[str, object]:
    """The scalar and string values of the keys `wanted` accepts of a GGUF's metadata, read from its header.

    The `gguf` package's reader maps every field and tensor (seconds for a vocabulary of 50k
    tokens); this reads the key/value section once, skipping what is not wanted."""
    found: dict[str, object] = {}
    with path.open("rb") as f:
        def unpack(code: str) -> Any:
            size = struct.calcsize("<" + code)
            data = f.read(size)
            if len(data) != size:
                raise PullError(f"{path}: the GGUF header is cut short")
            return struct.unpack("<" + code, data)[0]

        def string(keep: bool) -> str | None:
            length = unpack("Q")
            if length > MAX_METADATA_STRING:
                raise PullError(f"{path}: a metadata string of {length} bytes; not a sane GGUF")
            if not keep:
                f.seek(length, os.SEEK_CUR)
                return None
            return f.read(length).decode("utf-8", "replace")

        def value(kind: int, keep: bool) -> object:
            if kind in _SCALARS:
                return unpack(_SCALARS[kind])
            if kind == _STRING:
                return string(keep)
            if kind == _ARRAY:
                item_kind, count = unpack("I"), unpack("Q")
                if item_kind in _SCALARS:
                    f.seek(count * struct.calcsize("<" + _SCALARS[item_kind]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        value(item_kind, False)
                return None
            raise PullError(f"{path}: unknown GGUF metadata type {kind}")

        if f.read(4) != GGUF_MAGIC:
            raise PullError(f"{path}: not a GGUF file")
        unpack("I")  # version
        unpack("Q")  # tensor count
        for _ in range(unpack("Q")):
            key = string(True) or ""
            keep = wanted(key)
            kept = value(unpack("I"), keep)
            if keep:
                found[key] = kept
    return found


def describe(path: Path) -> ModelInfo:
    """Read a GGUF's header: name, quantisation, trained context, whether it embeds a chat template."""
    import gguf  # only for its file-type names

    meta = read_metadata(path, lambda key: key in _DESCRIBED or key.endswith(".context_length"))
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    file_type = meta.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "?"
    except ValueError:
        quant = f"type {file_type}"
    return ModelInfo(path=path, size=path.stat().st_size, name=str(meta.get("general.name") or path.stem),
                     quant=quant, context=context if isinstance(context, int) else None,
                     template="gguf" if meta.get("tokenizer.chat_template") else "chat_template.jinja")


def list_models(models_dir: Path) -> list[ModelInfo | tuple[Path, str]]:
    """Every `*.gguf` in `models_dir`, described; a file that cannot be read is (path, why)."""
    found: list[ModelInfo | tuple[Path, str]] = []
    for path in sorted(models_dir.glob("*.gguf")) if models_dir.is_dir() else []:
        try:
            found.append(describe(path))
        except PullError as error:
            found.append((path, str(error)))
    return found
