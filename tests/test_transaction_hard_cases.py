"""The transaction layer's hard cases: a lease returned inside its own block, interrupts in the
block's own driver calls and the lease's, lost connections during COMMIT, savepoints after a
server-side rollback, the watchdog under hanging cancels, limits at the edge of the servers'
ranges.

Each test states the interleaving or input it reproduces.  Waits are on gates, events, barriers
and ``wait_until``; the only sleeps let a transaction deadline pass.  A test that asserts that
something does *not* happen waits for a bounded time after the moment it would have happened.
"""

from __future__ import annotations

import gc
import os
import sqlite3
import sys
import threading
import time
import types
import weakref
from time import monotonic
from typing import Any, Callable

import pytest

import dbpool
from dbpool import CommitOutcomeUnknown, PoolError, TransactionTimeout
from dbpool.dialects import MySQLdbDialect, PymssqlDialect, PyMySQLDialect
from dbpool.watchdog import Watchdog
from tests import fakedb
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)

JOIN = 15.0
_tx_module = sys.modules["dbpool.transaction"]


# -- helpers -----------------------------------------------------------------------------------


class Worker:
    """Runs ``fn`` in a daemon thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn,), name=f"tx-case-{name}", daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # kept for the test to inspect
            self.error = exc

    def join(self, timeout: float = JOIN) -> Worker:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._thread.name} still running after {timeout}s"
        return self


def becomes_true(predicate: Callable[[], Any], within: float) -> bool:
    """Poll ``predicate`` for at most ``within`` seconds; whether it ever held."""
    try:
        wait_until(predicate, timeout=within)
        return True
    except AssertionError:
        return False


def sleep_past(deadline: float | None) -> None:
    assert deadline is not None
    time.sleep(max(0.0, deadline - monotonic()) + 0.05)


def fake_pool(connect: Callable[[], Any], **options: Any) -> dbpool.Pool[Any]:
    settings: dict[str, Any] = {"min_size": 0, "max_size": 1, "acquire_timeout": 5}
    settings.update(options)
    return dbpool.Pool(connect, **settings)


class Boom(Exception):
    pass


# == 1. a lease returned inside its own transaction block =======================================
# Transaction keeps `_slot` and drives slot.raw directly (commit, rollback, restore, watchdog
# cancel); the pool's return path ignores slot.in_transaction_block.  If the lease goes back
# while the block runs (a helper doing `with conn:` / `conn.close()` on tx.connection), the
# connection is handed to the next borrower and the block then acts on *their* session.


@pytest.mark.timeout(20)
def test_block_end_never_commits_the_next_borrowers_work(fake_server: fakedb.Server) -> None:
    other = None
    with fake_pool(fake_server.connect) as pool:
        try:
            with pool.transaction() as tx:
                tx.execute("update t set v = 1")
                tx.connection.close()  # e.g. a helper that did `with conn: ...` on tx.connection
                other = pool.connection()  # the next borrower: the same driver connection
                other.cursor().execute("insert into t values (2)")  # its own, uncommitted work
        except PoolError:
            pass  # refusing the early return, or failing the block, are both acceptable fixes
        if other is not None:
            try:
                assert fake_server.in_transaction(other), (
                    "the transaction block's COMMIT went to the next borrower's session and "
                    "committed its unfinished work"
                )
            finally:
                other.close()


@pytest.mark.timeout(20)
def test_watchdog_never_cancels_the_next_borrower_after_an_early_return(
    fake_server: fakedb.Server,
) -> None:
    with fake_pool(fake_server.connect) as pool:
        holder: dict[str, Any] = {}
        try:
            with pool.transaction(timeout=0.3) as tx:
                tx.connection.close()
                other = holder["other"] = pool.connection()
                gate = fake_server.block("execute")
                holder["worker"] = Worker(
                    lambda: other.cursor().execute("select next_borrower()"), "next"
                )
                assert gate.entered.wait(JOIN)
                [raw] = fake_server.connections
                # the block's deadline passes while the next borrower's statement runs
                holder["killed"] = becomes_true(
                    lambda: raw.closed, within=(tx.deadline or 0) - monotonic() + 1.5
                )
                gate.release()
        except (PoolError, TransactionTimeout):
            pass
        finally:
            fake_server.release_all()
            if "worker" in holder:
                holder["worker"].join()
            if "other" in holder:
                holder["other"].close()
        assert not holder.get("killed"), (
            "the watchdog cancelled (generic dialect: closed) the next borrower's connection "
            "when the returned transaction's deadline passed"
        )


# == 2. commit outcome with mysqlclient ==========================================================


def test_mysqlclient_connection_cut_during_commit_reports_an_unknown_outcome(
    mysql_params: dict[str, Any],
) -> None:
    """MySQLdbDialect.transaction_state says BROKEN only when `conn.open` is false, and
    mysqlclient keeps `open` true after "Lost connection to server during query": the driver's
    OperationalError(2013) escapes instead of CommitOutcomeUnknown."""
    MySQLdb = pytest.importorskip("MySQLdb")
    import pymysql

    from tests.faultproxy import FaultProxy, Mode

    if mysql_params["host"] != "127.0.0.1" or "ssl" in mysql_params:
        pytest.skip("the fault proxy relays plain TCP to 127.0.0.1 only")
    table = f"txr_cut_{os.getpid()}"
    admin = pymysql.connect(**{**mysql_params, "autocommit": True})
    try:
        admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        admin.cursor().execute(f"CREATE TABLE {table} (id int primary key) ENGINE=InnoDB")
        with FaultProxy(upstream=("127.0.0.1", int(mysql_params["port"]))) as proxy:
            params = {**mysql_params, "host": "127.0.0.1", "port": proxy.port}
            try:
                with fake_pool(lambda: MySQLdb.connect(**params)) as pool:
                    proxy.set_mode(Mode.CUT_AFTER_COMMIT)
                    with pytest.raises(CommitOutcomeUnknown):
                        with pool.transaction() as tx:
                            tx.execute(f"INSERT INTO {table} (id) VALUES (1)")
            finally:
                proxy.drop_all()
                wait_until(lambda: proxy.stats().open == 0, timeout=10)
    finally:
        admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        admin.close()


# == 3. savepoints ===============================================================================


def test_mariadb_deadlock_inside_a_savepoint_is_retried(
    mysql_connect: Any, mysql_params: dict[str, Any]
) -> None:
    """InnoDB rolls the whole transaction back on a deadlock, savepoints included, so
    Savepoint.__exit__'s ROLLBACK TO SAVEPOINT fails with 1305 and that error replaces the
    1213: run_transaction no longer sees a retryable error and gives up."""
    import pymysql

    table = f"txr_sp_deadlock_{os.getpid()}"
    admin = pymysql.connect(**{**mysql_params, "autocommit": True})
    admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
    admin.cursor().execute(f"CREATE TABLE {table} (id int primary key, v int) ENGINE=InnoDB")
    admin.cursor().execute(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    barrier = threading.Barrier(2, timeout=10)
    first_attempt: dict[int, bool] = {}
    lock = threading.Lock()

    def work(first: int, second: int) -> Callable[[], Any]:
        def fn(tx: dbpool.Transaction[Any]) -> None:
            with lock:
                initial = first not in first_attempt
                first_attempt[first] = True
            tx.execute(f"update {table} set v = v + 1 where id = %s", (first,))
            if initial:
                barrier.wait()  # each holds one row; each now wants the other's
            with tx.savepoint():
                tx.execute(f"update {table} set v = v + 1 where id = %s", (second,))

        return lambda: pool.run_transaction(fn, retries=5, timeout=20)

    try:
        with fake_pool(mysql_connect, max_size=2) as pool:
            workers = [Worker(work(1, 2), "lock-1-2"), Worker(work(2, 1), "lock-2-1")]
            for w in workers:
                w.join()
            errors = [w.error for w in workers if w.error is not None]
            contexts = [e.__context__ for e in errors]
            assert errors == [], (
                f"the deadlock victim was not retried: {errors!r} (context: {contexts!r})"
            )
    finally:
        admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        admin.close()


@pytest.mark.timeout(20)
def test_a_savepoint_used_after_its_transaction_ended_sends_nothing(
    fake_server: fakedb.Server,
) -> None:
    with fake_pool(fake_server.connect) as pool:
        with pool.transaction() as tx:
            sp = tx.savepoint()
            tx.execute("update t set v = 1")
        with pool.connection() as other:  # the same connection, now someone else's
            other.cursor().execute("insert into t values (1)")
            before = fake_server.statements()
            with pytest.raises(PoolError):
                with sp:
                    pass
            assert fake_server.statements() == before, (
                "SAVEPOINT was sent on the next borrower's session"
            )
            other.rollback()


# == 4. interruptions (BaseException) in driver calls: the block's own, and the lease's ==========
#
# PyMySQL is Python code: an interrupt after it sent a command and before it read the reply
# leaves that reply in the socket, and the driver's next call reads it as its own.  Every
# statement below is ``select <n>`` with its own n, whose answer must be n.


def _interruptible_connection_class() -> type:
    import pymysql
    from pymysql.constants import COMMAND

    class InterruptibleConnection(pymysql.connections.Connection):  # type: ignore[misc]
        """PyMySQL, with a KeyboardInterrupt delivered at a chosen point, as Ctrl-C would."""

        interrupt_rollback = False  # after sending ROLLBACK, before its reply is read
        interrupt_before: str | None = None  # before sending a statement starting so
        interrupt_after_send: str | None = None  # after sending it, before its reply
        interrupt_reply = False  # after sending the next command of any kind, before its reply

        def _read_ok_packet(self) -> Any:
            self._interrupt_reply()
            return super()._read_ok_packet()

        def _read_query_result(self, unbuffered: bool = False) -> Any:
            self._interrupt_reply()
            return super()._read_query_result(unbuffered)

        def _interrupt_reply(self) -> None:
            if self.interrupt_reply:
                self.interrupt_reply = False
                raise KeyboardInterrupt

        def rollback(self) -> None:
            if self.interrupt_rollback:
                self.interrupt_rollback = False
                self._execute_command(COMMAND.COM_QUERY, "ROLLBACK")
                raise KeyboardInterrupt
            super().rollback()

        def query(self, sql: Any, unbuffered: bool = False) -> Any:
            text = sql.decode() if isinstance(sql, bytes) else sql
            if self.interrupt_before and text.startswith(self.interrupt_before):
                self.interrupt_before = None
                raise KeyboardInterrupt
            if self.interrupt_after_send and text.startswith(self.interrupt_after_send):
                self.interrupt_after_send = None
                self._execute_command(COMMAND.COM_QUERY, sql)
                raise KeyboardInterrupt
            return super().query(sql, unbuffered)

    return InterruptibleConnection


@pytest.fixture
def interruptible(mysql_params: dict[str, Any]) -> Any:
    cls = _interruptible_connection_class()
    made: list[Any] = []

    def connect() -> Any:
        conn = cls(**mysql_params)
        made.append(conn)
        return conn

    connect.made = made  # type: ignore[attr-defined]  # to arm one without touching conn.raw
    yield connect
    for conn in made:
        try:
            conn.close()
        except Exception:
            pass


@pytest.mark.timeout(30)
def test_interrupted_rollback_never_hands_a_desynchronised_connection_on(
    interruptible: Any,
) -> None:
    """Transaction._rollback does not mark the slot busy (Connection.rollback does): a
    KeyboardInterrupt while ROLLBACK's reply is awaited leaves an unread reply in the socket,
    the pool's own rollback reads the stale one, and the next borrower gets answers one
    statement late."""
    with fake_pool(interruptible) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.transaction() as tx:
                tx.execute("select 1")
                tx.connection.raw.interrupt_rollback = True
                raise Boom
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select 42")
            assert cur.fetchall() == ((42,),), (
                "the next borrower read a reply meant for the last one"
            )


@pytest.mark.timeout(30)
def test_interrupted_restore_never_leaks_the_deadline_limits(
    interruptible: Any, mysql_params: dict[str, Any]
) -> None:
    """Transaction._restore catches Exception only and does not mark the slot busy: a
    KeyboardInterrupt as the limits are being put back returns the connection as clean, with
    innodb_lock_wait_timeout / max_statement_time still sized to the old deadline."""
    import pymysql

    fresh = pymysql.connect(**mysql_params)
    try:
        cur = fresh.cursor()
        cur.execute("select @@session.innodb_lock_wait_timeout, @@session.max_statement_time")
        baseline = cur.fetchall()
    finally:
        fresh.close()
    with fake_pool(interruptible) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.transaction(timeout=7) as tx:
                tx.execute("select 1")
                tx.connection.raw.interrupt_before = "SET SESSION innodb_lock_wait_timeout"
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select @@session.innodb_lock_wait_timeout, @@session.max_statement_time")
            assert cur.fetchall() == baseline, "the next borrower got the old transaction's limits"


@pytest.mark.timeout(30)
def test_exit_after_an_interrupted_statement_does_not_wait_for_it(interruptible: Any) -> None:
    """Transaction._finish rolls back even when slot.busy says a driver call was interrupted
    half-way: with PyMySQL the ROLLBACK queues behind the interrupted statement, so leaving the
    block after Ctrl-C waits for the whole statement (here 3 s; it could be hours)."""
    with fake_pool(interruptible) as pool:
        started = monotonic()
        with pytest.raises(KeyboardInterrupt):
            with pool.transaction() as tx:
                tx.connection.raw.interrupt_after_send = "select sleep("
                tx.execute("select sleep(3)")
        elapsed = monotonic() - started
        assert elapsed < 1.5, f"leaving the block after the interrupt took {elapsed:.2f}s"
        s = pool.stats()
        assert s.in_use == 0 and s.discarded == 1, s


def answers(pool: dbpool.Pool[Any], *numbers: int) -> list[Any]:
    """What ``select <n>`` answers for each n, on one lease."""
    with pool.connection() as conn:
        cur = conn.cursor()
        result = []
        for n in numbers:
            cur.execute(f"select {n}")
            result.append(cur.fetchall())
        return result


@pytest.mark.timeout(30)
def test_interrupted_commit_never_hands_a_desynchronised_connection_on(interruptible: Any) -> None:
    """Transaction._end_quietly ran after a COMMIT interrupted before its reply was read, and
    cleared slot.busy: the connection went back as clean, and the next borrower's statements
    read the replies of the statements before them."""
    with fake_pool(interruptible) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.transaction() as tx:
                tx.execute("select 1").fetchall()
                interruptible.made[-1].interrupt_reply = True  # at COMMIT, as the block ends
        assert answers(pool, 42, 43) == [((42,),), ((43,),)]
        assert pool.stats().discarded == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["execute", "commit", "rollback", "ping", "select_db"])
def test_a_lease_whose_call_was_interrupted_refuses_further_use(
    interruptible: Any, call: str
) -> None:
    """A borrower that catches the KeyboardInterrupt and goes on with the same lease: the next
    call cleared slot.busy, and read the interrupted call's reply as its own (``select 2``
    answered ``1``, or nothing)."""
    with fake_pool(interruptible) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select 1")
            cur.fetchall()
            interruptible.made[-1].interrupt_reply = True
            with pytest.raises(KeyboardInterrupt):
                if call == "execute":
                    cur.execute("select 1")
                elif call == "select_db":
                    conn.select_db(conn.db.decode())
                else:
                    getattr(conn, call)()
            with pytest.raises(dbpool.ConnectionUnusable):
                cur.execute("select 2")
            with pytest.raises(dbpool.ConnectionUnusable):
                conn.commit()
        assert answers(pool, 42, 43) == [((42,),), ((43,),)]
        assert pool.stats().discarded == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["ping", "select_db", "autocommit"])
def test_interrupted_driver_method_never_hands_a_desynchronised_connection_on(
    interruptible: Any, method: str
) -> None:
    """A method of the driver's connection called through the lease (``conn.ping()``) was not
    watched: interrupted before its reply was read, the connection went back as clean."""
    arguments = {"ping": (), "select_db": (None,), "autocommit": (True,)}[method]
    with fake_pool(interruptible) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                if method == "select_db":
                    arguments = (conn.db.decode(),)
                interruptible.made[-1].interrupt_reply = True
                getattr(conn, method)(*arguments)
        assert answers(pool, 42, 43) == [((42,),), ((43,),)]
        assert pool.stats().discarded == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("call", ["ping", "statement"])
def test_interrupted_call_on_the_raw_connection_never_hands_a_desynchronised_connection_on(
    interruptible: Any, call: str
) -> None:
    """A call on ``conn.raw`` (or a cursor of its own) interrupted before its reply was read:
    the return path's ROLLBACK read that reply as its own, and left ROLLBACK's for the next
    borrower."""
    with fake_pool(interruptible) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                raw = conn.raw
                raw.interrupt_reply = True
                if call == "ping":
                    raw.ping()
                else:
                    raw.cursor().execute("set @dbpool_hard_case = 1")
        assert answers(pool, 42, 43) == [((42,),), ((43,),)]
        assert pool.stats().discarded == 1


@pytest.mark.timeout(20)
def test_the_deadline_cancels_nothing_in_a_block_whose_call_was_interrupted(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The block catches the KeyboardInterrupt of a statement and goes on (a prompt, say) past
    # its deadline.  No call runs on the connection, and none can start (the lease refuses
    # them), but the watchdog read the mark of the interrupted call as one running: it sent a
    # cancel every 50 ms (with MySQL, a new connection each time, for a KILL QUERY), then cut
    # the connection off, warning of a statement still running.
    with fake_pool(fake_server.connect) as pool:
        with pool.connection() as conn:
            dialect = conn._slot.dialect
        cancels: list[Any] = []
        monkeypatch.setattr(dialect, "cancel", lambda *args: cancels.append(args))
        monkeypatch.setattr(dialect, "sever", cancels.append)
        with pytest.raises(dbpool.ConnectionUnusable):
            with pool.transaction(timeout=30) as tx:
                fake_server.fail_next("execute", KeyboardInterrupt)
                with pytest.raises(KeyboardInterrupt):
                    tx.execute("insert into t values (1)")
                # What the watchdog runs at the deadline, and once its grace has passed
                tx._on_deadline()
                tx._on_overdue()
                assert cancels == []
        assert fake_server.count("commit") == 0
        assert pool.stats().discarded == 1


# == 5. run_transaction =========================================================================


@pytest.mark.timeout(30)
def test_run_transaction_timeout_bounds_the_wait_for_a_connection(
    fake_server: fakedb.Server,
) -> None:
    with fake_pool(fake_server.connect, acquire_timeout=6) as pool:
        with pool.connection():  # the only connection is busy elsewhere
            started = monotonic()
            with pytest.raises(TransactionTimeout):
                pool.run_transaction(lambda tx: None, retries=0, timeout=0.3)
            elapsed = monotonic() - started
        assert elapsed < 3.0, f"run_transaction(timeout=0.3) ran for {elapsed:.2f}s"


@pytest.mark.timeout(20)
def test_only_database_errors_are_retried(fake_server: fakedb.Server) -> None:
    """is_retryable looks at exc.args[0] of *any* exception: an application KeyError(1205)
    (a dict keyed by ids) is taken for a SQL Server / MySQL deadlock and fn re-run."""
    calls: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> Any:
        calls.append(1)
        tx.execute("update t set v = 1")
        balances: dict[int, int] = {}
        return balances[1205]

    with fake_pool(fake_server.connect_mssql) as pool:
        with pytest.raises(KeyError):
            pool.run_transaction(fn, retries=3)
    assert len(calls) == 1, f"fn ran {len(calls)} times for a KeyError"
    for dialect in (PyMySQLDialect(), MySQLdbDialect(), PymssqlDialect()):
        assert not dialect.is_retryable(KeyError(1205)), dialect
        assert not dialect.is_retryable(ValueError(1213)), dialect


@pytest.mark.timeout(60)
def test_many_retries_do_not_overflow_the_backoff(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delay = min(1.0, 0.01 * 2.0**attempt): 2.0**1024 raises OverflowError before min()."""
    monkeypatch.setattr(_tx_module, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    calls: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> str:
        calls.append(1)
        if len(calls) <= 1030:
            raise fakedb.OperationalError(1205, "deadlock victim")
        return "done"

    with fake_pool(fake_server.connect_mssql) as pool:
        assert pool.run_transaction(fn, retries=10_000) == "done"


# == 6. the watchdog =============================================================================


@pytest.mark.timeout(30)
def test_finished_transactions_are_not_kept_by_the_watchdog(fake_server: fakedb.Server) -> None:
    """unwatch() only flags the entry; it stays in the heap, holding the Transaction (through
    the bound callback) until its own deadline comes up, unless it drifts to the top while the
    thread happens to look.  With a transaction in flight at the top of the heap, every
    transaction that finishes meanwhile stays: R transactions/s with timeout T keep R*T dead
    Transaction objects (about 0.75 KB each) alive."""
    with fake_pool(fake_server.connect, max_size=2) as pool:
        with pool.transaction(timeout=3600):  # in flight: its entry is the earliest
            refs = []
            for _ in range(200):
                tx = pool.transaction(timeout=3600)
                with tx:
                    tx.execute("select 1")
                refs.append(weakref.ref(tx))
                del tx

            def all_freed() -> bool:
                gc.collect()
                return all(r() is None for r in refs)

            freed = becomes_true(all_freed, within=2.0)
            alive = sum(r() is not None for r in refs)
    assert freed, f"{alive} of 200 finished transactions are still referenced by the watchdog heap"


@pytest.mark.timeout(40)
def test_a_hanging_cancel_does_not_hold_up_other_deadlines(fake_server: fakedb.Server) -> None:
    """The single watchdog thread runs each cancel synchronously (KILL QUERY over a new
    connection for MySQL, cancel_safe for psycopg, close for the generic dialect): while one
    cancel hangs, no other transaction in the process is stopped at its deadline."""
    with fake_pool(fake_server.connect, max_size=2) as pool:
        close_gate = fake_server.block("close", times=1)  # the first cancel (a close) hangs
        exec_a = fake_server.block("execute", times=1)

        def run(sql: str) -> None:
            with pool.transaction(timeout=0.2) as tx:
                tx.execute(sql)

        a = Worker(lambda: run("select a_slow()"), "a")
        b = None
        try:
            assert exec_a.entered.wait(JOIN)
            assert close_gate.entered.wait(JOIN), "the watchdog never cancelled A"
            exec_b = fake_server.block("execute", times=1)
            b = Worker(lambda: run("select b_slow()"), "b")
            assert exec_b.entered.wait(JOIN)
            raw_b = fake_server.connections[-1]
            # B's deadline is 0.2 s away; allow it ten times that
            b_cancelled = becomes_true(lambda: raw_b.closed, within=2.0)
        finally:
            fake_server.release_all()
            a.join()
            if b is not None:
                b.join()
        assert b_cancelled, "B ran past its deadline uncancelled while A's cancel hung"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_survives_a_callback_raising_a_base_exception() -> None:
    """_run catches Exception only; a BaseException (say from the user's connect callable, used
    for the MySQL side connection) ends the thread, and watch() never starts another."""
    wd = Watchdog()

    class Stop(BaseException):
        pass

    def bad() -> None:
        raise Stop()

    ran = threading.Event()

    def good() -> None:
        ran.set()

    wd.watch(monotonic(), bad)
    wd.watch(monotonic() + 0.05, good)
    assert ran.wait(5), "the watchdog thread died with the first callback's BaseException"


# == 7. the deadline: inputs and spec ===========================================================


@pytest.mark.timeout(20)
def test_statement_on_a_tx_cursor_after_the_deadline_raises_at_once(
    fake_server: fakedb.Server,
) -> None:
    """A statement issued after the deadline raises at once, on a cursor from tx.cursor() as
    through tx.execute(): it is never sent to the server."""
    with fake_pool(fake_server.connect) as pool:
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=0.2) as tx:
                cur = tx.cursor()
                sleep_past(tx.deadline)
                with pytest.raises(TransactionTimeout):
                    cur.execute("update t set v = 2")
        assert "update t set v = 2" not in fake_server.statements()


