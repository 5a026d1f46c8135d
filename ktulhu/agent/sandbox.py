"""The working directory the agent's file tools are confined to.

Every path the model names is checked before any file is opened: no `..` component, no NUL or
control characters, and after resolving every symlink the file (and, for a write, each parent)
must lie inside the working directory. A symlink that points outside is refused whether it is the
file itself or a directory on the way to it, and whether it dangles or not. Files are then opened
by their resolved path with `O_NOFOLLOW`, so the checked path is the opened one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import attrs

__all__ = ["SandboxError", "Workspace"]

MAX_PATH_CHARS = 1024


class SandboxError(Exception):
    """A path the agent may not use; the message says why (shown to the model and the user)."""


@attrs.frozen
class Workspace:
    """The resolved working directory."""

    root: Path

    @classmethod
    def open(cls, directory: Path | str) -> "Workspace":
        """The existing directory `directory`, resolved (raises `SandboxError` when it is not one)."""
        path = Path(directory).expanduser()
        try:
            root = path.resolve(strict=True)
        except (OSError, RuntimeError) as error:
            raise SandboxError(f"working directory {path}: {error.strerror or error}") from None
        if not root.is_dir():
            raise SandboxError(f"working directory {path} is not a directory")
        return cls(root)

    def _parts(self, name: object) -> PurePosixPath:
        if not isinstance(name, str) or not name.strip():
            raise SandboxError("a path must be a non-empty string")
        if len(name) > MAX_PATH_CHARS:
            raise SandboxError(f"a path must be at most {MAX_PATH_CHARS} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise SandboxError("a path must not contain control characters")
        pure = PurePosixPath(name)
        if ".." in pure.parts:
            raise SandboxError(f"{name!r}: '..' is not allowed; use paths inside the working directory")
        if pure.is_absolute():
            try:
                return pure.relative_to(self.root)
            except ValueError:
                # no absolute root in the message: the model's prompt shows only paths it may use
                raise SandboxError(f"{name!r} is outside the working directory; use a path relative to it") from None
        return pure

    def _inside(self, name: str, path: Path) -> Path:
        if not path.is_relative_to(self.root):
            raise SandboxError(f"{name!r} leads outside the working directory (through a symlink)")
        return path

    def existing(self, name: object) -> Path:
        """The resolved path of an existing file or directory `name` inside the working directory."""
        relative = self._parts(name)
        candidate = self.root / relative
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError:
            # report an escape before "not found": a dangling link to the outside is still an escape
            self._inside(str(name), candidate.resolve(strict=False))
            raise SandboxError(f"{name!r} does not exist") from None
        except (OSError, RuntimeError) as error:
            raise SandboxError(f"{name!r}: {getattr(error, 'strerror', None) or error}") from None
        return self._inside(str(name), resolved)

    def writable(self, name: object) -> Path:
        """Where to write `name`: a resolved path inside the working directory, parents created.

        The target may not exist yet; when it does it must be a regular file (or a symlink to
        one inside the working directory). Missing parent directories are created inside it.
        """
        relative = self._parts(name)
        label = str(name)
        if relative == PurePosixPath("."):
            raise SandboxError(f"{label!r} is the working directory itself, not a file")
        candidate = self.root / relative
        # the deepest existing ancestor, resolved, must be inside; what is missing below it is created
        parent = candidate.parent
        missing: list[str] = []
        while not os.path.lexists(parent):
            missing.insert(0, parent.name)
            parent = parent.parent
        try:
            parent_resolved = self._inside(label, parent.resolve(strict=False))
        except (OSError, RuntimeError) as error:
            raise SandboxError(f"{label!r}: {getattr(error, 'strerror', None) or error}") from None
        if not parent_resolved.is_dir():
            raise SandboxError(f"{label!r}: {parent.relative_to(self.root) or '.'} is not a directory")
        directory = parent_resolved
        for part in missing:
            directory = directory / part
            try:
                directory.mkdir()
            except FileExistsError:  # appeared meanwhile: check it like any existing one
                directory = self._inside(label, directory.resolve(strict=True))
                if not directory.is_dir():
                    raise SandboxError(f"{label!r}: {part} is not a directory") from None
            except OSError as error:
                raise SandboxError(f"{label!r}: cannot create directory {part}: {error.strerror}") from None
        target = directory / candidate.name
        if os.path.islink(target):
            resolved = target.resolve(strict=False)
            self._inside(label, resolved)
            target = resolved
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            return target
        except OSError as error:
            raise SandboxError(f"{label!r}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise SandboxError(f"{label!r} exists and is not a regular file")
        return target

    def relative(self, path: Path) -> str:
        """`path` as the model should name it."""
        rel = path.relative_to(self.root)
        return str(rel) if str(rel) != "." else "."
