"""A transaction block whose connection was closed or lost before its COMMIT: the outcome is
known (nothing was committed, as no COMMIT could go out), so the block raises
TransactionRolledBack rather than CommitOutcomeUnknown, which says to check before doing the work
again."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import assert_accounting, rows, scalar, wait_until

pytestmark = pytest.mark.timeout(30)


def test_a_block_whose_raw_connection_was_closed_was_not_committed(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    with pytest.raises(dbpool.TransactionRolledBack, match="before COMMIT"):
        with pool.transaction() as tx:
            tx.execute("UPDATE t SET v = 1")
            tx.connection.raw.close()
    assert server.count("commit") == 0
    s = assert_accounting(pool)
    assert (s.size, s.discarded) == (0, 1)


def test_a_psycopg2_block_whose_raw_connection_was_closed_was_not_committed(
    psycopg2_connect: Any,
) -> None:
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pytest.raises(dbpool.TransactionRolledBack, match="before COMMIT"):
            with pool.transaction() as tx:
                tx.execute("SELECT 1")
                tx.connection.raw.close()
        with pool.connection() as conn:  # a new connection
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            assert cursor.fetchall() == [(1,)]


@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_a_block_whose_driver_reconnected_is_not_committed(
    request: pytest.FixtureRequest, driver: str
) -> None:
    """The block's session is lost and the driver connects again when told to (ping with
    reconnect): the server rolled the transaction back with the old session, and COMMIT would
    commit only what ran since, in the new one.  The block raises TransactionRolledBack."""
    connect = request.getfixturevalue(
        "mysql_connect" if driver == "pymysql" else "mysqlclient_connect"
    )
    table = f"lost_before_commit_{driver}_{os.getpid()}"
    admin = connect()
    admin.autocommit(True)
    rows(admin, f"DROP TABLE IF EXISTS {table}")
    rows(admin, f"CREATE TABLE {table} (x INT) ENGINE=InnoDB")
    try:
        with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
            with pytest.raises(dbpool.TransactionRolledBack, match="reconnected"):
                with pool.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} VALUES (1)")
                    session = scalar(tx, "SELECT CONNECTION_ID()")
                    rows(admin, f"KILL CONNECTION {int(session)}")
                    gone = "SELECT id FROM information_schema.processlist WHERE id = %s"
                    wait_until(lambda: not rows(admin, gone, (session,)))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        tx.connection.ping(True)
                    tx.execute(f"INSERT INTO {table} VALUES (2)")
            # mysqlclient's new session is in the server's default autocommit mode, where the
            # second INSERT committed as it ran; PyMySQL's turns autocommit off again.
            left = [(2,)] if driver == "mysqlclient" else []
            assert rows(admin, f"SELECT x FROM {table}") == left
            assert_accounting(pool)
    finally:
        rows(admin, f"DROP TABLE IF EXISTS {table}")
        admin.close()


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_a_timed_block_whose_session_ended_before_commit_was_not_committed(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """The server ends the block's session while the block is between statements; a block
    with a timeout first narrows its lock limit to the time left, a round trip that finds the
    connection lost: COMMIT was never sent, so the block raises TransactionRolledBack, as
    one without a timeout does, not the driver's bare error from that round trip."""
    import dbpool.transaction

    monkeypatch.setattr(dbpool.transaction, "_NARROW_SLACK", 0.0)  # always narrowed
    connect = request.getfixturevalue("pg_connect" if driver == "psycopg" else "psycopg2_connect")
    admin = connect()
    admin.autocommit = True
    try:
        with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
            with pytest.raises(dbpool.TransactionRolledBack, match="before COMMIT"):
                with pool.transaction(timeout=30) as tx:
                    session = scalar(tx, "SELECT pg_backend_pid()")
                    rows(admin, "SELECT pg_terminate_backend(%s)", (session,))
                    gone = "SELECT pid FROM pg_stat_activity WHERE pid = %s"
                    wait_until(lambda: not rows(admin, gone, (session,)))
            assert assert_accounting(pool).discarded == 1
            with pool.connection() as conn:  # a new connection
                assert scalar(conn, "SELECT 1") == 1
    finally:
        admin.close()
