"""pymssql (SQL Server)."""

from __future__ import annotations

from typing import Any

from .base import Dialect, TxState


class PymssqlDialect(Dialect):
    """pymssql has no local transaction flag: the lease's record of statements decides."""

    name = "pymssql"

    def transaction_state(self, conn: Any) -> TxState:
        try:
            connected = conn._conn.connected
        except Exception:  # pymssql refuses to reach a closed connection's socket
            return TxState.BROKEN
        return TxState.UNKNOWN if connected else TxState.BROKEN

    def client_settings(self, conn: Any) -> object:
        return conn.autocommit_state

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit(settings)

    def detach_after_fork(self, conn: Any) -> None:
        # FreeTDS has no file descriptor to reach from Python; the pool keeps the inherited
        # connection referenced forever in the child so its finalizer never runs.
        pass
