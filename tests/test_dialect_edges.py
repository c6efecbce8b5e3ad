"""Edge cases of the sqlite3 and psycopg2 dialects, as used through the pool: what a session
reset, a transaction block, a savepoint, a ping and the return path must leave for the next
borrower.  Each docstring says what the driver does that makes the case hard.  Against the real
PostgreSQL server (psycopg2) and SQLite files.  The only waits on time are those that let a
deadline pass.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import sys
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Connector, rows

pytestmark = pytest.mark.timeout(30)

# sqlite3 keeps computing this for minutes unless interrupted.
SQLITE_SLOW_SQL = (
    "with recursive c(x) as (select 1 union all select x + 1 from c where x < 2000000000) "
    "select count(*) from c"
)


def _needs_connection_method(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not hasattr(sqlite3.Connection, name),
        reason=f"sqlite3's Connection.{name}() is new in Python 3.11",
    )


def new_pool(connect: Any, **options: Any) -> dbpool.Pool[Any]:
    settings: dict[str, Any] = {"min_size": 0, "max_size": 1, "acquire_timeout": 5}
    settings.update(options)
    return dbpool.Pool(connect, **settings)


# -- psycopg2 ----------------------------------------------------------------------------------


@pytest.mark.postgresql
def test_psycopg2_discard_reset_hides_notices_and_notifies_from_the_next_borrower(
    psycopg2_connect: Connector,
) -> None:
    """session_reset="discard" is the policy for borrowers that must not see each other's
    session; psycopg2 keeps the server's notices and notifications in ``conn.notices`` and
    ``conn.notifies``, Python lists on the connection, which DISCARD ALL does not reach: the
    reset clears them, or the next borrower reads the previous one's messages."""
    pool = new_pool(psycopg2_connect, session_reset="discard")
    try:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("DO $$ BEGIN RAISE NOTICE 'tenant A secret'; END $$")
            cur.execute("LISTEN dbpool_edges_chan")
            cur.execute("NOTIFY dbpool_edges_chan, 'tenant A payload'")
            conn.commit()
            conn.raw.poll()  # psycopg2 before 2.9.10 takes in what came with commit() only here
            assert conn.notices and conn.notifies  # what tenant A got
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first  # reused: the reset ran, no reconnect
            leftover = (list(conn.raw.notices), list(conn.raw.notifies))
        assert leftover == ([], []), f"the next borrower sees {leftover!r}"
    finally:
        pool.close()


def _read_only_autocommit(psycopg2_connect: Connector) -> Callable[[], Any]:
    """psycopg2 connections in autocommit mode, read-only and serializable."""

    def connect() -> Any:
        conn = psycopg2_connect()
        conn.autocommit = True
        conn.readonly = True
        conn.isolation_level = "SERIALIZABLE"
        return conn

    return connect


@pytest.mark.postgresql
def test_psycopg2_discard_reset_keeps_a_connection_configured_read_only(
    psycopg2_connect: Connector,
) -> None:
    """In autocommit mode psycopg2 applies ``readonly`` and ``isolation_level`` to the server
    session (``SET default_transaction_read_only`` ...).  DISCARD ALL resets those, while the
    driver's attributes still say read-only and serializable (the client settings compare
    equal): the reset sets them again, or the next borrower gets a writable, READ COMMITTED
    session."""

    pool = new_pool(_read_only_autocommit(psycopg2_connect), session_reset="discard")
    try:
        seen = []
        for _ in range(2):
            with pool.connection() as conn:
                seen.append(
                    (
                        rows(conn, "show transaction_read_only")[0][0],
                        rows(conn, "show transaction_isolation")[0][0],
                    )
                )
        assert pool.stats().created == 1
        assert seen == [("on", "serializable"), ("on", "serializable")], seen
    finally:
        pool.close()


@pytest.mark.postgresql
@pytest.mark.parametrize("through", ["lease", "raw", "set_session", "lease, and on again"])
def test_psycopg2_autocommit_a_lease_turned_off_comes_back_with_the_session_read_only(
    psycopg2_connect: Connector, through: str
) -> None:
    """On a connection configured with autocommit and ``readonly``/``isolation_level``,
    psycopg2 keeps those in the server session (``SET default_transaction_read_only`` ...).
    Turning autocommit off sets them back to the server's defaults (each BEGIN carries them
    then), and turning it on again, as the return path does, sends nothing: the driver's
    attributes still say read-only and serializable, and the next borrower gets a writable,
    READ COMMITTED session unless the return path sets them again (also when the lease turned
    autocommit on again itself, through the lease)."""

    pool = new_pool(_read_only_autocommit(psycopg2_connect))
    try:
        with pool.connection() as conn:
            if through.startswith("lease"):
                conn.autocommit = False
            elif through == "raw":
                conn.raw.autocommit = False
            else:
                conn.set_session(autocommit=False)
            assert rows(conn, "show transaction_read_only") == [("on",)]
            conn.commit()
            if through == "lease, and on again":
                conn.autocommit = True  # psycopg2 sends nothing: this lease's session is writable
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first
            seen = (
                rows(conn, "show transaction_read_only")[0][0],
                rows(conn, "show transaction_isolation")[0][0],
            )
        assert seen == ("on", "serializable"), seen
    finally:
        pool.close()


