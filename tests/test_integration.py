"""The pool against real drivers and servers: sqlite3 always, PostgreSQL (psycopg 3) and MariaDB
(PyMySQL) through the fixtures in conftest.py.

Every test is bounded in time and waits on conditions (``wait_until``, barriers, ``join`` with a
deadline), never on sleeps; none asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import socket
import sqlite3
import threading
import traceback
import weakref
from collections.abc import Iterator
from time import monotonic
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects import for_connection
from tests.conftest import Backend, child_report

pytestmark = pytest.mark.timeout(30)

SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql", marks=pytest.mark.mysql),
]

# The dialect each backend's connections must get, by the db fixture's backend name.
DIALECT_NAMES = {"sqlite": "sqlite3", "postgresql": "psycopg", "mysql": "pymysql"}


def fetch(conn: Any, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a lease or a driver connection; its rows as a list of tuples."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return [tuple(row) for row in cur.fetchall()] if cur.description else []
    finally:
        cur.close()


def count_rows(db: Backend, table: str) -> int:
    """Rows of ``table`` seen by a connection of its own, outside any pool."""
    other = db.connect()
    try:
        [(count,)] = fetch(other, f"select count(*) from {table}")
        return int(count)
    finally:
        other.rollback()
        other.close()


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@pytest.fixture
def make_pool() -> Iterator[Callable[..., dbpool.Pool[Any]]]:
    """Make pools that are closed at the end of the test; ``min_size`` defaults to 0."""
    pools: list[dbpool.Pool[Any]] = []

    def make(connect: Callable[[], Any], **options: Any) -> dbpool.Pool[Any]:
        options.setdefault("min_size", 0)
        options.setdefault("acquire_timeout", 10.0)
        pool = dbpool.Pool(connect, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(timeout=2.0)


# -- 1. an open transaction is rolled back on return ---------------------------------------


def test_uncommitted_write_is_rolled_back_on_return(db: Backend, make_pool: Any) -> None:
    table = db.fresh_table("dbpool_it_rollback")
    insert = f"insert into {table} (id, v) values ({db.placeholder}, {db.placeholder})"
    pool = make_pool(db.connect, max_size=1)

    with pool.connection() as conn:
        fetch(conn, insert, (1, "never committed"))
        session = db.backend_id(conn)
    with pool.connection() as conn:
        # The same session would see its own uncommitted row, had it not been rolled back.
        assert db.backend_id(conn) == session
        assert fetch(conn, f"select count(*) from {table}") == [(0,)]
    assert count_rows(db, table) == 0

    with pytest.raises(RuntimeError, match="leaving the block"), pool.connection() as conn:
        fetch(conn, insert, (2, "never committed either"))
        raise RuntimeError("leaving the block with an exception")
    with pool.connection() as conn:
        assert db.backend_id(conn) == session
        assert fetch(conn, f"select count(*) from {table}") == [(0,)]
    assert count_rows(db, table) == 0

    s = pool.stats()
    assert (s.created, s.discarded, s.in_use, s.idle) == (1, 0, 0, 1)
    pool.close()
    assert count_rows(db, table) == 0


def test_autocommit_switched_on_by_a_borrower_does_not_reach_the_next(
    db: Backend, make_pool: Any
) -> None:
    table = db.fresh_table("dbpool_it_autocommit")
    pool = make_pool(db.connect, max_size=1)
    with pool.connection() as conn:
        raw = conn.raw  # switched on the driver's connection itself, behind the lease's back
        if db.name == "sqlite":
            raw.isolation_level = None
        elif db.name == "postgresql":
            raw.autocommit = True
        else:
            raw.autocommit(True)
    with pool.connection() as conn:
        assert conn.raw is raw
        fetch(conn, f"insert into {table} (id, v) values (1, 'not committed')")
    assert count_rows(db, table) == 0
    assert pool.stats().discarded == 0


def test_failed_statement_leaves_a_healthy_connection_that_is_kept(
    db: Backend, make_pool: Any
) -> None:
    pool = make_pool(db.connect, max_size=1)
    with pool.connection() as conn:
        session = db.backend_id(conn)
        with pytest.raises(db.driver.Error):
            fetch(conn, "select * from dbpool_it_no_such_table")
        # returned without rollback: on PostgreSQL the transaction is aborted
    with pool.connection() as conn:
        assert db.backend_id(conn) == session
        assert fetch(conn, "select 1") == [(1,)]
    s = pool.stats()
    assert (s.created, s.discarded) == (1, 0)


def test_statement_timeout_is_not_mistaken_for_a_broken_connection(
    pg_connect: Any, make_pool: Any
) -> None:
    # PostgreSQL's statement_timeout raises an OperationalError on a healthy connection.
    import psycopg

    pool = make_pool(pg_connect, max_size=1)
    with pool.connection() as conn:
        session = conn.raw.info.backend_pid
        fetch(conn, "set local statement_timeout = 1")
        with pytest.raises(psycopg.errors.QueryCanceled):
            fetch(conn, "select pg_sleep(10)")
    with pool.connection() as conn:
        assert conn.raw.info.backend_pid == session
        assert fetch(conn, "show statement_timeout") == [("0",)]
    assert pool.stats().discarded == 0


def test_dropped_lease_is_rolled_back_and_returned(db: Backend, make_pool: Any) -> None:
    table = db.fresh_table("dbpool_it_dropped")
    pool = make_pool(db.connect, max_size=1)
    lease = pool.connect()
    cur = lease.cursor()  # as nearly every borrower does
    cur.execute(f"insert into {table} (id, v) values (1, 'dropped')")
    cur.close()
    dropped = weakref.ref(lease)
    try:
        with pytest.warns(ResourceWarning, match="without being released"):
            del cur, lease
            gc.collect()
        assert dropped() is None
        with pool.connection(timeout=5) as conn:
            assert fetch(conn, f"select count(*) from {table}") == [(0,)]
    finally:
        leftover = dropped()
        if leftover is not None:  # still referenced: return it so nothing leaks into other tests
            leftover.close()
    assert count_rows(db, table) == 0
    s = pool.stats()
    assert (s.created, s.discarded, s.in_use) == (1, 0, 0)


# -- 2. no extra round trip on a clean return or a hot checkout -----------------------------
#
# Subclasses of each driver's connection class log every call that reaches the server: "sql"
# (a statement), "commit", "rollback", "ping".  The pool picks the dialect by walking the class's
# bases, so the subclasses keep their driver's dialect.


@functools.cache
def counting_class(backend: str) -> type:
    if backend == "sqlite":

        class CountingSQLite(sqlite3.Connection):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.log: list[tuple[str, ...]] = []
                # Every statement SQLite runs, implicit BEGIN / COMMIT / ROLLBACK included.
                self.set_trace_callback(lambda sql: self.log.append(("sql", sql)))

            def commit(self) -> None:
                self.log.append(("commit",))
                super().commit()

            def rollback(self) -> None:
                self.log.append(("rollback",))
                super().rollback()

            @property  # type: ignore[override]
            def total_changes(self) -> int:  # the sqlite3 dialect's ping
                self.log.append(("ping",))
                return super().total_changes

        return CountingSQLite

    if backend == "postgresql":
        import psycopg

        class CountingPsycopgCursor(psycopg.Cursor):  # type: ignore[type-arg]
            def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
                self.connection.log.append(("sql", str(query)))
                return super().execute(query, *args, **kwargs)

        class CountingPsycopg(psycopg.Connection):  # type: ignore[type-arg]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.log: list[tuple[str, ...]] = []
                self.cursor_factory = CountingPsycopgCursor

            def commit(self) -> None:
                self.log.append(("commit",))
                super().commit()

            def rollback(self) -> None:
                self.log.append(("rollback",))
                super().rollback()

        return CountingPsycopg

    import pymysql

    class CountingPyMySQL(pymysql.connections.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.log: list[tuple[str, ...]] = []
            super().__init__(*args, **kwargs)

        def query(self, sql: Any, unbuffered: bool = False) -> int:
            self.log.append(("sql", sql if isinstance(sql, str) else sql.decode()))
            return super().query(sql, unbuffered)  # type: ignore[no-any-return]

        def commit(self) -> None:
            self.log.append(("commit",))
            super().commit()

        def rollback(self) -> None:
            self.log.append(("rollback",))
            super().rollback()

        def ping(self, reconnect: bool = True) -> None:
            self.log.append(("ping",))
            super().ping(reconnect)

    return CountingPyMySQL


class CountingConnect:
    """A connect callable making counting connections to ``db``'s database; keeps them in
    ``made``."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self.made: list[Any] = []

    def __call__(self) -> Any:
        raw = self._connect()
        self.made.append(raw)
        return raw


