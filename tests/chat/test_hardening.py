"""Regressions for the holes found in review on the chat side: each failed before its fix."""

from __future__ import annotations

import uuid

import httpx
import pytest
import trio

from ktulhu.auth.api_keys import create_key, revoke_key
from ktulhu.auth.principal import ANONYMOUS
from ktulhu.chat import prompt_flow
from ktulhu.chat.prompt_flow import FollowedChats, PromptContext, Refused
from ktulhu.chat.frames import PromptFrame
from ktulhu.chat.turns import TurnQueue

from .test_ws import SHORT, make_user
from .wsclient import dones, ws_client

pytestmark = pytest.mark.model


async def first_token(ws, rid: str) -> None:
    with trio.fail_after(60):
        while True:
            frame = await ws.recv()
            if frame.get("request_id") == rid and "token" in frame:
                return


async def test_cancel_by_id_cancels_that_prompt_only(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="24", KTULHU_ANON_RATE="0", KTULHU_SLOTS="2") as server:
        async with ws_client(server.ws_url + "/ws") as ws:
            story = await ws.prompt("Write a very long story about a dragon and a knight.", chat_id=str(uuid.uuid4()))
            other = await ws.prompt("Write a poem about the sea.", chat_id=str(uuid.uuid4()))
            await first_token(ws, story)
            await ws.send({"msg_type": "cancel", "request_id": story, "chat_id": "", "session_id": "s1",
                           "device_hash": "dev1", "text": ""})
            cancelled = await ws.until_done(story)
            finished = await ws.until_done(other)
        ack = next(f for f in cancelled if f.get("event") == "cancel_ack")
        assert ack["cancelled"] == [story]
        assert dones(cancelled)[0]["reason"] == "cancelled"
        assert dones(finished)[0]["reason"] in ("eos", "length", "stop")


async def test_a_reply_finishing_after_its_chat_was_deleted_does_not_bring_it_back(live_server) -> None:
    async with live_server(LLAMA_CLI_MAX_TOKENS="200", KTULHU_ANON_RATE="0") as server:
        store = server.runtime.store
        chat_id = str(uuid.uuid4())
        async with ws_client(server.ws_url + "/ws") as ws, httpx.AsyncClient(base_url=server.url) as http:
            rid = await ws.prompt("Write a long story about a lighthouse keeper.", chat_id=chat_id)
            await first_token(ws, rid)
            deleted = await http.delete(f"/chat-thread/{chat_id}")
            assert deleted.json()["deleted"] is True
            frames = await ws.until_done(rid)
        assert len(dones(frames)) == 1
        assert store.load_chat(chat_id) is None and store.list_messages_for_chat(chat_id) == []
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get(f"/chat-thread/{chat_id}")).json()["messages"] == []


async def test_an_open_socket_sees_a_revoked_key_and_a_deleted_user(live_server) -> None:
    async with live_server(**SHORT) as server:
        store = server.runtime.store
        user, token = make_user(server.runtime, "paid")
        record, full_key = create_key(store, user.id, "socket")
        async with ws_client(server.ws_url + f"/ws?token={full_key}") as ws:
            assert dones(await ws.ask("hello"))[0]["reason"] != "invalid_api_key"
            revoke_key(store, user.id, record.id)
            frames = await ws.ask("hello again")
            assert frames[0]["type"] == "error" and frames[0]["message"] == "invalid_api_key"
            assert dones(frames)[0]["reason"] == "invalid_api_key"
        async with ws_client(server.ws_url + f"/ws?token={token}") as ws:
            assert dones(await ws.ask("hi"))[0]["reason"] != "user_not_found"
            store.delete_user(user.id)
            frames = await ws.ask("still there?")
            assert dones(frames)[0]["reason"] == "user_not_found"


async def test_a_device_hash_keys_no_anonymous_budget(live_server) -> None:
    """Prompts from another address naming the victim's device do not spend the victim's budget."""
    async with live_server(KTULHU_ANON_RATE="2") as server:
        runtime = server.runtime

        async def admit(client: str) -> str:
            ctx = PromptContext(runtime, ANONYMOUS, client, lambda frame: trio.sleep(0))
            frame = PromptFrame(request_id=str(uuid.uuid4()), chat_id="", session_id="s", device_hash="victim",
                                text="hi")
            reply = prompt_flow._Reply(frame.request_id, "", TurnQueue().ticket(str(uuid.uuid4())))
            try:
                await prompt_flow._admit(ctx, frame, reply)
            except Refused as refused:
                return refused.code
            return "admitted"

        assert [await admit("198.51.100.7") for _ in range(3)] == ["admitted", "admitted", "rate_limited"]
        assert await admit("192.0.2.1") == "admitted"  # the victim, same device hash, own address


def test_followed_chats_are_bounded() -> None:
    followed = FollowedChats(limit=3)
    for i in range(1000):
        followed.add(f"chat-{i}")
    assert len(followed) == 3
    assert "chat-999" in followed and "chat-997" in followed and "chat-996" not in followed
    followed.add("chat-997")  # following again makes it the newest
    followed.add("new")
    assert "chat-997" in followed and "chat-998" not in followed
