"""The connection hooks and event listeners at their edges, and the pymssql dialect's reading
of SQL Server's errors (through the fake driver's pymssql flavour: there is no SQL Server here).
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import assert_accounting
from tests.test_pymssql_edges import TRANSACTION_ENDING

pytestmark = pytest.mark.timeout(30)

BOUND = 10.0


def use(conn: Any) -> None:
    """Run one statement on a lease, so that the return path has something to look at."""
    cur = conn.cursor()
    cur.execute("SELECT 2")  # not the fake driver's ping statement
    cur.fetchall()
    cur.close()


# == the reset hook ================================================================================


@pytest.mark.parametrize("flavour", ["generic", "pymssql"])
def test_a_transaction_the_reset_hook_leaves_open_is_not_kept_by_an_idle_connection(
    server: fakedb.Server, flavour: str
) -> None:
    """These drivers cannot say whether a transaction is open: the work a reset hook left
    uncommitted must not wait, holding its locks, in an idle connection for the next
    borrower's commit (configure and check are followed by a rollback for the same reason)."""
    connect = server.connect if flavour == "generic" else server.connect_mssql

    def reset(raw: Any) -> None:
        cur = raw.cursor()
        cur.execute("DELETE FROM app_locks WHERE owner = 1")  # and no commit
        cur.close()

    with dbpool.Pool(connect, min_size=0, max_size=1, reset=reset) as pool:
        with pool.connection(timeout=BOUND) as conn:
            use(conn)
            raw = conn.raw
        s = assert_accounting(pool)
        assert s.idle + s.discards["reset_failed"] == 1, s
        assert not server.in_transaction(raw), "the reset hook's work is still pending"


# == the configure hook ============================================================================


def test_a_configure_hook_closing_the_connection_fails_the_connect_saying_so(
    tmp_path: Any,
) -> None:
    """A closed connection has no transaction to commit: the error says what happened."""
    path = tmp_path / "closed.sqlite3"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, check_same_thread=False)

    with dbpool.Pool(connect, min_size=0, max_size=1, configure=lambda raw: raw.close()) as pool:
        with pytest.raises(dbpool.PoolError) as info:
            pool.connection(timeout=BOUND)
        message = str(info.value)
        assert "closed" in message or "broken" in message, message
        assert "commit()" not in message, message
        s = assert_accounting(pool)
        assert (s.size, s.connect_errors) == (0, 1), s


# == async callables ===============================================================================


@pytest.mark.parametrize("hook", ["configure", "check", "reset"])
def test_an_async_hook_is_refused(server: fakedb.Server, hook: str) -> None:
    """A coroutine function would never run its body (the pool calls it and drops the
    coroutine): an async check would turn validation off, an async reset would undo nothing."""

    async def hook_fn(raw: Any) -> None:
        raise AssertionError("never awaited")

    with pytest.raises(TypeError, match=f"{hook}.*async"):
        dbpool.Pool(server.connect, min_size=0, **{hook: hook_fn})


def test_an_async_listener_is_refused(make_pool: Any) -> None:
    pool = make_pool()

    async def listener(event: dbpool.PoolEvent) -> None:
        raise AssertionError("never awaited")

    with pytest.raises(TypeError, match="async"):
        pool.add_listener("checkout", listener)
    with pool.connection(timeout=BOUND):
        pass


@pytest.mark.parametrize("hook", ["configure", "check", "reset"])
def test_a_hook_that_cannot_take_the_connection_is_refused(
    server: fakedb.Server, hook: str
) -> None:
    """Called with the wrong number of arguments it would raise at every use: a check that
    does so discards every idle connection at checkout, which only shows as reconnects."""
    with pytest.raises(TypeError, match=f"{hook} must be a callable taking the driver's conn"):
        dbpool.Pool(server.connect, min_size=0, **{hook: lambda: None})
    with pytest.raises(TypeError, match="missing a required argument"):
        dbpool.Pool(server.connect, min_size=0, **{hook: lambda raw, extra: None})
    # Optional and variable arguments fit, and so does a built-in with no signature to read.
    for fits in (lambda raw, extra=None: None, lambda *args: None, print):
        dbpool.Pool(server.connect, min_size=0, **{hook: fits}).close()


