"""`Problem`: an error any integrator route can raise; each API renders it in its own format."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["Problem"]


class Problem(Exception):
    """An HTTP error: `status`, a machine-readable `code`, a message for people, optional headers
    (`Retry-After`) and the request field at fault (`param`, used by the OpenAI format)."""

    def __init__(self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.param = param
