"""JSON errors and JSON bodies shared by every HTTP surface.

Every error answer is `{"error": <code>, "message": <human text>}` with a 4xx/5xx status. Request
bodies go through `json_body`, which answers 415 (not JSON), 400 (malformed), 413 (too large) and
422 (wrong shape, naming the field) before a handler sees anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NoReturn

import orjson
from quart import Response, request
from werkzeug.exceptions import HTTPException

from ..nurseries.provided import NotRunning
from ..store.errors import StoreError
from ..store.keys import is_valid_id

__all__ = ["ApiError", "FieldSpec", "check_path_id", "framework_error", "json_body", "json_error", "json_response",
           "not_running", "query_limit", "raise_error", "store_unavailable"]

#: Largest JSON body any route accepts unless it says otherwise.
MAX_BODY_BYTES = 1 << 20


class ApiError(HTTPException):
    """Raise from a handler to answer with a JSON error (registered in `create_app`)."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = status
        self.error_code = code
        self.message = message
        self.extra_headers = dict(headers or {})

    def get_response(self, environ: Any = None, scope: Any = None) -> Response:  # type: ignore[override]
        return json_error(self.code, self.error_code, self.message, headers=self.extra_headers)


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json",
                    headers=dict(headers or {}))


def json_error(status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None,
               **extra: Any) -> Response:
    return json_response({"error": code, "message": message, **extra}, status, headers)


def raise_error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> NoReturn:
    raise ApiError(status, code, message, headers)


def check_path_id(value: str, what: str) -> str:
    """An id taken from the URL path, or 400: unsafe ids never reach the store (no key injection)."""
    if not is_valid_id(value):
        raise_error(400, "invalid_id", f"invalid {what}: use 1-128 characters from A-Z a-z 0-9 _ -")
    return value


def query_limit(name: str, default: int, lo: int, hi: int, *, code: str = "invalid_query") -> int:
    """A whole-number query parameter clamped to [lo, hi], or 400. Only ASCII digits, at most 9 of them:
    `str.isdigit` accepts `²` and `int()` refuses 5,000-digit strings, both of which were 500s."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise_error(400, code, f"`{name}` must be a whole number from {lo} to {hi}")
    return min(max(int(raw), lo), hi)


def framework_error(error: HTTPException) -> Response:
    """A werkzeug/Quart HTTP error (404, 405, 413 ...) as `{"error","message"}`."""
    code = re.sub(r"[^a-z0-9]+", "_", (error.name or "error").lower()).strip("_")
    headers = {"Connection": "close"} if error.code == 413 else None  # the unread body would follow
    return json_error(error.code or 500, code, error.description or error.name or "error", headers=headers)


def store_unavailable(error: StoreError) -> Response:
    """The store refused a write (disk full, I/O error) and is being reopened: try again shortly."""
    return json_error(503, "store_unavailable", f"the chat store cannot be used right now: {error}",
                      headers={"Retry-After": "5"})


def not_running(error: NotRunning) -> Response:
    """A service the request needs is not running yet (or any more): try again shortly."""
    return json_error(503, "service_unavailable", str(error), headers={"Retry-After": "5"})


def _too_large(max_bytes: int) -> NoReturn:
    # The unread rest of the body would be taken for the next request: close the connection.
    raise_error(413, "body_too_large", f"the request body is larger than {max_bytes} bytes", {"Connection": "close"})


#: name -> (accepted types, required). `None` in the types admits JSON null.
FieldSpec = Mapping[str, tuple[tuple[type | None, ...], bool]]

_TYPE_NAMES = {str: "a string", bool: "true or false", int: "a whole number", float: "a number",
               list: "an array", dict: "an object", type(None): "null"}


async def json_body(spec: FieldSpec, *, max_bytes: int = MAX_BODY_BYTES, optional_body: bool = False) -> dict[str, Any]:
    """The request's JSON object, checked against `spec` (unknown fields are ignored).

    `optional_body`: an empty body counts as `{}` (routes whose fields are all optional)."""
    length = request.content_length
    if length is not None and length > max_bytes:
        _too_large(max_bytes)
    raw = await request.get_data(cache=True, as_text=False)
    if len(raw) > max_bytes:
        _too_large(max_bytes)
    if not raw.strip() and optional_body:
        body: Any = {}
    else:
        if request.mimetype != "application/json":
            raise_error(415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise_error(400, "invalid_json", f"the body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        raise_error(422, "invalid_body", "the body must be a JSON object")
    for name, (types, required) in spec.items():
        if name not in body:
            if required:
                raise_error(422, "invalid_body", f"`{name}` is required")
            continue
        value = body[name]
        allowed = tuple(type(None) if t is None else t for t in types)
        # bool is an int in Python; JSON true is never a number here.
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        elif isinstance(value, int) and not isinstance(value, bool) and float in allowed:
            ok = True
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)
            raise_error(422, "invalid_body", f"`{name}` must be {names}")
    return body
