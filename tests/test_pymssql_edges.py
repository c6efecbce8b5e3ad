"""Edge cases of the pymssql dialect, as used through the pool, against the fake driver's
pymssql flavour (there is no SQL Server here): what the return path must leave for the next
borrower, and how a failed COMMIT is read.  Each docstring says what pymssql or SQL Server does
that makes the case hard.
"""

from __future__ import annotations

from typing import Any

import pytest

import dbpool
from dbpool.dialects import PymssqlDialect
from tests import fakedb
from tests.conftest import assert_accounting

pytestmark = pytest.mark.timeout(30)

BOUND = 10.0


def test_pymssql_autocommit_pool_rolls_back_a_transaction_a_borrower_left_open(
    server: fakedb.Server,
) -> None:
    """With autocommit on, pymssql's rollback() sends nothing, yet a ``BEGIN TRAN`` run as a
    statement (or by a procedure that failed before its COMMIT) keeps a transaction open on
    the server: unless the return path ends it, the next borrower's statements run inside
    it, hold on to its locks, and are never committed."""

    def connect() -> fakedb.FakeMSSQLConnection:
        conn = server.connect_mssql()
        conn.autocommit(True)  # as pymssql.connect(autocommit=True)
        return conn

    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("BEGIN TRAN")
            cur.execute("UPDATE t SET v = 1 WHERE id = 1")
            first = conn.raw
        assert server.trancount(first) == 0
        assert not server.in_transaction(first)
        with pool.connection() as conn:
            conn.cursor().execute("UPDATE t SET v = 2 WHERE id = 2")  # committed at once
            assert conn.raw is first
        assert server.trancount(first) == 0 and not server.in_transaction(first)
        assert pool.stats().discarded == 0
        assert_accounting(pool)


@pytest.mark.parametrize(
    ("autocommit", "ending"),
    [
        (False, "commit"),
        (False, "rollback"),
        (False, "COMMIT statement"),  # (with autocommit on, none is open for it to end)
        (True, "commit"),
        (True, "rollback"),
    ],
)
def test_pymssql_transaction_a_commit_did_not_end_goes_no_further_than_the_lease(
    server: fakedb.Server, autocommit: bool, ending: str
) -> None:
    """A ``BEGIN TRAN`` run as a statement (or by a procedure that failed before its COMMIT)
    outlives the borrower's ``commit()``: SQL Server's COMMIT only lowers ``@@TRANCOUNT`` by
    one, and with autocommit on pymssql's ``commit()`` and ``rollback()`` send nothing.  A
    COMMIT statement, for its part, leaves none of the transaction pymssql keeps open with
    autocommit off, and its next ``commit()`` fails.  The return path puts the count back
    even though the lease ended with a commit or a rollback: the next borrower's work is
    committed, not kept inside the last one's transaction (or refused)."""

    def connect() -> fakedb.FakeMSSQLConnection:
        conn = server.connect_mssql()
        conn.autocommit(autocommit)  # as pymssql.connect(autocommit=...)
        return conn

    clean = 0 if autocommit else 1
    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            if ending == "COMMIT statement":
                cur.execute("UPDATE t SET v = 1 WHERE id = 1")
                cur.execute("COMMIT")
            else:
                cur.execute("BEGIN TRAN")
                cur.execute("UPDATE t SET v = 1 WHERE id = 1")
                getattr(conn, ending)()
        [first] = server.connections  # (not conn.raw: a lease that used it is rolled back)
        assert server.trancount(first) == clean
        with pool.transaction() as tx:  # the next borrower's block commits for real
            tx.execute("UPDATE t SET v = 2 WHERE id = 2")
        assert server.connections == [first]
        assert server.trancount(first) == clean and not server.in_transaction(first)
        assert pool.stats().discarded == 0
        assert_accounting(pool)


def test_pymssql_lease_that_committed_costs_one_statement_on_return(
    server: fakedb.Server,
) -> None:
    """The count is put back in one statement, sent only for a lease that used the
    connection: an unused lease sends nothing."""
    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("UPDATE t SET v = 1 WHERE id = 1")
            conn.commit()
            start = len(server.calls)
        sent = [c.sql or c.verb for c in server.calls[start:] if c.verb != "cursor"]
        assert len(sent) == 1 and sent[0].startswith("IF @@TRANCOUNT <> 1"), sent
        with pool.connection():
            start = len(server.calls)
        assert server.calls[start:] == []


