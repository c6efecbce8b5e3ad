"""Recovery from server-side failures, against real servers, through the public API only.

* The server kills idle connections (``pg_terminate_backend`` on PostgreSQL, ``KILL
  CONNECTION`` on MariaDB): the next borrowers never see the dead ones, which are counted as
  discarded; with ``validate_after=0`` always, with the default threshold as soon as the pool
  has met one broken connection.
* The server restarts (``pg_ctl restart``, fast and immediate) under 32 threads running short
  transactions on a pool of 8, on a throwaway cluster (tests/pgcluster.py): the pool never
  exceeds ``max_size``, callers only see connection errors, timeouts and unknown commit
  outcomes, reconnects back off instead of stampeding, every committed row is there, and once
  the server is back every transaction succeeds and no connection from before the restart is
  used again.
* The server is down when the pool is made: the pool is made anyway, ``wait()`` and checkouts
  fail with the connect error, and the pool fills itself once the server starts.

Every test is bounded in time and waits on conditions, never on sleeps; durations are printed,
and asserted only with bounds wide enough to mean "it did not hang".
"""

from __future__ import annotations

import re
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from time import monotonic
from typing import Any

import psycopg
import pytest

import dbpool
from tests.conftest import Backend, wait_until
from tests.pgcluster import PgCluster, StopMode, pg_cluster  # noqa: F401

pytestmark = pytest.mark.timeout(30)

SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql", marks=pytest.mark.mysql),
]

CONNECT_TIMEOUT = 3  # seconds; libpq's minimum is 2
RECONNECT_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0
RECOVERY_BOUND = 10.0  # seconds: recovery slower than this counts as a hang

# What a caller may see while the server restarts: its connection breaking (psycopg raises
# OperationalError subclasses such as AdminShutdown, or InterfaceError once it is closed), no
# connection within the acquire timeout, or a COMMIT whose outcome is unknown.
EXPECTED_DURING_OUTAGE = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    dbpool.PoolTimeout,
    dbpool.CommitOutcomeUnknown,
)
CONNECTS_FAILING = re.compile(r"connects (to the database )?are failing")


