"""A signal handler that raises, at every point where CPython can run one, in the checkout and
return paths.

A Python-level signal handler (Ctrl-C's KeyboardInterrupt, a SIGTERM handler calling
``sys.exit()``, a SIGALRM time limit, Celery's soft time limit) runs in the main thread only
where the interpreter checks for pending signals.  On CPython 3.11 and later that is as a call to
a C function returns (before its result is stored: ``x = deque.popleft()`` loses the item), at
the entry of a Python function, and at a loop's jump back; never as a Python function returns,
nor between other instructions.  Python 3.9 and 3.10 also run one as a Python function returns
(and 3.9 between most instructions): windows no pure-Python pool can close, which these tests
leave out; there they try the same points as on 3.11, in those versions' bytecode.

:func:`signal_points` runs a checkout, a return or a ``check()`` once under a trace and lists,
for each function of the pool's that the scenario names, the instructions that follow a call to
a C function or a jump back, and the entries of the functions it names as handed a connection in
a box (the return path: a one-item list the callee empties first thing).
:func:`exact_after_each` then runs the scenario again on a fresh pool once per point, raising
KeyboardInterrupt there as the handler would, and checks that the point was reached and that
the pool lost nothing, left nobody queued and handed nothing out twice.  The other entries are
open windows (docs/behaviour.rst, "Exact counts"), and the tests leave them out.
"""

from __future__ import annotations

import contextlib
import dis
import gc
import sqlite3
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects.base import Dialect
from dbpool.lease import Connection, lease
from dbpool.stats import wait_bucket
from dbpool.transaction import Savepoint, Transaction
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)

# The calls, in 3.11+ and in 3.9/3.10 bytecode; a loop jumps back with JUMP_BACKWARD in 3.11+,
# with JUMP_ABSOLUTE to an earlier offset before.
_CALLS = {"CALL", "CALL_KW", "CALL_FUNCTION_EX", "CALL_FUNCTION", "CALL_FUNCTION_KW", "CALL_METHOD"}
# Frames entered from a call whose return the interpreter still checks: the constructor of a
# class called from Python runs under the C function type.__call__.
_ENTERED_THROUGH_C = {"__init__", "__new__"}


@dataclass(frozen=True)
class Point:
    """An instruction of ``code`` where a signal handler can run."""

    code: Any
    offset: int
    after: str  # what comes before it, for the failure message

    def __str__(self) -> str:
        name = getattr(self.code, "co_qualname", self.code.co_name)  # co_qualname: 3.11+
        return f"{name} offset {self.offset} (after {self.after})"


def _instructions(code: Any) -> dict[int, dis.Instruction]:
    return {ins.offset: ins for ins in dis.get_instructions(code)}


def _jumps_back(ins: dis.Instruction) -> bool:
    if ins.opname.startswith("JUMP_BACKWARD"):
        return True
    return ins.opname == "JUMP_ABSOLUTE" and ins.argval < ins.offset


def _described(ins: dis.Instruction) -> str:
    if hasattr(ins, "positions"):  # 3.11+
        return f"{ins.opname} on line {ins.positions.lineno}"
    return f"{ins.opname} at offset {ins.offset}"


