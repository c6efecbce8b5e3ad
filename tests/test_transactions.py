"""Transactions: isolation levels, read-only mode, the deadline, savepoints, retries, and what a
transaction leaves behind for the next borrower.

Against the real servers (sqlite3, PostgreSQL with psycopg 3 and psycopg2, MariaDB with PyMySQL
and mysqlclient) and the fake driver (the generic dialect, and pymssql's).  Every test is bounded
in time and waits on conditions (events, barriers, ``wait_until``); the only sleeps are those
that let a deadline pass.  The commit-outcome tests, which need the fault proxy, are in
``test_transactions_faults.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from time import monotonic
from typing import Any

import pytest

import dbpool
from dbpool import Isolation, PoolError, TransactionTimeout
from dbpool.dialects import PsycopgDialect, PymssqlDialect, PyMySQLDialect
from dbpool.errors import TransactionRolledBack
from tests import fakedb
from tests.conftest import Backend, Connector, rows, scalar, unavailable, wait_until

pytestmark = pytest.mark.timeout(30)

JOIN = 15.0  # seconds: bound on waiting for a worker thread that should be finishing
SLOW = 5  # seconds a deliberately slow statement would run if nothing stopped it
BOUND = 4.0  # seconds: a timed-out transaction must have ended well before SLOW

SLEEP_SQL = {"postgresql": f"select pg_sleep({SLOW})", "mysql": f"select sleep({SLOW})"}
# The server-side limits a deadline sets, read back as one row.
LIMITS_SQL = {
    "postgresql": "select current_setting('statement_timeout'), current_setting('lock_timeout'), "
    "current_setting('idle_in_transaction_session_timeout')",
    "mysql": "select @@session.innodb_lock_wait_timeout, @@session.max_statement_time",
}
SESSION_ID_SQL = {"postgresql": "select pg_backend_pid()", "mysql": "select connection_id()"}
INNODB_LEVEL_SQL = (
    "select trx_isolation_level from information_schema.innodb_trx "
    "where trx_mysql_thread_id = connection_id()"
)
# sqlite3 keeps computing this for minutes unless interrupted.
SQLITE_SLOW_SQL = (
    "with recursive c(x) as (select 1 union all select x + 1 from c where x < 2000000000) "
    "select count(*) from c"
)

SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql", marks=pytest.mark.mysql),
]


class Boom(Exception):
    """Raised by a test inside a block."""


# -- helpers -----------------------------------------------------------------------------------


def tx_rows(tx: dbpool.Transaction[Any], sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    cur = tx.execute(sql, params)
    return [tuple(r) for r in cur.fetchall()] if cur.description else []


def tx_scalar(tx: dbpool.Transaction[Any], sql: str, params: Any = None) -> Any:
    return tx_rows(tx, sql, params)[0][0]


def unique(name: str) -> str:
    """A table name of this process's own: other test runs may share the servers."""
    return f"{name}_{os.getpid()}"


def sql_for(db: Backend, sql: str) -> str:
    """``sql`` written with ``%s`` markers, in the backend's parameter style."""
    return sql.replace("%s", db.placeholder)


