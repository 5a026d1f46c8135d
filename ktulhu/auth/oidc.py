"""Google and Apple ID tokens: signing keys fetched from the provider's JWKS URL, cached, and used
to verify RS256 tokens (`aud`, `iss`, `exp`, `iat`, `sub`).

Keys are fetched with httpx's async client (the trio loop never blocks), under a time limit, and
kept for `KTULHU_JWKS_TTL` seconds. A token naming a key id the cache does not hold refetches at
once (providers rotate keys), but fetches are single-flight and spaced at least `MIN_REFETCH_S`
apart, every wait is bounded and no lock is held, so tokens with made-up key ids can neither turn
the server into a request amplifier nor queue up in front of valid sign-ins (see `JwksCache`). When a refetch fails
and the key is still in the expired cache, the cached key is used: a provider outage does not end
sign-in.
"""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import jwt
import orjson
import trio

from ..settings import Settings
from .passwords import normalise_email, valid_email

__all__ = ["APPLE", "GOOGLE", "IdToken", "InvalidIdToken", "JwksCache", "JwksUnavailable", "Provider",
           "verify_id_token"]

FETCH_TIMEOUT_S = 5.0
MIN_REFETCH_S = 1.0
MAX_JWKS_BYTES = 1 << 20
LEEWAY_S = 60
MAX_TOKEN_CHARS = 16_384


class InvalidIdToken(Exception):
    """The ID token is malformed, expired, not for this app, or not signed by the provider."""


class JwksUnavailable(Exception):
    """The provider's signing keys could not be fetched (network or a bad answer)."""


@attrs.frozen
class Provider:
    name: str  # "google" | "apple"
    title: str
    issuers: tuple[str, ...]

    def client_id(self, settings: Settings) -> str:
        return settings.google_client_id if self.name == "google" else settings.apple_client_id

    def jwks_url(self, settings: Settings) -> str:
        return settings.google_jwks_url if self.name == "google" else settings.apple_jwks_url


GOOGLE = Provider("google", "Google", ("https://accounts.google.com", "accounts.google.com"))
APPLE = Provider("apple", "Apple", ("https://appleid.apple.com",))


@attrs.frozen
class IdToken:
    """What a verified ID token says about the person."""

    provider: str
    subject: str
    email: str | None
    email_verified: bool

    @property
    def provider_id(self) -> str:
        return f"{self.provider}:{self.subject}"


@attrs.define(eq=False)
class _Flight:
    """One fetch of the key set, shared by every caller that needs it (single flight)."""

    #: trio time by which every waiter gives up, however the fetch goes.
    deadline: float
    done: trio.Event = attrs.field(factory=trio.Event)
    #: The caller running it went away before it finished: waiters try again.
    interrupted: bool = False