def signal_points(
    run: Callable[[], None], functions: list[Any], entries: tuple[Any, ...] = ()
) -> list[Point]:
    """The points, in the given functions, where ``run()`` passes a signal check; and the
    entry of each function in ``entries`` (which must be among ``functions``)."""
    codes = {function.__code__ for function in functions}
    entry_codes = {function.__code__ for function in entries}
    points: dict[tuple[Any, int], Point] = {}
    last: dict[Any, tuple[int, bool]] = {}  # frame -> (offset of its last instruction, entered)

    def local(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            previous = last.get(frame)
            if previous is None and code in entry_codes:
                points.setdefault(
                    (code, frame.f_lasti), Point(code, frame.f_lasti, "the function's entry")
                )
            if previous is not None:
                ins = _instructions(code)[previous[0]]
                checked = ins.opname in _CALLS and not previous[1]
                if checked or _jumps_back(ins):
                    points.setdefault(
                        (code, frame.f_lasti), Point(code, frame.f_lasti, _described(ins))
                    )
            last[frame] = (frame.f_lasti, False)
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        caller = frame.f_back
        if event == "call" and caller in last and frame.f_code.co_name not in _ENTERED_THROUGH_C:
            last[caller] = (last[caller][0], True)  # a Python function: no check on its return
        return local if event == "call" and frame.f_code in codes else None

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return list(points.values())


def _raising_at(point: Point, raised: list[Point]) -> Callable[..., Any]:
    """A trace raising KeyboardInterrupt once, at ``point``; it notes in ``raised`` that it did."""

    def local(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode" and frame.f_lasti == point.offset and not raised:
            raised.append(point)
            raise KeyboardInterrupt(f"signal at {point}")
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if event == "call" and frame.f_code is point.code else None

    return tracer


def _problems(pool: dbpool.Pool[Any], max_size: int) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()  # a lease dropped by the interrupt gives its connection back
    s = pool.stats()
    if s.size != s.idle + s.in_use + s.opening or s.waiting:
        return f"accounting broken: {s}"
    with pool._lock:
        closing = pool._closes_pending_locked()
    if closing:
        return f"{closing} closes left counted: drain() and close() would wait for them"
    held = []
    try:
        for _ in range(max_size):
            held.append(pool.connection(timeout=1))
    except dbpool.PoolTimeout:
        return f"a slot was lost: {len(held)} of {max_size} leases at once ({s})"
    finally:
        raws = [id(conn.raw) for conn in held]
        for conn in held:
            conn.close()
    if len(set(raws)) != len(raws):
        return "one connection was handed out twice"
    s = pool.stats()
    if s.acquired != s.returned:
        return f"checkouts and returns no longer pair up: {s}"
    return ""


def exact_after_each(
    make_pool: Callable[..., Any],
    prepare: Callable[[dbpool.Pool[Any]], Any],
    act: Callable[[dbpool.Pool[Any], Any], None],
    functions: list[Any],
    finish: Callable[[Any], None] = lambda prepared: None,
    entries: tuple[Any, ...] = (),
    problems: Callable[[dbpool.Pool[Any], int], str] = _problems,
    **options: Any,
) -> None:
    """For each signal point of ``act`` in ``functions`` (and entry of ``entries``): a fresh
    pool of two (with ``options``), ``prepare(pool)``, then ``act(pool, prepared)`` with
    KeyboardInterrupt raised at that point, then ``finish(prepared)``, then ``problems``."""
    sample = make_pool(max_size=2, **options)
    sample_prepared = prepare(sample)
    points = signal_points(lambda: act(sample, sample_prepared), functions, entries)
    finish(sample_prepared)
    assert points, "no signal point found: the trace saw none of the functions"
    failures = []
    for point in points:
        pool = make_pool(max_size=2, **options)
        prepared = prepare(pool)
        raised: list[Point] = []
        sys.settrace(_raising_at(point, raised))
        try:
            act(pool, prepared)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        finish(prepared)
        del prepared
        problem = problems(pool, 2) if raised else "not reached: this run took another path"
        if problem:
            failures.append(f"{point}: {problem}")
        pool.close(timeout=1)
    assert not failures, "\n".join(failures)


def _one_idle(pool: dbpool.Pool[Any]) -> None:
    with pool.connection():
        pass


def _checkout(pool: dbpool.Pool[Any], _: Any) -> None:
    conn = pool.connection()
    conn.close()


CHECKOUT = [
    dbpool.Pool.connection,
    dbpool.Pool._pop_idle_locked,
    dbpool.Pool._acquire,
    lease,
]


def test_checkout_from_the_idle_stack(make_pool: Any) -> None:
    exact_after_each(make_pool, _one_idle, _checkout, CHECKOUT)


def test_checkout_that_connects(make_pool: Any) -> None:
    connecting = [dbpool.Pool._take, dbpool.Pool._reserve_locked, dbpool.Pool._connect_for_caller]
    exact_after_each(make_pool, lambda pool: None, _checkout, [*CHECKOUT, *connecting])


def _leased(pool: dbpool.Pool[Any]) -> Connection[Any]:
    return pool.connection()


@pytest.mark.parametrize("ending", ["close", "__exit__"])
def test_return(make_pool: Any, ending: str) -> None:
    def end(pool: dbpool.Pool[Any], conn: Connection[Any]) -> None:
        if ending == "close":
            conn.close()
        else:
            conn.__exit__(None, None, None)

    # The return path hands the connection from function to function in a box (the lease's
    # claim), so the entries of these functions are covered too.
    handing = (Connection.close, Connection.__exit__, dbpool.Pool._give_back, dbpool.Pool._put_back)
    exact_after_each(make_pool, _leased, end, list(handing), entries=handing)


@pytest.mark.parametrize("why", ["expired", "broken"])
def test_return_that_discards_the_connection(make_pool: Any, why: str) -> None:
    def expire(pool: dbpool.Pool[Any]) -> Connection[Any]:
        conn = pool.connection()
        if why == "expired":
            conn._slot.expires_at = 0.0  # type: ignore[union-attr]  # private: max_lifetime
        else:
            conn.raw.close()  # the driver reports it broken: the pool notes when (broken_at)
        return conn

    exact_after_each(
        make_pool,
        expire,
        lambda pool, conn: conn.close(),
        [
            Connection.close,
            dbpool.Pool._give_back,
            dbpool.Pool._discard,
            dbpool.Pool._forget_locked,
            dbpool.Pool._grant_room_locked,
        ],
        entries=(Connection.close, dbpool.Pool._give_back),
    )


@pytest.mark.parametrize("why", ["clean", "broken"])
def test_return_to_a_drained_pool(make_pool: Any, why: str) -> None:
    def drained(pool: dbpool.Pool[Any]) -> Connection[Any]:
        conn = pool.connection()
        if why == "broken":
            conn.raw.close()
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
        return conn

    def problems(pool: dbpool.Pool[Any], max_size: int) -> str:
        try:
            pool.drain(timeout=1)  # waits for the close of the connection returned
        except dbpool.PoolTimeout as exc:
            return f"drain() still waits: {exc}"
        pool.reopen()
        return _problems(pool, max_size)

    handing = (Connection.close, dbpool.Pool._give_back, dbpool.Pool._put_back)
    exact_after_each(
        make_pool,
        drained,
        lambda pool, conn: conn.close(),
        [*handing, dbpool.Pool._discard, dbpool.Pool._close_raw, dbpool.Pool._wake_closers],
        entries=handing,
        problems=problems,
    )


def test_return_of_a_lease_from_before_reopen(make_pool: Any) -> None:
    def from_before(pool: dbpool.Pool[Any]) -> Connection[Any]:
        conn = pool.connection()
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
        pool.reopen()
        return conn

    handing = (Connection.close, dbpool.Pool._give_back)
    exact_after_each(
        make_pool,
        from_before,
        lambda pool, conn: conn.close(),
        [
            *handing,
            dbpool.Pool._close_if_retired,
            dbpool.Pool._grant_room_locked,
            dbpool.Pool._close_counted,
            dbpool.Pool._close_raw,
            dbpool.Pool._wake_closers,
        ],
        entries=handing,
    )


def _dropped_lease(pool: dbpool.Pool[Any]) -> None:
    """A lease garbage-collected unreleased: its connection waits among the orphans."""
    conn = pool.connection()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del conn
        gc.collect()
    assert len(pool._orphans) == 1


def _counted_once(pool: dbpool.Pool[Any], max_size: int) -> str:
    problem = _problems(pool, max_size)
    if not problem and pool.stats().leaked != 1:
        problem = f"the dropped lease counted {pool.stats().leaked} times as leaked"
    return problem


def test_return_of_a_dropped_lease(make_pool: Any) -> None:
    # The maintenance thread returns orphans only on its tick, which a pool at rest is far from.
    exact_after_each(
        make_pool,
        _dropped_lease,
        lambda pool, _: pool._return_orphans(),
        [dbpool.Pool._return_orphans, dbpool.Pool._give_back, dbpool.Pool._put_back],
        entries=(dbpool.Pool._give_back, dbpool.Pool._put_back),
        problems=_counted_once,
    )


def test_checkout_that_pings_first(make_pool: Any) -> None:
    exact_after_each(
        make_pool,
        _one_idle,
        _checkout,
        [*CHECKOUT, dbpool.Pool._fit_for_use, dbpool.Pool._problem_of],
        validate_after=0,
    )


def test_check_of_the_idle_connections(make_pool: Any) -> None:
    exact_after_each(
        make_pool,
        _one_idle,
        lambda pool, _: pool.check(),
        [
            dbpool.Pool.check,
            dbpool.Pool._probe_all,
            dbpool.Pool._fit_for_use,
            dbpool.Pool._problem_of,
            dbpool.Pool._put_back,
        ],
        entries=(dbpool.Pool._put_back,),
    )


# -- with another caller in the queue ----------------------------------------------------------


@dataclass
class Busy:
    """A pool of two with both connections leased, and a second thread."""

    first: Connection[Any]
    second: Connection[Any]
    done: threading.Event
    thread: threading.Thread | None = None
    ahead: threading.Thread | None = None  # a caller queued before this thread's


def _both_leased(pool: dbpool.Pool[Any]) -> Busy:
    return Busy(pool.connection(), pool.connection(), threading.Event())


def _finish(busy: Busy) -> None:
    busy.done.set()
    busy.first.close()  # if the interrupted close() left it leased: the other thread gets it
    for thread in (busy.thread, busy.ahead):
        if thread is not None:
            thread.join(10)
    busy.second.close()


def _wait_for_a_connection(pool: dbpool.Pool[Any], busy: Busy) -> None:
    """A checkout that queues; the other thread returns a connection once it is queued."""

    def return_one() -> None:
        wait_until(lambda: busy.done.is_set() or pool.stats().waiting, timeout=10, interval=0.001)
        busy.first.close()

    busy.thread = threading.Thread(target=return_one, daemon=True)
    busy.thread.start()
    pool.connection(timeout=5).close()


WAITING = [
    *CHECKOUT,
    dbpool.Pool._take,
    dbpool.Pool._await_grant,
    dbpool.Pool._granted,
    wait_bucket,
]


def test_checkout_that_waits(make_pool: Any) -> None:
    exact_after_each(
        make_pool,
        _both_leased,
        _wait_for_a_connection,
        WAITING,
        _finish,
        entries=(dbpool.Pool._granted,),  # entered once the caller holds what it was granted
    )


def _first_in_line(pool: dbpool.Pool[Any]) -> Busy:
    """Both connections leased, and a caller in the queue that returns what it gets."""
    busy = _both_leased(pool)
    busy.ahead = threading.Thread(target=lambda: pool.connection(timeout=5).close(), daemon=True)
    busy.ahead.start()
    wait_until(lambda: pool.stats().waiting == 1)
    return busy


def _wait_behind_another(pool: dbpool.Pool[Any], busy: Busy) -> None:
    """A checkout queued behind the caller first in line (by the checkout's fast path); the
    other thread returns a connection once it is queued, which goes to the first in line, and
    from its return to this one."""

    def return_one() -> None:
        wait_until(
            lambda: busy.done.is_set() or pool.stats().waiting == 2, timeout=10, interval=0.001
        )
        busy.first.close()

    busy.thread = threading.Thread(target=return_one, daemon=True)
    busy.thread.start()
    pool.connection(timeout=5).close()


def test_checkout_queued_behind_another(make_pool: Any) -> None:
    exact_after_each(make_pool, _first_in_line, _wait_behind_another, WAITING, _finish)


def _return_to_a_waiter(pool: dbpool.Pool[Any], busy: Busy) -> None:
    """A return that hands the connection to the caller queued in the other thread."""
    busy.thread = threading.Thread(target=lambda: pool.connection(timeout=5).close(), daemon=True)
    busy.thread.start()
    wait_until(lambda: pool.stats().waiting == 1)
    busy.first.close()


@pytest.mark.parametrize("lent", [True, False], ids=["lent", "handed-to-validate"])
def test_return_to_a_waiting_caller(make_pool: Any, lent: bool) -> None:
    def prepare(pool: dbpool.Pool[Any]) -> Busy:
        busy = _both_leased(pool)
        if not lent:  # a broken connection found since: what comes back is validated first
            pool._broken_at = time.monotonic() + 3600  # private: when the last one was found
        return busy

    # A lent connection's wait is counted by the return, which finds its bucket first
    exact_after_each(
        make_pool,
        prepare,
        _return_to_a_waiter,
        [
            Connection.close,
            dbpool.Pool._give_back,
            wait_bucket,
            dbpool.Pool._put_back,
            dbpool.Pool._free_locked,
        ],
        _finish,
        entries=(Connection.close, dbpool.Pool._give_back, wait_bucket, dbpool.Pool._put_back),
    )


def test_checkout_that_finds_the_pool_drained_as_it_wakes_up(make_pool: Any) -> None:
    # The return lends the connection to the queued caller, and the pool is drained before the
    # caller's first step once woken up: it gives the connection back, to be closed, and is
    # told PoolClosed.  drain() then waits for the other lease only.
    def prepare(pool: dbpool.Pool[Any]) -> Busy:
        busy = _both_leased(pool)
        granted = pool._granted  # private: the queued caller's first step once woken up

        def drain_first(waiter: Any) -> Any:
            del pool._granted
            with pytest.raises(dbpool.PoolTimeout):
                pool.drain(timeout=0)
            return granted(waiter)

        pool._granted = drain_first  # type: ignore[method-assign]
        return busy

    def act(pool: dbpool.Pool[Any], busy: Busy) -> None:
        with pytest.raises(dbpool.PoolClosed, match="drained"):
            _wait_for_a_connection(pool, busy)

    def problems(pool: dbpool.Pool[Any], max_size: int) -> str:
        try:
            pool.drain(timeout=1)  # waits for the close of every connection
        except dbpool.PoolTimeout as exc:
            return f"drain() still waits: {exc}"
        pool.reopen()
        return _problems(pool, max_size)

    exact_after_each(
        make_pool,
        prepare,
        act,
        [
            dbpool.Pool.connection,
            dbpool.Pool._tell_refused_checkout,
            dbpool.Pool._tell_checkin,
            dbpool.Pool._put_back,
        ],
        _finish,
        entries=(
            dbpool.Pool._tell_refused_checkout,
            dbpool.Pool._tell_checkin,
            dbpool.Pool._put_back,
        ),
        problems=problems,
    )


# -- the end of a transaction block ------------------------------------------------------------

# Every signal point of a block's end but the entry of Transaction.__exit__ itself (the with
# statement calls it, and CPython runs a pending handler as it is entered, before any of its
# code: no pure-Python context manager can guard that).
BLOCK_END = [
    Transaction.__exit__,
    Transaction._finish,
    Transaction._commit_or_roll_back,
    Transaction._retryable_abort,
    Transaction._stop_watching,
    Transaction._owns_connection,
    Transaction._commit_unless_rolled_back,
    Transaction._rolled_back_error,
    Transaction._commit,
    Transaction._end_quietly,
    Transaction._unguard,
]


def _has_row(path: str, value: str) -> bool:
    with contextlib.closing(sqlite3.connect(path)) as reader:
        return bool(reader.execute("SELECT 1 FROM signals_t WHERE v = ?", (value,)).fetchall())


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_an_interrupt_in_a_blocks_end_leaves_the_lease_out_of_it_or_refusing(
    tmp_path: Any, ending: str
) -> None:
    # Interrupted anywhere in its end, a block leaves its lease either out of the block, its
    # outcome settled (committed, or not), or refusing further use: the caller who catches the
    # interrupt and goes on never commits the block's work, or runs a statement inside a block
    # that is over, or meets a watchdog still looking after it.
    path = str(tmp_path / "signals.sqlite3")
    with contextlib.closing(sqlite3.connect(path)) as setup:
        setup.execute("CREATE TABLE signals_t (v TEXT)")
        setup.commit()

    def block(conn: Connection[Any], tx: Transaction[Any]) -> None:
        with tx:
            tx.execute("INSERT INTO signals_t VALUES ('block')")
            if ending == "rollback":
                raise ValueError("the block fails")

    def run(conn: Connection[Any], tx: Transaction[Any]) -> None:
        try:
            block(conn, tx)
        except ValueError:
            pass

    pool = dbpool.Pool(lambda: sqlite3.connect(path, check_same_thread=False), max_size=1)
    try:
        with pool.connection() as conn:
            points = signal_points(
                lambda: run(conn, conn.transaction(timeout=60)),
                BLOCK_END,
                entries=tuple(BLOCK_END[1:]),
            )
            conn.execute("DELETE FROM signals_t")
            conn.commit()
        assert points
        failures = []
        for point in points:
            conn = pool.connection()
            tx = conn.transaction(timeout=60)
            raised: list[Point] = []
            sys.settrace(_raising_at(point, raised))
            try:
                run(conn, tx)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
            if not raised:
                failures.append(f"{point}: not reached")
            committed = _has_row(path, "block")
            problem = ""
            if ending == "rollback" and committed:
                problem = "the failed block's work was committed"
            try:
                conn.execute("INSERT INTO signals_t VALUES ('after')")
                conn.commit()
            except dbpool.ConnectionUnusable:
                pass  # refuses further use
            except Exception as exc:
                problem = problem or f"the lease's next statement: {type(exc).__name__}: {exc}"
            else:
                if _has_row(path, "block") != committed:
                    problem = problem or "the lease's next commit committed the block's work"
            ref = weakref.ref(tx)
            del tx
            gc.collect()
            if ref() is not None:
                problem = problem or "the transaction is still referenced (by the watchdog?)"
            conn.close()
            if problem:
                failures.append(f"{point}: {problem}")
            with pool.connection() as conn:
                conn.execute("DELETE FROM signals_t")
                conn.commit()
        assert not failures, "\n".join(failures)
    finally:
        pool.close()


# Every signal point of a savepoint block's end, the entry of Savepoint.__exit__ included: the
# transaction around it keeps its own record of the savepoint blocks still open.
SAVEPOINT_END = [
    Savepoint.__exit__,
    Transaction._owns_connection,
    Dialect.release_savepoint,
    Dialect.rollback_to_savepoint,
]


@pytest.mark.parametrize("ending", ["release", "rollback"])
def test_an_interrupt_in_a_savepoints_end_never_commits_what_it_should_undo(
    tmp_path: Any, ending: str
) -> None:
    # Interrupted anywhere in a savepoint block's end, and the interrupt caught inside the
    # transaction block, which then ends normally: either that end commits nothing, or the
    # savepoint's end went through (its work committed if released, undone if rolled back
    # to), or the lease refuses further use.
    path = str(tmp_path / "signals.sqlite3")
    with contextlib.closing(sqlite3.connect(path)) as setup:
        setup.execute("CREATE TABLE signals_t (v TEXT)")
        setup.commit()

    def run(tx: Transaction[Any]) -> None:
        try:
            with tx:
                tx.execute("INSERT INTO signals_t VALUES ('outer')")
                try:
                    with tx.savepoint():
                        tx.execute("INSERT INTO signals_t VALUES ('inner')")
                        if ending == "rollback":
                            raise ValueError("the savepoint's block fails")
                except (ValueError, KeyboardInterrupt):
                    pass
        except dbpool.PoolError:
            pass  # the block's end says that nothing was committed

    pool = dbpool.Pool(lambda: sqlite3.connect(path, check_same_thread=False), max_size=1)
    try:
        with pool.connection() as conn:
            points = signal_points(
                lambda: run(conn.transaction()), SAVEPOINT_END, entries=tuple(SAVEPOINT_END)
            )
            conn.execute("DELETE FROM signals_t")
            conn.commit()
        assert points
        failures = []
        for point in points:
            with pool.connection() as conn:
                tx = conn.transaction()
                raised: list[Point] = []
                sys.settrace(_raising_at(point, raised))
                try:
                    run(tx)
                finally:
                    sys.settrace(None)
                problem = "" if raised else "not reached"
                outer, inner = _has_row(path, "outer"), _has_row(path, "inner")
                if inner and not outer:
                    problem = problem or "the savepoint's work was committed without the block's"
                if ending == "rollback" and inner:
                    problem = problem or "the work the savepoint rolled back to was committed"
                try:
                    conn.execute("INSERT INTO signals_t VALUES ('after')")
                    conn.commit()
                except dbpool.ConnectionUnusable:
                    pass  # refuses further use
                else:
                    if _has_row(path, "inner") != inner:
                        problem = problem or "the lease's next commit committed the savepoint"
                if problem:
                    failures.append(f"{point}: {problem}")
            with pool.connection() as conn:
                conn.execute("DELETE FROM signals_t")
                conn.commit()
        assert not failures, "\n".join(failures)
    finally:
        pool.close()


def test_health_leaves_no_probe_of_its_own_at_any_signal_point(make_pool: Any) -> None:
    # A probe's mark lets its thread queue past max_waiting: one left behind by a signal
    # handler raising in health() would let that thread past the limit for good.
    def filled() -> dbpool.Pool[Any]:
        pool = make_pool(max_size=1, max_waiting=1)
        with pool.connection():
            pass
        return pool

    sample = filled()
    points = signal_points(lambda: sample.health(timeout=2), [dbpool.Pool.health])
    assert points, "no signal point found in health()"
    for point in points:
        pool = filled()
        raised: list[Any] = []
        sys.settrace(_raising_at(point, raised))
        try:
            pool.health(timeout=2)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert raised, f"{point}: not reached"
        assert pool._probes == {}, f"{point}: a probe left behind"  # private: health()'s marks
