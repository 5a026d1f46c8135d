"""`/ws` over a real socket, on the real server with the real model, router and store."""

from __future__ import annotations

import json
import uuid

import pytest
import trio
from trio_websocket import ConnectionRejected

from ktulhu.auth.tokens import issue_token
from ktulhu.store.records import User, now_ms

from .wsclient import dones, tokens, ws_client

pytestmark = pytest.mark.model

SHORT = {"LLAMA_CLI_MAX_TOKENS": "12", "KTULHU_ANON_RATE": "0"}


def make_user(runtime, role: str = "free") -> tuple[User, str]:
    user = User(id=str(uuid.uuid4()), created_ts=now_ms(), role=role, email=f"{uuid.uuid4().hex[:8]}@example.com")
    runtime.store.save_user(user)
    return user, issue_token(runtime.settings, user.id)


async def test_original_dialect_prompt_flow_history_and_title(live_server) -> None:
    async with live_server(**SHORT) as server:
        store = server.runtime.store
        async with ws_client(server.ws_url + "/ws") as ws:
            registered = await ws.register()
            assert registered == {"type": "system", "event": "registered", "session_id": "s1", "chat_id": "",
                                  "device_hash": "dev1", "history": []}
            rid = await ws.prompt("Hello! Tell me about the sea.")
            frames = await ws.until_done(rid)
            kinds = [f.get("type") for f in frames]
            assert kinds[0] == "classifier_debug" and frames[0]["intent_result"]["prompt_key"]
            assert frames[1]["event"] == "chat_created"
            chat_id = frames[1]["chat_id"]
            assert all(f["request_id"] == rid and f["chat_id"] == chat_id for f in frames)
            assert len(dones(frames)) == 1 and frames[-1]["done"] is True
            assert frames[-1]["reason"] in ("eos", "length")
            reply = tokens(frames)
            assert reply.strip()
            # the title comes after `done`, from the background worker, on the same socket
            title = await ws.recv(timeout=60)
            assert title["type"] == "summary" and title["chat_id"] == chat_id and title["text"]
            assert title["request_id"] == rid

        stored = store.list_messages_for_chat(chat_id)
        assert [m.role for m in stored] == ["user", "assistant", "summary"]
        assert stored[0].id == rid and stored[0].text == "Hello! Tell me about the sea."
        assert stored[0].meta["intent"]["prompt_key"] == frames[0]["intent_result"]["prompt_key"]
        assert stored[1].text == reply.strip() and stored[1].meta["cancelled"] is False
        assert stored[2].text == title["text"]

        async with ws_client(server.ws_url + "/ws") as ws:
            registered = await ws.register(chat_id=chat_id)
            assert [m["role"] for m in registered["history"]] == ["user", "assistant", "summary"]
            assert registered["history"][0]["text"] == "Hello! Tell me about the sea."
            # a follow-up turn: no chat_created, and the history reaches the model
            frames = await ws.ask("And the mountains?", chat_id=chat_id)
            assert [f.get("event") for f in frames].count("chat_created") == 0
            assert len(dones(frames)) == 1
        assert [m.role for m in store.list_messages_for_chat(chat_id)][-2:] == ["user", "assistant"]


async def test_web_client_dialect(live_server) -> None:
    """The deployed client: `type: register`, prompts without a type whose text is wrapped JSON."""
    async with live_server(**SHORT) as server:
        chat_id = str(uuid.uuid4())
        async with ws_client(server.ws_url + "/ws") as ws:
            await ws.send({"type": "register", "device_hash": "-1234567", "session_id": str(uuid.uuid4()),
                           "chat_id": chat_id})
            registered = await ws.recv()
            assert registered["event"] == "registered" and registered["chat_id"] == chat_id
            rid = str(uuid.uuid4())
            wrapped = json.dumps({"role": "user", "chat_id": chat_id, "text": "hi there", "model": "mistral-7b-lora",
                                  "ts": now_ms()})
            await ws.send({"id": rid, "text": wrapped, "device_hash": "-1234567", "session_id": "x", "chat_id": chat_id})
            frames = await ws.until_done(rid)
            assert len(dones(frames)) == 1 and tokens(frames)
            assert all(f["chat_id"] == chat_id for f in frames)
            await ws.send({"type": "cancel", "id": rid})
            ack = await ws.recv()
            assert ack["event"] == "cancel_ack" and ack["cancelled"] == []
        user_turn = server.runtime.store.list_messages_for_chat(chat_id)[0]
        assert user_turn.text == "hi there" and user_turn.device_hash == "-1234567"