@pytest.mark.postgresql
def test_psycopg2_run_transaction_retries_a_caught_serialization_failure_after_a_savepoint(
    psycopg2_connect: Connector,
) -> None:
    """An error undone by a savepoint is no longer the block's failure: when a later
    serialization failure aborts the transaction (and fn catches it), the block's
    TransactionRolledBack is chained to that one, which run_transaction retries."""
    import psycopg2.errors

    pool = new_pool(psycopg2_connect)
    attempts = []

    def fn(tx: dbpool.Transaction[Any]) -> int:
        attempts.append(1)
        try:
            with tx.savepoint():
                tx.execute("select 1/0")
        except psycopg2.errors.DivisionByZero:
            pass  # undone by the savepoint: the transaction goes on
        if len(attempts) == 1:
            try:
                tx.execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' "
                    "USING ERRCODE = 'serialization_failure'; END $$"
                )
            except psycopg2.errors.SerializationFailure:
                pass  # caught (logged, say): the block raises TransactionRolledBack for it
        return len(attempts)

    try:
        assert pool.run_transaction(fn, retries=3) == 2
    finally:
        pool.close()


@pytest.mark.postgresql
def test_psycopg2_named_cursor_works_in_a_block_on_an_autocommit_connection(
    psycopg2_connect: Connector,
) -> None:
    """The docs: a server-side (named) cursor works inside one transaction.  On an autocommit
    psycopg2 connection a BEGIN sent as SQL leaves psycopg2 believing it is in autocommit mode,
    refusing the named cursor ("can't use a named cursor outside of transactions"): the block
    turns autocommit off for its duration instead."""

    def connect() -> Any:
        conn = psycopg2_connect()
        conn.autocommit = True
        return conn

    pool = new_pool(connect)
    try:
        with pool.transaction() as tx:
            cur = tx.cursor(name="dbpool_edges_big")
            cur.execute("select generate_series(1, 5)")
            assert [r[0] for r in cur] == [1, 2, 3, 4, 5]
        with pool.connection() as conn:
            assert conn.raw.autocommit is True  # and the setting is as configured afterwards
    finally:
        pool.close()


@pytest.mark.postgresql
def test_psycopg2_asynchronous_connection_is_refused(postgresql_dsn: str) -> None:
    """psycopg2's asynchronous connections (``async_=True``) refuse ``commit()``,
    ``rollback()`` and autocommit changes, and their statements return before they have run:
    pooled, every lease that ran a statement came back busy and was discarded, and every
    transaction block failed with "set_session cannot be used in asynchronous mode".  The
    pool refuses one as it is made, as it refuses a sqlite3 connection it cannot share."""
    import psycopg2
    import psycopg2.extras

    made: list[Any] = []

    def connect() -> Any:
        conn = psycopg2.connect(postgresql_dsn, async_=True, connect_timeout=10)
        made.append(conn)
        psycopg2.extras.wait_select(conn)
        return conn

    pool = new_pool(connect)
    try:
        with pytest.raises(TypeError, match="async_=True"):
            pool.connection()
        assert pool.stats().size == 0
        assert made and all(conn.closed for conn in made)
    finally:
        pool.close()
        for conn in made:
            conn.close()


@pytest.mark.postgresql
def test_psycopg2_client_encoding_a_lease_set_is_undone_on_return(
    psycopg2_connect: Connector,
) -> None:
    """``set_client_encoding()`` changes both the server session's client_encoding and what
    psycopg2 encodes and decodes text with: left as it is, the next borrower's euro sign
    cannot be sent at all."""
    pool = new_pool(psycopg2_connect)
    try:
        with pool.connection() as conn:
            connected_with = conn.encoding
            conn.set_client_encoding("LATIN1")
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first  # reused, not discarded
            assert conn.encoding == connected_with
            assert rows(conn, "SELECT '\u20ac', current_setting('client_encoding')") == [
                ("\u20ac", connected_with)
            ]
    finally:
        pool.close()


