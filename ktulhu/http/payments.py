"""Payment routes (original §2.5) plus the Stripe webhook and the return pages.

- `GET /payment/config` -> `{"publishable_key"}`.
- `POST /payment/create-checkout-session` (JWT or API key) -> `{"session_id", "checkout_url"}`.
- `POST /payment/activate` `{"session_id"}` (JWT or API key) -> `{"user_id", "role", "updated"}`: the
  caller's own paid session upgrades the caller while its subscription is active (never demotes an
  admin).
- `POST /payment/webhook`: Stripe-signed events (`STRIPE_WEBHOOK_SECRET`), each applied once, and
  marked handled only together with its change.
- `GET /payment/success`, `GET /payment/cancel`: where Checkout sends the browser back.

Without the three Stripe settings every route except the pages answers 503 `payments_not_configured`;
the webhook also needs `STRIPE_WEBHOOK_SECRET`.
"""

from __future__ import annotations

import logging

import orjson
import stripe
from quart import Blueprint, Response, request

from ..app_state import current_runtime
from ..auth.principal import AuthError, Principal, authenticate_bearer, bearer_token
from ..nurseries.runtime import Runtime
from ..payments.gateway import StripeFailure, StripeGateway
from ..payments.plans import (ACTIVE_SUBSCRIPTION, CheckoutAlreadyUsed, is_paid, session_user_id, stripe_id, to_paid,
                              to_paid_once, valid_session_id, valid_subscription_id)
from ..payments.webhooks import apply_event
from ..store.keys import is_valid_id
from ..store.records import User
from ..templates import render_page
from .errors import json_body, json_response, raise_error

__all__ = ["blueprint"]

log = logging.getLogger(__name__)

blueprint = Blueprint("payments", __name__)

#: Stripe's webhook payloads are small; anything bigger is not from Stripe.
MAX_WEBHOOK_BYTES = 256 * 1024
_FAILURE_STATUS = {"not_found": 404, "stripe_timeout": 504}


def _configured(runtime: Runtime) -> None:
    if not runtime.settings.payments_enabled:
        raise_error(503, "payments_not_configured",
                    "payments are not configured: set STRIPE_SECRET_KEY, STRIPE_PUBLISHABLE_KEY and STRIPE_PRICE_ID")


async def _user(runtime: Runtime) -> Principal:
    try:
        credential = bearer_token(request.headers.get("Authorization"))
        if credential is None:
            raise_error(401, "login_required", "sign in: send `Authorization: Bearer <token or API key>`")
        return await authenticate_bearer(runtime.store, runtime.settings, credential)
    except AuthError as exc:
        raise_error(401, exc.code, exc.message)


def _stripe_failed(exc: StripeFailure) -> None:
    raise_error(_FAILURE_STATUS.get(exc.code, 502), exc.code, exc.message)


@blueprint.get("/payment/config")
async def config() -> Response:
    runtime = current_runtime()
    _configured(runtime)
    return json_response({"publishable_key": runtime.settings.stripe_publishable_key})


@blueprint.post("/payment/create-checkout-session")
async def create_checkout_session() -> Response:
    runtime = current_runtime()
    principal = await _user(runtime)
    _configured(runtime)
    assert principal.user is not None
    try:
        session = await StripeGateway(runtime.settings).create_checkout_session(principal.user.id)
    except StripeFailure as exc:
        _stripe_failed(exc)
    url = session.get("url")
    if not isinstance(url, str) or not url:
        raise_error(502, "missing_checkout_url", "Stripe returned a session without a checkout URL")
    return json_response({"session_id": session.get("id"), "checkout_url": url})


