"""psycopg2 and mysqlclient (MySQLdb) against the real servers, and pymssql against a real
SQL Server when DBPOOL_TEST_MSSQL_DSN is set (none runs in our own test environment)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects import for_connection
from tests.conftest import rows

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["psycopg2", "mysqlclient", "pymssql"])
def driver(request: pytest.FixtureRequest) -> tuple[str, Callable[[], Any]]:
    name = request.param
    fixture = {
        "psycopg2": "psycopg2_connect",
        "mysqlclient": "mysqlclient_connect",
        "pymssql": "mssql_connect",
    }[name]
    return name, request.getfixturevalue(fixture)


@pytest.fixture
def pool(driver: tuple[str, Callable[[], Any]]) -> Iterator[dbpool.Pool[Any]]:
    with dbpool.Pool(driver[1], min_size=0, max_size=1, acquire_timeout=5) as pool:
        yield pool


def backend_id(name: str, conn: Any) -> Any:
    sql = {
        "psycopg2": "select pg_backend_pid()",
        "mysqlclient": "select connection_id()",
        "pymssql": "select @@spid",
    }[name]
    return rows(conn, sql)[0][0]


def kill(name: str, connect: Callable[[], Any], session: Any) -> None:
    sql = {
        "psycopg2": f"select pg_terminate_backend({int(session)})",
        "mysqlclient": f"kill connection {int(session)}",
        "pymssql": f"kill {int(session)}",
    }[name]
    admin = connect()
    try:
        if name == "psycopg2":
            admin.autocommit = True
        rows(admin, sql)
    finally:
        admin.close()


def test_dialect_is_detected(driver, pool):
    with pool.connection() as conn:
        assert for_connection(conn.raw).name == driver[0]


ROLLBACKS: list[int] = []


def counting(name: str, connect_kwargs: Any) -> Callable[[], Any]:
    """A connect callable whose connections count their rollback() calls in ROLLBACKS."""
    if name == "psycopg2":
        import psycopg2.extensions

        class Counted(psycopg2.extensions.connection):
            def rollback(self) -> None:
                ROLLBACKS.append(1)
                super().rollback()

        return lambda: psycopg2.connect(connect_kwargs, connection_factory=Counted)
    import MySQLdb.connections

    class CountedMy(MySQLdb.connections.Connection):
        def rollback(self) -> None:
            ROLLBACKS.append(1)
            super().rollback()

    return lambda: CountedMy(**connect_kwargs)


@pytest.mark.parametrize("name", ["psycopg2", "mysqlclient"])
def test_clean_return_is_free_and_pending_work_is_rolled_back(name, request):
    fixture = "psycopg2_connect" if name == "psycopg2" else "mysqlclient_connect"
    request.getfixturevalue(fixture)  # skips, or fails, when the driver or server is missing
    kwargs = request.getfixturevalue("postgresql_dsn" if name == "psycopg2" else "mysql_params")
    ROLLBACKS.clear()
    with dbpool.Pool(counting(name, kwargs), min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            assert for_connection(conn.raw).name == name
            session = backend_id(name, conn)
            conn.commit()
        # That lease handed out conn.raw, which may still run statements after the commit: a
        # driver with no local transaction flag (mysqlclient) is rolled back for it.
        ROLLBACKS.clear()
        with pool.connection() as conn:
            rows(conn, "select 1")
            conn.commit()
        assert ROLLBACKS == []  # nothing pending on return: no round trip
        with pool.connection() as conn:
            rows(conn, "select 1")
        assert ROLLBACKS == [1]
        with pool.connection() as conn:
            assert backend_id(name, conn) == session
        assert pool.stats().discarded == 0


def test_autocommit_changed_on_the_driver_is_restored(driver, pool):
    name = driver[0]
    with pool.connection() as conn:
        if name == "psycopg2":
            conn.raw.autocommit = True
        else:
            conn.raw.autocommit(True)
    with pool.connection() as conn:
        raw = conn.raw
        on = (
            raw.autocommit
            if name == "psycopg2"
            else (raw.get_autocommit() if name == "mysqlclient" else raw.autocommit_state)
        )
        assert on is False


def test_killed_idle_connection_is_replaced(driver):
    name, connect = driver
    with dbpool.Pool(connect, min_size=0, max_size=1, validate_after=0) as pool:
        with pool.connection() as conn:
            session = backend_id(name, conn)
            conn.commit()
        kill(name, connect, session)
        with pool.connection() as conn:
            assert backend_id(name, conn) != session
        assert pool.stats().discarded == 1


def test_pymssql_block_puts_back_the_sessions_level_and_lock_timeout(
    mssql_connect: Callable[[], Any],
) -> None:
    def connect() -> Any:
        conn = mssql_connect()
        cursor = conn.cursor()
        cursor.execute("SET LOCK_TIMEOUT 5000")
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.commit()
        return conn

    level = "SELECT transaction_isolation_level FROM sys.dm_exec_sessions WHERE session_id = @@SPID"
    with dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5) as pool:
        with pool.transaction(isolation="SERIALIZABLE", timeout=5) as tx:
            assert tx.execute(level).fetchall() == [(4,)]
        with pool.connection() as conn:
            assert rows(conn, "SELECT @@LOCK_TIMEOUT") == [(5000,)]
            assert rows(conn, level) == [(3,)]  # REPEATABLE READ


@pytest.mark.parametrize("autocommit", [True, False])
def test_pymssql_transaction_a_borrower_began_with_a_statement_is_not_passed_on(
    mssql_connect: Callable[[], Any], autocommit: bool
) -> None:
    """A BEGIN TRAN run as a statement, with autocommit on (the pool's own setting, or one the
    borrower made): the next borrower finds no transaction of its own open."""

    def connect() -> Any:
        conn = mssql_connect()
        conn.autocommit(autocommit)
        return conn

    with dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5) as pool:
        with pool.connection() as conn:
            conn.autocommit(True)
            rows(conn, "BEGIN TRAN")
            rows(conn, "SELECT 1 AS one")
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first
            expected = 0 if autocommit else 1  # pymssql's own BEGIN TRAN with autocommit off
            assert rows(conn, "SELECT @@TRANCOUNT") == [(expected,)]
