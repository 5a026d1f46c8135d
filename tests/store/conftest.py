"""Fixtures: a fresh store, and a `chatdb/` written in the original server's exact layout and JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from ktulhu.store import Store

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
    return {k: v for k, v in store._rdict().items() if k.startswith(prefix)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "chatdb")
    yield s
    s.close()


@pytest.fixture
def legacy_path(tmp_path: Path) -> Path:
    path = tmp_path / "legacy-chatdb"
    write_legacy_db(path)
    return path
