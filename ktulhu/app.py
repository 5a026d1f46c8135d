"""The quart-trio application: blueprints and the settings every surface shares."""

from __future__ import annotations

from quart import g, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .app_state import RUNTIME_KEY
from .http import admin, auth, chats, cors, external, health, openai, pages, payments, proxies, summaries, ws
from .http import completions, embeddings, tokenize
from .http import metrics as metrics_route
from .http.errors import ApiError, framework_error, not_running, store_unavailable
from .logs import AccessLog, exchange_of
from .nurseries.provided import NotRunning
from .nurseries.runtime import Runtime
from .store.errors import StoreError

__all__ = ["MAX_REQUEST_BYTES", "attach_runtime", "create_app", "install_access_log"]

#: No route accepts a larger body (the OpenAI-compatible chat completions take up to 4 MiB).
MAX_REQUEST_BYTES = 4 << 20

BLUEPRINTS = (health, ws, chats, summaries, auth, external, openai, completions, tokenize, admin, payments, pages,
              metrics_route, embeddings)


def attach_runtime(app: QuartTrio, runtime: Runtime) -> None:
    """Give the app its runtime and the settings Quart itself reads."""
    app.extensions[RUNTIME_KEY] = runtime
    app.config["BODY_TIMEOUT"] = runtime.settings.body_timeout


def create_app(runtime: Runtime | None = None) -> QuartTrio:
    """Build the app. With `runtime`, the caller runs the tree; without, `ktulhu.asgi` attaches it."""
    app = QuartTrio("ktulhu")
    # Quart cuts every response after 60 s by default, which would end streams (SSE replies)
    # mid-way: streams end when their generation does. Request bodies (at most a few MB) get
    # KTULHU_BODY_TIMEOUT, so a client that trickles a body cannot hold a connection forever.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["JSON_SORT_KEYS"] = False
    if runtime is not None:
        attach_runtime(app, runtime)
    # The largest body any route accepts (/v1); Quart stops reading past it, whatever the framing.
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.register_error_handler(ApiError, lambda error: error.get_response())
    # Framework errors (unknown path, wrong method, body too large) answer JSON like every other error.
    app.register_error_handler(HTTPException, framework_error)
    app.register_error_handler(StoreError, store_unavailable)
    app.register_error_handler(NotRunning, not_running)
    for module in BLUEPRINTS:
        app.register_blueprint(module.blueprint)
    cors.install(app)
    metrics_route.install(app)
    install_access_log(app)
    # Outermost: every surface (rate limits, logs) sees the client behind a trusted reverse proxy.
    proxies.install(app)
    return app


def install_access_log(app: QuartTrio) -> None:
    """Request ids and the access log (`ktulhu.logs.AccessLog`); handlers find the id in `g.request_id`."""
    app.asgi_app = AccessLog(app.asgi_app)  # type: ignore[method-assign]

    @app.before_request
    async def _note_request() -> None:
        exchange = exchange_of(request.scope)
        if exchange is not None:
            g.request_id = exchange.request_id
            if request.url_rule is not None:
                exchange.route = request.url_rule.rule

    @app.before_websocket
    async def _note_websocket() -> None:
        exchange = exchange_of(websocket.scope)
        if exchange is not None:
            g.request_id = exchange.request_id
