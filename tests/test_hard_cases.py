"""The pool's hardest cases: exceptions at exact points, races on one lease, close racing with
returns, durations at the limits of the threading primitives, and the known gaps left to a
session reset policy and to bounded validation (marked as expected failures).

Interleavings are forced with fakedb gates, Events, a held pool lock
or a line trace, never with sleeps.  A few tests reach into private attributes (the pool's lock,
the line a thread is blocked on): that is the only way to hold a thread at an exact point of the
pool's code, and each place is commented.

Signals: CPython delivers a signal to the main thread, and a handler that raises interrupts a
blocking ``Lock.acquire()`` (``with lock:``) with that exception.  The BaseException tests
reproduce exactly that: the main thread blocks on the pool's lock at a chosen point, a helper
sends SIGUSR1, and the handler raises KeyboardInterrupt there.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import linecache
import logging
import math
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects import Dialect
from tests import fakedb
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(60)


# -- helpers -------------------------------------------------------------------------------------


def accounting_holds(pool: dbpool.Pool[Any]) -> bool:
    s = pool.stats()
    return s.size == s.idle + s.in_use + s.opening and 0 <= s.size <= s.max_size and s.in_use >= 0


def start(target: Callable[..., Any], *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


class Outcome:
    """What a thread's call returned or raised."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self, call: Callable[[], Any]) -> None:
        try:
            self.value = call()
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.done.set()


def need_main_thread() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")


