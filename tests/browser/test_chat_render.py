"""Replies as Markdown and how they end, with a scripted `/ws`: the test sends every frame itself, so
the rendering (while streaming and after), the copy button, the endings (length, stopped, error)
and refused prompts are checked on exact input. The page and its scripts come from a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .helpers import launched, open_chat, ScriptedHistory, ScriptedSocket, wait_until, watch_console

pytestmark = pytest.mark.model

CODE = "def add(a, b):\n    return a + b"
HOSTILE = ('Done: **bold** and `inline`. <img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> '
           '[docs](https://example.com/docs) [bad](javascript:window.__xss=3) ![pic](https://example.com/p.png)\n\n'
           '| a | b |\n|---|---|\n| 1 | 2 |\n')


def drive(url: str, chromium: str, artifacts: Path) -> dict:
    report: dict = {}
    with launched(chromium) as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        page = context.new_page()
        seen = watch_console(page)
        page.on("dialog", lambda d: d.dismiss())
        socket = ScriptedSocket(page)
        history = ScriptedHistory(page)
        open_chat(page, url + "/")

        # 1. A reply that streams Markdown with a code fence, then is cut at the length limit.
        page.fill("#prompt", "Show me some code")
        page.keyboard.press("Enter")
        first = socket.prompt(page, 1)
        bubble = page.locator("#messages .msg.assistant").last
        report["busy_while_waiting"] = bubble.get_attribute("aria-busy")
        report["box_while_waiting"] = page.input_value("#prompt")
        socket.tokens(first, "Here is ", "the code:\n\n```py", "thon\ndef add(a, b):\n")
        page.wait_for_selector("#messages .msg.assistant pre code .hljs-keyword")
        report["box_after_first_token"] = page.input_value("#prompt")
        report["fence_text_while_streaming"] = "```" in bubble.inner_text()
        page.evaluate("() => { document.querySelector('#messages .msg.assistant pre').__kept = 1;"
                      " document.querySelector('#messages .msg.assistant p').__kept = 1; }")
        socket.tokens(first, "    return a + b\n", "```\n\n", HOSTILE)
        page.wait_for_selector("#messages .msg.assistant table td")
        report["pre_kept"] = page.evaluate("() => document.querySelector('#messages .msg.assistant pre').__kept === 1")
        report["p_kept"] = page.evaluate("() => document.querySelector('#messages .msg.assistant p').__kept === 1")
        socket.done(first, "length")
        page.wait_for_selector("#messages .msg.assistant[data-ending='length'] .ending")
        page.wait_for_selector("body[data-idle='1']")
        report["length_note"] = bubble.locator(".ending").text_content()
        report["busy_after"] = bubble.get_attribute("aria-busy")
        report["code"] = bubble.locator("pre code").text_content()
        report["code_class"] = bubble.locator("pre code").get_attribute("class")
        report["code_lang"] = bubble.locator(".code-lang").text_content()
        report["strong"] = bubble.locator("strong").text_content()
        report["inline_code"] = bubble.locator("p code").first.text_content()
        report["links"] = bubble.locator("a").evaluate_all(
            "ns => ns.map(a => [a.textContent, a.getAttribute('href'), a.getAttribute('rel'), a.getAttribute('target')])")
        report["raw_html_as_text"] = '<img src=x onerror="window.__xss=1">' in bubble.inner_text()
        report["elements"] = bubble.evaluate("b => [...b.querySelectorAll('img, script, iframe, [onerror], [style]')].length")
        report["sr_status"] = page.text_content("#sr-status")
        report["sidebar"] = page.locator("#chats .chat-link").count()
        # the copy button puts the code on the clipboard
        bubble.locator("button.copy-code").click()
        page.wait_for_selector("#messages button.copy-code[data-copied='1']")
        report["copy_label"] = bubble.locator("button.copy-code").text_content()
        report["clipboard"] = page.evaluate("navigator.clipboard.readText()")
        page.screenshot(path=str(artifacts / "chat-markdown.png"), full_page=True)

        # 2. Stopped before the first word, after the server stored the prompt: shown as stopped.
        page.fill("#prompt", "Stop this one")
        page.keyboard.press("Enter")
        second = socket.prompt(page, 2)
        history.threads[second["chat_id"]] = [
            {"id": first["request_id"], "role": "user", "text": "Show me some code"},
            {"id": second["request_id"], "role": "user", "text": "Stop this one"},
            {"id": "a2", "role": "assistant", "text": "", "meta": {"cancelled": True, "finish_reason": "cancelled"}},
        ]
        page.click("#cancel")
        wait_until(page, lambda: bool(socket.cancels()), "the cancel frame")
        report["cancel_names_prompt"] = socket.cancels()[0]["request_id"] == second["request_id"]
        socket.done(second, "cancelled")
        page.wait_for_selector("body[data-idle='1']")
        stopped = page.locator("#messages .msg.assistant").last
        report["stopped_ending"] = stopped.get_attribute("data-ending")
        report["stopped_text"] = stopped.inner_text().strip()
        report["user_bubbles_after_stop"] = page.locator("#messages .msg.user").count()

        # 3. Stopped before the server stored anything: the message goes back to the box.
        page.fill("#prompt", "Never stored")
        page.keyboard.press("Enter")
        third = socket.prompt(page, 3)
        page.click("#cancel")
        wait_until(page, lambda: len(socket.cancels()) >= 2, "the second cancel frame")
        socket.done(third, "cancelled")
        page.wait_for_function("() => document.getElementById('prompt').value === 'Never stored'")
        report["unsent_bubbles"] = page.locator("#messages .msg.user").count()
        report["unsent_notice"] = page.text_content("#notice-text")
        page.fill("#prompt", "")

        # 4. Refused by the rate limit: nothing shown as sent, the text stays, the reason and Sign in.
        page.fill("#prompt", "One message too many")
        page.keyboard.press("Enter")
        fourth = socket.prompt(page, 4)
        socket.error(fourth, "rate_limited", "too many messages; try again in 42 s or sign in")
        socket.done(fourth, "rate_limited")
        page.wait_for_selector("body[data-idle='1']")
        page.wait_for_selector("#notice:not([hidden])")
        report["refused_box"] = page.input_value("#prompt")
        report["refused_user_bubbles"] = page.locator("#messages .msg.user").count()
        report["refused_notice"] = page.text_content("#notice-text")
        report["refused_sign_in"] = page.is_visible("#notice-sign-in")
        page.screenshot(path=str(artifacts / "chat-refused.png"), full_page=True)
        page.click("#notice-sign-in")
        page.wait_for_selector("#auth-dialog[open]")
        report["dialog_focus"] = page.evaluate("document.activeElement.id")
        page.keyboard.press("Escape")
        page.wait_for_selector("#auth-dialog:not([open])", state="attached")

        # 5. Too long, in Spanish: the reason in the page's language, the text kept.
        page.select_option("#language", "es")
        socket_prompts = len(socket.prompts())
        page.fill("#prompt", "Demasiado largo")
        page.click("#send")
        fifth = socket.prompt(page, socket_prompts + 1)
        socket.error(fifth, "too_large", "text over 32000 characters")
        socket.done(fifth, "too_large")
        page.wait_for_selector("body[data-idle='1']")
        page.wait_for_function("() => document.getElementById('notice-text').textContent.includes('demasiado largo')")
        report["too_long_box"] = page.input_value("#prompt")
        report["too_long_notice"] = page.text_content("#notice-text")
        page.fill("#prompt", "")

        # 6. A model error after some text: the reply is kept and marked as failed.
        page.fill("#prompt", "Break halfway")
        page.keyboard.press("Enter")
        sixth = socket.prompt(page, socket_prompts + 2)
        socket.tokens(sixth, "Half an ans")
        socket.error(sixth, "model_error", "decode failed")
        socket.done(sixth, "model_error")
        page.wait_for_selector("#messages .msg.assistant[data-ending='error']")
        report["error_note"] = page.locator("#messages .msg.assistant[data-ending='error'] .ending").text_content()
        report["error_box"] = page.input_value("#prompt")
        report["copy_label_es"] = page.locator("#messages button.copy-code").first.text_content()
        page.screenshot(path=str(artifacts / "chat-endings.png"), full_page=True)
        report["xss"] = page.evaluate("window.__xss === undefined ? null : window.__xss")
        report["seen"] = seen
    return report


async def test_markdown_streaming_and_truthful_endings(live_server, chromium, artifacts):
    async with live_server(KTULHU_ANON_RATE="0") as server:
        report = await trio.to_thread.run_sync(drive, server.url, chromium, artifacts)
    assert not report["seen"]["errors"], report["seen"]["errors"]
    assert not report["seen"]["failed"], report["seen"]["failed"]
    # waiting: the message stays in the box until the server takes it
    assert report["busy_while_waiting"] == "true" and report["box_while_waiting"] == "Show me some code"
    assert report["box_after_first_token"] == ""
    # streaming: an open fence is already a highlighted code block; finished nodes are kept (no flicker)
    assert not report["fence_text_while_streaming"]
    assert report["pre_kept"] and report["p_kept"]
    assert report["code"] == CODE and "language-python" in report["code_class"] and report["code_lang"] == "python"
    assert report["strong"] == "bold" and report["inline_code"] == "inline"
    # safe: raw HTML shown as text, nothing executable or remote, links open safely
    assert report["raw_html_as_text"] and report["elements"] == 0 and report["xss"] is None
    links = {text: (href, rel, target) for text, href, rel, target in report["links"]}
    assert links["docs"] == ("https://example.com/docs", "noopener noreferrer nofollow", "_blank")
    assert links["bad"][0] is None  # javascript: dropped
    assert links["pic"][0] == "https://example.com/p.png"  # an image is a link, never loaded
    # cut at the length limit: said on the bubble and to screen readers
    assert report["length_note"] == "Cut off: the reply reached the length limit."
    assert report["busy_after"] is None and "length limit" in report["sr_status"]
    assert report["sidebar"] == 1
    assert report["copy_label"] == "Copied" and report["clipboard"] == CODE
    # stopped before the first word: a "stopped" bubble, not a vanishing or "…" one
    assert report["cancel_names_prompt"]
    assert report["stopped_ending"] == "cancelled" and report["stopped_text"] == "Stopped before the reply began."
    assert report["user_bubbles_after_stop"] == 2
    # stopped before it was stored: back in the box
    assert report["unsent_bubbles"] == 2 and "back in the box" in report["unsent_notice"]
    # refused: not shown as sent, the text kept, the reason with a way to sign in
    assert report["refused_box"] == "One message too many" and report["refused_user_bubbles"] == 2
    assert "42 s" in report["refused_notice"] and "sign in" in report["refused_notice"]
    assert report["refused_sign_in"] and report["dialog_focus"] == "auth-email"
    assert report["too_long_box"] == "Demasiado largo"
    assert report["too_long_notice"] == "El mensaje es demasiado largo (como máximo 32000 caracteres)."
    assert report["error_note"] == "La respuesta terminó con un error (model_error)."
    assert report["error_box"] == ""
    assert report["copy_label_es"] == "Copiar"