def fetch(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    """Run one statement on a lease; its rows as a list of tuples."""
    cur = conn.cursor()
    try:
        cur.execute(sql)
        return [tuple(row) for row in cur.fetchall()] if cur.description else []
    finally:
        cur.close()


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@pytest.fixture
def cluster(pg_cluster: PgCluster) -> PgCluster:  # noqa: F811 - the imported fixture
    """The throwaway cluster, running (an earlier test may have left it stopped)."""
    pg_cluster.ensure_running()
    return pg_cluster


# -- 1. the server kills idle connections ----------------------------------------------------


def _fill_and_kill(
    pool: dbpool.Pool[Any], db: Backend, *, keep: int = 0
) -> tuple[set[Any], list[dbpool.Connection[Any]]]:
    """Lease every connection of a full pool at once, return all but ``keep`` of them, then
    kill every one's session from a second connection.  The killed session ids, and the
    leases kept."""
    pool.wait(timeout=10)
    leases = [pool.connection() for _ in range(pool.max_size)]
    victims = [lease.raw for lease in leases]
    for lease in leases[keep:]:
        lease.close()
    assert pool.stats().idle == pool.max_size - keep
    killed = {db.backend_id(raw) for raw in victims}
    assert len(killed) == pool.max_size
    for raw in victims:
        db.kill(raw)
    return killed, leases[:keep]


def _lease_all_and_query(pool: dbpool.Pool[Any], db: Backend) -> set[Any]:
    """Lease ``max_size`` connections at once, run a statement on each; their session ids."""
    leases: list[dbpool.Connection[Any]] = []
    try:
        for _ in range(pool.max_size):
            leases.append(pool.connection(timeout=10))
            assert fetch(leases[-1], "select 1") == [(1,)]
        return {db.backend_id(lease) for lease in leases}
    finally:
        for lease in leases:
            lease.close()


@pytest.mark.parametrize("db", SERVERS, indirect=True)
def test_idle_connections_killed_by_the_server_are_never_handed_out(db: Backend) -> None:
    with dbpool.Pool(db.connect, min_size=4, max_size=4, validate_after=0) as pool:
        killed, _ = _fill_and_kill(pool, db)

        fresh = _lease_all_and_query(pool, db)  # the caller sees no error

        assert not fresh & killed
        s = pool.stats()
        assert s.discarded == 4
        assert s.in_use == 0 and s.size <= s.max_size


@pytest.mark.parametrize("db", SERVERS, indirect=True)
def test_default_validation_checks_idle_connections_once_a_broken_one_is_found(
    db: Backend,
) -> None:
    # With the default validate_after (1 s), a connection returned a moment ago is handed out
    # unchecked; one borrower meeting a dead connection makes the pool check every connection
    # returned before that, so nobody else meets one.
    with dbpool.Pool(db.connect, min_size=4, max_size=4) as pool:
        killed, [held] = _fill_and_kill(pool, db, keep=1)
        with pytest.raises(db.driver.Error):  # it was leased when its session was killed
            fetch(held, "select 1")
        held.close()
        assert pool.stats().discarded == 1

        fresh = _lease_all_and_query(pool, db)  # the caller sees no error

        assert not fresh & killed
        s = pool.stats()
        assert s.discarded == 4
        assert s.in_use == 0 and s.size <= s.max_size


# -- 2. the server restarts under load -------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    started: float
    ok: bool


class RecordingConnect:
    """A pool's connect callable (psycopg 3) that records every attempt: when it started, whether
    it worked, and how many ran at once.  It keeps every connection it made, so ``id()`` of a
    connection identifies it for the whole test, and remembers when each was asked for."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.running = 0
        self.most_running = 0
        self._made: dict[int, tuple[float, psycopg.Connection[Any]]] = {}

    def __call__(self) -> psycopg.Connection[Any]:
        started = monotonic()
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        conn = None
        try:
            conn = psycopg.connect(self._dsn, connect_timeout=CONNECT_TIMEOUT)
            return conn
        finally:
            with self._lock:
                self.running -= 1
                self.attempts.append(Attempt(started, conn is not None))
                if conn is not None:
                    self._made[id(conn)] = (started, conn)

    def failed_since(self, since: float) -> bool:
        """Whether an attempt that started at or after ``since`` failed."""
        with self._lock:
            return any(not a.ok and a.started >= since for a in self.attempts)

    def made_at(self, conn: Any) -> float:
        """When the connect that made ``conn`` started."""
        with self._lock:
            return self._made[id(conn)][0]

    def close_all(self) -> None:
        with self._lock:
            made, self._made = list(self._made.values()), {}
        for _, conn in made:
            conn.close()


@pytest.fixture
def recording_connect(cluster: PgCluster) -> Iterator[RecordingConnect]:
    connect = RecordingConnect(cluster.dsn)
    yield connect
    connect.close_all()


@dataclass(frozen=True)
class Outcome:
    """One transaction run by a worker."""

    worker: int
    seq: int
    started: float
    ended: float
    error: Exception | None
    conn_made_at: float | None  # when the connection it ran on was made, if it got one


def busiest_window(times: list[float], width: float) -> int:
    """The most of ``times`` that fall within any interval ``width`` seconds long."""
    ordered = sorted(times)
    best = low = 0
    for high, t in enumerate(ordered):
        while t - ordered[low] >= width:
            low += 1
        best = max(best, high - low + 1)
    return best


class Load:
    """``threads`` workers running short write transactions on ``pool`` until stopped, and a
    monitor sampling ``pool.stats()`` for broken invariants."""

    def __init__(
        self, pool: dbpool.Pool[Any], connect: RecordingConnect, table: str, threads: int
    ) -> None:
        self._pool = pool
        self._connect = connect
        self._table = table
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self.violations: list[dbpool.PoolStats] = []
        self.largest = 0
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]
        self._monitor = threading.Thread(target=self._watch, name="load-monitor", daemon=True)

    def start(self) -> None:
        self._monitor.start()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        deadline = monotonic() + timeout
        for thread in [*self._threads, self._monitor]:
            thread.join(timeout=max(deadline - monotonic(), 0))
        stuck = [t.name for t in [*self._threads, self._monitor] if t.is_alive()]
        assert not stuck, f"still running {timeout:g} s after the load was stopped: {stuck}"

    def successes_since(self, since: float) -> dict[int, int]:
        """Per worker, how many of its transactions started at or after ``since`` committed."""
        counts = dict.fromkeys(range(len(self._threads)), 0)
        with self._lock:
            for outcome in self.outcomes:
                if outcome.started >= since and outcome.error is None:
                    counts[outcome.worker] += 1
        return counts

    def all_succeeded_since(self, since: float, times: int) -> bool:
        return min(self.successes_since(since).values()) >= times

    def _work(self, worker: int) -> None:
        insert = f"INSERT INTO {self._table} (worker, seq) VALUES (%s, %s)"
        seq = 0
        while not self._stop.is_set():
            seq += 1
            started = monotonic()
            made_at = None
            error: Exception | None = None
            try:
                with self._pool.transaction() as tx:
                    made_at = self._connect.made_at(tx.connection.raw)
                    tx.execute("SELECT 1")
                    tx.execute(insert, (worker, seq))
            except Exception as exc:  # every error is checked by the test
                error = exc
            outcome = Outcome(worker, seq, started, monotonic(), error, made_at)
            with self._lock:
                self.outcomes.append(outcome)

    def _watch(self) -> None:
        while not self._stop.wait(0.005):  # sampling period, not synchronisation
            s = self._pool.stats()
            self.largest = max(self.largest, s.size)
            if not (s.size <= s.max_size and s.size == s.idle + s.in_use + s.opening):
                self.violations.append(s)


THREADS = 32
MAX_SIZE = 8
HELD_DOWN = 1.0  # seconds the server stays down in the variant that holds it down


def _outage(
    cluster: PgCluster, connect: RecordingConnect, mode: StopMode, hold: bool
) -> tuple[float, float]:
    """Restart the server; with ``hold``, keep it down until a connect has failed ``HELD_DOWN``
    seconds into the outage, so the backoff goes through several steps.  When it went down
    and when it was back (accepting connections)."""
    down = monotonic()
    if not hold:
        cluster.restart(mode)
        return down, monotonic()
    cluster.stop(mode)
    wait_until(
        lambda: connect.failed_since(down + HELD_DOWN),
        timeout=HELD_DOWN + 5,
        message="the pool stopped trying to connect while the server was down",
    )
    cluster.start()
    return down, monotonic()


@pytest.mark.postgresql
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "hold"),
    [("fast", False), ("immediate", False), ("immediate", True)],
    ids=["restart-fast", "restart-immediate", "stop-immediate-hold-start"],
)
def test_restart_under_load(
    cluster: PgCluster, recording_connect: RecordingConnect, mode: StopMode, hold: bool
) -> None:
    table = "recovery_load"
    with psycopg.connect(cluster.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (worker int, seq int, PRIMARY KEY (worker, seq))")

    pool = dbpool.Pool(
        recording_connect,
        min_size=2,
        max_size=MAX_SIZE,
        acquire_timeout=5.0,
        reconnect_delay=RECONNECT_DELAY,
        reconnect_max_delay=RECONNECT_MAX_DELAY,
        name=f"restart-{mode}{'-held' if hold else ''}",
    )
    with pool:
        load = Load(pool, recording_connect, table, THREADS)
        load.start()
        try:
            before = monotonic()
            wait_until(
                lambda: load.all_succeeded_since(before, 2),
                timeout=20,
                message="the load did not get going",
            )
            down, up = _outage(cluster, recording_connect, mode, hold)
            wait_until(
                lambda: load.all_succeeded_since(up, 3),
                timeout=RECOVERY_BOUND + 5,
                message="some worker had no 3 transactions succeed after the restart",
            )
        finally:
            load.stop(timeout=20)
        s = pool.stats()
        assert s.in_use == 0 and s.waiting == 0
        assert s.size <= s.max_size

    outcomes = load.outcomes
    attempts = recording_connect.attempts
    errors = [o.error for o in outcomes if o.error is not None]
    unexpected = [e for e in errors if not isinstance(e, EXPECTED_DURING_OUTAGE)]
    after = [o for o in outcomes if o.started >= up]
    failed_after = [o.error for o in after if o.error is not None]
    stale_after = [o for o in after if o.conn_made_at is not None and o.conn_made_at < down]
    during = [a for a in attempts if down <= a.started <= up]
    busiest = busiest_window([a.started for a in attempts], RECONNECT_DELAY / 2)
    recovery = max(
        min(o.ended for o in after if o.worker == w and o.error is None) - up
        for w in range(THREADS)
    )
    print(
        f"\n{mode} {'stop/start' if hold else 'restart'}: outage {up - down:.3f} s, "
        f"{len(outcomes)} transactions, {len(errors)} errors "
        f"({sorted({type(e).__name__ for e in errors})}), connect attempts during the outage "
        f"{len(during)} ({sum(not a.ok for a in during)} failed), at most "
        f"{recording_connect.most_running} at once, {busiest} in the busiest "
        f"{RECONNECT_DELAY / 2:g} s; every worker recovered {recovery:.3f} s after the server "
        f"was back; {s}"
    )

    # The pool never grew past max_size, and the driver was never asked for more at once.
    assert not load.violations, load.violations[:3]
    assert load.largest <= MAX_SIZE
    assert recording_connect.most_running <= MAX_SIZE
    # Callers saw only what a restart explains.
    assert not unexpected, [traceback_text(e) for e in unexpected[:3]]
    # Once the server was back: no errors, and nothing from before the restart was used again.
    assert not failed_after, [traceback_text(e) for e in failed_after[:3]]
    assert not stale_after, stale_after[:3]
    assert not [a for a in attempts if a.started > up and not a.ok]
    assert recovery < RECOVERY_BOUND
    # No herd: while connects failed they were spaced by the backoff.  Besides at most one
    # attempt per delay, only the attempts already under way when the first failure came in
    # (at most one per slot) and the refill once the server was back (the same) are allowed for.
    assert len(during) <= 2 * MAX_SIZE + (up - down) / RECONNECT_DELAY
    assert busiest <= MAX_SIZE + 1

    # Every committed transaction is there; nothing else is, but for unknown outcomes.
    committed = {(o.worker, o.seq) for o in outcomes if o.error is None}
    unknown = {
        (o.worker, o.seq) for o in outcomes if isinstance(o.error, dbpool.CommitOutcomeUnknown)
    }
    with psycopg.connect(cluster.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as admin:
        rows = set(admin.execute(f"SELECT worker, seq FROM {table}").fetchall())
        admin.execute(f"DROP TABLE {table}")
    assert committed <= rows
    assert rows <= committed | unknown


# -- 3. the server is down when the pool is made ---------------------------------------------


@pytest.mark.postgresql
def test_pool_made_while_the_server_is_down_fills_itself_once_it_starts(
    cluster: PgCluster, recording_connect: RecordingConnect
) -> None:
    cluster.stop()
    with dbpool.Pool(
        recording_connect,
        min_size=2,
        max_size=4,
        reconnect_delay=RECONNECT_DELAY,
        reconnect_max_delay=RECONNECT_MAX_DELAY,
    ) as pool:  # no connect error escapes the constructor
        with pytest.raises(dbpool.PoolTimeout, match=CONNECTS_FAILING) as waited:
            pool.wait(timeout=1.0)
        assert isinstance(waited.value.__cause__, psycopg.OperationalError)

        with pytest.raises((psycopg.OperationalError, dbpool.PoolTimeout)) as checkout:
            pool.connection(timeout=0.5)
        if isinstance(checkout.value, dbpool.PoolTimeout):
            assert CONNECTS_FAILING.search(str(checkout.value)), checkout.value
        assert pool.stats().connect_errors >= 1

        cluster.start()
        wait_until(
            lambda: pool.stats().idle >= pool.min_size,
            timeout=RECOVERY_BOUND,
            message="the pool did not fill itself after the server started",
        )
        with pool.connection(timeout=5) as conn:
            assert fetch(conn, "select 1") == [(1,)]
        s = pool.stats()
        assert s.in_use == 0 and s.size <= s.max_size
