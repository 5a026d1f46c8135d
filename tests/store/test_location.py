"""`KTULHU_STORE`: a directory or a postgresql:// URL; `KTULHU_DB_PATH` still works; the password of
a URL is never shown (`ktulhu config`, configuration errors, `PgUrl.display`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ktulhu.settings import SettingsError, load_settings
from ktulhu.store.location import InvalidStoreUrl, PgUrl, is_postgres_url, mask_url_password

SECRET = "p4ss-w0rd"


def test_a_directory_the_default_and_the_older_name(tmp_path: Path) -> None:
    assert load_settings(environ={}, root=tmp_path).store_location == tmp_path / "chatdb"
    old = load_settings(environ={"KTULHU_DB_PATH": "old"}, root=tmp_path)
    assert old.store_location == old.db_dir == tmp_path / "old" and old.store_url is None
    assert old.sources["KTULHU_STORE"] == "environment (KTULHU_DB_PATH)"
    both = load_settings(environ={"KTULHU_DB_PATH": "old", "KTULHU_STORE": "/srv/new"}, root=tmp_path)
    assert both.store_location == Path("/srv/new")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
def test_a_postgresql_url(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}://ktulhu:{SECRET}@db.internal:6432/chats?sslmode=require"
    s = load_settings(environ={"KTULHU_STORE": url}, root=tmp_path)
    assert s.store_url == url and s.store_location == url
    shown = dict((env, value) for env, value, _ in s.public_items())["KTULHU_STORE"]
    assert SECRET not in shown and shown == f"{scheme}://ktulhu:***@db.internal:6432/chats?sslmode=require"


@pytest.mark.parametrize("value,fragment", [
    (f"postgresql://ktulhu:{SECRET}@db:54x2/chats", "the port '54x2' of host 'db' is not a number"),
    (f"postgresql://ktulhu:{SECRET}@db/chats/more", "the database name contains '/'"),
    (f"postgresql://ktulhu:{SECRET}%zz@db/chats", "the password has a % that is not followed by two hex digits"),
    (f"postgresql://ktulhu:{SECRET}@db/chats?nonsense=1", 'invalid URI query parameter: "nonsense"'),
    (f"postgresql://ktulhu:{SECRET}@[::1/chats", "not a usable PostgreSQL URL"),
    (f"mysql://ktulhu:{SECRET}@db/chats", "a URL of an unknown kind"),
])
def test_malformed_urls_are_configuration_errors_without_the_password(tmp_path: Path, value: str,
                                                                      fragment: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(environ={"KTULHU_STORE": value}, root=tmp_path)
    text = str(error.value)
    assert "KTULHU_STORE=" in text and fragment in text and SECRET not in text


def test_pg_url_display_and_redaction() -> None:
    url = PgUrl.parse(f"postgresql://ann:{SECRET}@10.0.0.5/chats")
    assert url.display == str(url) == "postgresql://ann@10.0.0.5:5432/chats"
    assert SECRET not in repr(url) and url.url.endswith("/chats")
    assert url.redact(f"failed for {url.url} with {SECRET}") == "failed for postgresql://ann@10.0.0.5:5432/chats with ***"
    assert str(PgUrl.parse("postgresql:///chats?host=/run/postgresql")) == \
        "postgresql://localhost:5432/chats?host=/run/postgresql"
    encoded = PgUrl.parse("postgresql://ann:p%40ss@db/chats")
    assert encoded.redact("p@ss and p%40ss") == "*** and ***"
    assert is_postgres_url("postgres://x") and not is_postgres_url("chatdb") and not is_postgres_url(None)
    assert mask_url_password("chatdb") == "chatdb" and mask_url_password("postgresql://a@h/d") == "postgresql://a@h/d"
    with pytest.raises(InvalidStoreUrl):
        PgUrl.parse("http://example.com/")


def test_ktulhu_config_masks_the_password(server_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KTULHU_")}
    env["KTULHU_STORE"] = f"postgresql://ktulhu:{SECRET}@db.internal/chats"
    result = subprocess.run([str(Path(sys.executable).parent / "ktulhu"), "config"], cwd=server_dir, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "postgresql://ktulhu:***@db.internal/chats" in result.stdout
