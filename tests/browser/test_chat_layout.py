"""The chat page at phone width (390 and 360 px: the sidebar is a drawer, nothing sticks out), by
keyboard and for screen readers, in four languages, with stored replies that ended early, and with
prompts the real server refuses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Page

from ktulhu.store.records import Chat, Message, now_ms

from .helpers import launched, open_chat, layout_report, unnamed_controls, watch_console

pytestmark = pytest.mark.model

LONG_LINE = "x = [" + ", ".join(str(i) for i in range(200)) + "]"
REPLY = ("Here is a table and some code.\n\n| name | value | description |\n|---|---|---|\n"
         "| alpha | 1 | " + "a rather long description " * 8 + "|\n\n```python\n" + LONG_LINE + "\nprint(x)\n```\n")


def seed(store) -> str:
    """A chat whose replies ended in every way the page marks (as the server stores them)."""
    chat_id = str(uuid.uuid4())
    store.save_chat(Chat(id=chat_id, device_hash="seeded", user_id=None, updated_ts=now_ms(), meta={}))
    ts = now_ms()
    rows = [
        ("user", "Show me a table", {}),
        ("assistant", REPLY, {"finish_reason": "eos", "cancelled": False}),
        ("user", "Write a long story", {}),
        ("assistant", "Once upon a time", {"finish_reason": "length", "cancelled": False}),
        ("user", "Never mind", {}),
        ("assistant", "", {"finish_reason": "cancelled", "cancelled": True}),
        ("user", "Are you there?", {}),
        ("assistant", "I was saying", {"finish_reason": "interrupted", "incomplete": True}),
    ]
    for i, (role, text, meta) in enumerate(rows):
        store.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role=role, text=text, ts=ts + i,
                                   language="en", meta=meta, device_hash="seeded"))
    store.replace_summary(chat_id, "Seeded endings")
    return chat_id


def tab_order(page: Page) -> list[str]:
    """The ids (or classes) focus visits with Tab from the top of the page up to Send. A code block
    that scrolls is left out: Chromium (since 130) lets the keyboard reach it, to scroll it."""
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    order: list[str] = []
    for _ in range(30):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => { const a = document.activeElement; return a.id || a.className || a.tagName; }"))
        if order[-1] == "send":
            break
    return [stop for stop in order if not stop.startswith("hljs")]


def drive_phone(url: str, chromium: str, artifacts: Path, chat_id: str) -> dict:
    report: dict = {"widths": {}}
    with launched(chromium) as browser:
        for width, height in ((390, 844), (360, 740)):
            context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=2,
                                          is_mobile=True, has_touch=True, reduced_motion="reduce")
            page = context.new_page()
            seen = watch_console(page)
            open_chat(page, f"{url}/#chat={chat_id}", idle=False)
            page.wait_for_selector("#messages .msg.assistant[data-ending='interrupted']")
            result: dict = {"closed": layout_report(page), "seen": seen}
            result["sidebar_visible"] = page.is_visible("#sidebar")
            result["new_chat_visible"] = page.is_visible("#new-chat")
            result["menu_visible"] = page.is_visible("#menu")
            result["code_scrolls"] = page.evaluate(
                "(() => { const pre = document.querySelector('#messages pre'), code = pre.querySelector('code');"
                " return pre.scrollWidth > pre.clientWidth || code.scrollWidth > code.clientWidth; })()")
            result["tab_order"] = tab_order(page)
            page.screenshot(path=str(artifacts / f"chat-phone-{width}.png"))
            # the drawer: opens with the menu button, focus inside, Escape closes it and returns focus
            page.click("#menu")
            page.wait_for_selector("#sidebar.open")
            result["expanded"] = page.get_attribute("#menu", "aria-expanded")
            result["focus_in_drawer"] = page.evaluate("document.activeElement.id")
            result["drawer_chat"] = page.text_content(f"#chats li[data-chat-id='{chat_id}'] .chat-link")
            result["open"] = layout_report(page)
            page.screenshot(path=str(artifacts / f"chat-phone-{width}-drawer.png"))
            page.keyboard.press("Escape")
            page.wait_for_selector("#sidebar:not(.open)", state="attached")
            result["focus_after_escape"] = page.evaluate("document.activeElement.id")
            result["hidden_after_escape"] = not page.is_visible("#new-chat")
            # New chat from the drawer
            page.click("#menu")
            page.wait_for_selector("#sidebar.open")
            page.click("#new-chat")
            page.wait_for_selector("#sidebar:not(.open)", state="attached")
            result["title_after_new"] = page.text_content("#chat-title")
            result["messages_after_new"] = page.locator("#messages .msg").count()
            result["focus_after_new"] = page.evaluate("document.activeElement.id")
            # the language menu, the status and Send stay reachable and usable
            page.select_option("#language", "ru")
            result["send_ru"] = page.text_content("#send")
            result["ru"] = layout_report(page)
            page.screenshot(path=str(artifacts / f"chat-phone-{width}-ru.png"))
            report["widths"][width] = result
            context.close()
    return report


async def test_phone_width_drawer_and_overflow(live_server, chromium, artifacts):
    async with live_server(KTULHU_ANON_RATE="0") as server:
        chat_id = seed(server.runtime.store)
        report = await trio.to_thread.run_sync(drive_phone, server.url, chromium, artifacts, chat_id)
    for width, result in report["widths"].items():
        assert not result["seen"]["errors"], (width, result["seen"]["errors"])
        for state in ("closed", "open", "ru"):
            layout = result[state]
            assert layout["width"] == width
            assert layout["scrollWidth"] <= width and layout["bodyScrollWidth"] <= width, (width, state, layout)
            assert not layout["outside"], (width, state, layout["outside"])
        assert not result["sidebar_visible"] and not result["new_chat_visible"] and result["menu_visible"]
        assert result["code_scrolls"]  # a long code line scrolls inside its block, not the page
        # the closed drawer is out of the tab order; the reply's copy button is in it
        assert result["tab_order"] == ["skip-link", "menu", "language", "copy-code", "prompt", "send"], \
            result["tab_order"]
        assert result["expanded"] == "true" and result["focus_in_drawer"] == "new-chat"
        assert result["drawer_chat"] == "Seeded endings"
        assert result["focus_after_escape"] == "menu" and result["hidden_after_escape"]
        assert result["title_after_new"] == "New chat" and result["messages_after_new"] == 0
        assert result["focus_after_new"] == "prompt"
        assert result["send_ru"] == "Отправить"


def drive_desktop(url: str, chromium: str, artifacts: Path, chat_id: str) -> dict:
    report: dict = {}
    with launched(chromium) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        seen = watch_console(page)
        open_chat(page, f"{url}/#chat={chat_id}", idle=False)
        page.wait_for_selector("#messages .msg.assistant[data-ending='interrupted']")
        report["endings"] = page.eval_on_selector_all(
            "#messages .msg.assistant", "ns => ns.map(n => [n.dataset.ending || '', n.innerText.trim()])")
        report["ellipsis"] = page.evaluate(
            "[...document.querySelectorAll('#messages .msg .md')].map(n => getComputedStyle(n, '::after').content)"
            ".filter(c => c.includes('…')).length")
        report["log"] = page.evaluate("(() => { const m = document.getElementById('messages');"
                                      " return [m.getAttribute('role'), m.getAttribute('aria-live')]; })()")
        report["unnamed"] = unnamed_controls(page)
        report["tab_order"] = tab_order(page)
        page.screenshot(path=str(artifacts / "chat-history-endings.png"), full_page=True)
        # the skip link jumps to the message box
        page.focus(".skip-link")  # the first stop (tab_order above)
        page.keyboard.press("Enter")
        report["after_skip"] = page.evaluate("document.activeElement.id")

        # every UI string exists in every language; the page switches its own labels
        report["missing"] = page.evaluate("""() => {
            const s = KtulhuI18n.strings, keys = Object.keys(s.en), out = [];
            for (const lang of KtulhuI18n.languages) {
                for (const k of keys) if (!(k in s[lang]) || !s[lang][k]) out.push(lang + ':' + k);
                for (const k of Object.keys(s[lang])) if (!(k in s.en)) out.push(lang + ':extra:' + k);
            }
            return out;
        }""")
        report["languages"] = {}
        for language in ("es", "pt", "ru", "en"):
            page.select_option("#language", language)
            page.wait_for_function(f"() => document.documentElement.lang === '{language}'")
            report["languages"][language] = page.evaluate("""(lang) => {
                const wrong = [];
                for (const n of document.querySelectorAll('[data-i18n]'))
                    if (n.textContent !== KtulhuI18n.t(lang, n.dataset.i18n)) wrong.push(n.dataset.i18n);
                for (const n of document.querySelectorAll('[data-i18n-placeholder]'))
                    if (n.placeholder !== KtulhuI18n.t(lang, n.dataset.i18nPlaceholder)) wrong.push('placeholder');
                for (const n of document.querySelectorAll('[data-i18n-aria-label]'))
                    if (n.getAttribute('aria-label') !== KtulhuI18n.t(lang, n.dataset.i18nAriaLabel)) wrong.push('aria');
                return {wrong, newChat: document.getElementById('new-chat').textContent,
                        send: document.getElementById('send').textContent,
                        conn: document.getElementById('connection').textContent,
                        stopped: [...document.querySelectorAll('#messages .ending')].map(n => n.textContent)};
            }""", language)
            if language == "pt":
                page.screenshot(path=str(artifacts / "chat-history-pt.png"), full_page=True)
        page.select_option("#language", "ru")
        page.reload()
        page.wait_for_selector('#connection[data-state="online"]')
        report["kept_language"] = [page.input_value("#language"), page.text_content("#new-chat")]
        report["seen"] = seen
    return report


async def test_stored_endings_keyboard_and_languages(live_server, chromium, artifacts):
    async with live_server(KTULHU_ANON_RATE="0") as server:
        chat_id = seed(server.runtime.store)
        report = await trio.to_thread.run_sync(drive_desktop, server.url, chromium, artifacts, chat_id)
    assert not report["seen"]["errors"] and not report["seen"]["failed"], report["seen"]
    endings = report["endings"]
    assert [e for e, _ in endings] == ["", "length", "cancelled", "interrupted"]
    assert endings[1][1].endswith("Cut off: the reply reached the length limit.")
    assert endings[2][1] == "Stopped before the reply began."  # not a permanent "…"
    assert endings[3][1].endswith("Interrupted: this reply was never finished.")
    assert report["ellipsis"] == 0
    assert report["log"] == ["log", "polite"]
    assert not report["unnamed"], report["unnamed"]
    assert report["tab_order"] == ["skip-link", "new-chat", "chat-link active", "icon-btn rename", "icon-btn delete",
                                   "sign-in", "language", "copy-code", "prompt", "send"], report["tab_order"]
    assert report["after_skip"] == "prompt"
    assert report["missing"] == []
    expected = {"es": ("Nuevo chat", "Enviar", "en línea"), "pt": ("Nova conversa", "Enviar", "conectado"),
                "ru": ("Новый чат", "Отправить", "в сети"), "en": ("New chat", "Send", "online")}
    for language, (new_chat, send, conn) in expected.items():
        result = report["languages"][language]
        assert result["wrong"] == [], (language, result["wrong"])
        assert (result["newChat"], result["send"], result["conn"]) == (new_chat, send, conn)
    assert report["languages"]["es"]["stopped"][1] == "Detenida antes de que empezara la respuesta."
    assert report["kept_language"] == ["ru", "Новый чат"]


def drive_refusals(url: str, chromium: str, artifacts: Path) -> dict:
    report: dict = {}
    with launched(chromium) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        open_chat(page, url + "/")
        # 1. longer than the model's context: refused by the server, kept in the box
        long_text = "word " * 6000
        page.fill("#prompt", long_text)
        page.keyboard.press("Enter")
        page.wait_for_selector("#notice:not([hidden])")
        page.wait_for_selector("body[data-idle='1']")
        report["context_notice"] = page.text_content("#notice-text")
        report["context_box"] = len(page.input_value("#prompt"))
        report["context_bubbles"] = page.locator("#messages .msg").count()
        report["context_sidebar"] = page.locator("#chats li").count()
        # 2. the anonymous budget (one prompt a minute) is spent: rate limited, with Sign in
        page.fill("#prompt", "Hello again")
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.getElementById('notice-text').textContent.includes('Too many')")
        page.wait_for_selector("body[data-idle='1']")
        report["rate_notice"] = page.text_content("#notice-text")
        report["rate_box"] = page.input_value("#prompt")
        report["rate_bubbles"] = page.locator("#messages .msg").count()
        report["rate_sign_in"] = page.is_visible("#notice-sign-in")
        page.screenshot(path=str(artifacts / "chat-refused-by-server.png"), full_page=True)
    return report


async def test_refused_prompts_stay_in_the_box(live_server, chromium, artifacts):
    async with live_server(KTULHU_ANON_RATE="1") as server:
        report = await trio.to_thread.run_sync(drive_refusals, server.url, chromium, artifacts)
        stored = await server.runtime.store.aio.list_recent_messages(10)
    assert "too long for the model" in report["context_notice"]
    assert report["context_box"] == len("word " * 6000)
    assert report["context_bubbles"] == 0 and report["context_sidebar"] == 0
    assert report["rate_notice"].startswith("Too many messages; try again in ") and report["rate_notice"].endswith(
        " s or sign in.")
    assert report["rate_box"] == "Hello again" and report["rate_bubbles"] == 0 and report["rate_sign_in"]
    assert stored == []  # a refused prompt stores nothing


def drive_stop(url: str, chromium: str, artifacts: Path) -> dict:
    report: dict = {}
    with launched(chromium) as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        open_chat(page, url + "/")
        page.fill("#prompt", "Write a very long story about the sea.")
        # Send and press Stop in the same tick: the stop races the first token
        page.evaluate("() => { document.getElementById('composer').requestSubmit();"
                      " document.getElementById('cancel').click(); }")
        page.wait_for_selector("body[data-idle='1']")
        # the check against the stored history settles one way or the other
        page.wait_for_function("""() => {
            const box = document.getElementById('prompt').value;
            const stopped = document.querySelector('#messages .msg.assistant[data-ending="cancelled"]');
            const notice = document.getElementById('notice-text').textContent;
            return (box && notice) || (stopped && !box);
        }""")
        report["box"] = page.input_value("#prompt")
        report["before"] = page.eval_on_selector_all(
            "#messages .msg", "ns => ns.map(n => [n.dataset.role, n.dataset.ending || '', n.innerText.trim()])")
        chat_id = page.evaluate("location.hash.slice(6)")
        open_chat(page, f"{url}/#chat={chat_id}")
        if not report["box"]:
            page.wait_for_selector("#messages .msg.assistant")
        report["after"] = page.eval_on_selector_all(
            "#messages .msg", "ns => ns.map(n => [n.dataset.role, n.dataset.ending || '', n.innerText.trim()])")
    return report


async def test_stop_before_the_first_word(live_server, chromium, artifacts):
    async with live_server(KTULHU_ANON_RATE="0", LLAMA_CLI_MAX_TOKENS="64") as server:
        report = await trio.to_thread.run_sync(drive_stop, server.url, chromium, artifacts)
    if report["box"]:  # stopped before the server stored it: nothing in the history, the text is back
        assert report["box"] == "Write a very long story about the sea."
        assert report["before"] == [] and report["after"] == []
    else:  # stored: a stopped bubble, the same after a reload
        assert report["before"][0][0] == "user" and report["before"][-1][:2] == ["assistant", "cancelled"]
        assert report["after"] == report["before"], (report["before"], report["after"])
        assert all(text for _, _, text in report["after"])  # no empty "…" bubble
