"""How setting values are printed (`ktulhu config`, error messages): secrets masked, passwords cut
out of store URLs, so that neither a listing nor a refusal to start leaks a credential."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["mask", "quoted", "show_store", "shown"]


def mask(value: str) -> str:
    """A secret's length only: enough to tell set from unset, and a truncated paste."""
    if not value:
        return ""
    return f"***({len(value)} chars)"


def show_store(value: object) -> str:
    """KTULHU_STORE with the password of a PostgreSQL URL masked (a directory is shown as is)."""
    # imported here: the `ktulhu.store` package loads its database drivers
    from ..store.location import mask_url_password

    return mask_url_password(str(value))


def shown(field: attrs.Attribute, value: Any) -> str:
    """`value` (raw or parsed) of a setting `field` as it may be printed: its own `show` when only parts
    of it are secret, masked when it is a secret, else as text."""
    if field.metadata["show"] is not None:
        return field.metadata["show"](value)
    if field.metadata["secret"]:
        return mask(value)
    return "" if value is None else str(value)


def quoted(field: attrs.Attribute, raw: str) -> str:
    """A rejected raw value for an error message: quoted, except a mask (it is not the value)."""
    masked = field.metadata["secret"] and field.metadata["show"] is None
    return shown(field, raw) if masked else repr(shown(field, raw))
