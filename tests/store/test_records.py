"""The JSON codec: the original's field names and shapes, round trips, corrupt input rejected."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktulhu.store.errors import CorruptRecord
from ktulhu.store.codec import decode, encode
from ktulhu.store.records import (
    ApiKey, Chat, Message, MessageAttachment, RateBucket, StripeEvent, User, UserDevice, ts_ms,
)

from .conftest import LEGACY_CHATS, LEGACY_DEVICES, LEGACY_MESSAGES, LEGACY_USERS

text = st.text(max_size=30)
opt_text = st.none() | text
ints = st.integers(min_value=-(2**53), max_value=2**53)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
extra = st.dictionaries(st.text(min_size=1, max_size=8).map(lambda s: "x_" + s), json_value, max_size=2)

attachments = st.builds(
    MessageAttachment, id=text, filename=text, mime_type=opt_text, preview_base64=opt_text, path=opt_text,
    size=st.none() | ints, description=opt_text, ocr_text=opt_text, labels=st.lists(text, max_size=3), extra=extra,
)
messages = st.builds(
    Message, id=text, chat_id=text, session_id=opt_text, user_id=opt_text, device_hash=opt_text,
    role=st.sampled_from(["user", "assistant", "summary", "system"]), text=opt_text, language=opt_text,
    attachments=st.lists(attachments, max_size=2), liked=st.booleans(), ts=ints, meta=json_value,
    seq=st.none() | st.integers(0, 10**12), extra=extra,
)
chats = st.builds(Chat, id=text, title=opt_text, user_id=opt_text, device_hash=opt_text, updated_ts=ints,
                  meta=json_value, extra=extra)
users = st.builds(
    User, id=text, name=opt_text, external_id=opt_text, created_ts=ints, meta=json_value, email=opt_text,
    password_hash=opt_text, api_key=opt_text, api_secret=opt_text, generation_count=ints,
    role=st.sampled_from(["free", "paid", "admin"]), stripe_customer_id=opt_text,
    stripe_subscription_id=opt_text, extra=extra,
)
devices = st.builds(UserDevice, id=text, user_id=text, device_hash=text, created_ts=ints, last_seen_ts=ints,
                    meta=json_value, extra=extra)
api_keys = st.builds(ApiKey, id=text, user_id=text, secret_hash=text, created_ts=ints, name=opt_text,
                     last_used_ts=st.none() | ints, revoked=st.booleans(), extra=extra)
others = (st.builds(StripeEvent, id=text, type=text, received_ts=ints, extra=extra)
          | st.builds(RateBucket, tokens=st.floats(0, 1e6), updated_ts=ints, extra=extra))


@settings(max_examples=150)
@given(st.one_of(messages, chats, users, devices, api_keys, others))
def test_round_trip(record: object) -> None:
    raw = encode(record)
    assert decode(type(record), raw) == record
    assert encode(decode(type(record), raw)) == raw


@pytest.mark.parametrize(
    "cls,raw",
    [(Message, raw) for *_, raw in LEGACY_MESSAGES]
    + [(Chat, raw) for raw in LEGACY_CHATS.values()]
    + [(User, raw) for raw in LEGACY_USERS.values()]
    + [(UserDevice, raw) for *_, raw in LEGACY_DEVICES],
)
def test_original_records_decode(cls: type, raw: bytes) -> None:
    record = decode(cls, raw)
    original = json.loads(raw)
    re_encoded = json.loads(encode(record))
    # every field the original wrote comes back unchanged; missing serde-default fields are filled in
    assert {k: re_encoded[k] for k in original} == original


def test_complete_original_record_re_encodes_byte_for_byte() -> None:
    raw = LEGACY_MESSAGES[1][3]
    assert encode(decode(Message, raw)) == raw
    assert encode(decode(User, LEGACY_USERS["u-legacy-1"])) == LEGACY_USERS["u-legacy-1"]


def test_serde_defaults_fill_missing_fields() -> None:
    message = decode(Message, LEGACY_MESSAGES[3][3])
    assert (message.language, message.attachments, message.liked, message.meta) == (None, [], False, None)
    user = decode(User, LEGACY_USERS["u-legacy-2"])
    assert (user.generation_count, user.role, user.stripe_customer_id) == (0, "free", None)
    assert user.provider_ids() == ["google:1234"]


def test_optional_fields_are_written_as_null_new_fields_only_when_set() -> None:
    data = json.loads(encode(Message(id="m", chat_id="c", role="user", ts=1)))
    assert data["text"] is None and data["meta"] is None and "seq" not in data
    assert json.loads(encode(Message(id="m", chat_id="c", role="user", ts=1, seq=4)))["seq"] == 4


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'"x"', b'{"chat_id":"c","role":"user","ts":1}', b'{"id":1,"chat_id":"c","role":"user","ts":1}',
     b'{"id":"m","chat_id":"c","role":"user","ts":"soon"}', b'{"id":"m","chat_id":"c","role":"user","ts":true}',
     b'{"id":"m","chat_id":"c","role":"user","ts":1,"attachments":[{"id":"a"}]}', b"\xff\xfe"],
)
def test_corrupt_values_raise_corrupt_record(raw: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode(Message, raw)


def test_ts_ms_reads_seconds_and_milliseconds() -> None:
    assert ts_ms(1_700_000_000) == 1_700_000_000_000
    assert ts_ms(1_700_000_000_123) == 1_700_000_000_123
