"""The rules that move a user between plans; shared by `/payment/activate` and the webhooks.

- A checkout session is paid when `payment_status == "paid"`, or when it is `complete` with
  `payment_status == "no_payment_required"` (a trial or 100 % coupon). `status == "complete"` alone
  is not enough, for subscriptions as for one-time payments: asynchronous methods complete before
  the money arrives.
- Activation (`/payment/activate`) also asks Stripe for the session's subscription and upgrades only
  while it is `active` or `trialing`: an old session replayed after a cancellation or a failed
  renewal changes nothing. A one-time payment session upgrades an account once: replayed after the
  account was moved back to free (by an admin, say) it changes nothing.
- An admin is never demoted by a payment event; only the admin pages change an admin's role.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from ..store.records import User

__all__ = ["ACTIVE_SUBSCRIPTION", "CHECKOUTS", "CheckoutAlreadyUsed", "SESSION_ID", "SUBSCRIPTION_ID", "is_paid",
           "session_user_id", "stripe_id", "success_url", "to_free", "to_paid", "to_paid_once",
           "valid_session_id", "valid_subscription_id"]

#: Checkout session ids look like `cs_test_a1B2...`; anything else never reaches Stripe's URL.
SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]{1,250}")
#: Subscription ids look like `sub_1Abc...`; checked before they go into Stripe's URL.
SUBSCRIPTION_ID = re.compile(r"sub_[A-Za-z0-9_]{1,250}")
#: Subscription statuses that are paid for now (a trial counts).
ACTIVE_SUBSCRIPTION = frozenset({"active", "trialing"})
#: `User.meta` key: one-time checkout sessions that already upgraded the account (newest last).
CHECKOUTS = "stripe_checkouts"
_MAX_CHECKOUTS = 50


class CheckoutAlreadyUsed(Exception):
    """A one-time checkout session that upgraded the account before, replayed after a downgrade."""


def valid_session_id(value: str) -> bool:
    return SESSION_ID.fullmatch(value) is not None


def valid_subscription_id(value: str) -> bool:
    return SUBSCRIPTION_ID.fullmatch(value) is not None


def success_url(url: str) -> str:
    """The original's rule: keep `{CHECKOUT_SESSION_ID}` if present, else append it as `session_id`."""
    if "{CHECKOUT_SESSION_ID}" in url:
        return url
    return url + ("&" if "?" in url else "?") + "session_id={CHECKOUT_SESSION_ID}"


def is_paid(session: dict[str, Any]) -> bool:
    if session.get("payment_status") == "paid":
        return True
    return session.get("payment_status") == "no_payment_required" and session.get("status") == "complete"


def session_user_id(session: dict[str, Any]) -> str | None:
    metadata = session.get("metadata") if isinstance(session.get("metadata"), dict) else {}
    user_id = metadata.get("user_id") or session.get("client_reference_id")
    return user_id if isinstance(user_id, str) and user_id else None


def stripe_id(value: Any) -> str | None:
    """A Stripe reference is an id string, or an expanded object with an `id`."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


_stripe_id = stripe_id


def to_paid(user: User, customer: Any = None, subscription: Any = None, *, checkout: str | None = None) -> User:
    """`user` on the paid plan with the Stripe ids of its purchase; an admin keeps the admin role.
    `checkout`: a one-time payment session to remember (see `to_paid_once`)."""
    changes: dict[str, Any] = {}
    if user.role not in ("paid", "admin"):
        changes["role"] = "paid"
    customer_id, subscription_id = _stripe_id(customer), _stripe_id(subscription)
    if customer_id and customer_id != user.stripe_customer_id:
        changes["stripe_customer_id"] = customer_id
    if subscription_id and subscription_id != user.stripe_subscription_id:
        changes["stripe_subscription_id"] = subscription_id
    if checkout and checkout not in _checkouts(user):
        meta = dict(user.meta) if isinstance(user.meta, dict) else {"email": user.email, "auth_methods": []}
        meta[CHECKOUTS] = [*_checkouts(user), checkout][-_MAX_CHECKOUTS:]
        changes["meta"] = meta
    return attrs.evolve(user, **changes) if changes else user


def to_paid_once(user: User, checkout: str, customer: Any = None) -> User:
    """`to_paid` for a one-time payment session; raises `CheckoutAlreadyUsed` when the session
    upgraded this account before and the account is no longer paid (replay after a downgrade).
    Run it inside the store's read-modify-write, so the check and the upgrade are one step."""
    if checkout in _checkouts(user) and user.role not in ("paid", "admin"):
        raise CheckoutAlreadyUsed(checkout)
    return to_paid(user, customer, None, checkout=checkout)


def _checkouts(user: User) -> list[str]:
    found = user.meta.get(CHECKOUTS) if isinstance(user.meta, dict) else None
    return [c for c in found if isinstance(c, str)] if isinstance(found, list) else []


def to_free(user: User, *, clear_subscription: bool) -> User:
    """`user` back on the free plan (subscription ended or unpaid); an admin stays admin."""
    changes: dict[str, Any] = {}
    if user.role == "paid":
        changes["role"] = "free"
    if clear_subscription and user.stripe_subscription_id is not None:
        changes["stripe_subscription_id"] = None
    return attrs.evolve(user, **changes) if changes else user