def test_postgresql_accepts_a_long_finite_timeout(pg_connect: Any) -> None:
    """limit_time sends int(seconds * 1000) ms; past 2**31 - 1 ms (24.8 days), which
    check_options accepts, PostgreSQL refuses the value and every BEGIN fails."""
    with fake_pool(pg_connect) as pool:
        with pool.transaction(timeout=30 * 24 * 3600.0) as tx:
            assert tx.execute("select 1").fetchall() == [(1,)]


def test_sqlite_long_finite_timeout_keeps_waiting_for_locks(sqlite_connect: Any) -> None:
    """PRAGMA busy_timeout = 2592000000 wraps to 0: lock waits fail at once instead of
    lasting until the deadline."""
    with fake_pool(sqlite_connect) as pool:
        with pool.transaction(timeout=30 * 24 * 3600.0) as tx:
            [(busy,)] = tx.connection.raw.execute("pragma busy_timeout").fetchall()
            assert busy > 0, f"busy_timeout is {busy} ms inside a 30-day transaction"


# == 8. begin ====================================================================================


@pytest.mark.timeout(20)
def test_a_refused_level_leaves_a_held_lease_usable(fake_server: fakedb.Server) -> None:
    """dialect.begin raises ValueError before any I/O, but _begin set slot.dirty first and never
    clears it: with a dialect that cannot read the state, the held lease now refuses every
    transaction as having "work pending" although nothing was sent."""
    with fake_pool(fake_server.connect) as pool:
        with pool.connection() as conn:
            with pytest.raises(ValueError):
                with conn.transaction(isolation="SERIALIZABLE"):
                    pass
            assert fake_server.statements() == []
            with conn.transaction() as tx:
                tx.execute("update t set v = 1")


