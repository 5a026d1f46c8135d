"""App JWTs: what verification accepts and everything it must refuse."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.auth.tokens import InvalidToken, issue_token, verify_claims, verify_token
from ktulhu.settings import load_settings

SECRET = "test-secret-" + "0123456789abcdef" * 3


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={"JWT_SECRET": SECRET, "KTULHU_JWT_TTL": "3600"}, root=tmp_path)


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_round_trip_and_claims(settings) -> None:
    token = issue_token(settings, "user-1")
    assert verify_token(settings, token) == "user-1"
    claims = verify_claims(settings, token)
    assert claims["iss"] == settings.jwt_issuer and claims["aud"] == settings.jwt_audience
    assert claims["exp"] - claims["iat"] == 3600
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def _claims(settings, **over):
    now = int(time.time())
    base = {"sub": "user-1", "iat": now, "exp": now + 600, "iss": settings.jwt_issuer, "aud": settings.jwt_audience}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # forging HS512 with our key
def test_refuses_bad_tokens(settings) -> None:
    good = issue_token(settings, "user-1")
    head, body, sig = good.split(".")
    now = int(time.time())
    bad = {
        "expired": issue_token(settings, "user-1", now=now - 3600 - 120),
        "tampered payload": ".".join([head, _b64({**verify_claims(settings, good), "sub": "admin"}), sig]),
        "tampered signature": ".".join([head, body, sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")]),
        "alg none": ".".join([_b64({"alg": "none", "typ": "JWT"}), body, ""]),
        "alg none unsigned": jwt.encode(_claims(settings), None, algorithm="none"),
        "HS512": jwt.encode(_claims(settings), SECRET, algorithm="HS512"),
        "other secret": jwt.encode(_claims(settings), "another-secret-" + "x" * 32, algorithm="HS256"),
        "wrong aud": jwt.encode(_claims(settings, aud="someone-else"), SECRET, algorithm="HS256"),
        "wrong iss": jwt.encode(_claims(settings, iss="https://evil.example"), SECRET, algorithm="HS256"),
        "no exp": jwt.encode(_claims(settings, exp=None), SECRET, algorithm="HS256"),
        "no iat": jwt.encode(_claims(settings, iat=None), SECRET, algorithm="HS256"),
        "no aud": jwt.encode(_claims(settings, aud=None), SECRET, algorithm="HS256"),
        "no sub": jwt.encode(_claims(settings, sub=None), SECRET, algorithm="HS256"),
        "empty sub": jwt.encode(_claims(settings, sub=""), SECRET, algorithm="HS256"),
        "number sub": jwt.encode(_claims(settings, sub=42), SECRET, algorithm="HS256"),
        "not a jwt": "hello",
        "empty": "",
        "huge": "a" * 10_000,
    }
    for name, token in bad.items():
        with pytest.raises(InvalidToken):
            verify_token(settings, token)
            pytest.fail(f"accepted a token that is {name}")


@hsettings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_cleanly(text: str) -> None:
    from pathlib import Path
    import tempfile

    settings = load_settings(environ={"JWT_SECRET": SECRET}, root=Path(tempfile.gettempdir()))
    with pytest.raises(InvalidToken):
        verify_token(settings, text)
