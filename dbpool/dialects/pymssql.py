"""pymssql (SQL Server)."""

from __future__ import annotations

import re
from typing import Any

from ..isolation import Isolation
from .base import (
    BROKEN,
    UNKNOWN,
    Dialect,
    TxState,
    _execute,
    _run,
    derives_from,
    is_database_error,
    milliseconds,
)

# Errors with which SQL Server rolls the whole transaction back, and that running it again may
# get past: the deadlock victim, a snapshot isolation update conflict, and memory-optimized
# tables' own (Microsoft's list for In-Memory OLTP, "Conflict Detection and Retry Logic"): their
# update conflict, the failures of their validation at COMMIT (repeatable read, serializable), a
# commit dependency failed or one too many, and their memory quota reached (at times transient).
_TRANSACTION_ABORTED = (
    1205,  # deadlock victim
    3960,  # snapshot isolation update conflict
    41301,  # a transaction this one took a commit dependency on failed to commit
    41302,  # memory-optimized update conflict
    41305,  # repeatable read validation failure, at COMMIT
    41325,  # serializable validation failure, at COMMIT
    41823,  # quota for memory-optimized tables reached
    41839,  # too many commit dependencies
    41840,  # quota for memory-optimized tables reached, in an elastic pool
)  # a tuple: compared by ==, whatever args[0] is

# pymssql's commit() sends COMMIT TRAN, then BEGIN TRAN, and wraps whatever either raised in an
# OperationalError of one argument, "Cannot commit transaction: " + str(args[0]) of that error
# (alike in pymssql 2.2.0 to 2.3.13).  For SQL Server's own error, an
# _mssql.MSSQLDatabaseException, args[0] is the pair (number, message as bytes).  None of the
# numbers above comes from BEGIN TRAN: with one of them, COMMIT failed and rolled back.
_COMMIT_FAILED = re.compile(r"Cannot commit transaction: \((\d+), b['\"].*\)", re.DOTALL)


def _error_number(exc: BaseException) -> object:
    """SQL Server's error number in ``exc``, or None.  pymssql's DB-API errors carry it as
    args[0] (cursor.execute() raises them with the number and the message as two arguments),
    except commit()'s, whose one argument is a message with the number inside (see
    _COMMIT_FAILED); its low-level _mssql.MSSQLDatabaseException, which cursor.executemany()
    with a batch_size above 1 lets through unwrapped, as ``number`` (its args[0] is the
    (number, message) pair)."""
    if is_database_error(exc):
        if len(exc.args) == 1 and isinstance(exc.args[0], str):
            return _number_in_commit_error(exc.args[0])
        return exc.args[0] if exc.args else None
    if derives_from(exc, "pymssql._mssql", "MSSQLDatabaseException"):
        return getattr(exc, "number", None)
    return None


def _number_in_commit_error(message: str) -> int | None:
    """The number of the SQL Server error that made pymssql's commit() fail, or None."""
    match = _COMMIT_FAILED.fullmatch(message)
    return int(match.group(1)) if match else None


# The session's isolation level and lock timeout, which SET changes for the whole session: read
# before a block changes them, and put back after it (a session sees its own row of
# sys.dm_exec_sessions with no extra permission).
_CURRENT_LEVEL = (
    "SELECT transaction_isolation_level FROM sys.dm_exec_sessions WHERE session_id = @@SPID"
)
_LEVELS = {
    1: "READ UNCOMMITTED",
    2: "READ COMMITTED",
    3: "REPEATABLE READ",
    4: "SERIALIZABLE",
    5: "SNAPSHOT",
}  # 0, unspecified: the server's default, READ COMMITTED
_CURRENT_LOCK_TIMEOUT = "SELECT @@LOCK_TIMEOUT"
_ROLLBACK_IF_OPEN = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION"
# With autocommit off pymssql keeps one transaction open (@@TRANCOUNT 1) and counts on it: its
# commit() sends COMMIT TRAN, which fails with none open.  A BEGIN TRAN statement nests one
# more, which commit() only lowers; a COMMIT statement leaves none.  Back to exactly one:
_ONE_OPEN = (
    "IF @@TRANCOUNT <> 1 BEGIN IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION; BEGIN TRANSACTION END"
)


