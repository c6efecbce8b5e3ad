"""The contenders: dbpool, its peers and the raw floor, each with one small function per scenario.

Every pool gets the same size and is filled before it is measured; everything else is each
library's default (``SETTINGS`` says which defaults matter).  Peers are imported when their pool
is opened, so a missing one fails alone.
"""

from __future__ import annotations

import threading
from array import array
from collections import deque
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Callable

import dbpool

# -- where connections come from -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """How a pool gets connections: a connect callable, and psycopg_pool's own terms.

    psycopg_pool connects by itself from a DSN, so it takes part only when ``dsn`` is set; it
    then uses ``connection_class`` and calls ``configure`` on each new connection.
    """

    connect: Callable[[], Any]
    dsn: str | None = None
    connection_class: Any = None
    configure: Callable[[Any], None] | None = None


class NullCursor:
    def execute(self, *args: Any) -> None:
        pass

    def fetchall(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class NullError(Exception):
    pass


class NullConnection:
    """A PEP 249 connection that does no I/O: what is left to measure is the pool itself."""

    # What DBUtils reads from a driver: its module-level threadsafety, and the exceptions
    # that mean a lost connection (PEP 249's optional extension).
    threadsafety = 1
    Error = OperationalError = InterfaceError = InternalError = NullError

    def cursor(self) -> NullCursor:
        return NullCursor()

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


NULL_SOURCE = Source(connect=NullConnection)


def one_tx(conn: Any) -> None:
    """The unit of work of ``short_tx``, ``contention`` and ``storm``."""
    cursor = conn.cursor()
    cursor.execute("SELECT 1")
    cursor.fetchall()
    cursor.close()
    conn.commit()


class Tally:
    """Counts connects attempted and the peak of connections open (or being opened) at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts = 0
        self.open = 0
        self.peak = 0

    def opening(self) -> None:
        with self._lock:
            self.attempts += 1
            self.open += 1
            self.peak = max(self.peak, self.open)

    def gone(self) -> None:
        with self._lock:
            self.open -= 1

    def psycopg_class(self) -> Any:
        """A psycopg Connection subclass that reports to this tally (pools detect it as
        psycopg: it is a subclass)."""
        import psycopg

        tally = self

        class TalliedConnection(psycopg.Connection):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                tally.opening()
                try:
                    return super().connect(*args, **kwargs)
                except BaseException:
                    tally.gone()
                    raise

            def close(self) -> None:
                if not self.closed:
                    tally.gone()
                super().close()

        return TalliedConnection


# -- the raw floor -------------------------------------------------------------------------------


class RawFloor:
    """No pool: ``size`` connections, a lock and a deque.  The least any pool can cost."""

    def __init__(self, source: Source, size: int) -> None:
        self.conns = [source.connect() for _ in range(size)]
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.idle = deque(self.conns)
        self.queue: deque[list[Any]] = deque()  # contention_fifo's waiters, oldest first

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def open_raw(source: Source, size: int, prefill: bool) -> RawFloor:
    return RawFloor(source, size)


def cycle_raw(floor: RawFloor, n: int) -> None:
    lock, idle = floor.lock, floor.idle
    for _ in range(n):
        with lock:
            conn = idle.pop()
        with lock:
            idle.append(conn)


def short_tx_raw(floor: RawFloor, n: int) -> None:
    conns = floor.conns
    size = len(conns)
    for i in range(n):
        one_tx(conns[i % size])


def contention_raw(floor: RawFloor, stop: threading.Event, waits: array[float]) -> int:
    cond, idle = floor.cond, floor.idle
    ops = 0
    while not stop.is_set():
        asked = perf_counter()
        with cond:
            while not idle:
                cond.wait()
            conn = idle.pop()
        waits.append(perf_counter() - asked)
        try:
            one_tx(conn)
        finally:
            with cond:
                idle.append(conn)
                cond.notify()
        ops += 1
    return ops


def contention_fifo(floor: RawFloor, stop: threading.Event, waits: array[float]) -> int:
    """The raw floor with strict first-in, first-out hand-off: a returned connection goes to
    the oldest waiter, woken through a lock of its own.  What fairness costs with no pool."""
    lock, idle = floor.lock, floor.idle
    queue: deque[list[Any]] = floor.queue
    ops = 0
    while not stop.is_set():
        asked = perf_counter()
        with lock:
            if idle:
                conn = idle.pop()
                waiter = None
            else:
                waiter = [threading.Lock()]  # the wake-up, then the connection handed over
                waiter[0].acquire()
                queue.append(waiter)
        if waiter is not None:
            waiter[0].acquire()
            conn = waiter[1]
        waits.append(perf_counter() - asked)
        try:
            one_tx(conn)
        finally:
            with lock:
                if queue:
                    waiter = queue.popleft()
                    waiter.append(conn)
                    waiter[0].release()
                else:
                    idle.append(conn)
        ops += 1
    return ops


