"""The built-in chat page at `/`: try the server in a browser right after `ktulhu serve`.

One template and the scripts and stylesheets under `static/` (the page's own `chat*.js` and
`chat.css`, and the Markdown libraries vendored in `static/vendor/`); no build step and nothing
loaded from elsewhere. The page speaks the `/ws` protocol, reads history from `/chat-thread/{id}`,
and signs in through `/api/auth/*`. `/favicon.ico` answers for every page.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

from ..app_state import current_runtime
from ..templates import render_page

__all__ = ["LANGUAGES", "blueprint"]

blueprint = Blueprint("pages", __name__)

LANGUAGES = (("en", "English"), ("es", "Español"), ("pt", "Português"), ("ru", "Русский"))

_FAVICON = Path(__file__).resolve().parents[1] / "static" / "favicon.ico"


@blueprint.get("/")
async def chat_page() -> Response:
    settings = current_runtime().settings
    return render_page("chat.html", title="Ktulhu", languages=LANGUAGES,
                       max_prompt_chars=settings.max_prompt_chars,
                       google_client_id=settings.google_client_id, apple_client_id=settings.apple_client_id)


@blueprint.get("/favicon.ico")
async def favicon() -> Response:
    """Browsers ask every page's origin for it; without it every page logged a 404."""
    return Response(_FAVICON.read_bytes(), content_type="image/x-icon",
                    headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})
