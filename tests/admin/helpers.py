"""Shared helpers for admin tests: credentials, seeded records and Basic headers."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

from ktulhu.auth.admin import write_admin_credentials
from ktulhu.store.records import Chat, Message, User, now_ms

ADMIN_USER = "root"
ADMIN_PASSWORD = "correct horse battery staple"
XSS = '<img src=x onerror="window.__xss=1">'
XSS_SCRIPT = "<script>window.__xss=1</script>"


def basic(user: str = ADMIN_USER, password: str = ADMIN_PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def write_credentials(root: Path) -> Path:
    path = root / "config" / "internal_admin_auth.json"
    write_admin_credentials(path, ADMIN_USER, ADMIN_PASSWORD)
    return path


async def seed(runtime, *, hostile: bool = True) -> dict[str, str]:
    """Two users, a device, a chat with a classified user message, a reply and a summary.

    With `hostile`, every free-text field an attacker controls carries an XSS payload."""
    store = runtime.store
    now = now_ms()
    payload = XSS if hostile else "plain"
    user = User(id=uuid.uuid4().hex, name=f"Mallory {payload}", created_ts=now,
                email=f"m{uuid.uuid4().hex[:6]}@example.com{XSS_SCRIPT if hostile else ''}",
                stripe_customer_id="cus_123", role="free", generation_count=3)
    other = User(id=uuid.uuid4().hex, name="Alice", created_ts=now - 1000, email="alice@example.com", role="paid")
    await store.aio.save_user(user)
    await store.aio.save_user(other)
    device_hash = "dev" + uuid.uuid4().hex[:8]
    await store.aio.add_device_for_user(user.id, device_hash)
    chat_id = str(uuid.uuid4())
    await store.aio.save_chat(Chat(id=chat_id, title=f"Title {payload}", user_id=None, device_hash=device_hash,
                                   updated_ts=now, meta={}))
    meta = {"classifier": {"speech_act": {"label": f"QUESTION{payload}", "score": 0.91234},
                           "domain": {"label": "technical", "score": 0.8}, "expectation": {"label": "EXPLAIN", "score": 0.7},
                           "phatic": None, "support": {"label": "no", "score": 0.6}},
            "intent": {"language": "en", "prompt_key": f"tech_explain{payload}", "routing_path": "ModelHeads",
                       "final_intent_kind": "Task", "support_intent": False}}
    await store.aio.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role="user",
                                         text=f"hello {payload} {XSS_SCRIPT if hostile else ''}",
                                         language="en", ts=now, meta=meta, device_hash=device_hash))
    await store.aio.save_message(Message(id=str(uuid.uuid4()), chat_id=chat_id, role="assistant",
                                         text=f"reply {payload}", language="en", ts=now + 1, liked=True))
    await store.aio.replace_summary(chat_id, f"Summary {payload}", language="en")
    return {"user_id": user.id, "other_id": other.id, "chat_id": chat_id, "device_hash": device_hash,
            "email": user.email}
