"""Dialects: one small class of driver verbs per DB-API driver, and a generic fallback.

The pool picks the dialect from the package that defines the connection's class (walking the
class's bases, so subclasses of a driver's connection are recognised); ``Pool(dialect=...)``
overrides the choice with a :class:`Dialect` instance or one of the names in :data:`NAMES`.
"""

from __future__ import annotations

from typing import Any

from .base import Dialect, TxState
from .psycopg import PsycopgDialect
from .psycopg2 import Psycopg2Dialect
from .pymssql import PymssqlDialect
from .pymysql import MySQLdbDialect, PyMySQLDialect
from .sqlite import SQLiteDialect

__all__ = ["Dialect", "TxState", "NAMES", "get", "for_connection"]

_DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        Dialect(),
        PsycopgDialect(),
        Psycopg2Dialect(),
        PyMySQLDialect(),
        MySQLdbDialect(),
        PymssqlDialect(),
        SQLiteDialect(),
    )
}

#: The names accepted by :func:`get` and by ``Pool(dialect=...)``.
NAMES = tuple(sorted(_DIALECTS))

# Top-level package of a connection class -> dialect name.
_BY_PACKAGE = {
    "psycopg": "psycopg",
    "psycopg2": "psycopg2",
    "pymysql": "pymysql",
    "MySQLdb": "mysqlclient",
    "pymssql": "pymssql",
    "sqlite3": "sqlite3",
}

_by_type: dict[type, Dialect] = {}


def get(name: str) -> Dialect:
    """The dialect registered under ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return _DIALECTS[name]
    except KeyError:
        raise ValueError(
            f"unknown dialect {name!r}: use one of {', '.join(NAMES)}, or a Dialect instance"
        ) from None


def for_connection(conn: Any) -> Dialect:
    """The dialect for a driver connection, from the package that defines its class."""
    cls = type(conn)
    dialect = _by_type.get(cls)
    if dialect is None:
        dialect = _DIALECTS["generic"]
        for klass in cls.__mro__:
            name = _BY_PACKAGE.get(klass.__module__.partition(".")[0])
            if name is not None:
                dialect = _DIALECTS[name]
                break
        _by_type[cls] = dialect
    return dialect
