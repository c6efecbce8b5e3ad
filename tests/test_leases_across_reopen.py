"""Leases taken before reopen() and still out: drain(), close(), the maintenance thread and
resize() treat them as every lease.

docs: drain() "returns once every lease is back and closed"; close() closes leased connections
"as they come back; those still out after timeout seconds are closed under their borrowers", and
after a drain() that timed out, "the leases still out are closed as they come back (or by
close())".  A lease from before reopen() is no longer one of the reopened pool's own connections
(stats() still counts it, as open and in use), but it is still a lease of this pool.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, FakeClock, assert_accounting, wait_until

pytestmark = pytest.mark.timeout(60)


def _left_out_by_reopen(pool: Any) -> Any:
    """A lease still out after a drain() that timed out, and the pool reopened."""
    old = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    return old


def test_close_past_its_timeout_closes_a_lease_from_before_reopen(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=2)
    old = _left_out_by_reopen(pool)
    raw = old.raw
    with pool.connection():
        pass  # the reopened pool has a connection of its own
    pool.close(timeout=0)
    assert raw.closed, "close() left a leased connection open past its timeout"
    assert server.open_connections == []
    with pytest.raises(dbpool.LeaseReleased):
        old.cursor()
    assert old.released
    old.close()  # nothing left to return, nor to close again
    assert_accounting(pool)
    assert pool.stats().size == 0


def test_close_waits_for_a_lease_from_before_reopen(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    old = _left_out_by_reopen(pool)
    closing = Caller(lambda: (pool.close(timeout=60), list(server.open_connections))[1])
    wait_until(lambda: pool.stats().pool_closed)
    assert not closing.done.wait(0.2), "close() returned with a lease still out"
    old.close()
    assert closing.outcome() is None
    assert closing.value == []  # the lease's connection closed as it came back


def test_drain_after_reopen_waits_for_a_lease_from_before(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    old = _left_out_by_reopen(pool)
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    old.close()
    pool.drain(timeout=5)
    assert_accounting(pool)


def test_stats_count_a_lease_from_before_reopen_until_its_connection_is_closed(
    make_pool: Any, server: fakedb.Server
) -> None:
    """It counts against max_size (docs), so the numbers operators read count it too: stats(),
    repr() and the PoolTimeout message said size=1/2 in_use=1 with no room left ("raise
    max_size", "this thread itself holds 2 of them"), and ``closed`` counted its connection
    at reopen(), while it was still open and in use."""
    pool = make_pool(max_size=2)
    old = _left_out_by_reopen(pool)
    s = assert_accounting(pool)
    assert (s.size, s.in_use, s.created, s.closed) == (1, 1, 1, 0), s
    assert s.acquired - s.returned == s.in_use, s
    new = pool.connection()
    try:
        s = assert_accounting(pool)
        assert (s.size, s.in_use, s.created, s.closed) == (2, 2, 2, 0), s
        assert s.created - s.closed == len(server.open_connections) == 2
        assert "size=2 idle=0 in_use=2" in repr(pool)
        with pytest.raises(dbpool.PoolTimeout, match=r"size=2/2 in_use=2 "):
            pool.connection(timeout=0)
        old.close()  # closed as it comes back: counted then
        s = assert_accounting(pool)
        assert (s.size, s.in_use, s.created, s.closed) == (1, 1, 2, 1), s
        assert s.created - s.closed == len(server.open_connections) == 1
    finally:
        new.close()
        old.close()


def test_close_past_its_timeout_cuts_off_a_sqlite_lease_from_before_reopen(
    sqlite_pools: Any,
) -> None:
    """sqlite3 may crash when closed under a call in another thread: the lease is cut off and
    refuses use, and its connection is closed when it comes back."""
    pool = sqlite_pools(max_size=1)
    old = _left_out_by_reopen(pool)
    raw = old.raw
    pool.close(timeout=0)
    with pytest.raises(dbpool.LeaseReleased):
        old.cursor()
    old.close()
    with pytest.raises(Exception, match="closed"):
        raw.execute("SELECT 1")
    assert pool.stats().size == 0


@pytest.mark.parametrize("rollback", ["succeeds", "fails"])
def test_a_lease_being_returned_as_the_pool_is_reopened_is_counted_as_returned(
    make_pool: Any, server: fakedb.Server, rollback: str
) -> None:
    """A lease from before reopen() is counted in ``returned`` as it comes back (docs); one
    whose return was rolling back when drain() timed out and reopen() ran is one too.  The
    return path found its connection no longer the pool's and closed it without counting it:
    ``returned`` and ``held_time`` missed it, whether its rollback succeeded or failed."""
    pool = make_pool(max_size=1)
    lease = pool.connection()
    lease.cursor().execute("update t set v = 1")
    raw = lease.raw
    gate = server.block("rollback", conn=raw)
    returning = Caller(lease.close, name="return")
    try:
        assert gate.entered.wait(5)
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
        pool.reopen()
    finally:
        gate.release(
            fakedb.OperationalError("rollback failed (test)") if rollback == "fails" else None
        )
    assert returning.outcome() is None
    s = pool.stats()
    assert (s.acquired, s.returned) == (1, 1), s
    assert s.held_time > 0, s
    assert raw.closed
    assert_accounting(pool)


def test_drain_counts_a_lease_from_before_reopen_held_by_its_own_thread(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    old = _left_out_by_reopen(pool)
    with pytest.raises(dbpool.PoolTimeout, match=r"1 connection still leased \(1 by this"):
        pool.drain(timeout=0)
    old.close()


# -- maintenance of a pool drained again after reopen(), and resize() ----------------------------
# The maintenance thread keeps running while only a lease from before reopen() is out, and
# resize() counts such a lease against max_size.


def record_runs(pool: Any) -> list[Any]:
    """The delay returned by each run of the maintenance thread (``None``: it ended).  The
    thread looks ``pool._maintain`` up on the instance at each run, so this wraps it there."""
    delays: list[Any] = []
    original: Callable[[threading.Event], Any] = pool._maintain

    def maintain(wakeup: threading.Event) -> Any:
        delay = original(wakeup)
        delays.append(delay)
        return delay

    pool._maintain = maintain
    return delays


def drain_again_after_reopen(pool: Any) -> Any:
    """Lease a connection, drain (timing out), reopen, drain again (timing out): the lease from
    before reopen() is the only one out.  Returns the lease, once the maintenance thread has
    run at least once after the second drain."""
    lease = _left_out_by_reopen(pool)
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    delays = record_runs(pool)
    pool._reaper_wakeup.set()
    wait_until(lambda: delays, message="the maintenance thread did not run")
    return lease


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_lease_from_before_reopen_dropped_after_a_timed_out_drain_is_closed(
    make_pool: Any, server: fakedb.Server
) -> None:
    """After drain() timed out, the leases still out are closed as they come back, and the
    maintenance thread keeps running to take back those garbage-collected unreleased: a lease
    taken before a reopen() is such a lease too.  The thread ended as soon as no connection of
    the current generation was out, so the dropped lease's connection stayed open on the
    server for as long as the drained pool lived."""
    pool = make_pool(max_size=2)
    lease = drain_again_after_reopen(pool)
    raw = lease.raw
    del lease  # the borrower goes away without releasing it
    gc.collect()
    wait_until(
        lambda: raw.closed,
        timeout=3,
        message=f"the dropped lease's connection was never closed: {pool.stats()}",
    )


def test_a_lease_from_before_reopen_is_reported_as_held_too_long_while_drained_again(
    make_pool: Any, server: fakedb.Server, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """leak_timeout reports are made while the pool is drained and for leases taken before a
    reopen() (docs/configuration.rst): both at once too."""
    caplog.set_level(logging.WARNING, logger="dbpool")
    pool = make_pool(max_size=2, leak_timeout=10.0)
    lease = drain_again_after_reopen(pool)
    try:
        clock.advance(11)
        pool._reaper_wakeup.set()
        wait_until(
            lambda: "longer than leak_timeout" in caplog.text,
            timeout=3,
            message=f"the lease was never reported: {pool.stats()}",
        )
        assert pool.stats().leak_warnings == 1
    finally:
        lease.close()


def test_lowering_max_size_counts_a_lease_from_before_reopen(
    make_pool: Any, server: fakedb.Server
) -> None:
    """resize() lowering max_size closes the idle connections above the new cap at once; a
    lease from before a reopen() counts against max_size until it comes back, so with it out,
    two idle connections and max_size lowered to 2, one idle connection must go.  resize()
    compared the cap with the current generation's connections only, and closed none: three
    connections stayed open with max_size=2."""
    pool = make_pool(max_size=3)
    old = _left_out_by_reopen(pool)
    try:
        first, second = pool.connection(), pool.connection()
        first.close()
        second.close()
        pool.resize(max_size=2)
        assert len(server.open_connections) == 2, (
            f"{len(server.open_connections)} connections open with max_size=2: {pool.stats()}"
        )
        assert pool.stats().discards["resized"] == 1
    finally:
        old.close()
    assert len(server.open_connections) == 1


def test_a_lease_returned_over_the_lowered_max_size_counts_a_lease_from_before_reopen(
    make_pool: Any, server: fakedb.Server
) -> None:
    """The same cap for leases coming back: with max_size lowered to 2 while a lease from
    before reopen() and two current leases are out, the first current lease to come back is
    closed (leased ones above the cap go as they come back), not kept idle."""
    pool = make_pool(max_size=3)
    old = _left_out_by_reopen(pool)
    try:
        first, second = pool.connection(), pool.connection()
        pool.resize(max_size=2)
        first.close()
        assert len(server.open_connections) == 2, (
            f"{len(server.open_connections)} connections open with max_size=2: {pool.stats()}"
        )
        second.close()  # now within the cap: kept
        s = pool.stats()
        assert (s.idle, s.discards["resized"]) == (1, 1), s
    finally:
        old.close()


def test_a_refill_finished_over_the_lowered_max_size_counts_a_lease_from_before_reopen(
    make_pool: Any, server: fakedb.Server
) -> None:
    """And for a connection the background refill finishes opening after resize() lowered
    max_size: with a lease from before reopen() filling the lowered cap, it is closed rather
    than kept idle."""
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(5)
    old = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    gate = server.block("connect")
    pool.reopen()  # the refill to min_size starts, and its connect is held
    try:
        assert gate.entered.wait(5)
        pool.resize(max_size=1)  # the lease from before reopen() fills it
        gate.release()
        # The refill's connection is kept idle, or let go as resized (then closed).
        wait_until(lambda: pool.stats().idle or pool.stats().discards["resized"])
        s = pool.stats()
        assert (s.idle, s.discards["resized"]) == (0, 1), f"kept over max_size=1: {s}"
        wait_until(lambda: len(server.open_connections) == 1)
    finally:
        gate.release()
        old.close()
