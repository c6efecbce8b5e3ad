"""What the dialects do for a transaction's deadline and its retries, against the real drivers:
mysqlclient's cancel and sever from a thread other than the one inside the query, and SQLite's
busy and locked errors (extended codes included) and lock waits."""

from __future__ import annotations

import sqlite3
import sys
import time
import warnings
from typing import Any, Callable

import pytest

import dbpool
from dbpool import TransactionTimeout
from dbpool.dialects import MySQLdbDialect, SQLiteDialect
from tests.conftest import Caller, Connector, rows, scalar, wait_until

pytestmark = pytest.mark.timeout(30)

SLOW = 20  # seconds a statement runs unless something stops it
ER_QUERY_INTERRUPTED = 1317  # what KILL QUERY makes the statement fail with


# -- mysqlclient -------------------------------------------------------------------------------


def unbounded_sleep(conn: Any) -> str:
    """A statement that runs SLOW seconds, with the server's own statement limit (which a
    deadline sets) switched off for it: only the client can stop it."""
    if "MariaDB" not in conn.get_server_info():
        # MySQL's SLEEP() returns 1 when killed: a cancel would not show in how it ends
        pytest.skip("needs MariaDB, whose SLEEP() fails when killed")
    return f"SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP({SLOW})"


def start_sleeping(connect: Callable[[], Any], conn: Any) -> tuple[Caller, Any]:
    """Run the slow statement on ``conn`` in a thread of its own; return once the server shows
    it running, that is once that thread is inside the driver's call.  Returns the thread and an
    admin connection (which stops the statement at the end of the test, whatever happens)."""
    session = conn.thread_id()
    sql = unbounded_sleep(conn)
    admin = connect()
    admin.autocommit(True)
    sleeper = Caller(lambda: rows(conn, sql), name="sleeper")
    wait_until(
        lambda: rows(
            admin,
            "SELECT 1 FROM information_schema.processlist WHERE id = %s AND info LIKE %s",
            (session, "%SLEEP%"),
        ),
        timeout=10,
        message="the statement never showed up on the server",
    )
    return sleeper, admin


def stop(sleeper: Caller, admin: Any, session: int) -> None:
    if not sleeper.done.is_set():
        rows(admin, f"KILL QUERY {int(session)}")
    sleeper.outcome(timeout=SLOW)
    admin.close()


def test_mysqlclient_cancel_kills_a_query_another_thread_is_inside(
    mysqlclient_connect: Connector,
) -> None:
    """mysqlclient refuses every call on a connection another thread is inside, thread_id()
    included: the cancel uses the session read when the connection was made."""
    dialect = MySQLdbDialect()
    conn = mysqlclient_connect()
    dialect.check_new(conn)  # as the pool does with each new connection
    session = conn.thread_id()
    sleeper, admin = start_sleeping(mysqlclient_connect, conn)
    try:
        dialect.cancel(conn, mysqlclient_connect)
        error = sleeper.outcome(timeout=SLOW)
        assert error is not None, "the statement ran to its end"
        assert error.args[0] == ER_QUERY_INTERRUPTED, error
    finally:
        stop(sleeper, admin, session)
    assert scalar(conn, "SELECT 1") == 1  # KILL QUERY leaves the session usable


def test_mysqlclient_sever_cuts_off_a_query_another_thread_is_inside(
    mysqlclient_connect: Connector,
) -> None:
    dialect = MySQLdbDialect()
    conn = mysqlclient_connect()
    dialect.check_new(conn)
    session = conn.thread_id()
    sleeper, admin = start_sleeping(mysqlclient_connect, conn)
    try:
        dialect.sever(conn)
        error = sleeper.outcome(timeout=SLOW)
        assert error is not None, "the statement ran to its end"
        assert dialect.is_disconnect(error), error
    finally:
        stop(sleeper, admin, session)


