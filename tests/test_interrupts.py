"""Exceptions at every step of a lease's life, on the fake driver.

KeyboardInterrupt, SystemExit and a driver error are injected at each point of acquire, connect,
hand-over, validation, the caller's own calls, reset on return, release, the finaliser of a
dropped lease and ``pool.close()``.  Each point is one row of :data:`POINTS`.  After each point:

* the exception reaches the caller: a BaseException is never swallowed; a driver error reaches
  the caller where it is the caller's own (its connect, statement or commit) and is absorbed
  where the pool recovers by itself (validation, reset on return, closing a discarded
  connection);
* the accounting is exact once things settle: ``size == idle + in_use + opening``,
  ``size <= max_size``, nothing in use or queued, and the fake server has exactly ``size``
  connections open (none the pool forgot);
* the pool still serves ``max_size`` leases at once (no slot lost), and a connection whose
  call or reset was interrupted is closed and never handed out again;
* a pool closed at that point has nothing left open and refuses callers.

How exceptions get to a point:

* inside the driver: ``server.fail_next(verb, exc)``, or a gate released with ``exc``;
* into a thread parked in a wait of the pool's own (not inside the driver):
  :func:`async_raise`, CPython's ``PyThreadState_SetAsyncExc``.  It only marks the target
  thread; the interpreter raises the exception there at the thread's next bytecode boundary,
  never inside C code, so it cannot corrupt a lock or the interpreter: the effect is that of a
  signal handler raising at that line, which the pool must survive anyway.  A thread blocked in
  ``Lock.acquire`` runs no bytecode, so the exception lands the instant its wait returns: after
  a timeout, a hand-over or a close, which is exactly the point under test.  It is set once,
  when the thread is verifiably parked (:func:`wait_parked`), and the test then makes the thread
  run again and waits until it has been delivered; setting it twice could land a second
  exception inside the recovery code;
* into the main thread blocked anywhere: a SIGUSR1 whose handler raises, as Ctrl-C raises
  KeyboardInterrupt and a SIGTERM handler calling ``sys.exit()`` raises SystemExit.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, wait_until

pytestmark = pytest.mark.timeout(60)

Exc = type[BaseException]
DriverError = fakedb.OperationalError
MAX_SIZE = 2  # more than one, so that a lost slot shows as a pool that serves one lease too few


def is_base(exc: Exc | None) -> bool:
    """Whether ``exc`` is an interruption (KeyboardInterrupt, SystemExit), not an Exception."""
    return exc is not None and not issubclass(exc, Exception)


# -- threads, interruptions ---------------------------------------------------------------------


def wait_parked(thread: threading.Thread, timeout: float = 5.0) -> None:
    """Wait until ``thread`` is parked in a blocking call: its innermost Python frame stays on
    one instruction across three polls, each of which gives up the GIL (a thread that was only
    waiting for the GIL would have moved on)."""
    seen: list[tuple[Any, int] | None] = []

    def parked() -> bool:
        frame = sys._current_frames().get(thread.ident or -1)
        seen.append(None if frame is None else (frame.f_code, frame.f_lasti))
        last = seen[-3:]
        return len(last) == 3 and last[0] is not None and last.count(last[0]) == 3

    wait_until(parked, timeout=timeout, message=f"{thread.name} never parked in a blocking call")


def async_raise(thread: threading.Thread, exc: Exc) -> None:
    """Have ``exc`` raised in ``thread`` at its next bytecode boundary (see the module doc)."""
    ident = thread.ident
    assert ident is not None and thread.is_alive(), f"{thread.name} is not running"
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    marked = set_async_exc(ctypes.c_ulong(ident), ctypes.py_object(exc))
    if marked != 1:
        set_async_exc(ctypes.c_ulong(ident), None)  # undo, whatever it marked
        raise AssertionError(f"PyThreadState_SetAsyncExc marked {marked} threads, expected 1")


@contextlib.contextmanager
def signal_raises(exc: Exc, when: threading.Event | None = None) -> Iterator[Callable[[], None]]:
    """While active, a SIGUSR1 makes the main thread raise ``exc`` from the signal handler.

    Yields a function that sends the signal from any thread.  With ``when``, a helper thread
    sends it once ``when`` is set and the main thread is parked in a blocking call.
    """
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    main = threading.main_thread()
    assert main.ident is not None
    stop = threading.Event()
    problems: list[BaseException] = []

    def handler(signum: int, frame: Any) -> None:
        raise exc(f"signal {signum} (test)")

    def send() -> None:
        signal.pthread_kill(main.ident or 0, signal.SIGUSR1)

    def sender(when: threading.Event) -> None:
        try:
            while not stop.is_set():
                if when.wait(0.01):
                    wait_parked(main)  # in its wait, not on its way there
                    if not stop.is_set():
                        send()
                    return
        except BaseException as error:  # reported by the test
            problems.append(error)

    previous = signal.signal(signal.SIGUSR1, handler)
    thread = None
    if when is not None:
        thread = threading.Thread(target=sender, args=(when,), name="signal-sender", daemon=True)
        thread.start()
    try:
        yield send
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        signal.signal(signal.SIGUSR1, previous)
    assert problems == [], problems


@contextlib.contextmanager
def thread_exceptions() -> Iterator[list[BaseException]]:
    """Collect exceptions that end background threads (the pool's own) while active."""
    seen: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: Any) -> None:
        if args.exc_value is not None:
            seen.append(args.exc_value)

    threading.excepthook = hook
    try:
        yield seen
    finally:
        threading.excepthook = previous