def direct(db: Backend, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own, outside any pool, and commit."""
    conn = db.connect()
    try:
        result = rows(conn, sql_for(db, sql), params)
        conn.commit()
        return result
    finally:
        conn.close()


def ids(db: Backend, table: str) -> list[int]:
    return [int(r[0]) for r in direct(db, f"select id from {table} order by id")]


def insert(
    tx: dbpool.Transaction[Any], db: Backend, table: str, key: int, value: str = "x"
) -> None:
    tx.execute(sql_for(db, f"insert into {table} (id, v) values (%s, %s)"), (key, value))


def new_pool(connect: Callable[[], Any], **options: Any) -> dbpool.Pool[Any]:
    settings: dict[str, Any] = {"min_size": 0, "max_size": 1, "acquire_timeout": 5}
    settings.update(options)
    return dbpool.Pool(connect, **settings)


def session_id(db: Backend, conn: Any) -> Any:
    if db.name == "sqlite":
        return id(conn.raw)
    return scalar(conn, SESSION_ID_SQL[db.name])


def open_transaction(db: Backend, raw: Any) -> bool:
    """Whether a driver connection has a transaction open, as its driver tracks it."""
    if db.name == "postgresql":
        import psycopg

        return raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    if db.name == "mysql":
        return bool((raw.server_status or 0) & 0x0001)  # SERVER_STATUS_IN_TRANS
    return bool(raw.in_transaction)


def assert_balanced(pool: dbpool.Pool[Any], in_use: int = 0) -> dbpool.PoolStats:
    s = pool.stats()
    assert s.in_use == in_use, s
    assert s.size == s.idle + s.in_use + s.opening, s
    assert s.created - s.closed == s.size, s
    return s


def assert_clean_next_lease(pool: dbpool.Pool[Any], db: Backend) -> None:
    """The pool balances and its next lease has no transaction open."""
    assert_balanced(pool)
    with pool.connection() as conn:
        assert not open_transaction(db, conn.raw), "the next lease starts inside a transaction"
        assert rows(conn, "select 1") == [(1,)]
    assert_balanced(pool)


def wait_for_value(
    get: Callable[[], Any], expected: Any, what: str, timeout: float = 5.0, interval: float = 0.05
) -> None:
    """Poll ``get()`` until it returns ``expected``; fail naming the last value seen."""
    seen: list[Any] = []

    def matches() -> bool:
        seen.append(get())
        return bool(seen[-1] == expected)

    try:
        wait_until(matches, timeout=timeout, interval=interval)
    except AssertionError:
        raise AssertionError(f"{what}: expected {expected!r}, last saw {seen[-1]!r}") from None


def mariadb_level(
    run: Callable[[str], list[tuple[Any, ...]]], table: str, expected: str, what: str
) -> None:
    """Check the isolation level of the running MariaDB transaction.

    InnoDB registers a transaction at its first read, and information_schema.innodb_trx is a
    cache that InnoDB refreshes only once nobody has read it for 0.1 s: read, then poll more
    slowly than that until the level shows.
    """
    run(f"select id from {table}")

    def level() -> str | None:
        found = run(INNODB_LEVEL_SQL)
        return found[0][0] if found else None

    wait_for_value(level, expected, what, interval=0.15)


def sleep_past(deadline: float | None) -> None:
    """Let a transaction's deadline pass (the only kind of sleep these tests use)."""
    assert deadline is not None
    time.sleep(max(0.0, deadline - monotonic()) + 0.05)
    assert monotonic() > deadline


class Worker:
    """Runs ``fn`` in a daemon thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn,), name=f"test-{name}", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = JOIN) -> Worker:
        self._thread.join(timeout)
        assert self.done, f"{self._thread.name} still running {timeout}s after it should have ended"
        return self


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def pg(pg_connect: Connector) -> Iterator[Backend]:
    import psycopg

    backend = Backend("postgresql", pg_connect, psycopg, pg_connect._connect)
    yield backend
    backend.cleanup()


@pytest.fixture
def my(mysql_connect: Connector) -> Iterator[Backend]:
    import pymysql

    backend = Backend("mysql", mysql_connect, pymysql, mysql_connect._connect)
    yield backend
    backend.cleanup()


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> Backend:
    """PostgreSQL (psycopg 3) or MariaDB (PyMySQL)."""
    return request.getfixturevalue("pg" if request.param == "postgresql" else "my")


@pytest.fixture
def sqlite_path(tmp_path: Any) -> str:
    """A SQLite file with an empty table ``t (id int primary key, v text)``."""
    path = str(tmp_path / "tx.sqlite3")
    conn = sqlite3.connect(path)
    try:
        conn.execute("create table t (id int primary key, v text)")
        conn.commit()
    finally:
        conn.close()
    return path


def sqlite_connector(path: str, busy_timeout: float = 5.0) -> Callable[[], sqlite3.Connection]:
    return lambda: sqlite3.connect(path, timeout=busy_timeout, check_same_thread=False)


def baseline(db: Backend, sql: str) -> tuple[Any, ...]:
    """The first row of ``sql`` on a fresh connection: the server's defaults."""
    conn = db.connect()
    try:
        return rows(conn, sql)[0]
    finally:
        conn.rollback()
        conn.close()


# == 1. what callers may pass ==================================================================

SPELLINGS = [
    (Isolation.READ_UNCOMMITTED, "READ UNCOMMITTED"),
    (Isolation.READ_UNCOMMITTED, "read uncommitted"),
    (Isolation.READ_UNCOMMITTED, "Read_Uncommitted"),
    (Isolation.READ_COMMITTED, "READ_COMMITTED"),
    (Isolation.READ_COMMITTED, "  read   committed "),
    (Isolation.READ_COMMITTED, "rEaD\tCoMmItTeD"),
    (Isolation.REPEATABLE_READ, "repeatable read"),
    (Isolation.REPEATABLE_READ, "REPEATABLE_READ"),
    (Isolation.REPEATABLE_READ, "Repeatable Read"),
    (Isolation.SERIALIZABLE, "SERIALIZABLE"),
    (Isolation.SERIALIZABLE, "serializable"),
    (Isolation.SERIALIZABLE, " Serializable\n"),
]


@pytest.mark.parametrize("expected, text", SPELLINGS)
def test_isolation_names_parse_in_any_case_with_spaces_or_underscores(
    expected: Isolation, text: str
) -> None:
    assert Isolation.parse(text) is expected
    assert Isolation.parse(expected) is expected
    assert dbpool.Isolation is Isolation


# SQL Server's session isolation level, which a block reads before setting its own
_MSSQL_LEVEL = (
    "SELECT transaction_isolation_level FROM sys.dm_exec_sessions WHERE session_id = @@SPID"
)
# What the return sends for a lease that used a pymssql connection: the transaction count put
# back (a commit may leave a BEGIN TRAN statement's transaction open)
_MSSQL_ONE_OPEN = (
    "IF @@TRANCOUNT <> 1 BEGIN IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION; BEGIN TRANSACTION END"
)


@pytest.mark.parametrize("expected, text", SPELLINGS)
def test_only_the_canonical_level_reaches_the_server(
    fake_server: fakedb.Server, expected: Isolation, text: str
) -> None:
    """What the caller wrote is never sent: the SQL carries the enum's own spelling."""
    fake_server.set_result(_MSSQL_LEVEL, [(5,)])  # SNAPSHOT: every level asked for is set
    with new_pool(fake_server.connect_mssql) as pool:
        with pool.transaction(isolation=text) as tx:
            tx.execute("select 1 as x")
    assert fake_server.statements()[1] == f"SET TRANSACTION ISOLATION LEVEL {expected.value}"


BAD_LEVELS = [
    "SERIALIZABLE; DROP TABLE x",
    "serializable;",
    "READ COMMITTED -- comment",
    "SERIALIZABLE'",
    "'; DROP TABLE accounts; --",
    "READ COMMITTED; SET ROLE postgres",
    "",
    "   ",
    "None",
    "null",
    "default",
    "SNAPSHOT",
    "READ",
    "REPEATABLE",
    "SERIALISABLE",
    "READCOMMITTED",
    "READ\x00COMMITTED",
    "Isolation.SERIALIZABLE",
    "read committed snapshot",
    0,
    1,
    4,
    2.5,
    -1,
    True,
    False,
    b"SERIALIZABLE",
    ["SERIALIZABLE"],
    ("READ", "COMMITTED"),
    {"isolation": "SERIALIZABLE"},
    object(),
]


def _untouched(
    fake_server: fakedb.Server, pool: dbpool.Pool[Any], before: dbpool.PoolStats
) -> None:
    assert fake_server.connect_attempts == 0, (
        "a connection was made for arguments that were refused"
    )
    assert fake_server.calls == []
    assert pool.stats() == before


@pytest.mark.parametrize("level", BAD_LEVELS, ids=repr)
def test_a_bad_isolation_is_refused_before_any_connection(
    fake_server: fakedb.Server, level: Any
) -> None:
    called: list[Any] = []
    with new_pool(fake_server.connect_mssql) as pool:
        before = pool.stats()
        with pytest.raises(ValueError, match="isolation"):
            with pool.transaction(isolation=level):
                called.append("block")
        with pytest.raises(ValueError, match="isolation"):
            pool.run_transaction(called.append, isolation=level)
        _untouched(fake_server, pool, before)
    assert called == []


@pytest.mark.parametrize("level", BAD_LEVELS[:8], ids=repr)
def test_a_bad_isolation_on_a_held_lease_sends_nothing(
    fake_server: fakedb.Server, level: Any
) -> None:
    with new_pool(fake_server.connect_mssql) as pool:
        with pool.connection() as conn:
            calls = len(fake_server.calls)
            with pytest.raises(ValueError, match="isolation"):
                with conn.transaction(isolation=level):
                    pytest.fail("the block ran")
            assert len(fake_server.calls) == calls
            with conn.transaction(isolation="serializable") as tx:  # the lease is fine
                tx.execute("select 1 as x")
        assert_balanced(pool)


BAD_OPTIONS = [
    ({"timeout": "5"}, TypeError),
    ({"timeout": b"5"}, TypeError),
    ({"timeout": True}, TypeError),
    ({"timeout": False}, TypeError),
    ({"timeout": [5]}, TypeError),
    ({"timeout": Decimal(5)}, TypeError),
    ({"timeout": 0}, ValueError),
    ({"timeout": 0.0}, ValueError),
    ({"timeout": -1}, ValueError),
    ({"timeout": -0.001}, ValueError),
    ({"timeout": math.nan}, ValueError),
    ({"timeout": math.inf}, ValueError),
    ({"timeout": -math.inf}, ValueError),
    ({"timeout": 1e400}, ValueError),
    ({"readonly": None}, TypeError),
    ({"readonly": 1}, TypeError),
    ({"readonly": 0}, TypeError),
    ({"readonly": "yes"}, TypeError),
    ({"readonly": "False"}, TypeError),
    ({"readonly": 1.0}, TypeError),
]


@pytest.mark.parametrize("options, error", BAD_OPTIONS, ids=repr)
def test_bad_timeout_or_readonly_is_refused_before_any_connection(
    fake_server: fakedb.Server, options: dict[str, Any], error: type[Exception]
) -> None:
    called: list[Any] = []
    with new_pool(fake_server.connect_mssql) as pool:
        before = pool.stats()
        with pytest.raises(error):
            with pool.transaction(**options):
                called.append("block")
        with pytest.raises(error):
            pool.run_transaction(called.append, **options)
        _untouched(fake_server, pool, before)
        with pool.connection() as conn:
            calls = len(fake_server.calls)
            with pytest.raises(error):
                conn.transaction(**options)
            assert len(fake_server.calls) == calls
    assert called == []


@pytest.mark.parametrize("retries", [-1, 1.5, "3", True, None, [2]], ids=repr)
def test_bad_retries_are_refused_before_any_connection(
    fake_server: fakedb.Server, retries: Any
) -> None:
    called: list[Any] = []
    with new_pool(fake_server.connect_mssql) as pool:
        before = pool.stats()
        with pytest.raises((TypeError, ValueError), match="retries"):
            pool.run_transaction(called.append, retries=retries)
        _untouched(fake_server, pool, before)
    assert called == []


def test_isolation_a_dialect_cannot_set_is_refused_and_the_lease_kept(
    fake_server: fakedb.Server,
) -> None:
    """The generic dialect knows no way to set a level: a clear error, no statement sent, and
    the connection goes back to the pool rather than being thrown away."""
    with new_pool(fake_server.connect) as pool:
        for options in ({"isolation": "SERIALIZABLE"}, {"readonly": True}):
            with pytest.raises(ValueError, match="generic"):
                with pool.transaction(**options):
                    pytest.fail("the block ran")
        assert fake_server.statements() == []
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


def test_what_a_dialect_cannot_do_is_refused_without_waiting_for_a_connection(
    sqlite_path: str,
) -> None:
    """Once the pool knows its dialect (from its first connection), an isolation level or a
    read-only mode the dialect cannot give is refused at once, even with every connection
    out: not after a wait for one, nor as a PoolTimeout."""
    with new_pool(sqlite_connector(sqlite_path), acquire_timeout=0.2) as pool:
        with pool.connection():  # the only one: a wait for it ends in PoolTimeout
            with pytest.raises(ValueError, match="READ COMMITTED"):
                with pool.transaction(isolation="read committed"):
                    pytest.fail("the block ran")
            with pytest.raises(ValueError, match="READ COMMITTED"):
                pool.run_transaction(lambda tx: None, isolation="read committed")
        s = assert_balanced(pool)
        assert (s.created, s.timeouts) == (1, 0)


# == 2. the SQL each dialect sends, read back inside the block ==================================


@pytest.mark.parametrize("via", ["pool", "lease"])
@pytest.mark.parametrize("level", list(Isolation), ids=lambda level: level.name)
def test_postgresql_level_inside_and_default_on_the_next_lease(
    pg: Backend, level: Isolation, via: str
) -> None:
    [default] = baseline(pg, "show transaction_isolation")
    with new_pool(pg.connect) as pool:
        if via == "pool":
            with pool.transaction(isolation=level) as tx:
                assert tx_scalar(tx, "show transaction_isolation") == level.value.lower()
                session = tx_scalar(tx, "select pg_backend_pid()")
        else:
            with pool.connection() as conn:
                session = scalar(conn, "select pg_backend_pid()")
                conn.rollback()
                with conn.transaction(isolation=level) as tx:
                    assert tx_scalar(tx, "show transaction_isolation") == level.value.lower()
                # the same lease, after the block: the level was for that transaction only
                assert scalar(conn, "show transaction_isolation") == default
                conn.rollback()
        with pool.connection() as conn:
            assert scalar(conn, "select pg_backend_pid()") == session
            assert scalar(conn, "show transaction_isolation") == default
        assert_balanced(pool)


@pytest.mark.parametrize("via", ["pool", "lease"])
def test_postgresql_read_only_refuses_writes_then_the_next_lease_writes(
    pg: Backend, via: str
) -> None:
    import psycopg

    table = pg.fresh_table(unique("tx_pg_readonly"))
    with new_pool(pg.connect) as pool:
        with pool.connection() as conn:
            session = scalar(conn, "select pg_backend_pid()")
            conn.rollback()
            source = pool if via == "pool" else conn
            if via == "pool":
                conn.close()
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                with source.transaction(readonly=True, isolation="SERIALIZABLE") as tx:
                    assert tx_scalar(tx, "show transaction_read_only") == "on"
                    assert tx_scalar(tx, "show transaction_isolation") == "serializable"
                    insert(tx, pg, table, 1)
            if via == "lease":
                assert scalar(conn, "show transaction_read_only") == "off"
                conn.rollback()
        with pool.connection() as conn:
            assert scalar(conn, "select pg_backend_pid()") == session
            assert scalar(conn, "show transaction_read_only") == "off"
        with pool.transaction() as tx:
            insert(tx, pg, table, 2)
        assert ids(pg, table) == [2]
        assert_clean_next_lease(pool, pg)


@pytest.mark.parametrize("via", ["pool", "lease"])
@pytest.mark.parametrize("level", list(Isolation), ids=lambda level: level.name)
def test_mariadb_level_inside_and_default_on_the_next_lease(
    my: Backend, level: Isolation, via: str
) -> None:
    table = my.fresh_table(unique("tx_my_levels"))
    direct(my, f"insert into {table} (id, v) values (1, 'a')")
    [default] = baseline(my, "select @@tx_isolation")  # REPEATABLE-READ unless configured
    default_level = default.replace("-", " ")
    with new_pool(my.connect) as pool:
        if via == "pool":
            with pool.transaction(isolation=level) as tx:
                mariadb_level(lambda sql: tx_rows(tx, sql), table, level.value, "inside the block")
                session = tx_scalar(tx, "select connection_id()")
        else:
            with pool.connection() as conn:
                session = scalar(conn, "select connection_id()")
                conn.rollback()
                with conn.transaction(isolation=level) as tx:
                    mariadb_level(
                        lambda sql: tx_rows(tx, sql), table, level.value, "inside the block"
                    )
                mariadb_level(
                    lambda sql: rows(conn, sql), table, default_level, "same lease after the block"
                )
                conn.rollback()
        with pool.connection() as conn:
            assert scalar(conn, "select connection_id()") == session
            assert scalar(conn, "select @@tx_isolation") == default
            mariadb_level(lambda sql: rows(conn, sql), table, default_level, "the next lease")
        assert_balanced(pool)


@pytest.mark.parametrize("via", ["pool", "lease"])
def test_mariadb_read_only_refuses_writes_then_the_next_lease_writes(my: Backend, via: str) -> None:
    import pymysql

    table = my.fresh_table(unique("tx_my_readonly"))
    with new_pool(my.connect) as pool:
        with pool.connection() as conn:
            session = scalar(conn, "select connection_id()")
            conn.rollback()
            if via == "pool":
                conn.close()
            source = pool if via == "pool" else conn
            with pytest.raises(pymysql.err.MySQLError) as info:
                with source.transaction(readonly=True) as tx:
                    insert(tx, my, table, 1)
            assert info.value.args[0] == 1792  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
            if via == "lease":
                rows(conn, f"insert into {table} (id, v) values (3, 'x')")
                conn.commit()
        with pool.connection() as conn:
            assert scalar(conn, "select connection_id()") == session
        with pool.transaction() as tx:
            insert(tx, my, table, 2)
        assert ids(my, table) == ([2] if via == "pool" else [2, 3])
        assert_clean_next_lease(pool, my)


def test_sqlite_serializable_takes_the_write_lock_at_begin(sqlite_path: str) -> None:
    """SERIALIZABLE is BEGIN IMMEDIATE: another connection cannot write while the block runs,
    even before the block writes anything; a plain transaction (BEGIN) does not lock yet."""
    other = sqlite3.connect(sqlite_path, timeout=0.05)
    try:
        with new_pool(sqlite_connector(sqlite_path)) as pool:
            with pool.transaction(isolation="SERIALIZABLE") as tx:
                assert tx.connection.raw.in_transaction
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("insert into t (id, v) values (1, 'other')")
                other.rollback()
            other.execute("insert into t (id, v) values (2, 'other')")  # free again
            other.commit()
            with pool.transaction() as tx:  # deferred: no lock until the first write
                other.execute("insert into t (id, v) values (3, 'other')")
                other.commit()
                assert tx_scalar(tx, "select count(*) from t") == 2
            s = assert_balanced(pool)
            assert s.discarded == 0
    finally:
        other.close()


@pytest.mark.parametrize("via", ["pool", "lease"])
def test_sqlite_read_only_refuses_writes_then_the_next_lease_writes(
    sqlite_path: str, via: str
) -> None:
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            if via == "pool":
                conn.close()
            source = pool if via == "pool" else conn
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                with source.transaction(readonly=True) as tx:
                    assert tx_scalar(tx, "select count(*) from t") == 0
                    tx.execute("insert into t (id, v) values (1, 'x')")
            if via == "lease":
                rows(conn, "insert into t (id, v) values (3, 'x')")
                conn.commit()
        with pool.transaction() as tx:
            assert tx.connection.raw is raw
            tx.execute("insert into t (id, v) values (2, 'x')")
        with pool.connection() as conn:
            assert [r[0] for r in rows(conn, "select id from t order by id")] == (
                [2] if via == "pool" else [2, 3]
            )
        s = assert_balanced(pool)
        assert s.discarded == 0


def test_sqlite_read_only_transaction_keeps_a_connection_configured_read_only(
    sqlite_path: str,
) -> None:
    def read_only(raw: sqlite3.Connection) -> None:
        raw.execute("PRAGMA query_only = ON")

    with new_pool(sqlite_connector(sqlite_path), configure=read_only) as pool:
        with pool.transaction(readonly=True) as tx:
            assert tx_scalar(tx, "select count(*) from t") == 0
        with pool.connection() as conn:
            assert rows(conn, "PRAGMA query_only") == [(1,)]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                rows(conn, "insert into t (id, v) values (1, 'x')")
        s = assert_balanced(pool)
        assert s.created == 1


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row)}


