"""sqlite3 from the standard library."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

from .base import Dialect, TxState


class SQLiteDialect(Dialect):
    name = "sqlite3"

    def check_new(self, conn: Any) -> None:
        # sqlite3 has no public flag for check_same_thread: use the connection from another
        # thread once, as every pooled connection will be.
        refused: list[BaseException] = []

        def touch() -> None:
            try:
                conn.cursor().close()  # attribute reads are not checked; methods are
            except sqlite3.ProgrammingError as exc:
                refused.append(exc)

        probe = threading.Thread(target=touch, name="dbpool-sqlite-probe")
        probe.start()
        probe.join()
        if refused:
            raise TypeError(
                "a pooled sqlite3 connection is used by many threads: make it with "
                "sqlite3.connect(..., check_same_thread=False)"
            ) from refused[0]

    def transaction_state(self, conn: Any) -> TxState:
        try:
            in_transaction = conn.in_transaction
        except sqlite3.ProgrammingError:  # closed
            return TxState.BROKEN
        return TxState.IN_TRANSACTION if in_transaction else TxState.IDLE

    def client_settings(self, conn: Any) -> object:
        return conn.isolation_level

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.isolation_level = settings

    def ping(self, conn: Any) -> None:
        # The database is in-process: a usable handle is all there is to check.
        _ = conn.total_changes  # raises ProgrammingError once closed

    def detach_after_fork(self, conn: Any) -> None:
        pass
