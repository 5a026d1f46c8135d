"""`/healthz` (the process answers), `/readyz` (store, model and router are usable, doctor statuses),
and `/health`, llama-server's readiness answer for its clients and load balancers."""

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


@blueprint.get("/health")
async def health() -> tuple[dict, int]:
    """As llama-server answers: 200 `{"status": "ok"}` when ready (what `/readyz` says), else 503
    `{"status": "loading", "error": {...}}` naming the components not usable yet (no details)."""
    readiness = current_runtime().readiness
    if readiness.ready:
        return {"status": "ok"}, 200
    waiting = sorted(name for name, c in readiness.components.items() if not c.usable)
    status = "stopping" if readiness.stopping else "loading"
    message = "the server is shutting down" if readiness.stopping else (
        "not ready yet: " + (", ".join(waiting) or "starting"))
    return {"status": status, "error": {"code": 503, "message": message, "type": "unavailable_error"}}, 503