@pytest.mark.postgresql
@pytest.mark.parametrize("session_reset", [None, "discard"])
@pytest.mark.parametrize(
    ("statement", "query", "params", "expected"),
    [
        pytest.param(
            # The accented letter is sent in UTF8, read by the server as two LATIN1
            # characters, and would be stored so
            "SET client_encoding TO 'LATIN1'",
            "SELECT length(%s)",
            ("\u00e9",),
            1,
            id="client_encoding",
        ),
        pytest.param(
            # psycopg2 reads sql_standard's '1 2:03:00' as 12 hours 3 minutes
            "SET IntervalStyle TO 'sql_standard'",
            "SELECT '1 day 2 hours 3 minutes'::interval",
            None,
            datetime.timedelta(days=1, hours=2, minutes=3),
            id="IntervalStyle",
        ),
        pytest.param(
            "SET DateStyle TO 'SQL, DMY'",  # psycopg2: "unable to parse date"
            "SELECT '2024-03-04'::date",
            None,
            datetime.date(2024, 3, 4),
            id="DateStyle",
        ),
    ],
)
def test_psycopg2_session_parameter_a_set_statement_changed_is_undone_on_return(
    psycopg2_connect: Connector,
    session_reset: str | None,
    statement: str,
    query: str,
    params: tuple[Any, ...] | None,
    expected: Any,
) -> None:
    """A SET statement changes a session parameter psycopg2 sends or reads values by, which
    psycopg2 does not follow (it read them at connect; libpq, which reads the server's report,
    knows the new value).  Left as it is, the next borrower's values are sent or read wrong,
    for the first two with no error.  (The session reset's DISCARD ALL puts them back too.)"""
    pool = new_pool(psycopg2_connect, session_reset=session_reset)
    try:
        with pool.connection() as conn:
            conn.autocommit = True  # else the rollback on return undoes the SET
            rows(conn, statement)
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first  # reused, not discarded
            assert rows(conn, query, params) == [(expected,)]
    finally:
        pool.close()


@pytest.mark.postgresql
def test_psycopg2_discard_reset_keeps_the_client_encoding_configure_set(
    psycopg2_connect: Connector,
) -> None:
    """DISCARD ALL sets the session's client_encoding back to what it started with, and
    psycopg2, which does not read it again, goes on encoding in the one ``configure`` set:
    unless the reset sets it again, an accented letter sent in LATIN1 reaches a UTF8 session
    as an invalid byte sequence."""
    pool = new_pool(
        psycopg2_connect,
        session_reset="discard",
        configure=lambda conn: conn.set_client_encoding("LATIN1"),
    )
    try:
        for _ in range(2):  # the second lease runs after a reset
            with pool.connection() as conn:
                assert rows(conn, "SELECT '\u00e9', current_setting('client_encoding')") == [
                    ("\u00e9", "LATIN1")
                ]
    finally:
        pool.close()


@pytest.mark.postgresql
@pytest.mark.parametrize("encoding", ["EUC_JP", "SQL_ASCII"])
def test_psycopg2_discard_reset_sends_no_encoding_for_a_name_spelled_with_an_underscore(
    postgresql_dsn: str, encoding: str
) -> None:
    """psycopg2 writes an encoding's name without its underscore (``conn.encoding`` is
    ``EUCJP``, ``SQLASCII``), the server with it: compared as they are, the names never
    matched, and every reset sent the client encoding again, a round trip more per lease."""
    import psycopg2
    import psycopg2.extensions

    sent: list[str] = []

    class Recording(psycopg2.extensions.cursor):
        def execute(self, query: Any, vars: Any = None) -> None:
            sent.append(str(query))
            super().execute(query, vars)

    def connect() -> Any:
        conn = psycopg2.connect(postgresql_dsn, client_encoding=encoding)
        conn.cursor_factory = Recording
        return conn

    pool = new_pool(connect, session_reset="discard")
    try:
        with pool.connection() as conn:
            rows(conn, "SELECT 1")
            del sent[:]
        assert sent == ["DISCARD ALL"]
        with pool.connection() as conn:  # the session still reads and writes in it
            assert rows(conn, "SELECT current_setting('client_encoding')") == [(encoding,)]
    finally:
        pool.close()


@pytest.mark.postgresql
def test_psycopg2_discard_reset_keeps_dates_readable_whatever_the_datestyle(
    postgresql_dsn: str,
) -> None:
    """psycopg2 parses dates in the ISO style only, and sets it as it connects when the
    session's is another; DISCARD ALL sets the session's back: unless the reset sets ISO
    again, the next borrower's dates fail to parse ("unable to parse date")."""
    import psycopg2

    def connect() -> Any:
        return psycopg2.connect(postgresql_dsn, options="-c DateStyle=SQL,DMY")

    pool = new_pool(connect, session_reset="discard")
    try:
        for _ in range(2):
            with pool.connection() as conn:
                (day,) = rows(conn, "SELECT date '2024-03-01'")[0]
                assert (day.year, day.month, day.day) == (2024, 3, 1)
        assert pool.stats().created == 1
    finally:
        pool.close()


