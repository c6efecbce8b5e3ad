"""Edge cases of the pymssql dialect, as used through the pool, against the fake driver's
pymssql flavour (there is no SQL Server here): what the return path must leave for the next
borrower.  Each docstring says what pymssql or SQL Server does that makes the case hard.
"""

from __future__ import annotations

import pytest

import dbpool
from tests import fakedb
from tests.conftest import assert_accounting

pytestmark = pytest.mark.timeout(30)


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
