"""CORS preflights as the browser OpenAI SDK sends them: the requested headers are allowed for an
allowed origin, nothing is said to other origins, and hostile header lists are answered cleanly."""

from __future__ import annotations

import re

from hypothesis import given, settings as hsettings, strategies as st

from ktulhu.http.cors import ALLOW_HEADERS, MAX_HEADER_NAME_CHARS, MAX_REQUESTED_HEADERS, requested_headers

#: The one origin on the `app` fixture's allow-list (tests/http/conftest.py).
ALLOWED = "https://app.example"
SDK_HEADERS = "x-stainless-os, x-stainless-lang, authorization"
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _preflight(origin: str, requested: str | None = None) -> dict[str, str]:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if requested is not None:
        headers["Access-Control-Request-Headers"] = requested
    return headers


def _cors_headers(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


def _vary(headers) -> set[str]:
    return {part.strip().lower() for value in headers.get_all("Vary") for part in value.split(",")}


async def test_sdk_preflight_from_an_allowed_origin_allows_the_requested_headers(app) -> None:
    response = await app.test_client().options("/v1/chat/completions", headers=_preflight(ALLOWED, SDK_HEADERS))
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = [h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")]
    assert allowed == ["x-stainless-os", "x-stainless-lang", "authorization"]
    assert {"origin", "access-control-request-headers"} <= _vary(response.headers)


async def test_requested_names_are_lower_cased_and_deduplicated(app) -> None:
    requested = "X-Stainless-OS,openai-organization ,  OpenAI-Project,x-stainless-os,,content-type"
    response = await app.test_client().options("/v1/models", headers=_preflight(ALLOWED, requested))
    assert response.headers["Access-Control-Allow-Headers"] == \
        "x-stainless-os, openai-organization, openai-project, content-type"


async def test_preflight_without_requested_headers_gets_the_default_list(app) -> None:
    response = await app.test_client().options("/v1/chat/completions", headers=_preflight(ALLOWED))
    assert response.headers["Access-Control-Allow-Headers"] == ALLOW_HEADERS


async def test_disallowed_origin_gets_no_cors_headers(app) -> None:
    client = app.test_client()
    for origin in ("https://evil.example", "null", "https://app.example.evil.example"):
        preflight = await client.options("/v1/chat/completions", headers=_preflight(origin, SDK_HEADERS))
        assert _cors_headers(preflight.headers) == {}, origin
        actual = await client.get("/healthz", headers={"Origin": origin})
        assert _cors_headers(actual.headers) == {}, origin
        assert "origin" in _vary(actual.headers)  # a shared cache keeps the answers per origin


async def test_actual_response_exposes_the_request_id(app) -> None:
    response = await app.test_client().get("/healthz", headers={"Origin": ALLOWED})
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "X-Request-ID" in response.headers["Access-Control-Expose-Headers"]


async def test_hostile_header_lists_are_answered_cleanly(app, raw) -> None:
    origin = (b"origin", ALLOWED.encode())
    method = (b"access-control-request-method", b"POST")
    hostile = [
        b"x-a, " * 20_000,                                 # 100 KB
        b",".join(b"x-h%d" % i for i in range(1000)),       # 1000 names
        b"x-ok, bad header, (x), x\x00y, \xc3\xa9t\xc3\xa9, a:b, \"q\"",  # non-token entries
        b"\xff\xfe\xfd",                                    # not text at all
        b" , ,, \t",                                        # nothing
        b"x-" + b"a" * (MAX_HEADER_NAME_CHARS + 1),         # one over-long name
    ]
    for value in hostile:
        response = await raw("OPTIONS", "/v1/chat/completions",
                             [origin, method, (b"access-control-request-headers", value)])
        assert response.status == 200, value[:40]
        [allowed] = response.get("Access-Control-Allow-Headers")
        names = [n.strip() for n in allowed.split(",")]
        assert all(TOKEN.fullmatch(n) for n in names), allowed
        assert len(allowed) < 1024 and len(names) <= MAX_REQUESTED_HEADERS
    # garbage next to a good name: the good name stays, the garbage is dropped
    response = await raw("OPTIONS", "/v1/chat/completions", [origin, method, (b"access-control-request-headers",
                                                                               hostile[2])])
    assert response.get("Access-Control-Allow-Headers") == ["x-ok"]


# --- the parser ----------------------------------------------------------------------------------

#: Short enough that a full list stays under the length bound.
_token = st.from_regex(TOKEN, fullmatch=True).filter(lambda t: len(t) <= 40)


@hsettings(max_examples=300, deadline=None)
@given(st.text(max_size=600) | st.lists(st.text(max_size=20), max_size=80).map(",".join))
def test_any_value_yields_tokens_or_the_default(value: str) -> None:
    names = requested_headers(value)
    if names is None:
        return
    assert names and len(names) <= MAX_REQUESTED_HEADERS
    assert len(set(names)) == len(names)
    for name in names:
        assert TOKEN.fullmatch(name) and name == name.lower() and len(name) <= MAX_HEADER_NAME_CHARS
        assert name in value.lower()


@hsettings(max_examples=300, deadline=None)
@given(st.lists(_token, min_size=1, max_size=MAX_REQUESTED_HEADERS), st.sampled_from([",", ", ", " ,\t"]))
def test_a_list_of_tokens_is_answered_as_sent(names: list[str], separator: str) -> None:
    expected = tuple(dict.fromkeys(n.lower() for n in names))
    assert requested_headers(separator.join(names)) == expected


def test_absent_or_oversized_lists_get_the_default() -> None:
    assert requested_headers(None) is None
    assert requested_headers("") is None
    assert requested_headers(",".join(["x-a"] * (MAX_REQUESTED_HEADERS + 1))) is None
    assert requested_headers("x-a," + " " * 5000) is None