class PymssqlDialect(Dialect):
    """pymssql has no local transaction flag: the lease's record of statements decides."""

    name = "pymssql"
    limit_time_inside_transaction = True  # pymssql always has a transaction open anyway

    def transaction_state(self, conn: Any) -> TxState:
        try:
            connected = conn._conn.connected
        except Exception:  # pymssql refuses to reach a closed connection's socket
            return BROKEN
        return UNKNOWN if connected else BROKEN

    def ping(self, conn: Any) -> None:
        # Through a cursor of tuples: a connection made with as_dict=True makes cursors that
        # refuse a result with an unnamed column (ColumnsWithoutNamesError), as SELECT 1's is.
        _run(conn.cursor(as_dict=False), "SELECT 1")
        conn.rollback()

    def rollback(self, conn: Any) -> None:
        if conn.autocommit_state:
            # pymssql's rollback() sends nothing with autocommit on; a BEGIN TRAN run as a
            # statement, or left open by a procedure that failed before its COMMIT, would keep
            # its work and locks for the next borrower, whose statements would run inside it.
            _execute(conn, _ROLLBACK_IF_OPEN)
        else:
            conn.rollback()  # ROLLBACK TRAN (every nested level), then BEGIN TRAN

    commit_may_leave_open = True

    def end_left_open(self, conn: Any) -> None:
        _execute(conn, _ROLLBACK_IF_OPEN if conn.autocommit_state else _ONE_OPEN)

    def client_settings(self, conn: Any) -> object:
        return conn.autocommit_state

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        conn.autocommit(settings)

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        if readonly:
            raise ValueError(
                "SQL Server has no read-only transactions: run without readonly=True, or "
                "connect with ApplicationIntent=ReadOnly to a readable secondary"
            )

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        # With autocommit off pymssql keeps a transaction open at all times; with it on,
        # each statement would commit alone, and commit() and rollback() do nothing: turn it
        # off for the block (BEGIN TRAN), and back on in end().  Every level; the level is
        # session-scoped, so end() puts back the one the session had (a configure hook's).
        autocommit = conn.autocommit_state
        if autocommit:
            conn.autocommit(False)
        previous = None  # the level to put back, if the block changed it
        if isolation is not None:
            try:
                [(number,)] = _run(conn.cursor(as_dict=False), _CURRENT_LEVEL)
                current = _LEVELS.get(number, "READ COMMITTED")
                if current != isolation.value:
                    _execute(conn, f"SET TRANSACTION ISOLATION LEVEL {isolation.value}")
                    previous = current
            except BaseException:
                if autocommit:
                    conn.autocommit(True)
                raise
        return (previous, autocommit)

    def end(self, conn: Any, token: Any) -> None:
        if token is None:  # begin() did not finish: it undid its own part
            return
        previous, autocommit = token
        if previous is not None:
            _execute(conn, f"SET TRANSACTION ISOLATION LEVEL {previous}")
        if autocommit:
            conn.autocommit(True)  # ROLLBACK TRAN: the transaction commit() began is empty

    def limit_time(self, conn: Any, seconds: float) -> Any:
        [(previous,)] = _run(conn.cursor(as_dict=False), _CURRENT_LOCK_TIMEOUT)
        # A tighter one of the session's stays: 0 is no wait at all, -1 no limit.
        limit = milliseconds(seconds)
        if 0 <= previous < limit:
            limit = previous
        _execute(conn, f"SET LOCK_TIMEOUT {int(limit)}")
        return int(previous)

    # SQL Server starts LOCK_TIMEOUT afresh for each lock wait, and no cancel stops one: a
    # statement starting late in the block gets the time left.  A round trip, so made at most
    # once per narrow_slack: a lock wait outlasts the deadline by a tenth of a second at most.
    narrows_time = True
    narrow_slack = 0.1

    def narrow_time(self, conn: Any, seconds: float) -> None:
        limit = int(milliseconds(seconds))  # never longer: a tighter one of the block's stays
        _execute(
            conn, f"IF @@LOCK_TIMEOUT < 0 OR @@LOCK_TIMEOUT > {limit} SET LOCK_TIMEOUT {limit}"
        )

    def unlimit_time(self, conn: Any, token: Any) -> None:
        _execute(conn, f"SET LOCK_TIMEOUT {int(token)}")

    def is_retryable(self, exc: BaseException) -> bool:
        return _error_number(exc) in _TRANSACTION_ABORTED

    def ended_transaction(self, conn: Any, exc: Exception) -> bool:
        return self.is_retryable(exc)  # each of them rolled the transaction back

    def savepoint(self, conn: Any, name: str) -> None:
        _execute(conn, f"SAVE TRANSACTION {name}")

    def release_savepoint(self, conn: Any, name: str) -> None:
        pass  # SQL Server has no RELEASE: the savepoint ends with the transaction

    def rollback_to_savepoint(self, conn: Any, name: str) -> None:
        _execute(conn, f"ROLLBACK TRANSACTION {name}")

    # pymssql has no cancel that another thread may call while a statement runs: its
    # _conn.cancel() clears the error and result state the running call is filling in, and
    # its dbcancel() reads the server's reply itself unless that call has begun to read; and
    # close() is dbclose(), which frees the DBPROCESS that call goes on using once its wait
    # (the GIL released) ends.  Nor does pymssql expose a socket to shut down.  A statement
    # past its deadline runs on, bounded by the server's LOCK_TIMEOUT (set for the block) and
    # pymssql's own timeout; the block then ends with TransactionTimeout.
    can_cancel = False
    closes_under_a_call = False

    def detach_after_fork(self, conn: Any) -> None:
        # FreeTDS has no file descriptor to reach from Python; the pool keeps the inherited
        # connection referenced forever in the child so its finalizer never runs.
        pass
