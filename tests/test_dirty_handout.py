"""What one borrower leaves on a connection that changes the transactional behaviour the next
borrower gets, with the pool's default settings (session_reset=None), on the real servers.

Each pool has max_size=1, so the second lease gets the connection the first one returned.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import rows, scalar

pytestmark = pytest.mark.timeout(30)

T_OTHER = "dirty_handout_other"
PROC = "dirty_handout_opens_tx"


def _admin(connect: Callable[[], Any]) -> Any:
    conn = connect()
    conn.autocommit(True)
    cur = conn.cursor()
    # a failed test must never leave the teardown waiting long for a lock
    cur.execute("SET SESSION lock_wait_timeout = 2, innodb_lock_wait_timeout = 2")
    cur.close()
    return conn


@pytest.fixture
def mysql_tables(mysql_connect: Callable[[], Any]) -> Iterator[Any]:
    """An InnoDB table and a procedure; yields an autocommit admin connection."""
    admin = _admin(mysql_connect)
    rows(admin, f"DROP TABLE IF EXISTS {T_OTHER}")
    rows(admin, f"CREATE TABLE {T_OTHER} (x INT) ENGINE=InnoDB")
    rows(admin, f"DROP PROCEDURE IF EXISTS {PROC}")
    # A result set first, then a transaction opened and left open: the flags of the first
    # result's reply predate the START TRANSACTION.
    rows(
        admin,
        f"CREATE PROCEDURE {PROC}() BEGIN SELECT 1; START TRANSACTION; "
        f"INSERT INTO {T_OTHER} VALUES (42); SELECT 2; END",
    )
    yield admin
    # the tests close their pools first: nothing holds a lock by now
    rows(admin, f"DROP PROCEDURE IF EXISTS {PROC}")
    rows(admin, f"DROP TABLE IF EXISTS {T_OTHER}")
    admin.close()


def _pool(connect: Callable[[], Any], **options: Any) -> dbpool.Pool[Any]:
    return dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5, **options)


# -- a pending one-shot SET TRANSACTION reaches the next borrower (PyMySQL) ------------------


def _uncommitted_row(connect: Callable[[], Any]) -> Any:
    """Another session with an uncommitted row in T_OTHER."""
    writer = connect()
    rows(writer, f"INSERT INTO {T_OTHER} VALUES (99)")
    return writer


def test_pymysql_one_shot_isolation_survives_autocommit_restore(mysql_connect, mysql_tables):
    # Default pool and driver settings (autocommit off).  The borrower switches autocommit on
    # through the lease, as the driver lets it (the pool restores it on return), and sets the
    # isolation level for its next transaction, which it never starts.
    with _pool(mysql_connect) as pool:
        with pool.connection() as conn:
            conn.autocommit(True)
            rows(conn, "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED")
        writer = _uncommitted_row(mysql_connect)
        try:
            with pool.connection() as conn:
                # The next borrower's first (implicit) transaction, at the server's default
                # level, must not see another session's uncommitted row.
                seen = scalar(conn, f"SELECT COUNT(*) FROM {T_OTHER}")
                assert scalar(conn, "SELECT @@autocommit") == 0  # restored, as documented
                conn.rollback()
        finally:
            writer.rollback()
            writer.close()
    assert seen == 0, "the next borrower's transaction ran at READ UNCOMMITTED (a dirty read)"


# -- flags read from a reply that is not the last one (PyMySQL, autocommit on) ----------------


def test_pymysql_autocommit_pending_results_hand_over_open_transaction(mysql_connect, mysql_tables):
    with _pool(mysql_connect, configure=lambda raw: raw.autocommit(True)) as pool:
        with pool.connection() as conn:
            # conn.query is one of the driver methods the lease watches; the procedure's first
            # result is read, its START TRANSACTION and INSERT come in replies still unread.
            conn.query(f"CALL {PROC}()")
        with pool.connection() as conn:
            in_transaction = scalar(conn, "SELECT @@in_transaction")
            conn.commit()  # the next borrower commits its own (empty) work
    # The first borrower never committed its INSERT: the return path must have rolled it back.
    committed = scalar(mysql_tables, f"SELECT COUNT(*) FROM {T_OTHER}")
    assert (in_transaction, committed) == (0, 0)


# -- mysqlclient's persistent reconnect flag, turned on by one borrower ----------------------


def test_mysqlclient_reconnect_turned_on_by_borrower_gives_next_one_autocommit(
    mysqlclient_connect, mysql_tables
):
    with _pool(mysqlclient_connect) as pool:
        with pool.connection() as conn:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                conn.ping(True)  # mysqlclient: reconnect on, persistently
            session = scalar(conn, "SELECT CONNECTION_ID()")
        # The server ends the idle session (wait_timeout, a restart, a failover...).
        rows(mysql_tables, f"KILL CONNECTION {int(session)}")
        # Checked out within validate_after: no ping, as documented; the first statement
        # should fail (the driver's error), never run elsewhere with other semantics.
        with pool.connection() as conn:
            try:
                rows(conn, f"INSERT INTO {T_OTHER} VALUES (7)")
                conn.rollback()
            except Exception:
                pass  # the driver's error: what the docs promise
        committed = scalar(mysql_tables, f"SELECT COUNT(*) FROM {T_OTHER}")
    assert committed == 0, "the next borrower's INSERT was autocommitted; its rollback did nothing"
