"""Records the original did not have: API keys, handled Stripe events, rate-limit buckets, signed-out
app JWTs and shared free quotas."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

from . import keys
from .codec import encode
from .core import StoreCore
from .keys import check_id
from .records import ApiKey, RateBucket, StripeEvent, User, now_ms

__all__ = ["AccountOps", "EventChange", "RateDecision", "SweepResult"]

#: A rate-limit record written before `expires_ts` existed is dropped this long after its last use
#: (every limit in use refills within minutes).
LEGACY_BUCKET_TTL_MS = 24 * 3600 * 1000


@attrs.frozen
class EventChange:
    """What `update_user_for_stripe_event` did: ``status`` is ``applied`` (change written and event
    recorded in one batch), ``duplicate`` (the event was already recorded: nothing written) or
    ``no_user`` (nothing to change; the event is recorded)."""

    status: str
    before: User | None = None
    after: User | None = None


@attrs.frozen
class SweepResult:
    """One `sweep_expired` pass: records ``deleted``, records ``examined``, and the key to resume after
    (None when the pass reached the end)."""

    deleted: int
    examined: int
    next_after: bytes | None


@attrs.frozen
class RateDecision:
    """The outcome of `take_rate_token`: ``retry_after_ms`` is 0 when allowed."""

    allowed: bool
    tokens_left: float
    retry_after_ms: int


class AccountOps(StoreCore):
    """Mixin of `Store`: every method is synchronous, thread-safe and validates its ids first."""

    # --- API keys ------------------------------------------------------------------------------

    def save_api_key(self, api_key: ApiKey) -> ApiKey:
        """Store an API key (its ``secret_hash`` only) and index it under its user."""
        check_id(api_key.id, "API key id")
        check_id(api_key.user_id, "user id")
        with self._locks.hold("apikey:" + api_key.id):
            old = self._load(ApiKey, keys.apikey_key(api_key.id))
            batch = self.batch()
            if old is not None and old.user_id != api_key.user_id:
                batch.delete(keys.ix_user_apikey(old.user_id, old.id))
            batch.put(keys.apikey_key(api_key.id), encode(api_key))
            batch.put(keys.ix_user_apikey(api_key.user_id, api_key.id), api_key.id.encode())
            self.write(batch)
        return api_key

    def load_api_key(self, key_id: str) -> ApiKey | None:
        check_id(key_id, "API key id")
        return self._load(ApiKey, keys.apikey_key(key_id))

    def list_api_keys_for_user(self, user_id: str) -> list[ApiKey]:
        check_id(user_id, "user id")
        ids = [v.decode(errors="replace") for _, v in self.scan(keys.ix_user_apikey_prefix(user_id))]
        record_keys = [keys.apikey_key(i) for i in ids]
        return [k for key, raw in zip(record_keys, self.get_many(record_keys))
                if (k := self.decode_or_skip(ApiKey, key, raw)) is not None]

    def delete_api_key(self, key_id: str) -> bool:
        """Delete an API key; False when it did not exist."""
        check_id(key_id, "API key id")
        with self._locks.hold("apikey:" + key_id):
            raw = self.get(keys.apikey_key(key_id))
            if raw is None:
                return False
            old = self.decode_or_skip(ApiKey, keys.apikey_key(key_id), raw)
            batch = self.batch()
            batch.delete(keys.apikey_key(key_id))
            if old is not None:
                batch.delete(keys.ix_user_apikey(old.user_id, key_id))
            self.write(batch)
            return True

    # --- Stripe events -------------------------------------------------------------------------

    def record_stripe_event(self, event_id: str, event_type: str, *, now: int | None = None) -> bool:
        """Remember a webhook event; True the first time, False for a redelivery (atomic). Call it
        once the event's effect is applied (or when it has none), never before."""
        check_id(event_id, "Stripe event id")
        with self._locks.hold("stripe_event:" + event_id):
            key = keys.stripe_event_key(event_id)
            if self.get(key) is not None:
                return False
            batch = self.batch()
            batch.put(key, _event_record(event_id, event_type, now))
            self.write(batch)
            return True

    def stripe_event_seen(self, event_id: str) -> bool:
        """True when the event was already recorded (its effect is applied)."""
        check_id(event_id, "Stripe event id")
        return self.get(keys.stripe_event_key(event_id)) is not None

    def update_user_for_stripe_event(
        self, user_id: str, change: Callable[[User], User], event_id: str, event_type: str,
        *, now: int | None = None,
    ) -> EventChange:
        """Apply a webhook event's change to one user and record the event in the same write batch,
        so the event is marked handled exactly when its change is stored: a failure before the write
        leaves both undone (Stripe's retry applies it), and a redelivery finds it recorded."""
        check_id(event_id, "Stripe event id")
        check_id(user_id, "user id")
        event_key = keys.stripe_event_key(event_id)
        with self._locks.hold("stripe_event:" + event_id, "user:" + user_id):
            if self.get(event_key) is not None:
                return EventChange("duplicate")
            old = self._load(User, keys.user_key(user_id))
            if old is None:
                batch = self.batch()
                batch.put(event_key, _event_record(event_id, event_type, now))
                self.write(batch)
                return EventChange("no_user")
            from .users import _copy

            new = change(_copy(old))
            new.id = user_id
            self._put_user(new, old, also=[(event_key, _event_record(event_id, event_type, now))])
            return EventChange("applied", old, new)

    # --- rate limits ---------------------------------------------------------------------------

    def take_rate_token(
        self, scope: str, subject: str, *, capacity: float, refill_per_s: float,
        cost: float = 1.0, now: int | None = None,
    ) -> RateDecision:
        """Token bucket `scope`/`subject` (e.g. ``login``/an IP or email): refill, then take `cost`
        tokens if there are enough (`cost` 0 peeks, a negative `cost` gives tokens back). Atomic per
        bucket; the bucket survives restarts.

        A bucket that is full after the call is deleted rather than written (a full bucket and no
        bucket mean the same), and every written bucket carries the time it will be full again, so
        `sweep_expired` can drop it later without knowing its capacity: records never pile up."""
        check_id(scope, "rate-limit scope")
        key = keys.ratelimit_key(scope, subject)
        now = now_ms() if now is None else now
        with self._locks.hold(key.decode()):
            bucket = self._load(RateBucket, key)
            tokens = float(capacity) if bucket is None else min(
                float(capacity), bucket.tokens + max(0, now - bucket.updated_ts) * refill_per_s / 1000.0
            )
            allowed = tokens >= cost
            if allowed:
                tokens = min(float(capacity), tokens - cost)
            batch = self.batch()
            if tokens >= capacity:
                if bucket is not None or self.get(key) is not None:
                    batch.delete(key)
            elif cost == 0:
                pass  # a peek changes nothing: the stored (tokens, updated_ts) still refill the same
            else:
                expires = None if refill_per_s <= 0 else now + math.ceil((capacity - tokens) * 1000.0 / refill_per_s)
                batch.put(key, encode(RateBucket(tokens=tokens, updated_ts=now, expires_ts=expires)))
            self.write(batch)
        retry = 0 if allowed or refill_per_s <= 0 else int((cost - tokens) * 1000.0 / refill_per_s) + 1
        return RateDecision(allowed=allowed, tokens_left=tokens, retry_after_ms=retry)

    # --- signed-out app JWTs -------------------------------------------------------------------

    def revoke_token(self, jti: str, expires_ms: int) -> None:
        """Refuse the app JWT `jti` from now on; the entry is kept until `expires_ms` (the token's own
        expiry, after which it is refused anyway) and then swept."""
        key = keys.revoked_jwt_key(jti)
        batch = self.batch()
        batch.put(key, b"%d" % int(expires_ms))
        self.write(batch)

    def is_token_revoked(self, jti: str) -> bool:
        return self.get(keys.revoked_jwt_key(jti)) is not None

    # --- shared free quotas --------------------------------------------------------------------

    def spend_quota_pool(self, subject: str, *, limit: int, by: int = 1) -> bool:
        """Add `by` to the pool's count unless that passes `limit` (False, unchanged); a negative `by`
        gives back (never below 0). Atomic per pool; pools never expire (like account quotas)."""
        key = keys.quota_pool_key(subject)
        with self._locks.hold(key.decode()):
            raw = self.get(key)
            try:
                used = int(raw) if raw is not None else 0
            except ValueError:
                used = 0
            if by > 0 and used + by > limit:
                return False
            used = max(0, used + by)
            batch = self.batch()
            batch.put(key, b"%d" % used)
            self.write(batch)
            return True

    def quota_pool_used(self, subject: str) -> int:
        raw = self.get(keys.quota_pool_key(subject))
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return 0

    # --- expiry --------------------------------------------------------------------------------

    def sweep_expired(self, *, now: int | None = None, after: bytes | None = None,
                      limit: int = 1000) -> SweepResult:
        """Delete expired rate-limit buckets and signed-out token entries, examining at most `limit`
        records from the key after `after`; pass the result's `next_after` to the next call to
        continue (bounded work per call, the whole key space over successive calls)."""
        now = now_ms() if now is None else now
        deleted = examined = 0
        last: bytes | None = None
        for prefix in (keys.RATELIMIT, keys.REVOKED_JWT):
            if after is not None and not after.startswith(prefix) and after > prefix:
                continue  # this prefix was finished in an earlier call
            start = after if after is not None and after.startswith(prefix) else None
            for key, raw in self.scan(prefix, after=start, page=limit + 1):
                if examined >= limit:
                    return SweepResult(deleted, examined, last)
                examined += 1
                last = key
                if _expired(self, key, raw, now, prefix):
                    with self._locks.hold(key.decode(errors="replace")):
                        current = self.get(key)
                        if current is not None and _expired(self, key, current, now, prefix):
                            batch = self.batch()
                            batch.delete(key)
                            self.write(batch)
                            deleted += 1
        return SweepResult(deleted, examined, None)


def _event_record(event_id: str, event_type: str, now: int | None) -> bytes:
    return encode(StripeEvent(id=event_id, type=event_type, received_ts=now_ms() if now is None else now))


def _expired(store: StoreCore, key: bytes, raw: bytes, now: int, prefix: bytes) -> bool:
    if prefix == keys.REVOKED_JWT:
        try:
            return int(raw) <= now
        except ValueError:
            return True
    bucket = store.decode_or_skip(RateBucket, key, raw)
    if bucket is None:
        return True  # corrupt: logged by _decode; it can only confuse a limit
    if bucket.expires_ts is not None:
        return bucket.expires_ts <= now
    return bucket.updated_ts + LEGACY_BUCKET_TTL_MS <= now
