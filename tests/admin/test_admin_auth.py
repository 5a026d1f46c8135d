"""Admin authentication on every admin route: missing file, bad credentials, rate limit, CLI."""

from __future__ import annotations

import io
import json
import stat

import httpx
import pytest

from ktulhu import cli
from ktulhu.auth.admin import load_admin_credentials

from .helpers import ADMIN_PASSWORD, ADMIN_USER, basic, seed, write_credentials

pytestmark = pytest.mark.model


def admin_routes(ids: dict[str, str]) -> list[tuple[str, str, dict | None]]:
    uid, chat = ids["user_id"], ids["chat_id"]
    return [
        ("GET", "/internal/admin", None),
        ("GET", "/internal/admin/devices", None),
        ("GET", "/internal/admin/messages", None),
        ("GET", f"/internal/admin/chat/{chat}", None),
        ("GET", "/internal/users", None),
        ("GET", "/internal/admin/overview", None),
        ("GET", "/internal/admin/engine", None),
        ("GET", "/internal/admin/last?limit=5", None),
        ("GET", "/internal/admin/devices/list", None),
        ("GET", "/internal/users/list", None),
        ("PUT", f"/internal/users/{uid}/role", {"role": "admin"}),
        ("DELETE", f"/internal/users/{uid}", None),
    ]


BAD_HEADERS = {
    "no header": {},
    "wrong user": basic("someone", ADMIN_PASSWORD),
    "wrong password": basic(ADMIN_USER, ADMIN_PASSWORD + "x"),
    "empty password": basic(ADMIN_USER, ""),
    "malformed base64": {"Authorization": "Basic !!!not-base64!!!"},
    "no colon": {"Authorization": "Basic " + "cm9vdA=="},
    "bearer instead": {"Authorization": "Bearer abc.def.ghi"},
}


async def _unchanged(runtime, ids) -> None:
    user = await runtime.store.aio.load_user(ids["user_id"])
    assert user is not None and user.role == "free"


async def test_every_admin_route_refuses_without_valid_credentials(live_server, server_dir):
    async with live_server(KTULHU_ADMIN_RATE="10000") as server:
        ids = await seed(server.runtime)
        routes = admin_routes(ids)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            # No credentials file: 503 naming the fix, on every route, even with a header.
            for method, path, body in routes:
                r = await client.request(method, path, json=body, headers=basic())
                assert r.status_code == 503, (method, path, r.text)
                assert r.json()["error"] == "admin_not_configured"
                assert "ktulhu admin set-password" in r.json()["message"]
            await _unchanged(server.runtime, ids)

            write_credentials(server_dir)  # read at each sign-in: no restart needed
            for name, headers in BAD_HEADERS.items():
                for method, path, body in routes:
                    r = await client.request(method, path, json=body, headers=headers)
                    assert r.status_code == 401, (name, method, path, r.text)
                    assert r.headers["WWW-Authenticate"] == 'Basic realm="Internal"'
                    assert r.json()["error"] == "unauthorized"
            await _unchanged(server.runtime, ids)

            for method, path, body in routes:
                r = await client.request(method, path, json=body, headers=basic())
                assert r.status_code == 200, (method, path, r.text)


async def test_failed_sign_ins_are_rate_limited(live_server, server_dir):
    write_credentials(server_dir)
    async with live_server(KTULHU_ADMIN_RATE="3") as server:
        ids = await seed(server.runtime)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for _ in range(3):
                r = await client.get("/internal/users/list", headers=basic(ADMIN_USER, "wrong"))
                assert r.status_code == 401
            # Budget spent: every route answers 429, even to the right password, and changes nothing.
            for method, path, body in admin_routes(ids):
                r = await client.request(method, path, json=body, headers=basic())
                assert r.status_code == 429, (method, path, r.text)
                assert r.json()["error"] == "rate_limited"
            await _unchanged(server.runtime, ids)