def test_mysqlclient_transaction_deadline_stops_the_statement(
    mysqlclient_connect: Connector,
) -> None:
    with dbpool.Pool(mysqlclient_connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=2.0) as tx:
                tx.execute(unbounded_sleep(tx.connection.raw))
        cause = info.value.__cause__
        assert cause is not None, "nothing stopped the statement: it ran to its end"
        # Cancelled (KILL QUERY), or, on a machine too loaded for that to go through within a
        # second, cut off (its socket shut down).
        killed = cause.args[0] == ER_QUERY_INTERRUPTED
        assert killed or MySQLdbDialect().is_disconnect(cause), cause


def test_mysqlclient_cancel_and_sever_refuse_a_session_that_reconnected(
    mysqlclient_connect: Connector,
) -> None:
    """After a reconnect the recorded thread id is the old session's, which a restarted server
    may have given to another client: neither KILL QUERY nor the old socket number is used."""
    dialect = MySQLdbDialect()
    conn = mysqlclient_connect()
    dialect.check_new(conn)
    old = conn.thread_id()
    admin = mysqlclient_connect()
    try:
        rows(admin, f"KILL CONNECTION {int(old)}")
        wait_until(
            lambda: (
                not rows(
                    admin, "SELECT 1 FROM information_schema.processlist WHERE id = %s", (old,)
                )
            ),
            timeout=10,
            message="the killed session is still there",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ping(True), from 2.2.1
            conn.ping(True)  # reconnects: a new socket and a new session
    finally:
        admin.close()
    assert conn.thread_id() != old
    with pytest.raises(RuntimeError, match="socket changed"):
        dialect.cancel(conn, mysqlclient_connect)
    with pytest.raises(RuntimeError, match="socket changed"):
        dialect.sever(conn)
    assert scalar(conn, "SELECT 1") == 1  # the socket was left alone
    dialect.ping(conn)  # used where no other thread is inside it: the new session is recorded
    # Nothing runs: a KILL QUERY of the new session changes nothing.
    dialect.cancel(conn, mysqlclient_connect)
    assert scalar(conn, "SELECT 1") == 1


# -- SQLite: retries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        5,  # SQLITE_BUSY
        261,  # SQLITE_BUSY_RECOVERY
        517,  # SQLITE_BUSY_SNAPSHOT
        773,  # SQLITE_BUSY_TIMEOUT
        262,  # SQLITE_LOCKED_SHAREDCACHE
        518,  # SQLITE_LOCKED_VTAB
    ],
)
def test_sqlite_extended_busy_and_locked_codes_are_retryable(code: int) -> None:
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = code
    assert SQLiteDialect().is_retryable(error)


@pytest.mark.parametrize(
    "code",
    [
        1,  # SQLITE_ERROR
        6,  # SQLITE_LOCKED, plain: a conflict within the connection itself
        8,  # SQLITE_READONLY
        264,  # SQLITE_READONLY_RECOVERY: its low byte is not busy or locked
        2067,  # SQLITE_CONSTRAINT_UNIQUE
        None,
    ],
)
def test_sqlite_other_codes_are_not_retryable(code: int | None) -> None:
    error = sqlite3.OperationalError("no")
    error.sqlite_errorcode = code
    assert not SQLiteDialect().is_retryable(error)


def as_before_python_3_11(error: sqlite3.Error) -> sqlite3.Error:
    """``error`` as Python 3.9 and 3.10 raise it: with SQLite's message and no code."""
    for name in ("sqlite_errorcode", "sqlite_errorname"):
        if hasattr(error, name):
            delattr(error, name)
    return error


def sqlite_error(run: Callable[[], object]) -> sqlite3.Error:
    with pytest.raises(sqlite3.Error) as info:
        run()
    return as_before_python_3_11(info.value)


def test_sqlite_busy_without_an_error_code_is_retryable(tmp_path: Any) -> None:
    path = str(tmp_path / "busy.sqlite3")
    writer = sqlite3.connect(path, isolation_level=None)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        writer.execute("begin immediate")
        error = sqlite_error(lambda: other.execute("begin immediate"))
    finally:
        other.close()
        writer.close()
    assert SQLiteDialect().is_retryable(error), error


