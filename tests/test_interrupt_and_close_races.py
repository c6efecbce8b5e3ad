"""Races and interrupts around the background connects, bounded pings, transaction severing and
the checkout/return fast paths: the pool's accounting stays exact and nobody is left waiting.

Interleavings are forced with fakedb gates, Events, a stand-in for the pool's lock, or a line
trace, never with sleeps.  Two techniques stand for a signal handler that raises in the main
thread (as Ctrl-C does), which CPython runs at the next bytecode boundary of any line:

* a stand-in lock whose ``acquire()`` takes the real lock and then raises: the handler ran right
  after ``Lock.acquire()`` returned, still on that line;
* a line trace that raises on reaching a chosen line of the pool's code.

Those reach into private attributes (the pool's lock, the line a function is on); each place is
commented.
"""

from __future__ import annotations

import dis
import gc
import inspect
import sys
import threading
import warnings
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects import Dialect
from tests import fakedb
from tests.conftest import Caller, wait_until

pytestmark = pytest.mark.timeout(60)


def accounting(pool: dbpool.Pool[Any]) -> str:
    s = pool.stats()
    holds = s.size == s.idle + s.in_use + s.opening and 0 <= s.size <= s.max_size
    holds = holds and min(s.in_use, s.opening) >= 0
    return "" if holds else f"accounting broken: {s}"


# == 1. An interrupt right after the pool lock is taken deadlocks the thread ====================


class _InterruptAfterAcquire:
    """Stands in for the pool's lock (the Condition keeps the real one).  The first acquire made
    from ``function`` (directly or by ``with``) takes the real lock and then raises
    KeyboardInterrupt, as a signal handler run right after ``Lock.acquire()`` returned does."""

    def __init__(self, real: Any, function: str) -> None:
        self.real = real
        self.function = function
        self.fired = threading.Event()

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        got = bool(self.real.acquire(*args, **kwargs))
        caller = sys._getframe(1)
        if caller.f_code is _InterruptAfterAcquire.__enter__.__code__:
            caller = caller.f_back
        if got and not self.fired.is_set() and caller.f_code.co_name == self.function:
            self.fired.set()
            raise KeyboardInterrupt("signal handled right after the pool lock was taken")
        return got

    def release(self) -> None:
        self.real.release()

    def _is_owned(self) -> bool:
        return bool(self.real._is_owned())

    def __enter__(self) -> _InterruptAfterAcquire:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("function", ["_connect_for_caller", "_give_back", "_put_back"])
def test_interrupt_just_after_taking_the_lock_does_not_deadlock(
    make_pool: Any, function: str
) -> None:
    # _connect_for_caller, _take, _give_back and _put_back take the pool lock inside a try whose
    # `except BaseException` handler (_abandon / _discard) takes the same non-reentrant lock
    # again.  An exception raised after the acquire succeeded, still on that line, leaves the
    # thread blocked on a lock it holds itself: that thread hangs, and with it every caller.
    pool = make_pool(max_size=2 if function == "_put_back" else 1)
    others = []
    if function == "_give_back":  # a plain return: _put_back's common case, written out there
        lease = pool.connect()
        call: Callable[[], Any] = lease.close
    elif function == "_put_back":  # a return to a pool that shrank meanwhile: _put_back's case
        lease = pool.connect()
        others.append(pool.connect())
        pool.resize(max_size=1)
        call = lease.close
    else:
        call = lambda: pool.connection(timeout=5)  # noqa: E731 - the pool is empty: it connects
    proxy = _InterruptAfterAcquire(pool._lock, function)
    pool._lock = proxy  # private: the only way to run code right after that acquire returns
    try:
        outcome = Caller(call)
        assert proxy.fired.wait(5)
        finished = outcome.done.wait(10)
        if not finished:
            proxy.real.release()  # unstick the thread so that the test can clean up
            assert outcome.done.wait(5)
    finally:
        pool._lock = proxy.real
    assert finished, f"{function}: the interrupted thread deadlocked on the pool lock it held"
    assert isinstance(outcome.error, KeyboardInterrupt)
    wait_until(lambda: pool.stats().opening == 0)
    assert not accounting(pool), accounting(pool)
    for other in others:
        other.close()
    assert not accounting(pool), accounting(pool)


# == 2. A doomed connection keeps its timed-out transaction on the caller's lease ===============


