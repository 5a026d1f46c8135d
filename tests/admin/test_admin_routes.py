"""Admin JSON routes keep the original's shapes (roles lower-case) and validate their input;
pages are escaped and carry a Content-Security-Policy."""

from __future__ import annotations

import httpx
import pytest

from .helpers import XSS, XSS_SCRIPT, basic, seed, write_credentials

pytestmark = pytest.mark.model


async def test_json_routes_and_role_changes(live_server, server_dir):
    write_credentials(server_dir)
    async with live_server(KTULHU_ADMIN_RATE="1000") as server:
        ids = await seed(server.runtime)
        free_limit = server.runtime.settings.free_generations
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=basic()) as client:
            overview = (await client.get("/internal/admin/overview")).json()
            assert set(overview) >= {"total_users", "total_devices", "total_chats", "total_messages",
                                     "liked_messages", "recent_chats"}
            assert overview["total_users"] == 2 and overview["total_devices"] == 1
            # the chat's title is stored as a `summary` message: not counted as a message
            assert overview["total_chats"] == 1 and overview["total_messages"] == 2
            assert overview["liked_messages"] == 1
            [chat] = overview["recent_chats"]
            assert chat["chat_id"] == ids["chat_id"] and chat["summary"] == f"Summary {XSS}"
            assert chat["message_count"] == 2 and chat["liked_count"] == 1
            assert chat["device_hash"] == ids["device_hash"]

            last = (await client.get("/internal/admin/last")).json()
            assert last["limit"] == 25 and last["count"] == 3
            assert [m["role"] for m in last["messages"]][:1] in (["summary"], ["assistant"])
            assert (await client.get("/internal/admin/last?limit=0")).json()["limit"] == 1
            assert (await client.get("/internal/admin/last?limit=100000")).json()["limit"] == 200
            bad = await client.get("/internal/admin/last?limit=ten")
            assert bad.status_code == 400 and bad.json()["error"] == "invalid_query"

            devices = (await client.get("/internal/admin/devices/list")).json()
            assert devices["count"] == 1
            [device] = devices["devices"]
            assert device["user_role"] == "free"  # lower-case, unlike the original's "Free"
            assert device["user_email"] == ids["email"] and device["device_hash"] == ids["device_hash"]
            assert set(device) == {"id", "user_id", "user_name", "user_email", "user_role", "device_hash",
                                   "created_ts", "last_seen_ts", "meta"}

            users = (await client.get("/internal/users/list")).json()
            assert users["count"] == 2
            first = users["users"][0]  # newest first
            assert first["id"] == ids["user_id"]
            assert set(first) == {"id", "name", "email", "role", "generation_count", "generation_limit",
                                  "generations_remaining", "created_ts", "can_generate", "stripe_customer_id",
                                  "stripe_subscription_id"}
            assert first["generation_limit"] == free_limit
            assert first["generations_remaining"] == max(0, free_limit - 3)
            paid = users["users"][1]
            assert paid["role"] == "paid" and paid["generation_limit"] is None and paid["can_generate"] is True

            engine = (await client.get("/internal/admin/engine")).json()
            assert engine["engine"]["slots"] >= 1 and engine["engine"]["busy_slots"] == 0
            assert engine["engine"]["queue_depth"] == 0 and "tokens_per_second" in engine

            url = f"/internal/users/{ids['user_id']}/role"
            for role in ("paid", "admin", "free"):
                r = await client.put(url, json={"role": role})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["user_id"] == ids["user_id"] and body["role"] == role
                assert set(body) == {"user_id", "role", "can_generate", "generation_count", "generation_limit",
                                     "generations_remaining"}
                assert (await server.runtime.store.aio.load_user(ids["user_id"])).role == role
            for hostile in ("Admin", "PAID", "superuser", "", XSS):
                r = await client.put(url, json={"role": hostile})
                assert r.status_code == 422, hostile
            for body in ({}, {"role": 1}, {"role": None}, ["admin"]):
                assert (await client.put(url, json=body)).status_code == 422
            assert (await client.put(url, content=b"{", headers={"Content-Type": "application/json"})).status_code == 400
            assert (await client.put(url, content=b"role=admin")).status_code == 415
            assert (await server.runtime.store.aio.load_user(ids["user_id"])).role == "free"
            missing = await client.put("/internal/users/nobody-here/role", json={"role": "paid"})
            assert missing.status_code == 404 and missing.json()["error"] == "user_not_found"
            assert (await client.put("/internal/users/bad:id/role", json={"role": "paid"})).status_code == 400

            r = await client.delete(f"/internal/users/{ids['user_id']}")
            assert r.status_code == 200 and r.json() == {"user_id": ids["user_id"], "deleted": True}
            assert await server.runtime.store.aio.load_user(ids["user_id"]) is None
            assert await server.runtime.store.aio.list_all_devices() == []
            # Chats stay (as in the original); deleting again still answers deleted.
            assert await server.runtime.store.aio.load_chat(ids["chat_id"]) is not None
            assert (await client.delete(f"/internal/users/{ids['user_id']}")).json()["deleted"] is True
            assert (await client.delete("/internal/users/meta")).status_code == 400


async def test_pages_are_escaped_and_locked_down(live_server, server_dir):
    write_credentials(server_dir)
    async with live_server(KTULHU_ADMIN_RATE="1000") as server:
        ids = await seed(server.runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=basic()) as client:
            for path in ("/internal/admin", "/internal/admin/devices", "/internal/admin/messages",
                         "/internal/users", f"/internal/admin/chat/{ids['chat_id']}"):
                r = await client.get(path)
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/html")
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
                assert "<script>" not in r.text and "onerror" not in r.text  # no inline script, no data
                assert '<script src="/static/admin.js" defer></script>' in r.text
            # An id that is not an id never reaches a page.
            r = await client.get("/internal/admin/chat/%3Cimg%20src%3Dx%3E")
            assert r.status_code == 400 and r.headers["content-type"] == "application/json"
            js = await client.get("/static/admin.js")
            assert js.status_code == 200 and "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text
            # JSON carries the payloads verbatim (escaping is the page's job).
            users = (await client.get("/internal/users/list")).json()["users"]
            assert any(XSS_SCRIPT in (u["email"] or "") for u in users)