async def test_bad_frames_get_errors_and_the_connection_stays(live_server) -> None:
    async with live_server(**SHORT, KTULHU_WS_MAX_FRAME="2048", KTULHU_MAX_PROMPT_CHARS="100",
                           KTULHU_MAX_ATTACHMENTS="1") as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            for raw in ["not json", "[1, 2]", '"text"', "null", json.dumps({"msg_type": "shout"}),
                        json.dumps({"type": "dance"}), json.dumps({"msg_type": "register", "chat_id": "a:b"}),
                        json.dumps({"msg_type": "register", "device_hash": 5})]:
                await ws.send(raw)
                frame = await ws.recv()
                assert frame["type"] == "error" and frame["message"] == "invalid_frame", raw
            await ws.ws.send_message(b"\x00binary")
            assert (await ws.recv())["message"] == "invalid_frame"

            # prompts that cannot run: an error naming the problem, then their `done`
            cases = [
                ({"text": "x" * 101}, "too_large"),
                ({"text": "y" * 3000}, "too_large"),
                ({"text": "   "}, "empty_prompt"),
                ({"text": 5}, "invalid_frame"),
                ({"text": "hi", "language": ["en"]}, "invalid_frame"),
                ({"text": "hi", "attachments": [{"filename": "a"}, {"filename": "b"}]}, "too_large"),
                ({"text": "hi", "attachments": "nope"}, "invalid_frame"),
                ({"text": "hi", "attachments": [{"filename": "a", "labels": [1]}]}, "invalid_frame"),
            ]
            for fields, code in cases:
                rid = str(uuid.uuid4())
                await ws.send({"msg_type": "prompt", "request_id": rid, "chat_id": "", "session_id": "s",
                               "device_hash": "d", **fields})
                frames = await ws.until_done(rid)
                assert [f["type"] for f in frames] == ["error", "assistant"], fields
                assert frames[0]["message"] == code and frames[0]["detail"]
                assert frames[1]["done"] is True and frames[1]["reason"] == code
            # a request id that is not a safe id is replaced, and the reply says which
            await ws.send({"msg_type": "prompt", "request_id": "bad id!", "chat_id": "", "session_id": "s",
                           "device_hash": "d", "text": ""})
            frames = [await ws.recv(), await ws.recv()]
            assert frames[0]["request_id"] == frames[1]["request_id"] != "bad id!"
            await ws.send({"type": "ping"})
            assert await ws.recv() == {"type": "pong"}
        assert server.runtime.store.list_recent_messages(10) == []


async def test_attachments_are_noted_and_stored(live_server) -> None:
    async with live_server(**SHORT) as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            ocr = "Строка " * 60  # multi-byte text longer than the 240-byte note limit
            frames = await ws.ask("what is this?", attachments=[
                {"id": "a1", "filename": "scan.png", "mimeType": "image/png", "ocrText": ocr,
                 "labels": ["receipt"], "previewBase64": "aGVsbG8="}])
            vision = next(f for f in frames if f.get("type") == "vision_summary")
            assert vision["summary"].startswith("scan.png (image/png): Reference excerpt")
            assert vision["summary"].endswith("Labels: receipt") and len(dones(frames)) == 1
        user_turn = server.runtime.store.list_messages_for_chat(frames[-1]["chat_id"])[0]
        assert user_turn.attachments[0].ocr_text == ocr and user_turn.attachments[0].preview_base64 == "aGVsbG8="


async def test_cancel_by_id_frees_the_slot_and_keeps_the_partial_reply(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="400", KTULHU_ANON_RATE="0") as server:
        engine = server.runtime.engine.get()
        async with ws_client(server.ws_url + "/ws") as ws:
            rid = await ws.prompt("Write a very long story about a dragon and a knight, with many chapters.")
            while True:  # wait for the first token
                frame = await ws.recv()
                if "token" in frame:
                    break
            await ws.send({"msg_type": "cancel", "request_id": rid, "chat_id": "", "session_id": "s1",
                           "device_hash": "dev1", "text": ""})
            frames = await ws.until_done(rid)
            ack = next(f for f in frames if f.get("event") == "cancel_ack")
            assert ack["cancelled"] == [rid]
            assert frames[-1]["reason"] == "cancelled" and len(dones(frames)) == 1  # sent once the reply is saved
            with trio.fail_after(5):
                await engine.wait_idle()
            chat_id = frames[-1]["chat_id"]
        reply = next(m for m in server.runtime.store.list_messages_for_chat(chat_id) if m.role == "assistant")
        assert reply.meta["cancelled"] is True and reply.meta["finish_reason"] == "cancelled" and reply.text


