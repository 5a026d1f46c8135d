"""The generation routes count a request on its way to the engine (`Arrivals`) from authentication to
submission: every way out (a bad body, a prompt too long, a bad token id, a burst that all succeeds,
a refused `/ws` prompt) ends its count, so the engine never waits for a request that is gone."""

from __future__ import annotations

import uuid

import pytest
import trio

from auth.helpers import bearer, client, make_user
from chat.wsclient import dones, ws_client

pytestmark = pytest.mark.model

ENV = {"LLAMA_CLI_MAX_TOKENS": "4", "KTULHU_LOGIN_RATE": "0", "LLAMA_CLI_CTX": "256", "KTULHU_SLOTS": "4",
       "KTULHU_ANON_RATE": "0"}
HELLO = [{"role": "user", "content": "Hello!"}]


async def test_every_way_out_of_a_generation_route_ends_its_count(live_server) -> None:
    async with live_server(**ENV) as server:
        runtime = server.runtime
        _, token = make_user(runtime, role="paid")
        refused = [
            ("/v1/chat/completions", b"{not json", 400),
            ("/v1/chat/completions", {"messages": "Hello!"}, 422),
            ("/v1/chat/completions", {"messages": HELLO, "temperature": "hot"}, 422),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, 413),
            ("/v1/completions", {"prompt": [10**9]}, 400),
            ("/v1/completions", {"prompt": "word " * 400}, 413),
            ("/external/api/generate", {"prompt": "  "}, 400),
            ("/external/api/generate", {"prompt": "Hi", "max_tokens": -1}, 422),
        ]
        async with client(server) as http:
            for path, body, status in refused:
                sent = {"content": body} if isinstance(body, bytes) else {"json": body}
                r = await http.post(path, headers={**bearer(token), "Content-Type": "application/json"}, **sent)
                assert r.status_code == status, (path, body, r.status_code, r.text)
                assert runtime.arrivals.count == 0, (path, body)
            r = await http.post("/v1/chat/completions", json={"messages": HELLO})  # no credential: not counted
            assert r.status_code == 401 and runtime.arrivals.count == 0

            statuses: list[int] = []

            async def ask(path: str, body: dict) -> None:
                statuses.append((await http.post(path, json=body, headers=bearer(token))).status_code)

            async with trio.open_nursery() as nursery:  # a burst over every route, all served
                for k in range(3):
                    chat = [{"role": "user", "content": f"Hi {k}"}]
                    nursery.start_soon(ask, "/v1/chat/completions", {"messages": chat})
                    nursery.start_soon(ask, "/v1/completions", {"prompt": f"Once upon a time {k}"})
                    nursery.start_soon(ask, "/external/api/generate", {"prompt": f"Hello {k}"})
            assert statuses == [200] * 9 and runtime.arrivals.count == 0

        chat_id = str(uuid.uuid4())
        async with ws_client(server.ws_url + "/ws") as ws:
            too_long = await ws.ask("word " * 400, chat_id=chat_id)
            assert dones(too_long)[0]["reason"] == "context_too_long" and runtime.arrivals.count == 0
            answered = await ws.ask("A short question?", chat_id=chat_id)
            assert dones(answered)[0]["reason"] in ("eos", "length", "stop") and runtime.arrivals.count == 0
