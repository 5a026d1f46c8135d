"""A small fake of Stripe's Checkout Sessions API on loopback, for the real `stripe` client.

Implements `POST /v1/checkout/sessions` (form-encoded, as Stripe), `GET /v1/checkout/sessions/{id}`
and `GET /v1/subscriptions/{id}` (a completed subscription checkout creates its subscription, whose
`status` tests then move: `active`, `trialing`, `past_due`, `canceled`...), checks the secret key,
answers Stripe-shaped errors, and keeps every request so tests can assert the exact fields sent.
`sign()` signs webhook payloads exactly as Stripe does (`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<payload>">`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

SECRET_KEY = "sk_test_fake_0123456789"
PUBLISHABLE_KEY = "pk_test_fake_0123456789"
PRICE_ID = "price_fake_upgrade"
WEBHOOK_SECRET = "whsec_fake_0123456789abcdef"


@attrs.define
class FakeStripe:
    url: str = ""
    sessions: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    subscriptions: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: (method, path, ordered form fields, Authorization header) of every request.
    requests: list[tuple[str, str, list[tuple[str, str]], str | None]] = attrs.field(factory=list)
    #: When set, the next API call answers this status with a Stripe error.
    fail_next: int | None = None
    omit_url: bool = False
    #: When set, the next subscription retrieval answers this status with a Stripe error.
    fail_next_subscription: int | None = None

    def complete(self, session_id: str, *, payment_status: str = "paid", status: str = "complete",
                 customer: str | None = "cus_fake_1", subscription: str | None = "sub_fake_1",
                 subscription_status: str = "active") -> dict[str, Any]:
        """Complete a checkout; in subscription mode its subscription exists from then on."""
        session = self.sessions[session_id]
        session.update(payment_status=payment_status, status=status, customer=customer, subscription=subscription)
        if session["mode"] == "subscription" and subscription:
            self.add_subscription(subscription, status=subscription_status, customer=customer,
                                  metadata=dict(session.get("metadata") or {}))
        return session

    def add_subscription(self, subscription_id: str, *, status: str = "active", customer: str | None = "cus_fake_1",
                         metadata: dict[str, str] | None = None) -> dict[str, Any]:
        subscription = {"id": subscription_id, "object": "subscription", "status": status, "customer": customer,
                        "metadata": metadata or {}, "livemode": False}
        self.subscriptions[subscription_id] = subscription
        return subscription

    def set_subscription_status(self, subscription_id: str, status: str) -> None:
        self.subscriptions[subscription_id]["status"] = status

    def add_session(self, user_id: str | None, **fields: Any) -> dict[str, Any]:
        """A session made outside our server (another shop, or crafted)."""
        session_id = "cs_test_" + secrets.token_hex(12)
        session = _session(session_id, "subscription", {"user_id": user_id} if user_id else {}, None)
        session.update(fields)
        self.sessions[session_id] = session
        return session


def _session(session_id: str, mode: str, metadata: dict[str, str], reference: str | None) -> dict[str, Any]:
    return {"id": session_id, "object": "checkout.session", "mode": mode, "status": "open",
            "payment_status": "unpaid", "metadata": metadata, "client_reference_id": reference,
            "customer": None, "subscription": None,
            "url": f"https://checkout.stripe.test/c/pay/{session_id}", "livemode": False}


def _error(status: int, message: str, code: str | None = None) -> Response:
    import json

    body = {"error": {"type": "invalid_request_error" if status < 500 else "api_error", "message": message}}
    if code:
        body["error"]["code"] = code
    return Response(json.dumps(body), status=status, content_type="application/json")


def create_app(fake: FakeStripe) -> QuartTrio:
    app = QuartTrio("fake_stripe")

    def check() -> Response | None:
        if request.headers.get("Authorization") != f"Bearer {SECRET_KEY}":
            return _error(401, "Invalid API Key provided")
        if fake.fail_next is not None:
            status, fake.fail_next = fake.fail_next, None
            return _error(status, "Something went wrong on Stripe's end")
        return None

    @app.post("/v1/checkout/sessions")
    async def create() -> Response:
        raw = (await request.get_data(as_text=True)) or ""
        fields = parse_qsl(raw, keep_blank_values=True)
        fake.requests.append(("POST", request.path, fields, request.headers.get("Authorization")))
        if (failure := check()) is not None:
            return failure
        form = dict(fields)
        if form.get("mode") not in ("payment", "subscription"):
            return _error(400, "Invalid mode")
        if not form.get("line_items[0][price]"):
            return _error(400, "Missing line_items")
        session_id = "cs_test_" + secrets.token_hex(12)
        metadata = {k[len("metadata["):-1]: v for k, v in fields if k.startswith("metadata[")}
        session = _session(session_id, form["mode"], metadata, form.get("client_reference_id"))
        session["success_url"] = form.get("success_url")
        session["cancel_url"] = form.get("cancel_url")
        if fake.omit_url:
            session["url"] = None
        fake.sessions[session_id] = session
        return _json(session)

    @app.get("/v1/checkout/sessions/<session_id>")
    async def retrieve(session_id: str) -> Response:
        fake.requests.append(("GET", request.path, [], request.headers.get("Authorization")))
        if (failure := check()) is not None:
            return failure
        session = fake.sessions.get(session_id)
        if session is None:
            return _error(404, f"No such checkout.session: '{session_id}'", "resource_missing")
        return _json(session)

    @app.get("/v1/subscriptions/<subscription_id>")
    async def retrieve_subscription(subscription_id: str) -> Response:
        fake.requests.append(("GET", request.path, [], request.headers.get("Authorization")))
        if (failure := check()) is not None:
            return failure
        if fake.fail_next_subscription is not None:
            status, fake.fail_next_subscription = fake.fail_next_subscription, None
            return _error(status, "Something went wrong on Stripe's end")
        subscription = fake.subscriptions.get(subscription_id)
        if subscription is None:
            return _error(404, f"No such subscription: '{subscription_id}'", "resource_missing")
        return _json(subscription)

    return app


def _json(obj: Any) -> Response:
    import json

    return Response(json.dumps(obj), status=200, content_type="application/json")


@asynccontextmanager
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    """Serve a `FakeStripe` on 127.0.0.1 (any free port) for the duration of the block."""
    fake = FakeStripe()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, create_app(fake), config))
        fake.url = binds[0]
        yield fake
        nursery.cancel_scope.cancel()


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header for `payload`, computed as Stripe computes it."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def stripe_env(fake: FakeStripe, **extra: str) -> dict[str, str]:
    return {"STRIPE_SECRET_KEY": SECRET_KEY, "STRIPE_PUBLISHABLE_KEY": PUBLISHABLE_KEY, "STRIPE_PRICE_ID": PRICE_ID,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "KTULHU_STRIPE_API_BASE": fake.url, **extra}