def test_pymssql_lease_that_turned_autocommit_on_and_began_a_transaction_is_rolled_back(
    server: fakedb.Server,
) -> None:
    """A borrower on a pool with autocommit off turns it on, then runs ``BEGIN TRAN``.  The
    return path must end that transaction before it turns autocommit back off: pymssql's
    ``autocommit(False)`` sends another ``BEGIN TRAN``, and the next borrower's ``commit()``
    would then end only the inner one, leaving its work uncommitted."""
    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            conn.autocommit(True)
            cur = conn.cursor()
            cur.execute("BEGIN TRAN")
            cur.execute("UPDATE t SET v = 1 WHERE id = 1")
            first = conn.raw
        assert first.autocommit_state is False
        assert server.trancount(first) == 1  # pymssql's own, with nothing in it
        assert not server.in_transaction(first)
        with pool.connection() as conn:
            conn.cursor().execute("UPDATE t SET v = 2 WHERE id = 2")
            conn.commit()
            assert not server.in_transaction(conn.raw), "the next borrower's commit was lost"
            assert conn.raw is first
        assert pool.stats().discarded == 0
        assert_accounting(pool)


# == a COMMIT that SQL Server refuses =============================================================

#: FreeTDS's addition to the message of an error SQL Server sent.
_DB_LIB = (
    b"DB-Lib error message 20018, severity 16:\n"
    b"General SQL Server error: Check messages from the SQL Server\n"
)

#: SQL Server errors (the number, and the message as pymssql has it) that roll the whole
#: transaction back, and that running it again may get past: from a statement, or from COMMIT
#: (memory-optimized tables' validation).  3960's message has quotes in it: Python shows those
#: bytes between double quotes.
TRANSACTION_ENDING = {
    1205: b"Transaction (Process ID 57) was deadlocked on lock resources with another process "
    b"and has been chosen as the deadlock victim. Rerun the transaction.",
    3960: b"Snapshot isolation transaction aborted due to update conflict. You cannot use "
    b"snapshot isolation to access table 'dbo.t' directly or indirectly in database 'app' to "
    b"update, delete, or insert the row that has been modified or deleted by another "
    b"transaction. Retry the transaction or change the isolation level for the update/delete "
    b"statement.",
    41301: b"A previous transaction that the current transaction took a dependency on has "
    b"aborted, and the current transaction can no longer commit.",
    41302: b"The current transaction attempted to update a record that has been updated since "
    b"this transaction started. The transaction was aborted.",
    41305: b"The current transaction failed to commit due to a repeatable read validation failure.",
    41325: b"The current transaction failed to commit due to a serializable validation failure.",
    41823: b"Could not perform the operation because the database has reached its quota for "
    b"in-memory tables. This error may be transient. Please retry the operation.",
    41839: b"Transaction exceeded the maximum number of commit dependencies and the last "
    b"statement was aborted. Retry the statement.",
    41840: b"Could not perform the operation because the elastic pool or managed instance has "
    b"reached its quota for in-memory tables. This error may be transient. Please retry the "
    b"operation.",
}

#: A COMMIT failure that running the transaction again does not get past.
LOG_FULL = (9002, b"The transaction log for database 'app' is full due to 'LOG_BACKUP'.")


def commit_error(number: int, message: bytes) -> fakedb.OperationalError:
    """As pymssql's commit() raises it: COMMIT TRAN's _mssql.MSSQLDatabaseException, whose
    args[0] is the pair (number, message), wrapped in an OperationalError of one argument,
    ``'Cannot commit transaction: ' + str(e.args[0])``."""
    return fakedb.OperationalError(f"Cannot commit transaction: {(number, message + _DB_LIB)}")


@pytest.mark.parametrize("number", sorted(TRANSACTION_ENDING))
def test_pymssql_run_transaction_retries_a_transaction_sql_server_rolled_back_at_commit(
    server: fakedb.Server, number: int
) -> None:
    """Memory-optimized tables validate a transaction at COMMIT: a conflict found there comes
    through pymssql's commit(), whose error has no number of its own, only a message with the
    number inside.  SQL Server rolled the transaction back: run_transaction() runs it again."""
    error = commit_error(number, TRANSACTION_ENDING[number])
    attempts: list[int] = []

    def work(tx: Any) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            server.fail_next("commit", error)
        tx.execute("UPDATE t SET v = v + 1 WHERE id = 1")
        return len(attempts)

    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        assert pool.run_transaction(work, timeout=BOUND) == 2
        assert server.count("commit") == 2
        assert pool.stats().discarded == 0
        assert_accounting(pool)


@pytest.mark.parametrize("number", sorted(TRANSACTION_ENDING))
def test_pymssql_block_whose_commit_sql_server_rolled_back_raises_its_error(
    server: fakedb.Server, number: int
) -> None:
    """The outcome of such a COMMIT is known: the block raises the driver's error (not
    CommitOutcomeUnknown), and the connection, still sound, goes back to the pool with
    nothing of the block left open on it."""
    error = commit_error(number, TRANSACTION_ENDING[number])
    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pytest.raises(fakedb.OperationalError) as info:
            with pool.transaction() as tx:
                tx.execute("UPDATE t SET v = v + 1 WHERE id = 1")
                server.fail_next("commit", error)
                first = tx.connection.raw
        assert info.value is error
        assert PymssqlDialect().is_retryable(info.value)
        with pool.connection() as conn:
            assert conn.raw is first
            assert server.trancount(first) == 1  # pymssql's own, with nothing in it
            assert not server.in_transaction(first)
        assert pool.stats().discarded == 0
        assert_accounting(pool)


