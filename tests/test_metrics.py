"""`/metrics`: a valid text exposition with request counts by URL rule and the engine's live state."""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from ktulhu import metrics
from ktulhu.engine.prompt import ChatMessage
from ktulhu.engine.sampling import SamplingParams
from ktulhu.nurseries import loop_lag

pytestmark = pytest.mark.model


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list], name: str, **labels: str) -> float:
    total = 0.0
    for sample in found.get(name, []):
        if all(sample.labels.get(k) == v for k, v in labels.items()):
            total += sample.value
    return total


async def test_metrics_exposition(live_server):
    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            before = samples((await client.get("/metrics")).text)
            chat_id = str(uuid.uuid4())
            for _ in range(2):
                assert (await client.get(f"/chat-thread/{chat_id}")).status_code == 200
            assert (await client.get("/no/such/path/" + uuid.uuid4().hex)).status_code == 404

            await runtime.router.get().classify("how do I bake bread?", "en")
            params = SamplingParams.defaults(runtime.settings, max_tokens=8, temperature=0.0)
            gen = await runtime.engine.get().chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Say hi.")],
                                            params)
            with gen:
                text = await gen.text()
            assert gen.finished is not None and gen.finished.metrics.generated_tokens >= 1, text

            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            after = samples(response.text)

            # Requests by URL rule, never by raw path (no chat id in any label).
            rule = "/chat-thread/<chat_id>"
            assert value(after, "ktulhu_http_requests_total", route=rule, method="GET", status="200") - \
                value(before, "ktulhu_http_requests_total", route=rule, method="GET", status="200") == 2
            assert value(after, "ktulhu_http_requests_total", route="<unmatched>", status="404") >= 1
            assert chat_id not in response.text
            assert value(after, "ktulhu_http_request_seconds_count", route=rule) >= 2

            # Live engine state, read at scrape time.
            stats = runtime.engine.get().stats()
            assert value(after, "ktulhu_engine_busy_slots") == stats.busy_slots == 0
            assert value(after, "ktulhu_engine_queue_depth") == stats.queue_depth == 0
            assert value(after, "ktulhu_engine_queue_capacity") == stats.queue_capacity
            assert 0.0 <= value(after, "ktulhu_engine_kv_usage_ratio") <= 1.0
            assert value(after, "ktulhu_engine_slots") >= 1
            assert value(after, "ktulhu_engine_prefix_store_bytes") == stats.stored_bytes
            assert value(after, "ktulhu_engine_prefix_restores_total") == stats.prefix_restores

            # The finished generation fed the histograms and the token counters.
            generated = gen.finished.metrics.generated_tokens
            assert value(after, "ktulhu_engine_ttft_seconds_count") - value(before, "ktulhu_engine_ttft_seconds_count") == 1
            assert value(after, "ktulhu_engine_inter_token_seconds_count") - \
                value(before, "ktulhu_engine_inter_token_seconds_count") == generated - 1
            assert value(after, "ktulhu_engine_generated_tokens_total") - \
                value(before, "ktulhu_engine_generated_tokens_total") == generated
            assert value(after, "ktulhu_engine_tokens_per_second") > 0

            # Router, store and WebSocket families are present.
            for name in ("ktulhu_router_queue_depth", "ktulhu_router_calls_total", "ktulhu_store_errors_total",
                         "ktulhu_store_writes_total", "ktulhu_ws_sessions", "ktulhu_router_latency_seconds_count"):
                assert name in after, name
            assert value(after, "ktulhu_router_latency_seconds_count") - \
                value(before, "ktulhu_router_latency_seconds_count") == 1
            assert value(after, "ktulhu_store_errors_total", kind="corrupt") == \
                runtime.store.aio.statistics().corrupt_records

            # The tree's loop-lag probe keeps sampling while the server runs.
            assert "ktulhu_event_loop_lag_seconds_bucket" in after
            with trio.fail_after(30):
                while value(samples((await client.get("/metrics")).text), "ktulhu_event_loop_lag_seconds_count") <= \
                        value(after, "ktulhu_event_loop_lag_seconds_count"):
                    await trio.sleep(0.05)


def lag_histogram() -> tuple[float, float]:
    """(count, sum) of ktulhu_event_loop_lag_seconds in this process."""
    found = {s.name: s.value for s in metrics.EVENT_LOOP_LAG.collect()[0].samples}
    return found["ktulhu_event_loop_lag_seconds_count"], found["ktulhu_event_loop_lag_seconds_sum"]


async def test_loop_lag_probe_records_how_late_it_woke(mock_clock: trio.testing.MockClock) -> None:
    """Under MockClock the probe's wake-ups are exact: on time = 0, after a 0.25 s stall = 0.25."""
    recorded: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: loop_lag.watch(interval=0.1, observe=recorded.append))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.1)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.35)  # the trio thread was held 0.25 s past the probe's deadline
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert recorded == [pytest.approx(0.0), pytest.approx(0.25)]

    count, total = lag_histogram()
    async with trio.open_nursery() as nursery:  # by default it feeds ktulhu_event_loop_lag_seconds
        nursery.start_soon(lambda: loop_lag.watch(interval=0.1))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.6)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    after_count, after_total = lag_histogram()
    assert after_count == count + 1 and after_total - total == pytest.approx(0.5)
