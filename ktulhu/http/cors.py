"""CORS for browsers on other origins (original §1.5), and the Origin check of WebSocket upgrades.

Allowed origins come from `config/allowed_origins.txt` (exact match, re-read when the file
changes). A page served by this server itself (same scheme-less host as the request) is always
allowed. Requests without an `Origin` header (apps, SDKs, scripts) are not browsers and are never
refused for that.

A preflight from an allowed origin is answered with the request headers it asks for
(`Access-Control-Request-Headers`), so SDKs that send their own headers (the OpenAI SDK's
`x-stainless-*`, `openai-organization`) work from a browser; names that are not RFC 7230 tokens are
left out, and a list that is too long is ignored (the default list is answered).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from quart import Response, request, websocket
from quart_trio import QuartTrio

from ..app_state import RUNTIME_KEY
from .errors import raise_error

__all__ = ["DEFAULT_ORIGINS", "allowed_origins", "install", "origin_allowed", "refuse_cross_site_admin",
           "requested_headers", "websocket_origin_allowed"]

#: Used when the file is missing or lists nothing (the original's defaults).
DEFAULT_ORIGINS = frozenset({
    "https://ktulhu.com", "https://dev.ktulhu.com", "https://app.ktulhu.com",
    "https://devfrontend.ktulhu.com", "http://localhost:5173",
})
ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
#: Answered to a preflight that names no (usable) request headers.
ALLOW_HEADERS = "content-type, authorization, x-device-hash"
#: Response headers a cross-origin page may read (SDKs report the request id and honour Retry-After).
EXPOSE_HEADERS = "X-Request-ID, Retry-After"
#: Bounds on `Access-Control-Request-Headers`: browsers send a few dozen short names at most.
MAX_REQUESTED_HEADERS = 64
MAX_HEADER_LIST_CHARS = 4096
MAX_HEADER_NAME_CHARS = 128
#: RFC 7230 `token` (a header field name).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_cache: dict[Path, tuple[float, frozenset[str]]] = {}


def allowed_origins(path: Path) -> frozenset[str]:
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return DEFAULT_ORIGINS
    cached = _cache.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    lines = (line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    origins = frozenset(line.rstrip("/") for line in lines if line and not line.startswith("#")) or DEFAULT_ORIGINS
    _cache[path] = (mtime, origins)
    return origins


def origin_allowed(origin: str, host: str | None, allowed: frozenset[str]) -> bool:
    """`origin` is in the allow-list, or is this server itself (same host and port)."""
    if origin.rstrip("/") in allowed:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def websocket_origin_allowed(allowed_file: Path) -> bool:
    """Cross-site WebSocket use is refused: a browser's upgrade must come from an allowed origin."""
    origin = websocket.headers.get("Origin")
    return origin is None or origin_allowed(origin, websocket.host, allowed_origins(allowed_file))


def refuse_cross_site_admin() -> None:
    """Admin credentials are honoured only from this server's own pages or non-browser clients.

    A browser attaches cached Basic credentials to a credentialed cross-origin request, so any
    allowed origin could otherwise drive the admin JSON with the operator's session."""
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, request.host, frozenset()):
        raise_error(403, "cross_site_admin", "admin credentials are accepted only from this server's own pages")


def requested_headers(value: str | None) -> tuple[str, ...] | None:
    """The header names a preflight asks for, lower-cased, each once, in order; None to answer the
    default list (no header, nothing usable in it, or more than the bounds allow).

    Entries that are not RFC 7230 tokens (or longer than `MAX_HEADER_NAME_CHARS`) are left out:
    the browser then fails that preflight itself, and nothing unsanitised is echoed."""
    if value is None or len(value) > MAX_HEADER_LIST_CHARS:
        return None
    entries = value.split(",")
    if len(entries) > MAX_REQUESTED_HEADERS:
        return None
    names: dict[str, None] = {}
    for entry in entries:
        name = entry.strip(" \t")
        if len(name) <= MAX_HEADER_NAME_CHARS and _TOKEN.fullmatch(name):
            names[name.lower()] = None
    return tuple(names) or None


def _add_preflight_headers(response: Response) -> None:
    requested = requested_headers(request.headers.get("Access-Control-Request-Headers"))
    response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
    response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS if requested is None else ", ".join(requested)
    response.vary.add("Access-Control-Request-Headers")


# quart-cors is not installed, and its per-route configuration buys nothing over these ~40 lines.
def install(app: QuartTrio) -> None:
    @app.after_request
    async def add_cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        runtime = app.extensions.get(RUNTIME_KEY)
        if origin is None or runtime is None:
            return response
        response.vary.add("Origin")  # also when refused: a cache must not reuse one origin's answer for another
        if origin_allowed(origin, request.host, allowed_origins(runtime.settings.allowed_origins_file)):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            if request.method == "OPTIONS":
                _add_preflight_headers(response)
            else:
                response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response