@blueprint.post("/payment/activate")
async def activate() -> Response:
    """Upgrade the caller from its own paid checkout session, checked against Stripe now: the session
    must be paid and, for a subscription, the subscription `active` or `trialing` at this moment
    (409 `subscription_inactive` otherwise); a one-time session upgrades an account once (409
    `session_already_used` when replayed after a downgrade). Every refusal changes nothing."""
    runtime = current_runtime()
    principal = await _user(runtime)
    assert principal.user is not None
    body = await json_body({"session_id": ((str, None), False)}, optional_body=True)
    session_id = (body.get("session_id") or "").strip()
    if not session_id:
        raise_error(400, "session_id_required", "`session_id` is required")
    if not valid_session_id(session_id):
        raise_error(400, "invalid_session_id", "`session_id` is not a Stripe Checkout session id (cs_...)")
    _configured(runtime)
    gateway = StripeGateway(runtime.settings)
    try:
        session = await gateway.retrieve_checkout_session(session_id)
    except StripeFailure as exc:
        _stripe_failed(exc)
    owner = session_user_id(session)
    if owner is None:
        raise_error(400, "session_missing_user", "the session was not created by this server")
    if owner != principal.user.id:
        raise_error(403, "session_owner_mismatch", "this checkout session belongs to another user")
    if not is_paid(session):
        raise_error(400, "session_not_paid", "the checkout session is not paid yet")
    customer = session.get("customer")
    if session.get("mode") == "subscription":
        subscription_id = stripe_id(session.get("subscription"))
        if subscription_id is None or not valid_subscription_id(subscription_id):
            raise_error(400, "session_not_paid", "the checkout session has no subscription yet")
        try:
            subscription = await gateway.retrieve_subscription(subscription_id)
        except StripeFailure as exc:
            _stripe_failed(exc)
        sub_owner = session_user_id({"metadata": subscription.get("metadata")})
        if sub_owner is not None and sub_owner != owner:
            raise_error(403, "session_owner_mismatch", "this subscription belongs to another user")
        status = subscription.get("status")
        if status == "incomplete":
            raise_error(400, "session_not_paid", "the subscription's first payment is still processing")
        if status not in ACTIVE_SUBSCRIPTION:
            raise_error(409, "subscription_inactive",
                        f"the subscription of this checkout is {status if isinstance(status, str) else 'not active'}; "
                        "nothing changed (start a new checkout to upgrade)")

        def change(user: User) -> User:
            return to_paid(user, customer, subscription_id)
    else:
        def change(user: User) -> User:
            return to_paid_once(user, session_id, customer)

    before = await runtime.store.aio.load_user(owner)
    if before is None:
        raise_error(404, "user_not_found", "the signed-in account no longer exists")
    try:
        user = await runtime.store.aio.update_user(owner, change)
    except CheckoutAlreadyUsed:
        raise_error(409, "session_already_used",
                    "this payment upgraded the account before and the account was moved back to free since; "
                    "nothing changed")
    if user is None:
        raise_error(404, "user_not_found", "the signed-in account no longer exists")
    updated = (user.role, user.stripe_customer_id, user.stripe_subscription_id) != (
        before.role, before.stripe_customer_id, before.stripe_subscription_id)
    return json_response({"user_id": user.id, "role": user.role, "updated": updated})


@blueprint.post("/payment/webhook")
async def webhook() -> Response:
    runtime = current_runtime()
    _configured(runtime)
    secret = runtime.settings.stripe_webhook_secret
    if not secret:
        raise_error(503, "webhook_not_configured", "set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret")
    if (request.content_length or 0) > MAX_WEBHOOK_BYTES:
        raise_error(413, "body_too_large", f"webhook bodies are at most {MAX_WEBHOOK_BYTES} bytes")
    payload = await request.get_data(cache=False, as_text=False)
    if len(payload) > MAX_WEBHOOK_BYTES:
        raise_error(413, "body_too_large", f"webhook bodies are at most {MAX_WEBHOOK_BYTES} bytes")
    signature = request.headers.get("Stripe-Signature")
    if not signature:
        raise_error(400, "missing_signature", "the Stripe-Signature header is missing")
    try:
        # Verifies the signature and its age (5 minutes), then parses; we keep the plain JSON.
        stripe.Webhook.construct_event(payload.decode("utf-8"), signature, secret)
        event = orjson.loads(payload)
    except stripe.SignatureVerificationError:
        raise_error(400, "invalid_signature", "the Stripe signature does not match or is too old")
    except (UnicodeDecodeError, ValueError):
        raise_error(400, "invalid_payload", "the webhook body is not JSON")
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        raise_error(400, "invalid_payload", "the webhook body is not a Stripe event")
    if not is_valid_id(event["id"]):
        raise_error(400, "invalid_payload", "the event id is not valid")
    store = runtime.store
    if await store.aio.run(store.stripe_event_seen, event["id"]):
        return json_response({"received": True, "duplicate": True})
    # The event is recorded together with its change (or after deciding it has none), never
    # before: if anything fails here the answer is 500 and Stripe's retry applies it.
    outcome = await apply_event(runtime.store, event)
    if outcome.action == "duplicate":
        return json_response({"received": True, "duplicate": True})
    log.info("stripe webhook %s %s -> %s", event["type"], event["id"], outcome.action)
    return json_response({"received": True, "action": outcome.action})


@blueprint.get("/payment/success")
async def success() -> Response:
    return render_page("payment/result.html", title="Payment received", outcome="success",
                       session_id=request.args.get("session_id", "")[:300])


@blueprint.get("/payment/cancel")
async def cancel() -> Response:
    return render_page("payment/result.html", title="Payment cancelled", outcome="cancel", session_id="")