@pytest.mark.postgresql
def test_psycopg2_two_phase_transaction_left_open_is_rolled_back_not_discarded(
    psycopg2_connect: Connector,
) -> None:
    """psycopg2's rollback() refuses a two-phase transaction ("rollback cannot be used during a
    two-phase transaction"): a lease returned inside one is ended with tpc_rollback(), rather
    than failing its reset and costing a reconnect."""
    pool = new_pool(psycopg2_connect)
    try:
        with pool.connection() as conn:
            conn.tpc_begin(conn.xid(1, "dbpool-edges", "branch"))
            rows(conn, "select 1")
            first = conn.raw
        with pool.connection() as conn:
            assert rows(conn, "select 1") == [(1,)]
            again = conn.raw
        assert pool.stats().discards["reset_failed"] == 0
        assert again is first
    finally:
        pool.close()


@pytest.mark.postgresql
@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK"])
def test_psycopg2_transaction_ended_by_a_statement_leaves_the_next_borrower_transactional(
    psycopg2_connect: Connector, statement: str
) -> None:
    """psycopg2 keeps its own record of the transaction it began (``conn.status``) and sends
    BEGIN only when that record says none is open.  A ``COMMIT`` or ``ROLLBACK`` run as a
    statement ends the server's transaction but not the record, while libpq reports the
    connection idle: unless the return path rolls back, the next borrower's statements each
    commit at once, and its ``rollback()`` undoes nothing."""
    pool = new_pool(psycopg2_connect)
    try:
        with pool.connection() as conn:
            rows(conn, "create temp table kept (x int)")
            conn.commit()
            rows(conn, "select 1")
            rows(conn, statement)
            first = conn.raw
        with pool.connection() as conn:
            rows(conn, "insert into kept values (1)")
            conn.rollback()
        with pool.connection() as conn:
            assert rows(conn, "select count(*) from kept") == [(0,)], (
                "the next borrower's rolled-back insert was committed"
            )
            assert conn.raw is first
        assert pool.stats().discarded == 0
    finally:
        pool.close()


# -- sqlite3 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "install",
    [
        pytest.param(lambda conn, seen: conn.set_trace_callback(seen.append), id="trace"),
        pytest.param(
            lambda conn, seen: conn.set_authorizer(
                lambda *request: seen.append(request) or sqlite3.SQLITE_DENY
            ),
            id="authorizer",
        ),
        pytest.param(
            lambda conn, seen: conn.set_progress_handler(lambda: seen.append("step") or 1, 1),
            id="progress-handler",
        ),
        pytest.param(
            lambda conn, seen: conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 8),
            id="limit",
            marks=_needs_connection_method("setlimit"),
        ),
    ],
)
def test_sqlite_callbacks_and_limits_a_lease_set_do_not_reach_the_next_borrower(
    sqlite_connect: Connector, install: Callable[[Any, list[Any]], None]
) -> None:
    """sqlite3 reads none of these back, so none can be undone: the previous borrower's trace
    callback would see the next borrower's statements, its authorizer or progress handler
    deny or interrupt them, its limit refuse their longer strings.  The connection is
    discarded instead (a file database keeps its data)."""
    pool = new_pool(sqlite_connect)
    seen: list[Any] = []
    try:
        with pool.connection() as conn:
            rows(conn, "CREATE TABLE kept (x TEXT)")
            rows(conn, "INSERT INTO kept VALUES ('a value past eight characters')")
            conn.commit()
            install(conn, seen)
            first = conn.raw
        seen.clear()
        with pool.connection() as conn:
            assert conn.raw is not first
            assert rows(conn, "SELECT x FROM kept") == [("a value past eight characters",)]
        assert seen == []
        assert pool.stats().discards["reset_failed"] == 1
    finally:
        pool.close()


@_needs_connection_method("deserialize")
def test_sqlite_database_a_lease_deserialized_into_memory_does_not_reach_the_next_borrower(
    sqlite_connect: Connector, tmp_path: Any
) -> None:
    """``deserialize()`` puts an in-memory image in place of the connection's file: the next
    borrowers of that connection committed to memory only, and their work never reached the
    file.  The connection is discarded instead."""
    pool = new_pool(sqlite_connect)
    try:
        pool.execute("create table t (x int)")
        with pool.connection() as conn:
            conn.deserialize(conn.serialize())
        with pool.connection() as conn:
            rows(conn, "insert into t values (1)")
            conn.commit()
        assert pool.stats().discards["reset_failed"] == 1
    finally:
        pool.close()
    other = sqlite3.connect(str(tmp_path / "db.sqlite3"))
    try:
        assert other.execute("select x from t").fetchall() == [(1,)]
    finally:
        other.close()


