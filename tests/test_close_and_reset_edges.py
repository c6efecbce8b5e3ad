"""Where several features meet: psycopg's prepared statements across session resets after
leases that committed, a lost connection at START TRANSACTION with an isolation level,
close() past its timeout with a borrower inside a call (sqlite3, pymssql) or inside a
transaction block, and a lease given back by one thread while another is inside a call on it."""

from __future__ import annotations

import logging
import socket
import sqlite3
import sys
import threading
from typing import Any

import pytest

import dbpool
from dbpool.dialects.pymssql import PymssqlDialect
from tests import fakedb
from tests.conftest import Caller, Connector, in_child, wait_until

pytestmark = pytest.mark.timeout(30)


def test_psycopg_prepared_statements_keep_working_across_resets_after_commits(
    pg_connect: Any,
) -> None:
    # psycopg forgets its prepared statements when it sees DISCARD ALL only the first time it
    # meets that statement with some prepared: one run while none were (the first lease) is
    # counted, and the next ones go by unnoticed.  Leases that commit leave no rollback (which
    # would also clear psycopg's cache) for the return path to run.
    with dbpool.Pool(pg_connect, min_size=0, max_size=1, session_reset="discard") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 1")
            conn.commit()
        for n in range(3):
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute("SELECT %s::int + 1", (n,), prepare=True)
                assert cur.fetchone() == (n + 1,)
                conn.commit()


def test_a_connection_lost_at_start_transaction_is_the_error_the_block_raises(
    mysql_params: dict[str, Any],
) -> None:
    # With an isolation level, BEGIN is two statements; when the second fails, the one-time
    # level is dropped with a rollback, which on a lost connection fails too (PyMySQL's
    # InterfaceError(0, '')): that must not hide the error that says the connection is gone.
    import pymysql

    class CutAtStart(pymysql.connections.Connection):
        def query(self, sql: Any, unbuffered: bool = False) -> Any:
            if str(sql).startswith("START TRANSACTION"):
                self._sock.shutdown(socket.SHUT_RDWR)  # the network goes as it is sent
            return super().query(sql, unbuffered)

    connector = Connector(lambda: CutAtStart(**mysql_params))
    try:
        with dbpool.Pool(connector, min_size=0, max_size=1, dialect="pymysql") as pool:
            with pytest.raises(pymysql.err.OperationalError) as raised:
                with pool.transaction(isolation="SERIALIZABLE"):
                    pass
            assert raised.value.args[0] in (2006, 2013)  # gone away, lost
            assert pool.stats().discards["broken"] + pool.stats().discards["reset_failed"] == 1
    finally:
        connector.close_all()


@pytest.mark.parametrize("then", ["ends", "runs a statement"])
def test_a_transaction_block_whose_connection_close_took_ends_in_lease_released(
    fake_server: fakedb.Server, then: str
) -> None:
    # close() past its timeout closes a lease's connection under its borrower, and the lease
    # refuses use with LeaseReleased: the end of a transaction block on it says the same (not
    # that the borrower returned the connection inside the block, which it did not).
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    try:
        with pytest.raises(dbpool.LeaseReleased) as raised:
            with pool.transaction() as tx:
                tx.execute("insert into t values (1)")
                pool.close(timeout=0)  # the connection is closed under the block
                if then == "runs a statement":
                    tx.execute("insert into t values (2)")
        assert "went back to the pool inside" not in str(raised.value)
        assert fake_server.count("commit") == 0
        assert pool.stats().in_use == 0
    finally:
        pool.close(timeout=0)


def test_close_past_its_timeout_leaves_a_sqlite_connection_in_a_call_to_its_borrower(
    tmp_path: Any,
) -> None:
    # sqlite3 must not be closed while another thread is inside a call on the connection: the
    # call then fails with MemoryError or "bad parameter or other API misuse", or the
    # interpreter crashes.  close() past its timeout interrupts such a connection, and leaves
    # the close to its borrower's return.
    closed_by: list[threading.Thread] = []
    inside, leave = threading.Event(), threading.Event()

    class Recording(sqlite3.Connection):
        def close(self) -> None:
            closed_by.append(threading.current_thread())
            if threading.current_thread() is borrower:  # (not under the call: no crash here)
                super().close()

    def wait_here() -> int:
        inside.set()
        leave.wait(10)
        return 1

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(tmp_path / "db.sqlite3"), factory=Recording, check_same_thread=False
        )
        conn.create_function("wait_here", 0, wait_here)
        return conn

    failures: list[BaseException] = []

    def borrow() -> None:
        try:
            with pool.connection() as conn:
                conn.cursor().execute("SELECT wait_here()")
        except BaseException as exc:
            failures.append(exc)

    pool = dbpool.Pool(connect, min_size=0, max_size=1, dialect="sqlite3")
    borrower = threading.Thread(target=borrow)
    borrower.start()
    try:
        assert inside.wait(10)
        pool.close(timeout=0)
        assert closed_by == []  # cut off (interrupted), not closed under the call
    finally:
        leave.set()
        borrower.join(10)
    assert closed_by == [borrower]  # closed once, by its borrower on the way back
    assert not [exc for exc in failures if not isinstance(exc, sqlite3.Error)]
    assert pool.stats().size == pool.stats().in_use == 0


