"""Edges of the lease's record of what a borrower did: the driver's connection reached through
a cursor, PyMySQL's stale flags after a failed fetch, pass-through calls that would end a
block's transaction, and SQLite's narrowed busy timeout against a released lease or a COMMIT
that fails on its own past the deadline."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import pytest

import dbpool


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


@pytest.fixture
def my_proc(mysql_params: dict[str, Any]) -> Any:
    """A table and a procedure that opens a transaction, inserts, then fails (SIGNAL)."""
    import pymysql

    table, proc = _name("rv_t"), _name("rv_p")
    admin = pymysql.connect(**mysql_params, autocommit=True)
    _run(admin, f"create table {table} (id int primary key)")
    _run(
        admin,
        f"create procedure {proc}() begin start transaction; "
        f"insert into {table} values (1); "
        "signal sqlstate '45000' set message_text = 'failed inside a transaction'; end",
    )
    try:
        yield table, proc, (lambda: pymysql.connect(**mysql_params, autocommit=True))
    finally:
        _run(admin, f"drop procedure if exists {proc}")
        _run(admin, f"drop table if exists {table}")
        admin.close()


def test_pymysql_cursor_connection_passthrough_hides_open_transaction(my_proc: Any) -> None:
    """``cursor.connection`` (PEP 249) reaches the driver's connection through the lease
    cursor's pass-through exactly as ``conn.raw`` does, but does not set ``slot.exposed``: a
    call on it that opened a transaction and failed leaves PyMySQL's stale flags saying
    "idle", and the open transaction goes to the next borrower."""
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
    """Outside a transaction block, iterating a lease cursor is not watched (``iter(raw)``):
    an error mid-stream on an unbuffered cursor never reaches ``_call_failed``, so PyMySQL's
    flags stay those of the last OK packet ("autocommit, idle") although the CALL opened a
    transaction.  The same loop with fetchone() is watched and rolled back on return.  So is
    the cursor's ``fetchall_unbuffered()`` generator, passed through unwatched."""
    import pymysql
    import pymysql.cursors

    table, proc = _name("rv_t"), _name("rv_p")
    admin = pymysql.connect(**mysql_params, autocommit=True)
    _run(admin, f"create table {table} (id int primary key)")
    _run(
        admin,
        f"create procedure {proc}() begin start transaction; insert into {table} values (1); "
        "select seq, if(seq = 3000, (select 1 union select 2), seq) from seq_1_to_5000; end",
    )
    try:
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
    finally:
        _run(admin, f"drop procedure if exists {proc}")
        _run(admin, f"drop table if exists {table}")
        admin.close()


# -- PostgreSQL: COMMIT failing past the deadline -------------------------------------------------


def test_postgresql_commit_constraint_failure_past_deadline_is_not_a_timeout(
    postgresql_dsn: str,
) -> None:
    """beda304 turns *any* COMMIT failure into TransactionTimeout once the deadline has
    passed, on every dialect.  On PostgreSQL a deferred constraint that rejects the COMMIT
    (nothing was cancelled: the watchdog is stopped before COMMIT and statement_timeout did
    not fire) comes out as "ran past its deadline", hiding the UniqueViolation."""
    import psycopg
    import psycopg.errors

    table, func = _name("rv_t"), _name("rv_f")
    admin = psycopg.connect(postgresql_dsn, autocommit=True)
    admin.execute(f"create table {table} (id int)")
    admin.execute(
        f"create function {func}() returns trigger language plpgsql as $$ begin "
        "perform pg_sleep(1.3); "
        "raise unique_violation using message = 'rejected at commit'; end $$"
    )
    admin.execute(
        f"create constraint trigger {func}_trg after insert on {table} "
        f"deferrable initially deferred for each row execute function {func}()"
    )
    try:
        with _pool(lambda: psycopg.connect(postgresql_dsn)) as pool:
            with pytest.raises(psycopg.errors.UniqueViolation):
                # deadline 2 s (statement_timeout 2 s per statement); COMMIT starts at ~1 s
                # and is rejected at ~2.3 s, before the 1 s sever grace ends
                with pool.transaction(timeout=2.0) as tx:
                    tx.execute("select pg_sleep(1.0)")
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
    ``conn.autocommit(True)`` (SET autocommit=1) commit the block's work so far, as
    ``commit()`` and sqlite3's ``executescript()`` would, but the pass-through lets them
    through: a block that then raises "rolls back" work already committed."""
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
    closes it).  The next tx.execute() used to raise LeaseReleased.  With a timeout, beda304's
    _check_open() now runs ``PRAGMA busy_timeout`` on the slot's driver connection first,
    without checking the lease still owns it: sqlite3.ProgrammingError ("Cannot operate on a
    closed database") instead, from a PRAGMA sent to a connection no longer the block's."""
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
