"""The rules that move a user between plans; shared by `/payment/activate` and the webhooks.

- Paid means `payment_status == "paid"`, or a subscription checkout whose `status` is `complete`
  (a trial or 100 % coupon has nothing to pay). `status == "complete"` of a one-time payment is not
  enough: asynchronous methods complete before the money arrives.
- An admin is never demoted by a payment event; only the admin pages change an admin's role.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from ..store.records import User

__all__ = ["SESSION_ID", "is_paid", "session_user_id", "success_url", "to_free", "to_paid", "valid_session_id"]

#: Checkout session ids look like `cs_test_a1B2...`; anything else never reaches Stripe's URL.
SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]{1,250}")


def valid_session_id(value: str) -> bool:
    return SESSION_ID.fullmatch(value) is not None


def success_url(url: str) -> str:
    """The original's rule: keep `{CHECKOUT_SESSION_ID}` if present, else append it as `session_id`."""
    if "{CHECKOUT_SESSION_ID}" in url:
        return url
    return url + ("&" if "?" in url else "?") + "session_id={CHECKOUT_SESSION_ID}"


def is_paid(session: dict[str, Any]) -> bool:
    if session.get("payment_status") == "paid":
        return True
    return session.get("mode") == "subscription" and session.get("status") == "complete"


def session_user_id(session: dict[str, Any]) -> str | None:
    metadata = session.get("metadata") if isinstance(session.get("metadata"), dict) else {}
    user_id = metadata.get("user_id") or session.get("client_reference_id")
    return user_id if isinstance(user_id, str) and user_id else None


def _stripe_id(value: Any) -> str | None:
    """A Stripe reference is an id string, or an expanded object with an `id`."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def to_paid(user: User, customer: Any = None, subscription: Any = None) -> User:
    """`user` on the paid plan with the Stripe ids of its purchase; an admin keeps the admin role."""
    changes: dict[str, Any] = {}
    if user.role not in ("paid", "admin"):
        changes["role"] = "paid"
    customer_id, subscription_id = _stripe_id(customer), _stripe_id(subscription)
    if customer_id and customer_id != user.stripe_customer_id:
        changes["stripe_customer_id"] = customer_id
    if subscription_id and subscription_id != user.stripe_subscription_id:
        changes["stripe_subscription_id"] = subscription_id
    return attrs.evolve(user, **changes) if changes else user


def to_free(user: User, *, clear_subscription: bool) -> User:
    """`user` back on the free plan (subscription ended or unpaid); an admin stays admin."""
    changes: dict[str, Any] = {}
    if user.role == "paid":
        changes["role"] = "free"
    if clear_subscription and user.stripe_subscription_id is not None:
        changes["stripe_subscription_id"] = None
    return attrs.evolve(user, **changes) if changes else user
