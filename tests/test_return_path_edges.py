"""Edges of the return path: ``pool.release()`` of a lease the pool ended itself, PyMySQL's
session reset on a connection made with an empty database name, and the time bound on the
maintenance thread's return of a dropped lease when the pool is reopened meanwhile."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

import dbpool
from dbpool.dialects import Dialect
from tests import fakedb
from tests.conftest import in_child, wait_until

pytestmark = pytest.mark.timeout(30)


# == pool.release() of a lease the pool ended ===================================================


def test_release_of_a_lease_the_pool_closed_past_its_timeout_does_nothing(
    sqlite_connect: Any,
) -> None:
    # The borrower never gave it back: its try/finally's release() must not raise over the
    # block's own exception, nor say it was returned twice.
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        conn = pool.connection()
        pool.close(timeout=0)  # closes the connection under the lease
        assert conn.released
        pool.release(conn)
        with pytest.raises(dbpool.LeaseReleased):  # given back now: a second release raises
            pool.release(conn)
    finally:
        pool.close()


def test_release_of_a_lease_inherited_across_fork_does_nothing_in_the_child(
    sqlite_connect: Any,
) -> None:
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        with pool.connection() as conn:

            def child() -> bool:
                pool.release(conn)
                return conn.released

            assert in_child(child) == {"result": True}
            assert not conn.released  # the parent's lease goes on
    finally:
        pool.close()


# == PyMySQL: session_reset on a connection made with database="" ===============================


def test_a_pymysql_connection_made_with_an_empty_database_name_is_reset_and_reused(
    mysql_params: dict[str, Any],
) -> None:
    # PyMySQL connects with no database for database="" (it tests the name's truth), as for
    # None: the reset must not select "" (an error), which discarded it at every return.
    import pymysql

    params = {**mysql_params, "database": ""}
    with dbpool.Pool(
        lambda: pymysql.connect(**params), min_size=0, max_size=1, session_reset="discard"
    ) as pool:
        for _ in range(2):
            with pool.connection() as conn:
                cursor = conn.cursor()
                cursor.execute("SELECT DATABASE()")
                assert cursor.fetchall() == ((None,),)
        s = pool.stats()
        assert (s.created, s.discarded) == (1, 0), s


# == the maintenance thread's return of a dropped lease, across reopen() =========================


class Severable(Dialect):
    """The generic dialect, for a driver whose sever() ends a rollback held at its gate with
    the error a shut-down socket gives."""

    name = "severable"

    def __init__(self) -> None:
        self.gates: dict[int, fakedb.Gate] = {}
        self.severed: list[Any] = []

    def sever(self, conn: Any) -> None:
        self.severed.append(conn)
        gate = self.gates.get(conn.id)
        if gate is not None:
            gate.release(fakedb.OperationalError("the socket was shut down"))


def test_a_dropped_lease_return_is_cut_off_even_if_the_pool_is_reopened_meanwhile(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lease still out after drain() timed out, dropped: the maintenance thread of the drained
    # pool takes it back, and its rollback hangs.  reopen() stops counting it, but the
    # connection is still that thread's, held past its time: it is shut down all the same.
    monkeypatch.setattr(dbpool.pool, "_ORPHAN_RETURN_TIME", 0.2)
    dialect = Severable()
    pool = make_pool(max_size=1, dialect=dialect)
    reopened = threading.Event()
    cut_off = pool._cut_off

    # A private method, wrapped: the watchdog's call when the time is up, held until reopen().
    def late_cut_off(*args: Any) -> None:
        assert reopened.wait(5)
        cut_off(*args)

    monkeypatch.setattr(pool, "_cut_off", late_cut_off)
    lease = [pool.connection()]
    lease[0].cursor().execute("insert into t values (1)")
    dropped = server.connections[-1]
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    gate = dialect.gates[dropped.id] = server.block("rollback", conn=dropped)
    with pytest.warns(ResourceWarning, match="without being released"):
        lease.clear()
        gc.collect()
    assert gate.entered.wait(5), "the maintenance thread did not take the dropped lease back"
    pool.reopen()
    reopened.set()
    wait_until(lambda: dialect.severed == [dropped], message="the hung rollback was not cut off")
    wait_until(lambda: dropped.closed)
    with pool.connection(timeout=5) as conn:  # its place under max_size is free again
        assert conn.raw is not dropped
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.opening, s.leaked) == (1, 1, 0, 0, 1), s


# == psycopg2: restoring the cursor factory on an autocommit connection ==========================


def test_restoring_psycopg2s_cursor_factory_sends_nothing_to_the_server(
    psycopg2_connect: Any,
) -> None:
    # In autocommit mode psycopg2 sends a SET for each session characteristic assigned, even
    # of the value it has: restoring the cursor factory alone must not assign them (three round
    # trips, which also reset what the lease set with SQL, which stays for the next borrower).
    import psycopg2.extras

    def autocommit(raw: Any) -> None:
        raw.autocommit = True

    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, configure=autocommit) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SET default_transaction_read_only = on")
            conn.raw.cursor_factory = psycopg2.extras.RealDictCursor
        with pool.connection() as conn:
            assert conn.raw.cursor_factory is None
            cursor = conn.cursor()
            cursor.execute("SHOW default_transaction_read_only")
            assert cursor.fetchall() == [("on",)]
        assert pool.stats().discarded == 0


# == PostgreSQL: server-side cursors gone with their transaction ==================================


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("withhold", [False, True])
def test_a_server_side_cursor_gone_with_its_transaction_costs_no_reconnect(
    request: pytest.FixtureRequest, driver: str, withhold: bool
) -> None:
    # A named cursor left open dies with its transaction: a block's commit (unless WITH HOLD)
    # or rollback.  The return path closes it with the lease's other cursors, before it rolls
    # back what the lease did after the block; its CLOSE then finds no cursor (psycopg2 refuses
    # one not WITH HOLD itself, with no I/O): nothing is left open, and the connection is fine.
    connect = request.getfixturevalue("pg_connect" if driver == "psycopg" else "psycopg2_connect")
    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            first = conn.raw
            with pytest.raises(ValueError):
                with conn.transaction() as tx:
                    cursor = tx.cursor("dbpool_gone", withhold=withhold)
                    cursor.execute("SELECT generate_series(1, 10)")
                    assert cursor.fetchmany(2) == [(1,), (2,)]
                    raise ValueError("the block fails: rolled back")
            conn.cursor().execute("SELECT 1")  # the lease's next transaction
        with pool.connection() as conn:
            assert conn.raw is first
            cursor = conn.cursor()
            cursor.execute("SELECT count(*) FROM pg_cursors")
            assert cursor.fetchall() == [(0,)]
        assert pool.stats().discarded == 0, pool.stats().discards
