"""A refused prompt stores nothing: its retry leaves one user turn, not two, and the model never
reads the refused one."""

from __future__ import annotations

import uuid

import pytest

from chat.wsclient import dones, ws_client

pytestmark = pytest.mark.model


async def test_a_refused_prompt_leaves_no_orphan_turn(live_server) -> None:
    async with live_server(LLAMA_CLI_CTX="256", LLAMA_CLI_MAX_TOKENS="8", KTULHU_ANON_RATE="0") as server:
        chat_id = str(uuid.uuid4())
        async with ws_client(server.ws_url + "/ws") as ws:
            refused = await ws.ask("word " * 400, chat_id=chat_id)
            assert dones(refused)[0]["reason"] == "context_too_long"
            assert server.runtime.store.list_messages_for_chat(chat_id) == []
            retried = await ws.ask("A short question?", chat_id=chat_id)
            assert dones(retried)[0]["reason"] in ("eos", "length", "stop")
        roles = [m.role for m in server.runtime.store.list_messages_for_chat(chat_id) if m.role != "summary"]
        assert roles == ["user", "assistant"]