@pytest.fixture
def counting_connect(db: Backend, request: pytest.FixtureRequest) -> Iterator[CountingConnect]:
    cls = counting_class(db.name)
    if db.name == "sqlite":
        # The same database file as db.connect's connections.
        probe = db.connect()
        [path] = [row[2] for row in fetch(probe, "PRAGMA database_list") if row[1] == "main"]

        def connect() -> Any:
            return sqlite3.connect(path, factory=cls, check_same_thread=False)

    elif db.name == "postgresql":
        dsn = request.getfixturevalue("postgresql_dsn")

        def connect() -> Any:
            return cls.connect(dsn, connect_timeout=10)

    else:
        params = request.getfixturevalue("mysql_params")

        def connect() -> Any:
            return cls(**params)

    counting = CountingConnect(connect)
    yield counting
    for raw in counting.made:
        with contextlib.suppress(Exception):
            raw.close()


def run_select_1_and_commit(pool: dbpool.Pool[Any]) -> None:
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("SELECT 1")
        assert [tuple(row) for row in cur.fetchall()] == [(1,)]
        conn.commit()


@pytest.mark.parametrize("validate_after", [None, 3600.0])
def test_hot_checkout_and_clean_return_cost_no_round_trip(
    db: Backend, counting_connect: CountingConnect, make_pool: Any, validate_after: Any
) -> None:
    pool = make_pool(counting_connect, min_size=1, max_size=1, validate_after=validate_after)
    pool.wait(timeout=10)
    [raw] = counting_connect.made
    assert type(raw) is counting_class(db.name)
    assert for_connection(raw).name == DIALECT_NAMES[db.name]

    for _ in range(3):
        mark = len(raw.log)
        run_select_1_and_commit(pool)
        assert raw.log[mark:] == [("sql", "SELECT 1"), ("commit",)]
    s = pool.stats()
    assert (s.created, s.acquired, s.discarded, s.idle) == (1, 3, 0, 1)