async def test_lockout_counts_only_wrong_credentials_per_address(live_server, server_dir):
    """Missing or malformed credentials are challenges that spend nothing; wrong ones spend the
    sending address's budget only, so nobody can lock the admin out from another address."""
    write_credentials(server_dir)
    async with live_server(KTULHU_ADMIN_RATE="3") as server:
        url = "/internal/users/list"
        attacker = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(base_url=server.url, timeout=30, transport=attacker) as client:
            for headers in [{}] * 10 + [BAD_HEADERS["malformed base64"], BAD_HEADERS["no colon"],
                                        BAD_HEADERS["bearer instead"]] * 4:
                r = await client.get(url, headers=headers)
                assert r.status_code == 401, headers
                assert r.headers["WWW-Authenticate"] == 'Basic realm="Internal"'
            assert (await client.get(url, headers=basic())).status_code == 200
            for _ in range(3):
                assert (await client.get(url, headers=basic(ADMIN_USER, "wrong"))).status_code == 401
            r = await client.get(url, headers=basic())
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            # a missing header is still just a challenge there
            assert (await client.get(url)).status_code == 401
        owner = httpx.AsyncHTTPTransport(local_address="127.0.0.3")
        async with httpx.AsyncClient(base_url=server.url, timeout=30, transport=owner) as client:
            assert (await client.get(url, headers=basic())).status_code == 200


async def test_successful_sign_ins_do_not_spend_the_budget(live_server, server_dir):
    write_credentials(server_dir)
    async with live_server(KTULHU_ADMIN_RATE="2") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for _ in range(5):
                assert (await client.get("/internal/users/list", headers=basic())).status_code == 200


async def test_plaintext_credentials_file_is_refused(live_server, server_dir):
    path = server_dir / "config" / "internal_admin_auth.json"
    path.write_text(json.dumps({"username": ADMIN_USER, "password": ADMIN_PASSWORD}))
    async with live_server() as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            r = await client.get("/internal/users/list", headers=basic())
            assert r.status_code == 503
            assert "plaintext" in r.json()["message"] and "set-password" in r.json()["message"]


# --- ktulhu admin set-password ----------------------------------------------------------------


def _run_cli(monkeypatch, tmp_path, argv, stdin=""):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KTULHU_ADMIN_AUTH_FILE", str(tmp_path / "auth" / "admin.json"))
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main(argv)


def test_set_password_from_stdin_writes_an_argon2_hash_mode_600(clean_env, monkeypatch, tmp_path, capsys):
    code = _run_cli(monkeypatch, tmp_path, ["admin", "set-password", "--user", "ops", "--password-stdin"],
                    "a long enough password\n")
    assert code == 0
    path = tmp_path / "auth" / "admin.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "a long enough password" not in text
    creds = load_admin_credentials(path)
    assert creds.username == "ops" and creds.password_hash.startswith("$argon2id$")
    assert "written to" in capsys.readouterr().out


@pytest.mark.parametrize("argv, stdin, code, message", [
    (["--password-stdin"], "short\n", 2, "at least"),
    (["--password-stdin", "--user", "a:b"], "a long enough password\n", 2, "without ':'"),
    (["--password-stdin", "--user", " "], "a long enough password\n", 2, "--user"),
])
def test_set_password_rejects_bad_input_and_writes_nothing(clean_env, monkeypatch, tmp_path, capsys,
                                                            argv, stdin, code, message):
    assert _run_cli(monkeypatch, tmp_path, ["admin", "set-password", *argv], stdin) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "auth" / "admin.json").exists()


def test_set_password_prompts_twice_and_refuses_a_mismatch(clean_env, monkeypatch, tmp_path, capsys):
    answers = iter(["first password 123", "second password 456"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert _run_cli(monkeypatch, tmp_path, ["admin", "set-password"]) == 1
    assert "differ" in capsys.readouterr().err
    assert not (tmp_path / "auth" / "admin.json").exists()

    answers = iter(["same password 123", "same password 123"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert _run_cli(monkeypatch, tmp_path, ["admin", "set-password"]) == 0
    assert load_admin_credentials(tmp_path / "auth" / "admin.json").username == "admin"
