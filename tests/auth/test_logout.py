"""`POST /api/auth/logout` signs out the presented app JWT on every route and on `/ws`; and email
accounts registered from one address share one free quota until their email is verified."""

from __future__ import annotations

import time

import jwt
import pytest
from trio_websocket import ConnectionRejected, open_websocket_url

from ktulhu.auth import quota
from ktulhu.auth.api_keys import create_key
from ktulhu.auth.tokens import verify_claims
from ktulhu.store.keys import REVOKED_JWT

from .helpers import bearer, client

pytestmark = pytest.mark.model


async def _ws_status(server, token: str) -> int:
    """101 when `/ws` accepts the token, else the refusal's HTTP status."""
    try:
        async with open_websocket_url(f"{server.ws_url}/ws?token={token}"):
            return 101
    except ConnectionRejected as rejected:
        return rejected.status_code


async def test_logout_revokes_the_presented_token(live_server) -> None:
    async with live_server(KTULHU_LOGIN_RATE="0") as server:
        runtime = server.runtime
        async with client(server) as http:
            first = (await http.post("/api/auth/register", json={"email": "lou@example.com",
                                                                 "password": "lou-pass-1"})).json()
            second = (await http.post("/api/auth/login", json={"email": "lou@example.com",
                                                               "password": "lou-pass-1"})).json()
            token, other = first["jwt"], second["jwt"]
            assert (await http.get("/external/api/profile", headers=bearer(token))).status_code == 200
            assert await _ws_status(server, token) == 101

            r = await http.post("/api/auth/logout", headers=bearer(token))
            assert r.status_code == 200 and r.json() == {"signed_out": True}
            r = await http.get("/external/api/profile", headers=bearer(token))
            assert r.status_code == 401 and r.json()["error"] == "invalid_token"
            assert await _ws_status(server, token) == 401
            r = await http.post("/api/auth/logout", headers=bearer(token))  # already signed out
            assert r.status_code == 401
            # only that token: the other session goes on
            assert (await http.get("/external/api/profile", headers=bearer(other))).status_code == 200
            assert await _ws_status(server, other) == 101

            # bad requests change nothing
            before = list(runtime.store.scan(REVOKED_JWT))
            _, key = await runtime.store.aio.run(create_key, runtime.store, first["user_id"], "k")
            for headers, status, code in [({}, 401, "login_required"), (bearer("junk"), 401, "invalid_token"),
                                          ({"Authorization": "Basic eDp5"}, 401, "invalid_token"),
                                          (bearer(key), 403, "jwt_required")]:
                r = await http.post("/api/auth/logout", headers=headers)
                assert (r.status_code, r.json()["error"]) == (status, code), headers
            assert list(runtime.store.scan(REVOKED_JWT)) == before
            assert (await http.get("/external/api/usage", headers=bearer(key))).status_code == 200

            # the entry lives as long as the token would have, then the sweep drops it
            exp = verify_claims(runtime.settings, token)["exp"]
            assert runtime.store.sweep_expired(now=(exp - 1) * 1000).deleted == 0
            assert runtime.store.sweep_expired(now=(exp + 61) * 1000).deleted == 1

            # a token from before token ids existed (no jti): signs out every token up to it
            now = int(time.time())
            legacy = jwt.encode({"sub": first["user_id"], "iat": now - 30, "exp": now + 600,
                                 "iss": runtime.settings.jwt_issuer, "aud": runtime.settings.jwt_audience},
                                runtime.settings.jwt_secret, algorithm="HS256")
            assert (await http.get("/external/api/profile", headers=bearer(legacy))).status_code == 200
            assert (await http.post("/api/auth/logout", headers=bearer(legacy))).status_code == 200
            assert (await http.get("/external/api/profile", headers=bearer(legacy))).status_code == 401
            assert (await http.get("/external/api/profile", headers=bearer(other))).status_code == 200


async def test_email_accounts_from_one_address_share_one_free_quota(live_server) -> None:
    async with live_server(KTULHU_LOGIN_RATE="0", KTULHU_FREE_GENERATIONS="3") as server:
        runtime = server.runtime
        store = runtime.store
        users = []
        async with client(server, source="127.0.0.2") as http:
            for name in ("ann", "ann2", "ann3"):
                r = await http.post("/api/auth/register", json={"email": f"{name}@example.com", "password": "pass-word"})
                users.append(store.load_user(r.json()["user_id"]))
        async with client(server, source="127.0.0.3") as http:
            r = await http.post("/api/auth/register", json={"email": "bea@example.com", "password": "pass-word"})
            bea = store.load_user(r.json()["user_id"])

        ann, ann2, ann3 = users
        reservations = [await quota.reserve(runtime.store, runtime.settings, ann) for _ in range(2)]
        reservations.append(await quota.reserve(runtime.store, runtime.settings, ann2))
        # three generations among the accounts made from 127.0.0.2: the pool is used up
        for user in (ann2, ann3):
            with pytest.raises(quota.QuotaExceeded):
                await quota.reserve(runtime.store, runtime.settings, user)
        assert store.load_user(ann3.id).generation_count == 0  # a refused reservation counts nowhere
        # another address has its own pool
        for _ in range(3):
            await quota.reserve(runtime.store, runtime.settings, bea)
        # a refund gives back to the pool too
        await reservations[0].refund()
        await quota.reserve(runtime.store, runtime.settings, ann3)
        with pytest.raises(quota.QuotaExceeded):
            await quota.reserve(runtime.store, runtime.settings, ann3)

        # a verified email (Google/Apple linked it) leaves the pool; paid accounts are never pooled
        def verified(user):
            user.meta["email_verified"] = True
            return user

        ann2 = await store.aio.update_user(ann2.id, verified)
        await quota.reserve(runtime.store, runtime.settings, ann2)
        paid = await store.aio.update_user(ann3.id, lambda u: setattr(u, "role", "paid") or u)
        await quota.reserve(runtime.store, runtime.settings, paid)