def _read_part(handle: Any) -> None:
    if hasattr(handle, "read"):  # a Blob
        assert handle.read(2) == b"\0\0"
    else:  # a cursor, or iterdump()'s generator
        next(handle)


def _refuses_use(handle: Any) -> None:
    if hasattr(handle, "write"):
        with pytest.raises(sqlite3.ProgrammingError, match="closed blob"):
            handle.write(b"xx")
    elif hasattr(handle, "fetchone"):
        with pytest.raises(sqlite3.ProgrammingError, match="closed cursor"):
            handle.fetchone()
    else:
        with pytest.raises(StopIteration):
            next(handle)


@pytest.mark.parametrize(
    "open_handle",
    [
        pytest.param(lambda conn: conn.execute("select b from t"), id="execute-cursor"),
        pytest.param(
            lambda conn: conn.blobopen("t", "b", 1),
            id="blob",
            marks=_needs_connection_method("blobopen"),
        ),
        pytest.param(lambda conn: conn.iterdump(), id="iterdump"),
    ],
)
def test_sqlite_statement_left_running_holds_no_lock_nor_reaches_the_connection(
    sqlite_connect: Connector, tmp_path: Any, open_handle: Callable[[Any], Any]
) -> None:
    """What sqlite3 returns from ``conn.execute()`` (reached through the lease: a driver cursor,
    not one of the lease's), ``conn.blobopen()`` and ``conn.iterdump()``, read in part, holds
    a lock on the file until closed while ``in_transaction`` is False; and each is the
    driver's own object.  Left open as the lease goes back, the connection goes back as clean
    and, idle in the pool, blocks every writer (``database is locked``), and the previous
    borrower goes on reading (and, with the Blob, writing) through the connection the next
    borrower has.  The return path closes them."""
    pool = new_pool(sqlite_connect)
    path = str(tmp_path / "db.sqlite3")
    other = sqlite3.connect(path, timeout=0, check_same_thread=False)
    try:
        pool.execute("create table t (b blob)")
        pool.execute("insert into t values (zeroblob(8)), (zeroblob(8))")
        with pool.connection() as conn:
            handle = open_handle(conn)
            _read_part(handle)
        # The lease is back; `handle` is still referenced here, as after any with block.
        assert pool.stats().idle == 1
        try:
            other.execute("BEGIN EXCLUSIVE")  # any writer's COMMIT needs this lock
        except sqlite3.OperationalError as exc:
            pytest.fail(f"an idle pooled connection holds a lock: {exc}")
        other.rollback()
        _refuses_use(handle)
    finally:
        other.close()
        pool.close()


def test_sqlite_timed_out_block_with_a_part_read_cursor_keeps_its_connection(
    sqlite_connect: Connector,
) -> None:
    """Past the deadline the watchdog calls interrupt(); SQLite keeps that flag set while any
    statement of the connection is still active (a cursor of the block read only in part), so
    the block's ROLLBACK and the PRAGMA that puts busy_timeout back would fail with
    "interrupted" (the connection discarded, a lease the caller keeps refusing all further
    use): the cursors are closed first."""
    pool = new_pool(sqlite_connect)
    try:
        pool.execute("create table t (x int)")
        pool.execute("insert into t values (1), (2), (3)")
        with pool.connection() as conn:
            with pytest.raises(dbpool.TransactionTimeout):
                with conn.transaction(timeout=0.3) as tx:
                    cur = tx.execute("select x from t")
                    assert cur.fetchone() == (1,)
                    tx.execute(SQLITE_SLOW_SQL)  # interrupted at the deadline
            # The timed-out transaction was rolled back: the lease goes on.
            assert rows(conn, "select count(*) from t") == [(3,)]
        assert pool.stats().discards["reset_failed"] == 0
    finally:
        pool.close()