def test_sqlite_read_only_and_timed_transactions_work_with_rows_as_dicts(
    sqlite_path: str,
) -> None:
    """A row factory that makes dicts (a common configure) does not change what BEGIN reads
    back: query_only is set for a read-only block, busy_timeout saved and put back."""

    def configure(raw: sqlite3.Connection) -> None:
        raw.row_factory = _dict_row

    with new_pool(sqlite_connector(sqlite_path), configure=configure) as pool:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            with pool.transaction(readonly=True) as tx:
                tx.execute("insert into t (id, v) values (1, 'x')")
        with pool.transaction(timeout=30) as tx:
            tx.execute("insert into t (id, v) values (2, 'x')")
        with pool.connection() as conn:
            assert conn.execute("select id from t").fetchall() == [{"id": 2}]
            assert conn.execute("PRAGMA query_only").fetchall() == [{"query_only": 0}]
            assert conn.execute("PRAGMA busy_timeout").fetchall() == [{"timeout": 5000}]
        s = assert_balanced(pool)
        assert s.discarded == 0


@pytest.mark.mysql
@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_mysql_timed_transactions_work_with_dict_cursors(
    mysql_params: dict[str, Any], driver: str
) -> None:
    """With a connection whose cursors make dicts (cursorclass=DictCursor), a timed block
    reads the session's time limits back as values, and puts them back: a dict row unpacked
    to its column names, which the block's end sent back as the limits (MySQL refused them,
    and the connection was discarded)."""
    if driver == "pymysql":
        import pymysql
        import pymysql.cursors

        def connect() -> Any:
            return pymysql.connect(**mysql_params, cursorclass=pymysql.cursors.DictCursor)
    else:
        try:
            import MySQLdb
            import MySQLdb.cursors
        except ImportError as exc:
            unavailable(f"mysqlclient is not installed: {exc}")

        def connect() -> Any:
            return MySQLdb.connect(**mysql_params, cursorclass=MySQLdb.cursors.DictCursor)

    with new_pool(connect) as pool:
        with pool.connection() as conn:
            # The statement limit the dialect sets: MariaDB's, or MySQL's
            mariadb = "MariaDB" in conn.raw.get_server_info()
            statement = "max_statement_time" if mariadb else "max_execution_time"
            limits = f"SELECT @@session.innodb_lock_wait_timeout AS l, @@session.{statement} AS s"
            before = conn.raw.cursor()
            before.execute(limits)
            expected = before.fetchall()
        with pool.transaction(timeout=30) as tx:
            assert list(tx.execute("SELECT 1 AS one").fetchall()) == [{"one": 1}]
        with pool.connection() as conn:
            after = conn.raw.cursor()
            after.execute(limits)
            assert after.fetchall() == expected
        s = assert_balanced(pool)
        assert s.discarded == 0, s.discards


def test_sqlite_serializable_read_only_transaction_works(sqlite_path: str) -> None:
    """A read-only SERIALIZABLE transaction is meaningful on SQLite (a consistent snapshot):
    it reads, refuses writes, and leaves the connection writable."""
    reached: list[str] = []
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            with pool.transaction(isolation="SERIALIZABLE", readonly=True) as tx:
                reached.append("block")
                assert tx_scalar(tx, "select count(*) from t") == 0
                tx.execute("insert into t (id, v) values (1, 'x')")
        assert reached == ["block"], "BEGIN failed: the block never ran"
        with pool.transaction() as tx:
            tx.execute("insert into t (id, v) values (2, 'x')")
        assert_balanced(pool)


def test_sqlite_failed_begin_leaves_no_read_only_mode_behind(sqlite_path: str) -> None:
    """A read-only SERIALIZABLE transaction begun while another connection holds the write
    lock (BEGIN IMMEDIATE would fail) leaves the connection writable for the next borrower."""
    other = sqlite3.connect(sqlite_path)
    try:
        with new_pool(sqlite_connector(sqlite_path, busy_timeout=0.05)) as pool:
            other.execute("BEGIN IMMEDIATE")
            try:
                with pool.transaction(isolation="SERIALIZABLE", readonly=True) as tx:
                    tx.execute("select count(*) from t").fetchall()
            except sqlite3.OperationalError:
                pass  # refused at BEGIN: fine, as long as nothing is left behind
            other.rollback()
            with pool.connection() as conn:
                rows(conn, "insert into t (id, v) values (1, 'x')")
                conn.commit()
            s = assert_balanced(pool)
            assert s.discarded == 0
    finally:
        other.rollback()
        other.close()


@pytest.mark.parametrize("level", ["REPEATABLE READ", "read committed", Isolation.READ_UNCOMMITTED])
def test_sqlite_refuses_levels_it_does_not_have_and_keeps_the_connection(
    sqlite_path: str, level: Any
) -> None:
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        with pool.connection() as conn:
            raw = conn.raw
        with pytest.raises(ValueError, match="SERIALIZABLE"):
            with pool.transaction(isolation=level):
                pytest.fail("the block ran")
        s = assert_balanced(pool)
        assert s.discarded == 0
        with pool.connection() as conn:
            assert conn.raw is raw
            with pytest.raises(ValueError, match="SERIALIZABLE"):
                with conn.transaction(isolation=level):
                    pytest.fail("the block ran")
            assert not raw.in_transaction
            with conn.transaction(isolation="SERIALIZABLE") as tx:  # the lease is fine
                tx.execute("insert into t (id, v) values (1, 'x')")
            assert not raw.in_transaction
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


def _verbs(fake_server: fakedb.Server) -> list[str]:
    """Calls as the server saw them: statements by their SQL, other verbs by name."""
    return [c.sql if c.sql is not None else c.verb for c in fake_server.calls if c.verb != "cursor"]


@pytest.mark.parametrize(
    ("level", "name", "lock_timeout"),
    [(2, "READ COMMITTED", -1), (5, "SNAPSHOT", 5000), (0, "READ COMMITTED", -1)],
    ids=["defaults", "configured", "unspecified"],
)
def test_pymssql_sets_the_level_and_puts_back_the_sessions_own(
    fake_server: fakedb.Server, level: int, name: str, lock_timeout: int
) -> None:
    """SET TRANSACTION ISOLATION LEVEL and SET LOCK_TIMEOUT last for the session: the block
    puts back what the session had, a configure hook's SNAPSHOT and 5000 ms as the defaults."""
    fake_server.set_result(_MSSQL_LEVEL, [(level,)])
    fake_server.set_result("SELECT @@LOCK_TIMEOUT", [(lock_timeout,)])
    with new_pool(fake_server.connect_mssql) as pool:
        with pool.transaction(isolation="serializable") as tx:
            tx.execute("update t set v = 1")
        assert _verbs(fake_server)[1:] == [
            _MSSQL_LEVEL,
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "update t set v = 1",
            "commit",
            f"SET TRANSACTION ISOLATION LEVEL {name}",
            _MSSQL_ONE_OPEN,
        ]
        with pool.connection() as conn:  # a held lease, with a deadline this time
            with conn.transaction(isolation=Isolation.REPEATABLE_READ, timeout=5) as tx:
                tx.execute("update t set v = 2")
            seen = _verbs(fake_server)[7:]
            assert seen[:3] == [
                _MSSQL_LEVEL,
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
                "SELECT @@LOCK_TIMEOUT",
            ]
            assert (
                re.fullmatch(r"SET LOCK_TIMEOUT (\d+)", seen[3])
                and 1 <= int(seen[3].split()[-1]) <= 5000
            )
            assert seen[4:] == [
                "update t set v = 2",
                "commit",
                f"SET LOCK_TIMEOUT {lock_timeout}",
                f"SET TRANSACTION ISOLATION LEVEL {name}",
            ]
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


def test_pymssql_reads_the_sessions_level_and_lock_timeout_with_dict_cursors(
    fake_server: fakedb.Server,
) -> None:
    """pymssql.connect(as_dict=True) makes every cursor's rows dicts: the block reads the values
    it puts back through a cursor of tuples (pymssql refuses dicts for unnamed columns)."""
    fake_server.set_result(_MSSQL_LEVEL, [(5,)])
    fake_server.set_result("SELECT @@LOCK_TIMEOUT", [(5000,)], columns=("",))

    def connect() -> fakedb.FakeMSSQLConnection:
        conn = fake_server.connect_mssql()
        conn.as_dict = True
        return conn

    with new_pool(connect) as pool:
        with pool.transaction(isolation="serializable", timeout=5) as tx:
            tx.execute("update t set v = 1")
        assert _verbs(fake_server)[-4:] == [
            "commit",
            "SET LOCK_TIMEOUT 5000",
            "SET TRANSACTION ISOLATION LEVEL SNAPSHOT",
            _MSSQL_ONE_OPEN,
        ]
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


def test_pymssql_sends_no_level_the_session_has_already(fake_server: fakedb.Server) -> None:
    fake_server.set_result(_MSSQL_LEVEL, [(4,)])  # SERIALIZABLE
    with new_pool(fake_server.connect_mssql) as pool:
        with pool.transaction(isolation="serializable") as tx:
            tx.execute("update t set v = 1")
        assert _verbs(fake_server)[1:] == [
            _MSSQL_LEVEL,
            "update t set v = 1",
            "commit",
            _MSSQL_ONE_OPEN,
        ]


def test_pymssql_refuses_read_only_before_sending_anything(fake_server: fakedb.Server) -> None:
    with new_pool(fake_server.connect_mssql) as pool:
        with pytest.raises(ValueError, match="read-only"):
            with pool.transaction(readonly=True, isolation="SERIALIZABLE"):
                pytest.fail("the block ran")
        assert fake_server.statements() == [_MSSQL_ONE_OPEN]  # only the return's
        s = assert_balanced(pool)
        assert (s.acquired, s.discarded) == (1, 0)