def test_sqlite_shared_cache_lock_without_an_error_code_is_retryable() -> None:
    uri = "file:lock_without_code?mode=memory&cache=shared"
    writer = sqlite3.connect(uri, uri=True, isolation_level=None)
    reader = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        writer.execute("create table t (n int)")
        writer.execute("begin")
        writer.execute("insert into t values (1)")  # a write lock on the table, shared cache
        error = sqlite_error(lambda: reader.execute("select * from t").fetchall())
    finally:
        reader.close()
        writer.close()
    assert str(error).startswith("database table is locked: "), error
    assert SQLiteDialect().is_retryable(error), error


def test_sqlite_lock_within_one_connection_without_an_error_code_is_not_retryable() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute("create table t (n int)")
        conn.executemany("insert into t values (?)", [(1,), (2,)])
        reading = conn.execute("select * from t")
        reading.fetchone()  # the statement still reads the table
        error = sqlite_error(lambda: conn.execute("drop table t"))
    finally:
        conn.close()
    assert str(error) == "database table is locked", error
    assert not SQLiteDialect().is_retryable(error), error


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("no such table: t"),
        sqlite3.IntegrityError("database is locked"),  # not the driver's busy error
        sqlite3.OperationalError("database is locked", "something else"),
        sqlite3.OperationalError(5),
    ],
)
def test_sqlite_other_errors_without_an_error_code_are_not_retryable(error: Exception) -> None:
    assert not SQLiteDialect().is_retryable(error)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite_errorcode is new in Python 3.11")
def test_sqlite_busy_snapshot_is_retried(tmp_path: Any) -> None:
    """WAL mode: a transaction whose snapshot another writer made stale fails its first write
    with SQLITE_BUSY_SNAPSHOT (extended code 517); run on a fresh transaction, it succeeds."""
    path = str(tmp_path / "wal.sqlite3")
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute("create table t (id int primary key, n int)")
    setup.execute("insert into t values (1, 0)")
    setup.commit()
    other = sqlite3.connect(path)
    attempts: list[int] = []

    def add_one(tx: dbpool.Transaction[Any]) -> None:
        attempts.append(1)
        tx.execute("select n from t where id = 1").fetchall()  # the snapshot starts here
        if len(attempts) == 1:
            other.execute("update t set n = n + 100 where id = 1")
            other.commit()
        tx.execute("update t set n = n + 1 where id = 1")

    try:
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), min_size=0, max_size=1
        ) as pool:
            pool.run_transaction(add_one, retries=3)
        assert len(attempts) == 2
        assert setup.execute("select n from t").fetchall() == [(101,)]
    finally:
        other.close()
        setup.close()


# -- SQLite: lock waits ------------------------------------------------------------------------


def assert_database_locked(cause: BaseException | None) -> None:
    assert isinstance(cause, sqlite3.OperationalError), cause
    assert "locked" in str(cause)


def test_sqlite_lock_wait_that_starts_inside_the_block_ends_in_transaction_timeout(
    tmp_path: Any,
) -> None:
    """interrupt() does not end a lock wait: one that starts inside the block lasts until
    the deadline (busy_timeout), and then the block ends with TransactionTimeout, chained to
    the driver's "database is locked"."""
    path = str(tmp_path / "locked.sqlite3")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (id int)")
    holder.execute("BEGIN IMMEDIATE")  # holds the write lock throughout
    try:
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), min_size=0, max_size=1
        ) as pool:
            with pytest.raises(TransactionTimeout) as info:
                with pool.transaction(timeout=1.0) as tx:  # a plain BEGIN takes no lock
                    tx.execute("insert into t values (1)")
            assert_database_locked(info.value.__cause__)
    finally:
        holder.rollback()
        holder.close()


