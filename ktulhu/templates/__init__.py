"""Server-rendered pages: one autoescaping Jinja2 environment and the headers every page carries.

Pages hold no inline script or style; data reaches them through JSON routes and is inserted with
`textContent`, and the Content-Security-Policy below forbids anything else from running.
"""

from __future__ import annotations

from typing import Any

import jinja2
from quart import Response

__all__ = ["CSP", "PAGE_HEADERS", "environment", "render_page"]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

environment = jinja2.Environment(
    loader=jinja2.PackageLoader("ktulhu", "templates"),
    autoescape=True,  # every template, whatever its extension
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def render_page(template: str, status: int = 200, **context: Any) -> Response:
    """Render `template` as an HTML response with the page security headers."""
    html = environment.get_template(template).render(**context)
    return Response(html, status=status, content_type="text/html; charset=utf-8", headers=PAGE_HEADERS)
