"""The plan rules on their own: session id validation, paid, promotion and demotion."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from ktulhu.payments.plans import is_paid, success_url, to_free, to_paid, valid_session_id
from ktulhu.store.records import User


@given(st.text(max_size=300))
def test_an_accepted_session_id_is_url_safe(value):
    if valid_session_id(value):
        assert value.startswith("cs_") and len(value) <= 253
        assert quote(value, safe="") == value  # nothing to escape: it cannot change Stripe's path


@given(st.from_regex(r"cs_(test_|live_)?[A-Za-z0-9]{1,60}", fullmatch=True))
def test_real_looking_ids_are_accepted(value):
    assert valid_session_id(value)


def test_paid_rules():
    assert is_paid({"payment_status": "paid", "mode": "payment", "status": "complete"})
    assert is_paid({"payment_status": "no_payment_required", "mode": "subscription", "status": "complete"})
    assert not is_paid({"payment_status": "unpaid", "mode": "payment", "status": "complete"})
    assert not is_paid({"payment_status": "unpaid", "mode": "subscription", "status": "open"})
    assert not is_paid({"status": "complete_async"})


def test_success_url_rule():
    assert success_url("https://a/x") == "https://a/x?session_id={CHECKOUT_SESSION_ID}"
    assert success_url("https://a/x?y=1") == "https://a/x?y=1&session_id={CHECKOUT_SESSION_ID}"
    assert success_url("https://a/{CHECKOUT_SESSION_ID}") == "https://a/{CHECKOUT_SESSION_ID}"


def _user(role):
    return User(id="u1", created_ts=0, role=role)


@given(st.sampled_from(["free", "paid", "admin"]), st.sampled_from([None, "cus_1", {"id": "cus_2"}]))
def test_payments_never_demote_an_admin(role, customer):
    promoted = to_paid(_user(role), customer, "sub_1")
    assert promoted.role == ("admin" if role == "admin" else "paid")
    assert promoted.stripe_subscription_id == "sub_1"
    demoted = to_free(promoted, clear_subscription=True)
    assert demoted.role == ("admin" if role == "admin" else "free")
    assert demoted.stripe_subscription_id is None