SQLITE_FILE_QUERY = "SELECT CAST(file AS BLOB) FROM pragma_database_list WHERE name = 'main'"


def test_checkout_validation_pings_once_when_always_asked(
    db: Backend, counting_connect: CountingConnect, make_pool: Any
) -> None:
    pool = make_pool(counting_connect, min_size=1, max_size=1, validate_after=0)
    pool.wait(timeout=10)
    [raw] = counting_connect.made

    for _ in range(2):
        mark = len(raw.log)
        run_select_1_and_commit(pool)
        calls = raw.log[mark:]
        assert calls[-2:] == [("sql", "SELECT 1"), ("commit",)]
        if db.name == "sqlite":  # and a read of the path its file has, to compare files
            assert calls[1:-2] == [("sql", SQLITE_FILE_QUERY), ("sql", "-- PRAGMA database_list")]
            del calls[1:-2]
        [ping] = calls[:-2]  # exactly one call before the borrower's statement
        assert ping[0] in ("ping", "sql")
    assert pool.stats().discarded == 0


def test_open_transaction_costs_exactly_one_rollback(
    db: Backend, counting_connect: CountingConnect, make_pool: Any
) -> None:
    table = db.fresh_table("dbpool_it_dirty")
    pool = make_pool(counting_connect, min_size=1, max_size=1, validate_after=None)
    pool.wait(timeout=10)
    [raw] = counting_connect.made

    mark = len(raw.log)
    with pool.connection() as conn:
        conn.cursor().execute(f"insert into {table} (id, v) values (1, 'x')")
    calls = raw.log[mark:]
    assert calls.count(("rollback",)) == 1
    assert ("commit",) not in calls and ("ping",) not in calls
    assert count_rows(db, table) == 0


# -- 3. a read-only lease leaves no snapshot behind ----------------------------------------


@pytest.mark.parametrize("db", SERVERS, indirect=True)
def test_read_only_lease_is_rolled_back_so_the_next_borrower_sees_new_data(
    db: Backend, make_pool: Any
) -> None:
    # MariaDB (autocommit off, REPEATABLE READ by default) opens a consistent snapshot at the
    # first read, and SERVER_STATUS_IN_TRANS does not report it.  On PostgreSQL the same holds
    # under REPEATABLE READ; psycopg reports the transaction.
    table = db.fresh_table("dbpool_it_snapshot")
    writer = db.connect()
    fetch(writer, f"insert into {table} (id, v) values (1, '1')")
    writer.commit()

    connect = db.connect
    if db.name == "postgresql":
        import psycopg

        def connect() -> Any:
            raw = db.connect()
            raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            return raw

    pool = make_pool(connect, max_size=1)
    with pool.connection() as conn:
        assert fetch(conn, f"select v from {table} where id = 1") == [("1",)]
        # returned without commit or rollback: it only read

    fetch(writer, f"update {table} set v = '2' where id = 1")
    writer.commit()

    with pool.connection() as conn:
        assert fetch(conn, f"select v from {table} where id = 1") == [("2",)]
    s = pool.stats()
    assert (s.created, s.discarded) == (1, 0)  # the same connection both times


