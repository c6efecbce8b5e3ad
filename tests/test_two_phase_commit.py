"""Two-phase commit through a lease, on psycopg and psycopg2, against a real server.

``tpc_prepare()`` ends the session's transaction (libpq then says idle), but the driver stays in
two-phase mode until ``tpc_commit()`` or ``tpc_rollback()``: psycopg refuses ``commit()`` from
then on, psycopg2 every statement.  A lease returned in that state must not reach the next
borrower; the prepared transaction itself is its transaction manager's to finish, from any
connection, so the pool leaves it prepared.

The shared test server runs with ``max_prepared_transactions = 0`` (PostgreSQL's default), so
these tests use the throwaway cluster of tests/pgcluster.py, which allows a few.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg2
import pytest

import dbpool
from tests.pgcluster import PgCluster, pg_cluster  # noqa: F401

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(30)]

DRIVERS: dict[str, Callable[[str], Any]] = {
    "psycopg": lambda dsn: psycopg.connect(dsn, connect_timeout=5),
    "psycopg2": lambda dsn: psycopg2.connect(dsn, connect_timeout=5),
}


@pytest.fixture(params=sorted(DRIVERS))
def connect(request: pytest.FixtureRequest, pg_cluster: PgCluster) -> Callable[[], Any]:  # noqa: F811
    pg_cluster.ensure_running()
    driver, dsn = DRIVERS[request.param], pg_cluster.dsn
    return lambda: driver(dsn)


@pytest.fixture
def prepared(pg_cluster: PgCluster) -> Iterator[Callable[[], list[str]]]:  # noqa: F811
    """The gids of the transactions prepared on the cluster; any left are rolled back after."""
    admin = psycopg.connect(pg_cluster.dsn, autocommit=True)

    def gids() -> list[str]:
        return [gid for (gid,) in admin.execute("SELECT gid FROM pg_prepared_xacts ORDER BY gid")]

    try:
        admin.execute("CREATE TABLE IF NOT EXISTS two_phase (x int)")
        admin.execute("TRUNCATE two_phase")
        yield gids
    finally:
        for gid in gids():
            admin.execute(psycopg.sql.SQL("ROLLBACK PREPARED {}").format(gid))
        admin.close()


def insert(conn: Any, value: int) -> None:
    cursor = conn.cursor()
    cursor.execute("INSERT INTO two_phase VALUES (%s)", (value,))
    cursor.close()


def values(conn: Any) -> list[int]:
    cursor = conn.cursor()
    cursor.execute("SELECT x FROM two_phase ORDER BY x")
    found = [x for (x,) in cursor.fetchall()]
    cursor.close()
    conn.commit()
    return found


def test_lease_returned_with_a_prepared_transaction_is_discarded_and_it_stays_prepared(
    connect: Callable[[], Any], prepared: Callable[[], list[str]]
) -> None:
    with dbpool.Pool(connect, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            conn.tpc_begin(conn.xid(1, "left-prepared", "branch"))
            insert(conn, 1)
            conn.tpc_prepare()
            first = conn.raw
        assert len(prepared()) == 1  # not the pool's to finish
        assert pool.stats().discards["reset_failed"] == 1
        with pool.connection() as conn:
            assert conn.raw is not first
            insert(conn, 2)
            assert values(conn) == [2]  # commit() works: a connection out of two-phase mode
            # The transaction manager finishes the prepared one, from another connection.
            (xid,) = conn.tpc_recover()
            conn.tpc_commit(xid)
            assert values(conn) == [1, 2]
        assert prepared() == []


def test_lease_that_finishes_its_two_phase_transaction_keeps_its_connection(
    connect: Callable[[], Any], prepared: Callable[[], list[str]]
) -> None:
    with dbpool.Pool(connect, min_size=1, max_size=1) as pool:
        for value, finish in ((1, "tpc_commit"), (2, "tpc_rollback")):
            with pool.connection() as conn:
                conn.tpc_begin(conn.xid(value, "finished", "branch"))
                insert(conn, value)
                conn.tpc_prepare()
                getattr(conn, finish)()
                first = conn.raw
            with pool.connection() as conn:
                assert conn.raw is first
                values(conn)  # commit() works: out of two-phase mode
        assert pool.stats().discards["reset_failed"] == 0
        assert prepared() == []
        with pool.connection() as conn:
            assert values(conn) == [1]


def test_prepared_through_the_driver_connection_is_discarded_too(
    connect: Callable[[], Any], prepared: Callable[[], list[str]]
) -> None:
    with dbpool.Pool(connect, min_size=1, max_size=1) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            raw.tpc_begin(raw.xid(1, "raw-prepared", "branch"))
            insert(raw, 1)
            raw.tpc_prepare()
        assert pool.stats().discards["reset_failed"] == 1
        assert len(prepared()) == 1
        with pool.connection() as conn:
            assert values(conn) == []
