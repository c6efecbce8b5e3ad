"""The maintenance thread (reaper, refill, backoff), resize() and drain() racing with closes
in flight, and fork after reopen().

Time is moved with a fake clock (the pool module's ``monotonic``, shifted forward by the test),
interleavings are forced with fakedb gates, and the tests wait on conditions (``wait_until``),
never on sleeps.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import pytest

import dbpool
import dbpool.pool as pool_module
from tests import fakedb
from tests.conftest import Caller, FakeClock, scalar, wait_for_child, wait_until

pytestmark = pytest.mark.timeout(60)


def record_maintenance(pool: Any) -> list[tuple[float, Any]]:
    """Record (clock time at return, returned delay) of every run of the reaper.  The reaper
    looks ``pool._maintain`` up on the instance at each run, so this wraps it there."""
    runs: list[tuple[float, Any]] = []
    original: Callable[[threading.Event], Any] = pool._maintain

    def maintain(wakeup: threading.Event) -> Any:
        delay = original(wakeup)
        runs.append((pool_module.monotonic(), delay))
        return delay

    pool._maintain = maintain
    return runs


# == 1. The reaper polls every 5 ms while a refill's connect hangs ==============================


def test_reaper_does_not_spin_while_a_refill_connect_hangs(
    make_pool: Any, server: fakedb.Server, clock: FakeClock
) -> None:
    """Below min_size after a failed connect, the refill's next connect hangs (a server coming
    back, a blackholed SYN).  Once its backoff delay has passed, _tick() returns its 5 ms floor
    (``next_connect_at - now`` is negative) although _maintain() cannot start anything while
    ``_refilling`` is set: the reaper wakes 200 times a second for as long as the connect hangs.
    Expected: it sleeps its normal tick (1 s here) until the refill ends."""
    server.down()
    pool = make_pool(min_size=2, max_size=2, reconnect_delay=30.0, reconnect_max_delay=30.0)
    wait_until(lambda: pool.stats().connect_errors >= 1)
    runs = record_maintenance(pool)
    gate = server.block("connect")
    server.up()
    clock.advance(31)  # past the backoff delay: the reaper starts the refill, whose connect hangs
    pool._reaper_wakeup.set()
    assert gate.entered.wait(5)
    clock.advance(31)  # past the delay the refill set as it started
    after = clock()
    pool._reaper_wakeup.set()
    wait_until(lambda: [r for r in runs if r[0] >= after], message="the reaper did not run")
    delays = [delay for at, delay in runs if at >= after]
    gate.release()
    assert min(delays) >= 0.5, f"the reaper polls while nothing can start: {delays[:5]}"


# == 2. The reaper closes an idle connection that min_size needs ================================


def test_idle_reaping_never_goes_below_min_size_when_another_connection_expires(
    make_pool: Any, server: fakedb.Server, clock: FakeClock
) -> None:
    """_pick_retired_locked() computes the surplus above min_size once, before it retires the
    expired connections, so one connection expiring and another idle too long are both
    closed: the pool drops to 0 with min_size=1, then reconnects.  The idle one was the one
    min_size needed: only the expired one should go."""
    pool = make_pool(min_size=1, max_size=3, idle_timeout=10.0, max_lifetime=100.0)
    pool.wait(5)
    old = pool.connection()  # the refill's connection, opened at t0
    clock.advance(50)
    young = pool.connection()  # opened at t0 + 50
    young_raw = young.raw
    old.close()
    young.close()  # both idle from t0 + 50
    clock.advance(60)  # t0 + 110: `old` past max_lifetime; both idle past idle_timeout
    pool._reaper_wakeup.set()
    wait_until(lambda: pool.stats().discards["expired"] == 1)
    s = pool.stats()
    assert s.discards["idle"] == 0, f"closed an idle connection min_size needed: {s.discards}"
    assert not young_raw.closed


# == 3. drain() returns while a connection resize() let go is still open ==========================


def test_drain_waits_for_the_connections_resize_is_closing(
    make_pool: Any, server: fakedb.Server
) -> None:
    """resize() lowering max_size forgets the surplus idle connections and closes them itself,
    but never puts them in ``_closing`` (the reaper, discards and returns all do), so drain()
    (and close()) do not wait for them: drain() reports success while a connection of the pool
    is still open on the server.  Expected: drain() waits for that close, or raises
    PoolTimeout past its timeout like it does for every other close in flight."""
    pool = make_pool(max_size=3)
    first, second = pool.connection(), pool.connection()
    first.close()
    second.close()
    gate = server.block("close")  # the close resize() makes hangs
    resizer = Caller(lambda: pool.resize(max_size=1), name="resize")
    try:
        assert gate.entered.wait(5)
        try:
            pool.drain(timeout=0.2)
        except dbpool.PoolTimeout:
            pass  # what a fix may do: the close in flight is still running
        else:
            assert not server.open_connections, (
                f"drain() returned with connections still open: {server.open_connections}"
            )
    finally:
        gate.release()
        assert resizer.outcome() is None


# == 4. A forked child closes a connection the parent is still using ===========================


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
def test_forked_child_never_closes_a_lease_from_before_reopen(pg_connect: Any) -> None:
    """A lease still out when drain() timed out belongs to no generation once reopen() ran:
    reopen() drops it from ``_everyone``, so _after_fork_in_child() never marks it inherited.
    When the forked child lets that lease go, _close_if_retired() closes the driver
    connection, which sends PostgreSQL's Terminate on the socket the parent still uses: the
    parent's session (and its open transaction) dies.  Expected: the child drops it untouched,
    as it does every other inherited connection."""
    pool = dbpool.Pool(pg_connect, min_size=0, max_size=2, name="fork-after-reopen")
    try:
        lease = pool.connection()
        assert scalar(lease, "select 1") == 1
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
        pool.reopen()
        pid = os.fork()
        if pid == 0:  # the child: let the inherited lease go, as leaving a with block does
            code = 1
            try:
                lease.close()
                code = 0
            finally:
                os._exit(code)
        assert wait_for_child(pid, timeout=20) == 0
        try:
            assert scalar(lease, "select 2") == 2, "the parent's session is gone"
        except Exception as exc:
            pytest.fail(f"the child closed the parent's connection: {exc!r}")
        finally:
            lease.close()
    finally:
        pool.close(timeout=1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
def test_forked_child_can_add_listeners_though_the_parent_was_adding_one(
    make_pool: Any,
) -> None:
    """The listeners' lock, held by a thread of the parent (adding a listener) at the fork,
    was inherited held: add_listener() in the child waited forever."""
    pool = make_pool()
    pool._listeners._lock.acquire()  # as a parent thread inside add_listener() at the fork
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                adder = threading.Thread(
                    target=pool.add_listener, args=("checkout", lambda *a: None), daemon=True
                )
                adder.start()
                adder.join(10)
                code = 1 if adder.is_alive() else 0
            finally:
                os._exit(code)
        assert wait_for_child(pid, timeout=30) == 0, "add_listener() hung in the child"
    finally:
        pool._listeners._lock.release()