def test_pymssql_run_transaction_does_not_retry_another_commit_failure(
    server: fakedb.Server,
) -> None:
    error = commit_error(*LOG_FULL)
    attempts: list[int] = []

    def work(tx: Any) -> None:
        attempts.append(1)
        server.fail_next("commit", error)
        tx.execute("UPDATE t SET v = v + 1 WHERE id = 1")

    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pytest.raises(fakedb.OperationalError) as info:
            pool.run_transaction(work, retries=3, timeout=BOUND)
        assert info.value is error
        assert len(attempts) == 1
        assert pool.stats().discarded == 0
        assert_accounting(pool)


@pytest.mark.parametrize(
    "error",
    [
        commit_error(*LOG_FULL),
        # commit() on a connection pymssql knows is gone: no SQL Server error at all
        fakedb.OperationalError("Cannot commit transaction: Not connected to any MS SQL server"),
        # a number, but not in the shape pymssql builds
        fakedb.OperationalError("Cannot commit transaction: 41305"),
        fakedb.OperationalError("Cannot commit transaction: (41305, 'not bytes')"),
        fakedb.OperationalError(f"COMMIT failed: {(41305, b'validation failure')}"),
        fakedb.OperationalError(f"x Cannot commit transaction: {(41305, b'validation')}"),
        fakedb.OperationalError("deadlock: process 1205 was chosen as the deadlock victim"),
        fakedb.OperationalError(f"Cannot commit transaction: {(41305, b'x')}", "more"),
        # not a DB-API error: an application's own exception with the same text
        RuntimeError(f"Cannot commit transaction: {(41305, b'validation failure')}"),
    ],
    ids=repr,
)
def test_pymssql_reads_no_number_from_another_message(error: Exception) -> None:
    dialect = PymssqlDialect()
    assert not dialect.is_retryable(error)
    assert not dialect.ended_transaction(None, error)


def test_pymssql_lock_wait_starting_late_in_a_timed_block_gets_the_time_left(
    server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQL Server starts ``LOCK_TIMEOUT`` afresh for each lock wait and pymssql has no cancel:
    sized once at BEGIN, a wait starting late in the block would outlast the deadline by up
    to the whole timeout.  A statement that starts more than a tenth of a second after the
    limit was sized has it narrowed to the time left first, never lengthened; statements in
    quick succession pay no round trip for it.  The block's clock is moved on, not waited."""
    import time

    import dbpool.transaction

    offset = [0.0]
    monkeypatch.setattr(dbpool.transaction, "monotonic", lambda: time.monotonic() + offset[0])
    server.set_result("SELECT @@LOCK_TIMEOUT", [(-1,)])  # the session's: no limit
    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pool.transaction(timeout=5) as tx:
            tx.execute("SELECT 42 AS x")
            tx.execute("SELECT 43 AS y")  # at once: nothing to narrow
            start = len(server.calls)
            offset[0] = 1.5  # work in the client: 3.5 s of the deadline left
            tx.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
            # Between a statement and the fetch of its rows, nothing: pymssql would cancel
            # what is unread as the narrowing started (a slow SELECT, or a cursor made)
            offset[0] = 1.8
            cursor = tx.execute("SELECT 44 AS z")  # (narrowed before it)
            offset[0] = 2.1
            tx.cursor()
            assert cursor.fetchall() == [(1,)]
            offset[0] = 2.5  # nor before COMMIT, whose waits pymssql's limit does not need
        sent = [c.sql for c in server.calls if c.sql]
        narrowed = [c.sql for c in server.calls[start:] if c.sql and "@@LOCK_TIMEOUT" in c.sql]
    assert len(narrowed) == 2, sent
    limit = int(narrowed[0].rsplit(" ", 1)[1])
    assert 3000 <= limit <= 3500, narrowed
    assert narrowed[0] == (
        f"IF @@LOCK_TIMEOUT < 0 OR @@LOCK_TIMEOUT > {limit} SET LOCK_TIMEOUT {limit}"
    )
    assert sent.index(narrowed[0]) == sent.index("UPDATE accounts SET balance = 0 WHERE id = 1") - 1
    assert sum("@@LOCK_TIMEOUT <" in s for s in sent) == 2, sent  # none between the first two
    assert "@@LOCK_TIMEOUT <" in sent[sent.index("SELECT 44 AS z") - 1], sent
    after = sent[sent.index("SELECT 44 AS z") + 1 :]
    assert not any("@@LOCK_TIMEOUT <" in s for s in after), sent
    assert "SET LOCK_TIMEOUT -1" in sent, sent  # the session's own, put back at the end
