"""Email registration and login over HTTP on the real server: shapes, enumeration, rate limits,
hostile bodies."""

from __future__ import annotations

import pytest

from ktulhu.auth.passwords import hash_password
from ktulhu.auth.tokens import verify_token

from .helpers import bearer, client, make_user, snapshot

pytestmark = pytest.mark.model

INVALID = {"error": "invalid_credentials", "message": "Invalid credentials"}


async def test_register_login_and_enumeration(live_server) -> None:
    async with live_server(KTULHU_LOGIN_RATE="0") as server:
        runtime = server.runtime
        async with client(server) as http:
            r = await http.post("/api/auth/register", json={"email": "  Alice@Example.COM ", "password": "hunter22!",
                                                            "device_hash": "dev-1"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"jwt", "user_id", "email"} and body["email"] == "alice@example.com"
            assert verify_token(runtime.settings, body["jwt"]) == body["user_id"]
            user = runtime.store.load_user(body["user_id"])
            assert user.email == "alice@example.com" and user.external_id == "email:alice@example.com"
            assert user.password_hash.startswith("$argon2id$") and "hunter22!" not in user.password_hash
            assert user.role == "free" and user.generation_count == 0
            assert [d.device_hash for d in runtime.store.list_devices_for_user(user.id)] == ["dev-1"]
            profile = await http.get("/external/api/profile", headers=bearer(body["jwt"]))
            assert profile.status_code == 200 and profile.json()["email"] == "alice@example.com"

            before = snapshot(runtime)
            again = await http.post("/api/auth/register", json={"email": "ALICE@example.com", "password": "other-pass"})
            assert again.status_code == 400 and again.json()["error"] == "email_taken"
            for bad, code in [({"email": "not-an-email", "password": "longenough"}, "invalid_email"),
                              ({"email": "bob@example.com", "password": "short"}, "weak_password"),
                              ({"email": "bob@example.com", "password": "x" * 5000}, "invalid_password")]:
                r = await http.post("/api/auth/register", json=bad)
                assert r.status_code == 422 and r.json()["error"] == code, r.text
            assert snapshot(runtime) == before

            ok = await http.post("/api/auth/login", json={"email": "alice@EXAMPLE.com ", "password": "hunter22!",
                                                          "device_hash": "dev-2"})
            assert ok.status_code == 200 and ok.json()["user_id"] == user.id
            assert ok.json()["email"] == "alice@example.com"
            assert sorted(d.device_hash for d in runtime.store.list_devices_for_user(user.id)) == ["dev-1", "dev-2"]
            # a second login from the same device updates its record instead of adding one
            await http.post("/api/auth/login", json={"email": "alice@example.com", "password": "hunter22!",
                                                     "device_hash": "dev-2"})
            assert len(runtime.store.list_devices_for_user(user.id)) == 2

            # the same answer for a wrong password, an unknown email, an OAuth-only account, junk
            make_user(runtime, email="oauth@example.com", external_id="google:123",
                      meta={"email": "oauth@example.com", "auth_methods": ["google:123"]})
            legacy_hash = await hash_password("legacy-pass")
            legacy, _ = make_user(runtime, email="legacy@example.com",
                                  meta={"email": "legacy@example.com", "password_hash": legacy_hash})
            before = snapshot(runtime)
            for attempt in [{"email": "alice@example.com", "password": "wrong-password"},
                            {"email": "nobody@example.com", "password": "hunter22!"},
                            {"email": "oauth@example.com", "password": "anything-at-all"},
                            {"email": "oauth@example.com", "password": ""},
                            {"email": "not an email", "password": "hunter22!"},
                            {"email": "alice@example.com", "password": "x" * 5000}]:
                r = await http.post("/api/auth/login", json=attempt)
                assert (r.status_code, r.json()) == (401, INVALID), attempt
            assert snapshot(runtime) == before
            # the original's legacy place for the hash still signs in
            r = await http.post("/api/auth/login", json={"email": "legacy@example.com", "password": "legacy-pass"})
            assert r.status_code == 200 and r.json()["user_id"] == legacy.id


async def test_login_rate_limits_count_failures_only(live_server) -> None:
    """Only failed logins spend, per client address and per (email, address): nobody can lock the
    owner out by failing against the owner's email from elsewhere."""
    async with live_server(KTULHU_LOGIN_RATE="3") as server:
        async with client(server, source="127.0.0.2") as http:
            r = await http.post("/api/auth/register", json={"email": "carol@example.com", "password": "carol-pass"})
            assert r.status_code == 200
            # successful logins cost nothing, however many
            for _ in range(5):
                assert (await http.post("/api/auth/login", json={"email": "carol@example.com",
                                                                 "password": "carol-pass"})).status_code == 200
        # failures from many other addresses do not lock the owner out
        for i in range(6):
            async with client(server, source=f"127.0.0.{10 + i}") as http:
                r = await http.post("/api/auth/login", json={"email": "carol@example.com", "password": "guess"})
                assert r.status_code == 401
        async with client(server, source="127.0.0.20") as http:
            r = await http.post("/api/auth/login", json={"email": "carol@example.com", "password": "carol-pass"})
            assert r.status_code == 200
        # the address that failed is limited: after 3 failures it gets 429, even with the right password
        async with client(server, source="127.0.0.10") as http:
            for _ in range(2):
                r = await http.post("/api/auth/login", json={"email": "carol@example.com", "password": "guess"})
                assert r.status_code == 401
            r = await http.post("/api/auth/login", json={"email": "carol@example.com", "password": "carol-pass"})
            assert r.status_code == 429 and r.json()["error"] == "rate_limited"
            assert 1 <= int(r.headers["Retry-After"]) <= 20
        # per address: three failures on any emails, then 429
        async with client(server, source="127.0.0.30") as http:
            statuses = [(await http.post("/api/auth/login", json={"email": f"u{i}@example.com", "password": "p"})).status_code
                        for i in range(4)]
            assert statuses == [401, 401, 401, 429]


async def test_register_probes_spend_the_failed_sign_in_budget(live_server) -> None:
    """`email_taken` is kept (clients need the new account's token), but each such answer is a failed
    probe: it spends the address's failed-sign-in budget, and while that is empty every registration
    from the address gets 429, whether or not the email exists."""
    async with live_server(KTULHU_LOGIN_RATE="3") as server:
        async with client(server, source="127.0.0.2") as http:
            r = await http.post("/api/auth/register", json={"email": "erin@example.com", "password": "erin-pass"})
            assert r.status_code == 200
        async with client(server, source="127.0.0.40") as http:
            r = await http.post("/api/auth/login", json={"email": "nobody@example.com", "password": "guess"})
            assert r.status_code == 401
            r = await http.post("/api/auth/register", json={"email": "erin@example.com", "password": "probe-pass"})
            assert r.status_code == 400 and r.json()["error"] == "email_taken"
            r = await http.post("/api/auth/login", json={"email": "nobody@example.com", "password": "guess"})
            assert r.status_code == 401
            # budget spent by one failed login, one probe, one failed login
            before = snapshot(server.runtime)
            for email in ("erin@example.com", "fresh@example.com"):
                r = await http.post("/api/auth/register", json={"email": email, "password": "probe-pass"})
                assert r.status_code == 429 and r.json()["error"] == "rate_limited", email
            assert snapshot(server.runtime) == before


HOSTILE = [
    ("text/plain", b'{"email": "e@example.com", "password": "longenough"}', 415),
    ("application/json", b'{"email": "e@example.com", "password": ', 400),
    ("application/json", b"[1, 2, 3]", 422),
    ("application/json", b'"just a string"', 422),
    ("application/json", b'{"email": 5, "password": "longenough"}', 422),
    ("application/json", b'{"email": "e@example.com", "password": ["x"]}', 422),
    ("application/json", b'{"email": "e@example.com"}', 422),
    ("application/json", b'{"email": null, "password": "longenough"}', 422),
    ("application/json", b'{"email": "e@example.com", "password": "longenough", "device_hash": "../../x"}', 422),
    ("application/json", b'{"email": "e@example.com", "password": "longenough", "device_hash": 7}', 422),
    ("application/json", b'{"email": "' + b"a" * 200_000 + b'@example.com", "password": "longenough"}', 413),
    ("application/json", b"\xff\xfe\x00", 400),
]


async def test_hostile_bodies_change_nothing(live_server) -> None:
    async with live_server(KTULHU_LOGIN_RATE="0") as server:
        runtime = server.runtime
        before = snapshot(runtime)
        async with client(server) as http:
            for route in ("/api/auth/register", "/api/auth/login", "/api/auth/google", "/api/auth/apple"):
                for content_type, raw, status in HOSTILE:
                    r = await http.post(route, content=raw, headers={"Content-Type": content_type})
                    expected = status
                    if route.endswith(("google", "apple")) and status == 422 and b"device_hash" not in raw:
                        expected = 422  # no id_token: still 422
                    assert r.status_code == expected, (route, raw[:80], r.status_code, r.text[:200])
                    body = r.json()
                    assert isinstance(body["error"], str) and isinstance(body["message"], str)
            r = await http.get("/api/auth/login")
            assert r.status_code == 405
        assert snapshot(runtime) == before
