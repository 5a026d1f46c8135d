"""`/healthz` (the process answers) and `/readyz` (store, model and router are usable)."""

from __future__ import annotations

from quart import Blueprint

from ..app_state import current_runtime

__all__ = ["blueprint"]

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
async def healthz() -> tuple[dict, int]:
    return {"status": "alive"}, 200


@blueprint.get("/readyz")
async def readyz() -> tuple[dict, int]:
    readiness = current_runtime().readiness
    return readiness.snapshot(), 200 if readiness.ready else 503
