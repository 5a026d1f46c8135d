"""The authorisation matrix, generated from the app's route table.

`RULES` gives every (URL rule, method) of `create_app()` an access class, read from its handler;
a route that is missing (or a stale entry) fails `test_every_route_has_an_access_rule`, so a new
route cannot ship without a decision. `CLASSES` says what each class answers to each caller, and
`test_authorisation_matrix` sends one valid-looking request per (route, caller) to a live server
(per blueprint) and checks the status, the error shape, that no answer is a 5xx, and that
listings hold nothing the caller may not list.

The server believes `X-Forwarded-For` from loopback (`KTULHU_TRUSTED_PROXIES`) and every request
names a remote client: operator-only surfaces (`/metrics`, `/readyz` detail) are seen as from the
internet. Sign-in and anonymous-prompt rate limits are off here (they have their own tests), so
the matrix checks authorisation only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from ktulhu.app import create_app
from ktulhu.auth.api_keys import create_key
from payments.fake_stripe import fake_stripe, sign, stripe_env

from .helpers import (BAD_TOKENS, IDENTITIES, OWNER_PASSWORD, World, bounded, error_shape_problem, make_user,
                      make_world, seed_chat)

pytestmark = pytest.mark.model

WS = "WEBSOCKET"
OK = "ok"  # the call's success status (200, 201, ...)

# --- access classes: caller -> expected status, per target record ------------------------------

_BAD = {identity: 401 for identity in BAD_TOKENS}


def _everyone(status: Any = OK) -> dict[str, Any]:
    return {identity: status for identity in IDENTITIES}


#: class -> target -> caller -> expected status. Most classes have one target ("any"); chat routes
#: are tried on a signed-in user's chat and on an anonymous chat.
CLASSES: dict[str, dict[str, dict[str, Any]]] = {
    # No credential is read: the same answer for everyone, a bad token changes nothing.
    "public": {"any": _everyone()},
    # /readyz: everyone gets the status; the component detail is the operator's (checked below).
    "readiness": {"any": _everyone()},
    # /metrics from a remote client: the admin (or KTULHU_METRICS_TOKEN) only; a JWT is no metrics token.
    "operator": {"any": {**_everyone(403), "admin": OK}},
    # Sign-in: credentials in Authorization are not read (the body is the credential).
    "sign_in": {"any": _everyone()},
    # Stripe webhook: the Stripe-Signature is the credential; Authorization is not read.
    "webhook": {"any": _everyone()},
    # Sign-out: the presented app JWT itself; an API key is revoked elsewhere (403 jwt_required).
    "session": {"any": {"anonymous": 401, "other": OK, "owner": OK, "admin": 401, "api_key": 403, **_BAD}},
    # A signed-in user's own data (JWT or API key); HTTP Basic is not a user credential.
    "user": {"any": {"anonymous": 401, "other": OK, "owner": OK, "admin": 401, "api_key": OK, **_BAD}},
    # Managing keys and credentials: the app JWT only.
    "user_jwt": {"any": {"anonymous": 401, "other": OK, "owner": OK, "admin": 401, "api_key": 403, **_BAD}},
    # Revoking the owner's key: another user finds no such key of theirs.
    "own_key": {"any": {"anonymous": 401, "other": 404, "owner": OK, "admin": 401, "api_key": 403, **_BAD}},
    # Activating the owner's checkout session: another user is refused.
    "own_checkout": {"any": {"anonymous": 401, "other": 403, "owner": OK, "admin": 401, "api_key": OK, **_BAD}},
    # A chat: a user's chat is theirs (and the admin's); an anonymous chat's id is its capability.
    "chat": {
        "users_chat": {"anonymous": 403, "other": 403, "owner": OK, "admin": OK, "api_key": OK, **_BAD},
        "anonymous_chat": {"anonymous": OK, "other": OK, "owner": OK, "admin": OK, "api_key": OK, **_BAD},
    },
    # Listings by device and the sidebar: a credential is needed; each user sees only their own chats.
    "listing": {"any": {"anonymous": 401, "other": OK, "owner": OK, "admin": OK, "api_key": OK, **_BAD}},
    # Listing by user: that user or the admin.
    "user_listing": {"any": {"anonymous": 401, "other": 403, "owner": OK, "admin": OK, "api_key": OK, **_BAD}},
    # Admin pages and JSON: HTTP Basic of the admin, nothing else.
    "admin": {"any": {**_everyone(401), "admin": OK}},
    # WebSockets: anonymous or a user (Bearer / ?token=); a bad credential or Basic is refused at the upgrade.
    "socket": {"any": {"anonymous": OK, "other": OK, "owner": OK, "admin": 401, "api_key": OK, **_BAD}},
}

#: Every (URL rule, method) of the app and its access class (HEAD and OPTIONS are automatic).
RULES: dict[tuple[str, str], str] = {
    ("/", "GET"): "public",
    ("/static/<path:filename>", "GET"): "public",
    ("/favicon.ico", "GET"): "public",
    ("/healthz", "GET"): "public",
    ("/health", "GET"): "public",
    ("/readyz", "GET"): "readiness",
    ("/metrics", "GET"): "operator",
    ("/ws", WS): "socket",
    ("/chat-summary/ws", WS): "socket",
    ("/api/auth/register", "POST"): "sign_in",
    ("/api/auth/login", "POST"): "sign_in",
    ("/api/auth/google", "POST"): "sign_in",
    ("/api/auth/apple", "POST"): "sign_in",
    ("/api/auth/logout", "POST"): "session",
    ("/chat-thread/<chat_id>", "GET"): "chat",
    ("/chat-thread/<chat_id>", "DELETE"): "chat",
    ("/internal/chat-thread/<chat_id>", "GET"): "chat",
    ("/internal/chat-thread/<chat_id>", "DELETE"): "chat",
    ("/api/chats/<chat_id>/messages", "GET"): "chat",
    ("/chat-thread/<chat_id>/summary", "PUT"): "chat",
    ("/internal/chat-thread/<chat_id>/summary", "PUT"): "chat",
    ("/chat-thread/<chat_id>/message/<message_id>", "DELETE"): "chat",
    ("/internal/chat-thread/<chat_id>/message/<message_id>", "DELETE"): "chat",
    ("/chat-thread/<chat_id>/message/<message_id>/liked", "PUT"): "chat",
    ("/internal/chat-thread/<chat_id>/message/<message_id>/liked", "PUT"): "chat",
    ("/internal/chats/by-device/<device_hash>", "GET"): "listing",
    ("/internal/messages/by-device/<device_hash>", "GET"): "listing",
    ("/messages/by-device/<device_hash>", "GET"): "listing",
    ("/chat-summary/last", "GET"): "listing",
    ("/internal/chats/by-user/<user_id>", "GET"): "user_listing",
    # a signed-in user takes over anonymous chats whose ids they hold
    ("/api/chats/claim", "POST"): "user",
    ("/external/api/generate", "POST"): "user",
    ("/external/api/profile", "GET"): "user",
    ("/external/api/usage", "GET"): "user",
    ("/external/api/keys", "POST"): "user_jwt",
    ("/external/api/keys", "GET"): "user_jwt",
    ("/external/api/keys/<key_id>", "DELETE"): "own_key",
    ("/external/api/credentials/generate", "POST"): "user_jwt",
    ("/external/api/credentials", "POST"): "user_jwt",
    ("/external/api/credentials/validate", "POST"): "user_jwt",
    ("/v1/chat/completions", "POST"): "user",
    ("/v1/completions", "POST"): "user",
    ("/v1/embeddings", "POST"): "user",
    ("/tokenize", "POST"): "user",
    ("/detokenize", "POST"): "user",
    ("/v1/models", "GET"): "user",
    ("/v1/models/<path:model_id>", "GET"): "user",
    ("/internal/admin", "GET"): "admin",
    ("/internal/admin/devices", "GET"): "admin",
    ("/internal/admin/messages", "GET"): "admin",
    ("/internal/admin/chat/<chat_id>", "GET"): "admin",
    ("/internal/users", "GET"): "admin",
    ("/internal/admin/overview", "GET"): "admin",
    ("/internal/admin/engine", "GET"): "admin",
    ("/internal/admin/doctor", "GET"): "admin",
    ("/internal/admin/last", "GET"): "admin",
    ("/internal/admin/devices/list", "GET"): "admin",
    ("/internal/users/list", "GET"): "admin",
    ("/internal/users/<user_id>/role", "PUT"): "admin",
    ("/internal/users/<user_id>", "DELETE"): "admin",
    ("/payment/config", "GET"): "public",
    ("/payment/success", "GET"): "public",
    ("/payment/cancel", "GET"): "public",
    ("/payment/create-checkout-session", "POST"): "user",
    ("/payment/activate", "POST"): "own_checkout",
    ("/payment/webhook", "POST"): "webhook",
}


def route_table() -> dict[tuple[str, str], str]:
    """(rule, method) -> blueprint of every route the app serves (WebSockets as method `WEBSOCKET`)."""
    table = {}
    for rule in create_app().url_map.iter_rules():
        blueprint = rule.endpoint.split(".")[0] if "." in rule.endpoint else "pages"
        if getattr(rule, "websocket", False):
            table[(rule.rule, WS)] = blueprint
            continue
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            table[(rule.rule, method)] = blueprint
    return table


# --- one valid-looking request per route -----------------------------------------------------------


@attrs.frozen
class Call:
    method: str
    path: str
    body: Any = None
    content: bytes | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    ok: int = 200


@attrs.define
class Context:
    world: World
    fake: Any
    model: str
    #: Chats on the world's device that each non-admin caller may or may not list.
    listed: dict[str, str] = attrs.field(factory=dict)

    @property
    def store(self):
        return self.world.runtime.store

    def fresh_chat(self, target: str) -> tuple[str, str]:
        """A new chat (the user's or anonymous) on its own device: (chat id, its user message id)."""
        chat_id = "chat-" + uuid.uuid4().hex
        owner = self.world.owner.id if target == "users_chat" else None
        return chat_id, seed_chat(self.store, chat_id, user_id=owner, device_hash="fresh-device")


Builder = Callable[[Context, str], Call]


def _chat(template: str, method: str, body: Any = None) -> Builder:
    def build(ctx: Context, target: str) -> Call:
        chat_id, message_id = ctx.fresh_chat(target)
        return Call(method, template.format(chat=chat_id, message=message_id), body)
    return build


def _fixed(method: str, path: str, body: Any = None, ok: int = 200) -> Builder:
    return lambda ctx, target: Call(method, path, body, ok=ok)


def _revoke_fresh_key(ctx: Context, target: str) -> Call:
    _, key = create_key(ctx.store, ctx.world.owner.id, "to revoke")
    return Call("DELETE", f"/external/api/keys/{key.split('_')[1]}")


def _victim(method: str, suffix: str, body: Any = None) -> Builder:
    def build(ctx: Context, target: str) -> Call:
        victim, _ = make_user(ctx.world.runtime)
        return Call(method, f"/internal/users/{victim.id}{suffix}", body)
    return build


def _activate(ctx: Context, target: str) -> Call:
    session = ctx.fake.add_session(ctx.world.owner.id, mode="payment", payment_status="paid", status="complete",
                                   customer="cus_matrix")
    return Call("POST", "/payment/activate", {"session_id": session["id"]})


def _webhook(ctx: Context, target: str) -> Call:
    payload = json.dumps({"id": "evt_" + uuid.uuid4().hex, "type": "customer.created",
                          "data": {"object": {"id": "cus_x"}}}).encode()
    return Call("POST", "/payment/webhook", content=payload,
                headers={"Stripe-Signature": sign(payload), "Content-Type": "application/json"})


CHAT_ROUTES = {
    ("/chat-thread/<chat_id>", "GET"): _chat("/chat-thread/{chat}", "GET"),
    ("/chat-thread/<chat_id>", "DELETE"): _chat("/chat-thread/{chat}", "DELETE"),
    ("/internal/chat-thread/<chat_id>", "GET"): _chat("/internal/chat-thread/{chat}", "GET"),
    ("/internal/chat-thread/<chat_id>", "DELETE"): _chat("/internal/chat-thread/{chat}", "DELETE"),
    ("/api/chats/<chat_id>/messages", "GET"): _chat("/api/chats/{chat}/messages", "GET"),
    ("/chat-thread/<chat_id>/summary", "PUT"): _chat("/chat-thread/{chat}/summary", "PUT", {"summary": "renamed"}),
    ("/internal/chat-thread/<chat_id>/summary", "PUT"):
        _chat("/internal/chat-thread/{chat}/summary", "PUT", {"summary": "renamed", "language": "en"}),
    ("/chat-thread/<chat_id>/message/<message_id>", "DELETE"):
        _chat("/chat-thread/{chat}/message/{message}", "DELETE"),
    ("/internal/chat-thread/<chat_id>/message/<message_id>", "DELETE"):
        _chat("/internal/chat-thread/{chat}/message/{message}", "DELETE"),
    ("/chat-thread/<chat_id>/message/<message_id>/liked", "PUT"):
        _chat("/chat-thread/{chat}/message/{message}/liked", "PUT", {"liked": True}),
    ("/internal/chat-thread/<chat_id>/message/<message_id>/liked", "PUT"):
        _chat("/internal/chat-thread/{chat}/message/{message}/liked", "PUT", {"liked": False}),
}

CALLS: dict[tuple[str, str], Builder] = {
    **CHAT_ROUTES,
    ("/", "GET"): _fixed("GET", "/"),
    ("/static/<path:filename>", "GET"): _fixed("GET", "/static/chat.js"),
    ("/favicon.ico", "GET"): _fixed("GET", "/favicon.ico"),
    ("/healthz", "GET"): _fixed("GET", "/healthz"),
    ("/health", "GET"): _fixed("GET", "/health"),
    ("/readyz", "GET"): _fixed("GET", "/readyz"),
    ("/metrics", "GET"): _fixed("GET", "/metrics"),
    ("/ws", WS): _fixed(WS, "/ws"),
    ("/chat-summary/ws", WS): _fixed(WS, "/chat-summary/ws"),
    # a taken email: 400 email_taken whoever asks (registration is not a credential check)
    ("/api/auth/register", "POST"): lambda ctx, t: Call("POST", "/api/auth/register", {
        "email": ctx.world.owner_email, "password": OWNER_PASSWORD}, ok=400),
    ("/api/auth/login", "POST"): lambda ctx, t: Call("POST", "/api/auth/login", {
        "email": ctx.world.owner_email, "password": OWNER_PASSWORD}),
    # Google/Apple sign-in are off on this server: 400 *_disabled whoever asks
    ("/api/auth/google", "POST"): _fixed("POST", "/api/auth/google", {"id_token": "x.y.z"}, ok=400),
    ("/api/auth/apple", "POST"): _fixed("POST", "/api/auth/apple", {"id_token": "x.y.z"}, ok=400),
    ("/api/auth/logout", "POST"): _fixed("POST", "/api/auth/logout"),
    ("/internal/chats/by-device/<device_hash>", "GET"): lambda ctx, t: Call(
        "GET", f"/internal/chats/by-device/{ctx.world.device}"),
    ("/internal/messages/by-device/<device_hash>", "GET"): lambda ctx, t: Call(
        "GET", f"/internal/messages/by-device/{ctx.world.device}"),
    ("/messages/by-device/<device_hash>", "GET"): lambda ctx, t: Call("GET", f"/messages/by-device/{ctx.world.device}"),
    ("/chat-summary/last", "GET"): _fixed("GET", "/chat-summary/last?limit=200"),
    ("/internal/chats/by-user/<user_id>", "GET"): lambda ctx, t: Call(
        "GET", f"/internal/chats/by-user/{ctx.world.owner.id}"),
    ("/api/chats/claim", "POST"): lambda ctx, t: Call(
        "POST", "/api/chats/claim", {"chat_ids": [ctx.fresh_chat("anonymous_chat")[0]]}),
    ("/external/api/generate", "POST"): _fixed("POST", "/external/api/generate",
                                               {"prompt": "Hi", "max_tokens": 1, "language": "en"}),
    ("/external/api/profile", "GET"): _fixed("GET", "/external/api/profile"),
    ("/external/api/usage", "GET"): _fixed("GET", "/external/api/usage"),
    ("/external/api/keys", "POST"): _fixed("POST", "/external/api/keys", {"name": "matrix"}, ok=201),
    ("/external/api/keys", "GET"): _fixed("GET", "/external/api/keys"),
    ("/external/api/keys/<key_id>", "DELETE"): _revoke_fresh_key,
    ("/external/api/credentials/generate", "POST"): _fixed("POST", "/external/api/credentials/generate"),
    ("/external/api/credentials", "POST"): _fixed("POST", "/external/api/credentials",
                                                  {"api_key": "legacy-key", "api_secret": "legacy-secret"}),
    ("/external/api/credentials/validate", "POST"): _fixed("POST", "/external/api/credentials/validate",
                                                           {"api_key": "legacy-key", "api_secret": "legacy-secret"}),
    ("/v1/chat/completions", "POST"): _fixed("POST", "/v1/chat/completions",
                                             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
    ("/v1/completions", "POST"): _fixed("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("/v1/embeddings", "POST"): _fixed("POST", "/v1/embeddings", {"input": "Hi"}),
    ("/tokenize", "POST"): _fixed("POST", "/tokenize", {"content": "Hi"}),
    ("/detokenize", "POST"): _fixed("POST", "/detokenize", {"tokens": [1]}),
    ("/v1/models", "GET"): _fixed("GET", "/v1/models"),
    ("/v1/models/<path:model_id>", "GET"): lambda ctx, t: Call("GET", f"/v1/models/{ctx.model}"),
    ("/internal/admin", "GET"): _fixed("GET", "/internal/admin"),
    ("/internal/admin/devices", "GET"): _fixed("GET", "/internal/admin/devices"),
    ("/internal/admin/messages", "GET"): _fixed("GET", "/internal/admin/messages"),
    ("/internal/admin/chat/<chat_id>", "GET"): lambda ctx, t: Call(
        "GET", f"/internal/admin/chat/{ctx.listed['owner']}"),
    ("/internal/users", "GET"): _fixed("GET", "/internal/users"),
    ("/internal/admin/overview", "GET"): _fixed("GET", "/internal/admin/overview"),
    ("/internal/admin/engine", "GET"): _fixed("GET", "/internal/admin/engine"),
    ("/internal/admin/doctor", "GET"): _fixed("GET", "/internal/admin/doctor"),
    ("/internal/admin/last", "GET"): _fixed("GET", "/internal/admin/last?limit=5"),
    ("/internal/admin/devices/list", "GET"): _fixed("GET", "/internal/admin/devices/list"),
    ("/internal/users/list", "GET"): _fixed("GET", "/internal/users/list"),
    ("/internal/users/<user_id>/role", "PUT"): _victim("PUT", "/role", {"role": "paid"}),
    ("/internal/users/<user_id>", "DELETE"): _victim("DELETE", ""),
    ("/payment/config", "GET"): _fixed("GET", "/payment/config"),
    ("/payment/success", "GET"): _fixed("GET", "/payment/success?session_id=cs_test_matrix"),
    ("/payment/cancel", "GET"): _fixed("GET", "/payment/cancel"),
    ("/payment/create-checkout-session", "POST"): _fixed("POST", "/payment/create-checkout-session"),
    ("/payment/activate", "POST"): _activate,
    ("/payment/webhook", "POST"): _webhook,
}


def test_every_route_has_an_access_rule() -> None:
    """A new route (or a removed one) fails here until RULES and CALLS say who may use it."""
    routes = set(route_table())
    assert not routes - set(RULES), f"routes without an access rule: {sorted(routes - set(RULES))}"
    assert not set(RULES) - routes, f"rules for routes that no longer exist: {sorted(set(RULES) - routes)}"
    assert set(CALLS) == set(RULES), sorted(set(CALLS) ^ set(RULES))
    assert set(RULES.values()) <= set(CLASSES), set(RULES.values()) - set(CLASSES)
    for access in CLASSES.values():
        for expected in access.values():
            assert set(expected) == set(IDENTITIES)


# --- the matrix ----------------------------------------------------------------------------------------


def _remote(index: int) -> str:
    return f"203.0.113.{10 + index}"


async def _socket_status(server, path: str, headers: dict[str, str], remote: str) -> int | str:
    extra = [(k.encode(), v.encode()) for k, v in {**headers, "X-Forwarded-For": remote}.items()]
    try:
        with trio.fail_after(30):
            async with open_websocket_url(server.ws_url + path, extra_headers=extra) as ws:
                if path == "/ws":
                    await ws.send_message(json.dumps({"type": "ping"}))
                    assert json.loads(await ws.get_message()) == {"type": "pong"}
        return OK
    except ConnectionRejected as rejected:
        return rejected.status_code


def _leaks(ctx: Context, identity: str, text: str) -> list[str]:
    """Chat ids of the world's device that `identity` may not list but whose id is in `text`."""
    if identity == "admin":
        return []
    mine = "other" if identity == "other" else "owner"
    return [chat_id for who, chat_id in ctx.listed.items() if who != mine and chat_id in text]


#: Blueprints checked on one server each; every other blueprint (a new one too) goes to "surfaces".
BATCHES = {"chats": {"chats"}, "auth": {"auth"}, "external": {"external", "openai"}, "admin": {"admin"}}


def _batch(blueprint: str) -> str:
    return next((name for name, members in BATCHES.items() if blueprint in members), "surfaces")


@pytest.mark.parametrize("batch", [*BATCHES, "surfaces"])
async def test_authorisation_matrix(live_server, batch: str) -> None:
    """Every route of `batch` x every caller: the class's status, JSON errors, never a 5xx, no leaks."""
    routes = sorted(key for key, blueprint in route_table().items() if _batch(blueprint) == batch)
    failures: list[str] = []
    async with fake_stripe() as fake, live_server(
            **stripe_env(fake), KTULHU_TRUSTED_PROXIES="127.0.0.1/32", KTULHU_ANON_RATE="0",
            KTULHU_LOGIN_RATE="0", KTULHU_FREE_GENERATIONS="1000", LLAMA_CLI_MAX_TOKENS="2",
            KTULHU_METRICS_TOKEN="metrics-token-0123456789") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            world = await make_world(server, client)
            ctx = Context(world, fake, server.runtime.settings.model_file.stem)
            for who, owner in (("owner", world.owner.id), ("other", world.other.id), ("anonymous", None)):
                ctx.listed[who] = f"listed-{who}-{uuid.uuid4().hex}"
                seed_chat(world.runtime.store, ctx.listed[who], user_id=owner, device_hash=world.device)

            for rule, method in routes:
                access = CLASSES[RULES[(rule, method)]]
                for target, expected in access.items():
                    for index, identity in enumerate(IDENTITIES):
                        call = CALLS[(rule, method)](ctx, target)
                        headers = {**call.headers, **world.headers(identity, fresh=rule == "/api/auth/logout"),
                                   "X-Forwarded-For": _remote(index)}
                        where = f"{method} {call.path} [{RULES[(rule, method)]}/{target}] as {identity}"
                        if method == WS:
                            got_ws = await _socket_status(server, call.path, headers, _remote(index))
                            if got_ws != expected[identity]:
                                failures.append(f"{where}: expected {expected[identity]}, got {got_ws}")
                            continue
                        want = call.ok if expected[identity] == OK else expected[identity]
                        response = await bounded(client, call.method, call.path, headers=headers,
                                                 **({"json": call.body} if call.body is not None else {}),
                                                 **({"content": call.content} if call.content is not None else {}))
                        got = response.status_code
                        if got != want:
                            failures.append(f"{where}: expected {want}, got {got} {response.text[:160]!r}")
                        if got >= 500:
                            failures.append(f"{where}: server error {got}")
                        if got >= 400 and (problem := error_shape_problem(response, openai=rule.startswith(("/v1", "/tokenize", "/detokenize")))):
                            failures.append(f"{where}: {problem}")
                        if got == 200 and RULES[(rule, method)] in ("listing", "user_listing"):
                            if leaked := _leaks(ctx, identity, response.text):
                                failures.append(f"{where}: lists chats it may not: {leaked}")
                        if got == 200 and rule == "/readyz" and identity != "admin":
                            detail = response.json()["components"]
                            if any(set(c) != {"status"} for c in detail.values()):
                                failures.append(f"{where}: readiness detail shown to a non-operator: {detail}")
                # HEAD runs the GET handler: it must answer an anonymous caller as GET does.
                if method == "GET":
                    call = CALLS[(rule, method)](ctx, next(iter(access)))
                    head = await bounded(client, "HEAD", call.path, headers={"X-Forwarded-For": _remote(0)})
                    get = await bounded(client, "GET", call.path, headers={"X-Forwarded-For": _remote(0)})
                    if head.status_code != get.status_code:
                        failures.append(f"HEAD {call.path}: {head.status_code}, GET answers {get.status_code}")
                # OPTIONS (CORS preflight) never runs the handler and never fails.
                if method != WS:
                    call = CALLS[(rule, method)](ctx, next(iter(access)))
                    options = await bounded(client, "OPTIONS", call.path, headers={
                        "Origin": "https://evil.example", "Access-Control-Request-Method": method})
                    if options.status_code != 200 or "access-control-allow-origin" in options.headers:
                        failures.append(f"OPTIONS {call.path}: {options.status_code} {dict(options.headers)}")
            assert (await client.get("/healthz")).status_code == 200
    assert not failures, f"{len(failures)} wrong answers:\n" + "\n".join(failures)


async def test_a_self_asserted_device_hash_lists_nothing_by_user(live_server) -> None:
    """The device-hash exploit through the by-user listing: sign up with a victim's device hash, list
    your own chats by user id, and the victim's anonymous chats on that device must not be there
    (their ids are the keys to read them)."""
    async with live_server(KTULHU_ANON_RATE="0", KTULHU_LOGIN_RATE="0") as server:
        victim_chat = "victim-" + uuid.uuid4().hex
        seed_chat(server.runtime.store, victim_chat, user_id=None, device_hash="victim-device")
        async with httpx.AsyncClient(base_url=server.url) as client:
            signed_up = await client.post("/api/auth/register", json={
                "email": "mallory@example.com", "password": "a long enough password", "device_hash": "victim-device"})
            assert signed_up.status_code == 200, signed_up.text
            mallory = signed_up.json()
            listing = await client.get(f"/internal/chats/by-user/{mallory['user_id']}",
                                       headers={"Authorization": f"Bearer {mallory['jwt']}"})
            assert listing.status_code == 200
            assert victim_chat not in listing.text, f"the victim's anonymous chat is listed: {listing.text[:300]}"
