"""Shared pieces of the attack suite: the callers (identities), seeded records, bounded requests,
the JSON error shape, and running Hypothesis against a server that lives in the test's trio loop.

Hypothesis drives synchronous functions, while `live_server` runs the whole server inside the
test's trio run. The tests run their `@given` function in a worker thread
(`trio.to_thread.run_sync`); each example reaches back into the trio loop with
`trio.from_thread.run`, so the server keeps serving while examples are generated, and one server
serves every example.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import attrs
import httpx
import jwt
import trio
from hypothesis import HealthCheck, settings

from ktulhu.auth.admin import write_admin_credentials
from ktulhu.auth.api_keys import create_key
from ktulhu.auth.tokens import ALGORITHM, issue_token
from ktulhu.store.records import Chat, Message, User, now_ms

ADMIN_USER = "admin"
ADMIN_PASSWORD = "correct horse battery staple"
OWNER_PASSWORD = "owner's long password"
#: Upper bound on any one answer. A bound on the wait (a hung handler fails the test instead of
#: hanging it), not a speed assertion: generous enough for a loaded two-core machine.
ANSWER_BOUND_S = 60.0

#: Who calls. The last three present a credential that must be refused wherever one is read.
IDENTITIES = ("anonymous", "other", "owner", "admin", "api_key", "expired_jwt", "tampered_jwt", "foreign_jwt")
BAD_TOKENS = ("expired_jwt", "tampered_jwt", "foreign_jwt")

#: Settings of every Hypothesis run here: deterministic, no deadline, a modest number of examples.
HYPOTHESIS = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=False,
                      suppress_health_check=list(HealthCheck))


def basic(user: str = ADMIN_USER, password: str = ADMIN_PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def admin_ready(runtime) -> None:
    settings_ = runtime.settings
    write_admin_credentials(settings_.path(settings_.admin_auth_file), ADMIN_USER, ADMIN_PASSWORD)


def expired_jwt(settings_, user_id: str) -> str:
    """A token this server signed, long expired (beyond the 60 s leeway)."""
    return issue_token(settings_, user_id, now=time.time() - settings_.jwt_ttl - 3600)


def tampered_jwt(token: str) -> str:
    """`token` with one character of its signature changed (a middle one: every bit of it counts)."""
    head, payload, signature = token.split(".")
    i = len(signature) // 2
    swapped = "A" if signature[i] != "A" else "B"
    return ".".join((head, payload, signature[:i] + swapped + signature[i + 1:]))


def foreign_jwt(settings_, user_id: str) -> str:
    """Valid claims for a real user, signed with a secret that is not this server's."""
    issued = int(time.time())
    claims = {"sub": user_id, "iat": issued, "exp": issued + 3600, "iss": settings_.jwt_issuer,
              "aud": settings_.jwt_audience, "jti": uuid.uuid4().hex}
    return jwt.encode(claims, "another-servers-secret-" + "x" * 32, algorithm=ALGORITHM)


def make_user(runtime, *, role: str = "free", email: str | None = None) -> tuple[User, str]:
    user = User(id=uuid.uuid4().hex, created_ts=now_ms(), role=role,
                email=email or f"{uuid.uuid4().hex[:10]}@example.com")
    runtime.store.save_user(user)
    return user, issue_token(runtime.settings, user.id)


def seed_chat(store, chat_id: str, *, user_id: str | None, device_hash: str) -> str:
    """A chat with a user message, a reply and a title; returns the user message's id. Every text
    names the chat id, so a listing that leaks the chat shows it."""
    store.save_chat(Chat(id=chat_id, device_hash=device_hash, user_id=user_id, updated_ts=now_ms()))
    first = None
    for role, text in (("user", f"question in {chat_id}"), ("assistant", f"answer in {chat_id}")):
        message = Message(id=uuid.uuid4().hex, chat_id=chat_id, role=role, text=text, ts=now_ms(),
                          device_hash=device_hash, user_id=user_id if role == "user" else None)
        store.save_message(message)
        first = first or message.id
    store.replace_summary(chat_id, f"title of {chat_id}")
    assert first is not None
    return first


