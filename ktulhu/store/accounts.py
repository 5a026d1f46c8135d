"""Records the original did not have: API keys, handled Stripe events, rate-limit buckets."""

from __future__ import annotations

from typing import Any

import attrs

from . import keys
from .keys import check_id
from .records import ApiKey, RateBucket, StripeEvent, encode, now_ms

__all__ = ["AccountOps", "RateDecision"]


@attrs.frozen
class RateDecision:
    """The outcome of `take_rate_token`: ``retry_after_ms`` is 0 when allowed."""

    allowed: bool
    tokens_left: float
    retry_after_ms: int


class AccountOps:
    """Mixin of `Store`: every method is synchronous, thread-safe and validates its ids first."""

    # --- API keys ------------------------------------------------------------------------------

    def save_api_key(self: Any, api_key: ApiKey) -> ApiKey:
        """Store an API key (its ``secret_hash`` only) and index it under its user."""
        check_id(api_key.id, "API key id")
        check_id(api_key.user_id, "user id")
        with self._locks.hold("apikey:" + api_key.id):
            old = self._load(ApiKey, keys.apikey_key(api_key.id))
            batch = self._batch()
            if old is not None and old.user_id != api_key.user_id:
                batch.delete(keys.ix_user_apikey(old.user_id, old.id))
            batch.put(keys.apikey_key(api_key.id), encode(api_key))
            batch.put(keys.ix_user_apikey(api_key.user_id, api_key.id), api_key.id.encode())
            self._write(batch)
        return api_key

    def load_api_key(self: Any, key_id: str) -> ApiKey | None:
        check_id(key_id, "API key id")
        return self._load(ApiKey, keys.apikey_key(key_id))

    def list_api_keys_for_user(self: Any, user_id: str) -> list[ApiKey]:
        check_id(user_id, "user id")
        ids = [v.decode(errors="replace") for _, v in self._scan(keys.ix_user_apikey_prefix(user_id))]
        record_keys = [keys.apikey_key(i) for i in ids]
        return [k for key, raw in zip(record_keys, self._get_many(record_keys))
                if (k := self._decode(ApiKey, key, raw)) is not None]

    def delete_api_key(self: Any, key_id: str) -> bool:
        """Delete an API key; False when it did not exist."""
        check_id(key_id, "API key id")
        with self._locks.hold("apikey:" + key_id):
            raw = self._get(keys.apikey_key(key_id))
            if raw is None:
                return False
            old = self._decode(ApiKey, keys.apikey_key(key_id), raw)
            batch = self._batch()
            batch.delete(keys.apikey_key(key_id))
            if old is not None:
                batch.delete(keys.ix_user_apikey(old.user_id, key_id))
            self._write(batch)
            return True

    # --- Stripe events -------------------------------------------------------------------------

    def record_stripe_event(self: Any, event_id: str, event_type: str, *, now: int | None = None) -> bool:
        """Remember a webhook event; True the first time, False for a redelivery (atomic)."""
        check_id(event_id, "Stripe event id")
        with self._locks.hold("stripe_event:" + event_id):
            key = keys.stripe_event_key(event_id)
            if self._get(key) is not None:
                return False
            batch = self._batch()
            batch.put(key, encode(StripeEvent(id=event_id, type=event_type,
                                              received_ts=now_ms() if now is None else now)))
            self._write(batch)
            return True

    # --- rate limits ---------------------------------------------------------------------------

    def take_rate_token(
        self: Any, scope: str, subject: str, *, capacity: float, refill_per_s: float,
        cost: float = 1.0, now: int | None = None,
    ) -> RateDecision:
        """Token bucket `scope`/`subject` (e.g. ``login``/an IP or email): refill, then take `cost`
        tokens if there are enough. Atomic per bucket; the bucket survives restarts."""
        check_id(scope, "rate-limit scope")
        key = keys.ratelimit_key(scope, subject)
        now = now_ms() if now is None else now
        with self._locks.hold("ratelimit:" + scope + ":" + subject):
            bucket = self._load(RateBucket, key)
            tokens = float(capacity) if bucket is None else min(
                float(capacity), bucket.tokens + max(0, now - bucket.updated_ts) * refill_per_s / 1000.0
            )
            allowed = tokens >= cost
            if allowed:
                tokens -= cost
            batch = self._batch()
            batch.put(key, encode(RateBucket(tokens=tokens, updated_ts=now)))
            self._write(batch)
        retry = 0 if allowed or refill_per_s <= 0 else int((cost - tokens) * 1000.0 / refill_per_s) + 1
        return RateDecision(allowed=allowed, tokens_left=tokens, retry_after_ms=retry)