@attrs.define(eq=False)
class JwksCache:
    """One provider's signing keys. Use it from one trio run.

    Rules, so that tokens with made-up key ids can neither hammer the provider nor hold up real
    sign-ins:
    - a key in the fresh cache is used at once;
    - at most one fetch is pending or running at a time, and every caller that needs a fetch waits
      for that one (a bounded wait: until `MIN_REFETCH_S` + `FETCH_TIMEOUT_S` + 1 s at most)
      instead of starting its own;
    - a fetch starts at least `MIN_REFETCH_S` after the previous one ended (an unknown key id in
      between waits for the next fetch: keys rotated that very second still work), so a flood
      costs the provider at most one request per `MIN_REFETCH_S`;
    - a key still in an expired cache is used at once while a fetch is pending or running, and kept
      when a fetch fails; right after a failed fetch an unknown key id fails at once (502);
    - no lock is held, so nobody queues behind anybody else's fetch or wait.
    """

    url: str
    ttl: float
    keys: dict[str, jwt.PyJWK] = attrs.field(factory=dict)
    fetched_at: float | None = None  # trio.current_time() of the last successful fetch
    attempted_at: float | None = None  # trio.current_time() when the last fetch ended
    fetches: int = 0
    #: The error of the last fetch when it failed (cleared by a success).
    last_error: JwksUnavailable | None = None
    _flight: _Flight | None = None

    def _fresh(self) -> bool:
        return self.fetched_at is not None and trio.current_time() - self.fetched_at < self.ttl

    def _next_fetch_at(self) -> float:
        now = trio.current_time()
        return now if self.attempted_at is None else max(now, self.attempted_at + MIN_REFETCH_S)

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key `kid`; raises `InvalidIdToken` when the provider does not have it, `JwksUnavailable`
        when the keys cannot be fetched (and the key is not cached)."""
        for _ in range(3):
            spaced = self._next_fetch_at() > trio.current_time()
            if kid in self.keys and (self._fresh() or self._flight is not None or spaced):
                return self.keys[kid]  # fresh; or stale while a fetch is due / right after one failed
            if kid not in self.keys and self._flight is None and spaced and self.last_error is not None:
                break  # the provider failed a moment ago: answer now rather than pile up
            flight = self._flight
            if flight is None:
                await self._run_flight()
                break
            with trio.move_on_after(max(0.0, flight.deadline - trio.current_time())):
                await flight.done.wait()
            if not flight.done.is_set():
                raise JwksUnavailable(f"{self.url} did not answer within {FETCH_TIMEOUT_S:g} s")
            if not flight.interrupted:
                break
        if kid in self.keys:
            return self.keys[kid]
        if self.last_error is not None:
            raise JwksUnavailable(str(self.last_error))
        raise InvalidIdToken("the token was signed with a key the provider does not publish")

    async def _run_flight(self) -> None:
        """Wait out the spacing, then fetch, as the one flight everybody else waits for."""
        start = self._next_fetch_at()
        flight = self._flight = _Flight(deadline=start + FETCH_TIMEOUT_S + 1)
        began = False
        try:
            await trio.sleep_until(start)
            began = True
            await self._fetch()
            self.last_error = None
        except JwksUnavailable as exc:
            self.last_error = exc
        except BaseException:
            flight.interrupted = True  # this caller went away (cancelled): a waiter takes over
            raise
        finally:
            if began:
                # Spacing counts from the end of a fetch, so a key server that hangs is asked
                # again only MIN_REFETCH_S after it was given up on, never back to back.
                self.attempted_at = trio.current_time()
            self._flight = None
            flight.done.set()

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            with trio.fail_after(FETCH_TIMEOUT_S):
                async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False) as client:
                    async with client.stream("GET", self.url, headers={"Accept": "application/json"}) as response:
                        if response.status_code != 200:
                            raise JwksUnavailable(f"{self.url} answered HTTP {response.status_code}")
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > MAX_JWKS_BYTES:
                                raise JwksUnavailable(f"{self.url} sent more than {MAX_JWKS_BYTES} bytes")
        except trio.TooSlowError:
            raise JwksUnavailable(f"{self.url} did not answer within {FETCH_TIMEOUT_S:g} s") from None
        except httpx.HTTPError as exc:
            raise JwksUnavailable(f"{self.url} could not be reached ({type(exc).__name__})") from None
        self.keys = _parse_jwks(bytes(body), self.url)
        self.fetched_at = trio.current_time()


def _parse_jwks(body: bytes, url: str) -> dict[str, jwt.PyJWK]:
    try:
        data = orjson.loads(body)
    except ValueError:
        raise JwksUnavailable(f"{url} did not send JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksUnavailable(f"{url} did not send a JWK set")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in data["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA" or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
            continue
        try:
            keys[entry["kid"]] = jwt.PyJWK(entry, algorithm="RS256")
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue  # one unusable key does not spoil the others
    if not keys:
        raise JwksUnavailable(f"{url} published no usable RS256 signing key")
    return keys


def _header(token: str) -> dict[str, Any]:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidIdToken("the ID token is empty or too long")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidIdToken("the ID token is not a JWT") from None
    if header.get("alg") != "RS256":
        raise InvalidIdToken("the ID token must be signed with RS256")
    if not isinstance(header.get("kid"), str) or not header["kid"]:
        raise InvalidIdToken("the ID token names no signing key (kid)")
    return header


def _truthy(value: Any) -> bool:
    """`email_verified` is a boolean at Google and may be the string "true" at Apple."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


async def verify_id_token(provider: Provider, settings: Settings, cache: JwksCache, token: str) -> IdToken:
    """Verify `token` for `provider`; raises `InvalidIdToken` or `JwksUnavailable`."""
    header = _header(token)
    key = await cache.key(header["kid"])
    try:
        claims = jwt.decode(
            token, key.key, algorithms=["RS256"], audience=provider.client_id(settings),
            issuer=list(provider.issuers), leeway=LEEWAY_S,
            options={"require": ["sub", "iss", "aud", "exp", "iat"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidIdToken("the ID token has expired") from None
    except jwt.InvalidAudienceError:
        raise InvalidIdToken("the ID token was issued for another app") from None
    except jwt.InvalidIssuerError:
        raise InvalidIdToken(f"the ID token was not issued by {provider.title}") from None
    except jwt.PyJWTError as exc:
        raise InvalidIdToken(f"the ID token is not valid ({exc})") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > 255 or any(ord(c) < 33 for c in subject):
        raise InvalidIdToken("the ID token has no usable subject")
    email = claims.get("email")
    email = normalise_email(email) if isinstance(email, str) else None
    if email is not None and not valid_email(email):
        email = None  # an address we could not use is treated as absent
    return IdToken(provider.name, subject, email, email is not None and _truthy(claims.get("email_verified")))
