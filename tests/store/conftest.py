"""Fixtures: a fresh store on each engine, and a `chatdb/` written in the original server's exact
layout and JSON.

The whole suite runs against both engines: `engine` is parametrized over RocksDB and PostgreSQL
(a real server, `tests/postgres.py`, one fresh database per store). A module whose tests are about
RocksDB itself overrides `engine` with a plain fixture returning "rocksdb" and says why.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from ktulhu.store import Store

ENGINES = ["rocksdb", "postgresql"]
Location = Path | str

# Records exactly as the original (serde_json, compact, all optional fields as null) wrote them.
LEGACY_MESSAGES = [
    # chat c-legacy-1: prompt and reply within the same second; the reply's id sorts first
    ("c-legacy-1", 1700000000, "zz-prompt",
     b'{"id":"zz-prompt","chat_id":"c-legacy-1","session_id":"s1","user_id":null,"device_hash":"dev-a",'
     b'"role":"user","text":"\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82","language":"ru","attachments":[{"id":"att1",'
     b'"filename":"cat.png","mime_type":"image/png","preview_base64":null,"path":null,"size":null,'
     b'"description":"a cat","ocr_text":null,"labels":["cat"]}],"liked":false,"ts":1700000000,'
     b'"meta":{"classifier":{"speech_act":{"label":"question","score":0.9}},"intent":{"language":"ru"}}}'),
    ("c-legacy-1", 1700000001, "aa-reply",
     b'{"id":"aa-reply","chat_id":"c-legacy-1","session_id":"s1","user_id":null,"device_hash":"dev-a",'
     b'"role":"assistant","text":"Hello","language":"ru","attachments":[],"liked":true,"ts":1700000001,"meta":null}'),
    ("c-legacy-1", 1700000002, "sum-1",
     b'{"id":"sum-1","chat_id":"c-legacy-1","session_id":null,"user_id":null,"device_hash":null,'
     b'"role":"summary","text":"Greeting","language":null,"attachments":[],"liked":false,"ts":1700000002,"meta":null}'),
    # an older record with serde defaults missing (language, attachments, liked, meta)
    ("c-legacy-2", 1690000000, "old-1",
     b'{"id":"old-1","chat_id":"c-legacy-2","session_id":null,"user_id":null,"device_hash":"dev-b",'
     b'"role":"user","text":"hi","ts":1690000000}'),
]
LEGACY_CHATS = {
    "c-legacy-1": b'{"id":"c-legacy-1","title":null,"user_id":null,"device_hash":"dev-a","updated_ts":1700000002,'
                  b'"meta":{"has_summary":true}}',
    "c-legacy-2": b'{"id":"c-legacy-2","title":null,"user_id":null,"device_hash":"dev-b","updated_ts":1690000000,'
                  b'"meta":{}}',
}
LEGACY_USERS = {
    "u-legacy-1": b'{"id":"u-legacy-1","name":null,"external_id":"email:ann@example.com","created_ts":1690000000,'
                  b'"meta":{"email":"ann@example.com","auth_methods":["email"]},"email":"ann@example.com",'
                  b'"password_hash":"$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA","api_key":null,"api_secret":null,'
                  b'"generation_count":3,"role":"free","stripe_customer_id":null,"stripe_subscription_id":null}',
    # a Google user from before the stripe fields existed (serde defaults)
    "u-legacy-2": b'{"id":"u-legacy-2","name":null,"external_id":"google:1234","created_ts":1690000100,'
                  b'"meta":{"email":"bob@example.com","auth_methods":["google:1234"]},"email":"bob@example.com",'
                  b'"password_hash":null,"api_key":null,"api_secret":null}',
}
LEGACY_DEVICES = [
    ("u-legacy-1", "d0c1", b'{"id":"d0c1","user_id":"u-legacy-1","device_hash":"dev-a","created_ts":1690000000,'
                           b'"last_seen_ts":1690000000,"meta":null}'),
]


def write_legacy_db(path: Path) -> None:
    """Write a `chatdb/` the way the original server left it (no schema version, no ix: keys)."""
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    db = Rdict(str(path), options)
    for chat_id, ts, message_id, raw in LEGACY_MESSAGES:
        db[b"chat:%s:msg:%020d:%s" % (chat_id.encode(), ts, message_id.encode())] = raw
    for chat_id, raw in LEGACY_CHATS.items():
        db[b"chat:meta:" + chat_id.encode()] = raw
    for user_id, raw in LEGACY_USERS.items():
        db[b"user:" + user_id.encode()] = raw
    for user_id, device_id, raw in LEGACY_DEVICES:
        db[b"user_device:%s:%s" % (user_id.encode(), device_id.encode())] = raw
    db[b"device_lookup:dev-a"] = b"u-legacy-1"
    db[b"device_chat:dev-a:c-legacy-1"] = b"c-legacy-1"
    db[b"device_chat:dev-b:c-legacy-2"] = b"c-legacy-2"
    db[b"device_chat_index:built"] = b"1"
    db.close()


def dump(store: Store, prefix: bytes = b"") -> dict[bytes, bytes]:
    """Every key and value under `prefix`, on either engine."""
    return dict(store.scan(prefix))


def raw_put(store: Store, key: bytes, value: bytes) -> None:
    """Write bytes behind the operations' back (corrupt records, old versions), on either engine."""
    batch = store.batch()
    batch.put(key, value)
    store.write(batch)


def raw_delete(store: Store, key: bytes) -> None:
    batch = store.batch()
    batch.delete(key)
    store.write(batch)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def new_location(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Location]:
    """Makes fresh, empty store locations of the test's engine: directories, or new databases."""
    if engine == "rocksdb":
        numbers = itertools.count(1)
        return lambda: tmp_path / f"chatdb-{next(numbers)}"
    from tests.postgres import fresh_database

    server = request.getfixturevalue("postgres_server")
    return lambda: fresh_database(server)


@pytest.fixture
def location(new_location: Callable[[], Location]) -> Location:
    return new_location()


@pytest.fixture
def store(location: Location) -> Iterator[Store]:
    s = Store.open(location)
    yield s
    s.close()


@pytest.fixture
def legacy_path(tmp_path: Path) -> Path:
    path = tmp_path / "legacy-chatdb"
    write_legacy_db(path)
    return path


@pytest.fixture
def on_engine(engine: str, new_location: Callable[[], Location]) -> Callable[[Path], Location]:
    """`on_engine(directory)`: a RocksDB directory written with rocksdict (the original's layout) as
    a store of the test's engine: the directory itself, or a copy of it (`ktulhu store copy`) in a new
    PostgreSQL database, unmigrated like the original."""

    def convert(path: Path) -> Location:
        if engine == "rocksdb":
            return path
        from ktulhu.store.copy import copy_store

        url = new_location()
        assert copy_store(path, url, progress=False, out=_Discard()).verified
        return url

    return convert


@pytest.fixture
def legacy_location(legacy_path: Path, on_engine: Callable[[Path], Location]) -> Location:
    """The original server's `chatdb/` on the test's engine (schema 0: the first open migrates it)."""
    return on_engine(legacy_path)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