@pytest.mark.parametrize("via", ["pool", "lease"])
def test_psycopg_in_autocommit_mode_sends_begin_itself(pg: Backend, via: str) -> None:
    import psycopg

    table = pg.fresh_table(unique("tx_pg_autocommit"))

    def connect() -> Any:
        conn = pg.connect()
        conn.autocommit = True
        return conn

    with new_pool(connect) as pool:
        with pool.connection() as conn:
            source = pool if via == "pool" else conn
            if via == "pool":
                conn.close()
            with source.transaction(isolation="REPEATABLE READ") as tx:
                assert (
                    tx.connection.raw.info.transaction_status
                    == psycopg.pq.TransactionStatus.INTRANS
                )
                assert tx_scalar(tx, "show transaction_isolation") == "repeatable read"
                insert(tx, pg, table, 1)
                assert ids(pg, table) == []  # not committed yet
            assert ids(pg, table) == [1]
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                with source.transaction(readonly=True) as tx:
                    assert tx_scalar(tx, "show transaction_read_only") == "on"
                    insert(tx, pg, table, 2)
            if via == "lease":
                assert scalar(conn, "show transaction_isolation") == "read committed"
                assert scalar(conn, "show transaction_read_only") == "off"
        with pool.connection() as conn:
            assert conn.raw.autocommit is True
            assert scalar(conn, "show transaction_isolation") == "read committed"
            assert scalar(conn, "show transaction_read_only") == "off"
        assert ids(pg, table) == [1]
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


@pytest.mark.parametrize("via", ["pool", "lease"])
def test_psycopg2_level_and_read_only_are_for_the_transaction_only(
    psycopg2_connect: Connector, via: str
) -> None:
    import psycopg2

    with new_pool(psycopg2_connect) as pool:
        with pool.connection() as conn:
            session = scalar(conn, "select pg_backend_pid()")
            conn.rollback()
            source = pool if via == "pool" else conn
            if via == "pool":
                conn.close()
            with source.transaction(isolation="REPEATABLE READ") as tx:
                assert tx_scalar(tx, "show transaction_isolation") == "repeatable read"
            with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
                with source.transaction(readonly=True) as tx:
                    assert tx_scalar(tx, "show transaction_read_only") == "on"
                    tx.execute("create temporary table tx_readonly_probe (x int)")
            if via == "lease":  # the same lease, after the blocks: back to the defaults
                assert scalar(conn, "show transaction_isolation") == "read committed"
                assert scalar(conn, "show transaction_read_only") == "off"
                conn.rollback()
        with pool.connection() as conn:
            assert scalar(conn, "select pg_backend_pid()") == session
            assert scalar(conn, "show transaction_isolation") == "read committed"
            assert scalar(conn, "show transaction_read_only") == "off"
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


def test_psycopg2_in_autocommit_mode_commits(psycopg2_connect: Connector, pg: Backend) -> None:
    """With autocommit on, psycopg2's commit() and rollback() send nothing: the explicit BEGIN
    the dialect sent must still be committed, not left open and the work lost."""
    table = pg.fresh_table(unique("tx_pg2_autocommit"))

    def connect() -> Any:
        conn = psycopg2_connect()
        conn.autocommit = True
        return conn

    with new_pool(connect) as pool:
        with pool.transaction(isolation="SERIALIZABLE") as tx:
            assert tx_scalar(tx, "show transaction_isolation") == "serializable"
            tx.execute(f"insert into {table} (id, v) values (1, 'x')")
        assert ids(pg, table) == [1], "the transaction's work was never committed"
        s = assert_balanced(pool)
        assert s.discarded == 0


def test_mysqlclient_level_inside_and_default_on_the_next_lease(
    mysqlclient_connect: Connector, my: Backend
) -> None:
    table = my.fresh_table(unique("tx_mysqlclient"))
    direct(my, f"insert into {table} (id, v) values (1, 'a')")
    [default] = baseline(my, "select @@tx_isolation")
    with new_pool(mysqlclient_connect) as pool:
        with pool.transaction(isolation="SERIALIZABLE") as tx:
            mariadb_level(lambda sql: tx_rows(tx, sql), table, "SERIALIZABLE", "inside the block")
            session = tx_scalar(tx, "select connection_id()")
            insert(tx, my, table, 2)
        assert ids(my, table) == [1, 2]
        with pool.connection() as conn:
            assert scalar(conn, "select connection_id()") == session
            assert scalar(conn, "select @@tx_isolation") == default
            mariadb_level(
                lambda sql: rows(conn, sql), table, default.replace("-", " "), "the next lease"
            )
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


# == 3. the deadline ===========================================================================


def test_slow_statement_is_stopped_at_the_deadline(server: Backend) -> None:
    table = server.fresh_table(unique("tx_deadline"))
    defaults = baseline(server, LIMITS_SQL[server.name])
    with new_pool(server.connect) as pool:
        started = monotonic()
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=0.5) as tx:
                insert(tx, server, table, 1)
                session = session_id(server, tx.connection)
                tx.execute(SLEEP_SQL[server.name])
        elapsed = monotonic() - started
        assert elapsed < BOUND, f"the transaction ran {elapsed:.2f}s past a 0.5s deadline"
        assert isinstance(info.value.__cause__, server.driver.OperationalError), repr(
            info.value.__cause__
        )
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, PoolError)
        s = assert_balanced(pool)
        with pool.connection() as conn:
            assert not open_transaction(server, conn.raw)
            if s.discarded == 0:
                assert session_id(server, conn) == session
            assert rows(conn, LIMITS_SQL[server.name])[0] == defaults
        with pool.transaction(timeout=5) as tx:  # the next transaction works
            insert(tx, server, table, 2)
        assert ids(server, table) == [2]
        assert_clean_next_lease(pool, server)


def test_row_lock_held_elsewhere_times_out_the_same_way(server: Backend) -> None:
    table = server.fresh_table(unique("tx_lock_wait"))
    direct(server, f"insert into {table} (id, v) values (1, 'a')")
    defaults = baseline(server, LIMITS_SQL[server.name])
    holder = server.connect()  # not in autocommit: its update keeps the row locked
    try:
        rows(holder, f"update {table} set v = 'holder' where id = 1")
        with new_pool(server.connect) as pool:
            started = monotonic()
            with pytest.raises(TransactionTimeout) as info:
                with pool.transaction(timeout=0.5) as tx:
                    tx.execute(sql_for(server, f"update {table} set v = %s where id = 1"), ("tx",))
            elapsed = monotonic() - started
            assert elapsed < BOUND, f"the transaction ran {elapsed:.2f}s past a 0.5s deadline"
            assert isinstance(info.value.__cause__, server.driver.OperationalError), repr(
                info.value.__cause__
            )
            holder.rollback()
            assert_balanced(pool)
            with pool.connection() as conn:
                assert rows(conn, LIMITS_SQL[server.name])[0] == defaults
            with pool.transaction(timeout=5) as tx:
                tx.execute(sql_for(server, f"update {table} set v = %s where id = 1"), ("tx",))
            assert direct(server, f"select v from {table}") == [("tx",)]
            assert_clean_next_lease(pool, server)
    finally:
        holder.rollback()
        holder.close()


@contextlib.contextmanager
def deferred_key_held(pg: Backend, name: str) -> Iterator[tuple[str, Any]]:
    """A fresh table whose key is checked at COMMIT (a deferred unique constraint), and a
    session holding key 1 in an open transaction: a COMMIT inserting that key waits for it."""
    table = pg.fresh_table(unique(name))
    direct(pg, f"alter table {table} drop constraint {table}_pkey")
    direct(pg, f"alter table {table} add unique (id) deferrable initially deferred")
    holder = pg.connect()  # not in autocommit: its insert keeps the key locked
    try:
        rows(holder, f"insert into {table} (id, v) values (1, 'holder')")
        yield table, holder
    finally:
        holder.rollback()
        holder.close()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_postgresql_commit_stopped_waiting_for_a_lock_at_the_deadline_times_out(
    request: pytest.FixtureRequest, pg: Backend, driver: str
) -> None:
    """COMMIT runs the deferred constraint checks, which wait for another session's
    uncommitted row with the same key.  The lock_timeout sized to the deadline stops that wait:
    the block ends with TransactionTimeout, chained to the driver's error (as a lock wait of a
    statement inside the block does), the transaction rolled back, the connection kept."""
    connect = pg.connect if driver == "psycopg" else request.getfixturevalue("psycopg2_connect")
    with deferred_key_held(pg, "txn_commit_lock") as (table, holder), new_pool(connect) as pool:
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=0.5) as tx:
                tx.execute(f"insert into {table} (id, v) values (1, 'tx')")  # checked at COMMIT
        cause = info.value.__cause__
        code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        assert code == "55P03", repr(cause)  # lock_not_available
        holder.rollback()
        assert ids(pg, table) == []
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_postgresql_commit_that_starts_late_and_waits_for_a_lock_ends_by_the_deadline(
    request: pytest.FixtureRequest, pg: Backend, driver: str
) -> None:
    """A COMMIT that starts late in the block and waits at a deferred constraint for another
    session's lock: a wait as long as the lock_timeout set at BEGIN would outlast the deadline
    by more than the grace before the socket is cut off, and the block would end with
    CommitOutcomeUnknown and a discarded connection, though nothing was committed and the
    server answers.  The lock wait is bounded by the deadline instead: TransactionTimeout."""
    connect = pg.connect if driver == "psycopg" else request.getfixturevalue("psycopg2_connect")
    with (
        deferred_key_held(pg, "txn_late_commit_lock") as (table, holder),
        new_pool(connect) as pool,
    ):
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=2.0) as tx:
                tx.execute("select pg_sleep(1.5)")  # COMMIT starts 1.5 s after BEGIN
                tx.execute(f"insert into {table} (id, v) values (1, 'tx')")
        holder.rollback()
        assert ids(pg, table) == []
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)
        with pool.connection() as conn:  # the deadline's limits went with the transaction
            assert scalar(conn, "show lock_timeout") == "0"


# A statement with an effect another session can see, and how to see it.
ADVISORY_KEY = os.getpid()
LOCK_NAME = f"dbpool_after_deadline_{os.getpid()}"
MARKER_SQL = {
    "postgresql": f"select pg_advisory_lock(727271, {ADVISORY_KEY})",
    "mysql": f"select get_lock('{LOCK_NAME}', 0)",
    "sqlite": "insert into {table} (id, v) values (99, 'after the deadline')",
}


def _marker_reached(db: Backend, raw: Any, changes_before: int) -> bool:
    if db.name == "postgresql":
        sql = (
            "select count(*) from pg_locks"
            " where locktype = 'advisory' and classid = 727271 and objid = %s"
        )
        return bool(direct(db, sql, (ADVISORY_KEY,))[0][0])
    if db.name == "mysql":
        return direct(db, "select is_used_lock(%s)", (LOCK_NAME,))[0][0] is not None
    return bool(raw.total_changes != changes_before)


def test_statement_after_the_deadline_raises_at_once_without_reaching_the_server(
    db: Backend,
) -> None:
    table = db.fresh_table(unique("tx_after_deadline"))
    with new_pool(db.connect) as pool:
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=0.3) as tx:
                insert(tx, db, table, 1)
                raw = tx.connection.raw
                changes = raw.total_changes if db.name == "sqlite" else 0
                sleep_past(tx.deadline)
                started = monotonic()
                with pytest.raises(TransactionTimeout) as info:
                    tx.execute(MARKER_SQL[db.name].format(table=table))
                assert monotonic() - started < 0.5
                assert info.value.__context__ is None, "the driver was called"
                assert not _marker_reached(db, raw, changes), "the statement reached the server"
                with pytest.raises(TransactionTimeout):
                    tx.cursor()
                with pytest.raises(TransactionTimeout):
                    tx.savepoint()
                with pytest.raises(TransactionTimeout):
                    tx.connection.commit()  # nor a commit through the lease
        # the block ended normally but late: rolled back, not committed
        assert ids(db, table) == []
        assert_clean_next_lease(pool, db)


