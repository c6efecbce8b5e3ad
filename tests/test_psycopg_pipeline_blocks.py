"""Transaction blocks inside the borrower's psycopg 3 ``conn.pipeline()``.

In pipeline mode libpq learns the transaction status only from the server's answer to a sync:
between syncs ``pgconn.transaction_status`` says what it said at the last one (a fetch sends a
flush request, not a sync), and says ACTIVE while results are pending.  Every place where dbpool
decides from that status (may a block begin, did the server abort the transaction, must the
driver be told of the block's BEGIN, can a savepoint be rolled back to) is run here against the
real server, on a plain connection (psycopg sends BEGIN itself, and syncs after it) and on an
autocommit one (dbpool sends BEGIN as SQL, which nothing syncs), with and without a deadline
(whose limits are read and set inside the pipeline, one statement per query).

Each test checks what a block outside a pipeline guarantees: what it commits and what it rolls
back, the error it ends with, and that the connection goes back to the pool idle and out of
pipeline mode, kept rather than discarded.  Each case here once failed: libpq's
transaction status is the last sync's in pipeline mode, and the dialect now syncs where it decides.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dbpool
from tests.conftest import Connector

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(20)]

try:
    import psycopg
    import psycopg.errors
except ImportError:  # the tests are skipped without a server anyway
    psycopg = None

MODES = ["plain", "autocommit"]
TIMEOUTS = [None, 5]
TABLE = f"pipeline_blocks_{os.getpid()}"  # a CI run may share the server


class Boom(Exception):
    """The borrower's own error, which ends a block (or a savepoint's) with a rollback."""


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def admin(pg_connect: Connector) -> Iterator[Any]:
    """An autocommit connection, with the table ``pipeline_blocks_<pid>`` (id int primary key,
    v int) holding (1, 0); dropped after the test."""
    if not psycopg.Pipeline.is_supported():
        pytest.skip("this psycopg's libpq has no pipeline mode (libpq 14 and later)")
    conn = pg_connect()
    conn.autocommit = True
    conn.execute("SET lock_timeout = '5s'")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v int)")
    conn.execute(f"INSERT INTO {TABLE} VALUES (1, 0)")
    yield conn
    pg_connect.close_all()  # first: a session left in a transaction would hold up the DROP
    conn = pg_connect()
    conn.autocommit = True
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.close()


def table(admin: Any) -> list[tuple[int, int]]:
    """The table's rows, as committed."""
    return [tuple(r) for r in admin.execute(f"SELECT id, v FROM {TABLE} ORDER BY id")]


def new_pool(pg_connect: Connector, mode: str) -> dbpool.Pool[Any]:
    """One connection, so that each lease of a test gets the same one back if it was kept."""

    def configure(raw: Any) -> None:
        raw.autocommit = mode == "autocommit"

    return dbpool.Pool(pg_connect, min_size=0, max_size=1, acquire_timeout=5, configure=configure)


def backend(conn: Any) -> int:
    """The session's backend pid, read in a transaction ended here (a plain connection's):
    the lease is idle again, ready for a block."""
    pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    conn.commit()
    return pid


def assert_kept_clean(pool: dbpool.Pool[Any], pid: int) -> None:
    """The connection went back to the pool, idle and out of pipeline mode: the next lease
    gets the same session, with no transaction of the last one's left open."""
    assert pool.stats().discarded == 0
    with pool.connection() as conn:
        pgconn = conn.raw.pgconn
        assert pgconn.pipeline_status == 0
        assert pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert backend(conn) == pid


def lose_a_conflict(tx: Any, admin: Any, *, fetch: bool) -> None:
    """Inside a REPEATABLE READ block: read row 1, have another session update it and commit,
    then update it too: a serialization failure (40001), raised now if ``fetch``, else where
    the result is next read (a sync)."""
    tx.execute(f"SELECT v FROM {TABLE} WHERE id = 1").fetchall()
    admin.execute(f"UPDATE {TABLE} SET v = v + 100 WHERE id = 1")
    cursor = tx.execute(f"UPDATE {TABLE} SET v = v + 1 WHERE id = 1 RETURNING v")
    if fetch:
        cursor.fetchall()