@contextlib.contextmanager
def keyboard_interrupt_on_sigusr1() -> Iterator[Callable[[], None]]:
    """While active, SIGUSR1 raises KeyboardInterrupt in the main thread; yields a sender."""
    need_main_thread()

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGUSR1 (test)")

    main = threading.main_thread().ident
    assert main is not None
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        yield lambda: signal.pthread_kill(main, signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def main_thread_at_pool_lock(functions: set[str]) -> tuple[str, int] | None:
    """Where the main thread stands, if on a line taking the pool lock in one of
    ``functions`` of dbpool (frames of this test module, such as a lock proxy, are skipped)."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    if frame is None or frame.f_code.co_name not in functions:
        return None
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    if line not in ("with self._lock:", "self._lock.acquire()"):
        return None
    return frame.f_code.co_filename, frame.f_lineno


def interrupt_main_at_pool_lock(send: Callable[[], None], functions: set[str]) -> None:
    """Helper-thread side: wait until the main thread is held on the pool lock in one of
    ``functions``, interrupt it there, and wait until it has left that line (its recovery may
    take the lock again elsewhere)."""
    seen: list[tuple[str, int] | None] = []

    def parked() -> tuple[str, int] | None:
        # Three polls in a row on that line: blocked in the acquire, not about to call it (a
        # signal handled before the call could run in a finaliser, which swallows exceptions).
        seen.append(main_thread_at_pool_lock(functions))
        last = seen[-3:]
        return last[0] if len(last) == 3 and last[0] and last.count(last[0]) == 3 else None

    spot = wait_until(
        parked, timeout=10, message=f"main thread never blocked on the pool lock in {functions}"
    )
    send()
    wait_until(lambda: main_thread_at_pool_lock(functions) != spot, timeout=10)


# == A dropped lease with a cursor comes back ==================================================


def test_dropped_lease_with_a_cursor_is_collected_and_returned(make_pool: Any) -> None:
    # The slot must not keep the lease alive (pool -> slot -> cursor wrapper -> lease), or the
    # lease's finalizer never runs and its connection never comes back.
    pool = make_pool(max_size=1)
    conn = pool.connect()
    conn.cursor().execute("select 1")
    lease_ref = weakref.ref(conn)
    with pytest.warns(ResourceWarning, match="without being released"):
        del conn
        gc.collect()
    assert lease_ref() is None, "the unreleased lease is still strongly reachable from the pool"
    with pool.connection(timeout=0.5):  # the orphan came back
        pass
    assert accounting_holds(pool)


# == BaseException while blocked on the pool lock ==============================================


def test_interrupt_while_returning_keeps_accounting(make_pool: Any) -> None:
    # Pool._give_back, once it cleaned (_put_back's common case, written out there): the lock
    # acquire blocks (contended) and a signal handler raises there: the lease is already marked
    # released, in_use is never decremented.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    lock = pool._lock  # private: the only way to make that acquire block at a known point
    held = threading.Event()
    errors: list[BaseException] = []

    with keyboard_interrupt_on_sigusr1() as send:

        def helper() -> None:
            lock.acquire()
            held.set()
            try:
                interrupt_main_at_pool_lock(send, {"_give_back"})
            except BaseException as exc:
                errors.append(exc)
            finally:
                lock.release()

        t = start(helper)
        assert held.wait(5)
        with pytest.raises(KeyboardInterrupt):
            lease.close()
        t.join(10)
    assert errors == []
    assert lease.released
    s = pool.stats()
    assert s.in_use == 0, f"slot lost: {s}"
    with pool.connection(timeout=0.5):
        pass


def test_interrupt_while_connecting_leaves_the_connection_to_the_pool(
    make_pool: Any, server: fakedb.Server
) -> None:
    # The connect runs in a thread of its own while the caller waits for it.  A caller
    # interrupted meanwhile must give up its claim: the reservation is neither lost nor
    # leaked, and the connection, once made, is the pool's to hand out and to close.
    pool = make_pool(max_size=1)
    gate = server.block("connect")
    errors: list[BaseException] = []

    def main_waits_for_connect() -> bool:
        frame = sys._current_frames().get(threading.main_thread().ident or -1)
        while frame is not None:
            if frame.f_code.co_name == "_connect_for_caller":
                return "wakeup.acquire" in linecache.getline(
                    frame.f_code.co_filename, frame.f_lineno
                )
            frame = frame.f_back
        return False

    with keyboard_interrupt_on_sigusr1() as send:

        def helper() -> None:
            try:
                assert gate.entered.wait(5)
                wait_until(main_waits_for_connect, timeout=10)
                send()
            except BaseException as exc:
                errors.append(exc)

        t = start(helper)
        with pytest.raises(KeyboardInterrupt):
            pool.connection(timeout=5)
        t.join(10)
    assert errors == []
    gate.release()
    wait_until(lambda: pool.stats().opening == 0)
    s = pool.stats()
    assert (s.size, s.idle, s.in_use) == (1, 1, 0), f"reservation lost or leaked: {s}"
    with pool.connection(timeout=0.5):
        pass
    pool.close(timeout=0.5)
    assert server.open_connections == [], "the connection made for the interrupted caller leaked"


def test_exception_after_connect_before_accounting_leaks_the_slot(
    make_pool: Any, server: fakedb.Server
) -> None:
    # The same unprotected section (pool.py lines 591-603, after the try of _new_connection)
    # with an ordinary Exception: a dialect's client_settings() raising once.
    class Flaky(Dialect):
        name = "flaky"
        calls = 0

        def client_settings(self, conn: Any) -> object:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("client_settings failed")
            return None

    pool = make_pool(max_size=1, dialect=Flaky())
    with pytest.raises(RuntimeError):
        pool.connection(timeout=1)
    s = pool.stats()
    assert (s.size, s.opening) == (0, 0), f"reserved slot lost: {s}"
    assert server.open_connections == [], "the connection whose setup failed was not closed"


@pytest.mark.parametrize("ending", ["discarded from the open pool", "returned after a drain"])
def test_interrupt_after_closing_a_connection_let_go_leaves_drain_nothing_to_wait_for(
    make_pool: Any, server: fakedb.Server, ending: str
) -> None:
    # The thread that closes a connection the pool let go then tells drain() and close() it is
    # closed.  A signal handler raising while it waits for the pool lock there must not leave the
    # close counted as under way: every later drain() would wait for it until its timeout.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    lease.cursor().execute("select 1")
    if ending == "discarded from the open pool":
        server.kill(lease.raw)
    else:
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
    gate = server.block("close", conn=lease.raw)
    lock = pool._lock  # private: the only way to make the main thread block at that point
    errors: list[BaseException] = []

    with keyboard_interrupt_on_sigusr1() as send:

        def helper() -> None:
            try:
                assert gate.entered.wait(5)
                with lock:  # taken while the driver's close() runs: then released
                    gate.release()
                    interrupt_main_at_pool_lock(send, {"_discard", "_put_back", "_wake_closers"})
            except BaseException as exc:
                errors.append(exc)

        t = start(helper)
        with pytest.raises(KeyboardInterrupt):
            lease.close()
        t.join(10)
    assert errors == []
    assert not server.open_connections
    if ending == "returned after a drain":
        pool.drain(timeout=1)  # PoolTimeout if a close is still counted as under way
        pool.reopen()
    pool.drain(timeout=1)
    pool.reopen()
    with pool.connection(timeout=1):
        pass


def test_drain_from_a_listener_of_the_close_does_not_wait_for_that_close(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    outcomes: list[BaseException | None] = []

    def drain_on_discard(event: dbpool.PoolEvent) -> None:
        try:
            pool.drain(timeout=2)
        except BaseException as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    pool.add_listener("discard", drain_on_discard)
    with pool.connection() as conn:
        conn.cursor().execute("select 1")
        server.kill(conn.raw)  # found broken as it comes back: discarded, the listener drains
    assert outcomes == [None]
    assert pool.closed and not server.open_connections


@pytest.mark.parametrize("returned_by", ["the borrower", "another thread"])
def test_drain_from_a_close_listener_of_a_lease_from_before_reopen_does_not_wait_for_it(
    make_pool: Any, server: fakedb.Server, returned_by: str
) -> None:
    # Closed as it comes back, like a discarded connection: the listener told of that close
    # may drain the pool without waiting for it.
    pool = make_pool(max_size=2)
    lease = pool.connect()
    raw = lease.raw
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    outcomes: list[BaseException | None] = []

    def drain_on_close(event: dbpool.PoolEvent) -> None:
        if event.connection is not raw:
            return
        try:
            pool.drain(timeout=2)
        except BaseException as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    pool.add_listener("close", drain_on_close)
    if returned_by == "the borrower":
        lease.close()
    else:
        t = threading.Thread(target=lease.close, daemon=True)
        t.start()
        t.join(10)
    assert outcomes == [None]
    assert pool.closed and not server.open_connections
    s = pool.stats()
    assert s.acquired == s.returned == 1, s


def test_drain_waits_for_another_threads_close_of_a_connection_it_leased(
    make_pool: Any, server: fakedb.Server
) -> None:
    # Leased by this thread, given back by another: this thread's drain() must wait for that
    # close, though the connection was last leased here.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    entered, go = threading.Event(), threading.Event()
    close_raw = pool._close_raw

    def held_close_raw(*args: Any) -> None:
        entered.set()
        assert go.wait(10)
        close_raw(*args)

    pool._close_raw = held_close_raw  # private: holds the returning thread before its close
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    returning = start(lease.close)
    try:
        assert entered.wait(5)
        with pytest.raises(dbpool.PoolTimeout, match="1 being closed"):
            pool.drain(timeout=0.3)
    finally:
        go.set()
        returning.join(10)
    pool.drain(timeout=5)
    assert not server.open_connections


def test_drain_waits_for_the_reapers_close_of_an_idle_connection(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(min_size=0, max_size=1, idle_timeout=0.1)
    with pool.connection() as conn:
        gate = server.block("close", conn=conn.raw)
    try:
        assert gate.entered.wait(10), "the reaper never closed the idle connection"
        with pytest.raises(dbpool.PoolTimeout, match="1 being closed"):
            pool.drain(timeout=1.5)  # longer than drain() waits for the reaper thread itself
    finally:
        gate.release()
    pool.drain(timeout=5)
    assert not server.open_connections


def test_connections_closed_by_the_pool_are_not_kept(make_pool: Any, server: fakedb.Server) -> None:
    # The record of closes under way must not grow with every discard of a pool never drained.
    pool = make_pool(max_size=1)
    for _ in range(3):
        with pool.connection() as conn:
            conn.cursor().execute("select 1")
            server.kill(conn.raw)
    assert pool.stats().discarded == 3
    assert not pool._closing and not pool._closed_off, "the pool keeps closed connections"


# == close(timeout) force-close racing with a return in progress ===============================


def test_forced_close_during_a_return_counts_the_connection_once(
    make_pool: Any, server: fakedb.Server
) -> None:
    # A borrower's return is rolling back (outside the lock) when close(timeout=0) force-closes
    # every connection in `everyone`: in_use -= 1, size -= 1.  The rollback then fails on the
    # closed connection and _discard() decrements in_use and size a second time.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    lease.cursor().execute("update t set v = 1")
    gate = server.block("rollback")
    returner = start(lease.close)
    assert gate.entered.wait(5)
    pool.close(timeout=0)
    gate.release()
    returner.join(10)
    s = pool.stats()
    assert (s.size, s.in_use, s.closed) == (0, 0, 1), f"counted twice: {s}"


# == Two concurrent close() of one lease return its connection once ============================


# close() and __exit__ (which has close()'s body written out) each way a lease ends.
ENDINGS = {
    "close": (dbpool.Connection.close, lambda lease: lease.close()),
    "__exit__": (dbpool.Connection.__exit__, lambda lease: lease.__exit__(None, None, None)),
}


class StalledEnd:
    """Ends ``lease`` the way ``ending`` names, in a thread of its own that stops before the
    first line containing ``marker`` of that method (or of ``within``, a function it calls)
    until :meth:`resume`."""

    def __init__(self, lease: Any, ending: str, marker: str, within: Any = None) -> None:
        method, end = ENDINGS[ending]
        if within is not None:
            method = within
        code = method.__code__
        lines, first = inspect.getsourcelines(method)
        target = next(first + i for i, text in enumerate(lines) if marker in text)
        self.paused, self._go = threading.Event(), threading.Event()

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == target and not self.paused.is_set():
                self.paused.set()
                self._go.wait(10)
            return local

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            return local if event == "call" and frame.f_code is code else None

        def run() -> None:
            sys.settrace(tracer)
            try:
                end(lease)
            finally:
                sys.settrace(None)

        self._thread = start(run)
        assert self.paused.wait(5)

    def resume(self) -> None:
        self._go.set()
        self._thread.join(10)


@pytest.mark.parametrize("ending", ENDINGS)
def test_concurrent_close_of_one_lease_returns_it_once(make_pool: Any, ending: str) -> None:
    # Connection.close reads lease._slot, then clears it, with no lock: two threads closing the
    # same lease could both pass the check and both give the slot back.  The connection would
    # then sit in the idle stack twice and be handed to two borrowers at once.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    first = StalledEnd(lease, ending, "_give_back(self._claim)")  # about to hand it back
    lease.close()  # second closer, in this thread
    first.resume()
    s = pool.stats()
    assert (s.idle, s.in_use) == (1, 0), f"returned twice: {s}"
    with pool.connection(timeout=0.5) as a:
        with pytest.raises(dbpool.PoolTimeout):
            b = pool.connection(timeout=0.05)
            assert b.raw is a.raw  # (what happens instead: the same connection twice)


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_stalled_close_never_returns_the_next_lease_of_its_connection(
    make_pool: Any, ending: str
) -> None:
    # Two threads close one lease; the second stalls just before it takes the lease's claim,
    # while the first returns the connection and another caller leases it.  Were the claim
    # the connection's rather than the lease's, the second would take it now and return the
    # connection the other caller is using.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    stalled = StalledEnd(lease, ending, "_give_back(self._claim)")
    lease.close()  # the first closer returns it...
    with pool.connection(timeout=1) as again:  # ...and it is leased again
        stalled.resume()
        s = pool.stats()
        assert (s.idle, s.in_use) == (0, 1), f"the stalled close returned it: {s}"
        again.cursor().execute("select 1")  # still this caller's alone
    s = pool.stats()
    assert (s.idle, s.in_use) == (1, 0), s


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_close_racing_the_return_of_its_lease_emits_no_second_checkin(
    make_pool: Any, ending: str
) -> None:
    # The first closer has cleaned the connection and is about to put it back when a second
    # close() of the same lease comes in.  The connection was once back in the lease's claim at
    # that moment: the second close took it from there and ran the whole return again (a second
    # CHECKIN, a second cleaning), and the first found nothing left to put back.
    pool = make_pool(max_size=1)
    checkins: list[dbpool.PoolEvent] = []
    pool.add_listener(dbpool.Event.CHECKIN, checkins.append)
    lease = pool.connect()
    lease.cursor().execute("select 1")  # so that the return cleans it
    # About to put it back: the first lock taken in _give_back (_put_back's common case)
    first = StalledEnd(lease, ending, "self._lock.acquire()", within=dbpool.Pool._give_back)
    lease.close()  # second closer, in this thread
    first.resume()
    assert len(checkins) == 1, checkins
    s = pool.stats()
    assert (s.idle, s.in_use, s.returned) == (1, 0, 1), s


# == No logging under the pool lock ============================================================


def test_no_logging_while_the_pool_lock_is_held(make_pool: Any, server: fakedb.Server) -> None:
    # The connect path once logged "connecting works again" inside `with self._lock:`.  A handler
    # doing I/O stalls every checkout meanwhile; one that reads pool.stats() deadlocks.
    pool = make_pool(max_size=1, reconnect_delay=0.01, reconnect_max_delay=0.01)
    server.down()
    with pytest.raises(fakedb.OperationalError):
        pool.connection(timeout=1)
    server.up()

    class StatsProbe(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.could_read_stats: list[bool] = []

        def emit(self, record: logging.LogRecord) -> None:
            if "connecting works again" not in record.getMessage():
                return
            done = threading.Event()
            start(lambda: (pool.stats(), done.set()))
            self.could_read_stats.append(done.wait(2))

    probe = StatsProbe()
    logger = logging.getLogger("dbpool")
    level = logger.level
    logger.addHandler(probe)
    logger.setLevel(logging.INFO)
    try:
        with pool.connection(timeout=5):
            pass
        # The connect thread logs after handing the connection over.
        wait_until(lambda: probe.could_read_stats)
    finally:
        logger.removeHandler(probe)
        logger.setLevel(level)
    assert probe.could_read_stats == [True], "the pool lock was held while logging"


# == Statements on Cursor.raw count as pending work ============================================


def test_statement_through_cursor_raw_is_rolled_back(make_pool: Any, server: fakedb.Server) -> None:
    # pymssql (and mysqlclient, PyMySQL with autocommit off, the generic dialect) cannot report
    # the transaction state: the lease's `dirty` flag decides.  Work done through Cursor.raw
    # must set it too, or it stays open and the next borrower's commit commits it.
    pool = make_pool(connect=server.connect_mssql, max_size=1)
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.raw.execute("insert into t values (1)")
    [raw] = server.connections
    assert not server.in_transaction(raw), "uncommitted work left on the pooled connection"


@pytest.mark.timeout(30)
def test_mariadb_snapshot_opened_through_cursor_raw_is_not_kept(mysql_connect: Any) -> None:
    admin = mysql_connect()
    admin.autocommit(True)
    acur = admin.cursor()
    acur.execute("DROP TABLE IF EXISTS dbpool_hard_raw")
    acur.execute("CREATE TABLE dbpool_hard_raw (id int primary key, v int) ENGINE=InnoDB")
    acur.execute("INSERT INTO dbpool_hard_raw VALUES (1, 1)")
    pool = dbpool.Pool(mysql_connect, min_size=0, max_size=1)
    try:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.raw.execute("SELECT v FROM dbpool_hard_raw")  # opens a REPEATABLE READ snapshot
            assert cur.raw.fetchall() == ((1,),)
        acur.execute("UPDATE dbpool_hard_raw SET v = 2")
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT v FROM dbpool_hard_raw")
            assert cur.fetchall() == ((2,),), (
                "the next borrower reads the previous lease's snapshot"
            )
            conn.commit()
    finally:
        pool.close(timeout=2)
        acur.execute("DROP TABLE IF EXISTS dbpool_hard_raw")
        admin.close()


# == Server-side session state ===================================================================


@pytest.mark.timeout(30)
def test_mariadb_session_settings_do_not_reach_the_next_borrower(mysql_connect: Any) -> None:
    # On MariaDB ROLLBACK does not clear @vars or the session isolation level.
    fresh = mysql_connect()
    fcur = fresh.cursor()
    fcur.execute("SELECT @@session.tx_isolation, @borrower_secret")
    baseline = fcur.fetchall()
    fresh.close()

    pool = dbpool.Pool(mysql_connect, min_size=0, max_size=1, session_reset="discard")
    try:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            cur.execute("SET @borrower_secret = 'borrower A'")
            conn.commit()
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT @@session.tx_isolation, @borrower_secret")
            seen = cur.fetchall()
            conn.commit()
        assert pool.stats().created == 1  # the same connection both times
    finally:
        pool.close(timeout=2)
    assert seen == baseline, f"borrower B inherited borrower A's session: {seen}"


# == close(timeout=None) and a lease garbage-collected during close ============================


def test_close_without_timeout_returns_when_the_last_lease_is_dropped(make_pool: Any) -> None:
    # Once close() has stopped the reaper and is waiting for in_use == 0, a lease dropped by
    # its borrower goes to the orphan queue, which nobody drains any more.
    pool = make_pool(max_size=1)
    lease = pool.connect()
    closer = Outcome()
    thread = start(closer.run, lambda: pool.close(timeout=None))

    def closer_waits() -> bool:
        frame = sys._current_frames().get(thread.ident or -1)
        while frame is not None:  # inside Condition.wait, called from close()'s wait
            if frame.f_code.co_name == "_await_returns" and frame.f_code.co_filename.endswith(
                "pool.py"
            ):
                return True
            if frame.f_code.co_filename != threading.__file__:
                return False
            frame = frame.f_back
        return False

    wait_until(closer_waits, timeout=5)
    try:
        with pytest.warns(ResourceWarning):
            del lease
            gc.collect()
        assert closer.done.wait(5), "close(timeout=None) still waiting for a lease that is gone"
    finally:
        if not closer.done.is_set():
            pool._return_orphans()  # private: unblock the closer for teardown
            closer.done.wait(5)


# == Infinite and huge durations ===============================================================


def test_infinite_acquire_timeout_waits(make_pool: Any) -> None:
    try:
        pool = make_pool(max_size=1, acquire_timeout=math.inf)
    except ValueError:
        return  # refusing it up front is a fix too
    holder = pool.connect()
    waiter = Outcome()
    start(waiter.run, pool.connection)
    wait_until(lambda: pool.stats().waiting == 1 or waiter.done.is_set())
    assert waiter.error is None, f"acquire failed instead of waiting: {waiter.error!r}"
    holder.close()
    assert waiter.done.wait(5)
    waiter.value.close()


def test_reaper_survives_a_huge_reconnect_delay(make_pool: Any, server: fakedb.Server) -> None:
    # A wait longer than threading.TIMEOUT_MAX raises OverflowError: such a delay is refused
    # up front, and the longest accepted one must not kill the reaper in its sleep.
    with pytest.raises(ValueError, match="at most"):
        dbpool.Pool(server.connect, reconnect_delay=1e11, reconnect_max_delay=1e11)
    server.down()
    longest = threading.TIMEOUT_MAX
    pool = make_pool(min_size=1, max_size=1, reconnect_delay=longest, reconnect_max_delay=longest)
    [reaper] = [t for t in threading.enumerate() if t.name == f"dbpool-reaper-{pool.name}"]

    sleeps = []

    def settled() -> bool:  # dead, or asleep in Event.wait between two runs
        if not reaper.is_alive():
            return True
        frame = sys._current_frames().get(reaper.ident or -1)
        while frame is not None:
            code = frame.f_code
            if code.co_name == "wait" and code.co_filename == threading.__file__:
                sleeps.append(frame)
                return len(set(map(id, sleeps))) >= 2  # it went round at least once more
            frame = frame.f_back
        return False

    wait_until(lambda: server.connect_attempts >= 1 and settled(), timeout=10)
    assert reaper.is_alive(), "the reaper thread died on its own sleep"
    assert server.connect_attempts == 1, "the backoff delay was not honoured"
