"""Payments against the real `stripe` client and a fake Stripe API on loopback."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from ktulhu.auth.api_keys import create_key
from ktulhu.auth.tokens import issue_token
from ktulhu.store.records import User, now_ms

from .fake_stripe import PRICE_ID, PUBLISHABLE_KEY, SECRET_KEY, fake_stripe, sign, stripe_env

pytestmark = pytest.mark.model


async def make_user(runtime, role: str = "free", **fields) -> tuple[User, dict[str, str]]:
    user = User(id=uuid.uuid4().hex, created_ts=now_ms(), email=f"{uuid.uuid4().hex[:8]}@example.com",
                role=role, **fields)
    await runtime.store.aio.save_user(user)
    return user, {"Authorization": f"Bearer {issue_token(runtime.settings, user.id)}"}


async def role_of(runtime, user_id: str) -> str:
    return (await runtime.store.aio.load_user(user_id)).role


async def test_unconfigured_payments_answer_503(live_server):
    async with live_server() as server:
        user, auth = await make_user(server.runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            r = await client.get("/payment/config")
            assert r.status_code == 503 and r.json()["error"] == "payments_not_configured"
            assert "STRIPE_SECRET_KEY" in r.json()["message"]
            assert (await client.post("/payment/create-checkout-session")).status_code == 401  # auth first
            r = await client.post("/payment/create-checkout-session", headers=auth)
            assert r.status_code == 503
            r = await client.post("/payment/activate", json={"session_id": "cs_test_abc"}, headers=auth)
            assert r.status_code == 503
            r = await client.post("/payment/webhook", content=b"{}", headers={"Stripe-Signature": sign(b"{}")})
            assert r.status_code == 503
            # The return pages exist either way.
            assert (await client.get("/payment/success?session_id=cs_test_x")).status_code == 200
            assert (await client.get("/payment/cancel")).status_code == 200


async def test_checkout_session_sends_the_original_fields(live_server):
    async with fake_stripe() as fake, live_server(**stripe_env(fake)) as server:
        user, auth = await make_user(server.runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/payment/config")).json() == {"publishable_key": PUBLISHABLE_KEY}
            r = await client.post("/payment/create-checkout-session", headers=auth)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["session_id"].startswith("cs_test_") and body["session_id"] in fake.sessions
            assert body["checkout_url"] == fake.sessions[body["session_id"]]["url"]
            method, path, fields, authorization = fake.requests[-1]
            assert (method, path, authorization) == ("POST", "/v1/checkout/sessions", f"Bearer {SECRET_KEY}")
            names = [k for k, _ in fields]
            # The original's fields, in its order (no customer_creation in subscription mode) ...
            original = ["mode", "success_url", "cancel_url", "automatic_tax[enabled]", "line_items[0][price]",
                        "line_items[0][quantity]", "metadata[user_id]"]
            assert [n for n in names if n in original] == original
            form = dict(fields)
            assert form["mode"] == "subscription" and "customer_creation" not in form
            assert form["success_url"] == "http://localhost:3000/payment/success?session_id={CHECKOUT_SESSION_ID}"
            assert form["cancel_url"] == "http://localhost:3000/payment/cancel"
            assert form["automatic_tax[enabled]"] == "true"
            assert form["line_items[0][price]"] == PRICE_ID and form["line_items[0][quantity]"] == "1"
            assert form["metadata[user_id]"] == user.id
            # ... plus the ids that let webhooks find the user.
            assert form["client_reference_id"] == user.id
            assert form["subscription_data[metadata][user_id]"] == user.id

            # An API key works as well as a JWT.
            _, key = await server.runtime.store.aio.run(create_key, server.runtime.store, user.id, "ci")
            r = await client.post("/payment/create-checkout-session", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200

            for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic eDp5"}):
                r = await client.post("/payment/create-checkout-session", headers=headers)
                assert r.status_code == 401, headers

            fake.fail_next = 500
            r = await client.post("/payment/create-checkout-session", headers=auth)
            assert r.status_code == 502 and r.json()["error"] == "stripe_error"
            fake.omit_url = True
            r = await client.post("/payment/create-checkout-session", headers=auth)
            assert r.status_code == 502 and r.json()["error"] == "missing_checkout_url"


async def test_payment_mode_success_url_rules(live_server):
    async with fake_stripe() as fake, live_server(**stripe_env(
            fake, STRIPE_CHECKOUT_MODE="payment",
            STRIPE_SUCCESS_URL="https://shop.example/ok?from=app")) as server:
        _, auth = await make_user(server.runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.post("/payment/create-checkout-session", headers=auth)).status_code == 200
            form = dict(fake.requests[-1][2])
            assert form["mode"] == "payment" and form["customer_creation"] == "always"
            assert form["success_url"] == "https://shop.example/ok?from=app&session_id={CHECKOUT_SESSION_ID}"
            assert "subscription_data[metadata][user_id]" not in form


async def test_activation(live_server):
    async with fake_stripe() as fake, live_server(**stripe_env(fake)) as server:
        runtime = server.runtime
        user, auth = await make_user(runtime)
        other, other_auth = await make_user(runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            session_id = (await client.post("/payment/create-checkout-session", headers=auth)).json()["session_id"]
            calls = len(fake.requests)
            for bad, code in [("", "session_id_required"), ("   ", "session_id_required"),
                              ("cs_../../v1/customers", "invalid_session_id"), ("cs_a?expand=x", "invalid_session_id"),
                              ("cs_a/b", "invalid_session_id"), ("pi_123", "invalid_session_id"),
                              ("cs_" + "a" * 300, "invalid_session_id"), ("cs_%2e%2e", "invalid_session_id")]:
                r = await client.post("/payment/activate", json={"session_id": bad}, headers=auth)
                assert r.status_code == 400 and r.json()["error"] == code, bad
            assert len(fake.requests) == calls  # nothing reached Stripe
            assert (await client.post("/payment/activate", json={"session_id": 5}, headers=auth)).status_code == 422
            assert (await client.post("/payment/activate", json={"session_id": session_id})).status_code == 401

            r = await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)
            assert r.status_code == 400 and r.json()["error"] == "session_not_paid"
            # `complete` alone is not paid for a one-time payment still processing.
            fake.complete(session_id, payment_status="unpaid", status="complete")
            fake.sessions[session_id]["mode"] = "payment"
            r = await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)
            assert r.status_code == 400 and r.json()["error"] == "session_not_paid"
            fake.sessions[session_id]["mode"] = "subscription"

            fake.complete(session_id)
            # Another user's session: 403, and neither user changes.
            r = await client.post("/payment/activate", json={"session_id": session_id}, headers=other_auth)
            assert r.status_code == 403 and r.json()["error"] == "session_owner_mismatch"
            assert await role_of(runtime, other.id) == "free" and await role_of(runtime, user.id) == "free"

            r = await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)
            assert r.status_code == 200 and r.json() == {"user_id": user.id, "role": "paid", "updated": True}
            stored = await runtime.store.aio.load_user(user.id)
            assert (stored.role, stored.stripe_customer_id, stored.stripe_subscription_id) == (
                "paid", "cus_fake_1", "sub_fake_1")
            r = await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)
            assert r.json() == {"user_id": user.id, "role": "paid", "updated": False}

            # A session without our metadata; an unknown session.
            stray = fake.add_session(None, payment_status="paid", status="complete")
            r = await client.post("/payment/activate", json={"session_id": stray["id"]}, headers=auth)
            assert r.status_code == 400 and r.json()["error"] == "session_missing_user"
            r = await client.post("/payment/activate", json={"session_id": "cs_test_unknown"}, headers=auth)
            assert r.status_code == 404
            fake.fail_next = 503
            r = await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)
            assert r.status_code == 502

            # An admin who pays stays admin.
            admin, admin_auth = await make_user(runtime, role="admin")
            fake.add_subscription("sub_adm", customer="cus_adm", metadata={"user_id": admin.id})
            session = fake.add_session(admin.id, payment_status="paid", status="complete", customer="cus_adm",
                                       subscription="sub_adm")
            r = await client.post("/payment/activate", json={"session_id": session["id"]}, headers=admin_auth)
            assert r.status_code == 200 and r.json()["role"] == "admin"
            assert await role_of(runtime, admin.id) == "admin"
            # ... and is not demoted by an old session whose subscription ended either.
            fake.set_subscription_status("sub_adm", "canceled")
            r = await client.post("/payment/activate", json={"session_id": session["id"]}, headers=admin_auth)
            assert r.status_code == 409 and await role_of(runtime, admin.id) == "admin"


async def test_activation_checks_the_subscription_now(live_server):
    """An old session replayed after a cancellation or a failed renewal changes nothing; a subscription
    checkout that is `complete` but `unpaid` is not paid."""
    async with fake_stripe() as fake, live_server(**stripe_env(fake)) as server:
        runtime = server.runtime
        user, auth = await make_user(runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            async def activate(session_id: str) -> httpx.Response:
                return await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)

            async def new_session() -> str:
                return (await client.post("/payment/create-checkout-session", headers=auth)).json()["session_id"]

            old = await new_session()
            fake.complete(old, customer="cus_r", subscription="sub_r")
            assert (await activate(old)).json()["role"] == "paid"
            assert fake.requests[-1][:2] == ("GET", "/v1/subscriptions/sub_r")  # asked Stripe, not the session

            # Cancelled (the webhook demotes): replaying the old session is refused, nothing changes.
            fake.set_subscription_status("sub_r", "canceled")
            r = await post_event(client, event("customer.subscription.deleted", {
                "id": "sub_r", "object": "subscription", "customer": "cus_r", "status": "canceled"}))
            assert r.json()["action"] == "free"
            for status in ("canceled", "past_due", "unpaid", "incomplete_expired", "paused"):
                fake.set_subscription_status("sub_r", status)
                r = await activate(old)
                assert r.status_code == 409 and r.json()["error"] == "subscription_inactive", status
                assert status in r.json()["message"]
                stored = await runtime.store.aio.load_user(user.id)
                assert (stored.role, stored.stripe_subscription_id) == ("free", None), status

            # `complete` + `unpaid` in subscription mode: not paid (the first invoice is still processing).
            pending = await new_session()
            fake.complete(pending, payment_status="unpaid", subscription="sub_p", subscription_status="incomplete")
            r = await activate(pending)
            assert r.status_code == 400 and r.json()["error"] == "session_not_paid"
            fake.sessions[pending]["payment_status"] = "paid"  # paid, but the subscription is still incomplete
            r = await activate(pending)
            assert r.status_code == 400 and r.json()["error"] == "session_not_paid"
            assert await role_of(runtime, user.id) == "free"

            # Stripe failing on the subscription, or a subscription of someone else: refused, unchanged.
            trial = await new_session()
            fake.complete(trial, payment_status="no_payment_required", subscription="sub_t",
                          subscription_status="trialing")
            fake.fail_next_subscription = 500
            assert (await activate(trial)).status_code == 502
            fake.subscriptions["sub_t"]["metadata"] = {"user_id": "someone-else"}
            r = await activate(trial)
            assert r.status_code == 403 and r.json()["error"] == "session_owner_mismatch"
            assert await role_of(runtime, user.id) == "free"

            # A trial is active: upgrades.
            fake.subscriptions["sub_t"]["metadata"] = {"user_id": user.id}
            r = await activate(trial)
            assert r.status_code == 200 and r.json() == {"user_id": user.id, "role": "paid", "updated": True}


async def test_one_time_payment_upgrades_once(live_server):
    async with fake_stripe() as fake, live_server(**stripe_env(fake, STRIPE_CHECKOUT_MODE="payment")) as server:
        runtime = server.runtime
        user, auth = await make_user(runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            async def activate(session_id: str) -> httpx.Response:
                return await client.post("/payment/activate", json={"session_id": session_id}, headers=auth)

            session_id = (await client.post("/payment/create-checkout-session", headers=auth)).json()["session_id"]
            fake.complete(session_id, subscription=None)
            assert (await activate(session_id)).json() == {"user_id": user.id, "role": "paid", "updated": True}
            assert (await activate(session_id)).json()["updated"] is False  # a refresh of the success page
            # moved back to free (an admin, after a refund): the old session does not upgrade again
            await runtime.store.aio.update_user(user.id, lambda u: _with_role(u, "free"))
            r = await activate(session_id)
            assert r.status_code == 409 and r.json()["error"] == "session_already_used"
            assert await role_of(runtime, user.id) == "free"

            # a payment the webhook applied counts as used as well
            other = (await client.post("/payment/create-checkout-session", headers=auth)).json()["session_id"]
            session = fake.complete(other, customer="cus_o", subscription=None)
            r = await post_event(client, event("checkout.session.completed", session))
            assert r.json()["action"] == "paid"
            await runtime.store.aio.update_user(user.id, lambda u: _with_role(u, "free"))
            assert (await activate(other)).status_code == 409
            assert await role_of(runtime, user.id) == "free"


def event(kind: str, obj: dict, event_id: str | None = None) -> bytes:
    return json.dumps({"id": event_id or "evt_" + uuid.uuid4().hex, "object": "event", "type": kind,
                       "created": int(time.time()), "data": {"object": obj}}).encode()


async def post_event(client, payload: bytes, signature: str | None = None) -> httpx.Response:
    return await client.post("/payment/webhook", content=payload,
                             headers={"Content-Type": "application/json",
                                      "Stripe-Signature": sign(payload) if signature is None else signature})


async def test_webhooks(live_server):
    async with fake_stripe() as fake, live_server(**stripe_env(fake)) as server:
        runtime = server.runtime
        user, _ = await make_user(runtime)
        completed = event("checkout.session.completed", {
            "id": "cs_test_hook", "object": "checkout.session", "mode": "subscription", "status": "complete",
            "payment_status": "paid", "metadata": {"user_id": user.id}, "customer": "cus_w1", "subscription": "sub_w1"})
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            # Forged, tampered, stale or unsigned: 400 and nothing changes.
            for signature in (sign(completed, secret="whsec_wrong"), "t=1,v1=00", "garbage", "",
                              sign(completed, timestamp=int(time.time()) - 3600)):
                r = await post_event(client, completed, signature)
                assert r.status_code == 400, signature
            tampered = completed.replace(user.id.encode(), b"someone_else")
            assert (await post_event(client, tampered, sign(completed))).status_code == 400
            assert (await client.post("/payment/webhook", content=completed)).status_code == 400
            assert await role_of(runtime, user.id) == "free"
            not_json = b"not json"
            assert (await post_event(client, not_json)).status_code == 400

            r = await post_event(client, completed)
            assert r.status_code == 200 and r.json()["action"] == "paid"
            stored = await runtime.store.aio.load_user(user.id)
            assert (stored.role, stored.stripe_customer_id, stored.stripe_subscription_id) == ("paid", "cus_w1", "sub_w1")

            # A redelivered event (fresh signature, same id) is acknowledged and changes nothing.
            await runtime.store.aio.update_user(user.id, lambda u: _with_role(u, "free"))
            r = await post_event(client, completed)
            assert r.status_code == 200 and r.json() == {"received": True, "duplicate": True}
            assert await role_of(runtime, user.id) == "free"
            await runtime.store.aio.update_user(user.id, lambda u: _with_role(u, "paid"))

            # Payment failed -> free (found by subscription id); renewal paid -> paid again.
            r = await post_event(client, event("invoice.payment_failed", {
                "id": "in_1", "object": "invoice", "customer": "cus_w1", "subscription": "sub_w1"}))
            assert r.json()["action"] == "free" and await role_of(runtime, user.id) == "free"
            r = await post_event(client, event("invoice.paid", {
                "id": "in_2", "object": "invoice", "customer": "cus_w1",
                "parent": {"subscription_details": {"subscription": "sub_w1"}}}))
            assert r.json()["action"] == "paid" and await role_of(runtime, user.id) == "paid"

            # Subscription deleted -> free, subscription id cleared (found by customer id here).
            r = await post_event(client, event("customer.subscription.deleted", {
                "id": "sub_w1", "object": "subscription", "customer": "cus_w1", "status": "canceled"}))
            assert r.json()["action"] == "free"
            stored = await runtime.store.aio.load_user(user.id)
            assert stored.role == "free" and stored.stripe_subscription_id is None and stored.stripe_customer_id == "cus_w1"

            # Found by metadata.user_id when no stored id matches.
            meta_user, _ = await make_user(runtime, role="paid")
            r = await post_event(client, event("customer.subscription.deleted", {
                "id": "sub_other", "object": "subscription", "customer": "cus_other",
                "metadata": {"user_id": meta_user.id}}))
            assert r.json()["action"] == "free" and await role_of(runtime, meta_user.id) == "free"

            # An admin is never demoted, and never turned into "paid".
            admin, _ = await make_user(runtime, role="admin", stripe_customer_id="cus_adm",
                                       stripe_subscription_id="sub_adm")
            for kind, obj in [
                ("customer.subscription.deleted", {"id": "sub_adm", "object": "subscription", "customer": "cus_adm"}),
                ("invoice.payment_failed", {"id": "in_3", "object": "invoice", "customer": "cus_adm",
                                            "subscription": "sub_adm"}),
                ("checkout.session.completed", {"id": "cs_test_adm", "mode": "subscription", "status": "complete",
                                                "payment_status": "paid", "metadata": {"user_id": admin.id}}),
            ]:
                r = await post_event(client, event(kind, obj))
                assert r.status_code == 200
                assert await role_of(runtime, admin.id) == "admin", kind

            # Unknown users and other event types are acknowledged without changes.
            r = await post_event(client, event("customer.subscription.deleted", {"id": "sub_nobody", "customer": "cus_nobody"}))
            assert r.status_code == 200 and r.json()["action"] == "no_user"
            r = await post_event(client, event("charge.refunded", {"id": "ch_1"}))
            assert r.status_code == 200 and r.json()["action"] == "ignored"
            r = await post_event(client, event("checkout.session.completed", {"id": "cs_x", "metadata": {"user_id": "../x"},
                                                                             "payment_status": "paid"}))
            assert r.status_code == 200 and r.json()["action"] == "no_user"
            bad_id = event("checkout.session.completed", {}, event_id="evt:bad")
            assert (await post_event(client, bad_id)).status_code == 400
            huge = event("checkout.session.completed", {"pad": "x" * 300_000})
            assert (await post_event(client, huge)).status_code == 413


async def test_webhook_failure_mid_way_is_applied_by_the_retry(live_server, monkeypatch):
    """An event is marked handled only with its change: a failure half-way answers 500 and leaves it
    unmarked, so Stripe's retry applies it; a retry after that changes nothing."""
    from ktulhu.payments import webhooks

    real, calls = webhooks.to_paid, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the store failed half-way")
        return real(*args, **kwargs)

    monkeypatch.setattr(webhooks, "to_paid", failing_once)
    async with fake_stripe() as fake, live_server(**stripe_env(fake)) as server:
        runtime = server.runtime
        user, _ = await make_user(runtime)
        completed = event("checkout.session.completed", {
            "id": "cs_test_retry", "object": "checkout.session", "mode": "subscription", "status": "complete",
            "payment_status": "paid", "metadata": {"user_id": user.id}, "customer": "cus_x", "subscription": "sub_x"})
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            r = await post_event(client, completed)
            assert r.status_code == 500
            assert await role_of(runtime, user.id) == "free"
            r = await post_event(client, completed)  # Stripe's retry: same event id
            assert r.status_code == 200 and r.json()["action"] == "paid"
            assert await role_of(runtime, user.id) == "paid"
            await runtime.store.aio.update_user(user.id, lambda u: _with_role(u, "free"))
            r = await post_event(client, completed)
            assert r.json() == {"received": True, "duplicate": True}
            assert await role_of(runtime, user.id) == "free"
            # events that change nothing are recorded too, after being looked at
            ignored = event("charge.refunded", {"id": "ch_1"})
            assert (await post_event(client, ignored)).json()["action"] == "ignored"
            assert (await post_event(client, ignored)).json() == {"received": True, "duplicate": True}


def _with_role(user: User, role: str) -> User:
    user.role = role
    return user


async def test_webhook_needs_its_secret(live_server):
    async with fake_stripe() as fake, live_server(**stripe_env(fake, STRIPE_WEBHOOK_SECRET="")) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            payload = event("checkout.session.completed", {})
            r = await post_event(client, payload)
            assert r.status_code == 503 and "STRIPE_WEBHOOK_SECRET" in r.json()["message"]


async def test_return_pages_escape_the_session_id(live_server):
    async with live_server() as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            r = await client.get("/payment/success", params={"session_id": "<script>alert(1)</script>"})
            assert r.status_code == 200 and "<script>alert(1)" not in r.text and "&lt;script&gt;" in r.text
            assert "Content-Security-Policy" in r.headers
            r = await client.get("/payment/cancel")
            assert "cancelled" in r.text