async def test_disconnect_cancels_every_prompt_of_the_socket(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="400", KTULHU_ANON_RATE="0", KTULHU_SLOTS="2") as server:
        runtime = server.runtime
        async with ws_client(server.ws_url + "/ws") as ws:
            for _ in range(2):
                await ws.prompt("Write a very long story about a dragon.")
            chat_ids: set[str] = set()
            while len(chat_ids) < 2:  # a token of each reply: both are generating
                if "token" in (frame := await ws.recv()):
                    chat_ids.add(frame["chat_id"])
        with trio.fail_after(10):
            # the cancelled replies are saved after their generations are told to stop, so an idle engine
            # does not say they are stored; a chat's next turn starts only once they are: take and await one
            for chat_id in chat_ids:
                turn = runtime.turns.ticket(chat_id)
                try:
                    await runtime.turns.wait(turn)
                finally:
                    runtime.turns.leave(turn)
            await runtime.engine.get().wait_idle()
        replies = [m for m in runtime.store.list_recent_messages(10) if m.role == "assistant"]
        assert len(replies) == 2 and all(m.meta["cancelled"] for m in replies)


async def test_two_prompts_on_one_chat_take_turns(live_server) -> None:
    async with live_server(**SHORT, KTULHU_SLOTS="2") as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            chat_id = str(uuid.uuid4())
            first = await ws.prompt("Tell me about cats.", chat_id=chat_id)
            second = await ws.prompt("And dogs?", chat_id=chat_id)
            order = []
            with trio.fail_after(120):
                while order.count("done") < 2:
                    frame = await ws.recv()
                    if "token" in frame:
                        order.append(("token", frame["request_id"]))
                    elif frame.get("done"):
                        order.append("done")
            first_done = order.index("done")
            assert all(item == ("token", first) for item in order[:first_done])
            assert all(item in ("done", ("token", second)) for item in order[first_done:])
        roles = [m.role for m in server.runtime.store.list_messages_for_chat(chat_id) if m.role != "summary"]
        assert roles == ["user", "assistant", "user", "assistant"]


async def test_ownership_on_the_socket(live_server) -> None:
    async with live_server(**SHORT) as server:
        alice, alice_token = make_user(server.runtime, "paid")
        _, bob_token = make_user(server.runtime, "paid")
        async with ws_client(server.ws_url + f"/ws?token={alice_token}") as ws:
            frames = await ws.ask("hello")
            chat_id = frames[-1]["chat_id"]
        assert server.runtime.store.load_chat(chat_id).user_id == alice.id

        for url, register_token in [(f"/ws?token={bob_token}", None), ("/ws", None), ("/ws", bob_token)]:
            async with ws_client(server.ws_url + url) as ws:
                registered = await ws.register(chat_id=chat_id, **({"token": register_token} if register_token else {}))
                assert registered["history"] == []
                assert any(f.get("message") == "chat_forbidden" for f in ws.backlog)
                ws.backlog.clear()
                frames = await ws.ask("show me alice's chat", chat_id=chat_id)
                assert [f["type"] for f in frames] == ["error", "assistant"]
                assert frames[0]["message"] == "chat_forbidden" and frames[1]["reason"] == "chat_forbidden"
        async with ws_client(server.ws_url + "/ws", extra_headers=[("Authorization", f"Bearer {alice_token}")]) as ws:
            registered = await ws.register(chat_id=chat_id)
            assert len(registered["history"]) >= 2 and registered["user_id"] == alice.id
        assert len([m for m in server.runtime.store.list_messages_for_chat(chat_id) if m.role == "user"]) == 1

        with pytest.raises(ConnectionRejected) as rejected:
            async with ws_client(server.ws_url + "/ws?token=not-a-token"):
                pass
        assert rejected.value.status_code == 401


async def test_origin_check(live_server) -> None:
    async with live_server(**SHORT) as server:
        with pytest.raises(ConnectionRejected) as rejected:
            async with ws_client(server.ws_url + "/ws", extra_headers=[("Origin", "https://evil.example")]):
                pass
        assert rejected.value.status_code == 403
        for origin in ("http://localhost:5173", server.url):  # listed, and this server's own page
            async with ws_client(server.ws_url + "/ws", extra_headers=[("Origin", origin)]) as ws:
                assert (await ws.register())["event"] == "registered"


