"""Where a store is: a RocksDB directory, or a PostgreSQL URL (``postgresql://user:pass@host:port/db``).

`PgUrl` keeps the full URL (to connect) apart from what may be shown: `display` names host, port and
database but never the password, and `redact` scrubs the password out of any text (libpq's errors
can quote the URL they failed to parse). Importing this module does not import psycopg.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import attrs

__all__ = ["InvalidStoreUrl", "PgUrl", "is_postgres_url", "looks_like_url", "mask_url_password"]

SCHEMES = ("postgresql", "postgres")
DEFAULT_PORT = 5432
_URL = re.compile(r"\A([A-Za-z][A-Za-z0-9+.-]*)://")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class InvalidStoreUrl(ValueError):
    """The store URL cannot be used; the message says why and never contains the password."""


def looks_like_url(value: str) -> bool:
    return _URL.match(value.strip()) is not None


def is_postgres_url(value: object) -> bool:
    if not isinstance(value, str):
        return False
    match = _URL.match(value.strip())
    return match is not None and match.group(1).lower() in SCHEMES


def mask_url_password(value: str) -> str:
    """`value` with the password of a URL in it replaced by ``***`` (anything else unchanged)."""
    match = re.match(r"\A([A-Za-z][A-Za-z0-9+.-]*://)([^@/?#]*)@", value.strip())
    if match is None or ":" not in match.group(2):
        return value
    user = match.group(2).split(":", 1)[0]
    return match.group(1) + user + ":***@" + value.strip()[match.end():]


@attrs.frozen
class PgUrl:
    """A parsed ``postgresql://`` URL. `str()` is `display`; the password is only in `url`."""

    url: str = attrs.field(repr=False)
    display: str
    host: str
    port: int
    dbname: str
    user: str | None
    _secrets: tuple[str, ...] = attrs.field(repr=False, alias="_secrets")

    def __str__(self) -> str:
        return self.display

    @classmethod
    def parse(cls, url: str) -> "PgUrl":
        """Check the URL's shape (scheme, user, hosts and ports, database, parameters); raises
        `InvalidStoreUrl`. Reachability is checked when the store opens."""
        url = url.strip()
        match = _URL.match(url)
        if match is None or match.group(1).lower() not in SCHEMES:
            raise InvalidStoreUrl("not a postgresql:// URL")
        url = match.group(1).lower() + url[len(match.group(1)):]  # libpq wants the scheme in lower case
        rest = url[match.end():]
        if "#" in rest:
            raise InvalidStoreUrl("a store URL has no #fragment")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        password_raw = ""
        if "@" in netloc:
            userinfo, hosts = netloc.rsplit("@", 1)
            user_raw, _, password_raw = userinfo.partition(":")
        else:
            user_raw, hosts = "", netloc
        secrets = tuple(s for s in (url, password_raw, unquote(password_raw)) if s)
        for part, what in ((user_raw, "user name"), (password_raw, "password"), (path, "database name"),
                           (hosts, "host"), (query, "parameters")):
            if _BAD_PERCENT.search(part):
                raise InvalidStoreUrl(f"the {what} has a % that is not followed by two hex digits; "
                                      "percent-encode special characters (e.g. %40 for @)")
        for entry in hosts.split(",") if hosts else []:
            host, port = _split_host(entry)
            if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
                raise InvalidStoreUrl(f"the port {port[:20]!r} of host {host[:80]!r} is not a number from 1 to 65535")
        if "/" in unquote(path):
            raise InvalidStoreUrl("the database name contains '/'; the URL ends with /DATABASE")
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(url)
        except ProgrammingError as error:
            text = " ".join(str(error).split())
            for secret in secrets:
                text = text.replace(secret, "***")
            raise InvalidStoreUrl(text) from None
        host = str(params.get("host") or "localhost")
        port_text = str(params.get("port") or DEFAULT_PORT)
        if not all(p.isdigit() for p in port_text.split(",")):
            raise InvalidStoreUrl(f"the port {port_text[:20]!r} is not a number from 1 to 65535")
        user = params.get("user")
        dbname = str(params.get("dbname") or user or "postgres")
        port = int(port_text.split(",")[0])
        shown_user = f"{user}@" if user else ""
        shown_port = "" if "," in host else f":{port_text}"
        if host.startswith("/"):  # a unix socket directory
            display = f"postgresql://{shown_user}{shown_port.lstrip(':') and 'localhost' + shown_port}/{dbname}?host={host}"
        else:
            display = f"postgresql://{shown_user}{host}{shown_port}/{dbname}"
        return cls(url=url, display=display, host=host, port=port, dbname=dbname,
                   user=None if user is None else str(user), _secrets=secrets)

    def redact(self, text: str) -> str:
        """`text` with the URL shown as `display` and the password as ``***``."""
        text = text.replace(self.url, self.display)
        for secret in self._secrets[1:]:
            text = text.replace(secret, "***")
        return text


def _split_host(entry: str) -> tuple[str, str | None]:
    if entry.startswith("["):
        host, _, tail = entry.partition("]")
        return host + "]", tail[1:] if tail.startswith(":") else None
    host, sep, port = entry.rpartition(":")
    return (host, port) if sep else (entry, None)
