"""`ChatSession` driven through in-memory sockets (trio memory channels) on the real services:
slow and dead readers, many concurrent sessions; and the turn queue and title hub under MockClock."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from ktulhu.auth.principal import ANONYMOUS
from ktulhu.chat.hub import SummaryEvent, SummaryHub
from ktulhu.chat.session import ChatSession, StalledReader
from ktulhu.chat.turns import ChatBusy, TurnQueue
from ktulhu.store.records import Chat, Message
from tests.servers import running_tree


class MemorySocket:
    """The server's end of a WebSocket, as two memory channels (`to_server`, `from_server`)."""

    def __init__(self, capacity: int = 0) -> None:
        self.to_server, self._incoming = trio.open_memory_channel[str](16)
        self._outgoing, self.from_server = trio.open_memory_channel[str](capacity)
        self.closed_with: int | None = None

    async def receive(self) -> str:
        return await self._incoming.receive()

    async def send(self, data: str) -> None:
        await self._outgoing.send(data)

    async def close(self, code: int, reason: str = "") -> None:
        self.closed_with = code

    async def frame(self) -> dict:
        with trio.fail_after(60):
            return json.loads(await self.from_server.receive())


def prompt_frame(text: str, **fields: str) -> str:
    return json.dumps({"msg_type": "prompt", "request_id": str(uuid.uuid4()), "chat_id": "", "session_id": "s",
                       "device_hash": "d", "text": text, **fields})


@pytest.mark.model
async def test_a_slow_reader_gets_fewer_longer_token_frames_and_loses_nothing(server_dir: Path) -> None:
    async with running_tree(server_dir, LLAMA_CLI_MAX_TOKENS="60", KTULHU_WS_QUEUE="4") as runtime:
        engine = runtime.engine.get()
        generated = trio.Event()
        # the engine tells its `events` of each generation's end (this test's engine: only this test)
        engine.events = attrs.evolve(engine.events, finished=lambda finished: generated.set())
        socket = MemorySocket()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ChatSession(runtime, socket, ANONYMOUS, "127.0.0.1").run)
            await socket.to_server.send(prompt_frame("Write a long poem about the moon and the stars."))
            with trio.fail_after(60):  # read nothing until the whole reply is generated
                await generated.wait()
            received = []
            while not received or not received[-1].get("done"):
                received.append(await socket.frame())
            nursery.cancel_scope.cancel()
        token_frames = [f for f in received if "token" in f]
        chat_id = received[-1]["chat_id"]
        stored = next(m for m in runtime.store.list_messages_for_chat(chat_id) if m.role == "assistant")
        assert "".join(f["token"] for f in token_frames).strip() == stored.text
        assert len(token_frames) < stored.meta["generated_tokens"]  # coalesced
        assert [f for f in received if f.get("done")] == [received[-1]]


@pytest.mark.model
async def test_a_reader_that_accepts_nothing_is_disconnected_and_its_prompt_cancelled(server_dir: Path) -> None:
    async with running_tree(server_dir, LLAMA_CLI_MAX_TOKENS="400", KTULHU_WS_QUEUE="4",
                            KTULHU_WS_SEND_TIMEOUT="0.5") as runtime:
        socket = MemorySocket()
        await socket.to_server.send(prompt_frame("Write a very long story about a dragon."))
        with trio.fail_after(30):
            with pytest.RaisesGroup(StalledReader):
                await ChatSession(runtime, socket, ANONYMOUS, "127.0.0.1").run()  # its prompt saved, cancelled
            await runtime.engine.get().wait_idle()  # the cancelled generation has left its slot
        reply = next(m for m in runtime.store.list_recent_messages(5) if m.role == "assistant")
        assert reply.meta["cancelled"] is True