@contextlib.contextmanager
def unraisable_exceptions() -> Iterator[list[Exc]]:
    """Collect the types of exceptions raised by finalisers while active.  Only the type is
    kept: the exception's traceback would keep the finalised object alive."""
    seen: list[Exc] = []
    previous = sys.unraisablehook

    def hook(args: Any) -> None:
        seen.append(args.exc_type)

    sys.unraisablehook = hook
    try:
        yield seen
    finally:
        sys.unraisablehook = previous


# -- the scene of one test ----------------------------------------------------------------------


class Scene:
    """One pool on one fake server, and what the test learnt about its connections."""

    def __init__(self, server: fakedb.Server) -> None:
        self.server = server
        self._pool: dbpool.Pool[Any] | None = None
        self.callers: list[Caller] = []
        #: driver connections that must be closed and never handed out again
        self.banned: list[Any] = []

    @property
    def pool(self) -> dbpool.Pool[Any]:
        assert self._pool is not None
        return self._pool

    def make_pool(self, **options: Any) -> dbpool.Pool[Any]:
        assert self._pool is None
        options = {
            "min_size": 0,
            "max_size": MAX_SIZE,
            "acquire_timeout": 5.0,
            "idle_timeout": None,
            "max_lifetime": None,
            **options,
        }
        self._pool = dbpool.Pool(options.pop("connect", self.server.connect), **options)
        return self._pool

    def raw(self, lease: dbpool.Connection[Any]) -> Any:
        """The fake driver connection behind ``lease``, found without touching ``lease.raw``
        (which marks the lease as having run something)."""
        conn_id = lease.id  # a plain attribute of the driver connection, passed through
        [raw] = [c for c in self.server.connections if c.id == conn_id]
        return raw

    def idle_connection(self) -> Any:
        """Make one connection, return it to the pool unused, and give its driver connection."""
        with self.pool.connection() as lease:
            return self.raw(lease)

    def start(self, call: Callable[[], Any], name: str = "caller") -> Caller:
        caller = Caller(call, name)
        self.callers.append(caller)
        return caller

    def close(self) -> None:
        self.server.release_all()
        for caller in self.callers:
            caller.done.wait(10)
            if isinstance(caller.value, dbpool.Connection):
                caller.value.close()
        if self._pool is not None:
            self._pool.close(timeout=1)


@pytest.fixture
def scene(fake_server: fakedb.Server) -> Iterator[Scene]:
    s = Scene(fake_server)
    yield s
    s.close()


def describe(scene: Scene) -> str:
    return f"{scene.pool.stats()}; open at the server: {scene.server.open_connections}"


