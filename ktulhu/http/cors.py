"""CORS for browsers on other origins (original §1.5), and the Origin check of WebSocket upgrades.

Allowed origins come from `config/allowed_origins.txt` (exact match, re-read when the file
changes). A page served by this server itself (same scheme-less host as the request) is always
allowed. Requests without an `Origin` header (apps, SDKs, scripts) are not browsers and are never
refused for that.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from quart import Response, request, websocket
from quart_trio import QuartTrio

from ..app_state import RUNTIME_KEY
from .errors import raise_error

__all__ = ["DEFAULT_ORIGINS", "allowed_origins", "install", "origin_allowed", "refuse_cross_site_admin",
           "websocket_origin_allowed"]

#: Used when the file is missing or lists nothing (the original's defaults).
DEFAULT_ORIGINS = frozenset({
    "https://ktulhu.com", "https://dev.ktulhu.com", "https://app.ktulhu.com",
    "https://devfrontend.ktulhu.com", "http://localhost:5173",
})
ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOW_HEADERS = "content-type, authorization, x-device-hash"

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


def install(app: QuartTrio) -> None:
    @app.after_request
    async def add_cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        runtime = app.extensions.get(RUNTIME_KEY)
        if origin is None or runtime is None:
            return response
        if origin_allowed(origin, request.host, allowed_origins(runtime.settings.allowed_origins_file)):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
                response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        return response
