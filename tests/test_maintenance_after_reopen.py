"""The maintenance of a pool drained again after reopen() while a lease from before the
reopen() is still out, and resize() counting such a lease against max_size.

Tests wait on conditions (``wait_until``) and on the maintenance thread's runs, never on sleeps.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import FakeClock, wait_until

pytestmark = pytest.mark.timeout(60)


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
    lease = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
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


def reopen_with_a_lease_out(pool: Any) -> Any:
    """Lease a connection, drain (timing out) and reopen: return that lease, which counts
    against max_size until it comes back."""
    lease = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    return lease


def test_lowering_max_size_counts_a_lease_from_before_reopen(
    make_pool: Any, server: fakedb.Server
) -> None:
    """resize() lowering max_size closes the idle connections above the new cap at once; a
    lease from before a reopen() counts against max_size until it comes back, so with it out,
    two idle connections and max_size lowered to 2, one idle connection must go.  resize()
    compared the cap with the current generation's connections only, and closed none: three
    connections stayed open with max_size=2."""
    pool = make_pool(max_size=3)
    old = reopen_with_a_lease_out(pool)
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
    old = reopen_with_a_lease_out(pool)
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
