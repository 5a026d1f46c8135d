"""A fake Google/Apple key server for tests: a real HTTP server on loopback serving a JWK set of RSA
keys made here, and signing ID tokens with them, so the server's real JWKS client and verification
path run unchanged."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config
from hypercorn.trio import serve
from jwt.algorithms import RSAAlgorithm
from quart import Response
from quart_trio import QuartTrio

GOOGLE_ISS = "https://accounts.google.com"
APPLE_ISS = "https://appleid.apple.com"


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@attrs.define(eq=False)
class FakeIdp:
    """Keys it publishes (`kid -> private key`), how it answers (`mode`), and how often it was asked."""

    url: str = ""
    keys: dict[str, rsa.RSAPrivateKey] = attrs.field(factory=dict)
    #: "ok", "error" (HTTP 500), "garbage" (not JSON), "slow" (never answers in time)
    mode: str = "ok"
    hits: int = 0
    #: When set, each key-set request waits for it before answering (a key server that hangs until
    #: the test says so); `requested` is set when a request arrives.
    gate: trio.Event | None = None
    requested: trio.Event = attrs.field(factory=trio.Event)

    def add_key(self) -> str:
        kid = uuid.uuid4().hex[:16]
        self.keys[kid] = new_key()
        return kid

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": out}

    def token(self, *, kid: str | None = None, key: rsa.RSAPrivateKey | None = None, alg: str = "RS256",
              iss: str = GOOGLE_ISS, aud: str = "google-client", sub: str | None = None,
              email: str | None = None, email_verified: Any = True, exp_in: float = 600,
              drop: tuple[str, ...] = (), **claims: Any) -> str:
        kid = kid or next(iter(self.keys))
        now = int(time.time())
        payload: dict[str, Any] = {"iss": iss, "aud": aud, "sub": sub or uuid.uuid4().hex, "iat": now,
                                   "exp": int(now + exp_in), **claims}
        if email is not None:
            payload["email"] = email
            payload["email_verified"] = email_verified
        for name in drop:
            payload.pop(name, None)
        signing_key = key or self.keys[kid]
        return jwt.encode(payload, signing_key, algorithm=alg, headers={"kid": kid})


@asynccontextmanager
async def fake_idp() -> AsyncIterator[FakeIdp]:
    """Serve a `FakeIdp` (one key to start with) at `idp.url` (its JWKS URL) for the block."""
    idp = FakeIdp()
    idp.add_key()
    app = QuartTrio("fake_idp")

    @app.get("/jwks")
    async def jwks() -> Response:
        idp.hits += 1
        idp.requested.set()
        if idp.gate is not None:
            await idp.gate.wait()
        if idp.mode == "error":
            return Response("down", status=500)
        if idp.mode == "garbage":
            return Response("<html>not json</html>", status=200, content_type="text/html")
        if idp.mode == "slow":
            await trio.sleep(30)
        return idp.jwks()

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(app, config, shutdown_trigger=stop.wait,
                                                              task_status=task_status))
        idp.url = binds[0].replace("0.0.0.0", "127.0.0.1") + "/jwks"
        try:
            yield idp
        finally:
            if idp.gate is not None:
                idp.gate.set()  # a held request must not keep the server from stopping
            stop.set()