def test_a_connect_callable_that_needs_arguments_is_refused_without_showing_them() -> None:
    """The message names the callable but never prints its arguments: a partial's repr would
    show the DSN, password and all."""

    def open_database(dsn: str, timeout: float) -> Any:
        raise AssertionError("never called")

    connect = functools.partial(open_database, "postgresql://app:s3cret@db/app")
    with pytest.raises(TypeError, match="connect must be a callable taking no arguments") as err:
        dbpool.Pool(connect, min_size=0)
    assert "missing a required argument: 'timeout'" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_a_listener_that_cannot_take_the_event_is_refused(make_pool: Any) -> None:
    pool = make_pool()
    with pytest.raises(TypeError, match="a listener must be a callable taking one dbpool"):
        pool.add_listener("checkout", lambda: None)
    with pool.connection(timeout=BOUND):  # the pool's listeners are as they were
        pass
    assert not pool._listeners.checkout


# == pymssql: SQL Server's errors that end the transaction =========================================


@pytest.mark.parametrize("number", sorted(TRANSACTION_ENDING))
def test_pymssql_run_transaction_retries_a_transaction_sql_server_aborted(
    server: fakedb.Server, number: int
) -> None:
    error = fakedb.OperationalError(number, TRANSACTION_ENDING[number])
    attempts: list[int] = []

    def work(tx: Any) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            server.fail_next("execute", error)
        tx.execute("UPDATE t SET v = v + 1 WHERE id = 1")
        return len(attempts)

    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        assert pool.run_transaction(work, timeout=BOUND) == 2
        assert_accounting(pool)


@pytest.mark.parametrize("number", sorted(TRANSACTION_ENDING))
def test_pymssql_block_goes_no_further_once_sql_server_aborted_its_transaction(
    server: fakedb.Server, number: int
) -> None:
    """SQL Server rolled the transaction back: a statement after the caught error would run
    outside any transaction (committed alone), so none runs, and the block's end says so."""
    error = fakedb.OperationalError(number, TRANSACTION_ENDING[number])
    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pytest.raises(dbpool.TransactionRolledBack) as info:
            with pool.transaction() as tx:
                server.fail_next("execute", error)
                with pytest.raises(fakedb.OperationalError):
                    tx.execute("UPDATE t SET v = v + 1 WHERE id = 1")
                before = len(server.statements())
                with pytest.raises(dbpool.TransactionRolledBack):
                    tx.execute("UPDATE t SET v = 0 WHERE id = 2")
                assert len(server.statements()) == before
        assert info.value.__cause__ is error
        assert server.count("commit") == 0
        assert_accounting(pool)


@pytest.mark.parametrize("number", sorted(TRANSACTION_ENDING))
def test_pymssql_reads_the_number_of_a_low_level_error_from_a_batched_executemany(
    server: fakedb.Server, number: int
) -> None:
    """cursor.executemany() with a batch_size above 1 (the cursor's arraysize by default)
    lets pymssql's _mssql.MSSQLDatabaseException through unwrapped: its args[0] is the
    (number, message) pair, and the number is in exc.number.  SQL Server rolled the
    transaction back all the same: the block goes no further, and run_transaction() retries."""
    error = fakedb.MSSQLDatabaseException((number, TRANSACTION_ENDING[number]))
    rows = [(1, 1), (2, 2)]
    sql = "UPDATE t SET v = %s WHERE id = %s"
    with dbpool.Pool(server.connect_mssql, min_size=0, max_size=1) as pool:
        with pytest.raises(dbpool.TransactionRolledBack) as info:
            with pool.transaction() as tx:
                server.fail_next("execute", error)
                with pytest.raises(fakedb.MSSQLDatabaseException):
                    tx.cursor().executemany(sql, rows)
                before = len(server.statements())
                with pytest.raises(dbpool.TransactionRolledBack):
                    tx.execute("UPDATE t SET v = 0 WHERE id = 3")
                assert len(server.statements()) == before
        assert info.value.__cause__ is error
        assert server.count("commit") == 0

        attempts: list[int] = []

        def work(tx: Any) -> int:
            attempts.append(1)
            if len(attempts) == 1:
                server.fail_next("execute", error)
            tx.cursor().executemany(sql, rows)
            return len(attempts)

        assert pool.run_transaction(work, timeout=BOUND) == 2
        assert_accounting(pool)
