"""Redis addresses: ``redis://[user[:password]@]host[:port][/db]?name=N``,
``rediss://...`` (TLS), ``redis+unix://[user[:password]@]/path/to.sock?db=0&name=N``.

``name`` picks the hub on that server (default ``clusterhub``): letters,
digits and ``_.-``.  The password never appears in :attr:`RedisURL.text`
(what ``hub.address`` reads back), ``repr`` or logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

SCHEMES = ("redis", "rediss", "redis+unix")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def is_redis(address: object) -> bool:
    return isinstance(address, str) and address.split("://", 1)[0].lower() in SCHEMES and "://" in address


@dataclass(frozen=True)
class RedisURL:
    text: str  # the address without its password
    name: str  # the hub's name on the server
    kwargs: dict[str, Any] = field(repr=False, compare=False)  # for redis.ConnectionPool (has the password)

    def __repr__(self) -> str:
        return f"RedisURL({self.text!r})"


def parse(address: str) -> RedisURL:
    """Check a Redis address; ValueError saying what is wrong."""
    if not is_redis(address):
        raise ValueError(f"not a Redis address: {address!r}")
    u = urlsplit(address)
    scheme = u.scheme.lower()
    q = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    unknown = set(q) - {"name", "db"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} in a Redis address (known: name, db)")
    name = q.get("name", "clusterhub")
    if not _NAME.match(name):
        raise ValueError(f"name={name!r}: 1 to 64 letters, digits, '_', '.' or '-'")
    kw: dict[str, Any] = {}
    if u.username:
        kw["username"] = unquote(u.username)
    if u.password is not None:
        kw["password"] = unquote(u.password)
    user = f"{u.username}@" if u.username else ""
    if scheme == "redis+unix":
        if not u.path or u.hostname:
            raise ValueError("redis+unix:// takes a socket path: redis+unix:///path/to/redis.sock?name=N")
        kw["unix_socket_path"] = unquote(u.path)
        db = q.get("db", "0")
    else:
        if not u.hostname:
            raise ValueError(f"{scheme}:// needs a host: {scheme}://host:6379/0?name=N")
        try:
            port = u.port or 6379
        except ValueError:
            raise ValueError(f"bad port in a Redis address: {u.netloc.rsplit('@', 1)[-1]!r}") from None
        if "db" in q and u.path not in ("", "/"):
            raise ValueError("give the database once: in the path or as db=")
        db = q.get("db") or u.path.lstrip("/") or "0"
        kw.update(host=u.hostname, port=port)
        if scheme == "rediss":
            kw["ssl"] = True
    if not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    kw["db"] = int(db)
    if scheme == "redis+unix":
        text = f"redis+unix://{user}{u.path}?db={db}&name={name}"
    else:
        host = f"[{u.hostname}]" if ":" in (u.hostname or "") else u.hostname
        text = f"{scheme}://{user}{host}:{kw['port']}/{db}?name={name}"
    return RedisURL(text, name, kw)