@pytest.mark.timeout(30)
def test_mariadb_failed_start_transaction_leaves_no_isolation_for_the_next_borrower(
    mysql_params: dict[str, Any],
) -> None:
    """_MySQLTransactions.begin sends SET TRANSACTION (for the next transaction) and then
    START TRANSACTION.  If START TRANSACTION fails (here an injected 1317, as KILL QUERY from the
    watchdog would), the one-shot level stays pending; on an autocommit connection the return
    path sees an idle session and sends no ROLLBACK, so the next borrower's transaction runs
    at READ UNCOMMITTED."""
    import pymysql

    class FailingStart(pymysql.connections.Connection):  # type: ignore[misc]
        fail_start = False

        def query(self, sql: Any, unbuffered: bool = False) -> Any:
            text = sql.decode() if isinstance(sql, bytes) else sql
            if self.fail_start and text.startswith("START TRANSACTION"):
                self.fail_start = False
                raise pymysql.err.OperationalError(1317, "Query execution was interrupted")
            return super().query(sql, unbuffered)

    table = f"txr_oneshot_{os.getpid()}"
    admin = pymysql.connect(**{**mysql_params, "autocommit": True})
    admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
    admin.cursor().execute(f"CREATE TABLE {table} (id int primary key) ENGINE=InnoDB")
    writer = pymysql.connect(**mysql_params)
    made: list[Any] = []

    def connect() -> Any:
        made.append(FailingStart(**{**mysql_params, "autocommit": True}))
        return made[-1]

    try:
        writer.cursor().execute(f"INSERT INTO {table} VALUES (99)")  # uncommitted
        with fake_pool(connect) as pool:
            with pool.connection() as conn:
                conn.raw.fail_start = True
            with pytest.raises(pymysql.err.OperationalError):
                with pool.transaction(isolation="READ UNCOMMITTED"):
                    pass
            with pool.transaction() as tx:  # the server default level: no dirty read
                seen = tx.execute(f"select count(*) from {table} where id = 99").fetchall()
            assert seen == ((0,),), "the next borrower's transaction read uncommitted data"
    finally:
        writer.rollback()
        writer.close()
        for conn in made:
            try:
                conn.close()
            except Exception:
                pass
        admin.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        admin.close()


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="sqlite3.connect(autocommit=...) is Python 3.12+"
)
def test_sqlite_autocommit_true_connection_commits(tmp_path: Any) -> None:
    """CPython 3.12+: with autocommit=True, Connection.commit()/rollback() do nothing
    (Modules/_sqlite/connection.c), so the explicit BEGIN the dialect sends is never committed;
    the pool then finds it "still in_transaction after rollback" and discards it: work lost."""
    path = str(tmp_path / "ac.sqlite3")
    with fake_pool(lambda: sqlite3.connect(path, autocommit=True, check_same_thread=False)) as pool:  # type: ignore[call-arg]
        with pool.transaction() as tx:
            tx.execute("create table t (x int)")
            tx.execute("insert into t values (1)")
    check = sqlite3.connect(path)
    try:
        assert check.execute("select count(*) from t").fetchall() == [(1,)]
    finally:
        check.close()


