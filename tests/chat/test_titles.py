"""Chat titles from long messages: the title prompt takes each user message's head, so one very long
message no longer leaves its chat without a title (it used to end in `ContextTooLong`)."""

from __future__ import annotations

import uuid

import pytest
import trio

from ktulhu.chat.summaries import MAX_TITLE_CHARS, SOURCE_CHARS, clean_title, excerpt, title_source
from ktulhu.store.records import Chat, Message, now_ms


def test_excerpt_and_title_source() -> None:
    assert excerpt("short text", 40) == "short text"
    assert excerpt("  several\n\nlines\tand   spaces ", 100) == "several lines and spaces"
    cut = excerpt("word " * 1000, 50)
    assert len(cut) <= 52 and cut.endswith(" …") and "  " not in cut and not cut[:-2].endswith(" ")
    assert excerpt("x" * 500, 20) == "x" * 20 + " …"  # no space to cut at: cut mid-word
    source = title_source(["a " * 5000, "b " * 5000, "the newest question"])
    assert len(source) <= SOURCE_CHARS + 10 and source.endswith("the newest question")
    assert source.count("\n") == 2
    assert len(clean_title(excerpt("x" * 5000, MAX_TITLE_CHARS))) <= MAX_TITLE_CHARS


@pytest.mark.model
async def test_a_chat_with_a_very_long_message_gets_a_title(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        store = runtime.store
        chat_id = str(uuid.uuid4())
        long_text = "Please review this log. " + " ".join(f"entry {i} status ok latency {i % 97} ms" for i in range(4000))
        assert len(long_text) > 100_000  # far beyond the 2,048-token context
        store.save_chat(Chat(id=chat_id, device_hash="d", updated_ts=now_ms(), meta={}))
        store.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role="user", text=long_text,
                                   language="en", ts=now_ms()))
        store.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role="assistant",
                                   text="The log shows every entry as ok.", language="en", ts=now_ms() + 1))
        worker = runtime.summaries.get()
        failed_before = worker.failed
        assert worker.request(chat_id)
        with trio.fail_after(120):
            await worker.wait_idle()  # the title is stored before the worker says so
        summary = store.chat_summary(chat_id)
        assert summary is not None and summary.text and len(summary.text) <= MAX_TITLE_CHARS
        assert worker.failed == failed_before