def test_block_that_ends_after_the_deadline_is_rolled_back(fake_server: fakedb.Server) -> None:
    with new_pool(fake_server.connect) as pool:
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=0.2) as tx:
                tx.execute("update t set v = 1")
                sleep_past(tx.deadline)
        assert fake_server.count("commit") == 0
        assert fake_server.count("rollback") == 1
        assert fake_server.statements() == ["update t set v = 1"]
        s = assert_balanced(pool)
        assert s.discarded == 0


def test_sqlite_slow_statement_is_interrupted(sqlite_path: str) -> None:
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        started = monotonic()
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=0.3) as tx:
                tx.execute("insert into t (id, v) values (1, 'x')")
                tx.execute(SQLITE_SLOW_SQL)
        elapsed = monotonic() - started
        assert elapsed < BOUND, f"the transaction ran {elapsed:.2f}s past a 0.3s deadline"
        assert isinstance(info.value.__cause__, sqlite3.OperationalError), repr(
            info.value.__cause__
        )
        with pool.connection() as conn:
            assert rows(conn, "select count(*) from t") == [(0,)]
            # a held lease: the deadline ends the transaction, the lease stays usable
            with pytest.raises(TransactionTimeout):
                with conn.transaction(timeout=0.3) as tx:
                    tx.execute(SQLITE_SLOW_SQL)
            assert not conn.raw.in_transaction
            assert rows(conn, "select count(*) from t") == [(0,)]
        s = assert_balanced(pool)
        assert (s.created, s.discarded) == (1, 0)


def test_sqlite_deadline_covers_a_begin_waiting_for_the_write_lock(sqlite_path: str) -> None:
    """BEGIN IMMEDIATE waits for another writer for up to the connection's busy timeout; the
    transaction's deadline, which runs from BEGIN, bounds that wait too."""
    other = sqlite3.connect(sqlite_path)
    try:
        other.execute("BEGIN IMMEDIATE")
        with new_pool(sqlite_connector(sqlite_path, busy_timeout=3.0)) as pool:
            started = monotonic()
            with pytest.raises(TransactionTimeout):
                with pool.transaction(isolation="SERIALIZABLE", timeout=0.3):
                    pass
            elapsed = monotonic() - started
            assert elapsed < 2.0, f"the transaction took {elapsed:.2f}s with a 0.3s deadline"
            other.rollback()
            assert_balanced(pool)
    finally:
        other.rollback()
        other.close()


class CancelIgnored(dbpool.dialects.Dialect):
    """A server that lets a cancelled statement end normally, as MySQL's SLEEP() may."""

    name = "cancel-ignored"

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        pass


def test_a_statement_that_ends_normally_past_the_deadline_raises(
    fake_server: fakedb.Server,
) -> None:
    with new_pool(fake_server.connect, dialect=CancelIgnored()) as pool:
        gate = fake_server.block("execute")
        deadline: list[float] = []
        returned: list[bool] = []

        def run() -> None:
            with pool.transaction(timeout=0.2) as tx:
                deadline.append(tx.deadline or 0.0)
                tx.execute("select slow()")
                returned.append(True)

        worker = Worker(run, "held-statement")
        assert gate.entered.wait(JOIN), "the statement never reached the server"
        wait_until(lambda: monotonic() > deadline[0], message="the deadline never passed")
        gate.release()  # the statement ends with its result, cancel or not
        worker.join()
        assert not returned, "a statement that ended past the deadline returned its result"
        assert isinstance(worker.error, TransactionTimeout), repr(worker.error)
        assert fake_server.count("commit") == 0
        assert_balanced(pool)


def test_generic_dialect_closes_the_connection_at_the_deadline(fake_server: fakedb.Server) -> None:
    """No cancel in the generic dialect: the watchdog closes the connection under the
    statement, the caller gets TransactionTimeout, and the pool discards the connection."""
    with new_pool(fake_server.connect) as pool:
        gate = fake_server.block("execute")

        def run() -> None:
            with pool.transaction(timeout=0.3) as tx:
                tx.execute("select slow()")

        worker = Worker(run, "held-statement")
        assert gate.entered.wait(JOIN), "the statement never reached the server"
        [raw] = fake_server.connections
        wait_until(lambda: raw.closed, message="the watchdog did not close the connection")
        gate.release(fakedb.OperationalError("fakedb: connection closed under the statement"))
        worker.join()
        assert isinstance(worker.error, TransactionTimeout), repr(worker.error)
        assert isinstance(worker.error.__cause__, fakedb.OperationalError)
        s = assert_balanced(pool)
        assert s.discarded == 1
        assert fake_server.count("commit") == 0
        with pool.transaction() as tx:  # a new connection
            tx.execute("select 1 as x")
        assert fake_server.connects == 2
        assert_balanced(pool)