def connects_in_flight(server: fakedb.Server) -> int:
    """Driver connects started and not finished (a connect the pool forgot shows up here)."""
    return sum(
        1 for c in server.calls if c.verb == "connect" and c.conn_id is None and c.error is None
    )


def settle(scene: Scene, done: Callable[[dbpool.PoolStats, int], bool]) -> dbpool.PoolStats:
    """Wait until no driver connect is in flight and ``done(stats, connections open at the
    server)``; fail with both if that never happens."""

    def settled() -> bool:
        if connects_in_flight(scene.server):
            return False
        return done(scene.pool.stats(), len(scene.server.open_connections))

    try:
        wait_until(settled)
    except AssertionError:
        raise AssertionError(f"the pool never settled: {describe(scene)}") from None
    return scene.pool.stats()


def assert_sound(scene: Scene) -> None:
    """The checks after every point, for a pool left open."""
    pool, server = scene.pool, scene.server
    s = settle(
        scene,
        lambda s, open_: s.in_use == 0 and s.opening == 0 and s.waiting == 0 and open_ == s.size,
    )
    assert s.size == s.idle + s.in_use + s.opening, s
    assert 0 <= s.size <= s.max_size, s
    for raw in scene.banned:
        assert raw.closed, f"{raw!r} was interrupted or failed its reset, and is still open"
    banned = {raw.id for raw in scene.banned}
    leases = []
    try:
        for _ in range(s.max_size):
            leases.append(pool.connection(timeout=2))
        ids = [lease.id for lease in leases]
        assert len(set(ids)) == s.max_size, f"one connection leased twice: {ids}"
        assert not banned & set(ids), "a connection whose reset was interrupted is handed out again"
        for lease in leases:
            assert not lease.in_transaction, "a borrower got someone else's transaction"
            cursor = lease.cursor()
            cursor.execute("select 1")
            assert cursor.fetchall() == [(1,)]
    finally:
        for lease in leases:
            lease.close()
    s = pool.stats()
    assert (s.in_use, s.opening, s.waiting) == (0, 0, 0), s
    assert s.size == s.idle == len(server.open_connections), describe(scene)
    assert s.acquired == s.returned, f"checkouts and returns no longer pair up: {s}"


def assert_closed_clean(scene: Scene) -> None:
    """The checks after a point that closed the pool."""
    settle(
        scene, lambda s, open_: (s.size, s.in_use, s.opening, s.waiting, open_) == (0, 0, 0, 0, 0)
    )
    with pytest.raises(dbpool.PoolClosed):
        scene.pool.connection(timeout=1)


@contextlib.contextmanager
def raises_if(expected: bool, exc: Exc | None) -> Iterator[None]:
    """Expect ``exc`` from the block if ``expected``, else that the block returns normally."""
    if expected:
        assert exc is not None
        with pytest.raises(exc):
            yield
    else:
        yield


def boom(exc: Exc) -> BaseException:
    return exc("injected by the test")


# == The points ==================================================================================
# Each takes the scene and the exception to inject, runs up to and through the point, and checks
# what the caller saw.  The common checks run afterwards.

# -- connect ---------------------------------------------------------------------------------


def connect_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    scene.server.fail_next("connect", exc)
    with pytest.raises(exc):  # the caller's own connect: a driver error reaches it too
        pool.connection()


def connect_blocked_caller_interrupted(scene: Scene, exc: Exc) -> None:
    # The connect is held at a gate; the caller waiting for it is interrupted when it returns.
    pool = scene.make_pool()
    gate = scene.server.block("connect")
    caller = scene.start(lambda: pool.connection(timeout=10))
    assert gate.entered.wait(5)
    wait_parked(caller.thread)
    async_raise(caller.thread, exc)
    gate.release()
    assert isinstance(caller.outcome(), exc)


def connect_blocked_caller_signalled(scene: Scene, exc: Exc) -> None:
    # The caller is interrupted in its wait while the connect is still held; the connect
    # completes afterwards, for nobody.
    pool = scene.make_pool()
    gate = scene.server.block("connect")
    with signal_raises(exc, when=gate.entered), pytest.raises(exc):
        pool.connection(timeout=10)
    gate.release()


