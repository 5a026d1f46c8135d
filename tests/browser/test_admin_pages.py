"""Admin pages in a real browser: hostile data renders as text, role change and delete work, long
messages are shortened, totals count messages (not titles), every page has its icon."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from playwright.sync_api import sync_playwright

from ktulhu.store.records import Chat, Message, now_ms
from tests.admin.helpers import ADMIN_PASSWORD, ADMIN_USER, XSS, XSS_SCRIPT, seed, write_credentials

pytestmark = pytest.mark.model

TIMEOUT_MS = 30_000
#: One very long message (it used to make the Latest messages page 7,473 px tall).
LONG = "\n".join(f"line {i}: " + "lorem ipsum dolor sit amet " * 6 for i in range(120))


def drive_admin(url: str, chromium: str, artifacts: Path, ids: dict) -> dict:
    report: dict = {"dialogs": [], "errors": [], "xss": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            context = browser.new_context(http_credentials={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
                                          locale="en-US")
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)

            def on_dialog(dialog):
                report["dialogs"].append((dialog.type, dialog.message))
                if dialog.type == "confirm":
                    dialog.accept()  # the page's own "Remove user?" question
                else:
                    dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on("pageerror", lambda e: report["errors"].append(str(e)))
            report["not_found"] = []
            page.on("response", lambda r: report["not_found"].append(r.url) if r.status == 404 else None)

            def loaded(path: str, name: str) -> None:
                page.goto(url + path)
                page.wait_for_selector("body[data-loaded='1']")
                report["xss"][name] = page.evaluate("window.__xss === undefined ? null : window.__xss")

            # Overview: stats, recent chats, the thread with its classifier decision.
            loaded("/internal/admin", "overview")
            report["total_users"] = page.text_content("#total_users")
            report["total_messages"] = page.text_content("#total_messages")
            report["kv_label"] = page.text_content("#engine .card:has(#engine-kv) .label")
            report["kv_note"] = page.text_content("#engine-kv-note")
            report["summary_cell"] = page.locator("#recent-chats tbody tr td").nth(1).text_content()
            page.click(f"#recent-chats a:text('{ids['chat_id']}')")
            page.wait_for_selector("#thread .message")
            report["thread_texts"] = page.locator("#thread .message .text").all_text_contents()
            report["classifier"] = page.locator("#thread .classifier").first.text_content()
            report["engine_busy"] = page.text_content("#engine-busy")
            report["xss"]["thread"] = page.evaluate("window.__xss === undefined ? null : window.__xss")
            page.screenshot(path=str(artifacts / "admin-overview.png"), full_page=True)
            # Like the user message, delete the summary message (after the page's confirm).
            page.locator("#thread .message[data-role='user'] button:text('Like')").click()
            page.wait_for_selector("#thread .message[data-role='user'] button:text('Unlike')")
            page.locator("#thread .message[data-role='summary'] button:text('Delete')").click()
            page.wait_for_selector("#thread .message[data-role='summary']", state="detached")
            report["thread_roles"] = page.eval_on_selector_all("#thread .message", "ns => ns.map(n => n.dataset.role)")

            # Devices: the device's user email and its chats.
            loaded("/internal/admin/devices", "devices")
            report["device_user"] = page.locator("#devices tbody tr td").nth(1).text_content()
            page.click(f"#devices a:text('{ids['device_hash']}')")
            page.wait_for_selector("#device-chats tbody tr")
            report["device_chat_title"] = page.locator("#device-chats tbody tr td").nth(1).text_content()
            page.screenshot(path=str(artifacts / "admin-devices.png"), full_page=True)

            loaded("/internal/admin/messages", "messages")
            report["latest_texts"] = page.locator("#messages td.text").all_text_contents()
            report["page_height"] = page.evaluate("() => document.documentElement.scrollHeight")
            long_cell = page.locator("#messages td.text.clipped")
            report["long_shown"] = long_cell.locator(".clip").text_content()
            report["long_button"] = long_cell.locator("button.more").text_content()
            page.screenshot(path=str(artifacts / "admin-messages.png"), full_page=True)
            long_cell.locator("button.more").click()
            page.wait_for_selector("#messages td.text.clipped button.more[aria-expanded='true']")
            report["long_full"] = long_cell.locator(".clip").text_content()
            long_cell.locator("button.more").click()
            page.wait_for_selector("#messages td.text.clipped button.more[aria-expanded='false']")

            loaded(f"/internal/admin/chat/{ids['chat_id']}", "chat")
            page.wait_for_selector("#thread .message")

            # Users: change Alice's role, remove Mallory.
            loaded("/internal/users", "users")
            report["emails"] = page.locator("#users tbody tr td:nth-child(2)").all_text_contents()
            page.select_option(f"#users tr[data-user-id='{ids['other_id']}'] select", "admin")
            page.wait_for_selector("#status.ok")
            report["role_status"] = page.text_content("#status")
            page.click(f"#users button[data-user-id='{ids['user_id']}']")
            page.wait_for_selector(f"#users tr[data-user-id='{ids['user_id']}']", state="detached")
            report["rows_after_delete"] = page.locator("#users tbody tr").count()
            report["img_count"] = page.locator("main img").count()
            report["xss"]["users_after"] = page.evaluate("window.__xss === undefined ? null : window.__xss")
            page.screenshot(path=str(artifacts / "admin-users.png"), full_page=True)
        finally:
            browser.close()
    return report


async def test_admin_pages_escape_and_act(live_server, server_dir, chromium, artifacts):
    write_credentials(server_dir)
    async with live_server(KTULHU_ADMIN_RATE="1000") as server:
        ids = await seed(server.runtime)
        long_chat = "long-" + ids["chat_id"]
        await server.runtime.store.aio.save_chat(Chat(id=long_chat, updated_ts=now_ms() - 3_600_000, meta={}))
        await server.runtime.store.aio.save_message(Message(id="long-message", chat_id=long_chat, role="user",
                                                            text=LONG, language="en", ts=now_ms()))
        report = await trio.to_thread.run_sync(drive_admin, server.url, chromium, artifacts, ids)
        store = server.runtime.store.aio
        assert (await store.load_user(ids["other_id"])).role == "admin"
        assert await store.load_user(ids["user_id"]) is None
        messages = await store.list_messages_for_chat(ids["chat_id"])
        assert [m.role for m in messages] == ["user", "assistant"]
        assert messages[0].liked is True

    assert not report["errors"], report["errors"]
    assert all(v is None for v in report["xss"].values()), report["xss"]
    assert [t for t, _ in report["dialogs"]] == ["confirm", "confirm"], report["dialogs"]
    assert report["thread_roles"] == ["user", "assistant"]
    assert report["img_count"] == 0
    assert report["total_users"] == "2"
    assert report["total_messages"] == "3"  # user + assistant + the long one; the title is no message
    assert report["kv_label"] == "KV cache held" and "not load" in report["kv_note"]
    assert not report["not_found"], report["not_found"]  # /favicon.ico included
    assert report["page_height"] < 2500, report["page_height"]
    assert len(report["long_shown"]) <= 300 and report["long_shown"].endswith(" …")
    assert report["long_button"] == f"Show all ({len(LONG):,} characters)"
    assert report["long_full"] == LONG
    assert report["summary_cell"] == f"Summary {XSS}"
    assert f"hello {XSS} {XSS_SCRIPT}" in report["thread_texts"]
    assert f"QUESTION{XSS}" in report["classifier"] and "0.912" in report["classifier"]
    assert f"tech_explain{XSS}" in report["classifier"]
    assert report["engine_busy"].endswith(tuple("0123456789"))
    assert report["device_user"] == ids["email"]
    assert report["device_chat_title"] == f"Title {XSS}"
    assert f"reply {XSS}" in report["latest_texts"]
    assert ids["email"] in report["emails"]
    assert "now admin" in report["role_status"]
    assert report["rows_after_delete"] == 1