def test_pymssql_deadline_never_closes_the_connection_under_its_statement(
    fake_server: fakedb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    """pymssql has no cancel another thread may call, and its close() frees what the running
    call still uses (FreeTDS's dbclose()): past the deadline the statement runs on, bounded by
    SET LOCK_TIMEOUT and pymssql's own timeout.  The connection is never closed under the call;
    one still running a second past the deadline is doomed, and discarded once the call ends,
    and the block ends with TransactionTimeout."""
    overdue = threading.Event()

    class Observed(PymssqlDialect):
        def limit_time(self, conn: Any, seconds: float) -> Any:
            return None  # no statements at BEGIN: the held one is the block's own

        def unlimit_time(self, conn: Any, token: Any) -> None:
            pass

        def sever(self, conn: Any) -> None:
            try:
                super().sever(conn)
            finally:
                overdue.set()

    with new_pool(fake_server.connect_mssql, dialect=Observed()) as pool:
        gate = fake_server.block("execute")

        def run() -> None:
            with pool.transaction(timeout=0.3) as tx:
                tx.execute("select slow()")

        worker = Worker(run, "held-statement")
        try:
            assert gate.entered.wait(JOIN), "the statement never reached the server"
            assert overdue.wait(JOIN), "the watchdog never gave up on the statement"
            [raw] = fake_server.connections
            assert fake_server.closed_under_a_call == []
            assert not raw.closed
        finally:
            gate.release()
        worker.join()
        assert isinstance(worker.error, TransactionTimeout), repr(worker.error)
        assert "cannot stop it from another thread" in caplog.text
        assert fake_server.closed_under_a_call == []
        assert fake_server.count("commit") == 0
        s = assert_balanced(pool)
        assert s.discarded == 1 and raw.closed  # by the thread that returned it


class HeldCancel:
    """A dialect mixin whose cancel waits for the test's go-ahead (bounded) before it is sent,
    like a cancel still on its way while the transaction ends; and no server-side limits, so
    that the statement ends when the test says so."""

    HOLD = 3.0  # seconds: a pool that waits for an in-flight cancel gets it after this

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.sent = threading.Event()

    def limit_time(self, conn: Any, seconds: float) -> Any:
        return None

    def unlimit_time(self, conn: Any, token: Any) -> None:
        pass

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        self.entered.set()
        self.proceed.wait(self.HOLD)
        try:
            super().cancel(conn, side_connect)  # type: ignore[misc]
        finally:
            self.sent.set()


class HeldPsycopgCancel(HeldCancel, PsycopgDialect):
    pass


class HeldPyMySQLCancel(HeldCancel, PyMySQLDialect):
    pass


def _lock_waiting(db: Backend, session: Any) -> bool:
    if db.name == "postgresql":
        sql = "select count(*) from pg_stat_activity where pid = %s and wait_event_type = 'Lock'"
    else:
        sql = (
            "select count(*) from information_schema.processlist"
            " where id = %s and info like 'update%%'"
        )
    return bool(direct(db, sql, (session,))[0][0])


def test_a_late_cancel_never_reaches_the_next_borrower(server: Backend) -> None:
    """The watchdog starts cancelling a statement at the deadline; the statement finishes on its
    own meanwhile, the transaction ends and the connection goes back to the pool.  The cancel,
    still on its way, must not stop the next borrower's statement."""
    table = server.fresh_table(unique("tx_late_cancel"))
    direct(server, f"insert into {table} (id, v) values (1, 'a')")
    dialect = HeldPsycopgCancel() if server.name == "postgresql" else HeldPyMySQLCancel()
    update = sql_for(server, f"update {table} set v = %s where id = 1")
    holder = server.connect()
    try:
        with new_pool(server.connect, dialect=dialect) as pool:
            rows(holder, update, ("holder",))  # the transaction's update will wait for this lock

            def timed_out() -> None:
                with pool.transaction(timeout=0.3) as tx:
                    tx.execute(update, ("tx",))

            first = Worker(timed_out, "deadline")
            assert dialect.entered.wait(JOIN), "the watchdog never tried to cancel"
            holder.rollback()  # the update gets its lock and finishes by itself
            first.join()
            assert isinstance(first.error, TransactionTimeout), repr(first.error)

            rows(holder, update, ("holder again",))
            sessions: list[Any] = []

            def next_borrower() -> None:
                with pool.connection() as conn:
                    sessions.append(session_id(server, conn))  # the same one, unless discarded
                    cur = conn.cursor()
                    cur.execute(update, ("next",))
                    conn.commit()

            second = Worker(next_borrower, "next-borrower")
            wait_until(
                lambda: second.done or (sessions and _lock_waiting(server, sessions[0])),
                timeout=JOIN,
                message="the next borrower's update never started waiting",
            )
            dialect.proceed.set()  # the cancel arrives now
            assert dialect.sent.wait(JOIN)
            holder.rollback()
            second.join()
            assert second.error is None, (
                f"the next borrower's statement was cancelled: {second.error!r}"
            )
            assert direct(server, f"select v from {table}") == [("next",)]
            assert_balanced(pool)
    finally:
        holder.rollback()
        holder.close()


# == 5. retries ================================================================================


class Attempts:
    """Counts calls of a transaction function, per thread and in total."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[str] = []

    def record(self, who: str) -> int:
        """Record a call by ``who``; returns its attempt number, from 1."""
        with self._lock:
            self.calls.append(who)
            return self.calls.count(who)


class RetryTurns:
    """Lets a retried attempt begin only once the other worker's transaction has ended: a
    retry overlapping the other's transaction, still committing (its WAL flush can take tens
    of milliseconds on a busy disk), is a pivot again and fails again, and a handful of such
    retries, backing off for milliseconds, can all fail.  When both are retrying, the lower
    key goes first."""

    def __init__(self, keys: tuple[int, ...]) -> None:
        self._cond = threading.Condition()
        self._state = dict.fromkeys(keys, "running")  # or "waiting" (to retry), or "done"

    def _my_turn(self, key: int) -> bool:
        return all(
            state == "done" or (state == "waiting" and key < other)
            for other, state in self._state.items()
            if other != key
        )

    def wait(self, key: int) -> None:
        with self._cond:
            self._state[key] = "waiting"
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._my_turn(key), timeout=JOIN):
                raise AssertionError(f"retry of {key} never got its turn: {self._state}")
            self._state[key] = "running"

    def done(self, key: int) -> None:
        with self._cond:
            self._state[key] = "done"
            self._cond.notify_all()


def _write_skew(
    pool: dbpool.Pool[Any], table: str, retries: int, attempts: Attempts
) -> list[Worker]:
    """Two SERIALIZABLE transactions that both count the rows, wait for each other, then each
    insert a row holding the count it saw: serially, the counts are 0 and 1."""
    barrier = threading.Barrier(2, timeout=10)
    turns = RetryTurns((1, 2))

    def work(key: int) -> Callable[[], Any]:
        def fn(tx: dbpool.Transaction[Any]) -> int:
            attempt = attempts.record(str(key))
            if attempt > 1:
                turns.wait(key)  # before the first statement, which takes the snapshot
            seen = int(tx_scalar(tx, f"select count(*) from {table}"))
            if attempt == 1:
                barrier.wait()  # both have read before either writes
            tx.execute(f"insert into {table} (id, v) values (%s, %s)", (key, str(seen)))
            return seen

        def run() -> int:
            try:
                return pool.run_transaction(
                    fn, isolation="SERIALIZABLE", retries=retries, timeout=20
                )
            finally:
                turns.done(key)

        return run

    return [Worker(work(key), f"skew-{key}") for key in (1, 2)]


def test_postgresql_serialization_failure_is_retried(pg: Backend) -> None:
    table = pg.fresh_table(unique("tx_write_skew"))
    attempts = Attempts()
    with new_pool(pg.connect, max_size=2) as pool:
        workers = [w.join() for w in _write_skew(pool, table, 5, attempts)]
        assert [w.error for w in workers] == [None, None], attempts.calls
        assert len(attempts.calls) > 2, "no serialization failure happened"
        assert sorted(v for (v,) in direct(pg, f"select v from {table}")) == ["0", "1"]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, pg)


def test_postgresql_serialization_failure_with_no_retries_is_raised(pg: Backend) -> None:
    import psycopg

    table = pg.fresh_table(unique("tx_write_skew"))
    attempts = Attempts()
    with new_pool(pg.connect, max_size=2) as pool:
        workers = [w.join() for w in _write_skew(pool, table, 0, attempts)]
        errors = [w.error for w in workers if w.error is not None]
        assert errors, "both write-skewed transactions committed"
        assert all(isinstance(e, psycopg.errors.SerializationFailure) for e in errors), errors
        assert len(attempts.calls) == 2
        assert len(direct(pg, f"select v from {table}")) == 2 - len(errors)
        assert_clean_next_lease(pool, pg)


@pytest.mark.parametrize("retries", [5, 0])
def test_mariadb_deadlock_is_retried(my: Backend, retries: int) -> None:
    """Two transactions lock two rows in opposite orders; InnoDB rolls one back (1213)."""
    import pymysql

    table = my.fresh_table(unique("tx_deadlock"))
    direct(my, f"insert into {table} (id, v) values (1, '0'), (2, '0')")
    attempts = Attempts()
    barrier = threading.Barrier(2, timeout=10)

    def work(first: int, second: int) -> Callable[[], Any]:
        def fn(tx: dbpool.Transaction[Any]) -> None:
            attempt = attempts.record(str(first))
            tx.execute(f"update {table} set v = v + 1 where id = %s", (first,))
            if attempt == 1:
                barrier.wait()  # each holds one row; each now wants the other's
            tx.execute(f"update {table} set v = v + 1 where id = %s", (second,))

        return lambda: pool.run_transaction(
            fn, isolation="REPEATABLE READ", retries=retries, timeout=20
        )

    with new_pool(my.connect, max_size=2) as pool:
        workers = [Worker(work(1, 2), "lock-1-2"), Worker(work(2, 1), "lock-2-1")]
        for w in workers:
            w.join()
        errors = [w.error for w in workers if w.error is not None]
        if retries:
            assert errors == []
            assert len(attempts.calls) > 2, "no deadlock happened"
            assert direct(my, f"select id, v from {table} order by id") == [(1, "2"), (2, "2")]
        else:
            assert len(errors) == 1 and isinstance(errors[0], pymysql.err.OperationalError), errors
            assert errors[0].args[0] == 1213  # ER_LOCK_DEADLOCK
            assert len(attempts.calls) == 2
            assert direct(my, f"select id, v from {table} order by id") == [(1, "1"), (2, "1")]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, my)


def test_non_retryable_error_is_not_retried(db: Backend) -> None:
    table = db.fresh_table(unique("tx_unique"))
    direct(db, f"insert into {table} (id, v) values (1, 'a')")
    attempts = Attempts()

    def fn(tx: dbpool.Transaction[Any]) -> None:
        attempts.record("fn")
        insert(tx, db, table, 2)
        insert(tx, db, table, 1)  # unique violation

    with new_pool(db.connect) as pool:
        with pytest.raises(db.driver.IntegrityError):
            pool.run_transaction(fn, retries=5, timeout=20)
        assert attempts.calls == ["fn"]
        assert ids(db, table) == [1]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, db)


def _deadlock_victim() -> fakedb.OperationalError:
    return fakedb.OperationalError(
        1205, "Transaction was deadlocked and has been chosen as the deadlock victim"
    )


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_are_counted_exactly(fake_server: fakedb.Server, retries: int) -> None:
    attempts = Attempts()

    def fn(tx: dbpool.Transaction[Any]) -> None:
        attempts.record("fn")
        tx.execute("update t set v = 1")
        raise _deadlock_victim()

    with new_pool(fake_server.connect_mssql) as pool:
        with pytest.raises(fakedb.OperationalError) as info:
            pool.run_transaction(fn, retries=retries)
        assert info.value.args[0] == 1205
        assert len(attempts.calls) == retries + 1
        assert fake_server.count("commit") == 0
        assert fake_server.count("rollback") == retries + 1
        s = assert_balanced(pool)
        assert s.discarded == 0


def test_retry_succeeds_and_returns_the_result(fake_server: fakedb.Server) -> None:
    attempts = Attempts()

    def fn(tx: dbpool.Transaction[Any]) -> str:
        if attempts.record("fn") < 3:
            raise _deadlock_victim()
        tx.execute("update t set v = 1")
        return "done"

    with new_pool(fake_server.connect_mssql) as pool:
        assert pool.run_transaction(fn, retries=5) == "done"
        assert len(attempts.calls) == 3
        assert fake_server.count("commit") == 1
        assert_balanced(pool)


def test_overall_timeout_bounds_the_retries(fake_server: fakedb.Server) -> None:
    attempts = Attempts()

    def fn(tx: dbpool.Transaction[Any]) -> None:
        attempts.record("fn")
        raise _deadlock_victim()

    with new_pool(fake_server.connect_mssql) as pool:
        started = monotonic()
        with pytest.raises((fakedb.OperationalError, TransactionTimeout)):
            pool.run_transaction(fn, retries=1_000_000, timeout=0.5)
        elapsed = monotonic() - started
        # each backoff is capped (1 s), and none may start past the deadline
        assert elapsed < 0.5 + 1.0 + 1.0, f"retries went on for {elapsed:.2f}s with timeout=0.5"
        assert 1 < len(attempts.calls) < 1000
        assert_balanced(pool)


def test_overall_timeout_bounds_each_attempt(pg: Backend) -> None:
    """The deadline of the attempts is the overall one: a slow attempt is stopped by it and
    not retried."""
    attempts = Attempts()

    def fn(tx: dbpool.Transaction[Any]) -> None:
        attempts.record("fn")
        tx.execute(SLEEP_SQL["postgresql"])

    with new_pool(pg.connect) as pool:
        started = monotonic()
        with pytest.raises(TransactionTimeout):
            pool.run_transaction(fn, retries=5, timeout=0.5)
        assert monotonic() - started < BOUND
        assert attempts.calls == ["fn"]
        assert_balanced(pool)


# == 6. savepoints =============================================================================


def test_savepoint_rolls_back_only_its_part(db: Backend) -> None:
    table = db.fresh_table(unique("tx_savepoint"))
    with new_pool(db.connect) as pool:
        with pool.transaction() as tx:
            insert(tx, db, table, 1)
            with pytest.raises(Boom):
                with tx.savepoint():
                    insert(tx, db, table, 2)
                    raise Boom
            insert(tx, db, table, 3)
            with tx.savepoint():
                insert(tx, db, table, 4)
            assert [r[0] for r in tx_rows(tx, f"select id from {table} order by id")] == [1, 3, 4]
        assert ids(db, table) == [1, 3, 4]
        assert_clean_next_lease(pool, db)


def test_error_inside_a_savepoint_leaves_the_transaction_usable(db: Backend) -> None:
    """On PostgreSQL the error puts the whole transaction in error until the rollback to the
    savepoint; elsewhere it fails the statement."""
    table = db.fresh_table(unique("tx_savepoint_error"))
    with new_pool(db.connect) as pool:
        with pool.transaction(isolation="SERIALIZABLE") as tx:
            insert(tx, db, table, 1)
            with pytest.raises(db.driver.Error):
                with tx.savepoint():
                    insert(tx, db, table, 2)
                    if db.name == "postgresql":
                        tx.execute("select 1 / 0")
                    else:
                        insert(tx, db, table, 1)  # duplicate key
            insert(tx, db, table, 3)
            assert [r[0] for r in tx_rows(tx, f"select id from {table} order by id")] == [1, 3]
        assert ids(db, table) == [1, 3]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, db)


def test_a_savepoint_released_in_an_aborted_postgresql_transaction_stops_the_commit(
    pg: Backend,
) -> None:
    """An error caught inside the savepoint's block leaves PostgreSQL's transaction aborted:
    the RELEASE then fails, and the transaction may not go on to commit (PostgreSQL would
    answer COMMIT with a rollback, and the block would seem to have committed)."""
    table = pg.fresh_table(unique("tx_savepoint_release"))
    with new_pool(pg.connect) as pool:
        with pytest.raises(dbpool.ConnectionUnusable, match="releasing a savepoint failed") as info:
            with pool.transaction() as tx:
                insert(tx, pg, table, 1)
                with pytest.raises(pg.driver.Error):
                    with tx.savepoint():
                        try:
                            tx.execute("select 1 / 0")
                        except pg.driver.Error:
                            pass  # caught inside: the savepoint is released, not rolled back to
                with pytest.raises(dbpool.ConnectionUnusable):
                    insert(tx, pg, table, 2)
        assert isinstance(info.value.__cause__, pg.driver.Error), repr(info.value.__cause__)
        assert ids(pg, table) == []
        assert_balanced(pool)
        assert_clean_next_lease(pool, pg)


def test_nested_savepoints(db: Backend) -> None:
    table = db.fresh_table(unique("tx_nested_savepoints"))
    with new_pool(db.connect) as pool:
        with pool.transaction() as tx:
            insert(tx, db, table, 1)
            with tx.savepoint():
                insert(tx, db, table, 2)
                with pytest.raises(Boom):
                    with tx.savepoint():
                        insert(tx, db, table, 3)
                        raise Boom
                with tx.savepoint():
                    insert(tx, db, table, 4)
            with pytest.raises(Boom):
                with tx.savepoint():  # its inner savepoint completed, then the outer one failed
                    insert(tx, db, table, 5)
                    with tx.savepoint():
                        insert(tx, db, table, 6)
                    raise Boom
        assert ids(db, table) == [1, 2, 4]
        assert_clean_next_lease(pool, db)


def test_a_savepoint_object_runs_one_block(db: Backend) -> None:
    """Entered again, inside its own block or after it, a savepoint object would send its
    SAVEPOINT name a second time: on MySQL the inner one replaces the outer, whose RELEASE then
    fails and stops the commit.  It is refused before anything is sent."""
    table = db.fresh_table(unique("tx_savepoint_twice"))
    with new_pool(db.connect) as pool:
        with pool.transaction() as tx:
            insert(tx, db, table, 1)
            savepoint = tx.savepoint()
            with savepoint:
                insert(tx, db, table, 2)
                with pytest.raises(dbpool.PoolError, match="already ran its block"):
                    with savepoint:
                        insert(tx, db, table, 3)
                insert(tx, db, table, 4)
            with pytest.raises(dbpool.PoolError, match=r"take another with tx\.savepoint\(\)"):
                with savepoint:
                    insert(tx, db, table, 5)
            with tx.savepoint():
                insert(tx, db, table, 6)
        assert ids(db, table) == [1, 2, 4, 6]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, db)


# == 7. nothing leaks ==========================================================================


def test_committed_transaction_leaves_a_clean_connection(db: Backend) -> None:
    table = db.fresh_table(unique("tx_commit"))
    with new_pool(db.connect, max_size=2) as pool:
        with pool.connection() as held:  # in_use goes back to 1, not 0
            with pool.transaction(isolation="SERIALIZABLE", timeout=10) as tx:
                insert(tx, db, table, 1)
                assert pool.stats().in_use == 2
            assert_balanced(pool, in_use=1)
            assert ids(db, table) == [1]
            assert not held.released
        assert_clean_next_lease(pool, db)


def test_block_that_raises_rolls_back_and_releases_the_lease(db: Backend) -> None:
    table = db.fresh_table(unique("tx_raise"))
    with new_pool(db.connect) as pool:
        with pytest.raises(Boom):
            with pool.transaction(timeout=10) as tx:
                insert(tx, db, table, 1)
                lease = tx.connection
                raise Boom
        assert lease.released
        assert ids(db, table) == []
        s = assert_balanced(pool)
        assert s.discarded == 0
        with pytest.raises(PoolError):
            tx.execute("select 1")
        with pytest.raises(PoolError):
            tx.savepoint()
        assert_clean_next_lease(pool, db)


def test_block_that_fails_in_the_database_releases_the_lease(db: Backend) -> None:
    table = db.fresh_table(unique("tx_db_error"))
    with new_pool(db.connect) as pool:
        with pytest.raises(db.driver.Error):
            with pool.transaction() as tx:
                insert(tx, db, table, 1)
                tx.execute("select * from no_such_table_here")
        assert ids(db, table) == []
        assert_clean_next_lease(pool, db)


def test_transaction_inside_a_transaction_on_the_same_lease_is_refused(db: Backend) -> None:
    table = db.fresh_table(unique("tx_nested"))
    with new_pool(db.connect, max_size=2) as pool:
        with pool.connection() as conn:
            with conn.transaction() as tx:
                insert(tx, db, table, 1)
                with pytest.raises(PoolError, match="savepoint"):
                    with conn.transaction():
                        pytest.fail("the inner block ran")
                with pytest.raises(PoolError):
                    with tx.connection.transaction(isolation="SERIALIZABLE"):
                        pytest.fail("the inner block ran")
                insert(tx, db, table, 2)  # the outer transaction goes on
            assert ids(db, table) == [1, 2]
            assert not open_transaction(db, conn.raw)
        with pool.transaction() as tx:  # pool.transaction() inside: its own connection
            insert(tx, db, table, 3)
            with pytest.raises(PoolError):
                with tx.connection.transaction():
                    pytest.fail("the inner block ran")
            with pool.transaction() as other:
                assert other.connection.raw is not tx.connection.raw
                if db.name != "sqlite":  # one writer at a time on SQLite
                    insert(other, db, table, 4)
        assert ids(db, table) == ([1, 2, 3] if db.name == "sqlite" else [1, 2, 3, 4])
        assert_clean_next_lease(pool, db)


def test_transaction_on_a_lease_with_pending_work_is_refused(db: Backend) -> None:
    table = db.fresh_table(unique("tx_pending"))
    with new_pool(db.connect) as pool:
        with pool.connection() as conn:
            rows(conn, sql_for(db, f"insert into {table} (id, v) values (%s, %s)"), (1, "pending"))
            with pytest.raises(PoolError, match="pending"):
                with conn.transaction():
                    pytest.fail("the block ran")
            assert open_transaction(db, conn.raw), "the pending work was touched"
            conn.commit()
            with conn.transaction() as tx:  # fine once committed
                insert(tx, db, table, 2)
        assert ids(db, table) == [1, 2]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, db)


def test_repr_and_connection_outside_the_block(fake_server: fakedb.Server) -> None:
    with new_pool(fake_server.connect_mssql) as pool:
        tx = pool.transaction(isolation="serializable")
        assert "not open" in repr(tx) and "SERIALIZABLE" in repr(tx)
        with pytest.raises(PoolError):
            _ = tx.connection
        with tx:
            assert "open" in repr(tx)
            assert tx.deadline is None
        with pool.transaction(timeout=5) as tx:
            assert tx.deadline is not None and tx.deadline <= monotonic() + 5
        assert_balanced(pool)


@pytest.mark.parametrize("spelling", ["ſerializable", "serıalızable", "repeatable-read"])
def test_isolation_names_outside_the_documented_spellings_are_refused(spelling: str) -> None:
    with pytest.raises(ValueError, match="unknown isolation level"):
        Isolation.parse(spelling)


# == 8. what a block finds at BEGIN and leaves to COMMIT ========================================


def autocommit_connect(db: Backend) -> Callable[[], Any]:
    """``db``'s connect callable (MariaDB), its connections in autocommit mode."""

    def connect() -> Any:
        conn = db.connect()
        conn.autocommit(True)
        return conn

    return connect


