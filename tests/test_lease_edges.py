"""Edges of the lease's record of what a borrower did: the driver's connection reached through
a cursor, PyMySQL's stale flags after a failed fetch, pass-through calls that would end a
block's transaction, and SQLite's narrowed busy timeout against a released lease or a COMMIT
that fails on its own past the deadline."""

from __future__ import annotations

import contextlib
import copy
import gc
import pickle
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _pool(connect: Callable[[], Any], **options: Any) -> dbpool.Pool[Any]:
    settings: dict[str, Any] = {"min_size": 0, "max_size": 1, "acquire_timeout": 5}
    settings.update(options)
    return dbpool.Pool(connect, **settings)


def _run(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []
    finally:
        cur.close()


# -- PyMySQL -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _procedure(mysql_params: dict[str, Any], then: str) -> Iterator[tuple[str, str]]:
    """A table and a procedure that opens a transaction, inserts into it, then runs ``then``;
    yields their names."""
    import pymysql

    table, proc = _name("rv_t"), _name("rv_p")
    admin = pymysql.connect(**mysql_params, autocommit=True)
    _run(admin, f"create table {table} (id int primary key)")
    _run(
        admin,
        f"create procedure {proc}() begin start transaction; "
        f"insert into {table} values (1); {then}; end",
    )
    try:
        yield table, proc
    finally:
        _run(admin, f"drop procedure if exists {proc}")
        _run(admin, f"drop table if exists {table}")
        admin.close()


@pytest.fixture
def my_proc(mysql_params: dict[str, Any]) -> Any:
    """A procedure that opens a transaction, inserts, then fails (SIGNAL)."""
    import pymysql

    signal = "signal sqlstate '45000' set message_text = 'failed inside a transaction'"
    with _procedure(mysql_params, signal) as (table, proc):
        yield table, proc, (lambda: pymysql.connect(**mysql_params, autocommit=True))


def test_pymysql_cursor_connection_passthrough_hides_open_transaction(my_proc: Any) -> None:
    """``cursor.connection`` (PEP 249) reaches the driver's connection through the lease
    cursor's pass-through as ``conn.raw`` does: a call on it that opened a transaction and
    failed leaves PyMySQL's flags saying "idle".  Unless the lease counts it as handed out,
    the open transaction goes to the next borrower."""
    import pymysql

    _table, proc, connect = my_proc
    with _pool(connect) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            driver_conn = cur.connection  # the driver's connection, like conn.raw
            assert isinstance(driver_conn, pymysql.connections.Connection)
            with pytest.raises(pymysql.err.MySQLError, match="failed inside"):
                driver_conn.cursor().execute(f"call {proc}()")
        with pool.connection() as conn:  # the same connection
            in_tx = _run(conn, "select @@in_transaction")
        assert pool.stats().created == 1
    assert in_tx == [(0,)], "the next borrower got the previous lease's open transaction"


@pytest.mark.parametrize("read", ["iterate", "fetchall_unbuffered"])
def test_pymysql_sscursor_iteration_failure_outside_block_hides_open_transaction(
    mysql_params: dict[str, Any], read: str
) -> None:
    """An error mid-stream on an unbuffered cursor, iterated or read with
    ``fetchall_unbuffered()`` outside a block, leaves PyMySQL's flags those of the last OK
    packet ("autocommit, idle") although the CALL opened a transaction: the failure must mark
    them stale, as one from fetchone() does, or the next borrower gets the transaction."""
    import pymysql
    import pymysql.cursors

    fails_at_row_3000 = (
        "select seq, if(seq = 3000, (select 1 union select 2), seq) from seq_1_to_5000"
    )
    with _procedure(mysql_params, fails_at_row_3000) as (_table, proc):
        with _pool(lambda: pymysql.connect(**mysql_params, autocommit=True)) as pool:
            with pool.connection() as conn:
                cur = conn.cursor(pymysql.cursors.SSCursor)
                cur.execute(f"call {proc}()")
                seen = 0
                with pytest.raises(pymysql.err.MySQLError, match="more than 1 row"):
                    for _ in cur if read == "iterate" else cur.fetchall_unbuffered():
                        seen += 1
                assert seen == 2999  # the error came mid-stream, during iteration
            with pool.connection() as conn:
                in_tx = _run(conn, "select @@in_transaction")
            assert pool.stats().created == 1
        assert in_tx == [(0,)], "the next borrower got the previous lease's open transaction"


# -- PostgreSQL: COMMIT failing past the deadline -------------------------------------------------


def test_postgresql_commit_constraint_failure_past_deadline_is_not_a_timeout(
    postgresql_dsn: str,
) -> None:
    """A deferred constraint that rejects the COMMIT after the deadline (nothing was
    cancelled: the watchdog stops before COMMIT and statement_timeout did not fire) raises
    its own UniqueViolation, not TransactionTimeout ("ran past its deadline")."""
    import psycopg
    import psycopg.errors

    table, func = _name("rv_t"), _name("rv_f")
    admin = psycopg.connect(postgresql_dsn, autocommit=True)
    admin.execute(f"create table {table} (id int)")
    admin.execute(
        f"create function {func}() returns trigger language plpgsql as $$ begin "
        "perform pg_sleep(0.7); "
        "raise unique_violation using message = 'rejected at commit'; end $$"
    )
    admin.execute(
        f"create constraint trigger {func}_trg after insert on {table} "
        f"deferrable initially deferred for each row execute function {func}()"
    )
    try:
        with _pool(lambda: psycopg.connect(postgresql_dsn)) as pool:
            with pytest.raises(psycopg.errors.UniqueViolation):
                # deadline 2 s (statement_timeout 2 s per statement); COMMIT starts at ~1.5 s
                # and is rejected at ~2.2 s, well before the 1 s sever grace ends
                with pool.transaction(timeout=2.0) as tx:
                    tx.execute("select pg_sleep(1.5)")
                    tx.execute(f"insert into {table} values (1)")
    finally:
        admin.execute(f"drop table if exists {table}")
        admin.execute(f"drop function if exists {func}()")
        admin.close()


def _autocommit_off(connect: Callable[[], Any]) -> Callable[[], Any]:
    def make() -> Any:
        conn = connect()
        conn.autocommit(False)
        return conn

    return make


@pytest.mark.parametrize("call", ["begin", "autocommit"])
def test_pymysql_passthrough_that_commits_inside_block_is_refused(my_proc: Any, call: str) -> None:
    """Inside a transaction block, PyMySQL's ``conn.begin()`` (BEGIN) and
    ``conn.autocommit(True)`` (SET autocommit=1) would commit the block's work so far, as
    ``commit()`` and sqlite3's ``executescript()`` would: refused, a block that then raises
    leaves nothing behind."""
    table, _proc, connect = my_proc
    if call == "autocommit":  # SET autocommit=1 commits only where autocommit was off
        connect = _autocommit_off(connect)
    with _pool(connect) as pool:
        with pytest.raises((dbpool.PoolError, ZeroDivisionError)):
            with pool.transaction() as tx:
                tx.execute(f"insert into {table} values (1)")
                conn = tx.connection
                if call == "begin":
                    conn.begin()
                else:
                    conn.autocommit(True)
                raise ZeroDivisionError  # the block fails: nothing of it may remain
        with pool.connection() as conn:
            kept = _run(conn, f"select id from {table}")
    assert kept == [], "work of a block that raised was committed"


# -- SQLite: the narrowing PRAGMA -----------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_sqlite_statement_after_lease_closed_in_block_raises_lease_released(
    sqlite_connect: Any, timeout: float | None
) -> None:
    """A lease closed inside its own block gives its connection back (the pool discards and
    closes it); the next tx.execute() raises LeaseReleased, with a timeout too: the busy
    timeout is not narrowed on a connection no longer the block's (sqlite3.ProgrammingError,
    "Cannot operate on a closed database")."""
    with _pool(sqlite_connect) as pool:
        with pytest.raises(dbpool.PoolError, match="went back to the pool"):
            with pool.connection() as conn:
                with conn.transaction(timeout=timeout) as tx:
                    tx.execute("select 1").fetchall()
                    conn.close()
                    time.sleep(0.02)  # more than _NARROW_SLACK since the last narrowing
                    try:
                        tx.execute("select 1")
                    except Exception as exc:
                        error = exc
        assert isinstance(error, dbpool.LeaseReleased), repr(error)


