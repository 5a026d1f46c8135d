"""`/metrics` (Prometheus text exposition) and the request counter every HTTP route feeds.

Requests are labelled by their URL rule (`/chat-thread/<chat_id>`), never the raw path, so client
ids cannot blow up the number of series; unmatched paths share one label.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from quart import Blueprint, Quart, Response, current_app, g, request

from .. import metrics
from ..app_state import RUNTIME_KEY

__all__ = ["blueprint", "install"]

blueprint = Blueprint("metrics", __name__)

UNMATCHED = "<unmatched>"


def _runtime():  # the runtime may be attached after create_app (ktulhu.asgi)
    return current_app.extensions.get(RUNTIME_KEY)


@blueprint.get("/metrics")
async def scrape() -> Response:
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
