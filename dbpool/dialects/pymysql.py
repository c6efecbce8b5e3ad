"""PyMySQL (MySQL and MariaDB)."""

from __future__ import annotations

from typing import Any

from .base import Dialect, TxState

_IN_TRANS = 0x0001  # SERVER_STATUS_IN_TRANS
_AUTOCOMMIT = 0x0002  # SERVER_STATUS_AUTOCOMMIT


class PyMySQLDialect(Dialect):
    name = "pymysql"

    def transaction_state(self, conn: Any) -> TxState:
        if not conn.open:
            return TxState.BROKEN
        result = conn._result
        if result is not None and result.unbuffered_active:
            return TxState.BUSY
        status = conn.server_status or 0
        if status & _IN_TRANS:
            return TxState.IN_TRANSACTION
        if status & _AUTOCOMMIT:
            return TxState.IDLE
        # With autocommit off, a plain read opens a consistent snapshot that MariaDB does not
        # report in the status flags: only the lease's record of statements can tell.
        return TxState.UNKNOWN

    def client_settings(self, conn: Any) -> object:
        return bool((conn.server_status or 0) & _AUTOCOMMIT)

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit(settings)

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)


class MySQLdbDialect(Dialect):
    """mysqlclient: no local transaction flag, so the lease's record decides."""

    name = "mysqlclient"

    def transaction_state(self, conn: Any) -> TxState:
        return TxState.UNKNOWN if conn.open else TxState.BROKEN

    def client_settings(self, conn: Any) -> object:
        return conn.get_autocommit()

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit(settings)

    def ping(self, conn: Any) -> None:
        conn.ping()
