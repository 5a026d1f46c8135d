"""The built-in chat page at `/`: try the server in a browser right after `ktulhu serve`.

One template, one script (`static/chat.js`) and one stylesheet; no build step and nothing loaded
from elsewhere. The page speaks the `/ws` protocol and reads history from `/chat-thread/{id}`.
"""

from __future__ import annotations

from quart import Blueprint, Response

from ..templates import render_page

__all__ = ["LANGUAGES", "blueprint"]

blueprint = Blueprint("pages", __name__)

LANGUAGES = (("en", "English"), ("es", "Español"), ("pt", "Português"), ("ru", "Русский"))


@blueprint.get("/")
async def chat_page() -> Response:
    return render_page("chat.html", title="Ktulhu", languages=LANGUAGES)
