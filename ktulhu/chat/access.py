"""Who may use which chat (PRODUCT.md, "Identity and ownership").

- A signed-in user's chats are theirs alone (and the admin's).
- An anonymous chat (no owner) is reachable through its chat id: a random UUID acts as the
  capability for that one thread, so anyone holding the id may read and continue it.
- Listings by device are not capabilities (a device hash is guessable): they need the admin, a user
  who signed in on that device, or the single-user opt-in `KTULHU_OPEN_LISTINGS=1`.
"""

from __future__ import annotations

from ..auth.principal import Principal
from ..nurseries.runtime import Runtime
from ..store.records import Chat

__all__ = ["may_list_device", "may_use_chat", "visible_chats"]


def may_use_chat(principal: Principal, chat: Chat | None) -> bool:
    """Read, continue, edit or delete `chat` (None: the chat does not exist yet, so anyone may create it)."""
    if chat is None or principal.is_admin or chat.user_id is None:
        return True
    return principal.user_id == chat.user_id


async def may_list_device(runtime: Runtime, principal: Principal, device_hash: str) -> bool:
    if principal.is_admin or runtime.settings.open_listings:
        return True
    if principal.user_id is None or not device_hash:
        return False
    assert runtime.store is not None
    devices = await runtime.store.aio.find_devices_by_hash(device_hash)
    return any(d.user_id == principal.user_id for d in devices)


def visible_chats(principal: Principal, chats: list[Chat]) -> list[Chat]:
    return [c for c in chats if may_use_chat(principal, c)]
