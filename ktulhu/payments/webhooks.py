"""Verified Stripe events -> plan changes, each event applied at most once.

| event | change |
|---|---|
| `checkout.session.completed`, `checkout.session.async_payment_succeeded` | paid, when the session is paid |
| `invoice.paid` | paid again (a renewal after a failed payment) |
| `invoice.payment_failed` | back to free |
| `customer.subscription.deleted` | back to free, subscription id cleared |
| `customer.subscription.updated` with status `canceled`/`unpaid`/`incomplete_expired` | back to free |

The user is found by the session's `metadata.user_id` (checkout), else by the stored
`stripe_subscription_id`, then `stripe_customer_id`, then the object's `metadata.user_id`.
An admin is never demoted. Other event types are acknowledged and ignored.

The event is marked handled in the same store write as its change (or, when it changes nothing,
after that was decided), so a failure half-way leaves it unmarked and Stripe's retry applies it;
a redelivery of an applied event finds it marked and changes nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs

from ..store.records import User
from .plans import is_paid, session_user_id, to_free, to_paid

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["HANDLED_EVENTS", "WebhookOutcome", "apply_event"]

log = logging.getLogger(__name__)

ENDED_SUBSCRIPTION = frozenset({"canceled", "unpaid", "incomplete_expired"})
HANDLED_EVENTS = (
    "checkout.session.completed", "checkout.session.async_payment_succeeded", "invoice.paid",
    "invoice.payment_failed", "customer.subscription.deleted", "customer.subscription.updated",
)


@attrs.frozen
class WebhookOutcome:
    """What an event did: `action` is paid|free|unchanged|ignored|duplicate|no_user."""

    action: str
    user_id: str | None = None
    #: The event was recorded together with a change (internal: `apply_event` records the rest).
    recorded: bool = attrs.field(default=False, eq=False, repr=False)


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _invoice_subscription(invoice: dict[str, Any]) -> str | None:
    found = _id(invoice.get("subscription"))  # API versions before 2025-03
    if found:
        return found
    parent = invoice.get("parent")
    details = parent.get("subscription_details") if isinstance(parent, dict) else None
    return _id(details.get("subscription")) if isinstance(details, dict) else None


def _metadata_user(obj: dict[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user_id if isinstance(user_id, str) and user_id else None


async def _find_user(store: Store, *, user_id: str | None, subscription: str | None,
                     customer: str | None) -> User | None:
    if subscription or customer:
        users = await store.aio.list_users()
        if subscription:
            for user in users:
                if user.stripe_subscription_id == subscription:
                    return user
        if customer:
            for user in users:
                if user.stripe_customer_id == customer:
                    return user
    if user_id:
        try:
            return await store.aio.load_user(user_id)
        except ValueError:  # InvalidId: metadata we did not write
            return None
    return None


async def _change(store: Store, event: dict[str, Any], user: User, change: Any, action: str) -> WebhookOutcome:
    """Apply `change` to `user` and record the event in one store write."""
    result = await store.aio.run(store.update_user_for_stripe_event, user.id, change, event["id"], event["type"])
    if result.status != "applied":
        return WebhookOutcome(result.status, user.id, recorded=True)
    before, updated = result.before, result.after
    if before is not None and updated.role == before.role and updated.stripe_customer_id == before.stripe_customer_id \
            and updated.stripe_subscription_id == before.stripe_subscription_id:
        return WebhookOutcome("unchanged", user.id, recorded=True)
    log.info("stripe: user %s -> %s", user.id, updated.role)
    return WebhookOutcome(action, user.id, recorded=True)


async def apply_event(store: Store, event: dict[str, Any]) -> WebhookOutcome:
    """Apply one verified event (`id` a valid store id) at most once; `duplicate` when it was
    already applied. Nothing is marked before the change is stored."""
    outcome = await _apply(store, event)
    if not outcome.recorded:
        if not await store.aio.record_stripe_event(event["id"], event["type"]):
            return WebhookOutcome("duplicate", outcome.user_id)
    return outcome


async def _apply(store: Store, event: dict[str, Any]) -> WebhookOutcome:
    kind = event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if kind not in HANDLED_EVENTS or not isinstance(obj, dict):
        return WebhookOutcome("ignored")
    if kind.startswith("checkout.session."):
        if not is_paid(obj):
            return WebhookOutcome("unchanged")
        customer, subscription = _id(obj.get("customer")), _id(obj.get("subscription"))
        checkout = _id(obj.get("id")) if obj.get("mode") == "payment" else None
        user = await _find_user(store, user_id=session_user_id(obj), subscription=None, customer=None)
        if user is None:
            user = await _find_user(store, user_id=None, subscription=subscription, customer=customer)
        if user is None:
            return WebhookOutcome("no_user")
        return await _change(store, event, user, lambda u: to_paid(u, customer, subscription, checkout=checkout),
                             "paid")
    if kind.startswith("invoice."):
        customer, subscription = _id(obj.get("customer")), _invoice_subscription(obj)
        user = await _find_user(store, user_id=None, subscription=subscription, customer=customer)
        if user is None:
            return WebhookOutcome("no_user")
        if kind == "invoice.paid":
            if subscription is None or user.stripe_subscription_id != subscription:
                return WebhookOutcome("unchanged", user.id)  # not the upgrade's subscription
            return await _change(store, event, user, lambda u: to_paid(u, customer, subscription), "paid")
        if subscription and user.stripe_subscription_id not in (None, subscription):
            return WebhookOutcome("unchanged", user.id)  # another subscription's invoice
        return await _change(store, event, user, lambda u: to_free(u, clear_subscription=False), "free")
    # customer.subscription.*
    if kind == "customer.subscription.updated" and obj.get("status") not in ENDED_SUBSCRIPTION:
        return WebhookOutcome("unchanged")
    subscription, customer = _id(obj.get("id")), _id(obj.get("customer"))
    user = await _find_user(store, user_id=_metadata_user(obj), subscription=subscription, customer=customer)
    if user is None:
        return WebhookOutcome("no_user")
    if user.stripe_subscription_id not in (None, subscription):
        return WebhookOutcome("unchanged", user.id)  # an older subscription ended; the current one stands
    return await _change(store, event, user, lambda u: to_free(u, clear_subscription=True), "free")
