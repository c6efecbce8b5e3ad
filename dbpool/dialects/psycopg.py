"""psycopg 3."""

from __future__ import annotations

from typing import Any

from .base import Dialect, TxState

# psycopg.pq.TransactionStatus values, kept as ints so the return path needs no import.
_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)


class PsycopgDialect(Dialect):
    name = "psycopg"

    def transaction_state(self, conn: Any) -> TxState:
        if conn.closed or conn.broken:
            return TxState.BROKEN
        status = conn.info.transaction_status
        if status == _IDLE:
            return TxState.IDLE
        if status == _INTRANS or status == _INERROR:
            return TxState.IN_TRANSACTION
        if status == _ACTIVE:
            return TxState.BUSY
        return TxState.BROKEN

    def client_settings(self, conn: Any) -> object:
        return (conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable)

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable = settings

    def ping(self, conn: Any) -> None:
        # An empty query is one round trip; in autocommit mode it opens no transaction.
        if conn.autocommit:
            conn.execute("")
            return
        conn.autocommit = True
        try:
            conn.execute("")
        finally:
            conn.autocommit = False

    def detach_after_fork(self, conn: Any) -> None:
        # psycopg's finalizer skips PQfinish in a process other than the one that connected.
        pass
