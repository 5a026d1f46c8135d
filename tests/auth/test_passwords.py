"""Email validation, the password policy, and argon2 hashing off the trio thread."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from ktulhu.auth.passwords import (MAX_PASSWORD, PolicyError, check_new_password, hash_password,
                                   normalise_email, valid_email, verify_password)
from ktulhu.store.records import User


@pytest.mark.parametrize("email", ["a@example.com", "first.last+tag@sub.example.co.uk", "x_y-z@xn--bcher-kva.example",
                                   "o'brien@example.ie"])
def test_valid_emails(email: str) -> None:
    assert valid_email(email)


@pytest.mark.parametrize("email", ["", "a", "@example.com", "a@", "a@b", "a@@example.com", "a b@example.com",
                                   "a@example..com", "a@-example.com", "a@example.c0m", ".a@example.com",
                                   "a.@example.com", "a@example.com\n", "a\x00@example.com",
                                   "x" * 65 + "@example.com", "a@" + "b" * 250 + ".com", "ü@example.com"])
def test_invalid_emails(email: str) -> None:
    assert not valid_email(email)


@given(st.text(max_size=80))
def test_email_check_never_raises(text: str) -> None:
    normalised = normalise_email(text)
    assert valid_email(normalised) in (True, False)
    if valid_email(normalised):
        assert normalised == normalised.strip().lower() and normalised.count("@") == 1


def test_password_policy() -> None:
    check_new_password("12345678", 8)
    with pytest.raises(PolicyError) as short:
        check_new_password("1234567", 8)
    assert short.value.code == "weak_password" and "8" in short.value.message
    with pytest.raises(PolicyError):
        check_new_password("x" * (MAX_PASSWORD + 1), 8)
    with pytest.raises(PolicyError):
        check_new_password("abc\x00defgh", 8)


async def test_hash_and_verify() -> None:
    hashed = await hash_password("correct horse")
    assert hashed.startswith("$argon2id$")
    assert await verify_password(hashed, "correct horse")
    assert not await verify_password(hashed, "wrong horse")
    assert not await verify_password(None, "anything")  # costs a dummy verification, still False
    assert not await verify_password("not-a-hash", "x")
    assert not await verify_password(hashed, "x" * (MAX_PASSWORD + 5))
    legacy = User(id="u1", created_ts=0, meta={"password_hash": hashed})
    from ktulhu.auth.passwords import stored_hash

    assert stored_hash(legacy) == hashed and stored_hash(None) is None