@pytest.mark.model
async def test_many_concurrent_sessions_each_get_their_own_frames(server_dir: Path) -> None:
    sessions = 24
    async with running_tree(server_dir, LLAMA_CLI_MAX_TOKENS="4", KTULHU_QUEUE="64") as runtime:
        results: dict[int, list[dict]] = {}

        async def client(i: int) -> None:
            socket = MemorySocket(capacity=8)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ChatSession(runtime, socket, ANONYMOUS, f"10.0.0.{i}").run)
                rid = f"req-{i}"
                await socket.to_server.send(prompt_frame(f"Say hello to number {i}.", request_id=rid))
                frames = []
                while not frames or not frames[-1].get("done"):
                    frames.append(await socket.frame())
                results[i] = frames
                nursery.cancel_scope.cancel()

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for i in range(sessions):
                    nursery.start_soon(client, i)
        assert len(results) == sessions
        for i, frames in results.items():
            assert all(f["request_id"] == f"req-{i}" for f in frames)
            assert [f.get("done") for f in frames].count(True) == 1 and frames[-1]["reason"] in ("eos", "length")
        with trio.fail_after(120):  # every reply asked for its title before its `done`: then every slot is free
            await runtime.summaries.get().wait_idle()
            await runtime.engine.get().wait_idle()


async def test_turns_on_one_chat_run_in_arrival_order_and_the_line_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    turns = TurnQueue(max_waiting=2)
    order: list[str] = []

    async def prompt(ticket, name: str, delay: float) -> None:
        try:
            await trio.sleep(delay)  # e.g. routing: later arrivals may get here first
            await ticket.ready.wait()
            order.append(f"{name} start")
            await trio.sleep(1.0)
            order.append(f"{name} end")
        finally:
            turns.leave(ticket)

    async with trio.open_nursery() as nursery:
        tickets = [turns.ticket("chat") for _ in range(3)]  # taken in arrival order
        for ticket, name, delay in zip(tickets, "abc", (0.5, 0.2, 0.0)):
            nursery.start_soon(prompt, ticket, name, delay)
        with pytest.raises(ChatBusy):
            turns.ticket("chat")
        other = turns.ticket("other chat")  # other chats are not held up
        assert other.ready.is_set()
        turns.leave(other)
    assert order == ["a start", "a end", "b start", "b end", "c start", "c end"]
    assert turns.waiting("chat") == 0

    # a waiting prompt that gives up its place does not block the ones behind it
    first, second, third = (turns.ticket("chat") for _ in range(3))
    turns.leave(second)
    turns.leave(first)
    assert third.ready.is_set() and not second.ready.is_set()
    turns.leave(third)
    assert turns.waiting("chat") == 0


async def test_a_title_subscriber_that_stops_reading_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    hub = SummaryHub()
    chat = Chat(id="c1", updated_ts=1)
    event = SummaryEvent(chat, Message(id="m", chat_id="c1", role="summary", text="t", ts=1))
    with hub.subscribe(lambda c: True, capacity=2) as slow, hub.subscribe(lambda c: c.id == "c2") as other:
        for _ in range(3):
            hub.publish(event)
        assert hub.subscribers == 1  # the slow one was dropped, the filtered one kept
        assert [e.chat.id async for e in slow] == ["c1", "c1"]  # its channel ends after what it had
        with trio.move_on_after(1):
            await other.receive()
            pytest.fail("a filtered subscriber got a title of another chat")


@pytest.mark.model
async def test_a_title_that_takes_too_long_is_skipped_and_the_worker_goes_on(
    server_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ktulhu.chat import summaries

    async with running_tree(server_dir, LLAMA_CLI_MAX_TOKENS="4") as runtime:
        store = runtime.store
        for chat_id in ("slow", "fine"):
            store.save_chat(Chat(id=chat_id, updated_ts=1))
            for role, text in (("user", "tell me about tea"), ("assistant", "tea is a drink")):
                store.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role=role, text=text, ts=1))
        worker = runtime.summaries.get()
        monkeypatch.setattr(summaries, "GENERATION_TIMEOUT_S", 0.0)
        assert worker.request("slow")
        with trio.fail_after(30):
            await worker.wait_idle()
        assert worker.failed == 1 and store.chat_summary("slow") is None
        monkeypatch.setattr(summaries, "GENERATION_TIMEOUT_S", 60.0)
        assert worker.request("fine")
        with trio.fail_after(60):
            await worker.wait_idle()
        assert worker.made == 1 and store.chat_summary("fine").text
