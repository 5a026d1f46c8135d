"""The routes behind the chat page's chat management: claiming anonymous chats at sign-in (new),
renaming through `PUT /chat-thread/{id}/summary`, deleting, the by-user listing's `chat_id`, and
`/favicon.ico`; with hostile input (other users' chats, bad ids, oversized titles and bodies)."""

from __future__ import annotations

import base64

import httpx
import pytest
import trio

from ktulhu.auth.admin import write_admin_credentials
from ktulhu.http.chats import MAX_CLAIM
from ktulhu.store import keys

from .test_rest import seed_chat
from .test_ws import make_user

pytestmark = pytest.mark.model

ADMIN_PASSWORD = "correct horse battery staple"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_claim_anonymous_chats(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        store = runtime.store
        write_admin_credentials(runtime.settings.path(runtime.settings.admin_auth_file), "admin", ADMIN_PASSWORD)
        alice, alice_token = make_user(runtime)
        bob, bob_token = make_user(runtime)
        seed_chat(store, "anon-1", user_id=None, device_hash="browser-1")
        seed_chat(store, "anon-2", user_id=None, device_hash="browser-1")
        seed_chat(store, "bobs", user_id=bob.id, device_hash="browser-2")
        seed_chat(store, "alices", user_id=alice.id, device_hash="browser-1")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            # who may claim: a signed-in user only
            body = {"chat_ids": ["anon-1"]}
            assert (await client.post("/api/chats/claim", json=body)).status_code == 401
            assert (await client.post("/api/chats/claim", json=body, headers=bearer("not-a-token"))).status_code == 401
            admin = {"Authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()}
            refused = await client.post("/api/chats/claim", json=body, headers=admin)
            assert refused.status_code == 401 and refused.json()["error"] == "login_required"
            assert store.load_chat("anon-1").user_id is None

            # hostile bodies: nothing changes
            hostile = [
                ({"chat_ids": "anon-1"}, 422), ({"chat_ids": ["anon-1", 7]}, 422), ({"chat_ids": ["../anon-1"]}, 422),
                ({"chat_ids": ["a" * 129]}, 422), ({"chat_ids": ["meta:x"]}, 422), ({}, 422), ([["anon-1"]], 422),
                ({"chat_ids": [f"c{i}" for i in range(MAX_CLAIM + 1)]}, 422),
            ]
            for payload, status in hostile:
                response = await client.post("/api/chats/claim", json=payload, headers=bearer(alice_token))
                assert response.status_code == status, (payload, response.text)
                assert "error" in response.json()
            too_big = await client.post("/api/chats/claim", content=b'{"chat_ids": ["' + b"a" * 70_000 + b'"]}',
                                        headers={**bearer(alice_token), "Content-Type": "application/json"})
            assert too_big.status_code == 413
            assert store.load_chat("anon-1").user_id is None and store.load_chat("anon-2").user_id is None

            # the claim: anonymous chats become Alice's; Bob's stays Bob's; unknown ids are reported
            claim = await client.post("/api/chats/claim", headers=bearer(alice_token), json={
                "chat_ids": ["anon-1", "anon-2", "anon-1", "bobs", "alices", "never-seen"]})
            assert claim.status_code == 200, claim.text
            assert claim.json() == {"user_id": alice.id, "claimed": ["anon-1", "anon-2"], "already_yours": ["alices"],
                                    "forbidden": ["bobs"], "not_found": ["never-seen"]}
            assert store.load_chat("anon-1").user_id == alice.id and store.load_chat("bobs").user_id == bob.id
            assert store.load_chat("never-seen") is None  # reporting it created nothing

            # claimed means hers alone: anonymous and Bob are refused, her listings show it
            assert (await client.get("/chat-thread/anon-1")).status_code == 403
            assert (await client.get("/chat-thread/anon-1", headers=bearer(bob_token))).status_code == 403
            assert (await client.delete("/chat-thread/anon-1", headers=bearer(bob_token))).status_code == 403
            again = await client.post("/api/chats/claim", json={"chat_ids": ["anon-1"]}, headers=bearer(bob_token))
            assert again.json()["forbidden"] == ["anon-1"]
            listed = (await client.get("/chat-summary/last", headers=bearer(alice_token))).json()["chats"]
            assert {c["chat_id"] for c in listed} == {"anon-1", "anon-2", "alices"}
            by_user = (await client.get(f"/internal/chats/by-user/{alice.id}", headers=bearer(alice_token))).json()
            assert {c["chat_id"] for c in by_user["chats"]} == {"anon-1", "anon-2", "alices"}
            assert all(c["chat_id"] == c["id"] for c in by_user["chats"])  # `id` kept for the original's clients

            # a record that cannot be read is never taken over
            seed_chat(store, "anon-broken", user_id=None, device_hash="d")
            store._rdict()[keys.chat_meta_key("anon-broken")] = b"{not json"  # as test_rest does
            broken = await client.post("/api/chats/claim", json={"chat_ids": ["anon-broken"]}, headers=bearer(bob_token))
            assert broken.json()["forbidden"] == ["anon-broken"]


async def test_claim_race_has_one_winner(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        users = [make_user(runtime) for _ in range(6)]
        seed_chat(runtime.store, "contested", user_id=None, device_hash="shared")
        results: dict[str, dict] = {}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            async def claim(user, token) -> None:
                response = await client.post("/api/chats/claim", json={"chat_ids": ["contested"]}, headers=bearer(token))
                results[user.id] = response.json()

            async with trio.open_nursery() as nursery:
                for user, token in users:
                    nursery.start_soon(claim, user, token)
        winners = [uid for uid, r in results.items() if r["claimed"] == ["contested"]]
        assert len(winners) == 1
        assert all(r["forbidden"] == ["contested"] for uid, r in results.items() if uid not in winners)
        assert runtime.store.load_chat("contested").user_id == winners[0]
        assert [c.id for c in runtime.store.list_chats_owned_by(winners[0])] == ["contested"]


async def test_rename_and_delete_hostile_input(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        runtime = server.runtime
        store = runtime.store
        alice, alice_token = make_user(runtime)
        bob, bob_token = make_user(runtime)
        seed_chat(store, "anon", user_id=None, device_hash="d")
        seed_chat(store, "alices", user_id=alice.id, device_hash="d")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            # an anonymous chat is renamed by whoever holds its id; the title is pushed and listed
            renamed = await client.put("/chat-thread/anon/summary", json={"summary": "  Sea creatures  ", "language": "en"})
            assert renamed.status_code == 200 and renamed.json()["updated"] is True
            assert store.chat_summary("anon").text == "Sea creatures"
            # another user's chat: neither renamed nor deleted
            for headers in ({}, bearer(bob_token)):
                put = await client.put("/chat-thread/alices/summary", json={"summary": "mine now"}, headers=headers)
                assert put.status_code == 403 and put.json()["error"] == "chat_forbidden"
                assert (await client.delete("/chat-thread/alices", headers=headers)).status_code == 403
            assert store.chat_summary("alices").text == "title of alices" and store.load_chat("alices") is not None
            # bad ids and oversized or malformed titles
            for path, payload, status in [
                ("/chat-thread/bad:id/summary", {"summary": "x"}, 400),
                ("/chat-thread/" + "a" * 129 + "/summary", {"summary": "x"}, 400),
                ("/chat-thread/alices/summary", {"summary": "x" * 501}, 422),
                ("/chat-thread/alices/summary", {"summary": " \n\t "}, 422),
                ("/chat-thread/alices/summary", {"summary": ["x"]}, 422),
                ("/chat-thread/alices/summary", {"summary": "ok", "language": "x" * 40}, 422),
                ("/chat-thread/never-seen/summary", {"summary": "ghost"}, 404),
            ]:
                response = await client.put(path, json=payload, headers=bearer(alice_token))
                assert response.status_code == status, (path, payload, response.text)
            assert store.load_chat("never-seen") is None
            assert store.chat_summary("alices").text == "title of alices"
            # the owner renames (500 characters is the limit) and deletes
            top = "y" * 500
            assert (await client.put("/chat-thread/alices/summary", json={"summary": top},
                                     headers=bearer(alice_token))).status_code == 200
            assert store.chat_summary("alices").text == top
            assert (await client.delete("/chat-thread/bad:id", headers=bearer(alice_token))).status_code == 400
            deleted = await client.delete("/chat-thread/alices", headers=bearer(alice_token))
            assert deleted.status_code == 200 and store.load_chat("alices") is None
            assert (await client.get("/chat-thread/alices", headers=bearer(alice_token))).json()["messages"] == []


async def test_favicon_on_every_page(live_server) -> None:
    async with live_server(KTULHU_ANON_RATE="0") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            icon = await client.get("/favicon.ico")
            assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
            assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
            page = await client.get("/")
            assert 'rel="icon" href="/favicon.ico"' in page.text
            assert (await client.get("/static/favicon.svg")).status_code == 200
            for name in ("marked.umd.js", "purify.min.js", "highlight.min.js", "highlight-github.min.css"):
                assert (await client.get(f"/static/vendor/{name}")).status_code == 200, name
                assert f"/static/vendor/{name}" in page.text
            # the page keeps its strict policy: nothing inline, nothing from elsewhere
            csp = page.headers["content-security-policy"]
            assert "script-src 'self';" in csp and "unsafe" not in csp and "http" not in csp