# == fresh_transaction_state: may the block begin? ===============================================


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("fetched", [True, False], ids=["fetched", "pending"])
def test_autocommit_statements_before_the_block_stay_committed(
    pg_connect: Connector, admin: Any, fetched: bool, timeout: float | None
) -> None:
    """An autocommit connection: what the borrower ran in the pipeline before the block is
    committed (at the pipeline's next sync), and stays so when the block rolls back.  The
    server runs a pipeline's statements up to a sync in an implicit transaction, and a BEGIN
    inside it makes it the explicit one, statements before it included: the block must sync
    first, as psycopg's own nested pipeline does when results are pending."""
    with new_pool(pg_connect, "autocommit") as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                cursor = conn.execute(f"INSERT INTO {TABLE} VALUES (2, 0) RETURNING id")
                if fetched:
                    assert cursor.fetchall() == [(2,)]
                with pytest.raises(Boom), conn.transaction(timeout=timeout) as tx:
                    tx.execute(f"INSERT INTO {TABLE} VALUES (3, 0)")
                    raise Boom
        assert table(admin) == [(1, 0), (2, 0)]
        assert_kept_clean(pool, pid)


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("fetched", [True, False], ids=["fetched", "pending"])
def test_a_plain_connections_open_transaction_refuses_the_block(
    pg_connect: Connector, admin: Any, fetched: bool, timeout: float | None
) -> None:
    """A plain connection: psycopg syncs after its own BEGIN, so the status says the
    borrower's transaction is open (or ACTIVE, a result pending) and the block is refused
    before BEGIN, whether the borrower fetched its result or not; the borrower's work stays
    its own, rolled back as the lease returns."""
    with new_pool(pg_connect, "plain") as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                cursor = conn.execute(f"INSERT INTO {TABLE} VALUES (2, 0) RETURNING id")
                if fetched:
                    cursor.fetchall()
                with pytest.raises(dbpool.PoolError):
                    conn.transaction(timeout=timeout).__enter__()
        assert table(admin) == [(1, 0)]
        assert_kept_clean(pool, pid)


