"""psycopg 3: a ``cursor.stream()`` left part-read, its iterator still referenced, when the pool
itself has to talk to the connection.

psycopg's ``stream()`` is a generator that holds the connection's lock (a plain, non-reentrant
``threading.Lock``) from its first row until it is exhausted or closed.  Whatever then takes that
lock in the same thread waits forever: closing a server-side cursor, ``commit()``,
``rollback()``, a savepoint statement.  The pool sends those on its own (the return path closes
the cursors a lease left open; a transaction block's end commits or rolls back; a savepoint's
end releases or rolls back to it), so none of them may wait for the lock while a result is
still being read: the return discards such a connection as busy, and a block's end fails with
psycopg's error, as it does when the lock is free.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import dbpool
from tests.conftest import Caller, Connector

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(30)]

TABLE = "dbpool_stream_mix"
ROWS = "SELECT generate_series(1, 100)"


@pytest.fixture
def pool(pg_connect: Connector) -> Iterator[dbpool.Pool[Any]]:
    pool: dbpool.Pool[Any] = dbpool.Pool(pg_connect, min_size=0, max_size=1, acquire_timeout=5)
    yield pool
    pool.close(timeout=1)


@pytest.fixture
def table(pg_connect: Connector) -> Iterator[Any]:
    admin = pg_connect()
    admin.autocommit = True
    admin.execute("SET lock_timeout = '5s'")
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
    admin.execute(f"CREATE TABLE {TABLE} (x int)")
    yield admin
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")


def count(admin: Any) -> int:
    return int(admin.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])


def works(pool: dbpool.Pool[Any]) -> None:
    with pool.connection() as conn:
        assert conn.cursor().execute("SELECT 42").fetchone() == (42,)


def test_lease_returned_with_a_stream_part_read_and_a_named_cursor_open(
    pool: dbpool.Pool[Any],
) -> None:
    """The return path sends no CLOSE for the named cursor: the connection is discarded as
    busy, which ends the cursor with it."""
    kept: list[Any] = []

    def borrow() -> None:
        with pool.connection() as conn:
            named = conn.cursor(name="dbpool_mix")
            named.execute(ROWS)
            assert len(named.fetchmany(5)) == 5
            stream = conn.cursor().stream(ROWS)
            assert next(stream) == (1,)
            kept.append(stream)  # still referenced as the lease goes back

    assert Caller(borrow).outcome() is None
    assert pool.stats().discards["reset_failed"] == 1
    works(pool)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_transaction_block_ends_with_a_stream_part_read(
    table: Any, pool: dbpool.Pool[Any], timeout: float | None
) -> None:
    """Neither COMMIT nor ROLLBACK can be sent: the block's end fails with psycopg's error,
    commits nothing, and the connection is discarded."""
    import psycopg

    kept: list[Any] = []

    def block() -> None:
        with pool.transaction(timeout=timeout) as tx:
            tx.execute(f"INSERT INTO {TABLE} VALUES (1)")
            stream = tx.cursor().stream(ROWS)
            assert next(stream) == (1,)
            kept.append(stream)

    assert isinstance(Caller(block).outcome(), psycopg.OperationalError)
    assert count(table) == 0
    assert pool.stats().discards["reset_failed"] == 1
    works(pool)


def test_savepoint_ends_with_a_stream_part_read(table: Any, pool: dbpool.Pool[Any]) -> None:
    """RELEASE SAVEPOINT cannot be sent either: the savepoint's end fails, and the block rolls
    back."""
    import psycopg

    kept: list[Any] = []

    def block() -> None:
        with pool.transaction() as tx:
            tx.execute(f"INSERT INTO {TABLE} VALUES (1)")
            with tx.savepoint():
                stream = tx.cursor().stream(ROWS)
                assert next(stream) == (1,)
                kept.append(stream)

    assert isinstance(Caller(block).outcome(), psycopg.OperationalError)
    assert count(table) == 0
    works(pool)