class FloorLease:
    """The least a lease can be: its connection for a ``with`` block, given back once."""

    __slots__ = ("_floor", "_conn")

    def __init__(self, floor: RawFloor, conn: Any) -> None:
        self._floor = floor
        self._conn = conn

    def __enter__(self) -> Any:
        return self._conn

    def __exit__(self, *exc_info: object) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with self._floor.lock:
                self._floor.idle.append(conn)


def floor_lease(floor: RawFloor) -> FloorLease:
    with floor.lock:
        conn = floor.idle.pop()
    return FloorLease(floor, conn)


def cycle_lease_floor(floor: RawFloor, n: int) -> None:
    for _ in range(n):
        with floor_lease(floor):
            pass


# -- dbpool --------------------------------------------------------------------------------------


def open_dbpool(source: Source, size: int, prefill: bool) -> dbpool.Pool[Any]:
    pool = dbpool.Pool(source.connect, min_size=size if prefill else 0, max_size=size)
    if prefill:
        pool.wait()
    return pool


def cycle_dbpool(pool: dbpool.Pool[Any], n: int) -> None:
    for _ in range(n):
        with pool.connection():
            pass


def short_tx_dbpool(pool: dbpool.Pool[Any], n: int) -> None:
    for _ in range(n):
        with pool.connection() as conn:
            one_tx(conn)


def contention_dbpool(pool: dbpool.Pool[Any], stop: threading.Event, waits: array[float]) -> int:
    ops = 0
    while not stop.is_set():
        asked = perf_counter()
        with pool.connection() as conn:
            waits.append(perf_counter() - asked)
            one_tx(conn)
        ops += 1
    return ops


# -- psycopg_pool --------------------------------------------------------------------------------


def open_psycopg_pool(source: Source, size: int, prefill: bool) -> Any:
    import psycopg
    from psycopg_pool import ConnectionPool

    assert source.dsn is not None, "psycopg_pool takes part only with a psycopg DSN"
    pool = ConnectionPool(
        source.dsn,
        connection_class=source.connection_class or psycopg.Connection,
        configure=source.configure,
        min_size=size if prefill else 0,
        max_size=size,
        open=True,
    )
    if prefill:
        pool.wait()
    return pool


def cycle_psycopg_pool(pool: Any, n: int) -> None:
    for _ in range(n):
        with pool.connection():
            pass


def short_tx_psycopg_pool(pool: Any, n: int) -> None:
    for _ in range(n):
        with pool.connection() as conn:
            one_tx(conn)


def contention_psycopg_pool(pool: Any, stop: threading.Event, waits: array[float]) -> int:
    ops = 0
    while not stop.is_set():
        asked = perf_counter()
        with pool.connection() as conn:
            waits.append(perf_counter() - asked)
            one_tx(conn)
        ops += 1
    return ops


# -- SQLAlchemy QueuePool ------------------------------------------------------------------------


def open_queuepool(source: Source, size: int, prefill: bool) -> Any:
    from sqlalchemy.pool import QueuePool

    connect = source.connect
    pool = QueuePool(lambda: connect(), pool_size=size, max_overflow=0)
    if prefill:  # QueuePool opens on demand: hold `size` connections at once, then return them
        leases = [pool.connect() for _ in range(size)]
        for lease in leases:
            lease.close()
    return pool


def close_queuepool(pool: Any) -> None:
    pool.dispose()


def cycle_queuepool(pool: Any, n: int) -> None:
    for _ in range(n):
        pool.connect().close()


def short_tx_queuepool(pool: Any, n: int) -> None:
    for _ in range(n):
        conn = pool.connect()
        try:
            one_tx(conn)
        finally:
            conn.close()


def contention_queuepool(pool: Any, stop: threading.Event, waits: array[float]) -> int:
    ops = 0
    while not stop.is_set():
        asked = perf_counter()
        conn = pool.connect()
        waits.append(perf_counter() - asked)
        try:
            one_tx(conn)
        finally:
            conn.close()
        ops += 1
    return ops


# -- DBUtils PooledDB ----------------------------------------------------------------------------


def open_pooleddb(source: Source, size: int, prefill: bool) -> Any:
    from dbutils.pooled_db import PooledDB

    connect = source.connect
    return PooledDB(
        lambda: connect(),
        mincached=size if prefill else 0,
        maxcached=size,
        maxconnections=size,
        blocking=True,
    )


def cycle_pooleddb(pool: Any, n: int) -> None:
    for _ in range(n):
        pool.connection().close()


def short_tx_pooleddb(pool: Any, n: int) -> None:
    for _ in range(n):
        conn = pool.connection()
        try:
            one_tx(conn)
        finally:
            conn.close()