def _file_with(path: str, value: str) -> None:
    """A SQLite file at ``path`` with one table ``t`` holding ``value``."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("create table t (v text)")
        conn.execute("insert into t values (?)", (value,))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("validation", ["check", "checkout", "check-hook"])
def test_sqlite_connection_to_a_file_replaced_under_the_pool_fails_validation(
    sqlite_connect: Connector, tmp_path: Any, validation: str
) -> None:
    """A deploy or restore puts a new file in place of the database (``os.replace(new,
    path)``): connections opened before keep the old file open, read its data as if nothing
    happened, and fail every write with "attempt to write a readonly database".  Only the
    device and inode of the file at the path tell them apart: validation compares them."""
    path = str(tmp_path / "db.sqlite3")
    _file_with(path, "old")
    _file_with(str(tmp_path / "new.sqlite3"), "new")
    options: dict[str, Any] = {"validate_after": 0 if validation == "checkout" else None}
    if validation == "check-hook":
        options["check"] = lambda raw: raw.execute("select 1").fetchall()
    pool = new_pool(sqlite_connect, **options)
    try:
        with pool.connection() as conn:
            assert rows(conn, "select v from t") == [("old",)]
        assert pool.check() == 0  # the same file: no false alarm
        os.replace(tmp_path / "new.sqlite3", path)
        if validation == "check":
            assert pool.check() == 1
        with pool.connection() as conn:
            assert rows(conn, "select v from t") == [("new",)]
            rows(conn, "insert into t values ('written')")
            conn.commit()
        reason = "check_failed" if validation == "check-hook" else "broken"
        assert pool.stats().discards[reason] == 1
    finally:
        pool.close()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite_errorcode is new in Python 3.11")
def test_sqlite_write_to_a_replaced_file_discards_its_connection_and_the_others(
    sqlite_connect: Connector, tmp_path: Any
) -> None:
    """SQLite tells a write through a connection whose file was replaced with its own code,
    SQLITE_READONLY_DBMOVED, while the connection looks as sound as ever: the pool kept
    handing it out, and the others opened before the swap, until max_lifetime.  The error
    counts as a lost connection: discarded on return as broken, and the idle ones are
    validated before their next use, even with no validation by age."""
    path = str(tmp_path / "db.sqlite3")
    _file_with(path, "old")
    _file_with(str(tmp_path / "new.sqlite3"), "new")
    pool = new_pool(sqlite_connect, max_size=2, validate_after=None)
    try:
        with pool.connection() as first, pool.connection() as second:
            assert rows(first, "select v from t") == rows(second, "select v from t")
        os.replace(tmp_path / "new.sqlite3", path)
        with pool.connection() as conn:
            with pytest.raises(sqlite3.OperationalError, match="readonly") as failed:
                rows(conn, "insert into t values ('lost')")
            assert failed.value.sqlite_errorcode == 1032
        assert pool.stats().discards["broken"] == 1
        with pool.connection() as conn:
            assert rows(conn, "select v from t") == [("new",)]
        assert pool.stats().discards["broken"] == 2  # the other one, at its checkout
    finally:
        pool.close()


def test_sqlite_shared_memory_database_is_refused_as_memory_is() -> None:
    """A shared in-memory database lasts only while one connection to it is open, and the pool
    closes its connections by itself (max_lifetime, 1 h by default; idle_timeout; a discard):
    its data would vanish silently, so the URL is refused as ':memory:' is."""
    url = "sqlite:///file:dbpool_edges%3Fmode%3Dmemory%26cache%3Dshared?uri=true"
    with pytest.raises(ValueError, match=r"in-memory database.*use a file"):
        dbpool.create_pool(url, min_size=1, max_size=1)


@pytest.mark.parametrize(
    ("database", "uri"),
    [
        pytest.param(":memory:", False, id="memory"),
        pytest.param("", False, id="temporary"),
        pytest.param("file::memory:", True, id="memory-uri"),
        pytest.param("file:sqlite2_edges?mode=memory", True, id="mode-memory"),
        pytest.param("file:sqlite2_edges?mode=memory&cache=shared", True, id="shared-cache"),
    ],
)
@pytest.mark.parametrize("max_size", [1, 2])
def test_sqlite_connect_callable_to_a_database_with_no_file_is_refused(
    database: str, uri: bool, max_size: int
) -> None:
    """A connect callable is not a URL, and was not checked: each pooled connection to
    ':memory:' was an empty database of its own (borrowers saw different data), and even a
    pool of one lost its data as it replaced its connection.  With cache=shared the database
    lasts only while a connection to it is open, and nothing on a connection tells it from a
    private one: refused too, pointing at the memdb VFS."""

    def connect() -> Any:
        return sqlite3.connect(database, uri=uri, check_same_thread=False)

    pool = new_pool(connect, max_size=max_size)
    try:
        with pytest.raises(TypeError, match=r"':memory:'.*use a file.*vfs=memdb"):
            pool.connection()
        assert pool.stats().size == 0
    finally:
        pool.close()


def test_sqlite_memdb_database_is_shared_by_the_pool_connections() -> None:
    """What the refusal of in-memory databases suggests instead: the memdb VFS under a name
    that starts with '/', which every connection of the process shares while one is open."""
    uri = "file:/sqlite2_edges_memdb?vfs=memdb"
    keeper = sqlite3.connect(uri, uri=True)

    def connect() -> Any:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    pool = new_pool(connect, max_size=2)
    try:
        with pool.connection() as first, pool.connection() as second:
            rows(first, "create table t (x int)")
            rows(first, "insert into t values (1)")
            first.commit()
            assert rows(second, "select x from t") == [(1,)]
        assert pool.check() == 0  # validation finds the connections sound
        assert pool.stats().size == 2
    finally:
        pool.close()
        keeper.close()


def test_sqlite_interrupt_with_a_driver_cursor_left_running_does_not_reach_the_next_borrower(
    sqlite_connect: Connector,
) -> None:
    """SQLite keeps an interrupt() in force while any statement of the connection is active.
    A cursor made on conn.raw and read in part is one the return path never sees: the next
    borrower's statements failed with "interrupted" until that cursor was dropped.  The
    connection is discarded instead."""
    pool = new_pool(sqlite_connect)
    try:
        pool.execute("create table t (x int)")
        pool.execute("insert into t values (1), (2), (3)")
        with pool.connection() as conn:
            kept = conn.raw.execute("select x from t")
            assert kept.fetchone() == (1,)
            conn.raw.interrupt()
        with pool.connection() as conn:
            assert rows(conn, "select count(*) from t") == [(3,)]
        assert pool.stats().discards["reset_failed"] == 1
        del kept
    finally:
        pool.close()


def test_sqlite_driver_cursor_left_running_does_not_pin_the_next_borrower_to_old_data(
    sqlite_connect: Connector, tmp_path: Any
) -> None:
    """In WAL mode, a statement still active keeps its connection's read snapshot open: the
    next borrower read the data as it was when the previous one's conn.raw cursor started,
    and missed every commit made since through other connections."""
    path = str(tmp_path / "db.sqlite3")
    setup = sqlite3.connect(path)
    setup.execute("pragma journal_mode = wal")
    setup.execute("create table t (x int)")
    setup.execute("insert into t values (1), (2)")
    setup.commit()
    pool = new_pool(sqlite_connect)
    try:
        with pool.connection() as conn:
            kept = conn.raw.execute("select x from t")
            assert kept.fetchone() == (1,)
        setup.execute("insert into t values (3)")
        setup.commit()
        with pool.connection() as conn:
            assert rows(conn, "select count(*) from t") == [(3,)]
        del kept
    finally:
        pool.close()
        setup.close()


def test_sqlite_driver_cursors_read_to_the_end_keep_their_connection(
    sqlite_connect: Connector,
) -> None:
    """The return path's check for a statement still active finds none where every cursor of
    conn.raw was read to its end or closed, interrupts nothing and keeps the connection."""
    pool = new_pool(sqlite_connect)
    try:
        pool.execute("create table t (x int)")
        pool.execute("insert into t values (1), (2)")
        with pool.connection() as conn:
            done = conn.raw.execute("select x from t")
            assert done.fetchall() == [(1,), (2,)]
            closed = conn.raw.execute("select x from t")
            assert closed.fetchone() == (1,)
            closed.close()
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first
            assert rows(conn, "select count(*) from t") == [(2,)]
        assert pool.stats().discards["reset_failed"] == 0
    finally:
        pool.close()


def test_sqlite_backup_takes_a_lease_as_its_target(
    sqlite_connect: Connector, tmp_path: Any
) -> None:
    """sqlite3's backup() checks that its target is a sqlite3 Connection: a lease, passed
    through a lease, was refused with a TypeError; it is now passed as its driver connection."""
    source = new_pool(sqlite_connect)

    def connect_copy() -> Any:
        return sqlite3.connect(str(tmp_path / "copy.sqlite3"), check_same_thread=False)

    copy = new_pool(connect_copy)
    try:
        source.execute("create table t (x int)")
        source.execute("insert into t values (7)")
        with source.connection() as conn, copy.connection() as target:
            conn.backup(target)
        with copy.connection() as target, source.connection() as conn:
            conn.backup(target=target, pages=1)
            assert rows(target, "select x from t") == [(7,)]
    finally:
        copy.close()
        source.close()


@pytest.mark.postgresql
def test_psycopg2_ping_of_a_connection_with_session_characteristics_is_one_statement(
    postgresql_dsn: str,
) -> None:
    """The docs: the ping is one round trip, ``SELECT 1`` on psycopg2.  It turns autocommit on
    and off around the query, and psycopg2, leaving autocommit with a non-default isolation
    level, read-only or deferrable setting, sends a ``SET default_transaction_... TO default``
    for each (three round trips for a pool configured with ``set_session(readonly=True)``)
    unless they are put aside, locally, first.  Measured as the bytes the client sends for one
    pool.check()."""
    import psycopg2
    from psycopg.conninfo import conninfo_to_dict

    from tests.faultproxy import FaultProxy

    params = conninfo_to_dict(postgresql_dsn)
    if params.get("host", "127.0.0.1") != "127.0.0.1":
        pytest.skip("the fault proxy relays to 127.0.0.1 only")
    upstream = ("127.0.0.1", int(params.pop("port", 5432)))
    params.update(host="127.0.0.1", sslmode="disable", connect_timeout=10)

    def ping_bytes(proxy: FaultProxy, configure: Any) -> int:
        def connect() -> Any:
            conn = psycopg2.connect(**{**params, "port": proxy.port})
            configure(conn)
            return conn

        pool = new_pool(connect)
        try:
            with pool.connection():
                pass  # one idle connection
            before = proxy.stats().bytes_to_server
            assert pool.check() == 0
            return proxy.stats().bytes_to_server - before
        finally:
            pool.close()

    with FaultProxy(upstream=upstream) as proxy:
        plain = ping_bytes(proxy, lambda conn: None)
        configured = ping_bytes(
            proxy, lambda conn: conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        )
    assert configured == plain, f"the ping sent {configured} bytes instead of {plain}"


@pytest.mark.postgresql
def test_psycopg2_discard_reset_of_a_connection_with_session_characteristics_is_one_statement(
    postgresql_dsn: str,
) -> None:
    """``session_reset="discard"`` costs one ``DISCARD ALL`` per return.  It runs with
    autocommit switched on and off around it, and psycopg2, leaving autocommit with a
    non-default isolation level, read-only or deferrable setting, sends a ``SET
    default_transaction_... TO default`` for each (two round trips more for a pool configured
    with ``set_session(isolation_level=..., readonly=True)``) unless they are put aside,
    locally, first.  Measured as the bytes the client sends for one return; the next
    transaction still has the configured characteristics."""
    import psycopg2
    from psycopg.conninfo import conninfo_to_dict

    from tests.faultproxy import FaultProxy

    params = conninfo_to_dict(postgresql_dsn)
    if params.get("host", "127.0.0.1") != "127.0.0.1":
        pytest.skip("the fault proxy relays to 127.0.0.1 only")
    upstream = ("127.0.0.1", int(params.pop("port", 5432)))
    params.update(host="127.0.0.1", sslmode="disable", connect_timeout=10)
    check = (
        "select current_setting('transaction_isolation'), current_setting('transaction_read_only')"
    )

    def reset_bytes(proxy: FaultProxy, configure: Any) -> tuple[int, Any]:
        def connect() -> Any:
            conn = psycopg2.connect(**{**params, "port": proxy.port})
            configure(conn)
            return conn

        pool = new_pool(connect, session_reset="discard")
        try:
            with pool.connection():
                pass  # one idle connection
            before = proxy.stats().bytes_to_server
            with pool.connection() as conn:
                conn.cursor().close()  # used, with nothing to roll back: the reset alone
            sent = proxy.stats().bytes_to_server - before
            with pool.connection() as conn:
                return sent, rows(conn, check)[0]
        finally:
            pool.close()

    with FaultProxy(upstream=upstream) as proxy:
        plain, _ = reset_bytes(proxy, lambda conn: None)
        configured, in_force = reset_bytes(
            proxy, lambda conn: conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        )
    assert configured == plain, f"the reset sent {configured} bytes instead of {plain}"
    assert in_force == ("repeatable read", "on")


@pytest.mark.postgresql
def test_psycopg2_named_cursor_committed_through_its_connection_costs_no_reconnect(
    psycopg2_connect: Connector,
) -> None:
    """``pool.cursor()`` work is committed with ``cur.connection.commit()``; the commit also
    ends a named cursor's transaction, and closing the cursor after that raises psycopg2's
    "named cursor isn't valid anymore" (with no I/O, as psycopg2 does without a pool).  The
    connection is fine: the return path must not discard it as failing its reset."""
    import psycopg2

    pool = new_pool(psycopg2_connect)
    try:
        with pytest.raises(psycopg2.ProgrammingError, match="named cursor"):
            with pool.cursor("dbpool_edges_committed") as cur:
                cur.execute("select generate_series(1, 10)")
                assert cur.fetchmany(2) == [(1,), (2,)]
                first = cur.connection.raw
                cur.connection.commit()
        with pool.connection() as conn:
            assert conn.raw is first
            assert rows(conn, "select 1") == [(1,)]
        assert pool.stats().discarded == 0, pool.stats().discards
    finally:
        pool.close()