# -- 4. killed backends are discarded and replaced -----------------------------------------


def test_killed_idle_connections_are_replaced_without_error(db: Backend, make_pool: Any) -> None:
    pool = make_pool(db.connect, min_size=3, max_size=3, validate_after=0)
    pool.wait(timeout=10)
    leases = [pool.connection() for _ in range(3)]
    victims = [lease.raw for lease in leases]
    killed = {db.backend_id(raw) for raw in victims}
    assert len(killed) == 3
    for lease in leases:
        lease.close()
    assert pool.stats().idle == 3

    for raw in victims:
        db.kill(raw)

    leases = [pool.connection() for _ in range(3)]
    try:
        for lease in leases:
            assert fetch(lease, "select 1") == [(1,)]
        fresh = {db.backend_id(lease) for lease in leases}
    finally:
        for lease in leases:
            lease.close()
    assert len(fresh) == 3
    assert not fresh & killed
    s = pool.stats()
    assert s.discarded == 3
    assert (s.in_use, s.size) == (0, s.idle + s.opening)
    assert s.size <= s.max_size


def test_connection_killed_while_leased_fails_and_is_discarded(db: Backend, make_pool: Any) -> None:
    pool = make_pool(db.connect, max_size=1, validate_after=None)
    with pool.connection() as conn:
        assert fetch(conn, "select 1") == [(1,)]
        conn.commit()
        session = db.backend_id(conn)
        db.kill(conn)
        with pytest.raises(db.driver.Error):
            fetch(conn, "select 1")
    s = pool.stats()
    assert (s.discarded, s.size, s.in_use, s.idle) == (1, 0, 0, 0)

    with pool.connection() as conn:
        assert fetch(conn, "select 1") == [(1,)]
        assert db.backend_id(conn) != session
    s = pool.stats()
    assert (s.created, s.discarded, s.in_use) == (2, 1, 0)


def test_connection_killed_inside_a_transaction_block_is_counted_as_broken(
    db: Backend, make_pool: Any
) -> None:
    pool = make_pool(db.connect, max_size=1, validate_after=None)
    with pytest.raises(db.driver.Error):
        with pool.transaction() as tx:
            assert [tuple(row) for row in tx.execute("select 1").fetchall()] == [(1,)]
            db.kill(tx.connection)
            tx.execute("select 1")
    s = pool.stats()
    assert (s.discarded, s.size, s.in_use) == (1, 0, 0)
    # As for a lease's connection lost outside a block, not as a clean-up that failed.
    assert s.discards["broken"] == 1, s.discards


def test_idle_connections_older_than_a_broken_one_are_checked(db: Backend, make_pool: Any) -> None:
    # Within validate_after nothing is pinged, until a dead connection shows that others
    # returned before it may be dead too.
    pool = make_pool(db.connect, max_size=2, validate_after=3600.0)
    leases = [pool.connection() for _ in range(2)]
    victims = [lease.raw for lease in leases]
    killed = {db.backend_id(raw) for raw in victims}
    for lease in leases:
        lease.close()
    for raw in victims:
        db.kill(raw)

    with pytest.raises(db.driver.Error), pool.connection() as conn:
        fetch(conn, "select 1")  # not pinged: the borrower meets the dead session
    with pool.connection() as conn:  # the other dead one is pinged, discarded and replaced
        assert fetch(conn, "select 1") == [(1,)]
        assert db.backend_id(conn) not in killed
    s = pool.stats()
    assert (s.discarded, s.in_use, s.size) == (2, 0, 1)


# -- 5. a psycopg connection returned mid-query is never reused ----------------------------


