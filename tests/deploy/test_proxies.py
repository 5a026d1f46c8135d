"""KTULHU_TRUSTED_PROXIES: the setting, the header parsing (hostile input), the ASGI middleware, and a
real server that believes X-Forwarded-For only from a trusted peer."""

from __future__ import annotations

import ipaddress
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import assume, example, given, settings as hsettings, strategies as st
from trio_websocket import open_websocket_url

from ktulhu.http.proxies import (
    MAX_HOPS,
    TrustedProxyHeaders,
    forwarded_client,
    forwarded_scheme,
    parse_address,
    parse_networks,
)
from ktulhu.settings import SettingsError, load_settings

LOCAL = parse_networks("127.0.0.1/32,10.0.0.0/8,fd00::/8")


def _is_local(address: Any) -> bool:
    address = ipaddress.ip_address(address)
    return any(address.version == net.version and address in net for net in LOCAL)

# --- the setting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "stored"), [
    ("127.0.0.1", "127.0.0.1/32"),
    (" 10.0.0.0/8 , ::1,", "10.0.0.0/8,::1/128"),
    ("fd00::/8,192.168.1.0/24", "fd00::/8,192.168.1.0/24"),
    (",", ""),
])
def test_setting_is_normalised(tmp_path: Path, raw: str, stored: str) -> None:
    settings = load_settings(environ={"KTULHU_TRUSTED_PROXIES": raw}, root=tmp_path)
    assert settings.trusted_proxies == stored
    assert ",".join(map(str, parse_networks(stored))) == stored
    assert load_settings(environ={}, root=tmp_path).trusted_proxies == ""  # trust nobody


@pytest.mark.parametrize(("raw", "fragment"), [
    ("10.0.0.1/8", "write the network as 10.0.0.0/8"),
    ("nginx", "'nginx' is not an IP address or CIDR network"),
    ("127.0.0.1/33", "not an IP address or CIDR network"),
    ("*", "not an IP address"),
    ("fe80::1%eth0", "without zone ids"),
    ("１２７.0.0.1", "not an IP address"),
    ("127.0.0.1 10.0.0.0/8", "not an IP address"),
    ("127.0.0.1;rm -rf /", "not an IP address"),
    ("1" * 5000, "not an IP address"),
])
def test_bad_setting_names_variable_value_and_fix(tmp_path: Path, raw: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"KTULHU_TRUSTED_PROXIES": raw}, root=tmp_path)
    text = str(caught.value)
    assert "KTULHU_TRUSTED_PROXIES=" in text and "(from environment)" in text and fragment in text
    assert "; set" in text or "; write" in text or "; list" in text


@given(st.text(max_size=200))
def test_any_setting_value_loads_or_is_refused_clearly(raw: str) -> None:
    try:
        settings = load_settings(environ={"KTULHU_TRUSTED_PROXIES": raw}, root=Path("/nonexistent-ktulhu-root"))
    except SettingsError as error:
        assert "KTULHU_TRUSTED_PROXIES" in str(error)
    else:
        parse_networks(settings.trusted_proxies)  # what was stored is readable


# --- one X-Forwarded-For entry ---------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "address"), [
    ("203.0.113.7", "203.0.113.7"),
    ("  203.0.113.7 ", "203.0.113.7"),
    ("203.0.113.7:51234", "203.0.113.7"),
    ("2001:db8::1", "2001:db8::1"),
    ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("fe80::1%eth0", "fe80::1"),
])
def test_addresses_with_and_without_ports(entry: str, address: str) -> None:
    assert str(parse_address(entry)) == address


@pytest.mark.parametrize("entry", [
    "", "unknown", "_hidden", "localhost", "203.0.113.7:", "203.0.113.7:99999", "203.0.113.7:８０",
    "203.0.113.7:80:80", "[203.0.113.7]", "[2001:db8::1", "[2001:db8::1]x", "[2001:db8::1]:", "1.2.3",
    "01.2.3.4", "1.2.3.4/32", "٣.٢.١.٠", "1.2.3.4\x00", "::" + "1" * 200, "a" * 10_000, "[::1]:-1",
])
def test_anything_else_is_not_an_address(entry: str) -> None:
    assert parse_address(entry) is None