def test_close_past_its_timeout_leaves_a_pymssql_connection_in_a_call_to_its_borrower(
    fake_server: fakedb.Server,
) -> None:
    # pymssql's close() runs FreeTDS's dbclose(), which frees the DBPROCESS that a call in
    # another thread is still using (that call waits with the GIL released): close() past its
    # timeout leaves such a connection open, and its borrower's return closes it.
    failures: list[BaseException] = []

    def borrow() -> None:
        try:
            with pool.connection() as conn:
                conn.cursor().execute("SELECT slow()")
        except BaseException as exc:
            failures.append(exc)

    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1)
    gate = fake_server.block("execute")
    borrower = threading.Thread(target=borrow)
    borrower.start()
    try:
        assert gate.entered.wait(10)
        [raw] = fake_server.connections
        pool.close(timeout=0)
        assert fake_server.closed_under_a_call == []
        assert not raw.closed
    finally:
        gate.release()
        borrower.join(10)
    assert raw.closed  # by its borrower, on the way back
    assert fake_server.closed_under_a_call == []
    assert not [exc for exc in failures if not isinstance(exc, dbpool.PoolError)]
    assert pool.stats().size == pool.stats().in_use == 0


# -- a lease given back by one thread while another is inside a call on it ---------------------


class WatchedPymssql(PymssqlDialect):
    """pymssql's dialect, telling when the pool cuts a connection off (FreeTDS has no socket
    to shut down: nothing else happens)."""

    def __init__(self) -> None:
        self.severed = threading.Event()

    def sever(self, conn: Any) -> None:
        self.severed.set()


@pytest.mark.parametrize("ending", ["close", "release", "discard", "pool closed first"])
def test_a_lease_ended_by_another_thread_during_a_pymssql_call_is_closed_once_the_call_ends(
    fake_server: fakedb.Server, ending: str
) -> None:
    # One thread runs a statement on a lease that another thread gives back (or discards): the
    # pool must not close the connection under the call (pymssql frees what the call still
    # uses), but once the call is over, and then the call's thread gets LeaseReleased.
    dialect = WatchedPymssql()
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, dialect=dialect)
    try:
        conn = pool.connection()
        cur = conn.cursor()
        gate = fake_server.block("execute")
        runner = Caller(lambda: (cur.execute("SELECT 2"), cur.fetchall()), name="runner")
        assert gate.entered.wait(10)
        [raw] = fake_server.connections
        if ending == "pool closed first":
            pool.close(timeout=0)  # leaves it open for whoever gives it back
        ends = {"discard": pool.discard, "release": pool.release}
        end = ends.get(ending, dbpool.Connection.close)
        ender = Caller(lambda: end(conn), name="ender")
        wait_until(lambda: dialect.severed.is_set() or ender.done.is_set())
        assert fake_server.closed_under_a_call == []
        assert not raw.closed
        gate.release()
        assert ender.outcome() is None
        assert isinstance(runner.outcome(), dbpool.LeaseReleased), runner.error
        assert raw.closed
        assert fake_server.closed_under_a_call == []
        s = pool.stats()
        assert (s.size, s.in_use, s.idle) == (0, 0, 0), s
    finally:
        fake_server.release_all()
        pool.close()


