"""The whole server in remote mode (KTULHU_ENGINE=remote via KTULHU_WORKERS) on two real llama-server
workers: no GGUF here, `/readyz`, `/metrics`, the admin page, `/ws` prompts and titles through the
workers, and a worker killed with SIGKILL mid-reply, then restarted on its port."""

from __future__ import annotations

import httpx
import pytest
import trio

from ktulhu import doctor
from ktulhu.engine.remote import RemoteEngine
from ktulhu.settings import load_settings

from admin.helpers import basic, write_credentials
from auth.helpers import bearer, make_user
from chat.wsclient import dones, tokens, ws_client
from .conftest import worker_list

pytestmark = pytest.mark.model

WAIT_S = 90


def remote_env(fleet, **extra: str) -> dict[str, str]:
    return {"KTULHU_WORKERS": worker_list(fleet), "LLAMA_CLI_MODEL": "models/not-here.gguf",
            "KTULHU_ANON_RATE": "0", "LLAMA_CLI_TEMP": "0", "LLAMA_CLI_MAX_TOKENS": "24",
            "KTULHU_WORKER_HEALTH_INTERVAL": "0.2", **extra}


def assistant_turns(server, chat_id: str):
    return [m for m in server.runtime.store.list_messages_for_chat(chat_id) if m.role == "assistant"]


async def test_a_front_end_without_a_model_serves_through_the_workers(fleet, live_server) -> None:
    async with live_server(**remote_env(fleet)) as server:
        runtime = server.runtime
        assert not (server.root / "models/not-here.gguf").exists()
        assert runtime.model.current is None and isinstance(runtime.engine.current, RemoteEngine)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 200, ready.text
            model = ready.json()["components"]["model"]
            assert model["mode"] == "remote" and model["healthy"] == "2/2"
            assert all(w.url in model["workers"] for w in fleet)
            assert ready.json()["doctor"]["workers"] == "ok" and "model" not in ready.json()["doctor"]

            async with ws_client(server.ws_url + "/ws") as ws:
                frames = await ws.ask("Hello! Tell me about the sea.")
                assert len(dones(frames)) == 1 and frames[-1]["reason"] in ("eos", "length")
                assert tokens(frames).strip() and frames[-1]["usage"]["prompt_tokens"] > 0
                chat_id = frames[-1]["chat_id"]
                title = await ws.recv(timeout=WAIT_S)  # made through the workers, after `done`
                assert title["type"] == "summary" and title["chat_id"] == chat_id and title["text"]
            [reply] = assistant_turns(server, chat_id)
            assert reply.meta["worker"] in {w.url for w in fleet} and reply.meta["cancelled"] is False

            _, token = make_user(runtime, role="paid")
            key = (await http.post("/external/api/keys", headers=bearer(token), json={"name": "t"})).json()["key"]
            body = {"model": "any", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8,
                    "temperature": 0}
            completion = (await http.post("/v1/chat/completions", headers=bearer(key), json=body)).json()
            assert completion["choices"][0]["message"]["content"] and completion["usage"]["prompt_tokens"] > 0
            async with http.stream("POST", "/v1/chat/completions", headers=bearer(key),
                                   json={**body, "stream": True, "stream_options": {"include_usage": True}}) as sse:
                events = [line async for line in sse.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and '"usage"' in events[-2]

            metrics = (await http.get("/metrics")).text
            assert f'ktulhu_worker_healthy{{worker="{fleet[0].url}"}} 1.0' in metrics
            assert f'ktulhu_worker_slots{{worker="{fleet[1].url}"}} 2.0' in metrics
            served = next(line for line in metrics.splitlines()
                          if line.startswith(f'ktulhu_worker_requests_total{{worker="{reply.meta["worker"]}"}}'))
            assert float(served.split()[-1]) >= 1

            write_credentials(server.root)
            page = await http.get("/internal/admin", headers=basic())
            assert page.status_code == 200 and "Inference workers" in page.text
            assert all(w.url in page.text for w in fleet)
            panel = (await http.get("/internal/admin/engine", headers=basic())).json()
            assert {w["url"] for w in panel["engine"]["remote_workers"]} == {w.url for w in fleet}


async def test_doctor_checks_the_workers_instead_of_the_model(fleet, server_dir) -> None:
    settings = load_settings(environ=remote_env(fleet), root=server_dir)
    report = await doctor.diagnose(settings, live=True)
    checks = {c.name: c for c in report.checks}
    assert "model" not in checks and checks["workers"].status == "ok"
    assert checks["workers"].summary.startswith("2/2 inference workers answer")
    down = load_settings(environ=remote_env(fleet, KTULHU_WORKERS=f"{fleet[0].url},http://127.0.0.1:9"),
                         root=server_dir)
    check = next(c for c in (await doctor.diagnose(down, live=True)).checks if c.name == "workers")
    assert check.status == "warn" and "http://127.0.0.1:9" in check.summary and check.fix


async def test_a_worker_killed_mid_reply(fleet, live_server) -> None:
    """SIGKILL of the chat's worker mid-reply: `error` + `done`, the partial reply kept as incomplete,
    the next prompt served by the other worker; restarted on its port, the worker is re-admitted and
    the chat returns to it."""
    async with live_server(**remote_env(fleet, LLAMA_CLI_MAX_TOKENS="60")) as server:
        engine = server.runtime.engine.get()
        assert isinstance(engine, RemoteEngine)
        async with ws_client(server.ws_url + "/ws") as ws:
            frames = await ws.ask("Hello!")
            chat_id = frames[-1]["chat_id"]
            home = assistant_turns(server, chat_id)[0].meta["worker"]
            victim = next(w for w in fleet if w.url == home)
            survivor = next(w for w in fleet if w.url != home)

            rid = await ws.prompt("Write a very long story about a dragon who learns to bake bread.", chat_id=chat_id)
            seen = []
            with trio.fail_after(WAIT_S):
                while not any(f.get("type") == "assistant" and f.get("token") for f in seen):
                    seen.append(await ws.recv())
            victim.kill()
            rest = await ws.until_done(rid)
            frames = [f for f in seen if f.get("request_id") == rid] + rest
            errors = [f for f in frames if f.get("type") == "error"]
            assert len(errors) == 1 and errors[0]["message"] == "model_error"
            assert "stopped mid-reply" in errors[0]["detail"] and home in errors[0]["detail"]
            assert len(dones(frames)) == 1 and frames[-1]["reason"] == "model_error"
            partial = assistant_turns(server, chat_id)[-1]
            assert partial.meta["incomplete"] is True and partial.meta["worker"] == home
            assert partial.text and partial.text == tokens(frames).strip()
            assert not next(w for w in engine.stats().workers if w.url == home).healthy

            frames = await ws.ask("Thanks. Now just say goodbye.", chat_id=chat_id)
            assert len(dones(frames)) == 1 and frames[-1]["reason"] in ("eos", "length")
            assert assistant_turns(server, chat_id)[-1].meta["worker"] == survivor.url

            victim.start()  # same port
            await trio.to_thread.run_sync(victim.wait_ready)
            with trio.fail_after(WAIT_S):
                while not next(w for w in engine.stats().workers if w.url == home).healthy:
                    await engine.wait_for_change()
            frames = await ws.ask("Hello again.", chat_id=chat_id)
            assert len(dones(frames)) == 1 and frames[-1]["reason"] in ("eos", "length")
            assert assistant_turns(server, chat_id)[-1].meta["worker"] == home