@given(st.text(max_size=300))
@example("[" * 5000)
@example("1.2.3.4:" + "9" * 5000)
def test_parse_address_never_raises(entry: str) -> None:
    address = parse_address(entry)
    assert address is None or parse_address(str(address)) == address


# --- the whole header ------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "client"), [
    (["198.51.100.1"], "198.51.100.1"),
    (["198.51.100.1, 10.0.0.5"], "198.51.100.1"),  # walked past a trusted proxy
    (["6.6.6.6, 198.51.100.1, 10.0.0.5"], "198.51.100.1"),  # the client's own forgery is never read
    (["127.0.0.1, 198.51.100.1"], "198.51.100.1"),  # nor a forged loopback
    (["garbage!!, 198.51.100.1"], "198.51.100.1"),  # junk left of the client does not matter
    (["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two header lines read as one list, in order
    (["198.51.100.1,", " , 10.0.0.5"], "198.51.100.1"),  # empty entries are skipped
    ([", 198.51.100.1"], "198.51.100.1"),  # a proxy appending to an empty header
    (["[2001:db8::7]:443, [fd00::1]"], "2001:db8::7"),
    (["10.0.0.9, 10.0.0.5"], "10.0.0.9"),  # all trusted: the left-most (a proxy host's own request)
    (["198.51.100.1, nonsense, 10.0.0.5"], None),  # unreadable within the walk: ignored
    (["198.51.100.1, unknown"], None),
    ([""], None),
    ([" , ,"], None),
    ([], None),
])
def test_forwarded_client(values: list[str], client: str | None) -> None:
    assert forwarded_client(values, LOCAL) == client


def test_too_many_trusted_hops_are_not_believed() -> None:
    chain = ["198.51.100.1"] + ["10.0.0.5"] * (MAX_HOPS - 1)
    assert forwarded_client([", ".join(chain)], LOCAL) == "198.51.100.1"
    assert forwarded_client([", ".join(["198.51.100.1"] + ["10.0.0.5"] * MAX_HOPS)], LOCAL) is None
    assert forwarded_client([", ".join(["10.0.0.5"] * (MAX_HOPS + 5))], LOCAL) is None


def test_addresses_are_never_trusted_across_ip_versions() -> None:
    # ::/96 holds the integers of every IPv4 address; an IPv4 client is still not in it
    assert forwarded_client(["198.51.100.1"], parse_networks("::/96")) == "198.51.100.1"
    assert forwarded_client(["::c633:6401, 198.51.100.1"], parse_networks("0.0.0.0/0")) == "::c633:6401"


_entries = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:{a.max_prefixlen}"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:{int(a) % 65536}"),
    st.sampled_from(["", " ", "unknown", "[", "]", ":", "1.2.3.4:x", "10.0.0.5", "fd00::1"]),
    st.text(max_size=40),
)


@given(values=st.lists(st.lists(_entries, max_size=50).map(", ".join), max_size=4))
@example(values=["1.2.3.4," * 20_000])
@example(values=[",".join(["10.0.0.1"] * 20_000)])
def test_forwarded_client_is_total_and_only_names_real_addresses(values: list[str]) -> None:
    client = forwarded_client(values, LOCAL)
    assert client is None or str(ipaddress.ip_address(client)) == client


@given(prefix=st.text(max_size=200), client=st.ip_addresses(),
       proxies=st.lists(st.sampled_from(["10.0.0.5", "127.0.0.1", "[fd00::2]:80", "10.255.0.1:8080"]),
                        max_size=MAX_HOPS - 1))
def test_whatever_the_client_wrote_the_first_untrusted_hop_wins(prefix: str, client: Any, proxies: list[str]) -> None:
    """The right part of the header is written by our proxies; anything left of it by the client."""
    assume(not _is_local(client) and not (client.version == 6 and client.ipv4_mapped))
    header = ", ".join([prefix, str(client), *proxies])
    assert forwarded_client([header], LOCAL) == str(client)


