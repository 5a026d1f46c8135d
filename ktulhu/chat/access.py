"""Who may use which chat (PRODUCT.md, "Identity and ownership").

- A signed-in user's chats are theirs alone (and the admin's).
- An anonymous chat (no owner) is reachable through its chat id: a random UUID acts as the
  capability for that one thread, so anyone holding the id may read and continue it.
- Listings by device are not capabilities: the device hash is whatever a client sends (the web
  client's is a short, non-secret fingerprint), so it proves nothing. A signed-in user's device
  listing holds only that user's own chats; everything on a device needs the admin, or the
  single-user opt-in `KTULHU_OPEN_LISTINGS=1`. (Signing in with a device hash used to unlock that
  device's anonymous chats: anyone could register with a victim's hash and read them.)
- A chat whose stored record cannot be read belongs to nobody but the admin (fail closed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..auth.principal import Principal
from ..settings import Settings
from ..store.errors import CorruptRecord
from ..store.records import Chat

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["ChatForbidden", "chat_for", "listable_chats", "lists_everything", "may_use_chat"]


def may_use_chat(principal: Principal, chat: Chat | None) -> bool:
    """Read, continue, edit or delete `chat` (None: the chat does not exist yet, so anyone may create it)."""
    if chat is None or principal.is_admin or chat.user_id is None:
        return True
    return principal.user_id == chat.user_id


def lists_everything(settings: Settings, principal: Principal) -> bool:
    """Listings (by device, the sidebar) show every chat only to the admin or in single-user mode."""
    return principal.is_admin or settings.open_listings


def listable_chats(settings: Settings, principal: Principal, chats: list[Chat]) -> list[Chat]:
    """The chats of a listing the caller may see: all of them, or only their own."""
    if lists_everything(settings, principal):
        return chats
    return [c for c in chats if c.user_id is not None and c.user_id == principal.user_id]


class ChatForbidden(Exception):
    """The caller may not use this chat; the message says why (sent to the client)."""


async def chat_for(store: Store, principal: Principal, chat_id: str) -> Chat | None:
    """The chat if the caller may use it (None: it does not exist yet); else `ChatForbidden`.
    An unreadable record is the admin's alone, never "missing, so anyone may create it"."""
    try:
        chat = await store.aio.load_chat(chat_id, strict=True)
    except CorruptRecord:
        if principal.is_admin:
            return None
        raise ChatForbidden("this chat's stored record cannot be read; only the operator can open it") from None
    if not may_use_chat(principal, chat):
        raise ChatForbidden("this chat belongs to another account")
    return chat
