"""ASGI entry point: `hypercorn --worker-class trio ktulhu.asgi:app`.

Settings are read when the server starts (ASGI lifespan), from the working directory's env files.
"""

from .app import create_app
from .nurseries import lifespan

__all__ = ["app"]

app = create_app()
lifespan.attach(app)
