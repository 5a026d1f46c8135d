"""The quart-trio application: blueprints and the settings every surface shares."""

from __future__ import annotations

from quart_trio import QuartTrio

from .app_state import RUNTIME_KEY
from .http import admin, auth, chats, cors, external, health, openai, pages, payments, summaries, ws
from .http import metrics as metrics_route
from .http.errors import ApiError
from .nurseries.runtime import Runtime

__all__ = ["create_app"]

BLUEPRINTS = (health, ws, chats, summaries, auth, external, openai, admin, payments, pages, metrics_route)


def create_app(runtime: Runtime | None = None) -> QuartTrio:
    """Build the app. With `runtime`, the caller runs the tree; without, `ktulhu.asgi` attaches it."""
    app = QuartTrio("ktulhu")
    # Quart cuts every response and request body after 60 s by default, which would end streams
    # (SSE replies, long uploads) mid-way. Streams end when their generation does.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None
    app.config["JSON_SORT_KEYS"] = False
    if runtime is not None:
        app.extensions[RUNTIME_KEY] = runtime
    app.register_error_handler(ApiError, lambda error: error.get_response())
    for module in BLUEPRINTS:
        app.register_blueprint(module.blueprint)
    cors.install(app)
    metrics_route.install(app)
    return app