@pytest.mark.parametrize("leaving", [KeyboardInterrupt, SystemExit])
def test_a_block_left_by_an_interrupt_after_its_lease_went_back_lets_it_through(
    sqlite_connect: Any, leaving: type[BaseException]
) -> None:
    """A block whose connection went back to the pool meanwhile (closed inside it, taken by
    close(), inherited across fork()) and left by SystemExit or KeyboardInterrupt lets that go
    on: as a PoolError, an ``except Exception`` would stop a Ctrl-C or an exit.  Left
    normally, it still raises PoolError (its work was not committed)."""
    with _pool(sqlite_connect) as pool:
        with pool.connection() as conn:
            with pytest.raises(leaving):
                with conn.transaction() as tx:
                    tx.execute("select 1").fetchall()
                    conn.close()
                    raise leaving()
        with pytest.raises(dbpool.PoolError, match="its work was not committed"):
            with pool.connection() as conn, conn.transaction() as tx:
                tx.execute("select 1").fetchall()
                conn.close()
        assert pool.stats().in_use == 0


# -- copies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [copy.copy, copy.deepcopy, pickle.dumps])
@pytest.mark.parametrize("what", ["lease", "cursor", "pool cursor"])
def test_a_lease_or_cursor_refuses_to_be_copied_or_pickled(
    make: Callable[[Any], Any], what: str
) -> None:
    """A copy would be a second lease of the same connection: refused with a TypeError that
    says so, not an AttributeError on an internal name, and the original goes on."""
    with _pool(fakedb.Server().connect, max_size=2) as pool:
        with pool.connection() as conn:
            pooled = pool.cursor() if what == "pool cursor" else None
            obj = {"lease": conn, "cursor": conn.cursor(), "pool cursor": pooled}[what]
            with pytest.raises(TypeError, match="cannot be copied or pickled"):
                make(obj)
            conn.cursor().execute("select 2")
            if pooled is not None:
                pooled.execute("select 2")
                pooled.close()
        s = pool.stats()
        assert (s.in_use, s.leaked) == (0, 0), s


