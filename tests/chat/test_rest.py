"""Chat REST routes and the sidebar routes: the authorisation matrix, shapes, hostile input, CORS."""

from __future__ import annotations

import base64
import json
import uuid

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from ktulhu.auth.admin import write_admin_credentials
from ktulhu.store.records import Chat, Message, now_ms

from .test_ws import make_user

pytestmark = pytest.mark.model

ADMIN_PASSWORD = "correct horse battery staple"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def seed_chat(store, chat_id: str, *, user_id: str | None, device_hash: str) -> None:
    store.save_chat(Chat(id=chat_id, device_hash=device_hash, user_id=user_id, updated_ts=now_ms()))
    for role, text in (("user", f"question in {chat_id}"), ("assistant", "an answer")):
        store.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role=role, text=text, ts=now_ms(),
                                   device_hash=device_hash))
    store.replace_summary(chat_id, f"title of {chat_id}")


async def test_authorisation_matrix(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        store = runtime.store
        write_admin_credentials(runtime.settings.path(runtime.settings.admin_auth_file), "admin", ADMIN_PASSWORD)
        alice, alice_token = make_user(runtime)
        bob, bob_token = make_user(runtime)
        store.add_device_for_user(alice.id, "alice-device")
        seed_chat(store, "alice-chat", user_id=alice.id, device_hash="alice-device")
        seed_chat(store, "anon-chat", user_id=None, device_hash="alice-device")
        callers = {
            "anonymous": {},
            "alice": {"Authorization": f"Bearer {alice_token}"},
            "bob": {"Authorization": f"Bearer {bob_token}"},
            "admin": basic("admin", ADMIN_PASSWORD),
        }
        # (method, path, body) -> expected status per caller
        matrix = [
            ("GET", "/chat-thread/alice-chat", None, {"anonymous": 403, "alice": 200, "bob": 403, "admin": 200}),
            ("GET", "/internal/chat-thread/alice-chat", None, {"anonymous": 403, "alice": 200, "bob": 403, "admin": 200}),
            ("GET", "/api/chats/alice-chat/messages", None, {"anonymous": 403, "alice": 200, "bob": 403, "admin": 200}),
            ("GET", "/chat-thread/anon-chat", None, {"anonymous": 200, "alice": 200, "bob": 200, "admin": 200}),
            ("PUT", "/internal/chat-thread/alice-chat/summary", {"summary": "x"},
             {"anonymous": 403, "alice": 200, "bob": 403, "admin": 200}),
            ("PUT", "/internal/chat-thread/alice-chat/message/nope/liked", {"liked": True},
             {"anonymous": 403, "alice": 404, "bob": 403, "admin": 404}),
            ("DELETE", "/internal/chat-thread/alice-chat/message/nope", None,
             {"anonymous": 403, "alice": 404, "bob": 403, "admin": 404}),
            ("GET", "/internal/chats/by-device/alice-device", None,
             {"anonymous": 401, "alice": 200, "bob": 200, "admin": 200}),
            ("GET", "/internal/messages/by-device/alice-device", None,
             {"anonymous": 401, "alice": 200, "bob": 200, "admin": 200}),
            ("GET", "/messages/by-device/alice-device", None, {"anonymous": 401, "alice": 200, "bob": 200, "admin": 200}),
            ("GET", f"/internal/chats/by-user/{alice.id}", None, {"anonymous": 401, "alice": 200, "bob": 403, "admin": 200}),
            ("GET", "/chat-summary/last", None, {"anonymous": 401, "alice": 200, "bob": 200, "admin": 200}),
            ("DELETE", "/chat-thread/alice-chat", None, {"anonymous": 403, "alice": 200, "bob": 403, "admin": 200}),
        ]
        async with httpx.AsyncClient(base_url=server.url) as client:
            for method, path, body, expected in matrix:
                for who, headers in callers.items():
                    if method == "DELETE" and path == "/chat-thread/alice-chat" and who in ("alice", "admin"):
                        continue  # checked once below, it deletes
                    response = await client.request(method, path, headers=headers, json=body)
                    assert response.status_code == expected[who], (method, path, who, response.text)
                    assert response.headers["content-type"] == "application/json"
                    if response.status_code >= 400:
                        assert response.json()["error"]
            # bad credentials are 401, whatever the route
            for headers in ({"Authorization": "Bearer nope"}, {"Authorization": "Token x"},
                            basic("admin", "wrong"), basic("root", ADMIN_PASSWORD),
                            {"Authorization": "Basic !!!notbase64"}):
                response = await client.get("/chat-thread/anon-chat", headers=headers)
                assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == 'Basic realm="Internal"'

            thread = (await client.get("/chat-thread/alice-chat", headers=callers["alice"])).json()
            assert thread["chat_id"] == "alice-chat" and thread["source"] == "db"
            assert [m["role"] for m in thread["messages"]] == ["user", "assistant", "summary"]
            mine = (await client.get("/chat-summary/last", headers=callers["alice"])).json()["chats"]
            assert [c["chat_id"] for c in mine] == ["alice-chat"] and mine[0]["summary"] == "x"
            assert (await client.get("/chat-summary/last", headers=callers["bob"])).json() == {"chats": []}
            # a device listing holds the caller's own chats only; the admin sees every chat of the device
            by_device = (await client.get("/internal/chats/by-device/alice-device", headers=callers["alice"])).json()
            assert {c["chat_id"] for c in by_device["chats"]} == {"alice-chat"}
            assert (await client.get("/messages/by-device/alice-device", headers=callers["bob"])).json() == {
                "device_hash": "alice-device", "messages": []}
            everything = (await client.get("/internal/chats/by-device/alice-device", headers=callers["admin"])).json()
            assert {c["chat_id"] for c in everything["chats"]} == {"alice-chat", "anon-chat"}

            deleted = await client.delete("/chat-thread/alice-chat", headers=callers["alice"])
            assert deleted.json() == {"chat_id": "alice-chat", "deleted": True, "source": ["memory", "db"]}
        assert store.load_chat("alice-chat") is None and store.list_messages_for_chat("alice-chat") == []


async def test_message_edits_and_hostile_input(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        store = server.runtime.store
        seed_chat(store, "c1", user_id=None, device_hash="d1")
        message_id = store.list_messages_for_chat("c1")[0].id
        async with httpx.AsyncClient(base_url=server.url) as client:
            liked = await client.put(f"/internal/chat-thread/c1/message/{message_id}/liked", json={"liked": True})
            assert liked.json() == {"chat_id": "c1", "message_id": message_id, "liked": True, "updated": True}
            assert store.find_message("c1", message_id).liked is True
            before = [m.text for m in store.list_messages_for_chat("c1")]
            hostile = [
                ("PUT", f"/internal/chat-thread/c1/message/{message_id}/liked", {"content": "not json"}, 415),
                ("PUT", f"/internal/chat-thread/c1/message/{message_id}/liked", {"content": "{bad", "json": True}, 400),
                ("PUT", f"/internal/chat-thread/c1/message/{message_id}/liked", {"json_body": {"liked": "yes"}}, 422),
                ("PUT", f"/internal/chat-thread/c1/message/{message_id}/liked", {"json_body": [1]}, 422),
                ("PUT", "/internal/chat-thread/c1/summary", {"json_body": {"summary": "   "}}, 422),
                ("PUT", "/internal/chat-thread/c1/summary", {"json_body": {"summary": "x" * 501}}, 422),
                ("PUT", "/internal/chat-thread/c1/summary", {"json_body": {"summary": 7}}, 422),
                ("PUT", "/internal/chat-thread/c1/summary", {"content": "x" * (2 << 20), "json": True}, 413),
                ("GET", "/chat-thread/bad:id", {}, 400),
                ("GET", "/chat-thread/meta", {}, 400),
                ("GET", "/chat-thread/" + "a" * 129, {}, 400),
                ("DELETE", "/internal/chat-thread/c1/message/x:y", {}, 400),
                ("GET", "/internal/chats/by-device/a:b", {}, 400),
                ("GET", "/chat-summary/last?limit=abc", {"headers": basic("x", "y")}, 503),  # no admin file yet
            ]
            for method, path, spec, status in hostile:
                kwargs: dict = {}
                if "json_body" in spec:
                    kwargs["json"] = spec["json_body"]
                elif "content" in spec:
                    kwargs["content"] = spec["content"]
                    kwargs["headers"] = {"Content-Type": "application/json" if spec.get("json") else "text/plain"}
                kwargs.setdefault("headers", {}).update(spec.get("headers", {}))
                response = await client.request(method, path, **kwargs)
                assert response.status_code == status, (method, path, spec.get("json_body"), response.text[:200])
                assert "error" in response.json()
            assert [m.text for m in store.list_messages_for_chat("c1")] == before
            unknown = await client.get("/chat-thread/never-seen")
            assert unknown.status_code == 200 and unknown.json()["messages"] == []


async def test_cors_from_the_allow_list(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            allowed = {"Origin": "http://localhost:5173"}
            preflight = await client.options("/chat-thread/c1", headers={
                **allowed, "Access-Control-Request-Method": "DELETE"})
            assert preflight.headers["access-control-allow-origin"] == "http://localhost:5173"
            assert "DELETE" in preflight.headers["access-control-allow-methods"]
            assert "authorization" in preflight.headers["access-control-allow-headers"]
            response = await client.get("/chat-thread/c1", headers=allowed)
            assert response.headers["access-control-allow-credentials"] == "true"
            evil = await client.get("/chat-thread/c1", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in evil.headers


async def test_summary_push_socket(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0", LLAMA_CLI_MAX_TOKENS="8") as server:
        runtime = server.runtime
        store = runtime.store
        alice, alice_token = make_user(runtime)
        _, bob_token = make_user(runtime)
        store.save_chat(Chat(id="alice-chat", user_id=alice.id, updated_ts=now_ms()))
        store.save_chat(Chat(id="anon-chat", updated_ts=now_ms()))
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(server.ws_url + "/chat-summary/ws?token=bad"):
                pass
        base = server.ws_url + "/chat-summary/ws"
        async with open_websocket_url(f"{base}?token={alice_token}") as alice_ws, \
                open_websocket_url(f"{base}?token={bob_token}") as bob_ws, \
                open_websocket_url(f"{base}?chat_id=anon-chat") as anon_ws, \
                open_websocket_url(base) as follower:
            await follower.send_message(json.dumps({"subscribe": ["alice-chat", "anon-chat"]}))
            await follower.send_message("nonsense")
            assert json.loads(await follower.get_message())["message"] == "invalid_frame"
            async with httpx.AsyncClient(base_url=server.url) as client:
                for chat_id, headers in (("alice-chat", {"Authorization": f"Bearer {alice_token}"}), ("anon-chat", {})):
                    response = await client.put(f"/internal/chat-thread/{chat_id}/summary",
                                                json={"summary": f"new {chat_id}"}, headers=headers)
                    assert response.status_code == 200
            with trio.fail_after(10):
                pushed = json.loads(await alice_ws.get_message())
                assert pushed["chat_id"] == "alice-chat" and pushed["summary"] == "new alice-chat" and pushed["ts"]
                assert json.loads(await anon_ws.get_message())["chat_id"] == "anon-chat"
                # the follower holds both ids, but alice's chat is not an anonymous chat
                assert json.loads(await follower.get_message())["chat_id"] == "anon-chat"
            with trio.move_on_after(0.5):
                await bob_ws.get_message()
                pytest.fail("bob received a summary of a chat that is not his")


async def test_a_self_asserted_device_hash_reads_nothing(live_server) -> None:
    """The exploit: register with the victim's device hash, then list that device."""
    async with live_server(KTULHU_ANON_RATE="0") as server:
        store = server.runtime.store
        seed_chat(store, "victim-chat", user_id=None, device_hash="victim-device")
        async with httpx.AsyncClient(base_url=server.url) as client:
            registered = await client.post("/api/auth/register", json={
                "email": "mallory@example.com", "password": "a long enough password",
                "device_hash": "victim-device"})
            assert registered.status_code in (200, 201), registered.text
            token = registered.json()["jwt"]
            headers = {"Authorization": f"Bearer {token}"}
            for path in ("/messages/by-device/victim-device", "/internal/messages/by-device/victim-device"):
                listing = await client.get(path, headers=headers)
                assert listing.status_code == 200 and listing.json()["messages"] == [], listing.text
                assert "question in victim-chat" not in listing.text
            chats = await client.get("/internal/chats/by-device/victim-device", headers=headers)
            assert chats.json()["chats"] == []


async def test_a_corrupt_chat_record_fails_closed(live_server) -> None:
    from ktulhu.store import keys

    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        store = runtime.store
        write_admin_credentials(runtime.settings.path(runtime.settings.admin_auth_file), "admin", ADMIN_PASSWORD)
        seed_chat(store, "broken-chat", user_id=None, device_hash="d")
        store._rdict()[keys.chat_meta_key("broken-chat")] = b"{not json"
        async with httpx.AsyncClient(base_url=server.url) as client:
            refused = await client.get("/chat-thread/broken-chat")
            assert refused.status_code == 403 and refused.json()["error"] == "chat_forbidden"
            assert (await client.delete("/chat-thread/broken-chat")).status_code == 403
            assert (await client.get("/chat-thread/broken-chat", headers=basic("admin", ADMIN_PASSWORD))).status_code == 200
        assert len(store.list_messages_for_chat("broken-chat")) == 3  # nothing was taken over or deleted