async def test_anonymous_rate_limit_and_free_quota(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="4", KTULHU_ANON_RATE="2", KTULHU_FREE_GENERATIONS="1") as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            results = [(await ws.ask("hi", device_hash="devA"))[-1]["reason"] for _ in range(3)]
            assert results[:2] != ["rate_limited"] * 2 and results[2] == "rate_limited"
        user, token = make_user(server.runtime, "free")
        async with ws_client(server.ws_url + f"/ws?token={token}") as ws:
            first = await ws.ask("hi")
            second = await ws.ask("again")
        assert first[-1]["reason"] != "quota_exceeded"
        assert second[0]["message"] == "quota_exceeded" and second[-1]["reason"] == "quota_exceeded"
        assert server.runtime.store.load_user(user.id).generation_count == 1


async def test_busy_engine_and_too_long_prompts_end_with_done(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="200", KTULHU_ANON_RATE="0", KTULHU_SLOTS="1",
                           KTULHU_QUEUE="1", LLAMA_CLI_CTX="256") as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            too_long = await ws.ask("word " * 400)
            assert too_long[-2]["message"] == "context_too_long" and too_long[-1]["reason"] == "context_too_long"
            rids = [await ws.prompt("Write a long story about the sea.", chat_id=str(uuid.uuid4())) for _ in range(4)]
            results = {rid: (await ws.until_done(rid, timeout=120)) for rid in rids}
        reasons = [frames[-1]["reason"] for frames in results.values()]
        assert "server_busy" in reasons
        busy = next(frames for frames in results.values() if frames[-1]["reason"] == "server_busy")
        assert busy[-2]["message"] == "server_busy" and len(dones(busy)) == 1
        # refused prompts store nothing: a retry must not leave user, user, assistant in the history
        store = server.runtime.store
        for frames in (too_long, busy):
            assert store.list_messages_for_chat(frames[-1]["chat_id"]) == []


async def test_history_survives_a_restart(live_server) -> None:
    async with live_server(**SHORT) as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            chat_id = (await ws.ask("remember the word pineapple"))[-1]["chat_id"]
    async with live_server(**SHORT) as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            history = (await ws.register(chat_id=chat_id))["history"]
        assert history[0]["text"] == "remember the word pineapple" and history[1]["role"] == "assistant"


async def test_shutdown_ends_running_prompts_with_done(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="400", KTULHU_ANON_RATE="0") as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            rid = await ws.prompt("Write a very long story about a dragon.")
            while "token" not in await ws.recv():
                pass
            server.runtime.request_shutdown()
            frames = await ws.until_done(rid, timeout=10)
            assert frames[-1]["reason"] == "shutting_down" and len(dones(frames)) == 1


async def test_random_hostile_frames_always_get_an_answer(live_server) -> None:
    """Seeded random frames over a real socket: each gets its answer, prompts their one `done`."""
    import random

    from ktulhu.chat.frames import Cancel, FrameError, Ping, PromptFrame, Register, parse_frame

    rng = random.Random(20261125)
    values = [None, True, 3, -1.5, "", "x", "a:b", "../etc", "\u0000", "é" * 40, [], {}, ["en"], {"text": "hi"},
              "hello there", str(uuid.uuid4()), json.dumps({"text": "wrapped"}), "z" * 300]
    keys = ["msg_type", "type", "request_id", "id", "chat_id", "session_id", "device_hash", "text", "language",
            "attachments", "token"]
    async with live_server(LLAMA_CLI_MAX_TOKENS="3", KTULHU_ANON_RATE="0", KTULHU_MAX_PROMPT_CHARS="200") as server:
        async with ws_client(server.ws_url + "/ws") as ws:

            async def answer() -> dict:
                while True:  # chat titles may arrive at any time: they are not answers
                    frame = await ws.recv()
                    if frame.get("type") != "summary":
                        return frame

            for _ in range(60):
                frame = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, len(keys)))}
                if rng.random() < 0.5:
                    frame["msg_type"] = rng.choice(["register", "prompt", "cancel"])
                raw = json.dumps(frame)
                await ws.send(raw)
                try:
                    expected = parse_frame(raw, server.runtime.settings)
                except FrameError as bad:
                    reply = await answer()
                    assert reply["type"] == "error" and reply["message"] == bad.code, raw
                    if bad.prompt:
                        assert (await answer())["done"] is True
                    continue
                if isinstance(expected, PromptFrame):
                    frames = await ws.until_done(expected.request_id)
                    assert len(dones(frames)) == 1, raw
                    continue
                reply = await answer()
                if isinstance(expected, Register):
                    while reply.get("event") != "registered":  # e.g. an error for a bad token first
                        assert reply["type"] == "error", raw
                        reply = await answer()
                elif isinstance(expected, Cancel):
                    assert reply["event"] == "cancel_ack", raw
                else:
                    assert isinstance(expected, Ping) and reply == {"type": "pong"}
            await ws.send({"type": "ping"})
            assert await answer() == {"type": "pong"}