class _HangingCancel(Dialect):
    """The generic dialect, with a cancel that hangs until released, as psycopg's cancel request
    does when the network to the server is blackholed."""

    name = "hanging-cancel"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        self.entered.set()
        self.go.wait(10)


def test_timed_out_transaction_on_a_callers_lease_is_rolled_back(
    make_pool: Any, server: fakedb.Server
) -> None:
    # conn.transaction(timeout=...): the watchdog's cancel hangs; the statement ends by itself
    # just after the deadline.  On exit _stop_watching waits _SEVER_GRACE for the cancel, gives
    # up and dooms the slot, and _end_quietly returns at once for a doomed slot: no ROLLBACK.
    # TransactionTimeout says "rolled back", but the caller still holds the lease, the
    # transaction's work is still pending on it, and the caller's next commit() commits it.
    dialect = _HangingCancel()
    pool = make_pool(max_size=1, dialect=dialect)
    try:
        with pool.connection() as conn:
            raw = conn.raw
            conn.rollback()
            gate = server.block("execute")

            # The statement ends once the watchdog's cancel is under way (and hangs).
            def release_once_cancelling() -> None:
                assert dialect.entered.wait(5)
                gate.release()

            releaser = Caller(release_once_cancelling)
            with pytest.raises(dbpool.TransactionTimeout):
                with conn.transaction(timeout=0.2) as tx:
                    tx.execute("insert into t values (1)")  # held past the deadline
            assert releaser.done.wait(5) and releaser.error is None
            if server.in_transaction(raw):  # not rolled back: then it must be fenced off
                with pytest.raises(dbpool.ConnectionUnusable, match="refuses further use"):
                    conn.commit()  # what the caller could do next
        assert server.count("commit") == 0, "the timed-out work was committed"
        assert pool.stats().discarded == 1, "the connection with the timed-out work was kept"
    finally:
        dialect.go.set()


# == 3. close() leaves a caller waiting for its own connect until its deadline ==================


def test_close_wakes_a_caller_whose_connect_is_in_flight(
    make_pool: Any, server: fakedb.Server
) -> None:
    # The caller waits in _connect_for_caller on a waiter that is not in the pool's queue, so
    # close() does not serve it: "waiters get PoolClosed at once" does not hold for it, and it
    # stays blocked until the connect ends or its own acquire timeout passes.
    pool = make_pool(max_size=1)
    gate = server.block("connect")
    caller = Caller(lambda: pool.connection(timeout=20))
    assert gate.entered.wait(5)
    pool.close(timeout=0)
    woke = caller.done.wait(10)  # it would wait 20 s
    gate.release()
    assert caller.done.wait(10)
    assert woke, "a caller whose connect was in flight was not told the pool closed"
    assert isinstance(caller.error, dbpool.PoolClosed), caller.error


def test_connection_made_after_close_is_counted_as_closed(
    make_pool: Any, server: fakedb.Server
) -> None:
    # _open's `closed` branch takes the connection out of `size` and closes it, but never adds
    # it to the `closed` counter: created - closed no longer equals the connections open.
    pool = make_pool(max_size=1)
    gate = server.block("connect")
    caller = Caller(lambda: pool.connection(timeout=20))
    assert gate.entered.wait(5)
    pool.close(timeout=0)
    gate.release()
    assert caller.done.wait(10)
    wait_until(lambda: pool.stats().opening == 0 and not server.open_connections)
    s = pool.stats()
    assert s.created - s.closed == s.size == 0, f"a connection closed but not counted: {s}"


# == 4. Interrupted while starting the connect thread: the reservation is returned twice ========


