"""Pool.run_transaction() at its edges: running out of time, retryable errors that fn swallowed,
errors that only look retryable, and timeouts too large for the servers' limits.

Each test states what must hold.  Waits are on events, thread joins and the servers' own lock
waits; nothing sleeps to synchronise.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
import types
from time import monotonic
from typing import Any

import pytest

import dbpool
import dbpool.transaction
from dbpool import TransactionTimeout
from tests import fakedb
from tests.conftest import rows, wait_until

pytestmark = pytest.mark.timeout(30)


def _pool(connect: Any, **options: Any) -> dbpool.Pool[Any]:
    settings: dict[str, Any] = {"min_size": 0, "max_size": 1, "acquire_timeout": 5}
    settings.update(options)
    return dbpool.Pool(connect, **settings)


def _balanced(pool: dbpool.Pool[Any]) -> Any:
    s = pool.stats()
    assert s.in_use == 0, s
    assert s.size == s.idle + s.in_use + s.opening, s
    return s


def _deadlock_victim() -> fakedb.OperationalError:
    return fakedb.OperationalError(1205, "Transaction was deadlocked: chosen as deadlock victim")


# == running out of time ======================================================================


@pytest.mark.parametrize("oversleep", [False, True], ids=["backoff-overruns", "sleep-overshoots"])
def test_running_out_of_time_between_attempts_is_a_timeout_chained_to_the_last_error(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, oversleep: bool
) -> None:
    """fn deadlocks every time, with retries to spare: when the time budget, not the retry
    count, ends the run, the caller gets TransactionTimeout chained to the last database
    error (not the bare deadlock error, which reads as "retries exhausted", and not a timeout
    with no cause).  ``sleep-overshoots``: the backoff sleep returns after the deadline (a
    loaded machine), so the attempt loop finds no time left."""
    timeout = 0.3
    started = monotonic()
    if oversleep:
        real_sleep = time.sleep

        def late_sleep(seconds: float) -> None:
            real_sleep(max(seconds, started + timeout - monotonic() + 0.01))

        monkeypatch.setattr(dbpool.transaction, "time", types.SimpleNamespace(sleep=late_sleep))
    calls: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> None:
        calls.append(1)
        tx.execute("update t set v = 1")
        raise _deadlock_victim()

    with _pool(fake_server.connect_mssql) as pool:
        started = monotonic()
        with pytest.raises(TransactionTimeout) as info:
            pool.run_transaction(fn, retries=1_000_000, timeout=timeout)
        elapsed = monotonic() - started
        cause = info.value.__cause__
        assert isinstance(cause, fakedb.OperationalError) and cause.args[0] == 1205, repr(cause)
        assert elapsed < timeout + 0.2, elapsed
        assert len(calls) >= 1
        _balanced(pool)


@pytest.mark.parametrize("draw", [0.0, 0.999999])
def test_each_backoff_waits_half_its_length_at_least(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, draw: float
) -> None:
    """The backoff doubles from 10 ms, and each wait is between half of it and all of it,
    whatever the random draw: a retry that starts while the transaction that won the conflict
    is still committing fails again, so the five default retries must span a commit that
    takes long (155 ms at least), where full jitter could make them all near-immediate."""
    slept: list[float] = []
    fake_random = types.SimpleNamespace(random=lambda: draw)
    monkeypatch.setattr(dbpool.transaction, "random", fake_random)
    monkeypatch.setattr(dbpool.transaction, "time", types.SimpleNamespace(sleep=slept.append))

    def fn(tx: dbpool.Transaction[Any]) -> None:
        tx.execute("update t set v = 1")
        raise _deadlock_victim()

    with _pool(fake_server.connect_mssql) as pool:
        with pytest.raises(fakedb.OperationalError):
            pool.run_transaction(fn)  # the default: 5 retries
        _balanced(pool)
    nominal = [0.01, 0.02, 0.04, 0.08, 0.16]
    assert slept == pytest.approx([n * (0.5 + draw / 2) for n in nominal])
    assert sum(slept) >= 0.155 - 1e-9


def _retry_finds_every_connection_taken(
    pool: dbpool.Pool[Any], timeout: float | None
) -> tuple[BaseException, threading.Event, threading.Thread]:
    """Run a transaction whose first attempt deadlocks as another caller queues for the pool's
    only connection: the return hands it over (first in, first out), so the retry waits.
    Returns what run_transaction raised, the event that lets the other caller go, and its
    thread."""
    let_go = threading.Event()

    def hold() -> None:
        with pool.connection(timeout=10):
            let_go.wait(10)

    other = threading.Thread(target=hold)

    def fn(tx: dbpool.Transaction[Any]) -> None:
        if not other.is_alive():
            other.start()
            wait_until(lambda: pool.stats().waiting == 1)
        tx.execute("update t set v = 1")
        raise _deadlock_victim()

    with pytest.raises(Exception) as info:
        pool.run_transaction(fn, retries=3, timeout=timeout)
    return info.value, let_go, other


@pytest.mark.timeout(20)
def test_a_wait_for_a_connection_cut_short_by_run_transactions_time_is_its_timeout(
    fake_server: fakedb.Server,
) -> None:
    """The budget covers waiting for a connection: when it runs out there, the caller gets
    TransactionTimeout (as for time running out anywhere else), chained to the PoolTimeout,
    which shows the deadlock that made the attempt a retry."""
    with _pool(fake_server.connect_mssql, acquire_timeout=10) as pool:
        error, let_go, other = _retry_finds_every_connection_taken(pool, timeout=0.5)
        let_go.set()
        other.join()
        assert isinstance(error, TransactionTimeout), repr(error)
        assert "waiting for a connection" in str(error), error
        waited = error.__cause__
        assert isinstance(waited, dbpool.PoolTimeout), repr(waited)
        assert isinstance(waited.__context__, fakedb.OperationalError), repr(waited.__context__)
        assert waited.__context__.args[0] == 1205
        _balanced(pool)


@pytest.mark.timeout(20)
def test_the_pools_own_acquire_timeout_on_a_retry_shows_the_error_retried(
    fake_server: fakedb.Server,
) -> None:
    """With no overall timeout, the pool's acquire_timeout bounds each wait: its PoolTimeout
    stays a PoolTimeout, with the deadlock that made the attempt a retry as its context."""
    with _pool(fake_server.connect_mssql, acquire_timeout=0.3) as pool:
        error, let_go, other = _retry_finds_every_connection_taken(pool, timeout=None)
        let_go.set()
        other.join()
        assert type(error) is dbpool.PoolTimeout, repr(error)
        assert isinstance(error.__context__, fakedb.OperationalError), repr(error.__context__)
        _balanced(pool)


@pytest.mark.timeout(20)
def test_run_transaction_out_of_time_waiting_for_its_first_connection(
    fake_server: fakedb.Server,
) -> None:
    with _pool(fake_server.connect_mssql, acquire_timeout=10) as pool:
        with pool.connection():
            with pytest.raises(TransactionTimeout, match="waiting for a connection") as info:
                pool.run_transaction(lambda tx: None, timeout=0.2)
        assert isinstance(info.value.__cause__, dbpool.PoolTimeout), repr(info.value.__cause__)
        assert info.value.__cause__.__context__ is None
        _balanced(pool)


# == a timeout larger than the servers' limits =================================================


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_huge_finite_timeout_runs_or_is_refused_before_any_connection(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """check_options() accepts any finite timeout, but milliseconds() computes
    ceil(seconds * 1000), which overflows to infinity above ~1.8e305 s: the BEGIN then fails
    with OverflowError, after a connection was taken.  The timeout must either work (the
    servers' limits are capped at their maximum anyway) or be refused up front."""
    connect = request.getfixturevalue("sqlite_connect" if backend == "sqlite" else "pg_connect")
    with _pool(connect) as pool:
        try:
            result = pool.run_transaction(
                lambda tx: tx.execute("select 1").fetchall(), timeout=1e306
            )
        except (ValueError, TypeError):
            assert pool.stats().acquired == 0, "refused only after taking a connection"
        else:
            assert [tuple(r) for r in result] == [(1,)]
        _balanced(pool)


# == errors that only look retryable ===========================================================


def test_sqlite_locked_by_the_same_connection_is_not_retried(sqlite_connect: Any) -> None:
    """Plain SQLITE_LOCKED (6) is a conflict inside one connection (here: DROP TABLE while a
    SELECT on the same connection is still being read); another connection's conflict is
    SQLITE_BUSY, or SQLITE_LOCKED_SHAREDCACHE (262) with a shared cache.  fn does the same
    thing on every run, so re-running it cannot help: the error must propagate at once,
    unchanged, with fn run once (not `retries` more times, after backoff sleeps)."""
    setup = sqlite_connect()
    setup.execute("create table t (id int primary key)")
    setup.execute("create table u (id int primary key)")
    setup.executemany("insert into t values (?)", [(i,) for i in range(10)])
    setup.commit()
    calls: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> None:
        calls.append(1)
        reading = tx.execute("select id from t")
        reading.fetchone()  # the SELECT stays active on this connection
        tx.execute("drop table u")

    with _pool(sqlite_connect) as pool:
        with pytest.raises(sqlite3.OperationalError) as info:
            pool.run_transaction(fn, retries=3)
        assert getattr(info.value, "sqlite_errorcode", 6) == 6, info.value
        assert len(calls) == 1, f"fn ran {len(calls)} times for a same-connection SQLITE_LOCKED"
        _balanced(pool)


# == a retryable error that fn swallowed =======================================================


@pytest.mark.parametrize("then", ["return", "statement", "savepoint"])
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_postgresql_serialization_failure_swallowed_by_fn_is_retried(
    request: pytest.FixtureRequest, driver: str, then: str
) -> None:
    """fn catches a serialization failure (a best-effort step) and returns, or goes on: its
    next statement (or savepoint) is refused with "current transaction is aborted" (25P02),
    which says nothing of the cause.  PostgreSQL aborted the transaction, so it cannot commit;
    the block raises TransactionRolledBack chained to the serialization failure, which
    run_transaction retries with retries left, rather than the attempt ending there."""
    connect = request.getfixturevalue("pg_connect" if driver == "psycopg" else "psycopg2_connect")
    table = f"tx_retry_aborted_{driver}_{then}_{os.getpid()}"
    admin = connect()
    admin.autocommit = True
    rows(admin, f"drop table if exists {table}")
    rows(admin, f"create table {table} (id int primary key, v int)")
    rows(admin, f"insert into {table} values (1, 0), (2, 0)")
    other = connect()
    other.autocommit = True
    attempts: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> str:
        attempts.append(1)
        tx.execute(f"select v from {table} where id = 1").fetchall()  # the snapshot
        if len(attempts) == 1:
            rows(other, f"update {table} set v = v + 100 where id = 1")  # committed
        try:
            tx.execute(f"update {table} set v = v + 1 where id = 1")
        except Exception as exc:  # the driver's SerializationFailure: best effort
            assert getattr(exc, "sqlstate", getattr(exc, "pgcode", None)) == "40001", exc
        if then == "statement":
            tx.execute(f"update {table} set v = v + 1 where id = 2")
        elif then == "savepoint":
            with tx.savepoint():
                tx.execute(f"update {table} set v = v + 1 where id = 2")
        return "done"

    try:
        with _pool(connect) as pool:
            result = pool.run_transaction(fn, isolation="REPEATABLE READ", retries=3, timeout=10)
            assert result == "done"
            assert len(attempts) == 2
            second = 0 if then == "return" else 1
            assert rows(admin, f"select v from {table} order by id") == [(101,), (second,)]
            attempts.clear()  # a plain block too says what aborted its transaction
            with pytest.raises(dbpool.TransactionRolledBack) as caught:
                with pool.transaction(isolation="REPEATABLE READ") as tx:
                    fn(tx)
            cause = caught.value.__cause__
            assert getattr(cause, "sqlstate", getattr(cause, "pgcode", None)) == "40001", cause
            assert rows(admin, f"select v from {table} order by id") == [(201,), (second,)]
            _balanced(pool)
    finally:
        rows(admin, f"drop table if exists {table}")


@pytest.mark.parametrize("where", ["block", "savepoint"])
def test_mariadb_deadlock_swallowed_by_fn_is_retried(mysql_connect: Any, where: str) -> None:
    """InnoDB picks fn's transaction (the lighter one) as the deadlock victim and rolls it back
    whole; fn catches the 1213 and returns.  The transaction cannot commit (it is gone), and
    the cause is a deadlock with retries left: fn is re-run on a fresh transaction rather than
    the caller getting TransactionRolledBack.  ``savepoint``: fn catches it inside a
    savepoint's block, whose end cannot release a savepoint the server rolled back with the
    rest (the server would answer "SAVEPOINT ... does not exist")."""
    import contextlib

    import pymysql

    table = f"retry_swallow_my_{os.getpid()}"
    admin = mysql_connect()
    admin.autocommit(True)
    admin.cursor().execute(f"drop table if exists {table}")
    admin.cursor().execute(f"create table {table} (id int primary key, v int) ENGINE=InnoDB")
    admin.cursor().execute(
        f"insert into {table} values " + ", ".join(f"({i}, 0)" for i in range(1, 21))
    )
    holder = mysql_connect()
    # The holder is the heavier transaction (19 rows changed): InnoDB rolls back fn's.
    holder.cursor().execute(f"update {table} set v = v + 10 where id >= 2")
    attempts: list[int] = []
    errors: list[BaseException] = []

    def holder_takes_row_1() -> None:
        try:
            holder.cursor().execute(f"update {table} set v = v + 10 where id = 1")
        except BaseException as exc:
            errors.append(exc)

    def fn(tx: dbpool.Transaction[Any]) -> str:
        attempts.append(1)
        tx.execute(f"update {table} set v = v + 1 where id = 1")
        if len(attempts) == 1:
            closing = threading.Thread(target=holder_takes_row_1, daemon=True)
            closing.start()  # waits for row 1, or closes the cycle: either way a deadlock
            try:
                with tx.savepoint() if where == "savepoint" else contextlib.nullcontext():
                    try:
                        tx.execute(f"update {table} set v = v + 1 where id = 2")
                    except pymysql.err.OperationalError as exc:
                        assert exc.args[0] == 1213, exc
            finally:  # the savepoint's end raises
                closing.join(10)
                assert not closing.is_alive() and errors == [], errors
                holder.rollback()  # the retry finds both rows free
            return "swallowed"
        tx.execute(f"update {table} set v = v + 1 where id = 2")
        return "done"

    try:
        with _pool(mysql_connect) as pool:
            result = pool.run_transaction(fn, retries=3, timeout=10)
            assert result == "done"
            assert len(attempts) == 2
            cur = admin.cursor()
            cur.execute(f"select id, v from {table} where id <= 3 order by id")
            assert [tuple(r) for r in cur.fetchall()] == [(1, 1), (2, 1), (3, 0)]
            _balanced(pool)
    finally:
        holder.rollback()
        admin.cursor().execute(f"drop table if exists {table}")


@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_mariadb_snapshot_write_conflict_swallowed_by_fn_is_retried(
    request: pytest.FixtureRequest, driver: str
) -> None:
    """With innodb_snapshot_isolation (MariaDB; on by default from 11.6), a write to a row
    changed since the transaction's snapshot fails with ER_CHECKREAD (1020), and the server
    rolls the whole transaction back, as for a deadlock victim.  fn catches it and goes on:
    what it did before the error is gone, and what it does after runs in a new transaction
    behind the block's back.  Nothing of that attempt may be committed, and fn is re-run."""
    connect = request.getfixturevalue(
        "mysql_connect" if driver == "pymysql" else "mysqlclient_connect"
    )
    table = f"retry_checkread_{driver}_{os.getpid()}"
    admin = connect()
    admin.autocommit(True)
    try:
        rows(admin, "select @@innodb_snapshot_isolation")
    except Exception as exc:  # MySQL, or an older MariaDB
        admin.close()
        pytest.skip(f"the server has no innodb_snapshot_isolation: {exc}")
    rows(admin, f"drop table if exists {table}")
    rows(admin, f"create table {table} (id int primary key, v int) ENGINE=InnoDB")
    rows(admin, f"insert into {table} values (1, 0)")
    attempts: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> str:
        attempts.append(1)
        n = len(attempts)
        tx.execute(f"select v from {table} where id = 1").fetchall()  # the snapshot
        tx.execute(f"insert into {table} values ({10 + n}, 0)")
        if n == 1:
            rows(admin, f"update {table} set v = v + 1 where id = 1")  # committed since
            try:
                tx.execute(f"update {table} set v = v + 10 where id = 1")
            except Exception as exc:
                assert exc.args[0] == 1020, exc
            tx.execute(f"insert into {table} values ({20 + n}, 0)")
            return "swallowed"
        tx.execute(f"update {table} set v = v + 10 where id = 1")
        tx.execute(f"insert into {table} values ({20 + n}, 0)")
        return "done"

    def snapshot_isolation(raw: Any) -> None:
        rows(raw, "set session innodb_snapshot_isolation = ON")

    try:
        with _pool(connect, configure=snapshot_isolation) as pool:
            result = pool.run_transaction(fn, retries=3, timeout=10)
            assert (result, len(attempts)) == ("done", 2)
            assert rows(admin, f"select id, v from {table} order by id") == [
                (1, 11),
                (12, 0),
                (22, 0),
            ]
            _balanced(pool)
    finally:
        rows(admin, f"drop table if exists {table}")
        admin.close()


def test_a_savepoint_block_ended_by_an_error_that_ended_the_transaction_sends_nothing(
    fake_server: fakedb.Server,
) -> None:
    """SQL Server's deadlock victim: the server rolled the whole transaction back, savepoints
    included.  The savepoint's block raises the deadlock as it was; no ROLLBACK TRANSACTION to
    a savepoint that is gone is sent; a caller who catches it and goes on is told the
    transaction was rolled back (retryable, chained to the deadlock), not that its state is
    unknown."""
    with _pool(fake_server.connect_mssql) as pool:
        with pytest.raises(dbpool.TransactionRolledBack) as info:
            with pool.transaction() as tx:
                tx.execute("update t set v = 1")
                with pytest.raises(fakedb.OperationalError):
                    with tx.savepoint():
                        fake_server.fail_next("execute", _deadlock_victim())
                        tx.execute("update t set v = 2")
                tx.execute("update t set v = 3")
        assert isinstance(info.value.__cause__, fakedb.OperationalError), info.value.__cause__
        sent = fake_server.statements()
        assert not [sql for sql in sent if sql.startswith("ROLLBACK TRANSACTION dbpool_sp")], sent
        assert "update t set v = 3" not in sent, sent
        _balanced(pool)


# == an async fn ===================================================================================


def test_an_async_fn_is_refused_and_commits_nothing(fake_server: fakedb.Server) -> None:
    """run_transaction is synchronous: an async fn would return an un-awaited coroutine, and the
    empty transaction would commit as if fn had run."""

    async def fn(tx: dbpool.Transaction[Any]) -> None:
        tx.execute("update t set v = 1")

    def returns_a_coroutine(tx: dbpool.Transaction[Any]) -> Any:
        return fn(tx)

    with _pool(fake_server.connect) as pool:
        with pytest.raises(TypeError, match="async function"):
            pool.run_transaction(fn)
        assert pool.stats().acquired == 0, "refused only after taking a connection"
        with pytest.raises(TypeError, match="async function"):
            pool.run_transaction(returns_a_coroutine)
        assert fake_server.count("commit") == 0
        _balanced(pool)


def test_a_generator_fn_is_refused_and_commits_nothing(sqlite_connect: Any) -> None:
    """A generator function's body runs only as its result is iterated: run_transaction would
    commit an empty transaction and return the generator, whose work is then lost, or fails
    as it is iterated, the transaction over."""

    def yields_rows(tx: dbpool.Transaction[Any]) -> Any:
        tx.execute("insert into tx_gen values (1)")
        yield from tx.execute("select n from tx_gen").fetchall()

    async def yields_later(tx: dbpool.Transaction[Any]) -> Any:
        tx.execute("insert into tx_gen values (2)")
        yield 2

    def ready(tx: dbpool.Transaction[Any]) -> Any:  # a generator of rows already read is fine
        return (n for (n,) in tx.execute("select n from tx_gen").fetchall())

    with _pool(sqlite_connect) as pool:
        with pool.connection() as conn:
            conn.execute("create table tx_gen (n integer)")
            conn.commit()
        acquired = pool.stats().acquired
        for fn in (yields_rows, yields_later):
            with pytest.raises(TypeError, match="is a generator function"):
                pool.run_transaction(fn)
        assert pool.stats().acquired == acquired, "refused only after taking a connection"
        assert list(pool.run_transaction(ready)) == []
        with pool.connection() as conn:
            assert rows(conn, "select n from tx_gen") == []
        _balanced(pool)


def test_a_generator_fn_behind_a_decorator_is_refused_and_commits_nothing(
    sqlite_connect: Any,
) -> None:
    """A generator function behind a decorator (``functools.wraps``), or an object whose
    ``__call__`` is one, passes the look before the call: its generator, returned unstarted,
    is refused in the block, which then commits nothing."""

    def passes_on(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(tx: Any) -> Any:
            return fn(tx)

        return wrapper

    def yields_rows(tx: dbpool.Transaction[Any]) -> Any:
        tx.execute("insert into tx_gen values (1)")
        yield from tx.execute("select n from tx_gen").fetchall()

    class YieldsRows:
        def __call__(self, tx: dbpool.Transaction[Any]) -> Any:
            tx.execute("insert into tx_gen values (2)")
            yield 2

    with _pool(sqlite_connect) as pool:
        with pool.connection() as conn:
            conn.execute("create table tx_gen (n integer)")
            conn.commit()
        for fn in (passes_on(yields_rows), YieldsRows(), functools.partial(YieldsRows())):
            with pytest.raises(TypeError, match="is a generator function"):
                pool.run_transaction(fn)
        with pool.connection() as conn:
            assert rows(conn, "select n from tx_gen") == []
        _balanced(pool)
