"""PyMySQL (MySQL and MariaDB)."""

from __future__ import annotations

import math
import socket
from typing import Any, Callable

from ..isolation import Isolation
from .base import (
    BROKEN,
    BUSY,
    IDLE,
    IN_TRANSACTION,
    UNKNOWN,
    Dialect,
    TxState,
    _execute,
    is_database_error,
    milliseconds,
)

_RETRYABLE_ERRORS = frozenset({1213, 1205})  # ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT
# CR_SERVER_GONE_ERROR, CR_SERVER_LOST, CR_SERVER_LOST_EXTENDED
_DISCONNECT_ERRORS = frozenset({2006, 2013, 2055})


class _MySQLTransactions:
    """Transaction verbs shared by the MySQL drivers (PyMySQL and mysqlclient)."""

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        pass  # every level, and read-only

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        if isolation is not None:  # without SESSION: for the next transaction only
            _execute(conn, f"SET TRANSACTION ISOLATION LEVEL {isolation.value}")
        try:
            _execute(conn, "START TRANSACTION READ ONLY" if readonly else "START TRANSACTION")
        except Exception:
            if isolation is not None:  # the one-time level would apply to the next one
                conn.rollback()
            raise
        return None

    def limit_time(self, conn: Any, seconds: float) -> Any:
        # MariaDB bounds every statement (max_statement_time, seconds); MySQL only SELECTs
        # (max_execution_time, milliseconds).  Lock waits: whole seconds, at least 1.
        if "MariaDB" in conn.get_server_info():
            variable, value = "max_statement_time", max(seconds, 0.001)
        else:
            variable, value = "max_execution_time", milliseconds(seconds)
        [previous] = _execute(
            conn, f"SELECT @@session.innodb_lock_wait_timeout, @@session.{variable}"
        )
        _execute(
            conn,
            f"SET SESSION innodb_lock_wait_timeout = %s, {variable} = %s",
            (max(1, math.ceil(seconds)), value),
        )
        return variable, previous

    def unlimit_time(self, conn: Any, token: Any) -> None:
        variable, (lock_wait, statement) = token
        _execute(
            conn,
            f"SET SESSION innodb_lock_wait_timeout = %s, {variable} = %s",
            (lock_wait, statement),
        )

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        # KILL QUERY stops the statement and leaves the session usable.
        side = side_connect()
        try:
            _execute(side, "KILL QUERY %s", (conn.thread_id(),))
        finally:
            side.close()

    def is_retryable(self, exc: BaseException) -> bool:
        return is_database_error(exc) and bool(exc.args) and exc.args[0] in _RETRYABLE_ERRORS

    def is_disconnect(self, exc: BaseException) -> bool:
        # mysqlclient keeps `open` true after a lost connection: its error code says it
        return is_database_error(exc) and bool(exc.args) and exc.args[0] in _DISCONNECT_ERRORS


_IN_TRANS = 0x0001  # SERVER_STATUS_IN_TRANS
_AUTOCOMMIT = 0x0002  # SERVER_STATUS_AUTOCOMMIT
_COM_RESET_CONNECTION = 0x1F  # MySQL 5.7.3+, MariaDB 10.2.4+


class PyMySQLDialect(_MySQLTransactions, Dialect):
    name = "pymysql"

    def transaction_state(self, conn: Any) -> TxState:
        if not conn.open:
            return BROKEN
        result = conn._result
        if result is not None and result.unbuffered_active:
            return BUSY
        status = conn.server_status or 0
        if status & _IN_TRANS:
            return IN_TRANSACTION
        if status & _AUTOCOMMIT:
            return IDLE
        # With autocommit off, a plain read opens a consistent snapshot that MariaDB does not
        # report in the status flags: only the lease's record of statements can tell.
        return UNKNOWN

    def client_settings(self, conn: Any) -> object:
        return bool((conn.server_status or 0) & _AUTOCOMMIT)

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit(settings)

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)

    def sever(self, conn: Any) -> None:
        sock = conn._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more

    can_reset_session = True

    def reset_session(self, conn: Any) -> None:
        # COM_RESET_CONNECTION: the session as if new, without authenticating again.  It also
        # resets the character set, sql_mode and autocommit to the server's defaults, so what
        # PyMySQL set up when it connected is applied again, as it did then.
        conn._execute_command(_COM_RESET_CONNECTION, b"")
        conn._read_ok_packet()
        conn.set_character_set(conn.charset, conn.collation)
        if conn.sql_mode is not None:
            _execute(conn, "SET sql_mode=%s", (conn.sql_mode,))
        if conn.init_command is not None:
            _execute(conn, conn.init_command)
        if conn.autocommit_mode is not None:
            conn.autocommit(conn.autocommit_mode)


class MySQLdbDialect(_MySQLTransactions, Dialect):
    """mysqlclient: no local transaction flag, so the lease's record decides."""

    name = "mysqlclient"

    def transaction_state(self, conn: Any) -> TxState:
        return UNKNOWN if conn.open else BROKEN

    def client_settings(self, conn: Any) -> object:
        return conn.get_autocommit()

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit(settings)

    def ping(self, conn: Any) -> None:
        conn.ping()