def test_a_lease_given_back_by_another_thread_during_a_sqlite_call_does_not_crash(
    tmp_path: Any,
) -> None:
    # sqlite3 closed while another thread is inside a call on the connection crashes the
    # interpreter (SIGSEGV): run where a crash fails the test instead of ending the run.
    path = str(tmp_path / "db.sqlite3")

    def body() -> list[str]:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, check_same_thread=False)
            conn.create_function("hold", 0, hold)
            return conn

        def hold() -> int:  # inside the statement until the lease went back
            inside.set()
            wait_until(lambda: pool.stats().in_use == 0)
            return 1

        inside = threading.Event()
        with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
            conn = pool.connection()
            cur = conn.cursor()
            runner = Caller(lambda: (cur.execute("SELECT hold()"), cur.fetchall()))
            assert inside.wait(10)
            conn.close()  # another thread's, while the runner is inside the statement
            outcome = runner.outcome()
            s = pool.stats()
            assert (s.size, s.in_use, s.closed) == (0, 0, 1), s
        return [type(outcome).__name__]

    assert in_child(body) == {"result": ["LeaseReleased"]}


def assert_closed_at_once(server: fakedb.Server, dialect: Any, pool: dbpool.Pool[Any]) -> None:
    """The pool's one connection was discarded and closed as its lease came back: not cut off
    (``dialect.severed``) as if a call still ran on it, then left open."""
    [raw] = server.connections
    assert raw.closed
    assert not dialect.severed.is_set()
    s = pool.stats()
    assert (s.size, s.in_use, s.discards["reset_failed"]) == (0, 0, 1), s