@pytest.mark.parametrize("through", ["driver cursor", "lease cursor"])
def test_psycopg_connection_returned_mid_query_is_discarded(
    pg_connect: Any, make_pool: Any, through: str
) -> None:
    import psycopg

    pool = make_pool(pg_connect, max_size=1)
    conn = pool.connection()
    raw = conn.raw
    session = raw.info.backend_pid
    cur = raw.cursor() if through == "driver cursor" else conn.cursor()
    rows = cur.stream("select generate_series(1, 100000)")
    assert next(rows) == (1,)
    assert raw.info.transaction_status == psycopg.pq.TransactionStatus.ACTIVE

    conn.close()
    s = pool.stats()
    assert (s.discarded, s.size, s.idle, s.in_use) == (1, 0, 0, 0)
    assert raw.closed
    with contextlib.suppress(psycopg.Error):
        rows.close()  # the abandoned stream: its connection is gone

    with pool.connection() as conn:
        assert conn.raw.info.backend_pid != session
        assert fetch(conn, "select 1") == [(1,)]


# -- 6. fork ------------------------------------------------------------------------------


def _child_uses_the_pool(
    pool: dbpool.Pool[Any], db: Backend, parent_ids: set[Any], fd: int
) -> None:
    """Run in a forked child: never returns, reports through ``fd`` and the exit status."""
    code = 2
    report: dict[str, Any] = {}
    try:
        leases = [pool.connection(timeout=10) for _ in range(pool.max_size)]
        ids = []
        for lease in leases:
            assert fetch(lease, "select 1") == [(1,)]
            ids.append(db.backend_id(lease))
        for lease in leases:
            lease.close()
        pool.close(timeout=5)
        gc.collect()  # finalizers of anything the child let go must not reach the parent's sessions
        report["ids"] = ids
        code = 0 if len(set(ids)) == len(ids) and not set(ids) & parent_ids else 1
    except BaseException as exc:  # the child must reach os._exit whatever happens
        report["error"] = traceback_text(exc)[-4000:]
    finally:
        try:
            os.write(fd, json.dumps(report).encode())
        finally:
            os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
@pytest.mark.parametrize("db", SERVERS, indirect=True)
def test_forked_child_opens_its_own_connections_and_parent_keeps_its_own(
    db: Backend, make_pool: Any
) -> None:
    pool = make_pool(db.connect, min_size=2, max_size=2, validate_after=None)
    pool.wait(timeout=10)
    leases = [pool.connection() for _ in range(2)]
    parent_ids = {db.backend_id(lease) for lease in leases}
    for lease in leases:
        lease.close()
    before = pool.stats()
    assert before.idle == 2

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child_uses_the_pool(pool, db, parent_ids, write_fd)
    os.close(write_fd)
    code, report = child_report(pid, read_fd, timeout=20)
    assert code == 0, report.get("error") or f"child exited {code}: {report}"
    assert len(report["ids"]) == 2 and not set(report["ids"]) & parent_ids

    assert pool.stats() == before  # the child's pool is its own
    leases = [pool.connection() for _ in range(2)]
    try:
        assert {db.backend_id(lease) for lease in leases} == parent_ids
        for lease in leases:
            assert fetch(lease, "select 1") == [(1,)]
    finally:
        for lease in leases:
            lease.close()
    s = pool.stats()
    assert (s.created, s.discarded, s.size) == (2, 0, 2)


# -- 7. sqlite3 connections bound to their thread are refused ------------------------------


def test_sqlite_connection_without_check_same_thread_is_refused(
    tmp_path: Any, make_pool: Any
) -> None:
    made: list[sqlite3.Connection] = []

    def connect() -> sqlite3.Connection:
        raw = sqlite3.connect(str(tmp_path / "bound.sqlite3"))
        made.append(raw)
        return raw

    pool = make_pool(connect, max_size=1)
    with pytest.raises(TypeError, match="check_same_thread=False"):
        pool.connection()
    s = pool.stats()
    assert (s.size, s.in_use, s.idle, s.created, s.connect_errors) == (0, 0, 0, 0, 1)
    [refused] = made
    with pytest.raises(sqlite3.ProgrammingError):  # the pool closed it
        refused.execute("select 1")


# -- 8. dialect detection for real connections ---------------------------------------------


def driver_connection_class(backend: str) -> type:
    if backend == "postgresql":
        import psycopg

        return psycopg.Connection
    if backend == "mysql":
        import pymysql

        return pymysql.connections.Connection  # type: ignore[no-any-return]
    return sqlite3.Connection


def test_dialect_is_detected_from_the_driver(db: Backend, make_pool: Any) -> None:
    pool = make_pool(db.connect, max_size=1)
    with pool.connection() as conn:
        raw = conn.raw
        assert isinstance(raw, driver_connection_class(db.name))
        assert for_connection(raw).name == DIALECT_NAMES[db.name]
        assert fetch(conn, "select 1") == [(1,)]