def test_interrupt_while_starting_the_connect_thread_keeps_accounting(
    make_pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thread.start() launches the thread, then waits for it to signal that it runs; a signal
    # handler raising in that wait interrupts start() with the thread already running.
    # _start_connect then gives the reservation back, and so does the thread when its connect
    # ends (or it keeps the connection and decrements `opening` a second time).
    real_thread = threading.Thread

    class InterruptedStart(real_thread):  # type: ignore[misc, valid-type]
        def start(self) -> None:
            super().start()
            if self.name.startswith("dbpool-connect-"):
                raise KeyboardInterrupt("signal during Thread.start()")

    pool = make_pool(max_size=2)
    monkeypatch.setattr(threading, "Thread", InterruptedStart)
    with pytest.raises(KeyboardInterrupt):
        pool.connection(timeout=2)
    monkeypatch.setattr(threading, "Thread", real_thread)
    wait_until(lambda: pool.stats().created == 1)
    assert not accounting(pool), accounting(pool)


# == 5. Checkout fast path: an interrupt between the pop and the try loses the slot =============


def _tracing(function: Any, local: Callable[..., Any]) -> Callable[..., Any]:
    """A trace function handing the events of ``function``'s calls to ``local``."""
    code = function.__code__

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if event == "call" and frame.f_code is code else None

    return tracer


def _checkout_interrupted(pool: Any, tracer: Callable[..., Any], timeout: float) -> None:
    """``pool.connection()`` under ``tracer``, which must make it raise KeyboardInterrupt."""
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.connection(timeout=timeout)
    finally:
        sys.settrace(None)


def _raise_at(function: Any, marker: str) -> Callable[..., Any]:
    """A trace function raising KeyboardInterrupt on the first line of ``function`` that
    contains ``marker``: a signal handler raising there."""
    lines, first = inspect.getsourcelines(function)
    [target] = [first + i for i, text in enumerate(lines) if marker in text]

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == target:
            raise KeyboardInterrupt(f"signal at {function.__qualname__} line {target}")
        return local

    return _tracing(function, local)


def test_interrupt_in_the_checkout_fast_path_keeps_the_slot(make_pool: Any) -> None:
    # Pool.connection(): the idle connection is popped and counted in use under the lock; the
    # lines from there to the `try:` that gives it back on an exception (the freshness check,
    # the deadline) are unprotected.  An interrupt there leaves in_use at 1 for good.
    pool = make_pool(max_size=1)
    with pool.connection():
        pass
    _checkout_interrupted(pool, _raise_at(dbpool.Pool.connection, "alive_at = slot.alive_at"), 1)
    s = pool.stats()
    assert (s.idle, s.in_use) == (1, 0), f"slot lost: {s}"


# == 6. An interrupt as the lease is made: the dropped lease and the undo both return it ========


def _raise_before_storing(function: Any, name: str) -> Callable[..., Any]:
    """A trace function raising KeyboardInterrupt in ``function`` just before it stores the
    result of a call in the local ``name``: a signal handler raising as the call returns.
    The result, on the interpreter's stack only, is dropped at once."""
    instructions = list(dis.get_instructions(function))
    stores = {
        ins.offset
        for before, ins in zip(instructions, instructions[1:])
        if ins.opname == "STORE_FAST" and ins.argval == name and before.opname.startswith("CALL")
    }
    assert stores, f"no call result stored in {name} in {function.__qualname__}"

    def local(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True  # from the first line on: the store comes later
        if event == "opcode" and frame.f_lasti in stores:
            raise KeyboardInterrupt(f"signal before {function.__qualname__} stores {name}")
        return local

    return _tracing(function, local)


@pytest.mark.parametrize("served", ["from the idle stack", "after waiting"])
def test_interrupt_as_the_lease_is_made_returns_the_connection_once(
    make_pool: Any, served: str
) -> None:
    # The new lease is dropped unreferenced, so its finaliser runs before the checkout's own
    # undo.  Were the lease live already, both would give the connection back: it would sit
    # in the idle stack twice and go to two borrowers at once.  (Python 3.9 and 3.10 run
    # signal handlers as any call returns; the trace function stands in for one here.)
    pool = make_pool(max_size=1)
    with pool.connection():
        pass
    if served == "after waiting":
        holder = pool.connect()

        def close_once_queued() -> None:
            wait_until(lambda: pool.stats().waiting == 1)
            holder.close()

        threading.Thread(target=close_once_queued, daemon=True).start()
    _checkout_interrupted(pool, _raise_before_storing(dbpool.Pool.connection, "conn"), 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with pool.connection(timeout=1) as a:  # returns any orphan first
        s = pool.stats()
        assert (s.size, s.in_use, s.idle) == (1, 1, 0), f"returned twice: {s}"
        with pytest.raises(dbpool.PoolTimeout):
            pool.connection(timeout=0.2)  # the one connection is not handed out twice
        assert a.cursor() is not None
    assert not accounting(pool), accounting(pool)
