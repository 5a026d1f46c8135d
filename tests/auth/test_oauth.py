"""Google and Apple sign-in against local key servers: real JWKS fetching, caching and RS256
verification, and the account-linking rules."""

from __future__ import annotations

import time

import jwt
import pytest
import trio
import trio.testing

from ktulhu.auth.tokens import verify_token

from .fake_idp import APPLE_ISS, GOOGLE_ISS, fake_idp, new_key
from .helpers import bearer, client, snapshot

pytestmark = pytest.mark.model


def _env(google, apple, **more):
    return {"GOOGLE_CLIENT_ID": "google-client", "APPLE_CLIENT_ID": "apple-client",
            "KTULHU_GOOGLE_JWKS_URL": google.url, "KTULHU_APPLE_JWKS_URL": apple.url, "KTULHU_LOGIN_RATE": "0",
            **more}


async def test_google_and_apple_sign_in_and_linking(live_server) -> None:
    async with fake_idp() as google, fake_idp() as apple, live_server(**_env(google, apple)) as server:
        runtime = server.runtime
        store = runtime.store
        async with client(server) as http:
            # a new Google account with a verified email
            token = google.token(sub="g-1", email="Gina@Example.com", email_verified=True)
            r = await http.post("/api/auth/google", json={"id_token": token, "device_hash": "dev-g"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body) == {"jwt", "user_id", "email"} and body["email"] == "gina@example.com"
            assert verify_token(runtime.settings, body["jwt"]) == body["user_id"]
            gina = store.load_user(body["user_id"])
            assert gina.external_id == "google:g-1" and gina.meta["auth_methods"] == ["google:g-1"]
            assert [d.device_hash for d in store.list_devices_for_user(gina.id)] == ["dev-g"]
            # the same person again (device_hash is optional): the same account, keys from the cache
            r = await http.post("/api/auth/google", json={"id_token": google.token(sub="g-1", email="gina@example.com")})
            assert r.status_code == 200 and r.json()["user_id"] == gina.id
            assert google.hits == 1

            # Apple: answers the real email, never the provider id
            r = await http.post("/api/auth/apple", json={"id_token": apple.token(
                iss=APPLE_ISS, aud="apple-client", sub="a-1", email="ann@privaterelay.appleid.com",
                email_verified="true")})
            assert r.status_code == 200, r.text
            assert r.json()["email"] == "ann@privaterelay.appleid.com"
            ann = store.load_user(r.json()["user_id"])
            assert ann.external_id == "apple:a-1"
            # Apple with the same verified email as the Google account links to it
            r = await http.post("/api/auth/apple", json={"id_token": apple.token(
                iss=APPLE_ISS, aud="apple-client", sub="a-2", email="gina@example.com", email_verified=True)})
            assert r.status_code == 200 and r.json()["user_id"] == gina.id
            gina = store.load_user(gina.id)
            assert gina.meta["auth_methods"] == ["google:g-1", "apple:a-2"]

            # an unverified Google email is never trusted: no merge, and the new account has no email
            before_gina = store.load_user(gina.id)
            r = await http.post("/api/auth/google", json={"id_token": google.token(
                sub="g-evil", email="gina@example.com", email_verified=False)})
            assert r.status_code == 200
            assert r.json()["user_id"] != gina.id and r.json()["email"] is None
            assert store.load_user(r.json()["user_id"]).email is None
            assert store.load_user(gina.id) == before_gina
            # missing email_verified counts as unverified
            r = await http.post("/api/auth/google", json={"id_token": google.token(
                sub="g-evil2", email="gina@example.com", drop=("email_verified",))})
            assert r.json()["user_id"] != gina.id and r.json()["email"] is None

            # pre-account takeover: someone registered victim@example.com with a password; the verified
            # owner signs in with Google and gets the account; the squatter's password, JWT and keys die
            squat = (await http.post("/api/auth/register", json={"email": "victim@example.com",
                                                                 "password": "squatter-pass"})).json()
            # A real second, on purpose: a takeover revokes the JWTs issued before its second (`iat` and
            # `sessions_after` are whole Unix seconds of time.time(), which the server reads with no way
            # to inject a clock), so a squatter's token from the takeover's own second would survive.
            await trio.sleep(1.1)
            key = (await http.post("/external/api/keys", headers=bearer(squat["jwt"]), json={"name": "k"})).json()["key"]
            assert (await http.get("/external/api/usage", headers=bearer(key))).status_code == 200
            r = await http.post("/api/auth/google", json={"id_token": google.token(
                sub="g-victim", email="victim@example.com", email_verified=True)})
            assert r.status_code == 200 and r.json()["user_id"] == squat["user_id"]
            owner_jwt = r.json()["jwt"]
            victim = store.load_user(squat["user_id"])
            assert victim.password_hash is None and "google:g-victim" in victim.meta["auth_methods"]
            login = await http.post("/api/auth/login", json={"email": "victim@example.com", "password": "squatter-pass"})
            assert login.status_code == 401 and login.json()["error"] == "invalid_credentials"
            assert (await http.get("/external/api/usage", headers=bearer(squat["jwt"]))).status_code == 401
            assert (await http.get("/external/api/usage", headers=bearer(key))).status_code == 401
            assert (await http.get("/external/api/usage", headers=bearer(owner_jwt))).status_code == 200
            # an OAuth-only account cannot be signed into with a password (same error as always)
            r = await http.post("/api/auth/login", json={"email": "gina@example.com", "password": "whatever!"})
            assert r.status_code == 401 and r.json() == {"error": "invalid_credentials", "message": "Invalid credentials"}


async def test_id_token_verification_failures(live_server) -> None:
    async with fake_idp() as google, fake_idp() as apple, live_server(**_env(google, apple)) as server:
        runtime = server.runtime
        stranger = new_key()
        kid = next(iter(google.keys))
        now = int(time.time())
        bad = {
            "expired": google.token(exp_in=-3600),
            "wrong audience": google.token(aud="someone-else"),
            "wrong issuer": google.token(iss="https://evil.example"),
            "apple issuer at google": google.token(iss=APPLE_ISS),
            "signed by a stranger": google.token(kid=kid, key=stranger),
            "unknown kid": jwt.encode({"iss": GOOGLE_ISS, "aud": "google-client", "sub": "x", "iat": now,
                                       "exp": now + 60}, stranger, algorithm="RS256", headers={"kid": "nope"}),
            "HS256 with the public key": jwt.encode({"iss": GOOGLE_ISS, "aud": "google-client", "sub": "x", "iat": now,
                                                     "exp": now + 60}, "k" * 40, algorithm="HS256",
                                                    headers={"kid": kid}),
            "alg none": jwt.encode({"iss": GOOGLE_ISS, "aud": "google-client", "sub": "x", "iat": now, "exp": now + 60},
                                   None, algorithm="none", headers={"kid": kid}),
            "no kid": jwt.encode({"iss": GOOGLE_ISS, "aud": "google-client", "sub": "x", "iat": now, "exp": now + 60},
                                 google.keys[kid], algorithm="RS256"),
            "no sub": google.token(drop=("sub",)),
            "no exp": google.token(drop=("exp",)),
            "tampered": google.token()[:-6] + "AAAAAA",
            "garbage": "not.a.jwt",
            "empty": "",
        }
        before = snapshot(runtime)
        async with client(server) as http:
            for name, token in bad.items():
                r = await http.post("/api/auth/google", json={"id_token": token})
                assert r.status_code == 401, (name, r.text)
                assert r.json()["error"] == "invalid_id_token", name
            # Apple checks its own issuer and audience
            r = await http.post("/api/auth/apple", json={"id_token": apple.token(iss=GOOGLE_ISS, aud="apple-client")})
            assert r.status_code == 401
            r = await http.post("/api/auth/apple", json={"id_token": apple.token(iss=APPLE_ISS, aud="google-client")})
            assert r.status_code == 401
        assert snapshot(runtime) == before


async def test_key_rotation_ttl_and_provider_outage(live_server, mock_clock: trio.testing.MockClock) -> None:
    # The key cache keeps time on trio's clock: this one runs at real speed (the servers' own timeouts
    # work as usual), and the test jumps it past the cache's TTL instead of sleeping.
    mock_clock.rate = 1.0
    async with fake_idp() as google, fake_idp() as apple, live_server(**_env(google, apple, KTULHU_JWKS_TTL="2")) as server:
        async with client(server) as http:
            ok = await http.post("/api/auth/google", json={"id_token": google.token(sub="r-1")})
            assert ok.status_code == 200 and google.hits == 1
            # a new key id refetches at once (within the TTL)
            new_kid = google.add_key()
            r = await http.post("/api/auth/google", json={"id_token": google.token(kid=new_kid, sub="r-1")})
            assert r.status_code == 200 and r.json()["user_id"] == ok.json()["user_id"]
            assert google.hits == 2
            # a token with a known key id but the wrong key: 401, no fetch
            r = await http.post("/api/auth/google", json={"id_token": google.token(kid=new_kid, key=new_key())})
            assert r.status_code == 401 and google.hits == 2
            # tokens with made-up key ids do not hammer the provider: at most one fetch a second
            started = trio.current_time()

            async def made_up(i: int) -> None:
                token = jwt.encode({"iss": GOOGLE_ISS, "aud": "google-client", "sub": "x", "iat": int(time.time()),
                                    "exp": int(time.time()) + 60}, new_key(), algorithm="RS256",
                                   headers={"kid": f"made-up-{i}"})
                assert (await http.post("/api/auth/google", json={"id_token": token})).status_code == 401

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(made_up, i)
            elapsed = trio.current_time() - started
            assert google.hits - 2 <= elapsed + 1, (google.hits, elapsed)
            # past the TTL the keys are fetched again
            fetched = google.hits
            mock_clock.jump(2.2)
            assert (await http.post("/api/auth/google", json={"id_token": google.token(sub="r-1")})).status_code == 200
            assert google.hits == fetched + 1
            # provider down: cached keys keep working...
            google.mode = "error"
            mock_clock.jump(2.2)
            r = await http.post("/api/auth/google", json={"id_token": google.token(sub="r-1")})
            assert r.status_code == 200 and google.hits == fetched + 2
            # ...but a key we do not have gives a clear 502
            other = google.add_key()
            r = await http.post("/api/auth/google", json={"id_token": google.token(kid=other, sub="r-1")})
            assert r.status_code == 502 and r.json()["error"] == "jwks_unavailable"
            assert "Google" in r.json()["message"]
            # a non-JSON answer and an unreachable server are 502 too (Apple's cache is empty)
            apple.mode = "garbage"
            r = await http.post("/api/auth/apple", json={"id_token": apple.token(iss=APPLE_ISS, aud="apple-client")})
            assert r.status_code == 502 and r.json()["error"] == "jwks_unavailable"
    async with fake_idp() as google:
        dead = google.url
    async with fake_idp() as apple, live_server(**{**_env(apple, apple), "KTULHU_GOOGLE_JWKS_URL": dead}) as server:
        async with client(server) as http:
            with trio.fail_after(10):  # unreachable: a prompt 502, never a hang
                r = await http.post("/api/auth/google", json={"id_token": apple.token()})
            assert r.status_code == 502 and r.json()["error"] == "jwks_unavailable"


async def test_providers_disabled_without_client_id(live_server) -> None:
    async with fake_idp() as google, live_server(KTULHU_GOOGLE_JWKS_URL=google.url) as server:
        async with client(server) as http:
            r = await http.post("/api/auth/google", json={"id_token": google.token()})
            assert r.status_code == 400 and r.json() == {"error": "google_disabled", "message": "Google login disabled"}
            r = await http.post("/api/auth/apple", json={"id_token": google.token()})
            assert r.status_code == 400 and r.json()["error"] == "apple_disabled"
        assert google.hits == 0
