"""The integrator API on the real server: generation (JSON and SSE), profile, usage, API keys, the
original's credential routes, the authorisation matrix, hostile bodies."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from ktulhu.auth.api_keys import split_key
from ktulhu.auth.tokens import issue_token

from auth.helpers import bearer, client, make_user, snapshot

pytestmark = pytest.mark.model

SHORT = {"LLAMA_CLI_MAX_TOKENS": "12", "KTULHU_LOGIN_RATE": "0", "KTULHU_FREE_GENERATIONS": "5"}


def sse_events(text: str) -> list[tuple[str | None, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        events.append((name, data))
    return events


async def test_generate_profile_usage(live_server) -> None:
    async with live_server(**SHORT) as server:
        runtime = server.runtime
        user, token = make_user(runtime, email="gen@example.com")
        async with client(server) as http:
            r = await http.post("/external/api/generate", headers=bearer(token),
                                json={"prompt": "Say hello.", "language": "en", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert {"request_id", "user_id", "role", "system_prompt", "output", "generation_count", "generation_limit",
                    "generations_remaining"} <= set(body)
            assert body["user_id"] == user.id and body["role"] == "free" and body["system_prompt"] == ""
            assert body["output"].strip() and body["intent"] and body["language"] == "en"
            assert (body["generation_count"], body["generation_limit"], body["generations_remaining"]) == (1, 5, 4)
            # a caller's system prompt replaces the routed one and is echoed
            r = await http.post("/external/api/generate", headers=bearer(token),
                                json={"prompt": "Hi", "system_prompt": "  You are terse.  ", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["system_prompt"] == "You are terse."
            # routing follows the language: a Russian prompt without a hint is answered in the Russian set
            r = await http.post("/external/api/generate", headers=bearer(token),
                                json={"prompt": "Привет, как дела?", "language": "ru", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["language"] == "ru"

            profile = (await http.get("/external/api/profile", headers=bearer(token))).json()
            assert profile == {"user_id": user.id, "email": "gen@example.com", "created_ts": user.created_ts,
                               "role": "free", "can_generate": True, "generation_count": 3, "generation_limit": 5,
                               "generations_remaining": 2}
            usage = (await http.get("/external/api/usage", headers=bearer(token))).json()
            assert usage == {"user_id": user.id, "generation_count": 3, "generation_limit": 5, "generations_remaining": 2}

            # streaming: start, tokens, done with the same shape as the JSON answer
            async with http.stream("POST", "/external/api/generate", headers=bearer(token),
                                   json={"prompt": "Count to three.", "stream": True, "max_tokens": 8}) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                text = (await stream.aread()).decode()
            events = sse_events(text)
            assert events[0][0] == "start" and events[-1][0] == "done"
            tokens = [e[1]["token"] for e in events if e[0] == "token"]
            assert tokens and all(e[1]["request_id"] == events[0][1]["request_id"] for e in events[1:])
            done = events[-1][1]
            assert done["output"] == "".join(tokens).strip() and done["generation_count"] == 4

            # paid users have no limit
            paid, paid_token = make_user(runtime, role="paid")
            r = await http.post("/external/api/generate", headers=bearer(paid_token), json={"prompt": "hi", "max_tokens": 2})
            assert r.json()["generation_limit"] is None and r.json()["generations_remaining"] is None
            profile = (await http.get("/external/api/profile", headers=bearer(paid_token))).json()
            assert profile["can_generate"] is True and profile["generation_limit"] is None

            # the quota ends at the limit, and a refused generation changes nothing
            r = await http.post("/external/api/generate", headers=bearer(token), json={"prompt": "one more", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["generations_remaining"] == 0
            before = snapshot(runtime)
            r = await http.post("/external/api/generate", headers=bearer(token), json={"prompt": "and another"})
            assert r.status_code == 403 and r.json()["error"] == "free_quota_exceeded"
            assert snapshot(runtime) == before
            profile = (await http.get("/external/api/profile", headers=bearer(token))).json()
            assert profile["can_generate"] is False and profile["generations_remaining"] == 0


async def test_refunds_when_nothing_is_generated(live_server) -> None:
    async with live_server(**SHORT, LLAMA_CLI_CTX="256") as server:
        runtime = server.runtime
        user, token = make_user(runtime)
        async with client(server) as http:
            # a prompt that cannot fit the context is refused by the engine: the reservation is refunded
            r = await http.post("/external/api/generate", headers=bearer(token),
                                json={"prompt": "word " * 2000, "max_tokens": 8})
            assert r.status_code == 413 and r.json()["error"] == "context_too_long"
            assert runtime.store.load_user(user.id).generation_count == 0


def _forge(runtime, **claims) -> str:
    settings = runtime.settings
    now = int(time.time())
    base = {"sub": claims.pop("sub"), "iat": now, "exp": now + 600, "iss": settings.jwt_issuer, "aud": settings.jwt_audience}
    base.update(claims)
    return jwt.encode({k: v for k, v in base.items() if v is not None}, settings.jwt_secret, algorithm="HS256")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


ROUTES = [
    ("POST", "/external/api/generate", {"prompt": "hi"}),
    ("GET", "/external/api/profile", None),
    ("GET", "/external/api/usage", None),
    ("POST", "/external/api/keys", {}),
    ("GET", "/external/api/keys", None),
    ("DELETE", "/external/api/keys/0123456789abcdef0123456789abcdef", None),
    ("POST", "/external/api/credentials/generate", None),
    ("POST", "/external/api/credentials", {"api_key": "a", "api_secret": "b"}),
    ("POST", "/external/api/credentials/validate", {"api_key": "a", "api_secret": "b"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("GET", "/v1/models", None),
]


async def test_authorisation_matrix(live_server) -> None:
    async with live_server(**SHORT) as server:
        runtime = server.runtime
        settings = runtime.settings
        user, good = make_user(runtime)
        gone, gone_token = make_user(runtime)
        async with client(server) as http:
            key_body = (await http.post("/external/api/keys", headers=bearer(good), json={"name": "revoke me"})).json()
            revoked_key = key_body["key"]
            assert (await http.delete(f"/external/api/keys/{key_body['id']}", headers=bearer(good))).status_code == 200
            deleted_users_key = (await http.post("/external/api/keys", headers=bearer(gone_token), json={})).json()["key"]
            runtime.store.delete_user(gone.id)
            head, body, sig = good.split(".")
            bad_credentials = {
                "no header": None,
                "bare bearer": "Bearer",
                "not bearer": "Token " + good,
                "basic": "Basic " + base64.b64encode(b"admin:admin").decode(),
                "garbage": "Bearer not-a-token",
                "expired": "Bearer " + issue_token(settings, user.id, now=time.time() - settings.jwt_ttl - 600),
                "tampered": "Bearer " + ".".join([head, _b64({"sub": gone.id, "iat": 1, "exp": 2**40}), sig]),
                "alg none": "Bearer " + ".".join([_b64({"alg": "none", "typ": "JWT"}), body, ""]),
                "wrong aud": "Bearer " + _forge(runtime, sub=user.id, aud="other-app"),
                "wrong iss": "Bearer " + _forge(runtime, sub=user.id, iss="someone-else"),
                "bad sub": "Bearer " + _forge(runtime, sub="../../etc"),
                "deleted user": "Bearer " + gone_token,
                "revoked key": "Bearer " + revoked_key,
                "deleted user's key": "Bearer " + deleted_users_key,
                "made-up key": "Bearer ktk_" + "0" * 32 + "_" + "A" * 43,
            }
            before = snapshot(runtime)
            for method, path, payload in ROUTES:
                for name, header in bad_credentials.items():
                    headers = {} if header is None else {"Authorization": header}
                    r = await http.request(method, path, headers=headers, json=payload)
                    assert r.status_code == 401, (path, name, r.status_code, r.text)
                    error = r.json()["error"]
                    if path.startswith("/v1"):
                        assert error["type"] and error["message"] and error["code"] == "invalid_api_key"
                    else:
                        assert isinstance(error, str) and r.json()["message"]
            assert snapshot(runtime) == before
            # a valid key works where keys are accepted, and is refused (403) where only the app token is
            live_key = (await http.post("/external/api/keys", headers=bearer(good), json={})).json()["key"]
            assert (await http.get("/external/api/usage", headers=bearer(live_key))).status_code == 200
            for method, path, payload in ROUTES[3:9]:
                r = await http.request(method, path, headers=bearer(live_key), json=payload)
                assert r.status_code == 403 and r.json()["error"] == "jwt_required", path


async def test_api_key_lifecycle_and_legacy_credentials(live_server) -> None:
    async with live_server(**SHORT) as server:
        runtime = server.runtime
        store = runtime.store
        user, token = make_user(runtime)
        other, other_token = make_user(runtime)
        async with client(server) as http:
            created = await http.post("/external/api/keys", headers=bearer(token), json={"name": "ci"})
            assert created.status_code == 201
            record = created.json()
            key = record["key"]
            assert key.startswith("ktk_") and record["name"] == "ci" and record["revoked"] is False
            stored = store.load_api_key(record["id"])
            assert split_key(key)[1] not in json.dumps(stored.extra) + stored.secret_hash  # only a hash is stored
            listed = (await http.get("/external/api/keys", headers=bearer(token))).json()["keys"]
            assert [k["id"] for k in listed] == [record["id"]] and "key" not in listed[0]
            # usable as Bearer on the external and /v1 routes
            assert (await http.get("/external/api/profile", headers=bearer(key))).json()["user_id"] == user.id
            assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200
            # another user can neither see nor revoke it
            assert (await http.get("/external/api/keys", headers=bearer(other_token))).json()["keys"] == []
            r = await http.delete(f"/external/api/keys/{record['id']}", headers=bearer(other_token))
            assert r.status_code == 404
            assert (await http.get("/external/api/usage", headers=bearer(key))).status_code == 200
            for bad_id in ("nope", "../x", "0" * 32):
                assert (await http.delete(f"/external/api/keys/{bad_id}", headers=bearer(token))).status_code == 404
            # revoke: the key stops working at once, stays listed as revoked; revoking again is fine
            r = await http.delete(f"/external/api/keys/{record['id']}", headers=bearer(token))
            assert r.json() == {"id": record["id"], "revoked": True}
            assert (await http.get("/external/api/usage", headers=bearer(key))).status_code == 401
            listed = (await http.get("/external/api/keys", headers=bearer(token))).json()["keys"]
            assert listed[0]["revoked"] is True
            assert (await http.delete(f"/external/api/keys/{record['id']}", headers=bearer(token))).status_code == 200
            # names are checked
            for bad in ({"name": "x" * 101}, {"name": 5}, {"name": "a\nb"}):
                assert (await http.post("/external/api/keys", headers=bearer(token), json=bad)).status_code == 422
            # no body at all is fine (unnamed key)
            r = await http.post("/external/api/keys", headers=bearer(token))
            assert r.status_code == 201 and r.json()["name"] is None

            # the original's credential routes: generate -> validate; the pair is an API key
            gen = await http.post("/external/api/credentials/generate", headers=bearer(token))
            assert gen.status_code == 200 and set(gen.json()) == {"api_key", "api_secret"}
            pair = gen.json()
            saved = store.load_user(user.id)
            assert pair["api_secret"] not in (saved.api_secret or "") and pair["api_key"] != saved.api_key
            assert saved.api_secret.startswith("$argon2")
            r = await http.post("/external/api/credentials/validate", headers=bearer(token), json=pair)
            assert r.json() == {"valid": True}
            r = await http.post("/external/api/credentials/validate", headers=bearer(token),
                                json={**pair, "api_secret": pair["api_secret"] + "x"})
            assert r.json() == {"valid": False}
            r = await http.post("/external/api/credentials/validate", headers=bearer(other_token), json=pair)
            assert r.json() == {"valid": False}
            full = f"{pair['api_key']}_{pair['api_secret']}"
            assert (await http.get("/external/api/usage", headers=bearer(full))).status_code == 200
            # generating again replaces the pair: the old key is revoked
            second = (await http.post("/external/api/credentials/generate", headers=bearer(token))).json()
            assert (await http.get("/external/api/usage", headers=bearer(full))).status_code == 401
            r = await http.post("/external/api/credentials/validate", headers=bearer(token), json=pair)
            assert r.json() == {"valid": False}
            r = await http.post("/external/api/credentials/validate", headers=bearer(token), json=second)
            assert r.json() == {"valid": True}
            # store a chosen pair (hashed), then validate it
            r = await http.post("/external/api/credentials", headers=bearer(token),
                                json={"api_key": " mykey ", "api_secret": " s3cret "})
            assert r.json() == {"stored": True}
            saved = store.load_user(user.id)
            assert "s3cret" not in saved.api_secret and "mykey" not in saved.api_key
            r = await http.post("/external/api/credentials/validate", headers=bearer(token),
                                json={"api_key": "mykey", "api_secret": "s3cret"})
            assert r.json() == {"valid": True}
            before = snapshot(runtime)
            for bad in ({"api_key": " ", "api_secret": "x"}, {"api_key": "x", "api_secret": ""}):
                r = await http.post("/external/api/credentials", headers=bearer(token), json=bad)
                assert r.status_code == 400 and r.json()["error"] == "credentials_required"
            for bad in ({"api_key": 1, "api_secret": "x"}, {"api_key": "x"}, {"api_key": "k" * 600, "api_secret": "x"}):
                r = await http.post("/external/api/credentials", headers=bearer(token), json=bad)
                assert r.status_code == 422
            assert snapshot(runtime) == before

            # a record written by the original holds plaintext: it still validates, and is hashed then
            store.update_user(other.id, lambda u: (setattr(u, "api_key", "key_old"), setattr(u, "api_secret", "sec_old"), u)[-1])
            r = await http.post("/external/api/credentials/validate", headers=bearer(other_token),
                                json={"api_key": "key_old", "api_secret": "sec_old"})
            assert r.json() == {"valid": True}
            upgraded = store.load_user(other.id)
            assert upgraded.api_key.startswith("sha256:") and upgraded.api_secret.startswith("$argon2")
            r = await http.post("/external/api/credentials/validate", headers=bearer(other_token),
                                json={"api_key": "key_old", "api_secret": "sec_old"})
            assert r.json() == {"valid": True}


HOSTILE_GENERATE = [
    ("text/plain", b'{"prompt": "hi"}', 415),
    ("application/json", b'{"prompt": "hi"', 400),
    ("application/json", b"[]", 422),
    ("application/json", b"{}", 422),
    ("application/json", b'{"prompt": 12}', 422),
    ("application/json", b'{"prompt": "   "}', 400),
    ("application/json", b'{"prompt": "hi", "stream": "yes"}', 422),
    ("application/json", b'{"prompt": "hi", "max_tokens": "8"}', 422),
    ("application/json", b'{"prompt": "hi", "max_tokens": 0}', 422),
    ("application/json", b'{"prompt": "hi", "max_tokens": true}', 422),
    ("application/json", b'{"prompt": "hi", "temperature": 99}', 422),
    ("application/json", b'{"prompt": "hi", "seed": -1}', 422),
    ("application/json", b'{"prompt": "hi", "language": "../../etc/passwd"}', 422),
    ("application/json", b'{"prompt": "hi", "system_prompt": ["x"]}', 422),
    ("application/json", b'{"prompt": "' + b"x" * 40_000 + b'"}', 413),
    ("application/json", b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413),
]


async def test_hostile_generate_bodies_change_nothing(live_server) -> None:
    async with live_server(**SHORT) as server:
        runtime = server.runtime
        user, token = make_user(runtime)
        before = snapshot(runtime)
        async with client(server) as http:
            for content_type, raw, status in HOSTILE_GENERATE:
                r = await http.post("/external/api/generate", content=raw,
                                    headers={"Content-Type": content_type, **bearer(token)})
                assert r.status_code == status, (raw[:60], r.status_code, r.text[:200])
                assert isinstance(r.json()["error"], str) and r.json()["message"]
        assert snapshot(runtime) == before
        assert runtime.engine.get().stats().busy_slots == 0