@pytest.mark.timeout(20)
def test_a_failed_savepoint_undo_stops_the_transaction_from_committing(
    fake_server: fakedb.Server,
) -> None:
    # The savepoint should have undone the second insert; its ROLLBACK TO failed, so the
    # work is still there.  Going on, and committing at the end, would commit that work.
    class AppError(Exception):
        pass

    with fake_pool(fake_server.connect) as pool:
        with pytest.raises(dbpool.ConnectionUnusable, match="rolling back to a savepoint failed"):
            with pool.transaction() as tx:
                tx.execute("insert into t values (1)")
                try:
                    with tx.savepoint():
                        tx.execute("insert into t values (2)")
                        fake_server.fail_next("execute", fakedb.OperationalError("gone"))
                        raise AppError
                except AppError:
                    pass
                tx.execute("insert into t values (3)")
        assert fake_server.count("commit") == 0
        assert "insert into t values (3)" not in fake_server.statements()
        assert pool.stats().in_use == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("step", ["creating", "releasing"])
def test_a_failed_savepoint_or_release_stops_the_transaction_from_committing(
    fake_server: fakedb.Server, step: str
) -> None:
    # The caller catches the driver's error and the block ends normally.  The failed call once
    # left the connection marked busy: the block then neither committed nor raised, and the
    # pool discarded the connection with the work in it.
    with fake_pool(fake_server.connect) as pool:
        with pytest.raises(dbpool.ConnectionUnusable, match=f"{step} a savepoint failed") as info:
            with pool.transaction() as tx:
                tx.execute("insert into t values (1)")
                with pytest.raises(fakedb.OperationalError):
                    if step == "creating":
                        fake_server.fail_next("execute", fakedb.OperationalError("refused"))
                    with tx.savepoint():
                        tx.execute("insert into t values (2)")
                        fake_server.fail_next("execute", fakedb.OperationalError("refused"))
        assert isinstance(info.value.__cause__, fakedb.OperationalError)
        assert fake_server.count("commit") == 0
        assert fake_server.count("rollback") == 1
        s = pool.stats()
        assert (s.in_use, s.idle, s.discarded) == (0, 1, 0), s


