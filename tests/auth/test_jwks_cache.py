"""The Google/Apple key cache under a flood of tokens with made-up key ids, against the fake key
server, on a frozen clock (`mock_clock`): time moves only when a test jumps it, so every rule about
"at most one fetch per second" is checked by counting, never by timing."""

from __future__ import annotations

import trio
import trio.testing

from ktulhu.auth import oidc
from ktulhu.auth.oidc import InvalidIdToken, JwksUnavailable

from .fake_idp import fake_idp


async def _collect(cache: oidc.JwksCache, kid: str, results: dict) -> None:
    try:
        results[kid] = await cache.key(kid)
    except (InvalidIdToken, JwksUnavailable) as exc:
        results[kid] = exc


async def test_made_up_kids_neither_hammer_the_provider_nor_hold_up_valid_keys(mock_clock) -> None:
    async with fake_idp() as idp:
        cache = oidc.JwksCache(idp.url, ttl=60)
        known = next(iter(idp.keys))
        await cache.key(known)
        assert idp.hits == 1

        # The cache expires, the provider rotates in a key, and its key server hangs (gated) while
        # a flood of made-up key ids arrives.
        mock_clock.jump(61)
        rotated = idp.add_key()
        idp.gate, idp.requested = trio.Event(), trio.Event()
        results: dict = {}
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(_collect, cache, f"flood-{i}", results)
            await idp.requested.wait()  # one fetch reached the key server and hangs there
            nursery.start_soon(_collect, cache, rotated, results)
            nursery.start_soon(_collect, cache, known, results)
            await trio.testing.wait_all_tasks_blocked()
            # A key the cache holds is used at once while the fetch hangs: the flood holds up nobody.
            assert results.get(known) is cache.keys[known]
            # Everything else waits for that one fetch instead of starting its own.
            assert idp.hits == 2 and not any(k.startswith("flood-") for k in results)
            idp.gate.set()
        assert isinstance(results[rotated], oidc.jwt.PyJWK)  # the rotated key came with that fetch
        assert all(isinstance(results[f"flood-{i}"], InvalidIdToken) for i in range(50))
        assert idp.hits == 2

        # Another wave right after: it waits for the next fetch, due MIN_REFETCH_S after the last
        # one; meanwhile known keys are answered at once; then one fetch answers the whole wave.
        idp.gate = None
        results = {}
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(_collect, cache, f"wave-{i}", results)
            await trio.testing.wait_all_tasks_blocked()
            assert results == {} and idp.hits == 2
            assert (await cache.key(rotated)) is cache.keys[rotated]
            mock_clock.jump(oidc.MIN_REFETCH_S)
        assert len(results) == 20 and all(isinstance(r, InvalidIdToken) for r in results.values())
        assert idp.hits == 3


async def test_a_hanging_key_server_bounds_every_wait(mock_clock) -> None:
    async with fake_idp() as idp:
        cache = oidc.JwksCache(idp.url, ttl=60)
        idp.gate = trio.Event()
        results: dict = {}
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(_collect, cache, f"kid-{i}", results)
            await idp.requested.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert results == {} and idp.hits == 1  # one fetch; the rest wait for it
            mock_clock.jump(oidc.FETCH_TIMEOUT_S + 1)  # the fetch's limit and every waiter's limit
            await trio.testing.wait_all_tasks_blocked()
            # Every waiter gave up at its own bound (the fetching caller may still be closing up).
            assert len(results) >= 9 and idp.hits == 1
        assert all(isinstance(results[f"kid-{i}"], JwksUnavailable) for i in range(10))
        assert idp.hits == 1
        # Right after that failure nothing fetches: an unknown key is a prompt 502, no waiting.
        results = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, cache, "kid-0", results)
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(results.get("kid-0"), JwksUnavailable) and idp.hits == 1


async def test_a_caller_that_goes_away_hands_the_fetch_on(mock_clock) -> None:
    async with fake_idp() as idp:
        cache = oidc.JwksCache(idp.url, ttl=60)
        known = next(iter(idp.keys))
        idp.gate = trio.Event()
        leader_results: dict = {}
        results: dict = {}
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await _collect(cache, known, leader_results)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lead)
            await idp.requested.wait()
            nursery.start_soon(_collect, cache, known, results)
            await trio.testing.wait_all_tasks_blocked()
            idp.requested = trio.Event()
            leader.cancel()  # the client that ran the fetch disconnected
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(oidc.MIN_REFETCH_S)  # the waiter fetches in its place, spaced as always
            await idp.requested.wait()
            assert idp.hits == 2
            idp.gate.set()
        assert leader_results == {} and isinstance(results.get(known), oidc.jwt.PyJWK)
