"""psycopg2."""

from __future__ import annotations

from typing import Any

from .base import Dialect, TxState

_IDLE, _ACTIVE, _INTRANS, _INERROR, _UNKNOWN = range(5)


class Psycopg2Dialect(Dialect):
    name = "psycopg2"

    def transaction_state(self, conn: Any) -> TxState:
        if conn.closed:
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
        return (conn.autocommit, conn.isolation_level, conn.readonly, conn.deferrable)

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit, conn.isolation_level, conn.readonly, conn.deferrable = settings

    def ping(self, conn: Any) -> None:
        # psycopg2 sends BEGIN before the first statement unless in autocommit mode;
        # the autocommit switch itself is local.
        autocommit = conn.autocommit
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            conn.autocommit = autocommit
