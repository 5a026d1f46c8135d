"""Several models on one server (KTULHU_MODELS): the request's `model` picks one on `/v1`,
`/external/api` and the WS prompt; `/v1/models` lists them all; loads happen on first use, idle
models unload (keep-alive), the memory budget refuses what does not fit.

The real server and default model, plus a tiny generated GGUF named `tiny`. Waits are on the
pool's change events, bounded by fail_after; no sleeps.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest
import trio

from ktulhu.store.records import now_ms

from api.helpers import openai_client
from auth.helpers import bearer, make_user
from chat.wsclient import dones, tokens, ws_client
from engine.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.model

ENV = {"LLAMA_CLI_MAX_TOKENS": "4", "KTULHU_LOGIN_RATE": "0", "KTULHU_ANON_RATE": "0"}
QUESTION = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("multi") / "tiny-model.gguf")


async def test_models_pick_load_and_unload(live_server, tiny_file) -> None:
    async with live_server(**ENV, KTULHU_MODELS=f"tiny={tiny_file}|ctx=512", KTULHU_MODEL_KEEP_ALIVE="0") as server:
        runtime = server.runtime
        pool = runtime.models.get()
        default = runtime.settings.model_file.stem
        _, token = make_user(runtime, role="paid")
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(token), timeout=60) as http:
            with trio.fail_after(120):
                listed = (await http.get("/v1/models")).json()["data"]
                assert [(m["id"], m["loaded"]) for m in listed] == [(default, True), ("tiny", False)]
                assert listed[0]["max_model_len"] == runtime.engine.get().n_ctx_seq and "meta" in listed[0]
                assert listed[1]["max_model_len"] == 512 and "meta" not in listed[1]
                assert (await http.get("/v1/models/tiny")).json()["loaded"] is False

                sdk = openai_client(server, token)
                # no model, the default's name: the default model
                reply = await sdk.chat.completions.create(model=default, messages=QUESTION, max_tokens=2)
                assert reply.model == default
                answer = await http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
                assert answer.status_code == 200 and answer.json()["model"] == default
                assert pool.state("tiny") == "unloaded"

                # an unknown model is OpenAI's 404
                answer = await http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": QUESTION})
                assert answer.status_code == 404
                error = answer.json()["error"]
                assert error["code"] == "model_not_found" and error["param"] == "model"
                assert "`tiny`" in error["message"] and f"`{default}`" in error["message"]
                answer = await http.post("/v1/completions", json={"model": "gpt-4o", "prompt": "Hi"})
                assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"

                # tiny loads on first use (concurrent first requests: one load) while the default
                # model keeps serving
                async def ask_tiny() -> None:
                    reply = await sdk.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
                    assert reply.model == "tiny"

                async def ask_default() -> None:
                    answer = await http.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 2})
                    assert answer.status_code == 200 and answer.json()["model"] == default

                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(ask_tiny)
                    nursery.start_soon(ask_default)
                assert pool.loads("tiny") == 1
                # keep-alive 0: unloaded once its generations ended
                await pool.wait_until(lambda: pool.state("tiny") == "unloaded")

                # a streamed completion on tiny (its generation may end before the first chunk is
                # read: what keeps a model loaded while in use is held here with a lease instead)
                async with http.stream("POST", "/v1/completions",
                                       json={"model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}) as sse:
                    assert sse.status_code == 200
                    chunks = [json.loads(line[6:]) async for line in sse.aiter_lines()
                              if line.startswith("data: {")]
                assert chunks and all(c["model"] == "tiny" for c in chunks)
                await pool.wait_until(lambda: pool.state("tiny") == "unloaded")
                assert pool.loads("tiny") == 2
                lease = await pool.acquire("tiny")
                try:
                    loaded = (await http.get("/v1/models/tiny")).json()
                    assert loaded["loaded"] is True and loaded["meta"]["n_ctx"] == loaded["max_model_len"] <= 512
                finally:
                    lease.release()
                await pool.wait_until(lambda: pool.state("tiny") == "unloaded")

                # /external/api picks by `model` too
                answer = await http.post("/external/api/generate", json={"prompt": "Hi", "model": "nope"})
                assert answer.status_code == 404 and answer.json()["error"] == "model_not_found"

            # the web client's legacy name on /ws is the default model
            chat_id = str(uuid.uuid4())
            async with ws_client(server.ws_url + "/ws") as ws:
                await ws.send({"type": "register", "device_hash": "-1234567", "session_id": str(uuid.uuid4()),
                               "chat_id": chat_id})
                assert (await ws.recv())["event"] == "registered"
                for model in ("mistral-7b-lora", "tiny"):
                    rid = str(uuid.uuid4())
                    wrapped = json.dumps({"role": "user", "chat_id": chat_id, "text": "hi there", "model": model,
                                          "ts": now_ms()})
                    await ws.send({"id": rid, "text": wrapped, "device_hash": "-1234567", "session_id": "x",
                                   "chat_id": chat_id})
                    frames = await ws.until_done(rid)
                    assert len(dones(frames)) == 1 and tokens(frames)
                    assert pool.loads("tiny") == (3 if model == "mistral-7b-lora" else 4)


async def test_memory_budget_full_is_503(live_server, tiny_file) -> None:
    # 1 MiB: the default model alone is over it, so tiny can never be loaded beside it
    async with live_server(**ENV, KTULHU_MODELS=f"tiny={tiny_file}", KTULHU_MODELS_MEMORY_MB="1") as server:
        _, token = make_user(server.runtime, role="paid")
        async with httpx.AsyncClient(base_url=server.url, headers=bearer(token), timeout=60) as http:
            with trio.fail_after(120):
                answer = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": QUESTION})
                assert answer.status_code == 503
                error = answer.json()["error"]
                assert error["code"] == "server_busy" and "model memory budget full" in error["message"]
                answer = await http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
                assert answer.status_code == 200
