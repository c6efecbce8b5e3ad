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
from tests.conftest import rows, scalar, wait_until

pytestmark = pytest.mark.timeout(30)

T_OTHER = "dirty_handout_other"
PROC = "dirty_handout_opens_tx"
PROC_FAILS = "dirty_handout_opens_tx_and_fails"


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
    rows(admin, f"DROP PROCEDURE IF EXISTS {PROC_FAILS}")
    # A transaction opened by a CALL whose reply is an error: no flags say it is open.
    rows(
        admin,
        f"CREATE PROCEDURE {PROC_FAILS}() BEGIN START TRANSACTION; "
        f"INSERT INTO {T_OTHER} VALUES (43); SIGNAL SQLSTATE '45000'; END",
    )
    yield admin
    # the tests close their pools first: nothing holds a lock by now
    rows(admin, f"DROP PROCEDURE IF EXISTS {PROC_FAILS}")
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


# -- a multi-statement string whose unread statement failed (PyMySQL and mysqlclient) ---------


def _multi_statement_connect(driver: str, params: dict[str, Any]) -> Callable[[], Any]:
    """Autocommit connections that take several statements in one string (mysqlclient does
    by default)."""
    if driver == "pymysql":
        import pymysql
        from pymysql.constants import CLIENT

        flag = CLIENT.MULTI_STATEMENTS
        return lambda: pymysql.connect(**params, client_flag=flag, autocommit=True)
    import MySQLdb

    return lambda: MySQLdb.connect(**params, autocommit=True)


@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_a_statement_that_failed_unread_in_a_multi_statement_string_keeps_the_connection(
    request: pytest.FixtureRequest, mysql_params: dict[str, Any], mysql_tables: Any, driver: str
) -> None:
    # The borrower reads the first statement's result and leaves the cursor; the CALL's error
    # comes only as the return path closes it.  An error reply leaves the connection in step:
    # it is rolled back and reused, not discarded.  The CALL opened a transaction that its
    # error reply does not flag: the rollback must end it all the same.
    if driver == "mysqlclient":
        request.getfixturevalue("mysqlclient_connect")  # skips if mysqlclient is missing
    with _pool(_multi_statement_connect(driver, mysql_params)) as pool:
        with pool.connection() as conn:
            session = scalar(conn, "SELECT CONNECTION_ID()")
            cursor = conn.cursor()
            cursor.execute(f"SELECT 1; CALL {PROC_FAILS}()")
            assert cursor.fetchall() == ((1,),)
        with pool.connection() as conn:
            assert scalar(conn, "SELECT CONNECTION_ID()") == session  # the same connection
            assert scalar(conn, "SELECT @@in_transaction") == 0
        assert pool.stats().discarded == 0
    assert scalar(mysql_tables, f"SELECT COUNT(*) FROM {T_OTHER}") == 0


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


# -- a session the driver opened again by itself (PyMySQL and mysqlclient) -------------------


def _driver_connect(request: pytest.FixtureRequest, driver: str) -> Any:
    """The connect fixture of ``driver``, PyMySQL's or mysqlclient's."""
    return request.getfixturevalue(
        "mysql_connect" if driver == "pymysql" else "mysqlclient_connect"
    )


def _set_time_zone(raw: Any) -> None:
    """A configure hook whose setting a new session would not have."""
    rows(raw, "SET SESSION time_zone = '+05:00'")


def _end_session(admin: Any, session: int) -> None:
    """End a session from the server's side, and wait until it is gone."""
    rows(admin, f"KILL CONNECTION {int(session)}")
    gone = "SELECT id FROM information_schema.processlist WHERE id = %s"
    wait_until(lambda: not rows(admin, gone, (session,)))


@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_a_session_the_driver_reconnected_inside_a_lease_is_not_handed_on(
    request: pytest.FixtureRequest, mysql_tables: Any, driver: str
) -> None:
    # The borrower's session is lost (wait_timeout, a failover...) and the borrower pings with
    # reconnect, as both drivers allow: the driver connects again, on the same connection
    # object.  The new session never saw configure; the next borrower must get one that did.
    with _pool(_driver_connect(request, driver), configure=_set_time_zone) as pool:
        with pool.connection() as conn:
            session = scalar(conn, "SELECT CONNECTION_ID()")
            _end_session(mysql_tables, session)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                conn.ping(True)
            assert scalar(conn, "SELECT CONNECTION_ID()") != session  # a new session
        with pool.connection() as conn:
            assert scalar(conn, "SELECT @@session.time_zone") == "+05:00"
        assert pool.stats().discards["reset_failed"] == 1


@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_a_session_a_check_hook_reconnected_is_not_handed_out(
    request: pytest.FixtureRequest, mysql_tables: Any, driver: str
) -> None:
    # A check hook that pings with reconnect (PyMySQL's ping() does by default before 1.2, as
    # DBUtils' ping=1 calls it) replaces a session lost while the connection sat idle with a
    # new one, on the same connection object, that configure never set up.
    def check(raw: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            raw.ping(True)

    with _pool(_driver_connect(request, driver), configure=_set_time_zone, check=check) as pool:
        with pool.connection() as conn:
            session = scalar(conn, "SELECT CONNECTION_ID()")
        _end_session(mysql_tables, session)
        with pool.connection() as conn:
            assert scalar(conn, "SELECT @@session.time_zone") == "+05:00"
        s = pool.stats()
        assert (s.created, s.discards["check_failed"], s.discarded) == (2, 1, 1), s
