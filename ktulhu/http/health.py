"""`/healthz` (the process answers) and `/readyz` (store, model and router are usable, doctor statuses)."""

from __future__ import annotations

from quart import Blueprint

from ..app_state import current_runtime
from .metrics import sees_internals

__all__ = ["blueprint"]

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
async def healthz() -> tuple[dict, int]:
    return {"status": "alive"}, 200


@blueprint.get("/readyz")
async def readyz() -> tuple[dict, int]:
    """503 until every component is usable; then also the status of each `ktulhu doctor` check
    (the details and fixes are on the admin overview). Component details (paths, model, router)
    only for the operator (`sees_internals`)."""
    runtime = current_runtime()
    readiness = runtime.readiness
    snapshot = readiness.snapshot()
    if not await sees_internals():  # paths, model and router details are the operator's
        snapshot["components"] = {name: {"status": c["status"]} for name, c in snapshot["components"].items()}
    if not readiness.ready:
        return snapshot, 503
    report = await runtime.doctor.report()
    return {**snapshot, "doctor": report.statuses()}, 200