@attrs.define
class World:
    """The seeded accounts and credentials one server's attacks use."""

    runtime: Any
    owner: User
    owner_email: str
    other: User
    api_key: str
    device: str
    tokens: dict[str, str] = attrs.field(factory=dict)

    def headers(self, identity: str, *, fresh: bool = False) -> dict[str, str]:
        """The `Authorization` header of `identity` (none for anonymous). `fresh`: a new app JWT
        for owner/other (for routes that use the token up, such as logout)."""
        settings_ = self.runtime.settings
        if identity == "anonymous":
            return {}
        if identity == "admin":
            return basic()
        if identity == "api_key":
            return bearer(self.api_key)
        if identity in ("owner", "other"):
            user = self.owner if identity == "owner" else self.other
            if fresh or identity not in self.tokens:
                token = issue_token(settings_, user.id)
                if fresh:
                    return bearer(token)
                self.tokens[identity] = token
            return bearer(self.tokens[identity])
        if identity == "expired_jwt":
            return bearer(expired_jwt(settings_, self.owner.id))
        if identity == "tampered_jwt":
            return bearer(tampered_jwt(issue_token(settings_, self.owner.id)))
        if identity == "foreign_jwt":
            return bearer(foreign_jwt(settings_, self.owner.id))
        raise AssertionError(identity)


async def make_world(server, client: httpx.AsyncClient) -> World:
    """An owner registered over HTTP (so it has a password), another user, the owner's API key and
    device, and admin credentials."""
    runtime = server.runtime
    admin_ready(runtime)
    email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    device = "dev-" + uuid.uuid4().hex[:12]
    registered = await client.post("/api/auth/register", json={"email": email, "password": OWNER_PASSWORD,
                                                               "device_hash": device})
    assert registered.status_code == 200, registered.text
    owner = runtime.store.load_user(registered.json()["user_id"])
    other, _ = make_user(runtime)
    _, key = create_key(runtime.store, owner.id, "security-suite")
    world = World(runtime, owner, email, other, key, device)
    world.tokens["owner"] = registered.json()["jwt"]
    return world


async def bounded(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request, its whole answer read, under `ANSWER_BOUND_S`."""
    with trio.fail_after(ANSWER_BOUND_S):
        return await client.request(method, url, **kwargs)


def error_shape_problem(response: httpx.Response, *, openai: bool = False) -> str | None:
    """None when an error answer is JSON `{"error": code, "message": text}` (on `/v1`, OpenAI's
    `{"error": {"message", "type", ...}}`); otherwise what is wrong with it."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"error answer is {response.headers.get('content-type')!r}, not JSON: {response.text[:120]!r}"
    try:
        body = response.json()
    except ValueError:
        return f"error answer is not valid JSON: {response.text[:120]!r}"
    if openai and isinstance(body, dict) and isinstance(body.get("error"), dict):
        inner = body["error"]
        return None if isinstance(inner.get("message"), str) and isinstance(inner.get("type"), str) else (
            f"OpenAI error without message/type: {body}")
    if not (isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str)):
        return f"error answer lacks string `error` and `message`: {str(body)[:200]}"
    return None


async def raw_request(base_url: str, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with `target` sent exactly as given (no client-side normalisation of
    `..` or percent-escapes), under `ANSWER_BOUND_S`: (status, headers, body)."""
    import h11

    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    conn = h11.Connection(h11.CLIENT)
    fields = [("Host", f"{host}:{port}"), ("Connection", "close"), *(headers or [])]
    if body:
        fields.append(("Content-Length", str(len(body))))
    out = conn.send(h11.Request(method=method, target=target, headers=fields))
    if body:
        out += conn.send(h11.Data(data=body))
    out += conn.send(h11.EndOfMessage())
    status, answer_headers, chunks = 0, {}, []
    with trio.fail_after(ANSWER_BOUND_S):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(out)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    answer_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    return status, answer_headers, b"".join(chunks)