def test_mariadb_transaction_on_a_lease_with_an_unread_result_is_refused(my: Backend) -> None:
    """PyMySQL reports a lease whose unbuffered result is not read to the end as busy; a
    transaction used to start there anyway, and its START TRANSACTION committed the work
    pending on the lease."""
    import pymysql.cursors

    table = my.fresh_table(unique("tx_unread"))
    with new_pool(my.connect) as pool:
        with pool.connection() as conn:
            rows(conn, f"insert into {table} (id, v) values (1, 'pending')")
            unread = conn.cursor(pymysql.cursors.SSCursor)
            unread.execute("select 1 union select 2")
            with pytest.raises(PoolError, match="not read to the end"):
                with conn.transaction():
                    pytest.fail("the block ran")
            unread.close()
            conn.rollback()
        assert ids(my, table) == []
        assert_clean_next_lease(pool, my)


def test_postgresql_transaction_on_a_lease_with_a_stream_under_way_is_refused(
    pg: Backend,
) -> None:
    with new_pool(pg.connect) as pool:
        with pool.connection() as conn:
            stream = conn.cursor().stream("select generate_series(1, 1000)")
            assert next(stream) == (1,)  # libpq: a command still active
            with pytest.raises(PoolError, match="not read to the end"):
                with conn.transaction():
                    pytest.fail("the block ran")
            stream.close()
            conn.rollback()
        assert_clean_next_lease(pool, pg)


def test_transaction_on_a_lost_connection_is_refused(fake_server: fakedb.Server) -> None:
    with new_pool(fake_server.connect) as pool:
        with pool.connection() as conn:
            conn.raw.close()  # the generic dialect then reads it as broken
            with pytest.raises(PoolError, match="closed or lost"):
                with conn.transaction():
                    pytest.fail("the block ran")
        s = assert_balanced(pool)
        assert s.discarded == 1


def _create_procedure(db: Backend, name: str, body: str) -> None:
    direct(db, f"drop procedure if exists {name}")
    direct(db, f"create procedure {name}() begin {body} end")


@pytest.mark.parametrize("call", ["execute", "callproc", "conn.query", "conn.raw"])
def test_pymysql_statement_that_opened_a_transaction_and_failed_leaves_nothing_open(
    my: Backend, call: str
) -> None:
    """PyMySQL takes its transaction flags from OK packets only.  A statement that opened a
    transaction and then failed (a procedure: START TRANSACTION, INSERT, SIGNAL) left the
    flags of the call before, "autocommit, no transaction": the pool handed the open
    transaction to the next borrower, and conn.transaction() began another on top of it
    (START TRANSACTION committed the insert)."""
    import pymysql

    table = my.fresh_table(unique("tx_stale"))
    proc = unique("tx_stale_proc")
    _create_procedure(
        my,
        proc,
        f"start transaction; insert into {table} (id, v) values (1, 'x'); "
        "signal sqlstate '45000' set message_text = 'failed inside a transaction';",
    )
    try:
        with new_pool(autocommit_connect(my)) as pool:
            with pool.connection() as conn:
                cur = conn.cursor()
                with pytest.raises(pymysql.err.MySQLError, match="failed inside"):
                    if call == "execute":
                        cur.execute(f"call {proc}()")
                    elif call == "callproc":
                        cur.callproc(proc)
                    elif call == "conn.query":  # PyMySQL's own method, passed through
                        conn.query(f"call {proc}()")
                    else:
                        raw = conn.raw.cursor()
                        raw.execute("select 1")  # fresh flags from its reply, then stale
                        raw.execute(f"call {proc}()")
                with pytest.raises(PoolError, match="pending"):
                    with conn.transaction():
                        pytest.fail("a transaction began on top of the open one")
            with pool.connection() as conn:  # the same connection, rolled back on return
                assert rows(conn, "select @@in_transaction") == [(0,)]
            s = assert_balanced(pool)
            assert (s.created, s.discarded) == (1, 0)
        assert ids(my, table) == []
    finally:
        direct(my, f"drop procedure if exists {proc}")


def test_pymysql_transaction_after_a_failed_statement_that_opened_nothing(my: Backend) -> None:
    """The flags, stale after the failure, are read again before BEGIN: an autocommit
    statement that failed leaves nothing pending, and the transaction starts."""
    import pymysql

    table = my.fresh_table(unique("tx_stale_none"))
    direct(my, f"insert into {table} (id, v) values (1, 'a')")
    with new_pool(autocommit_connect(my)) as pool:
        with pool.connection() as conn:
            with pytest.raises(pymysql.err.IntegrityError):
                rows(conn, f"insert into {table} (id, v) values (1, 'again')")
            with conn.transaction() as tx:
                insert(tx, my, table, 2)
        assert ids(my, table) == [1, 2]


@pytest.mark.parametrize("timeout", [None, 10.0])
def test_block_that_caught_an_error_commits_only_what_the_server_kept(
    db: Backend, timeout: float | None
) -> None:
    """A statement fails inside the block; the block catches the error and ends normally.
    PostgreSQL aborted the transaction, and its COMMIT then rolls back and reports success:
    the block used to "commit" without an error.  SQLite and MariaDB undo the failed statement
    only, and the rest commits."""
    table = db.fresh_table(unique("tx_caught"))
    direct(db, f"insert into {table} (id, v) values (1, 'a')")
    with new_pool(db.connect) as pool:

        def block() -> None:
            with pool.transaction(timeout=timeout) as tx:
                insert(tx, db, table, 2)
                with pytest.raises(db.driver.IntegrityError):
                    insert(tx, db, table, 1)

        if db.name == "postgresql":
            with pytest.raises(TransactionRolledBack, match="rolled back") as info:
                block()
            assert isinstance(info.value.__cause__, db.driver.errors.UniqueViolation)
            assert ids(db, table) == [1]
        else:
            block()
            assert ids(db, table) == [1, 2]
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, db)


