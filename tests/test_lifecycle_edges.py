"""Lifecycle and maintenance edges: drain() then a dropped lease, wait() and resize(), reopen()
and max_size, idle reaping next to an expired lease.

Time is moved with a fake clock (the pool module's ``monotonic``, shifted by the test) where a
timeout or a lifetime must pass, and tests wait on conditions (``wait_until``, events, gates).
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, FakeClock, count_maintenance, wait_until

pytestmark = pytest.mark.timeout(60)


# == A lease dropped after drain() timed out is taken back =======================================


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_lease_dropped_after_a_timed_out_drain_is_taken_back_and_closed(
    make_pool: Any, server: fakedb.Server
) -> None:
    """docs/behaviour.rst: after drain() timed out, the leases still out "are closed as they come
    back"; and a lease garbage-collected without release comes back through the background
    thread, which must therefore outlive drain() while leases are out: else the dropped
    lease's connection stays open on the server, and counted in ``in_use``, for as long as the
    drained pool lives."""
    pool = make_pool(max_size=2)
    lease = pool.connection()
    raw = lease.raw
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0.5)  # (it joins the maintenance thread, which ends: pool closed)
    del lease  # the borrower goes away without releasing it, e.g. its thread died
    gc.collect()
    wait_until(
        lambda: raw.closed and pool.stats().in_use == 0,
        timeout=3,
        message=(
            f"the dropped lease's connection was never taken back: closed={raw.closed}, "
            f"stats={pool.stats()}"
        ),
    )


# == wait() notices resize() lowering min_size ===================================================


def test_wait_returns_once_resize_lowers_min_size_to_what_is_open(
    make_pool: Any, server: fakedb.Server
) -> None:
    """pool.wait() blocks "until min_size connections are open" and re-reads min_size when
    its condition is notified: resize() must notify it, or a wait() already satisfied by the
    new min_size sleeps on until a connect finishes or its whole timeout passes (30 s by
    default) while connects hang or fail."""
    gate = server.block("connect")  # the refill's first connect hangs (a server coming back)
    pool = make_pool(min_size=2, max_size=2)
    waiter = None
    try:
        assert gate.entered.wait(5)
        waiter = Caller(lambda: pool.wait(timeout=20), name="wait")
        wait_until(lambda: pool._cond._waiters, message="wait() is not blocked yet")
        pool.resize(min_size=0)  # 0 connections open satisfy min_size=0
        assert waiter.done.wait(3), "wait() still blocked although min_size=0 is met"
        assert waiter.error is None
    finally:
        gate.release()
        if waiter is not None:
            waiter.outcome()


# == reopen() after a timed-out drain() keeps to max_size ========================================


def test_reopen_after_a_timed_out_drain_keeps_to_max_size(
    make_pool: Any, server: fakedb.Server
) -> None:
    """docs/configuration.rst: max_size is "the hard cap on connections the pool has open at
    once, counting those lent out ... It is never exceeded".  The leases still out after a
    drain() that timed out keep working until returned: the reopened pool counts them against
    max_size until then, or with max_size=1 two of its connections would be open at once."""
    pool = make_pool(max_size=1)
    old = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    new = None
    try:
        new = pool.connection(timeout=0.2)
    except dbpool.PoolTimeout:
        pass  # what a pool that keeps to its cap does while the old lease is out
    try:
        open_now = server.open_connections
        assert len(open_now) <= pool.max_size, (
            f"{len(open_now)} connections open with max_size={pool.max_size}: {open_now}"
        )
    finally:
        if new is not None:
            new.close()
        old.close()


# == Idle reaping does not count a leased, expired connection toward min_size ====================


def test_idle_reaping_does_not_count_an_expired_lease_toward_min_size(
    make_pool: Any, server: fakedb.Server, clock: FakeClock
) -> None:
    """The surplus idle reaping may close is ``size - min_size`` less every connection past
    max_lifetime, leased ones included (closed as they come back).  With min_size=1, a lease
    past its lifetime and an idle connection past idle_timeout, the idle connection is the one
    min_size needs, and stays; else both go and the pool reconnects."""
    pool = make_pool(min_size=1, max_size=3, idle_timeout=10.0, max_lifetime=100.0)
    pool.wait(5)
    old = pool.connection()  # the refill's connection, opened at t0, held throughout
    clock.advance(50)
    young = pool.connection()  # opened at t0 + 50
    young_raw = young.raw
    young.close()  # idle from t0 + 50
    runs = count_maintenance(pool)
    clock.advance(60)  # t0 + 110: `old` past max_lifetime (leased); `young` idle for 60 s
    before = runs()
    pool._reaper_wakeup.set()
    wait_until(lambda: runs() >= before + 2, message="the reaper did not run")
    old.close()  # past its lifetime: closed as it comes back
    assert pool.stats().discards["expired"] == 1
    s = pool.stats()
    assert not young_raw.closed, (
        f"closed the idle connection min_size needed for a lease about to expire: {s}"
    )