@pytest.mark.parametrize(("values", "websocket", "scheme"), [
    (["https"], False, "https"),
    (["HTTPS "], False, "https"),
    (["http"], False, "http"),
    (["https"], True, "wss"),
    (["http"], True, "ws"),
    (["wss"], False, "https"),
    (["http, https"], False, "https"),  # the right-most: set by the proxy nearest to us
    (["https", ""], False, "https"),
    (["ftp"], False, None),
    (["javascript:"], True, None),
    (["https, ftp"], False, None),
    ([""], False, None),
    ([], True, None),
])
def test_forwarded_scheme(values: list[str], websocket: bool, scheme: str | None) -> None:
    assert forwarded_scheme(values, websocket) == scheme


@given(st.lists(st.text(max_size=100), max_size=4), st.booleans())
def test_forwarded_scheme_is_total(values: list[str], websocket: bool) -> None:
    assert forwarded_scheme(values, websocket) in (None, "http", "https", "ws", "wss")


# --- the middleware --------------------------------------------------------------------------------


async def _through(scope: dict[str, Any], networks: tuple = LOCAL) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)

    await TrustedProxyHeaders(app, lambda: networks)(scope, None, None)
    return seen


def _scope(peer: str | None, headers: list[tuple[bytes, bytes]], kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "scheme": "ws" if kind == "websocket" else "http", "headers": headers,
            "client": None if peer is None else (peer, 40000)}


FORWARDED = [(b"x-forwarded-for", b"6.6.6.6, 198.51.100.1"), (b"X-Forwarded-Proto", b"https")]


async def test_a_trusted_peer_names_the_client_and_scheme() -> None:
    seen = await _through(_scope("127.0.0.1", FORWARDED))
    assert seen["client"] == ("198.51.100.1", 0) and seen["scheme"] == "https"
    seen = await _through(_scope("::ffff:10.1.2.3", FORWARDED, "websocket"))
    assert seen["client"] == ("198.51.100.1", 0) and seen["scheme"] == "wss"


async def test_an_untrusted_peer_or_no_trusted_proxies_changes_nothing() -> None:
    for scope, networks in [(_scope("198.51.100.9", FORWARDED), LOCAL), (_scope("127.0.0.1", FORWARDED), ()),
                            (_scope(None, FORWARDED), LOCAL), (_scope("not-an-ip", FORWARDED), LOCAL)]:
        before = dict(scope)
        assert await _through(scope, networks) == before
    lifespan = {"type": "lifespan", "headers": FORWARDED, "client": ("127.0.0.1", 1)}
    assert await _through(dict(lifespan)) == lifespan


async def test_malformed_headers_keep_the_peer() -> None:
    seen = await _through(_scope("127.0.0.1", [(b"x-forwarded-for", b"\xff\xfe, ::zz"),
                                               (b"x-forwarded-proto", b"gopher")]))
    assert seen["client"] == ("127.0.0.1", 40000) and seen["scheme"] == "http"


@given(headers=st.lists(st.tuples(st.sampled_from([b"x-forwarded-for", b"X-Forwarded-For", b"x-forwarded-proto",
                                                   b"forwarded", b"x-real-ip"]),
                                  st.binary(max_size=200)), max_size=6),
       peer=st.sampled_from(["127.0.0.1", "10.9.9.9", "198.51.100.9", "::1", "fd00::5"]),
       kind=st.sampled_from(["http", "websocket"]))
@hsettings(deadline=None)
def test_middleware_never_fails_and_only_rewrites_for_trusted_peers(
        headers: list[tuple[bytes, bytes]], peer: str, kind: str) -> None:
    seen = trio.run(_through, _scope(peer, headers, kind))
    if not _is_local(peer):
        assert seen["client"] == (peer, 40000) and seen["scheme"] in ("http", "ws")
    host, port = seen["client"]
    assert ipaddress.ip_address(host) and port in (0, 40000)
    assert seen["scheme"] in (("ws", "wss") if kind == "websocket" else ("http", "https"))


