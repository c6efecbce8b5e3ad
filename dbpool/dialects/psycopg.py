"""psycopg 3."""

from __future__ import annotations

from typing import Any, Callable

from ..isolation import Isolation
from .base import BROKEN, BUSY, IDLE, IN_TRANSACTION, Dialect, TxState, milliseconds

_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
_LIMIT_TIME_SQL = (
    "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true), "
    "set_config('idle_in_transaction_session_timeout', %s, true)"
)


def _begin_sql(isolation: Isolation | None, readonly: bool) -> str:
    sql = "BEGIN"
    if isolation is not None:
        sql += f" ISOLATION LEVEL {isolation.value}"
    return sql + " READ ONLY" if readonly else sql


# psycopg.pq.TransactionStatus values, kept as ints so the return path needs no import.
_PQ_IDLE, _PQ_ACTIVE, _PQ_INTRANS, _PQ_INERROR, _PQ_UNKNOWN = range(5)
# What libpq's transaction status says (psycopg and psycopg2 both read it); UNKNOWN, or any
# other value, means closed or broken.
LIBPQ_STATES = {
    _PQ_IDLE: IDLE,
    _PQ_ACTIVE: BUSY,
    _PQ_INTRANS: IN_TRANSACTION,
    _PQ_INERROR: IN_TRANSACTION,
}


class PsycopgDialect(Dialect):
    name = "psycopg"
    limit_time_inside_transaction = True

    def transaction_state(self, conn: Any) -> TxState:
        # libpq's own status, read without the cost of conn.info: it says UNKNOWN for a
        # connection that is closed or broken.
        return LIBPQ_STATES.get(conn.pgconn.transaction_status, BROKEN)

    def transaction_aborted(self, conn: Any) -> bool:
        return bool(conn.pgconn.transaction_status == _PQ_INERROR)

    def client_settings(self, conn: Any) -> object:
        return (conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable)

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable = settings

    def fetches_as_it_goes(self, cursor: Any) -> bool:
        # A client-side cursor holds its rows, unless the connection is in pipeline mode
        # (fetching then syncs the pipeline); a server-side cursor has a name.
        return hasattr(cursor, "name") or cursor.connection.pgconn.pipeline_status != 0

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

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        pass  # every level, and read-only

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        if conn.autocommit:
            conn.execute(_begin_sql(isolation, readonly))
            return None
        # psycopg sends BEGIN itself before the next statement, with these settings in it.
        from psycopg import IsolationLevel

        token = (conn.isolation_level, conn.read_only)
        if isolation is not None:
            conn.isolation_level = IsolationLevel[isolation.name]
        if readonly:
            conn.read_only = True
        return token

    def end(self, conn: Any, token: Any) -> None:
        if token is not None:
            conn.isolation_level, conn.read_only = token

    def limit_time(self, conn: Any, seconds: float) -> Any:
        ms = str(milliseconds(seconds))
        conn.execute(_LIMIT_TIME_SQL, (ms, ms, ms))  # SET LOCAL: ends with the transaction
        return None

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        cancel = getattr(conn, "cancel_safe", None) or conn.cancel
        cancel()

    can_reset_session = True

    def reset_session(self, conn: Any) -> None:
        # DISCARD ALL refuses to run inside a transaction block; psycopg drops its cache of
        # prepared statements when it sees the command go through.
        if conn.autocommit:
            conn.execute("DISCARD ALL")
            return
        conn.autocommit = True
        try:
            conn.execute("DISCARD ALL")
        finally:
            conn.autocommit = False

    def is_retryable(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in _RETRYABLE_SQLSTATES

    def detach_after_fork(self, conn: Any) -> None:
        # psycopg's finalizer skips PQfinish in a process other than the one that connected.
        pass