def contention_pooleddb(pool: Any, stop: threading.Event, waits: array[float]) -> int:
    ops = 0
    while not stop.is_set():
        asked = perf_counter()
        conn = pool.connection()
        waits.append(perf_counter() - asked)
        try:
            one_tx(conn)
        finally:
            conn.close()
        ops += 1
    return ops


# -- the registry --------------------------------------------------------------------------------


def _close(pool: Any) -> None:
    pool.close()


@dataclass(frozen=True)
class Library:
    name: str
    #: distribution whose version the report shows (None for the raw floor)
    distribution: str | None
    #: the settings used, for the report
    settings: str
    open: Callable[[Source, int, bool], Any]  # (source, size, prefill) -> pool
    close: Callable[[Any], None]
    cycle: Callable[[Any, int], None]
    short_tx: Callable[[Any, int], None]
    contention: Callable[[Any, threading.Event, array[float]], int]
    psycopg_only: bool = False
    is_pool: bool = True


RAW = Library(
    name="raw floor",
    distribution=None,
    settings=(
        "no pool. cycle: a threading.Lock and a deque, take then put; short_tx: the same "
        "number of connections used round-robin; contention: a Condition and a deque"
    ),
    open=open_raw,
    close=_close,
    cycle=cycle_raw,
    short_tx=short_tx_raw,
    contention=contention_raw,
    is_pool=False,
)
# contention only (compare.py runs it nowhere else): cycle and short_tx would be the raw floor's.
FIFO_FLOOR = Library(
    name="FIFO floor",
    distribution=None,
    settings=(
        "no pool, contention only: a Lock and a deque, a returned connection handed to the "
        "oldest waiter through a lock of its own (strict first-in, first-out)"
    ),
    open=open_raw,
    close=_close,
    cycle=cycle_raw,
    short_tx=short_tx_raw,
    contention=contention_fifo,
    is_pool=False,
)
# cycle only: the raw floor with a lease object, what any pool that hands out leases pays.
LEASE_FLOOR = Library(
    name="lease floor",
    distribution=None,
    settings=(
        "no pool, cycle only: the raw floor's lock and deque behind a function that returns a "
        "lease object, whose with block gives the connection back (no clock, no checks, no "
        "counts)"
    ),
    open=open_raw,
    close=_close,
    cycle=cycle_lease_floor,
    short_tx=short_tx_raw,
    contention=contention_raw,
    is_pool=False,
)
DBPOOL = Library(
    name="dbpool",
    distribution="dbpool",
    settings=(
        "Pool(connect, min_size=N, max_size=N), then wait(); defaults otherwise, among them "
        "validate_after=1.0 (a connection idle for over 1 s is pinged at checkout), "
        "acquire_timeout=30, max_lifetime=3600, idle_timeout=600"
    ),
    open=open_dbpool,
    close=_close,
    cycle=cycle_dbpool,
    short_tx=short_tx_dbpool,
    contention=contention_dbpool,
)
PSYCOPG_POOL = Library(
    name="psycopg_pool",
    distribution="psycopg-pool",
    settings=(
        "ConnectionPool(dsn, min_size=N, max_size=N, open=True), then wait(); defaults "
        "otherwise: check=None (no validation), reset=None (rolls back only a connection "
        "returned inside a transaction), timeout=30, max_lifetime=3600, max_idle=600"
    ),
    open=open_psycopg_pool,
    close=_close,
    cycle=cycle_psycopg_pool,
    short_tx=short_tx_psycopg_pool,
    contention=contention_psycopg_pool,
    psycopg_only=True,
)
QUEUEPOOL = Library(
    name="SQLAlchemy QueuePool",
    distribution="SQLAlchemy",
    settings=(
        "QueuePool(creator, pool_size=N, max_overflow=0), filled by N checkouts; defaults "
        "otherwise: reset_on_return='rollback' (rollback() on every return), pre_ping=False, "
        "use_lifo=False, timeout=30"
    ),
    open=open_queuepool,
    close=close_queuepool,
    cycle=cycle_queuepool,
    short_tx=short_tx_queuepool,
    contention=contention_queuepool,
)
POOLEDDB = Library(
    name="DBUtils PooledDB",
    distribution="DBUtils",
    settings=(
        "PooledDB(creator, mincached=N, maxcached=N, maxconnections=N, blocking=True); "
        "defaults otherwise: reset=True (rollback() on every return), ping=1 (the driver's "
        "ping() at every checkout, where it has one: PyMySQL does, psycopg does not)"
    ),
    open=open_pooleddb,
    close=_close,
    cycle=cycle_pooleddb,
    short_tx=short_tx_pooleddb,
    contention=contention_pooleddb,
)

#: In the order of every table; the interleaved rounds run them forward, then backward.
LIBRARIES = (RAW, DBPOOL, PSYCOPG_POOL, QUEUEPOOL, POOLEDDB)
PEERS = (PSYCOPG_POOL, QUEUEPOOL, POOLEDDB)
