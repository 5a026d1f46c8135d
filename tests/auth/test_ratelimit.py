"""Rate-limit records do not pile up: full buckets are deleted when touched, expired ones (and expired
signed-out token entries) by a bounded sweep that a task repeats. Store-level, explicit timestamps;
the periodic task runs on trio's MockClock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from ktulhu.auth.ratelimit import Sweeper, sweep_all
from ktulhu.store import Store
from ktulhu.store.keys import RATELIMIT, REVOKED_JWT

RATE = 6  # per minute: one token every 10 s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "db")
    try:
        yield opened
    finally:
        opened.close()


def take(store: Store, subject: str, now: int, cost: float = 1.0):
    return store.take_rate_token("login_ip", subject, capacity=RATE, refill_per_s=RATE / 60, cost=cost, now=now)


def records(store: Store, prefix: bytes = RATELIMIT) -> list[bytes]:
    return [key for key, _ in store.scan(prefix)]


def test_full_buckets_are_not_kept(store: Store) -> None:
    assert take(store, "1.2.3.4", 1_000, cost=0).tokens_left == RATE  # a peek at nothing writes nothing
    assert records(store) == []
    take(store, "1.2.3.4", 1_000)
    assert records(store) == [b"ratelimit:login_ip:1.2.3.4"]
    take(store, "1.2.3.4", 1_000, cost=-1)  # given back: full again, so the record goes
    assert records(store) == []
    take(store, "1.2.3.4", 1_000)
    take(store, "1.2.3.4", 11_000, cost=0)  # refilled by the time it is looked at: deleted on access
    assert records(store) == []


def test_sweep_deletes_what_has_expired_in_bounded_steps(store: Store) -> None:
    for i in range(25):
        take(store, f"10.0.0.{i}", 1_000)  # one token short: full again at 11 000
    take(store, "10.9.9.9", 1_000, cost=RATE)  # empty: full again at 61 000
    store.revoke_token("jti-old", 5_000)
    store.revoke_token("jti-new", 10**15)
    store.spend_quota_pool("pool-a", limit=3)
    # A record written before expiry times existed.
    store._rdict()[b"ratelimit:old:1.1.1.1"] = b'{"tokens":1.0,"updated_ts":1000}'

    assert store.sweep_expired(now=10_999).deleted == 1  # only jti-old
    result = store.sweep_expired(now=11_000, limit=10)
    assert (result.deleted, result.examined) == (10, 10) and result.next_after is not None
    total = result.deleted
    while result.next_after is not None:
        result = store.sweep_expired(now=11_000, after=result.next_after, limit=10)
        assert result.examined <= 10
        total += result.deleted
    assert total == 25
    assert records(store) == [b"ratelimit:login_ip:10.9.9.9", b"ratelimit:old:1.1.1.1"]
    assert store.sweep_expired(now=61_000).deleted == 1
    assert store.sweep_expired(now=1_000 + 24 * 3600 * 1000).deleted == 1  # the legacy record, a day on
    assert records(store) == [] and records(store, REVOKED_JWT) == [b"revoked_jwt:jti-new"]
    assert store.quota_pool_used("pool-a") == 1  # quotas are not rate limits: never swept


async def test_sweeper_task_repeats_on_its_interval(store: Store, autojump_clock) -> None:
    sweeper = Sweeper(store, interval=300, batch=7)
    for i in range(20):
        take(store, f"10.1.0.{i}", 1_000)  # long expired by the wall clock the sweep uses
    async with trio.open_nursery() as nursery:
        await nursery.start(sweeper.run)
        await sweeper.wait_passes(1)
        first = trio.current_time()
        assert records(store) == [] and sweeper.deleted == 20
        for i in range(5):
            take(store, f"10.2.0.{i}", 1_000)
        await sweeper.wait_passes(2)
        assert trio.current_time() - first >= 300  # the next pass waited out its interval
        assert records(store) == [] and sweeper.deleted == 25
        nursery.cancel_scope.cancel()
    store.close()
    with trio.fail_after(1):  # a closed store ends the task (the tree is stopping)
        await Sweeper(store).run()
    with pytest.raises(Exception):
        await sweep_all(store)