@pytest.mark.timeout(20)
@pytest.mark.parametrize("outer_end", ["release", "rollback"])
def test_a_savepoint_block_left_open_inside_another_stops_the_commit_unless_undone(
    fake_server: fakedb.Server, outer_end: str
) -> None:
    # The inner savepoint's block never ends (its __exit__ interrupted as it was entered, or a
    # generator holding it left suspended): what it was to undo may be there.  Rolling back to
    # the savepoint around it undoes it all, and the transaction commits; releasing that one
    # keeps it, and the transaction must not commit.
    class AppError(Exception):
        pass

    def run(tx: Any) -> None:
        with tx:
            tx.execute("insert into t values (1)")
            try:
                with tx.savepoint():
                    tx.savepoint().__enter__()  # left open
                    tx.execute("insert into t values (2)")
                    if outer_end == "rollback":
                        raise AppError
            except AppError:
                pass

    with fake_pool(fake_server.connect) as pool:
        with pool.connection() as conn:
            if outer_end == "release":
                with pytest.raises(dbpool.TransactionRolledBack, match="did not end"):
                    run(conn.transaction())
                assert (fake_server.count("commit"), fake_server.count("rollback")) == (0, 1)
            else:
                run(conn.transaction())
                assert (fake_server.count("commit"), fake_server.count("rollback")) == (1, 0)
            conn.cursor().execute("insert into t values (3)")
            conn.commit()  # the lease goes on
        s = pool.stats()
        assert (s.in_use, s.idle, s.discarded) == (0, 1, 0), s


