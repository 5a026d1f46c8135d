"""`/metrics` (Prometheus text exposition) and the request counter every HTTP route feeds.

Requests are labelled by their URL rule (`/chat-thread/<chat_id>`), never the raw path, so client
ids cannot blow up the number of series; unmatched paths share one label. Scrapes come from this host,
the admin, or a remote Prometheus with KTULHU_METRICS_TOKEN.
"""

from __future__ import annotations

import hmac
import ipaddress
import time

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from quart import Blueprint, Quart, Response, current_app, g, request

from .. import metrics
from ..app_state import RUNTIME_KEY
from .errors import raise_error
from .identity import client_address, request_principal

__all__ = ["blueprint", "install", "sees_internals"]

blueprint = Blueprint("metrics", __name__)

UNMATCHED = "<unmatched>"


def _runtime():  # the runtime may be attached after create_app (ktulhu.asgi)
    return current_app.extensions.get(RUNTIME_KEY)


async def sees_internals() -> bool:
    """Operational detail (metrics, `/readyz` paths) is for the operator: a client on this host
    talking to the server directly (a local Prometheus), the admin, or the bearer of
    KTULHU_METRICS_TOKEN. Everyone else learns only what a load balancer needs. A request that
    came through a proxy (it carries X-Forwarded-For) is never "on this host", so a reverse proxy
    on the same machine does not open the metrics to the internet."""
    try:
        if "X-Forwarded-For" not in request.headers and ipaddress.ip_address(client_address()).is_loopback:
            return True
    except ValueError:
        pass
    header = request.headers.get("Authorization", "")
    scheme, _, credential = header.strip().partition(" ")
    token = current_app.extensions[RUNTIME_KEY].settings.metrics_token
    if scheme.lower() == "bearer" and token:
        return hmac.compare_digest(credential.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        return (await request_principal()).is_admin
    return False


@blueprint.get("/metrics")
async def scrape() -> Response:
    if not await sees_internals():
        raise_error(403, "metrics_forbidden", "metrics are for the operator: scrape from this host, with "
                                              "admin credentials, or with Authorization: Bearer "
                                              "<KTULHU_METRICS_TOKEN>")
    metrics.install_collector(_runtime())
    return Response(generate_latest(REGISTRY), status=200, content_type=CONTENT_TYPE_LATEST)


def install(app: Quart) -> None:
    """Count requests by route, method and status; time them; register the live-state collector."""
    metrics.install_collector(app.extensions.get(RUNTIME_KEY))

    @app.before_request
    async def _start_timer() -> None:
        g.ktulhu_started = time.perf_counter()

    @app.after_request
    async def _count(response: Response) -> Response:
        rule = request.url_rule
        route = rule.rule if rule is not None else UNMATCHED
        metrics.HTTP_REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        started = getattr(g, "ktulhu_started", None)
        if started is not None:
            metrics.HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
        return response