def connect_starting_caller_signalled(scene: Scene, exc: Exc) -> None:
    # The signal is sent from inside the connect callable, as soon as the connect has started:
    # the caller is still setting the connect up (starting the thread that runs it, if any).
    gate = scene.server.block("connect")
    first = threading.Event()
    with signal_raises(exc) as send:

        def connect() -> Any:
            if not first.is_set():
                first.set()
                send()
            return scene.server.connect()

        pool = scene.make_pool(connect=connect)
        with pytest.raises(exc):
            pool.connection(timeout=10)
    gate.release()


# -- waiting for a connection -----------------------------------------------------------------


def park_a_waiter(scene: Scene, timeout: float = 10.0, ahead: int = 0) -> Caller:
    """With the pool full and ``ahead`` callers queued already, start a caller and wait until
    it is parked in the queue (behind others, the checkout's fast path queues it)."""
    caller = scene.start(lambda: scene.pool.connection(timeout=timeout))
    wait_until(lambda: scene.pool.stats().waiting == ahead + 1 or caller.done.is_set())
    assert not caller.done.is_set(), f"the caller did not wait: {caller.error!r}"
    wait_parked(caller.thread)
    return caller


def wait_interrupted_at_timeout(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    held = [pool.connection(), pool.connection()]
    caller = park_a_waiter(scene, timeout=1.0)
    async_raise(caller.thread, exc)  # lands when the wait times out
    assert isinstance(caller.outcome(), exc), caller.error
    for lease in held:
        lease.close()


def wait_interrupted_at_hand_over(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    first, second = pool.connection(), pool.connection()
    caller = park_a_waiter(scene)
    async_raise(caller.thread, exc)
    first.close()  # handed to the parked caller, which wakes with the exception pending
    assert isinstance(caller.outcome(), exc)
    second.close()


def behind_another_interrupted_at_timeout(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    held = [pool.connection(), pool.connection()]
    first_in_line = park_a_waiter(scene)
    caller = park_a_waiter(scene, timeout=1.0, ahead=1)
    async_raise(caller.thread, exc)  # lands when the wait times out
    assert isinstance(caller.outcome(), exc), caller.error
    held[0].close()  # lent to the caller first in line
    assert first_in_line.outcome() is None, first_in_line.error
    first_in_line.value.close()
    held[1].close()


def behind_another_interrupted_at_hand_over(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    first, second = pool.connection(), pool.connection()
    first_in_line = park_a_waiter(scene)
    caller = park_a_waiter(scene, ahead=1)
    async_raise(caller.thread, exc)
    first.close()  # lent to the caller first in line
    assert first_in_line.outcome() is None, first_in_line.error
    first_in_line.value.close()  # lent to the caller, which wakes with the exception pending
    assert isinstance(caller.outcome(), exc)
    second.close()


def behind_another_interrupted_at_pool_close(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    held = [pool.connection(), pool.connection()]
    first_in_line = park_a_waiter(scene)
    caller = park_a_waiter(scene, ahead=1)
    async_raise(caller.thread, exc)
    closer = scene.start(lambda: pool.close(timeout=10), "closer")
    assert isinstance(caller.outcome(), exc)
    assert isinstance(first_in_line.outcome(), dbpool.PoolClosed), first_in_line.error
    for lease in held:
        lease.close()
    assert closer.outcome() is None


def wait_interrupted_at_room_grant(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    first, second = pool.connection(), pool.connection()
    raw = scene.raw(first)
    first.cursor().execute("update t set v = 1")
    scene.server.fail_next("rollback", DriverError("connection lost"), conn=raw)
    caller = park_a_waiter(scene)
    async_raise(caller.thread, exc)
    first.close()  # discarded: its room goes to the parked caller, to connect in
    assert isinstance(caller.outcome(), exc)
    scene.banned.append(raw)
    second.close()


def wait_interrupted_at_pool_close(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    held = [pool.connection(), pool.connection()]
    caller = park_a_waiter(scene)
    async_raise(caller.thread, exc)
    closer = scene.start(lambda: pool.close(timeout=10), "closer")
    assert isinstance(caller.outcome(), exc)
    for lease in held:
        lease.close()
    assert closer.outcome() is None


# -- validation at checkout (validate_after=0) -------------------------------------------------


def validation_ping_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool(validate_after=0)
    raw = scene.idle_connection()
    scene.server.fail_next("ping", exc)
    with raises_if(is_base(exc), exc):
        with pool.connection() as lease:  # a driver error: a fresh connection instead
            assert lease.id != raw.id
    scene.banned.append(raw)


def validation_rollback_raises(scene: Scene, exc: Exc) -> None:
    # The rollback that ends the ping (the connection came back unused: nothing else rolls back).
    pool = scene.make_pool(validate_after=0)
    raw = scene.idle_connection()
    scene.server.fail_next("rollback", exc)
    with raises_if(is_base(exc), exc):
        with pool.connection() as lease:
            assert lease.id != raw.id
    scene.banned.append(raw)


def validation_blocked_caller_signalled(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool(validate_after=0)
    raw = scene.idle_connection()
    gate = scene.server.block("ping", conn=raw)
    with signal_raises(exc, when=gate.entered), pytest.raises(exc):
        pool.connection(timeout=10)
    gate.release()
    scene.banned.append(raw)


def validation_discard_close_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool(validate_after=0)
    raw = scene.idle_connection()
    scene.server.fail_next("ping", DriverError("connection lost"), conn=raw)
    scene.server.fail_next("close", exc, conn=raw)
    with raises_if(is_base(exc), exc):
        with pool.connection() as lease:
            assert lease.id != raw.id
    scene.banned.append(raw)


# -- the caller's own calls ----------------------------------------------------------------------


def statement_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    with pytest.raises(exc):
        with pool.connection() as lease:
            raw = scene.raw(lease)
            cursor = lease.cursor()
            scene.server.fail_next("execute", exc)
            cursor.execute("update t set v = 1")
    if is_base(exc):
        scene.banned.append(raw)  # interrupted mid-call: its state is unknown


def commit_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    with pytest.raises(exc):
        with pool.connection() as lease:
            raw = scene.raw(lease)
            lease.cursor().execute("update t set v = 1")
            scene.server.fail_next("commit", exc)
            lease.commit()
    if is_base(exc):
        scene.banned.append(raw)
    else:
        assert not scene.server.in_transaction(raw), "a failed commit's transaction was kept"


def block_raises(scene: Scene, exc: Exc) -> None:
    # The caller's own code raises inside ``with``, after a statement: rolled back and kept.
    pool = scene.make_pool()
    with pytest.raises(exc):
        with pool.connection() as lease:
            raw = scene.raw(lease)
            lease.cursor().execute("update t set v = 1")
            raise boom(exc)
    assert not raw.closed and not scene.server.in_transaction(raw)


# -- reset on return -----------------------------------------------------------------------------


def return_rollback_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    lease = pool.connection()
    raw = scene.raw(lease)
    lease.cursor().execute("update t set v = 1")
    scene.server.fail_next("rollback", exc, conn=raw)
    with raises_if(is_base(exc), exc):
        lease.close()
    assert lease.released
    scene.banned.append(raw)


def return_cursor_close_raises(scene: Scene, exc: Exc) -> None:
    # A cursor left open is closed by the pool on return; the fake's cursors close locally, so
    # the failure is planted on the driver cursor itself.
    pool = scene.make_pool()
    lease = pool.connection()
    raw = scene.raw(lease)
    driver_cursor = lease.cursor().raw

    def failing_close() -> None:
        raise boom(exc)

    driver_cursor.close = failing_close
    with raises_if(is_base(exc), exc):
        lease.close()
    assert lease.released
    scene.banned.append(raw)


def return_discard_close_raises(scene: Scene, exc: Exc) -> None:
    pool = scene.make_pool()
    lease = pool.connection()
    raw = scene.raw(lease)
    lease.cursor().execute("update t set v = 1")
    scene.server.fail_next("rollback", DriverError("connection lost"), conn=raw)
    scene.server.fail_next("close", exc, conn=raw)
    with raises_if(is_base(exc), exc):
        lease.close()
    scene.banned.append(raw)


# -- a lease garbage-collected without release ---------------------------------------------------


def finaliser_interrupted(scene: Scene, exc: Exc) -> None:
    # The finaliser warns (ResourceWarning): under ``-W error`` the warning itself raises there,
    # and a signal may raise at any line of it.  A finaliser cannot pass an exception on; it is
    # reported as unraisable, and the connection must come back all the same.
    pool = scene.make_pool()
    lease = pool.connection()
    with unraisable_exceptions() as reported, warnings.catch_warnings():
        if exc is ResourceWarning:
            warnings.simplefilter("error", ResourceWarning)
        else:
            warnings.simplefilter("always")

            def interrupted(*args: Any, **kwargs: Any) -> None:
                raise boom(exc)

            warnings.showwarning = interrupted
        del lease
        gc.collect()
    assert reported == [exc], f"the finaliser's exception was not reported: {reported}"
    with pool.connection(timeout=2):  # returns the dropped lease first
        pass


@contextlib.contextmanager
def maintenance_failures() -> Iterator[list[str]]:
    """Collect what the maintenance thread logs as its failures while active."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "maintenance failed" in record.getMessage() and record.exc_info:
                seen.append(record.exc_info[0].__name__)  # type: ignore[index, union-attr]

    handler = Collect()
    logging.getLogger("dbpool").addHandler(handler)
    try:
        yield seen
    finally:
        logging.getLogger("dbpool").removeHandler(handler)


def finaliser_return_rollback_raises(scene: Scene, exc: Exc) -> None:
    # The dropped lease's connection is returned by the maintenance thread, which the next
    # acquire wakes, never by that acquire (whose deadline a hung rollback would break): the
    # rollback's exception stays in the maintenance thread, logged, and the caller is served.
    pool = scene.make_pool()
    lease = pool.connection()
    raw = scene.raw(lease)
    lease.cursor().execute("update t set v = 1")  # left open: the return must roll it back
    scene.server.fail_next("rollback", exc, conn=raw)
    with pytest.warns(ResourceWarning, match="without being released"):
        del lease
        gc.collect()
    caught: list[BaseException] = []
    with thread_exceptions() as background, maintenance_failures() as logged:
        try:
            with pool.connection(timeout=2):
                pass
        except BaseException as error:  # checked below
            caught.append(error)
        wait_until(lambda: scene.server.count("rollback", conn=raw) == 1)
        if is_base(exc):
            wait_until(lambda: logged == [exc.__name__], message=f"logged: {logged}")
    scene.banned.append(raw)
    assert caught == [] and background == [], (caught, background)


# -- close racing with returns, connects, and closing idle connections ---------------------------


def close_racing_return(scene: Scene, exc: Exc) -> None:
    # close(timeout) waits for a lease whose return is rolling back; the rollback raises.
    pool = scene.make_pool()
    lease = pool.connection()
    raw = scene.raw(lease)
    lease.cursor().execute("update t set v = 1")
    gate = scene.server.block("rollback", conn=raw)
    returner = scene.start(lease.close, "returner")
    assert gate.entered.wait(5)
    closer = scene.start(lambda: pool.close(timeout=10), "closer")
    wait_until(lambda: pool.closed)
    gate.release(exc)
    error = returner.outcome()
    assert isinstance(error, exc) if is_base(exc) else error is None, error
    assert closer.outcome() is None


def forced_close_racing_return(scene: Scene, exc: Exc) -> None:
    # close(timeout=0) closes the connection under the thread returning it; then its rollback
    # raises.
    pool = scene.make_pool()
    lease = pool.connection()
    raw = scene.raw(lease)
    lease.cursor().execute("update t set v = 1")
    gate = scene.server.block("rollback", conn=raw)
    returner = scene.start(lease.close, "returner")
    assert gate.entered.wait(5)
    pool.close(timeout=0)
    gate.release(exc)
    error = returner.outcome()
    assert isinstance(error, exc) if is_base(exc) else error is None, error


def close_racing_connect(scene: Scene, exc: Exc | None) -> None:
    # close() answers a caller waiting for its connect at once; the connect finishes later, in
    # the pool's own thread, raising ``exc`` (or, with None, succeeding), for nobody.
    pool = scene.make_pool()
    gate = scene.server.block("connect")
    caller = scene.start(lambda: pool.connection(timeout=10))
    assert gate.entered.wait(5)
    closer = scene.start(lambda: pool.close(timeout=10), "closer")
    error = caller.outcome()
    assert isinstance(error, dbpool.PoolClosed), f"{error!r}, expected PoolClosed at once"
    gate.release(exc)
    assert closer.outcome() is None


def close_of_idle_raises(scene: Scene, exc: Exc) -> None:
    # pool.close() closes its idle connections; the first close raises.
    pool = scene.make_pool()
    with pool.connection(), pool.connection():
        pass
    assert pool.stats().idle == 2
    scene.server.fail_next("close", exc)
    with raises_if(is_base(exc), exc):
        pool.close()


# == The table ===================================================================================

Point = Callable[[Scene, Any], None]
K, S, D = KeyboardInterrupt, SystemExit, DriverError
INTERRUPTS: tuple[Exc, ...] = (K, S)
ALL: tuple[Exc, ...] = (K, S, D)

#: (id, what is done at the point, the exceptions injected there; None: no exception)
POINTS: list[tuple[str, Point, tuple[Exc | None, ...]]] = [
    ("connect", connect_raises, ALL),
    ("connect-blocked-caller-interrupted", connect_blocked_caller_interrupted, INTERRUPTS),
    ("connect-blocked-caller-signalled", connect_blocked_caller_signalled, INTERRUPTS),
    ("connect-starting-caller-signalled", connect_starting_caller_signalled, INTERRUPTS),
    ("wait-interrupted-at-timeout", wait_interrupted_at_timeout, INTERRUPTS),
    ("wait-interrupted-at-hand-over", wait_interrupted_at_hand_over, INTERRUPTS),
    ("wait-interrupted-at-room-grant", wait_interrupted_at_room_grant, INTERRUPTS),
    ("wait-interrupted-at-pool-close", wait_interrupted_at_pool_close, INTERRUPTS),
    ("behind-another-interrupted-at-timeout", behind_another_interrupted_at_timeout, INTERRUPTS),
    (
        "behind-another-interrupted-at-hand-over",
        behind_another_interrupted_at_hand_over,
        INTERRUPTS,
    ),
    (
        "behind-another-interrupted-at-pool-close",
        behind_another_interrupted_at_pool_close,
        INTERRUPTS,
    ),
    ("validation-ping", validation_ping_raises, ALL),
    ("validation-rollback", validation_rollback_raises, ALL),
    ("validation-blocked-caller-signalled", validation_blocked_caller_signalled, INTERRUPTS),
    ("validation-discard-close", validation_discard_close_raises, ALL),
    ("statement", statement_raises, ALL),
    ("commit", commit_raises, ALL),
    ("with-block", block_raises, ALL),
    ("return-rollback", return_rollback_raises, ALL),
    ("return-cursor-close", return_cursor_close_raises, ALL),
    ("return-discard-close", return_discard_close_raises, ALL),
    ("finaliser", finaliser_interrupted, (K, S, ResourceWarning)),
    ("finaliser-return-rollback", finaliser_return_rollback_raises, ALL),
    ("close-racing-return", close_racing_return, ALL),
    ("forced-close-racing-return", forced_close_racing_return, ALL),
    ("close-racing-connect", close_racing_connect, (*ALL, None)),
    ("close-of-idle", close_of_idle_raises, ALL),
]


def _exc_id(exc: Exc | None) -> str:
    if exc is None:
        return "no-error"
    return "driver-error" if exc is DriverError else exc.__name__


@pytest.mark.parametrize(
    "point, exc",
    [
        pytest.param(point, exc, id=f"{name}-{_exc_id(exc)}")
        for name, point, excs in POINTS
        for exc in excs
    ],
)
def test_exception_at_point_keeps_the_pool_exact(
    scene: Scene, point: Point, exc: Exc | None
) -> None:
    point(scene, exc)
    if scene.pool.closed:
        assert_closed_clean(scene)
    else:
        assert_sound(scene)
