"""Google and Apple ID tokens: signing keys fetched from the provider's JWKS URL, cached, and used
to verify RS256 tokens (`aud`, `iss`, `exp`, `iat`, `sub`).

Keys are fetched with httpx's async client (the trio loop never blocks), under a time limit, and
kept for `KTULHU_JWKS_TTL` seconds. A token naming a key id the cache does not hold refetches at
once (providers rotate keys), but refetches are spaced at least `MIN_REFETCH_S` apart so tokens
with made-up key ids cannot turn the server into a request amplifier. When a refetch fails and the
key is still in the expired cache, the cached key is used: a provider outage does not end sign-in.
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
class JwksCache:
    """One provider's signing keys. Use it from one trio run (it holds a trio lock)."""

    url: str
    ttl: float
    keys: dict[str, jwt.PyJWK] = attrs.field(factory=dict)
    fetched_at: float | None = None  # trio.current_time() of the last successful fetch
    attempted_at: float | None = None
    fetches: int = 0
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    def _fresh(self) -> bool:
        return self.fetched_at is not None and trio.current_time() - self.fetched_at < self.ttl

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key `kid`; raises `InvalidIdToken` when the provider does not have it, `JwksUnavailable`
        when the keys cannot be fetched (and the key is not cached)."""
        if self._fresh() and kid in self.keys:
            return self.keys[kid]
        async with self._lock:
            if self._fresh() and kid in self.keys:  # fetched while we waited
                return self.keys[kid]
            if self.attempted_at is not None:
                wait = self.attempted_at + MIN_REFETCH_S - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
            try:
                await self._fetch()
            except JwksUnavailable:
                if kid in self.keys:
                    return self.keys[kid]
                raise
        if kid not in self.keys:
            raise InvalidIdToken("the token was signed with a key the provider does not publish")
        return self.keys[kid]

    async def _fetch(self) -> None:
        self.attempted_at = trio.current_time()
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
