"""The built-in chat page at `/` in a real browser: streams a reply, reloads history, escapes text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.model

TIMEOUT_MS = 60_000
XSS = '<img src=x onerror="window.__xss=1">'


def drive_chat(url: str, chromium: str, artifacts: Path) -> dict:
    report: dict = {"sent": [], "dialogs": [], "errors": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.on("dialog", lambda d: (report["dialogs"].append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: report["errors"].append(str(e)))
            page.on("websocket", lambda ws: ws.on("framesent", lambda payload: report["sent"].append(payload)))
            page.goto(url + "/")
            page.wait_for_selector('#connection[data-state="online"]')

            page.select_option("#language", "es")
            page.fill("#prompt", "Hello there! " + XSS)
            page.keyboard.press("Enter")
            page.wait_for_selector("#messages .msg.user")
            page.wait_for_selector("body[data-idle='1']")
            assistant = page.locator("#messages .msg.assistant").last
            report["reply"] = assistant.text_content()
            report["user_text"] = page.locator("#messages .msg.user").last.text_content()
            report["chats"] = page.locator("#chats .chat-link").count()
            # The chat's title arrives as a summary frame (before or after done) and names the sidebar entry.
            page.wait_for_selector("#chats .chat-link:not(:text('Untitled chat'))", timeout=TIMEOUT_MS)
            report["sidebar_title"] = page.locator("#chats .chat-link").first.text_content()
            report["chat_hash"] = page.evaluate("location.hash")
            page.screenshot(path=str(artifacts / "chat-streamed.png"), full_page=True)

            # Cancel: the Stop button sends a cancel frame; the page unlocks on the prompt's done.
            page.fill("#prompt", "Write a very long story about the sea.")
            # Send and press Stop in the same tick, so the cancel always races the reply's first token.
            page.evaluate("() => { document.getElementById('composer').requestSubmit();"
                          " document.getElementById('cancel').click(); }")
            page.wait_for_selector("body[data-idle='1']")
            report["send_enabled_after_cancel"] = page.is_enabled("#send")

            page.reload()
            page.wait_for_selector('#connection[data-state="online"]')
            page.locator("#messages .msg.assistant").first.wait_for()
            report["history_roles"] = page.eval_on_selector_all("#messages .msg", "ns => ns.map(n => n.dataset.role)")
            report["sidebar_after_reload"] = page.locator("#chats .chat-link").first.text_content()
            report["history_user"] = page.locator("#messages .msg.user").first.text_content()
            report["language_kept"] = page.input_value("#language")
            report["xss"] = page.evaluate("window.__xss === undefined ? null : window.__xss")
            report["img_count"] = page.locator("#messages img").count()
            page.screenshot(path=str(artifacts / "chat-reloaded.png"), full_page=True)
        finally:
            browser.close()
    return report


async def test_chat_page_streams_cancels_and_reloads(live_server, chromium, artifacts):
    async with live_server(KTULHU_ANON_RATE="0", LLAMA_CLI_MAX_TOKENS="24") as server:
        report = await trio.to_thread.run_sync(drive_chat, server.url, chromium, artifacts)
    assert not report["errors"], report["errors"]
    assert report["user_text"] == "Hello there! " + XSS  # shown as text, not markup
    assert report["reply"], "the streamed reply is empty"
    assert report["chats"] == 1 and report["chat_hash"].startswith("#chat=")
    frames = [json.loads(f) for f in report["sent"] if isinstance(f, str)]
    prompts = [f for f in frames if f.get("msg_type") == "prompt"]
    assert prompts and prompts[0]["language"] == "es" and prompts[0]["request_id"]
    assert any(f.get("msg_type") == "register" for f in frames)
    cancels = [f for f in frames if f.get("msg_type") == "cancel"]
    assert cancels and cancels[0]["request_id"] == prompts[1]["request_id"]
    assert report["send_enabled_after_cancel"]
    assert report["history_user"] == "Hello there! " + XSS
    assert report["history_roles"][:2] == ["user", "assistant"]
    assert "summary" not in report["history_roles"] and "system" not in report["history_roles"]
    assert report["language_kept"] == "es"
    assert report["sidebar_title"] and report["sidebar_after_reload"] == report["sidebar_title"]
    assert report["xss"] is None and report["img_count"] == 0 and not report["dialogs"]
