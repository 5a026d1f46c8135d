"""Chat management on the real server: rename and delete from the sidebar (and another tab follows),
a chat deleted through the REST API leaves the sidebar, sign-up claims this browser's chats, the
account's chats are listed in another browser, sign-out; Google sign-in when configured."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest
import trio
from playwright.sync_api import Page

from tests.auth.fake_idp import fake_idp

from .helpers import TIMEOUT_MS, launched, open_chat, unnamed_controls, watch_console

pytestmark = pytest.mark.model

PASSWORD = "a long enough password"


def chat(page: Page, text: str) -> str:
    """Send `text` in a new chat of `page` and wait for its reply; returns the chat id."""
    page.click("#new-chat")
    page.fill("#prompt", text)
    page.keyboard.press("Enter")  # the page is busy from here until the prompt's `done`
    page.wait_for_selector("body[data-idle='1']")
    chat_id = page.evaluate("location.hash.slice(6)")
    page.wait_for_selector(f"#chats li[data-chat-id='{chat_id}']")
    return chat_id


def sidebar(page: Page) -> list[str]:
    return page.eval_on_selector_all("#chats li", "ns => ns.map(n => n.dataset.chatId)")


def drive(url: str, chromium: str, artifacts: Path, email: str) -> dict:
    report: dict = {"dialogs": []}
    with launched(chromium) as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        seen = watch_console(page)

        def on_dialog(dialog):
            report["dialogs"].append(dialog.message)
            dialog.accept()

        page.on("dialog", on_dialog)
        open_chat(page, url + "/", idle=False)
        kept = chat(page, "Tell me about octopuses")
        removed = chat(page, "Tell me about squids")
        gone = chat(page, "Tell me about cuttlefish")
        report["ids"] = {"kept": kept, "removed": removed, "gone": gone}
        for chat_id in (kept, removed, gone):  # titles made by the server (before any rename)
            page.wait_for_selector(f"#chats li[data-chat-id='{chat_id}'] .chat-link:not(:text-is('Untitled chat'))")

        # a second tab of the same browser follows renames and deletions
        other = context.new_page()
        other.set_default_timeout(TIMEOUT_MS)
        other.on("dialog", lambda d: d.accept())
        other.goto(url + "/#chat=" + gone)
        other.wait_for_selector(f"#chats li[data-chat-id='{removed}']")

        # rename from the sidebar, with the keyboard
        page.focus(f"#chats li[data-chat-id='{kept}'] button.rename")
        page.keyboard.press("Enter")
        page.wait_for_selector("#chats .rename-input")
        report["rename_field_label"] = page.get_attribute("#chats .rename-input", "aria-label")
        page.fill("#chats .rename-input", "Octopus notes")
        page.keyboard.press("Enter")
        page.wait_for_selector(f"#chats li[data-chat-id='{kept}'] .chat-link:text-is('Octopus notes')")
        page.wait_for_function("() => document.activeElement && document.activeElement.classList.contains('rename')")
        report["focus_after_rename"] = page.evaluate("document.activeElement.className")
        other.wait_for_selector(f"#chats li[data-chat-id='{kept}'] .chat-link:text-is('Octopus notes')")

        # delete from the sidebar: gone here and in the other tab
        page.click(f"#chats li[data-chat-id='{removed}'] button.delete")
        page.wait_for_selector(f"#chats li[data-chat-id='{removed}']", state="detached")
        other.wait_for_selector(f"#chats li[data-chat-id='{removed}']", state="detached")

        # deleted through the REST API: opening it says so and drops it
        deleted = httpx.delete(f"{url}/chat-thread/{gone}")
        report["rest_delete"] = deleted.status_code
        page.click(f"#chats li[data-chat-id='{gone}'] .chat-link")
        page.wait_for_selector(f"#chats li[data-chat-id='{gone}']", state="detached")
        page.wait_for_selector("#notice:not([hidden])")
        report["deleted_notice"] = page.text_content("#notice-text")
        report["messages_after_deleted"] = page.locator("#messages .msg").count()
        report["unnamed"] = unnamed_controls(page)
        page.screenshot(path=str(artifacts / "chat-manage.png"), full_page=True)

        # sign up; this browser's chat moves into the account
        page.click("#sign-in")
        page.wait_for_selector("#auth-dialog[open]")
        page.click("#auth-switch")
        report["dialog_title"] = page.text_content("#auth-title")
        report["claim_checked"] = page.is_checked("#auth-claim")
        page.fill("#auth-email", email)
        page.fill("#auth-password", "short")
        page.click("#auth-submit")
        page.wait_for_selector("#auth-error:not([hidden])")
        report["weak_password"] = page.text_content("#auth-error")
        page.screenshot(path=str(artifacts / "chat-sign-up.png"))
        page.fill("#auth-password", PASSWORD)
        page.click("#auth-submit")
        page.wait_for_selector("#account-email:not([hidden])")
        page.wait_for_selector("#auth-dialog:not([open])", state="attached")
        report["account"] = page.text_content("#account-email")
        report["local_after_claim"] = page.evaluate("JSON.parse(localStorage.getItem('ktulhu.chats'))")
        report["signed_in_sidebar"] = sidebar(page)
        other.wait_for_selector("#account-email:not([hidden])")  # the other tab signed in too
        report["other_account"] = other.text_content("#account-email")
        # a prompt on the account: the socket acts for the user
        owned = chat(page, "And about nautilus?")
        report["owned"] = owned
        report["signed_in_sidebar_after"] = sidebar(page)

        # another browser: sign in, the account's chats come from the server
        second = browser.new_context(viewport={"width": 1280, "height": 900})
        elsewhere = second.new_page()
        seen_elsewhere = watch_console(elsewhere)
        open_chat(elsewhere, url + "/", idle=False)
        report["elsewhere_before"] = sidebar(elsewhere)
        elsewhere.click("#sign-in")
        elsewhere.wait_for_selector("#auth-dialog[open]")
        report["claim_row_hidden"] = elsewhere.is_hidden("#auth-claim-row")  # nothing local to keep
        elsewhere.fill("#auth-email", email)
        elsewhere.fill("#auth-password", "wrong password!")
        elsewhere.keyboard.press("Enter")
        elsewhere.wait_for_selector("#auth-error:not([hidden])")
        report["wrong_password"] = elsewhere.text_content("#auth-error")
        elsewhere.fill("#auth-password", PASSWORD)
        elsewhere.keyboard.press("Enter")
        elsewhere.wait_for_selector(f"#chats li[data-chat-id='{kept}']")
        elsewhere.wait_for_selector(f"#chats li[data-chat-id='{owned}']")
        report["elsewhere_title"] = elsewhere.text_content(f"#chats li[data-chat-id='{kept}'] .chat-link")
        elsewhere.click(f"#chats li[data-chat-id='{kept}'] .chat-link")
        elsewhere.wait_for_selector("#messages .msg.user")
        report["elsewhere_history"] = elsewhere.locator("#messages .msg.user").first.text_content()
        elsewhere.screenshot(path=str(artifacts / "chat-signed-in-elsewhere.png"), full_page=True)
        elsewhere.click("#sign-out")
        elsewhere.wait_for_selector("#sign-in:not([hidden])")
        report["elsewhere_after_sign_out"] = sidebar(elsewhere)
        report["seen"] = [seen, seen_elsewhere]
    return report


async def test_rename_delete_sign_in_and_claim(live_server, chromium, artifacts):
    email = f"page-{uuid.uuid4().hex[:8]}@example.com"
    async with live_server(KTULHU_ANON_RATE="0", KTULHU_LOGIN_RATE="1000", LLAMA_CLI_MAX_TOKENS="6") as server:
        report = await trio.to_thread.run_sync(drive, server.url, chromium, artifacts, email)
        store = server.runtime.store.aio
        ids = report["ids"]
        user = await store.find_user_by_email(email)
        kept = await store.load_chat(ids["kept"])
        owned = await store.load_chat(report["owned"])
        removed = await store.load_chat(ids["removed"])
        gone = await store.load_chat(ids["gone"])
        title = await store.chat_summary(ids["kept"])

    for seen in report["seen"]:
        assert not seen["errors"], seen["errors"]
        # the only failures a page may see are the sign-in answers the test provoked
        assert all("/api/auth/" in f for f in seen["failed"]), seen["failed"]
    assert report["rename_field_label"] == "New name of the chat"
    assert "rename" in report["focus_after_rename"]
    assert title is not None and title.text == "Octopus notes"
    [question] = report["dialogs"]
    assert question.startswith("Delete the chat “") and question.endswith("”? This cannot be undone.")
    assert removed is None and gone is None and report["rest_delete"] == 200
    assert report["deleted_notice"] == "This chat was deleted." and report["messages_after_deleted"] == 0
    assert not report["unnamed"], report["unnamed"]
    assert report["dialog_title"] == "Create account" and report["claim_checked"]
    assert report["weak_password"] == "The password is too short."
    assert report["account"] == f"Signed in as {email}" and report["other_account"] == report["account"]
    assert user is not None and kept.user_id == user.id and owned.user_id == user.id
    assert report["local_after_claim"] == []
    assert report["signed_in_sidebar"] == [ids["kept"]]
    assert report["signed_in_sidebar_after"][0] == report["owned"] and ids["kept"] in report["signed_in_sidebar_after"]
    assert report["elsewhere_before"] == [] and report["claim_row_hidden"]
    assert report["wrong_password"] == "Wrong email or password."
    assert report["elsewhere_title"] == "Octopus notes"
    assert report["elsewhere_history"] == "Tell me about octopuses"
    assert report["elsewhere_after_sign_out"] == []


def drive_google(url: str, chromium: str, artifacts: Path, make_token) -> dict:
    report: dict = {}
    with launched(chromium) as browser:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        seen = watch_console(page)

        def google(route):  # Google's sign-in page: straight back with an ID token
            query = {k: v[0] for k, v in parse_qs(urlparse(route.request.url).query).items()}
            report["google_query"] = query
            token = make_token(query["nonce"])
            back = query["redirect_uri"] + "#" + urlencode({"id_token": token, "state": query["state"]})
            route.fulfill(status=302, headers={"Location": back})

        def apple(route):  # only where the button leads (no Apple key server here)
            report["apple_query"] = {k: v[0] for k, v in parse_qs(urlparse(route.request.url).query).items()}
            route.fulfill(status=200, content_type="text/html", body="<p>Apple</p>")

        page.route("https://accounts.google.com/**", google)
        page.route("https://appleid.apple.com/**", apple)
        page.goto(url + "/")
        page.click("#sign-in")
        page.wait_for_selector("#auth-dialog[open]")
        page.click("#apple-sign-in")
        page.wait_for_url("https://appleid.apple.com/**")
        open_chat(page, url + "/", idle=False)
        page.click("#sign-in")
        page.wait_for_selector("#auth-dialog[open]")
        report["google_visible"] = page.is_visible("#google-sign-in")
        report["apple_visible"] = page.is_visible("#apple-sign-in")
        page.screenshot(path=str(artifacts / "chat-sign-in-providers.png"))
        page.click("#google-sign-in")
        page.wait_for_selector("#account-email:not([hidden])")
        report["account"] = page.text_content("#account-email")
        report["hash_after"] = page.evaluate("location.hash")
        report["seen"] = seen
    return report


async def test_google_and_apple_sign_in_when_configured(live_server, chromium, artifacts):
    async with fake_idp() as idp, live_server(
            KTULHU_ANON_RATE="0", KTULHU_LOGIN_RATE="0", GOOGLE_CLIENT_ID="google-client", APPLE_CLIENT_ID="apple-client",
            KTULHU_GOOGLE_JWKS_URL=idp.url) as server:
        def make_token(nonce: str) -> str:
            return idp.token(email="gina@example.com", nonce=nonce)

        report = await trio.to_thread.run_sync(drive_google, server.url, chromium, artifacts, make_token)
        user = await server.runtime.store.aio.find_user_by_email("gina@example.com")
    assert not report["seen"]["errors"], report["seen"]["errors"]
    assert report["google_visible"] and report["apple_visible"]
    apple = report["apple_query"]
    assert apple["client_id"] == "apple-client" and apple["response_type"] == "code id_token"
    assert apple["response_mode"] == "fragment" and apple["nonce"] and apple["state"]
    query = report["google_query"]
    assert query["client_id"] == "google-client" and query["response_type"] == "id_token"
    assert query["redirect_uri"].endswith("/") and query["nonce"] and query["state"]
    assert report["account"] == "Signed in as gina@example.com"
    assert "id_token" not in report["hash_after"]
    assert user is not None
