"""The client's address and scheme behind a reverse proxy (`KTULHU_TRUSTED_PROXIES`).

Behind nginx every connection comes from the proxy, so per-IP rate limits would share one bucket.
`X-Forwarded-For` and `X-Forwarded-Proto` fix that, but anyone can send them: they are believed
only when the direct peer is a trusted proxy. The client is then the right-most `X-Forwarded-For`
entry that is not itself a trusted proxy; entries further left were written by someone we do not
trust and are never read. A header that cannot be read is ignored and the peer address stays, so a
hostile value never turns into a 500 or a chosen address. With no trusted proxies (the default)
the headers are never read.

The ASGI scope is rewritten in place, so hypercorn's access log shows the same client as
`request.remote_addr` and `websocket.remote_addr` (and therefore the rate limits).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from quart_trio import QuartTrio

from ..app_state import RUNTIME_KEY

__all__ = [
    "MAX_HOPS",
    "Address",
    "Network",
    "TrustedProxyHeaders",
    "forwarded_client",
    "forwarded_scheme",
    "install",
    "parse_address",
    "parse_networks",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

#: Proxies walked at most; a longer chain of trusted hops is not believed (no real deployment has one).
MAX_HOPS = 32
#: Longer than any address with a port and brackets (`[ffff:...:ffff%zone]:65535`).
_MAX_ENTRY = 100
_PORT = re.compile(r"[0-9]{1,5}")


@functools.lru_cache(maxsize=16)
def parse_networks(spec: str) -> tuple[Network, ...]:
    """The networks of a validated `KTULHU_TRUSTED_PROXIES` value (cached: read per request)."""
    return tuple(ipaddress.ip_network(part.strip()) for part in spec.split(",") if part.strip())


def parse_address(entry: str) -> Address | None:
    """One `X-Forwarded-For` entry, or None when it is not an address.

    Accepts `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]` and `[2001:db8::1]:443`; the
    port is dropped (it belongs to the proxy's side). IPv4-mapped IPv6 becomes IPv4 and a zone id is
    dropped, so an address compares with the trusted networks as the operator wrote them.
    """
    text = entry.strip()
    if not text or len(text) > _MAX_ENTRY or not text.isascii():
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if ":" not in host or (rest and not (rest[0] == ":" and _valid_port(rest[1:]))):
            return None  # brackets are for IPv6 only, and only a port may follow them
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not _valid_port(port):
            return None
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return ipaddress.IPv6Address(int(address))
    return address


def _valid_port(text: str) -> bool:
    return _PORT.fullmatch(text) is not None and int(text) <= 65535


def _trusted(address: Address, networks: tuple[Network, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def forwarded_client(values: Iterable[str], networks: tuple[Network, ...]) -> str | None:
    """The client named by `X-Forwarded-For` header `values` (in arrival order), or None to keep the peer.

    Walks from the right past trusted proxies; the first other address is the client. Empty entries
    (a proxy appending to an empty header) are skipped. An unreadable entry within the walk, or a
    chain of more than `MAX_HOPS` trusted hops, means the header is ignored. When every entry is a
    trusted proxy, the left-most is the client (a request made by a proxy host itself).
    """
    joined = ",".join(values)
    if not joined.strip():
        return None
    entries = joined.rsplit(",", MAX_HOPS)
    truncated = len(entries) > MAX_HOPS
    if truncated:
        entries = entries[1:]
    leftmost: Address | None = None
    for entry in reversed(entries):
        if not entry.strip():
            continue
        address = parse_address(entry)
        if address is None:
            return None
        if not _trusted(address, networks):
            return str(address)
        leftmost = address
    if truncated or leftmost is None:
        return None
    return str(leftmost)


def forwarded_scheme(values: Iterable[str], websocket: bool) -> str | None:
    """The scheme named by `X-Forwarded-Proto` header `values` (right-most entry), or None to keep it.

    `http`/`https` (also `ws`/`wss`) are accepted in any case; a WebSocket scope gets `ws`/`wss`.
    """
    parts = ",".join(values).rsplit(",", MAX_HOPS)
    last = next((part.strip().lower() for part in reversed(parts) if part.strip()), "")
    if last not in ("http", "https", "ws", "wss"):
        return None
    secure = last in ("https", "wss")
    if websocket:
        return "wss" if secure else "ws"
    return "https" if secure else "http"


def _peer_trusted(scope: Scope, networks: tuple[Network, ...]) -> bool:
    client = scope.get("client")
    if not client or not isinstance(client[0], str):
        return False
    address = parse_address(client[0])
    return address is not None and _trusted(address, networks)


def _header_values(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key.lower() == name]


class TrustedProxyHeaders:
    """ASGI middleware: rewrites `client` and `scheme` of HTTP and WebSocket scopes from a trusted proxy.

    `trusted()` is asked per connection because under `hypercorn ktulhu.asgi:app` the settings are
    only loaded at lifespan start-up, after the app was built.
    """

    def __init__(self, app: ASGIApp, trusted: Callable[[], tuple[Network, ...]]) -> None:
        self.app = app
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            networks = self.trusted()
            if networks and _peer_trusted(scope, networks):
                client = forwarded_client(_header_values(scope, b"x-forwarded-for"), networks)
                if client is not None:
                    scope["client"] = (client, 0)
                scheme = forwarded_scheme(_header_values(scope, b"x-forwarded-proto"),
                                          websocket=scope["type"] == "websocket")
                if scheme is not None:
                    scope["scheme"] = scheme
        await self.app(scope, receive, send)


def install(app: QuartTrio) -> None:
    """Wrap `app.asgi_app`; the trusted networks come from the runtime's settings once it is attached."""

    def trusted() -> tuple[Network, ...]:
        runtime = app.extensions.get(RUNTIME_KEY)
        return () if runtime is None else parse_networks(runtime.settings.trusted_proxies)

    app.asgi_app = TrustedProxyHeaders(app.asgi_app, trusted)  # type: ignore[method-assign]
