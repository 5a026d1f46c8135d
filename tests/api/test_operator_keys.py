"""Operator-issued API keys: `ktulhu keys create|list|revoke` on a real store, the keys used against
the real server over `/v1` (the `openai` package and raw HTTP), revocation, per-key generation caps,
and `KTULHU_API_KEYS_FILE` (accepted, refused at start-up when unsafe or malformed, never logged)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import attrs
import openai
import pytest

from ktulhu.auth.api_keys import authenticate_key, split_key
from ktulhu.auth.key_file import MIN_SECRET_CHARS, parse_keys, match_static_key
from ktulhu.cli import main
from ktulhu.settings import SettingsError, load_settings
from ktulhu.store import Store

from auth.helpers import bearer, client

SECRET = "s3cret-" + "0123456789abcdef" * 3           # 55 characters
OTHER_SECRET = "another-" + "fedcba9876543210" * 3     # 56 characters
ENV = {"LLAMA_CLI_MAX_TOKENS": "4", "KTULHU_LOGIN_RATE": "0"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def in_server_dir(server_dir: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`ktulhu keys` run as an operator would: in the server's directory, no KTULHU_* in the environment."""
    monkeypatch.chdir(server_dir)
    return server_dir


def keys(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `ktulhu keys ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(["keys", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def listing(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    code, out, err = keys(capsys, "list", "--json")
    assert code == 0, err
    return json.loads(out)


def keys_file(directory: Path, text: str, mode: int = 0o600) -> Path:
    path = directory / "api-keys.txt"
    path.write_text(text)
    path.chmod(mode)
    return path


# --- the CLI against the real server --------------------------------------------------------------


@pytest.mark.model
async def test_create_list_use_revoke(live_server, in_server_dir: Path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    code, out, err = keys(capsys, "create", "--name", "my-tool", "--role", "paid")
    assert code == 0, err
    key = out.strip()
    assert out.count("\n") == 1 and key.startswith("ktk_")  # stdout holds the key alone: KEY=$(...) works
    assert "only time" in err and key not in err and "my-tool" in err
    code, out, err = keys(capsys, "create", "--name", "capped", "--role", "paid", "--limit", "1")
    assert code == 0, err
    capped = out.strip()

    code, table, err = keys(capsys, "list")
    assert code == 0 and "my-tool" in table and "capped" in table and "unlimited" in table
    assert split_key(key)[1] not in table and split_key(capped)[1] not in table
    rows = {row["name"]: row for row in listing(capsys)}
    assert rows["my-tool"]["role"] == "paid" and rows["my-tool"]["limit"] is None
    assert rows["capped"]["limit"] == 1 and rows["capped"]["status"] == "live"
    assert rows["my-tool"]["id"] == split_key(key)[0].removeprefix("ktk_")
    # stored exactly as HTTP-made keys: only the secret's hash, owned by a service account of its name
    store = Store.open(in_server_dir / "chatdb")
    try:
        record = store.load_api_key(rows["my-tool"]["id"])
        assert split_key(key)[1] not in record.secret_hash and record.name == "my-tool"
        account = authenticate_key(store, key)
        assert account is not None and account.name == "my-tool" and account.role == "paid"
        assert account.external_id == "service:my-tool" and account.email is None and account.password_hash is None
    finally:
        store.close()

    async with live_server(**ENV) as server:
        # a RocksDB store admits one process: the command says so and changes nothing
        code, out, err = keys(capsys, "create", "--name", "while-serving")
        assert code == 1 and "held by another process" in err and "stop the server" in err and out == ""
        sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in (await sdk.models.list()).data] == [server.runtime.settings.model_file.stem]
        completion = await sdk.chat.completions.create(model="any", messages=CHAT["messages"], max_tokens=2)
        assert completion.choices[0].message.role == "assistant"
        await sdk.close()
        async with client(server) as http:
            # the cap of --limit holds whatever the role, through the quota the free tier uses
            profile = (await http.get("/external/api/profile", headers=bearer(capped))).json()
            assert profile["role"] == "paid" and profile["generation_limit"] == 1
            assert (await http.post("/v1/chat/completions", json=CHAT, headers=bearer(capped))).status_code == 200
            r = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(capped))
            assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
            # an operator key is an API key: it cannot manage keys
            assert (await http.post("/external/api/keys", headers=bearer(key))).status_code == 403
    assert key not in caplog.text and split_key(key)[1] not in caplog.text

    code, out, err = keys(capsys, "revoke", "my-tool")
    assert code == 0 and "Revoked key 'my-tool'" in out, err
    code, out, err = keys(capsys, "revoke", rows["my-tool"]["id"])  # again, by id: idempotent
    assert code == 0 and "already revoked" in out
    assert {row["name"]: row["status"] for row in listing(capsys)} == {"my-tool": "revoked", "capped": "live"}

    async with live_server(**ENV) as server:
        async with client(server) as http:
            for path in ("/v1/models", "/external/api/profile"):
                r = await http.get(path, headers=bearer(key))
                assert r.status_code == 401, (path, r.text)
            r = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await http.get("/v1/models", headers=bearer(capped))).status_code == 200
        revoked_sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await revoked_sdk.models.list()
        await revoked_sdk.close()

    # the name is free again after its key was revoked; the account (and its count) is the same
    code, out, err = keys(capsys, "create", "--name", "my-tool", "--role", "free", "--limit", "5")
    assert code == 0, err
    rows = [row for row in listing(capsys) if row["name"] == "my-tool"]
    assert [row["status"] for row in rows] == ["revoked", "live"] and rows[1]["role"] == "free"
    assert rows[1]["limit"] == 5 and rows[1]["used"] == 1


@pytest.mark.model
async def test_revoke_while_serving_on_postgresql(live_server, in_server_dir: Path, postgres_url: str, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL store is shared: keys made and revoked while the server runs take effect at once."""
    monkeypatch.setenv("KTULHU_STORE", postgres_url)
    async with live_server(KTULHU_STORE=postgres_url, **ENV) as server:
        code, out, err = keys(capsys, "create", "--name", "webui")
        assert code == 0, err
        key = out.strip()
        async with client(server) as http:
            assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200
            code, out, err = keys(capsys, "revoke", "webui")
            assert code == 0, err
            r = await http.get("/v1/models", headers=bearer(key))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# --- the CLI refuses bad input and changes nothing -------------------------------------------------


HOSTILE_NAMES = ["", " ", "a b", "a\nb", "line\r\n", "tab\tname", "nul\x00", "x" * 10_000, "ключ", "emoji😀",
                 "-leading-dash", ".hidden", "a/b", "$(id)"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_create_refuses_hostile_names_before_touching_the_store(in_server_dir: Path, capsys, name: str) -> None:
    code, out, err = keys(capsys, "create", f"--name={name}")
    assert code == 2 and out == ""
    assert err.startswith("ktulhu keys: ") and err.count("\n") == 1 and len(err) < 400  # one line, truncated
    assert "nothing was changed" in err
    assert not (in_server_dir / "chatdb").exists()


@pytest.mark.parametrize("args, message", [
    (["--role", "root"], "unknown role 'root'"),
    (["--role", "Paid"], "unknown role"),
    (["--role", ""], "unknown role"),
    (["--limit", "-1"], "the limit must be"),
    (["--limit", str(10 ** 12)], "the limit must be"),
])
def test_create_refuses_bad_roles_and_limits(in_server_dir: Path, capsys, args: list[str], message: str) -> None:
    code, out, err = keys(capsys, "create", "--name", "tool", *args)
    assert code == 2 and message in err and out == ""
    assert not (in_server_dir / "chatdb").exists()


def test_cli_refusals_on_an_existing_store(in_server_dir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse: not a number
        main(["keys", "create", "--name", "tool", "--limit", "many"])
    assert exited.value.code == 2
    capsys.readouterr()
    # list and revoke never create a store: a missing one means the wrong directory
    code, _, err = keys(capsys, "list")
    assert code == 1 and "there is no store" in err and not (in_server_dir / "chatdb").exists()

    code, out, err = keys(capsys, "create", "--name", "tool", "--role", "free")
    assert code == 0, err
    before = listing(capsys)
    code, out, err = keys(capsys, "create", "--name", "tool", "--role", "admin")
    assert code == 2 and "already exists" in err and out == ""
    assert listing(capsys) == before  # the refused duplicate changed nothing (role included)
    for unknown in ("0" * 32, "ktk_" + "0" * 32, "nobody", "a\nb", "x" * 5000, "ключ"):
        code, out, err = keys(capsys, "revoke", unknown)
        assert code == 1 and out == "" and err.count("\n") == 1 and len(err) < 400, unknown
    assert listing(capsys) == before
    assert [(r["name"], r["role"], r["limit"]) for r in before] == [("tool", "free", 10)]  # KTULHU_FREE_GENERATIONS


def test_a_users_http_key_is_not_the_operators_to_revoke(in_server_dir: Path, capsys) -> None:
    from ktulhu.auth.api_keys import create_key
    from ktulhu.store.records import User, now_ms

    store = Store.open(in_server_dir / "chatdb")
    try:
        store.save_user(User(id="u1", created_ts=now_ms()))
        record, _ = create_key(store, "u1", "mine")
    finally:
        store.close()
    code, _, err = keys(capsys, "revoke", record.id)
    assert code == 1 and "no operator key" in err
    assert listing(capsys) == []


# --- KTULHU_API_KEYS_FILE -------------------------------------------------------------------------


@pytest.mark.model
async def test_keys_file_authenticates_and_is_never_logged(live_server, in_server_dir: Path, capsys, caplog,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    path = keys_file(in_server_dir, f"# tools\n\nopen-webui paid {SECRET}\n\tnightly\tfree\t{OTHER_SECRET}  \n")
    async with live_server(KTULHU_API_KEYS_FILE=str(path), **ENV) as server:
        assert [k.name for k in server.runtime.settings.static_keys] == ["open-webui", "nightly"]
        async with client(server) as http:
            assert (await http.get("/v1/models", headers=bearer(SECRET))).status_code == 200
            r = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(SECRET))
            assert r.status_code == 200 and r.json()["object"] == "chat.completion"
            profile = (await http.get("/external/api/profile", headers=bearer(SECRET))).json()
            assert profile["role"] == "paid" and profile["generation_count"] == 1
            nightly = (await http.get("/external/api/profile", headers=bearer(OTHER_SECRET))).json()
            assert nightly["role"] == "free" and nightly["user_id"] != profile["user_id"]
            # near misses are refused with the usual answer
            for wrong in (SECRET[:-1], SECRET + "x", SECRET[:-1] + "X", SECRET.upper(), "x" * 40):
                r = await http.get("/v1/models", headers=bearer(wrong))
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", wrong
            # a file key is an API key: it cannot manage keys
            assert (await http.post("/external/api/keys", headers=bearer(SECRET))).status_code == 403
            assert (await http.get("/external/api/keys", headers=bearer(SECRET))).status_code == 403
        account = server.runtime.store.find_user_by_provider("keyfile:open-webui")
        assert account is not None and account.role == "paid" and account.generation_count == 1
    assert SECRET not in caplog.text and OTHER_SECRET not in caplog.text
    assert "open-webui" in caplog.text  # the start-up log names the keys
    # `ktulhu keys list` shows the file's keys by name only, and refuses to revoke or shadow them
    monkeypatch.setenv("KTULHU_API_KEYS_FILE", str(path))
    code, table, _ = keys(capsys, "list")
    assert code == 0 and "open-webui" in table and "(KTULHU_API_KEYS_FILE)" in table and SECRET not in table
    code, _, err = keys(capsys, "revoke", "open-webui")
    assert code == 1 and "delete its line" in err
    code, _, err = keys(capsys, "create", "--name", "open-webui")
    assert code == 2 and "already a key of KTULHU_API_KEYS_FILE" in err


def _refusal(tmp_path: Path, text: str | bytes, mode: int = 0o600) -> str:
    path = tmp_path / "api-keys.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    path.chmod(mode)
    with pytest.raises(SettingsError) as refused:
        load_settings(environ={"KTULHU_API_KEYS_FILE": str(path)}, root=tmp_path)
    message = str(refused.value)
    assert "KTULHU_API_KEYS_FILE" in message
    assert SECRET not in message and OTHER_SECRET not in message  # never a secret in a message
    return message


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666])
def test_keys_file_other_users_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    message = _refusal(tmp_path, f"tool paid {SECRET}\n", mode)
    assert "every user" in message and "chmod 600" in message


@pytest.mark.parametrize("text, expected", [
    ("tool paid\n", "expected `NAME ROLE SECRET`, found 2 fields"),
    (f"tool paid {SECRET} extra\n", "found 4 fields"),
    (f"tool {SECRET}\n", "found 2 fields"),
    (f"tool root {SECRET}\n", "unknown role 'root'"),
    (f"tool Paid {SECRET}\n", "unknown role 'Paid'"),
    ("tool paid " + "x" * (MIN_SECRET_CHARS - 1) + "\n", "fewer than 32"),
    ("tool paid short\n", "fewer than 32"),
    (f"tool paid ktk_{SECRET}\n", "starts with 'ktk_'"),
    (f"tool paid {SECRET}\ntool free {OTHER_SECRET}\n", "line 2: the name 'tool' is already used on line 1"),
    (f"one paid {SECRET}\ntwo free {SECRET}\n", "line 2 (two): the same secret as line 1"),
    (f"ключ paid {SECRET}\n", "is not allowed"),
    (f"emoji😀 paid {SECRET}\n", "is not allowed"),
    (f"a\rb paid {SECRET}\n", "is not allowed"),
    (f"a\x0bb paid {SECRET}\n", "is not allowed"),
    (f"{'n' * 10_000} paid {SECRET}\n", "longer than 64 characters"),
    (f"tool paid {SECRET[:-1]}\x00\n", "other than printable ASCII"),
    (f"tool paid {SECRET}é\n", "other than printable ASCII"),
    (b"tool paid \xff\xfe" + SECRET.encode() + b"\n", "not UTF-8 text"),
])
def test_malformed_keys_files_are_refused_naming_the_line(tmp_path: Path, text: str | bytes, expected: str) -> None:
    message = _refusal(tmp_path, text)
    assert expected in message
    assert len(message) < 1000  # a huge name is shown truncated


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    message = _refusal(tmp_path, f"ok paid {SECRET}\nbad\nx root {OTHER_SECRET}\ny free tiny\n")
    assert "line 2" in message and "line 3" in message and "line 4" in message and "line 1" not in message


def test_missing_or_special_keys_files_are_refused(tmp_path: Path) -> None:
    for name, expected in ((tmp_path / "absent", "cannot open"), (tmp_path, "not a regular file")):
        with pytest.raises(SettingsError) as refused:
            load_settings(environ={"KTULHU_API_KEYS_FILE": str(name)}, root=tmp_path)
        assert expected in str(refused.value)
    huge = keys_file(tmp_path, f"tool paid {SECRET}\n" + "#" * (1 << 20))
    with pytest.raises(SettingsError) as refused:
        load_settings(environ={"KTULHU_API_KEYS_FILE": str(huge)}, root=tmp_path)
    assert "larger than" in str(refused.value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # must not hang the start-up waiting for a writer
    with pytest.raises(SettingsError) as refused:
        load_settings(environ={"KTULHU_API_KEYS_FILE": str(fifo)}, root=tmp_path)
    assert "not a regular file" in str(refused.value)


def test_a_valid_keys_file_loads_without_keeping_secrets(tmp_path: Path) -> None:
    exact = "e" * MIN_SECRET_CHARS
    keys_file(tmp_path, f"# comment\r\n\r\nwebui paid {SECRET}\r\nci\tfree\t{exact}\nboss admin {OTHER_SECRET}")
    settings = load_settings(environ={"KTULHU_API_KEYS_FILE": "api-keys.txt"}, root=tmp_path)
    assert [(k.name, k.role) for k in settings.static_keys] == [("webui", "paid"), ("ci", "free"), ("boss", "admin")]
    shown = repr(settings) + repr(settings.static_keys) + json.dumps(settings.public_items())
    assert SECRET not in shown and exact not in shown and OTHER_SECRET not in shown
    assert SECRET not in json.dumps([attrs.asdict(key) for key in settings.static_keys])  # hashes only
    assert match_static_key(settings.static_keys, SECRET).name == "webui"
    assert match_static_key(settings.static_keys, exact).name == "ci"
    for near in (SECRET[:-1], SECRET + "0", exact[:-1], "", "Bearer " + SECRET, "\udcff" * 40):
        assert match_static_key(settings.static_keys, near) is None
    assert parse_keys("") == () and parse_keys("# only a comment\n") == ()


def test_serve_refuses_a_world_readable_keys_file_at_start_up(in_server_dir: Path) -> None:
    path = keys_file(in_server_dir, f"tool paid {SECRET}\n", 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
    env["KTULHU_API_KEYS_FILE"] = str(path)
    result = subprocess.run([str(Path(sys.executable).parent / "ktulhu"), "serve", "--host", "127.0.0.1",
                             "--port", "0"], cwd=in_server_dir, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "KTULHU_API_KEYS_FILE" in result.stderr and "chmod 600" in result.stderr
    assert SECRET not in result.stderr + result.stdout