# --- a real server ---------------------------------------------------------------------------------


def _bucket_tokens(runtime: Any, scope: str, subject: str) -> float:
    """Tokens left in a rate-limit bucket; 100 means no request was ever keyed to it (peeks, costs nothing)."""
    return runtime.store.take_rate_token(scope, subject, capacity=100, refill_per_s=0, cost=0).tokens_left


async def _login(server: Any, source: str, headers: dict[str, str]) -> int:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(base_url=server.url, transport=transport, timeout=60) as http:
        r = await http.post("/api/auth/login", headers=headers,
                            json={"email": f"{uuid.uuid4().hex[:8]}@example.com", "password": "wrong password"})
    return r.status_code


SPOOF = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Real-IP": "203.0.113.9",
         "Forwarded": "for=203.0.113.9", "Remote-Addr": "203.0.113.9"}


@pytest.mark.model
@pytest.mark.parametrize("trusted", [None, "127.0.0.1/32"])
async def test_spoofed_headers_from_an_untrusted_peer_change_nothing(live_server, trusted: str | None) -> None:
    env = {"KTULHU_LOGIN_RATE": "1", "KTULHU_ANON_RATE": "5", "LLAMA_CLI_MAX_TOKENS": "2"}
    if trusted:
        env["KTULHU_TRUSTED_PROXIES"] = trusted
    async with live_server(**env) as server:
        runtime = server.runtime
        assert await _login(server, "127.0.0.2", SPOOF) == 401
        # a second attempt from the same peer is limited whatever it claims to be
        assert await _login(server, "127.0.0.2", {**SPOOF, "X-Forwarded-For": "198.51.100.77"}) == 429
        assert _bucket_tokens(runtime, "login_ip", "127.0.0.2") < 1
        for forged in ("203.0.113.9", "198.51.100.77"):
            assert _bucket_tokens(runtime, "login_ip", forged) == 100
        # the same on /ws: the anonymous per-IP bucket is the peer's
        async with open_websocket_url(server.ws_url + "/ws", extra_headers=list(SPOOF.items()) if not trusted else
                                      [("X-Forwarded-For", "198.51.100.5")]) as ws:
            await ws.send_message(json.dumps({"msg_type": "prompt", "request_id": "r1", "chat_id": "",
                                              "session_id": "s", "device_hash": "d1", "text": "hi"}))
            with trio.fail_after(60):
                while not json.loads(await ws.get_message()).get("done"):
                    pass
        if trusted:
            # 127.0.0.1 is the trusted proxy here: what it forwards is believed
            assert _bucket_tokens(runtime, "anon_ip", "198.51.100.5") < 100
            assert _bucket_tokens(runtime, "anon_ip", "127.0.0.1") == 100
        else:
            assert _bucket_tokens(runtime, "anon_ip", "127.0.0.1") < 100
            assert _bucket_tokens(runtime, "anon_ip", "203.0.113.9") == 100


def test_the_app_reads_the_setting_once_its_runtime_is_attached(tmp_path: Path) -> None:
    """Under `hypercorn ktulhu.asgi:app` the settings arrive at lifespan start-up, after create_app."""
    from types import SimpleNamespace

    from ktulhu.app import create_app
    from ktulhu.app_state import RUNTIME_KEY

    app = create_app()
    middleware = app.asgi_app
    assert isinstance(middleware, TrustedProxyHeaders)
    assert middleware.trusted() == ()  # no runtime yet: trust nobody
    settings = load_settings(environ={"KTULHU_TRUSTED_PROXIES": "10.0.0.0/8"}, root=tmp_path)
    app.extensions[RUNTIME_KEY] = SimpleNamespace(settings=settings)
    assert middleware.trusted() == (ipaddress.ip_network("10.0.0.0/8"),)
