"""The official OpenAI JavaScript SDK in headless Chromium, on a page from another origin, streams a chat
completion from `/v1`: the CORS preflight answers the SDK's own `x-stainless-*` headers, and
`Access-Control-Expose-Headers` lets it read the request id. A page from an origin that is not in
`config/allowed_origins.txt` is refused by the browser before anything is generated or counted.

The SDK (npm `openai`, pinned in `js_sdk.VERSION`) is fetched once per machine into a cache outside the
clone; its ESM build loads in the browser as it is. The pages come from a second local HTTP server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Page

from tests.auth.helpers import make_user

from .helpers import TIMEOUT_MS, launched
from .js_sdk import VERSION, openai_sdk, static_server

pytestmark = pytest.mark.model

#: The SDK call and the whole stream, from clicking "run" to `window.__result`.
RESULT_TIMEOUT_MS = 180_000

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><link rel="icon" href="data:,"><title>OpenAI JS SDK</title></head>
<body>
<h1>openai@%(version)s from <span id="origin"></span></h1>
<pre id="out">loading</pre>
<script type="module">
import OpenAI from "./openai/index.mjs";

const out = document.getElementById("out");
document.getElementById("origin").textContent = location.origin;

window.runChat = async (baseURL, apiKey) => {
  const result = {text: "", chunks: 0, finish_reason: null, request_id: null, error: null, error_name: null,
                  cause: null};
  out.textContent = "streaming";
  try {
    const client = new OpenAI({baseURL, apiKey, dangerouslyAllowBrowser: true, maxRetries: 0, timeout: 120000});
    const {data: stream, request_id} = await client.chat.completions.create({
      model: "x", messages: [{role: "user", content: "Say hi"}], stream: true, max_tokens: 8, temperature: 0,
    }).withResponse();
    result.request_id = request_id;
    for await (const chunk of stream) {
      result.chunks += 1;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) result.text += choice.delta.content;
        if (choice.finish_reason) result.finish_reason = choice.finish_reason;
      }
    }
  } catch (e) {
    result.error = String((e && e.message) || e);
    result.error_name = (e && e.constructor && e.constructor.name) || null;
    result.cause = e && e.cause ? String(e.cause.message || e.cause) : null;
  }
  out.textContent = JSON.stringify(result, null, 2);
  window.__result = result;
};
window.__ready = true;
out.textContent = "ready";
</script>
</body>
</html>
"""


def run_page(page: Page, origin: str, base_url: str, key: str, seen: dict[str, list[Any]]) -> dict[str, Any]:
    """Load the test page from `origin`, start the SDK call against `base_url`, wait for its result."""
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: seen["requests"].append((r.method, r.url, dict(r.headers)))
            if "/v1/" in r.url else None)
    page.goto(origin + "/index.html")
    page.wait_for_function("window.__ready === true")
    # Started, not awaited here: the wait below bounds it.
    page.evaluate("([url, key]) => { window.runChat(url, key); }", [base_url, key])
    page.wait_for_function("window.__result !== undefined", timeout=RESULT_TIMEOUT_MS)
    return page.evaluate("window.__result")


def drive(chromium: str, artifacts: Path, allowed: str, refused: str, base_url: str,
          key: str, other_key: str) -> dict[str, Any]:
    report: dict[str, Any] = {}
    with launched(chromium) as browser:
        for name, origin, credential in (("allowed", allowed, key), ("refused", refused, other_key)):
            seen: dict[str, list[Any]] = {"errors": [], "console": [], "requests": []}
            context = browser.new_context()
            try:
                page = context.new_page()
                report[name] = run_page(page, origin, base_url, credential, seen)
                page.screenshot(path=str(artifacts / f"openai-js-sdk-{name}.png"), full_page=True)
            finally:
                context.close()
            report[name + "_seen"] = seen
    return report


async def test_openai_js_sdk_streams_from_allowed_origin(live_server, server_dir, chromium, artifacts,
                                                        tmp_path_factory):
    package = openai_sdk()
    site = tmp_path_factory.mktemp("origin-site")
    (site / "index.html").write_text(PAGE % {"version": VERSION}, encoding="utf-8")
    (site / "openai").symlink_to(package, target_is_directory=True)
    with static_server(site) as allowed, static_server(site) as refused:
        (server_dir / "config" / "allowed_origins.txt").write_text(
            f"# written by {Path(__file__).name}\n{allowed}\n", encoding="utf-8")
        async with live_server(LLAMA_CLI_MAX_TOKENS="16", KTULHU_LOGIN_RATE="0") as server:
            user, key = make_user(server.runtime, role="paid")
            other, other_key = make_user(server.runtime, role="paid")
            report = await trio.to_thread.run_sync(drive, chromium, artifacts, allowed, refused,
                                                   server.url + "/v1", key, other_key)
            charged = await server.runtime.store.aio.load_user(user.id)
            not_charged = await server.runtime.store.aio.load_user(other.id)

    ok, seen = report["allowed"], report["allowed_seen"]
    assert ok["error"] is None, ok
    assert ok["text"].strip(), ok
    assert ok["chunks"] >= 2, ok
    assert ok["finish_reason"] in ("stop", "length"), ok
    # `X-Request-ID` is listed in Access-Control-Expose-Headers, so the SDK could read it.
    assert ok["request_id"], ok
    assert not seen["errors"] and not seen["console"], seen
    posts = [headers for method, url, headers in seen["requests"]
             if method == "POST" and url == server.url + "/v1/chat/completions"]
    assert len(posts) == 1, seen["requests"]
    # The SDK's own headers made the browser send a preflight, which the server answered.
    assert any(name.lower().startswith("x-stainless-") for name in posts[0]), posts[0]
    assert charged is not None and charged.generation_count == 1, charged

    bad, bad_seen = report["refused"], report["refused_seen"]
    assert bad["error"], bad
    assert bad["error_name"] == "APIConnectionError" and bad["chunks"] == 0 and not bad["text"], bad
    assert any("CORS" in line for line in bad_seen["console"]), bad_seen
    assert not_charged is not None and not not_charged.generation_count, not_charged