def test_sqlite_lock_wait_in_run_transaction_times_out_quoting_the_callers_timeout(
    tmp_path: Any,
) -> None:
    """A COMMIT waiting for readers to let go of the file (rollback journal) waits until the
    deadline: the TransactionTimeout quotes the timeout given to run_transaction, not the
    little less that was left when the attempt began (0.299871 s)."""
    path = str(tmp_path / "read.sqlite3")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("create table t (id int)")
    reader.execute("BEGIN")
    reader.execute("select * from t").fetchall()  # a shared lock: COMMIT cannot write
    try:
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), min_size=0, max_size=1
        ) as pool:
            with pytest.raises(TransactionTimeout) as info:
                pool.run_transaction(lambda tx: tx.execute("insert into t values (1)"), timeout=0.3)
            assert "ran past its 0.3 s deadline" in str(info.value)
            assert_database_locked(info.value.__cause__)
            with pool.connection() as conn:
                assert rows(conn, "select count(*) from t") == [(0,)]
    finally:
        reader.rollback()
        reader.close()


def test_sqlite_lock_wait_that_starts_late_in_the_block_ends_by_the_deadline(
    tmp_path: Any,
) -> None:
    """busy_timeout, set to the whole timeout at BEGIN, is shortened to the time left before
    a statement that starts later: its lock wait ends by the deadline, not a whole timeout
    after it started."""
    path = str(tmp_path / "locked.sqlite3")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (id int)")
    holder.execute("BEGIN IMMEDIATE")  # holds the write lock throughout
    timeout = 2.0
    try:
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), min_size=0, max_size=1
        ) as pool:
            with pytest.raises(TransactionTimeout) as info:
                with pool.transaction(timeout=timeout) as tx:  # a plain BEGIN takes no lock
                    deadline = tx.deadline
                    assert deadline is not None
                    time.sleep(timeout / 2)
                    left_ms = (deadline - time.monotonic()) * 1000
                    [(busy,)] = tx.execute("pragma busy_timeout").fetchall()
                    assert busy <= left_ms + 1, f"busy_timeout {busy} ms, {left_ms:.0f} ms left"
                    try:
                        tx.execute("insert into t values (1)")
                    finally:
                        overrun = time.monotonic() - deadline
            # A wait sized at BEGIN would have lasted a whole timeout: overrun ~timeout / 2.
            assert overrun < timeout / 4, f"the lock wait ended {overrun:.2f} s past the deadline"
            assert_database_locked(info.value.__cause__)
    finally:
        holder.rollback()
        holder.close()


def test_sqlite_commit_that_waits_for_a_reader_ends_by_the_deadline(tmp_path: Any) -> None:
    """COMMIT waits for readers to let go of the database (rollback journal): that wait, too,
    ends by the deadline when COMMIT starts late in the block, and the block then ends with
    TransactionTimeout, chained to the driver's "database is locked"."""
    path = str(tmp_path / "read.sqlite3")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("create table t (id int)")
    reader.execute("insert into t values (0)")
    reader.execute("BEGIN")
    reader.execute("select * from t").fetchall()  # holds a shared lock until its rollback
    timeout = 2.0
    try:
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), min_size=0, max_size=1
        ) as pool:
            with pytest.raises(TransactionTimeout) as info:
                try:
                    with pool.transaction(timeout=timeout) as tx:
                        deadline = tx.deadline
                        assert deadline is not None
                        tx.execute("insert into t values (1)")  # readers do not stop a write
                        time.sleep(timeout / 2)
                finally:
                    overrun = time.monotonic() - deadline
            # A wait sized at BEGIN would have lasted a whole timeout: overrun ~timeout / 2.
            assert overrun < timeout / 4, f"COMMIT's lock wait ended {overrun:.2f} s late"
            assert_database_locked(info.value.__cause__)
            assert pool.execute("select count(*) from t") == [(1,)]  # rolled back
    finally:
        reader.rollback()
        reader.close()