def test_psycopg2_block_that_caught_an_error_is_rolled_back(
    psycopg2_connect: Connector, pg: Backend
) -> None:
    import psycopg2.errors

    table = pg.fresh_table(unique("tx_caught_pg2"))
    direct(pg, f"insert into {table} (id, v) values (1, 'a')")
    with new_pool(psycopg2_connect) as pool:
        with pytest.raises(TransactionRolledBack) as info:
            with pool.transaction() as tx:
                insert(tx, pg, table, 2)
                with pytest.raises(psycopg2.errors.UniqueViolation):
                    insert(tx, pg, table, 1)
        assert isinstance(info.value.__cause__, psycopg2.errors.UniqueViolation)
        assert ids(pg, table) == [1]
        with pool.connection() as conn:
            assert conn.raw.get_transaction_status() == 0  # idle
        s = assert_balanced(pool)
        assert s.discarded == 0


@pytest.mark.parametrize("conflict", ["insert or rollback", "raise(rollback) in a trigger"])
def test_sqlite_block_whose_transaction_a_conflict_rolled_back_raises(
    sqlite_path: str, conflict: str
) -> None:
    """SQLite resolves these conflicts by rolling the whole transaction back; the block caught
    the error, and its COMMIT then did nothing and reported success."""
    setup = sqlite3.connect(sqlite_path)
    setup.execute("insert into t (id, v) values (1, 'a')")
    setup.execute(
        "create trigger refuse before insert on t when new.v = 'refused' "
        "begin select raise(rollback, 'refused by a trigger'); end"
    )
    setup.commit()
    setup.close()
    statement = {
        "insert or rollback": "insert or rollback into t (id, v) values (1, 'again')",
        "raise(rollback) in a trigger": "insert into t (id, v) values (3, 'refused')",
    }[conflict]
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        with pytest.raises(TransactionRolledBack, match="rolled the transaction back") as info:
            with pool.transaction() as tx:
                tx.execute("insert into t (id, v) values (2, 'b')")
                with pytest.raises(sqlite3.IntegrityError) as conflict:
                    tx.execute(statement)
                # refused: sqlite3 would begin a new transaction behind the block's back
                tx.execute("insert into t (id, v) values (4, 'after')")
        assert info.value.__cause__ is conflict.value
        with pool.connection() as conn:
            assert rows(conn, "select id from t") == [(1,)]
        s = assert_balanced(pool)
        assert s.discarded == 0


def test_mariadb_block_that_caught_a_deadlock_raises_and_runs_nothing_more(my: Backend) -> None:
    """InnoDB rolls the deadlock victim's whole transaction back.  A block that caught the
    error used to go on: its next statement began a new transaction (or, with autocommit on,
    committed on its own), and COMMIT reported success with the work before the deadlock
    gone."""
    import pymysql

    locks = my.fresh_table(unique("tx_deadlock_locks"))
    work = my.fresh_table(unique("tx_deadlock_work"))
    bulk = my.fresh_table(unique("tx_deadlock_bulk"))
    direct(my, f"insert into {locks} (id, v) values (1, 'a'), (2, 'b')")
    rival = my.connect()
    rival_holds_two = threading.Event()
    rival_error: list[BaseException] = []

    def waiting_for_a_lock() -> bool:
        sql = "select count(*) from information_schema.innodb_trx where trx_state = 'LOCK WAIT'"
        return bool(direct(my, sql)[0][0])

    def rival_side() -> None:
        try:
            cur = rival.cursor()
            # Many rows changed: InnoDB then picks the block's lighter transaction as victim.
            cur.executemany(
                f"insert into {bulk} (id, v) values (%s, 'x')", [(i,) for i in range(200)]
            )
            cur.execute(f"update {locks} set v = 'rival' where id = 2")
            rival_holds_two.set()
            wait_until(waiting_for_a_lock, timeout=BOUND, message="the block never waited")
            cur.execute(f"update {locks} set v = 'rival' where id = 1")  # the deadlock
            rival.commit()
        except BaseException as exc:
            rival_error.append(exc)
            rival_holds_two.set()

    thread = threading.Thread(target=rival_side, name="rival")
    try:
        with new_pool(my.connect) as pool:
            with pytest.raises(TransactionRolledBack, match="rolled the transaction back") as info:
                with pool.transaction(timeout=BOUND) as tx:
                    insert(tx, my, work, 1)
                    tx.execute(f"update {locks} set v = 'block' where id = 1")
                    thread.start()
                    assert rival_holds_two.wait(BOUND)
                    with pytest.raises(pymysql.err.OperationalError) as deadlock:
                        tx.execute(f"update {locks} set v = 'block' where id = 2")
                    assert deadlock.value.args[0] == 1213
                    insert(tx, my, work, 2)  # refused: the transaction is gone
            thread.join(BOUND)
            assert not rival_error, rival_error
            assert info.value.__cause__ is deadlock.value
            assert ids(my, work) == []
            s = assert_balanced(pool)
            assert s.discarded == 0
            assert_clean_next_lease(pool, my)
    finally:
        rival.close()


@pytest.mark.parametrize("autocommit", [False, True])
def test_mariadb_block_that_caught_a_ddl_error_commits(my: Backend, autocommit: bool) -> None:
    """A DDL statement commits the open transaction before it runs, even one that then
    fails: the block's transaction was then closed at COMMIT, after an error, and was taken
    for rolled back (TransactionRolledBack, with the rows committed)."""
    import pymysql

    table = my.fresh_table(unique("tx_ddl"))

    def connect() -> Any:
        conn = my.connect()
        conn.autocommit(autocommit)
        return conn

    with new_pool(connect) as pool:
        with pool.transaction() as tx:
            insert(tx, my, table, 1)
            with pytest.raises(pymysql.err.MySQLError):
                tx.execute(f"create table {table} (id int)")  # exists already
            insert(tx, my, table, 2)
        assert ids(my, table) == [1, 2]
        s = assert_balanced(pool)
        assert s.discarded == 0


def test_sqlite_executescript_is_refused_inside_a_block(sqlite_path: str) -> None:
    """sqlite3's executescript() commits the open transaction first: inside a block it would
    commit half the block's work."""
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        with pool.connection() as conn:
            with pytest.raises(Boom):
                with conn.transaction() as tx:
                    tx.execute("insert into t (id, v) values (1, 'a')")
                    for target in (conn, conn.cursor()):
                        with pytest.raises(PoolError, match="executescript"):
                            target.executescript("insert into t (id, v) values (2, 'b');")
                    raise Boom
            conn.executescript("insert into t (id, v) values (3, 'c');")  # outside: as before
            assert rows(conn, "select id from t") == [(3,)]
        s = assert_balanced(pool)
        assert s.discarded == 0


@pytest.mark.parametrize("verb", ["commit", "rollback"])
def test_commit_or_rollback_through_the_lease_inside_a_block_is_refused(
    db: Backend, verb: str
) -> None:
    """They used to go through: the block's transaction ended half-way, and the rest of the
    block ran outside it (on an autocommit connection, committed statement by statement)."""
    table = db.fresh_table(unique("tx_inner_commit"))
    with new_pool(db.connect) as pool:
        with pool.connection() as conn:
            with pytest.raises(Boom):
                with conn.transaction() as tx:
                    insert(tx, db, table, 1)
                    with pytest.raises(PoolError, match="inside a transaction block"):
                        getattr(conn, verb)()
                    insert(tx, db, table, 2)  # still inside the block's transaction
                    raise Boom
            assert not open_transaction(db, conn.raw)
        with pool.transaction() as tx:
            insert(tx, db, table, 3)
            with pytest.raises(PoolError, match="inside a transaction block"):
                getattr(tx.connection, verb)()
        assert ids(db, table) == [3]
        s = assert_balanced(pool)
        assert s.discarded == 0


SQLITE_SECONDS_SQL = (  # about a few seconds of work, if nothing interrupts it
    "with recursive c(x) as (select 1 union all select x + 1 from c where x < 10000000) "
    "select count(*) from c"
)


def test_sqlite_statement_run_through_the_lease_connection_is_watched(sqlite_path: str) -> None:
    """sqlite3's conn.execute(), reached through the lease, used to run unseen by the
    watchdog: never interrupted at the deadline, nor refused after it."""
    with new_pool(sqlite_connector(sqlite_path)) as pool:
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=0.3) as tx:
                tx.connection.execute("insert into t (id, v) values (1, 'x')")
                tx.connection.execute(SQLITE_SECONDS_SQL).fetchall()
        assert isinstance(info.value.__cause__, sqlite3.OperationalError), repr(
            info.value.__cause__
        )
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=0.3) as tx:
                raw = tx.connection.raw
                changes = raw.total_changes
                sleep_past(tx.deadline)
                with pytest.raises(TransactionTimeout):
                    tx.connection.execute("insert into t (id, v) values (2, 'x')")
                assert raw.total_changes == changes, "the statement ran past the deadline"
        with pool.connection() as conn:
            assert rows(conn, "select count(*) from t") == [(0,)]
        s = assert_balanced(pool)
        assert s.discarded == 0


class NoServerTimeouts(PsycopgDialect):
    """No server-side limits: only the watchdog's cancel can stop a statement at the
    deadline."""

    def limit_time(self, conn: Any, seconds: float) -> Any:
        return None


@pytest.mark.parametrize("how", ["connection.execute", "server-side cursor", "stream"])
def test_postgresql_statement_past_the_cursor_methods_is_cancelled_at_the_deadline(
    pg: Backend, how: str
) -> None:
    import psycopg

    slow = f"select pg_sleep({SLOW})"
    with new_pool(pg.connect, dialect=NoServerTimeouts()) as pool:
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=0.3) as tx:
                if how == "connection.execute":
                    tx.connection.execute(slow)
                elif how == "server-side cursor":
                    cur = tx.connection.cursor(name="slow")
                    cur.execute(slow)  # DECLARE: the query runs as rows are fetched
                    for _ in cur:
                        pass
                else:
                    for _ in tx.cursor().stream(slow):
                        pass
        assert isinstance(info.value.__cause__, psycopg.errors.QueryCanceled), repr(
            info.value.__cause__
        )
        s = assert_balanced(pool)
        assert s.discarded == 0
        assert_clean_next_lease(pool, pg)


def test_a_cursor_iterated_inside_a_block_stays_usable(db: Backend) -> None:
    """Inside a block, iteration is watched step by step; a cursor that is its own iterator
    (sqlite3's) is not closed when the iteration ends."""
    table = db.fresh_table(unique("tx_iterate"))
    direct(db, f"insert into {table} (id, v) values (1, 'a'), (2, 'b')")
    with new_pool(db.connect) as pool:
        with pool.transaction(timeout=10) as tx:
            cur = tx.cursor()
            cur.execute(f"select id from {table} order by id")
            assert [tuple(r) for r in cur] == [(1,), (2,)]
            cur.execute(f"select count(*) from {table}")
            assert [tuple(r) for r in cur.fetchall()] == [(2,)]
        assert_clean_next_lease(pool, db)