# == transaction_aborted: an error the borrower caught ===========================================


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_caught_error_ends_the_block_with_transaction_rolled_back(
    pg_connect: Connector, admin: Any, mode: str, timeout: float | None
) -> None:
    """The borrower catches the error of a statement (a duplicate key) inside the block and
    lets it end: PostgreSQL aborted the transaction, so nothing can be committed, and outside
    a pipeline the block says so with TransactionRolledBack, chained to the error."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with pytest.raises(dbpool.TransactionRolledBack) as raised:
                    with conn.transaction(timeout=timeout) as tx:
                        tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                        with contextlib.suppress(psycopg.errors.UniqueViolation):
                            tx.execute(f"INSERT INTO {TABLE} VALUES (1, 0)").fetchall()
        assert isinstance(raised.value.__cause__, psycopg.errors.UniqueViolation)
        assert table(admin) == [(1, 0)]
        assert_kept_clean(pool, pid)


@pytest.mark.parametrize("mode", MODES)
def test_a_caught_serialization_failure_ends_the_block_with_transaction_rolled_back(
    pg_connect: Connector, admin: Any, mode: str
) -> None:
    """The same with a serialization failure: the TransactionRolledBack chained to it is
    what tells the borrower (and run_transaction) that the block may be run again."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with pytest.raises(dbpool.TransactionRolledBack) as raised:
                    with conn.transaction(isolation="repeatable read") as tx:
                        tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                        with contextlib.suppress(psycopg.errors.SerializationFailure):
                            lose_a_conflict(tx, admin, fetch=True)
        assert isinstance(raised.value.__cause__, psycopg.errors.SerializationFailure)
        assert table(admin) == [(1, 100)]
        assert_kept_clean(pool, pid)


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_serialization_failure_read_at_commit_is_raised(
    pg_connect: Connector, admin: Any, mode: str, timeout: float | None
) -> None:
    """A failing statement whose result nobody read: the sync before COMMIT reads it, and the
    block raises the driver's error, with nothing committed and the connection kept."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with pytest.raises(psycopg.errors.SerializationFailure):
                    with conn.transaction(isolation="repeatable read", timeout=timeout) as tx:
                        tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                        lose_a_conflict(tx, admin, fetch=False)
        assert table(admin) == [(1, 100)]
        assert_kept_clean(pool, pid)


# == begin_on_server: psycopg's own conn.transaction() inside the block ===========================


@pytest.mark.parametrize(
    ("mode", "timeout", "read_first"),
    [
        pytest.param("plain", None, False),
        pytest.param("plain", None, True),
        pytest.param("plain", 5, False),
        pytest.param("plain", 5, True),
        pytest.param("autocommit", None, False),
        pytest.param("autocommit", None, True),
        pytest.param("autocommit", 5, False),
        pytest.param("autocommit", 5, True),
    ],
)
def test_psycopgs_own_transaction_inside_the_block_is_a_savepoint_of_it(
    pg_connect: Connector, admin: Any, mode: str, timeout: float | None, read_first: bool
) -> None:
    """``conn.raw.transaction()`` inside the block must find the block's transaction open
    (begin_on_server's job), and make a savepoint of it: when the block then rolls back,
    the inner block's work goes with it.  ``read_first``: the block read a result before,
    fetched with a flush rather than a sync."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with pytest.raises(Boom), conn.transaction(timeout=timeout) as tx:
                    if read_first:
                        tx.execute("SELECT 1").fetchall()
                    raw = tx.connection.raw
                    with raw.transaction():
                        raw.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                    raise Boom
        assert table(admin) == [(1, 0)]
        assert_kept_clean(pool, pid)


# == savepoints ==================================================================================


@pytest.mark.parametrize("fetched", [True, False], ids=["fetched", "queued"])
@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_a_savepoint_undoes_a_caught_error_and_the_block_commits(
    pg_connect: Connector, admin: Any, mode: str, timeout: float | None, fetched: bool
) -> None:
    """``with tx.savepoint():`` around a statement that fails (a duplicate key): the
    savepoint rolls back to itself and the rest of the block commits, as outside a pipeline.
    Its result fetched, the error is raised inside the savepoint's block; left queued, as the
    savepoint ends, which syncs first (as psycopg's own nested ``transaction()`` does)."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with conn.transaction(timeout=timeout) as tx:
                    tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                    with pytest.raises(psycopg.errors.UniqueViolation), tx.savepoint():
                        cursor = tx.execute(f"INSERT INTO {TABLE} VALUES (1, 0)")
                        if fetched:
                            cursor.fetchall()
                    tx.execute(f"INSERT INTO {TABLE} VALUES (3, 0)")
        assert table(admin) == [(1, 0), (2, 0), (3, 0)]
        assert_kept_clean(pool, pid)


@pytest.mark.parametrize("timeout", TIMEOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_nested_savepoints_release_and_roll_back(
    pg_connect: Connector, admin: Any, mode: str, timeout: float | None
) -> None:
    """Savepoints with no database error inside them: one released keeps its work, one left
    with the borrower's exception (its statements queued, never read) undoes its own and
    the one nested in it; the block commits the rest."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with conn.transaction(timeout=timeout) as tx:
                    with tx.savepoint():
                        tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                    with pytest.raises(Boom), tx.savepoint():
                        tx.execute(f"INSERT INTO {TABLE} VALUES (3, 0)")
                        with tx.savepoint():
                            tx.execute(f"INSERT INTO {TABLE} VALUES (4, 0)")
                        raise Boom
                    tx.execute(f"INSERT INTO {TABLE} VALUES (5, 0)")
        assert table(admin) == [(1, 0), (2, 0), (5, 0)]
        assert_kept_clean(pool, pid)


# == run_transaction, with the pipeline inside fn ================================================


def test_run_transaction_retries_a_failure_read_as_the_pipeline_ends(
    pg_connect: Connector, admin: Any
) -> None:
    """fn runs its statements in a pipeline of its own: the serialization failure comes as the
    pipeline ends (its sync), and the next attempt commits."""
    attempts: list[int] = []

    def fn(tx: Any) -> None:
        attempts.append(1)
        with tx.connection.pipeline():
            if len(attempts) == 1:
                lose_a_conflict(tx, admin, fetch=False)
            else:
                tx.execute(f"UPDATE {TABLE} SET v = v + 1 WHERE id = 1")

    with new_pool(pg_connect, "plain") as pool:
        pool.run_transaction(fn, isolation="repeatable read", retries=2, timeout=10)
        assert pool.stats().discarded == 0
    assert len(attempts) == 2
    assert table(admin) == [(1, 101)]


def test_run_transaction_retries_a_caught_failure_whose_pipeline_refused_the_rest(
    pg_connect: Connector, admin: Any
) -> None:
    """fn catches the serialization failure and runs another statement, which the server
    refuses as the transaction is aborted: outside a pipeline (25P02) run_transaction retries
    it, as the failure that aborted it is a retryable one."""
    attempts: list[int] = []

    def fn(tx: Any) -> None:
        attempts.append(1)
        with tx.connection.pipeline():
            if len(attempts) == 1:
                with contextlib.suppress(psycopg.errors.SerializationFailure):
                    lose_a_conflict(tx, admin, fetch=True)
            tx.execute(f"UPDATE {TABLE} SET v = v + 1 WHERE id = 1 RETURNING v").fetchall()

    with new_pool(pg_connect, "plain") as pool:
        pool.run_transaction(fn, isolation="repeatable read", retries=2, timeout=10)
    assert len(attempts) == 2
    assert table(admin) == [(1, 101)]


# == the deadline ================================================================================


@pytest.mark.parametrize("mode", MODES)
def test_a_statement_past_the_deadline_ends_the_block_with_the_timeout(
    pg_connect: Connector, admin: Any, mode: str
) -> None:
    """The limits set inside the pipeline stop a statement that runs past the deadline: the
    block raises TransactionTimeout, rolls back, and the connection is kept."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with pytest.raises(dbpool.TransactionTimeout):
                    with conn.transaction(timeout=0.3) as tx:
                        tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                        tx.execute("SELECT pg_sleep(10)").fetchall()
        assert table(admin) == [(1, 0)]
        assert_kept_clean(pool, pid)


@pytest.mark.parametrize("mode", MODES)
def test_a_late_commit_narrows_its_lock_wait_inside_the_pipeline(
    pg_connect: Connector, admin: Any, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COMMIT that comes a while after the limits were set has lock_timeout narrowed to the
    time left first (a statement queued in the pipeline, read by the sync before COMMIT): the
    block still commits.  The transaction module's clock is moved on instead of waiting."""
    import dbpool.dialects.psycopg
    import dbpool.transaction

    offset = [0.0]
    monkeypatch.setattr(dbpool.transaction, "monotonic", lambda: time.monotonic() + offset[0])
    narrowed: list[float] = []
    narrow = dbpool.dialects.psycopg.PsycopgDialect.narrow_time

    def spy(self: Any, conn: Any, seconds: float) -> None:
        narrowed.append(seconds)
        narrow(self, conn, seconds)

    monkeypatch.setattr(dbpool.dialects.psycopg.PsycopgDialect, "narrow_time", spy)
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with conn.transaction(timeout=5) as tx:
                    tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                    offset[0] = 1.0  # a second later, by the block's clock
        assert narrowed and 0 < narrowed[0] <= 4
        assert table(admin) == [(1, 0), (2, 0)]
        assert_kept_clean(pool, pid)


@pytest.mark.parametrize("mode", MODES)
def test_a_deadline_passed_in_the_sync_at_the_blocks_end_is_a_transaction_timeout(
    pg_connect: Connector, admin: Any, mode: str
) -> None:
    """A statement still queued as the block ends runs past the deadline in the sync made
    before COMMIT: cancelled there, the block ends in TransactionTimeout (the driver's
    QueryCanceled chained), as outside a pipeline, and nothing is committed."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with pytest.raises(dbpool.TransactionTimeout) as raised:
                with conn.pipeline():
                    with conn.transaction(timeout=0.3) as tx:
                        tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                        tx.execute("SELECT pg_sleep(5)")
            assert isinstance(raised.value.__cause__, psycopg.errors.QueryCanceled)
        assert table(admin) == [(1, 0)]
        assert_kept_clean(pool, pid)


# == the return path: a lease given back with its pipeline open ==================================


@pytest.mark.parametrize("mode", MODES)
def test_a_lease_returned_in_its_pipeline_after_a_block_keeps_the_commit(
    pg_connect: Connector, admin: Any, mode: str
) -> None:
    """The block committed; the borrower's pipeline, entered without ``with``, is still open
    as the lease returns: the commit stands, and the connection (which only that Pipeline
    object can take out of pipeline mode) is discarded, never handed out again."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            if mode == "plain":
                conn.commit()
            pipeline = conn.pipeline()  # kept: a context manager collected would leave it
            pipeline.__enter__()
            with conn.transaction(timeout=5) as tx:
                tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
            first = conn.raw
        assert table(admin) == [(1, 0), (2, 0)]
        assert pool.stats().discarded == 1
        with pool.connection() as conn:
            assert conn.raw is not first
            assert conn.raw.pgconn.pipeline_status == 0


@pytest.mark.parametrize("ending", ["commit", "rollback"])
@pytest.mark.parametrize("mode", MODES)
def test_a_lease_returned_just_after_its_pipeline_is_kept_clean(
    pg_connect: Connector, admin: Any, mode: str, ending: str
) -> None:
    """The pipeline closed (synced) just before the lease returns, right after a block that
    committed or rolled back and a statement of the borrower's own after it: the return
    reads the status as it is, rolls back what a plain connection left open, and keeps it."""
    with new_pool(pg_connect, mode) as pool:
        with pool.connection() as conn:
            pid = backend(conn)
            with conn.pipeline():
                with contextlib.suppress(Boom), conn.transaction() as tx:
                    tx.execute(f"INSERT INTO {TABLE} VALUES (2, 0)")
                    if ending == "rollback":
                        raise Boom
                conn.execute(f"INSERT INTO {TABLE} VALUES (3, 0)")
        kept = [(1, 0), (2, 0)] if ending == "commit" else [(1, 0)]
        if mode == "autocommit":
            kept.append((3, 0))
        assert table(admin) == kept
        assert_kept_clean(pool, pid)