# == 8. the end of a block, and the Transaction object ==========================================


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["in the block", "in a savepoint", "before a savepoint"])
def test_a_block_that_caught_an_interrupted_call_commits_nothing_and_says_so(
    fake_server: fakedb.Server, where: str
) -> None:
    # The caller catches the KeyboardInterrupt of a statement and the block ends normally.  The
    # block then neither committed nor raised; and a savepoint around the statement, or one
    # begun after it, cleared the record of the interrupted call, and the block committed.
    def interrupted(tx: Any) -> None:
        fake_server.fail_next("execute", KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            tx.execute("insert into t values (2)")

    with fake_pool(fake_server.connect) as pool:
        with pytest.raises(dbpool.ConnectionUnusable):
            with pool.transaction() as tx:
                tx.execute("insert into t values (1)")
                if where == "in a savepoint":
                    with tx.savepoint():
                        interrupted(tx)
                else:
                    interrupted(tx)
                    if where == "before a savepoint":
                        with tx.savepoint():
                            tx.execute("insert into t values (3)")
        assert fake_server.count("commit") == 0
        s = pool.stats()
        assert (s.in_use, s.discarded) == (0, 1), s


@pytest.mark.timeout(20)
def test_a_commit_that_failed_leaves_nothing_open(fake_server: fakedb.Server) -> None:
    # A definite COMMIT failure (not a lost connection) that leaves the transaction open, as
    # SQLite's SQLITE_BUSY does.  The block used to end without a rollback: on a held lease its
    # work stayed pending, and the lease's next commit() committed it.
    with fake_pool(fake_server.connect) as pool:
        with pool.connection() as conn:
            raw = fake_server.connections[0]  # not conn.raw: handing it out costs a rollback
            conn.rollback()
            fake_server.fail_next("commit", fakedb.OperationalError("database is locked"))
            with pytest.raises(fakedb.OperationalError, match="locked"):
                with conn.transaction() as tx:
                    tx.execute("insert into t values (1)")
            assert not fake_server.in_transaction(raw), "the block's work is still pending"
            assert fake_server.count("rollback", failed=False) == 2
            conn.cursor().execute("insert into t values (2)")  # later work of the lease
            conn.commit()
        fake_server.fail_next("commit", fakedb.OperationalError("database is locked"))
        with pytest.raises(fakedb.OperationalError, match="locked"):
            with pool.transaction() as tx:
                tx.execute("insert into t values (3)")
        assert fake_server.count("rollback", failed=False) == 3
        s = pool.stats()
        assert (s.in_use, s.idle, s.discarded) == (0, 1, 0), s


def test_sqlite_commit_refused_as_busy_leaves_nothing_pending(tmp_path: Any) -> None:
    # COMMIT needs the exclusive lock; a reader holding a shared one makes it fail with
    # SQLITE_BUSY once the busy timeout is over, and SQLite keeps the transaction open.
    path = str(tmp_path / "busy.sqlite3")
    setup = sqlite3.connect(path)
    setup.execute("create table t (id int)")
    setup.commit()
    setup.close()
    reader = sqlite3.connect(path, isolation_level=None)
    try:

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(path, timeout=0.05, check_same_thread=False)

        with fake_pool(connect) as pool:
            with pool.connection() as conn:
                reader.execute("begin")
                reader.execute("select * from t").fetchall()  # a shared lock, until rollback
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    with conn.transaction() as tx:
                        tx.execute("insert into t values (1)")
                assert not conn.raw.in_transaction, "the block's insert is still pending"
                reader.rollback()
                conn.cursor().execute("insert into t values (2)")  # later work of the lease
                conn.commit()
            assert pool.stats().discarded == 0
        assert reader.execute("select id from t").fetchall() == [(2,)]
    finally:
        reader.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("interrupt", [SystemExit, KeyboardInterrupt])
def test_an_interrupt_leaving_a_block_past_its_deadline_is_not_turned_into_a_timeout(
    fake_server: fakedb.Server, interrupt: type[BaseException]
) -> None:
    # SystemExit (from a SIGTERM handler) or KeyboardInterrupt raised inside the block, not in
    # a driver call, after the deadline: TransactionTimeout, an Exception, used to replace it,
    # and "except Exception" then swallowed the request to stop.
    with fake_pool(fake_server.connect) as pool:
        with pytest.raises(interrupt):
            with pool.transaction(timeout=0.2) as tx:
                tx.execute("insert into t values (1)")
                sleep_past(tx.deadline)
                raise interrupt()
        assert fake_server.count("commit") == 0
        assert fake_server.count("rollback") == 1
        s = pool.stats()
        assert (s.in_use, s.idle, s.discarded) == (0, 1, 0), s


@pytest.mark.timeout(20)
def test_a_transaction_object_runs_one_block(fake_server: fakedb.Server) -> None:
    # A second `with` on the same object used to start a new transaction carrying the first
    # one's state: expired past its old deadline, it timed out at its first statement.
    with fake_pool(fake_server.connect) as pool:
        done = pool.transaction()
        with done as tx:
            tx.execute("insert into t values (1)")
        expired = pool.transaction(timeout=0.2)
        with pytest.raises(TransactionTimeout):
            with expired as tx:
                sleep_past(tx.deadline)
                tx.execute("select 1")
        for used in (done, expired):
            with pytest.raises(PoolError, match="already ran its block"):
                with used:
                    pytest.fail("a transaction object ran a second block")
        with pool.connection() as conn:
            failed = conn.transaction()
            with pytest.raises(Boom):
                with failed:
                    raise Boom
            with pytest.raises(PoolError, match="already ran its block"):
                with failed:
                    pytest.fail("a transaction object ran a second block")
            with conn.transaction() as tx:  # a new object: fine
                tx.execute("insert into t values (2)")
        assert fake_server.count("commit") == 2
        s = pool.stats()
        assert (s.in_use, s.idle, s.discarded) == (0, 1, 0), s


def test_an_entry_unwatched_as_it_fires_is_not_counted_dead_in_the_heap() -> None:
    # Taken out of the heap to fire, then unwatched (a transaction ending as its deadline
    # came): counted as a dead entry still in the heap, the count drifted up, and the heap was
    # rebuilt for nothing, sooner and sooner.
    wd = Watchdog()
    firing, go_on = threading.Event(), threading.Event()

    def callback() -> None:
        firing.set()
        go_on.wait(JOIN)

    entry = wd.watch(monotonic(), callback)
    assert firing.wait(JOIN)
    wd.unwatch(entry)
    go_on.set()
    assert wd._dead == 0  # private: the count of unwatched entries left in the heap
    queued = wd.watch(monotonic() + 3600, lambda: None)
    wd.unwatch(queued)
    assert wd._dead == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_survives_a_thread_that_cannot_start(monkeypatch: Any) -> None:
    # One "can't start new thread" for a deadline's worker ended the watchdog thread, and
    # watch() never started another (it was still recorded): no deadline fired again.
    wd = Watchdog()
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "dbpool-watchdog-cancel" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    first, second = threading.Event(), threading.Event()
    wd.watch(monotonic(), first.set)
    assert first.wait(JOIN), "the deadline whose worker could not start never fired"
    assert refused, "the test did not refuse a thread"
    wd.watch(monotonic(), second.set)
    assert second.wait(JOIN), "a later deadline never fired"


def test_a_watch_whose_thread_cannot_start_leaves_nothing_queued(monkeypatch: Any) -> None:
    # The entry went in before the thread was started: a transaction whose BEGIN failed so
    # could not unwatch it, and once a later watch() started the thread it fired, cancelling
    # whatever the lease ran next.
    wd = Watchdog()
    real_start = threading.Thread.start
    refused: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "dbpool-watchdog" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    stray = threading.Event()
    with pytest.raises(RuntimeError, match="can't start new thread"):
        wd.watch(monotonic(), stray.set)
    fired = threading.Event()
    wd.watch(monotonic(), fired.set)  # starts the thread
    assert fired.wait(JOIN)
    assert not stray.is_set(), "the watch that raised still fired"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_watchdog_thread_is_replaced_if_it_dies(monkeypatch: Any) -> None:
    # Whatever ends the watchdog thread, the deadlines already registered and those to come
    # must still fire.
    wd = Watchdog()

    class Fatal(BaseException):
        pass

    real_start = threading.Thread.start
    refused: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "dbpool-watchdog-cancel" and not refused:
            refused.append(thread.name)
            raise Fatal  # not an Exception: it ends the watchdog thread
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    first, pending, later = threading.Event(), threading.Event(), threading.Event()
    wd.watch(monotonic(), first.set)  # its worker cannot start, which ends the thread
    wd.watch(monotonic() + 0.05, pending.set)
    assert pending.wait(JOIN), "a deadline registered before the thread died never fired"
    assert first.wait(JOIN), "the deadline being handed out as the thread died never fired"
    assert refused
    wd.watch(monotonic(), later.set)
    assert later.wait(JOIN), "a deadline registered after the thread died never fired"
