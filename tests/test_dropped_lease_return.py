"""A lease garbage-collected unreleased is given back by the maintenance thread, which rolls its
transaction back.  On a network that stopped answering that rollback never ends; the thread
gives it a bounded time (``_ORPHAN_RETURN_TIME``, patched down here), then shuts the connection
down and discards it, and maintenance goes on: the pool refills to ``min_size``, queued callers
are served, idle connections are checked.

The real servers sit behind :class:`tests.faultproxy.FaultProxy`; once it blackholes, the pool's
connect callable goes straight to the server, so that only the dropped lease's connection is
stuck.  The fake driver shows what the servers cannot force: a rollback that ends normally just
as its connection is shut down, a time that runs out once the connection is back with a new
borrower, and the order of the maintenance thread's work.  Threads are lined up with gates and
events, never with sleeps.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects import Dialect
from tests import fakedb
from tests.conftest import Link, wait_until
from tests.faultproxy import Mode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def short_return_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dbpool.pool, "_ORPHAN_RETURN_TIME", 0.2)


def drop(lease: list[Any]) -> None:
    """Let go of the only reference to a lease, unreleased, and collect it."""
    with pytest.warns(ResourceWarning, match="without being released"):
        lease.clear()
        gc.collect()


# == a real server behind a blackholed network ==================================================


class Rerouted:
    """Connects through the proxy until ``bypass()``, then straight to the server."""

    def __init__(self, link: Link, direct: Callable[[], Any]) -> None:
        self._link = link
        self._direct = direct
        self.bypassed = False
        self.direct: list[Any] = []  # connections made straight to the server

    def __call__(self) -> Any:
        if not self.bypassed:
            return self._link.connect()
        conn = self._direct()
        self.direct.append(conn)
        return conn

    def bypass(self) -> None:
        self.bypassed = True


@pytest.fixture
def rerouted(request: pytest.FixtureRequest, link: Link) -> Rerouted:
    direct = request.getfixturevalue("pg_connect" if link.name == "postgresql" else "mysql_connect")
    return Rerouted(link, direct)


def stranded_lease(pool: dbpool.Pool[Any], link: Link, rerouted: Rerouted) -> None:
    """A lease with a transaction open, dropped unreleased once its network stopped answering;
    later connects bypass that network."""
    pool.wait(timeout=10)  # min_size opened through the proxy
    lease = [pool.connection(timeout=10)]
    lease[0].cursor().execute("SELECT 1")  # opens a transaction (a snapshot) to roll back
    link.proxy.set_mode(Mode.BLACKHOLE)
    rerouted.bypass()
    drop(lease)


def test_the_pool_refills_while_a_dropped_lease_cannot_be_rolled_back(
    link: Link, rerouted: Rerouted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dbpool")
    with dbpool.Pool(rerouted, min_size=1, max_size=2) as pool:
        stranded_lease(pool, link, rerouted)
        # The maintenance thread, on its own schedule, tries the rollback, cuts it off, and
        # opens the connection min_size needs.
        wait_until(lambda: pool.stats().idle == 1, message=f"no refill: {pool.stats()}")
        s = pool.stats()
        assert (s.size, s.in_use, s.leaked, s.discarded) == (1, 0, 1, 1), s
        with pool.connection(timeout=5) as conn:
            assert conn.raw in rerouted.direct, "the stranded connection was reused"
            conn.cursor().execute("SELECT 1")
    assert any("was still being taken back" in r.getMessage() for r in caplog.records)


def test_a_queued_caller_is_served_while_a_dropped_lease_cannot_be_rolled_back(
    link: Link, rerouted: Rerouted
) -> None:
    with dbpool.Pool(rerouted, min_size=0, max_size=1) as pool:
        stranded_lease(pool, link, rerouted)
        # The dropped lease holds the only place; the caller queued for it gets it once the
        # connection is discarded, and connects.
        with pool.connection(timeout=5) as conn:
            assert conn.raw in rerouted.direct, "the stranded connection was reused"
            conn.cursor().execute("SELECT 1")
        s = pool.stats()
        assert (s.leaked, s.discarded, s.timeouts) == (1, 1, 0), s


# == the fake driver ============================================================================


class Severable(Dialect):
    """The generic dialect, for a driver whose sever() ends a rollback held at its gate: with
    ``error`` as a shut-down socket would, or normally (``None``), as a rollback that completed
    just as its socket was shut down."""

    name = "severable"

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.gates: dict[int, fakedb.Gate] = {}
        self.severed: list[Any] = []

    def hold_rollback(self, server: fakedb.Server, raw: Any) -> None:
        self.gates[raw.id] = server.block("rollback", conn=raw)

    def sever(self, conn: Any) -> None:
        self.severed.append(conn)
        gate = self.gates.get(conn.id)
        if gate is not None:
            gate.release(self.error)


def test_a_connection_whose_rollback_ends_as_it_is_cut_off_is_not_reused(
    make_pool: Any, server: fakedb.Server
) -> None:
    dialect = Severable(error=None)
    pool = make_pool(max_size=1, dialect=dialect)
    lease = [pool.connection()]
    lease[0].cursor().execute("insert into t values (1)")
    dropped = server.connections[-1]
    dialect.hold_rollback(server, dropped)
    drop(lease)
    with pool.connection(timeout=3) as conn:  # queued: the dropped lease holds the only place
        assert conn.raw is not dropped, "a connection shut down on its return was handed out"
    assert dialect.severed == [dropped]
    s = pool.stats()
    assert (s.leaked, s.discarded, s.idle) == (1, 1, 1), s
    wait_until(lambda: dropped.closed)  # closed by the maintenance thread, once counted off


def test_a_return_whose_time_runs_out_once_the_connection_is_back_leaves_it_alone(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The time runs out after the connection went back, here to the queued caller, but before
    # the return has ended: it is not shut down under the borrower who has it now.
    monkeypatch.setattr(dbpool.pool, "_ORPHAN_RETURN_TIME", 1.0)  # the cleaning takes less
    dialect = Severable(error=None)
    pool = make_pool(max_size=1, dialect=dialect)
    time_up = threading.Event()
    cut_off, give_back = pool._cut_off, pool._give_back

    # Private methods, wrapped: the watchdog's call when the time is up, and the maintenance
    # thread's return, held once it has handed the connection over, until then.
    def late_cut_off(*args: Any) -> None:
        cut_off(*args)
        time_up.set()

    def lingering_give_back(*args: Any) -> None:
        give_back(*args)
        if threading.current_thread().name.startswith("dbpool-reaper"):
            time_up.wait(5)

    monkeypatch.setattr(pool, "_cut_off", late_cut_off)
    monkeypatch.setattr(pool, "_give_back", lingering_give_back)
    lease = [pool.connection()]
    lease[0].cursor().execute("insert into t values (1)")
    dropped = server.connections[-1]
    drop(lease)
    with pool.connection(timeout=5) as conn:  # queued: the dropped lease holds the only place
        assert conn.raw is dropped
        assert time_up.wait(5)
        conn.cursor().execute("select 1")
    assert dialect.severed == [], "a connection was shut down under its next borrower"
    s = pool.stats()
    assert (s.leaked, s.discarded, s.idle) == (1, 0, 1), s


def test_the_maintenance_thread_checks_idle_connections_between_two_cut_off_returns(
    make_pool: Any, server: fakedb.Server
) -> None:
    # Each return is cut off after the time allowed, and once that time has passed the others
    # wait for the next run: a burst of dropped leases on a dead network does not hold up the
    # rest of the maintenance, here the pings of the idle connection older than the broken ones.
    dialect = Severable(error=fakedb.OperationalError("the socket was shut down"))
    pool = make_pool(max_size=3, dialect=dialect)
    leases = [pool.connection(), pool.connection()]
    with pool.connection():
        pass  # an idle connection, returned before the dropped ones break
    first, second, idle = server.connections
    leases[0].cursor().execute("insert into t values (1)")
    leases[1].cursor().execute("insert into t values (1)")
    for raw in (first, second):
        dialect.hold_rollback(server, raw)
    drop(leases)

    def rollbacks() -> list[int]:
        return [i for i, c in enumerate(server.calls) if c.verb == "rollback" and c.error]

    wait_until(lambda: len(rollbacks()) == 2)
    pings = [i for i, c in enumerate(server.calls) if c.verb == "ping" and c.conn_id == idle.id]
    a, b = rollbacks()
    assert any(a < i < b for i in pings), f"the idle connection was not checked in between: {pings}"
    # One snapshot: the sweep after the second cut-off may be pinging the idle one again.
    s = wait_until(lambda: (s := pool.stats()).discarded == 2 and s.in_use == 0 and s)
    assert (s.leaked, s.idle) == (2, 1), s
    assert sorted(c.id for c in dialect.severed) == sorted([first.id, second.id])


# == a lease dropped in a frame that a connect error passed through ============================


def test_a_lease_dropped_where_a_connect_failed_comes_back(tmp_path: Any) -> None:
    """The pool keeps the last connect error (later timeouts are chained to it); the caller's
    frames that error passed through, the one holding an unreleased lease among them, must not
    be kept with it: the lease would not come back until the next connect."""
    import sqlite3

    paths = iter([tmp_path / "app.sqlite3", tmp_path / "missing" / "app.sqlite3"])
    with dbpool.Pool(
        lambda: sqlite3.connect(next(paths), check_same_thread=False),
        min_size=0,
        max_size=2,
        reconnect_delay=60,  # no connect after the failed one: the lease must come back alone
        reconnect_max_delay=60,
    ) as pool:

        def handler() -> None:
            lease = pool.connection()  # left to the garbage collector when the frame goes
            lease.cursor().execute("select 1")
            pool.connection()  # needs a connect, which fails

        def returned() -> dbpool.PoolStats | None:
            # The connect thread holds the error until it ends: collected once it has
            gc.collect()
            s = pool.stats()
            return s if s.in_use == 0 else None

        with pytest.warns(ResourceWarning, match="without being released"):
            with pytest.raises(sqlite3.OperationalError, match="unable to open"):
                handler()
            s = wait_until(returned)
        assert (s.leaked, s.idle, s.connect_errors) == (1, 1, 1), s
        with pool.connection() as conn:  # the connection the dropped lease held, reused
            assert conn.cursor().execute("select 1").fetchall() == [(1,)]
