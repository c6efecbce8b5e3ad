"""Database URLs for the real test servers, built from the DSNs the fixtures in conftest.py use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

_PG_URL_PARTS = ("host", "port", "user", "password", "dbname")
_MYSQL_URL_PARTS = ("host", "port", "user", "password", "database")


def _url(
    scheme: str, parts: Mapping[str, Any], query: Mapping[str, Any], password: str | None
) -> str:
    user = quote(str(parts.get("user") or ""), safe="")
    secret = password if password is not None else parts.get("password")
    userinfo = user + (f":{quote(str(secret), safe='')}" if secret else "")
    host = parts.get("host") or ""
    netloc = (f"{userinfo}@" if userinfo else "") + quote(str(host), safe="")
    if parts.get("port"):
        netloc += f":{parts['port']}"
    database = parts.get("dbname") or parts.get("database") or ""
    tail = "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in query.items())
    return f"{scheme}://{netloc}/{quote(str(database), safe='')}" + (f"?{tail}" if tail else "")


def postgresql_url(dsn: str, *, password: str | None = None) -> str:
    """A ``postgresql://`` URL for a libpq DSN; ``password`` replaces the DSN's."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    query = {k: v for k, v in params.items() if k not in _PG_URL_PARTS}
    return _url("postgresql", params, query, password)


def mysql_url(params: Mapping[str, Any], *, password: str | None = None) -> str:
    """A ``mysql://`` URL for PyMySQL connect arguments; ``password`` replaces theirs."""
    query = {k: v for k, v in params.items() if k not in _MYSQL_URL_PARTS}
    return _url("mysql", params, query, password)