def test_a_lease_is_a_connection_with_its_fields_only(fake_server: fakedb.Server) -> None:
    """lease() sets a lease's fields on a plain object and then makes it a Connection: the
    lease is one all the same, with no attribute of its own but those fields (the ones unset
    raise AttributeError without reaching the driver), weakly referenceable, and the class is
    still not made directly."""
    with pytest.raises(TypeError, match="not made directly"):
        dbpool.Connection()
    with _pool(fake_server.connect, max_size=2) as pool:
        conn = pool.connection()
        assert type(conn) is dbpool.Connection
        assert isinstance(conn, dbpool.Connection)
        with pytest.raises(AttributeError):
            object.__getattribute__(conn, "__dict__")  # its slots only
        assert conn.pool is pool
        slot = conn._slot
        assert slot is not None and conn._claim == [slot] and slot.claim is conn._claim
        fake_server.connections[-1]._streams = "the driver's"  # never read through the lease
        for name in ("_streams", "_cut_short"):
            with pytest.raises(AttributeError, match=name):
                getattr(conn, name)
        assert not slot.used, "an unset field was looked up on the driver's connection"
        ref = weakref.ref(conn)
        finalized: list[bool] = []
        weakref.finalize(conn, finalized.append, True)
        assert ref() is conn
        conn.cursor().execute("select 1")
        conn.close()
        assert conn.released
        del conn
        gc.collect()
        assert ref() is None and finalized == [True]
        s = pool.stats()
        assert (s.in_use, s.idle, s.returned, s.leaked) == (0, 1, 1, 0), s


def test_cursors_are_cursors_with_their_fields_only(fake_server: fakedb.Server) -> None:
    """A lease's cursor, and pool.cursor()'s, are made as leases are (fields set on a plain
    object, then the class swapped): each is one all the same, with no attribute of its own
    but its fields, an unset one never looked up on the driver's cursor, and neither class is
    made directly."""
    with pytest.raises(TypeError, match="not made directly"):
        dbpool.Cursor()
    with _pool(fake_server.connect, max_size=2) as pool:
        with pool.connection() as conn:
            cursor = conn.cursor()
            assert type(cursor) is dbpool.Cursor and cursor.connection is not None
            with pytest.raises(AttributeError):
                object.__getattribute__(cursor, "__dict__")
            assert cursor._lease is conn and cursor._open
            cursor.execute("select 1")
        assert cursor._raw._closed  # the driver's cursor, closed as the lease went back
        with pool.cursor() as owner:
            assert type(owner) is dbpool.PoolCursor and isinstance(owner, dbpool.Cursor)
            with pytest.raises(AttributeError):
                object.__getattribute__(owner, "__dict__")
            assert owner.connection.pool is pool and owner._open
            owner.execute("select 1")
        assert not owner._open and owner.connection.released
        s = pool.stats()
        assert (s.in_use, s.returned, s.leaked) == (0, 2, 0), s


@pytest.mark.parametrize("make", [copy.copy, copy.deepcopy, pickle.dumps])
def test_a_pool_refuses_to_be_copied_or_pickled(make: Callable[[Any], Any]) -> None:
    """A shallow copy shared the pool's idle connections, and closed them when it was
    garbage-collected (an open pool's finalizer closes its idle ones): the next checkout of the
    original got a closed connection.  Pickling it (a multiprocessing child started with
    spawn or forkserver) failed on a lock or on the connect callable."""
    server = fakedb.Server()
    with _pool(server.connect, min_size=1) as pool:
        pool.wait(timeout=5)
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            make(pool)
        gc.collect()  # a copy made anyway is gone
        assert pool.execute("select 1") == [(1,)]
        s = pool.stats()
        assert (s.size, s.discarded, s.created) == (1, 0, 1), s


def test_except_conn_error_lets_an_interrupt_of_the_call_through(
    fake_server: fakedb.Server,
) -> None:
    # ``except conn.Error:`` (PEP 249's exceptions as attributes of the connection) around a
    # call that KeyboardInterrupt stopped half-way: the interrupt dooms the lease, and looking
    # up conn.Error on it raised ConnectionUnusable, an Exception, in place of the
    # KeyboardInterrupt, which an ``except Exception`` further up then swallowed.
    with _pool(fake_server.connect) as pool, pool.connection() as conn:
        cur = conn.cursor()
        fake_server.fail_next("execute", KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            try:
                cur.execute("UPDATE t SET x = 1")
            except conn.Error:
                pass
        assert conn.OperationalError is fakedb.OperationalError
        with pytest.raises(dbpool.ConnectionUnusable):
            cur.execute("SELECT 1")
