"""Leases taken before reopen() and still out: drain() and close() treat them as every lease.

docs: drain() "returns once every lease is back and closed"; close() closes leased connections
"as they come back; those still out after timeout seconds are closed under their borrowers", and
after a drain() that timed out, "the leases still out are closed as they come back (or by
close())".  A lease from before reopen() is no longer counted by the reopened pool, but it is
still a lease of this pool.
"""

from __future__ import annotations

from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, assert_accounting, wait_until

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


def test_drain_counts_a_lease_from_before_reopen_held_by_its_own_thread(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    old = _left_out_by_reopen(pool)
    with pytest.raises(dbpool.PoolTimeout, match=r"1 connections are still leased \(1 by this"):
        pool.drain(timeout=0)
    old.close()