@pytest.mark.parametrize("where", ["execute", "commit", "execute in a block"])
def test_a_pymssql_connection_whose_call_was_interrupted_is_closed_at_once(
    fake_server: fakedb.Server, where: str
) -> None:
    # A call left by KeyboardInterrupt: nobody is inside it any more, so its connection is
    # closed as the lease comes back, with no wait for a call to end.
    dialect = WatchedPymssql()
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, dialect=dialect)
    try:
        fake_server.fail_next(where.split()[0], KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                if where == "execute in a block":
                    with conn.transaction() as tx:
                        tx.execute("SELECT 2")
                else:
                    conn.cursor().execute("SELECT 2")
                    conn.commit()
        assert_closed_at_once(fake_server, dialect, pool)
    finally:
        pool.close()


class _BlockedCallFromAnotherThread:
    """A call on a lease from another thread that waits until released: the driver's cancel()
    (blocked in the fake server), or the close of another cursor of the lease (a close that
    waits for the server)."""

    def __init__(
        self,
        fake_server: fakedb.Server,
        monkeypatch: pytest.MonkeyPatch,
        conn: dbpool.Connection[Any],
        call: str,
    ) -> None:
        self._may_close = threading.Event()
        self._monkeypatch = monkeypatch
        if call == "cancel":
            self._cancel: Any = fake_server.block("cancel")
            self.caller = Caller(conn.cancel, name="canceller")
            assert self._cancel.entered.wait(10)
        else:
            self._cancel = None
            closing = threading.Event()

            def close(cursor: fakedb.FakeCursor) -> None:
                closing.set()
                assert self._may_close.wait(10)

            other = conn.cursor()
            monkeypatch.setattr(fakedb.FakeCursor, "close", close)
            self.caller = Caller(other.close, name="closer")
            assert closing.wait(10)

    def finish(self) -> None:
        """Let the call return, and check it returned normally."""
        if self._cancel is not None:
            self._cancel.release()
        self._may_close.set()
        assert self.caller.outcome() is None
        self._monkeypatch.undo()

    def release(self) -> None:  # for a test's finally
        self._may_close.set()


@pytest.mark.parametrize("call", ["cancel", "a cursor's close"])
def test_a_call_from_another_thread_that_ends_after_the_statement_leaves_no_call_behind(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    # Another thread cancels the statement a lease runs (the driver's cancel() is made for
    # that), or closes another cursor of the lease, and the statement ends before that call
    # returns, as it does once the server cancelled it.  That call put back the mark of a call
    # running that it found as it began: the lease went back as if a call still ran on it,
    # and the pool discarded the connection (with sqlite3 or pymssql, its close first waited
    # 10 s for that call).
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    other: _BlockedCallFromAnotherThread | None = None
    try:
        conn = pool.connection()
        cur = conn.cursor()
        statement = fake_server.block("execute")
        runner = Caller(lambda: cur.execute("SELECT 2"), name="runner")
        assert statement.entered.wait(10)
        other = _BlockedCallFromAnotherThread(fake_server, monkeypatch, conn, call)
        statement.release()
        assert runner.outcome() is None
        other.finish()
        conn.close()
        s = pool.stats()
        assert (s.idle, s.in_use, s.discarded) == (1, 0, 0), s
    finally:
        fake_server.release_all()
        if other is not None:
            other.release()
        pool.close()


@pytest.mark.parametrize("call", ["cancel", "a cursor's close"])
def test_a_call_from_another_thread_that_a_statement_outlasts_leaves_that_statement_marked(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    # Another thread cancels (or closes another cursor) while nothing runs, and the lease's
    # statement starts before that call returns.  That call put back the "no call" it found as
    # it began, under the statement: given back meanwhile, the connection went back to the
    # idle stack with the statement still running on it (for the next borrower), the
    # deadline's watchdog cancelled nothing, and the pool's close of a sqlite3 or pymssql
    # connection did not wait for the call.
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    other: _BlockedCallFromAnotherThread | None = None
    try:
        conn = pool.connection()
        cur = conn.cursor()
        other = _BlockedCallFromAnotherThread(fake_server, monkeypatch, conn, call)
        statement = fake_server.block("execute")
        runner = Caller(lambda: cur.execute("SELECT 2"), name="runner")
        assert statement.entered.wait(10)
        other.finish()
        conn.close()  # given back while the runner is inside its statement
        s = pool.stats()
        assert (s.idle, s.in_use, s.discarded) == (0, 0, 1), s
        statement.release()
        runner.outcome()
    finally:
        fake_server.release_all()
        if other is not None:
            other.release()
        pool.close()


def test_a_block_whose_connection_a_call_from_another_thread_left_unusable_commits_nothing(
    fake_server: fakedb.Server,
) -> None:
    # The block's statement runs in one thread while a cancel() of the lease's, from another
    # thread, is interrupted half-way: the connection's state is unknown from then on, and the
    # lease refuses further use, though no call of the block's own was interrupted (it ends
    # normally, and leaves no call marked).  The block's end sent COMMIT all the same.
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    try:
        conn = pool.connection()

        def block() -> None:
            with conn.transaction() as tx:
                tx.execute("INSERT INTO t VALUES (1)")

        statement = fake_server.block("execute")
        runner = Caller(block, name="runner")
        assert statement.entered.wait(10)
        fake_server.fail_next("cancel", KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            conn.cancel()
        statement.release()
        assert isinstance(runner.outcome(), dbpool.ConnectionUnusable)
        assert fake_server.count("commit") == 0
        conn.close()
        s = pool.stats()
        assert (s.idle, s.in_use, s.discarded) == (0, 0, 1), s
    finally:
        fake_server.release_all()
        pool.close()


def _interrupting_at_entry(function: Any) -> Any:
    """A trace raising KeyboardInterrupt once, as ``function`` is entered: where CPython runs
    a signal handler for a signal that came during a C call that then failed."""
    code = function.__code__
    raised: list[bool] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code is code and not raised:
            raised.append(True)
            raise KeyboardInterrupt
        return None

    return tracer


@pytest.mark.parametrize("where", ["execute", "begin", "rollback", "rollback to savepoint"])
def test_an_interrupt_as_a_failed_call_is_handled_leaves_no_call_to_wait_for(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # Ctrl-C during a driver call that then fails (SQLite's lock wait, which ends with
    # "database is locked"): CPython runs the handler at the entry of the first Python
    # function the error path calls, before that path said the call was over.  The
    # connection went back marked as still inside a call: sqlite3's and pymssql's close
    # waited 10 s for a call that nobody ran, then left the connection open.
    monkeypatch.setattr(dbpool.pool, "_CALL_END_WAIT", 0.2)  # for the code before the fix
    dialect = WatchedPymssql()
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, dialect=dialect)
    verb, entered = {
        "execute": ("execute", dbpool.lease._call_failed),
        "begin": ("execute", dbpool.Transaction._stop_watching),
        "rollback": ("rollback", logging.Logger.info),
        "rollback to savepoint": ("execute", logging.Logger.info),
    }[where]
    try:
        with pool.connection() as conn:
            sys.settrace(_interrupting_at_entry(entered))
            try:
                with pytest.raises(KeyboardInterrupt):
                    if where == "execute":
                        fake_server.fail_next(verb, fakedb.OperationalError("locked"))
                        conn.cursor().execute("UPDATE t SET x = 1")
                    elif where == "begin":
                        fake_server.fail_next(verb, fakedb.OperationalError("locked"))
                        with conn.transaction(isolation="serializable"):
                            pass
                    else:
                        with conn.transaction() as tx:
                            if where == "rollback":
                                fake_server.fail_next(verb, fakedb.OperationalError("lost"))
                                raise ValueError("the block's own error")
                            with tx.savepoint():
                                fake_server.fail_next(verb, fakedb.OperationalError("lost"))
                                raise ValueError("the block's own error")
            finally:
                sys.settrace(None)
        [raw] = fake_server.connections
        assert not dialect.severed.is_set()
        assert raw.closed
        s = pool.stats()
        assert (s.size, s.in_use, s.discarded) == (0, 0, 1), s
    finally:
        pool.close()


class InterruptedWhileHandlingFailure(WatchedPymssql):
    """pymssql's dialect, with a KeyboardInterrupt raised (as a signal handler raises it) while
    the pool handles the error of a failed call."""

    def call_failed(self, conn: Any) -> None:
        raise KeyboardInterrupt

    def begin_on_server(self, conn: Any) -> None:
        raise fakedb.OperationalError("BEGIN failed")


class InterruptWhenLogged(logging.Handler):
    """Raises KeyboardInterrupt (as a signal handler would, there) when the pool logs a record
    whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["execute", "commit", "execute in a block", "raw in a block"])
def test_a_connection_interrupted_while_its_failed_call_is_handled_is_closed_at_once(
    fake_server: fakedb.Server, where: str
) -> None:
    # The call is over (it raised), and the interrupt came after it: nobody is inside a call,
    # so the connection is closed as the lease comes back, not waited for as if one were, then
    # left open; and the lease refuses further use, as after an interrupted call.
    dialect = InterruptedWhileHandlingFailure()
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, dialect=dialect)
    try:
        if where != "raw in a block":
            fake_server.fail_next(where.split()[0], fakedb.OperationalError)
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                if where == "execute in a block":
                    with conn.transaction() as tx:
                        tx.execute("SELECT 2")
                if where == "raw in a block":
                    with conn.transaction() as tx:
                        assert tx.connection.raw is not None  # hands out the driver's connection
                try:
                    conn.cursor().execute("SELECT 2")
                    conn.commit()
                except KeyboardInterrupt:
                    with pytest.raises(dbpool.ConnectionUnusable):
                        conn.cursor().execute("SELECT 3")
                    raise
        assert_closed_at_once(fake_server, dialect, pool)
    finally:
        pool.close()


@pytest.mark.parametrize("where", ["rollback", "rollback to a savepoint"])
def test_a_connection_interrupted_while_a_failed_rollback_is_logged_is_closed_at_once(
    fake_server: fakedb.Server, where: str
) -> None:
    # The failed rollback is over, and the interrupt came as the pool logged it: nobody is
    # inside a call, and the connection is not waited for as if one were, then left open: it
    # is closed at once, as after any interrupted call.
    dialect = WatchedPymssql()
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, dialect=dialect)
    prefix = f"pool 'test': {'ending a transaction' if where == 'rollback' else 'rolling back'}"
    handler = InterruptWhenLogged(prefix.replace("'test'", repr(pool.name)))
    logger = logging.getLogger("dbpool")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                with conn.transaction() as tx:
                    tx.execute("SELECT 2")
                    if where == "rollback":
                        fake_server.fail_next("rollback", fakedb.OperationalError)
                        raise ValueError("the block fails")
                    with tx.savepoint():
                        fake_server.fail_next("execute", fakedb.OperationalError)
                        raise ValueError("the savepoint's block fails")
        assert_closed_at_once(fake_server, dialect, pool)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        pool.close()


@pytest.mark.parametrize("where", ["next(cursor)", "cursor.close()", "a driver method"])
def test_an_interrupt_as_a_failed_fetch_close_or_driver_method_is_handled_dooms_the_lease(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # As for execute() and commit(): the call is over (it raised), the interrupt came as its
    # error was handled, and the lease refuses further use; the connection is closed at once.
    dialect = InterruptedWhileHandlingFailure()
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, dialect=dialect)
    try:
        with pytest.raises(KeyboardInterrupt):
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute("SELECT 2")
                try:
                    if where == "next(cursor)":
                        cur._raw.close()  # the driver's cursor: its next fetch raises
                        next(cur)
                    elif where == "cursor.close()":

                        def failing_close() -> None:
                            raise fakedb.OperationalError("fakedb: close failed")

                        monkeypatch.setattr(cur._raw, "close", failing_close)
                        cur.close()
                    else:
                        fake_server.fail_next("autocommit", fakedb.OperationalError)
                        conn.autocommit(True)
                except KeyboardInterrupt:
                    with pytest.raises(dbpool.ConnectionUnusable):
                        conn.cursor()
                    raise
        assert_closed_at_once(fake_server, dialect, pool)
    finally:
        pool.close()