# -- 9. a password never shows ------------------------------------------------------------

CANARY = "canary-Pa55word"


@pytest.mark.parametrize("db", [SERVERS[0]], indirect=True)
def test_canary_password_never_appears(
    db: Backend, postgresql_dsn: str, make_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if conninfo_to_dict(postgresql_dsn).get("password"):
        pytest.skip("the test DSN has a password of its own; the canary needs trust auth")
    dsn = make_conninfo(postgresql_dsn, password=CANARY, connect_timeout=10)
    caplog.set_level(logging.DEBUG, logger="dbpool")
    texts: list[str] = []

    pool = make_pool(lambda: psycopg.connect(dsn), min_size=1, max_size=1, validate_after=0)
    pool.wait(timeout=10)
    with pool.connection() as conn:
        assert fetch(conn, "select 1") == [(1,)]
        assert conn.raw.info.password == CANARY  # the secret is really in play
        texts.append(repr(conn))
        victim = conn.raw
    db.kill(victim)
    with pool.connection() as held:  # the dead connection is found, discarded and replaced
        assert fetch(held, "select 1") == [(1,)]
        with pytest.raises(dbpool.PoolTimeout) as exhausted:
            pool.connection(timeout=0)
    texts += [repr(pool), str(pool.stats()), repr(pool.stats()), traceback_text(exhausted.value)]
    assert pool.stats().discarded == 1

    # A pool whose connects fail: the PoolTimeout chains the driver's error.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = closed_port.getsockname()[1]
        bad_dsn = make_conninfo(dsn, host="127.0.0.1", hostaddr="127.0.0.1", port=port)
        failing = make_pool(
            lambda: psycopg.connect(bad_dsn),
            max_size=1,
            reconnect_delay=30.0,
            reconnect_max_delay=30.0,
        )
        with pytest.raises(psycopg.OperationalError) as refused:
            failing.connection()  # the caller connects, and gets the driver's error
        with pytest.raises(dbpool.PoolTimeout) as failing_timeout:
            failing.connection(timeout=0)  # backing off: no connect is tried
    # A copy the pool keeps (the caller's error carries the caller's frames): the same error
    cause = failing_timeout.value.__cause__
    assert type(cause) is type(refused.value) and str(cause) == str(refused.value), cause
    texts += [repr(failing), str(failing.stats()), traceback_text(failing_timeout.value)]

    records = caplog.records
    assert any(r.levelno >= logging.WARNING for r in records)
    for record in records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info:
            texts.append("".join(traceback.format_exception(*record.exc_info)))
    texts.append(caplog.text)
    leaks = [text for text in texts if CANARY in text]
    assert not leaks


# -- 10. throughput sanity ---------------------------------------------------------------

INCREMENT = {
    "sqlite": "CAST(CAST(v AS INTEGER) + 1 AS TEXT)",
    "postgresql": "CAST(CAST(v AS integer) + 1 AS text)",
    "mysql": "CAST(v AS SIGNED) + 1",
}


def test_32_threads_share_a_pool_of_4(db: Backend, make_pool: Any) -> None:
    threads, per_thread = 32, 10
    table = db.fresh_table("dbpool_it_counter")
    setup = db.connect()
    fetch(setup, f"insert into {table} (id, v) values (1, '0')")
    setup.commit()
    pool = make_pool(db.connect, max_size=4, acquire_timeout=20.0)
    update = f"update {table} set v = {INCREMENT[db.name]} where id = 1"

    start = threading.Barrier(threads)
    committed = [0] * threads
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            start.wait(timeout=10)
            for _ in range(per_thread):
                with pool.connection() as conn:
                    conn.cursor().execute(update)
                    conn.commit()
                committed[index] += 1
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    deadline = monotonic() + 25
    for worker in workers:
        worker.join(timeout=max(deadline - monotonic(), 0))
    assert not [w for w in workers if w.is_alive()], "workers still running"
    assert not errors, [traceback_text(e) for e in errors[:3]]
    assert committed == [per_thread] * threads

    s = pool.stats()
    assert s.in_use == 0 and s.waiting == 0
    assert s.size == s.idle + s.opening <= s.max_size
    assert s.acquired == threads * per_thread
    assert s.timeouts == 0 and s.discarded == 0
    [(value,)] = fetch(setup, f"select v from {table} where id = 1")
    setup.rollback()
    assert int(value) == sum(committed)
