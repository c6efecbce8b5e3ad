"""Timeouts that hold while something else is stuck: drain() and close() return by their
timeout while the maintenance thread is held in a close, and a checkout by its deadline while
the return of a dropped lease hangs.  Threads are lined up with fakedb gates and events, never
with sleeps."""

from __future__ import annotations

import gc
import time
import warnings
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, stop_maintenance

# == drain()/close() return by their timeout ====================================================


def _reaper_held_in_a_close(make_pool: Any, server: fakedb.Server) -> tuple[Any, fakedb.Gate]:
    """A pool whose reaper thread is held inside the close of an idle connection it retired."""
    pool = make_pool(min_size=0, max_size=2, idle_timeout=0.05)
    with pool.connection() as conn:
        gate = server.block("close", conn=conn.raw)
    assert gate.entered.wait(5), "the reaper never closed the idle connection"
    return pool, gate


@pytest.mark.parametrize("call", ["drain", "close"])
def test_drain_and_close_end_by_their_timeout_while_the_reaper_is_busy(
    make_pool: Any, server: fakedb.Server, call: str
) -> None:
    # The wait for the maintenance thread is part of the timeout, not added to it: it was
    # timeout + min(timeout, 1 s).
    pool, gate = _reaper_held_in_a_close(make_pool, server)
    try:
        started = time.monotonic()
        try:
            getattr(pool, call)(timeout=1.0)
        except dbpool.PoolTimeout:
            assert call == "drain"  # drain() says what is still out; close() closes it
        elapsed = time.monotonic() - started
    finally:
        gate.release()
    assert elapsed < 1.5, f"{call}(timeout=1.0) took {elapsed:.2f} s"


# == a checkout returns by its deadline ===========================================================


def test_checkout_times_out_by_its_deadline_while_returning_an_orphan(
    make_pool: Any, server: fakedb.Server
) -> None:
    # A lease dropped without close() is returned by the maintenance thread: its rollback,
    # unbounded, is not the next caller's to wait for.
    pool = make_pool(max_size=2, idle_timeout=None, max_lifetime=None)
    stop_maintenance(pool)
    conn = pool.connection()
    conn.cursor().execute("insert into t values (1)")  # a transaction to roll back on return
    gate = server.block("rollback", conn=server.connections[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del conn
        gc.collect()
    assert len(pool._orphans) == 1
    caller = Caller(lambda: pool.connection(timeout=0.2).close(), name="checkout")
    try:
        # A free place (max_size=2, one held by the orphan): the checkout is served, or times
        # out, within its 0.2 s.
        finished = caller.done.wait(0.2 + 0.8)
    finally:
        gate.release()
    caller.outcome()
    assert finished, (
        f"connection(timeout=0.2) still blocked 1 s later (in the orphan's rollback: "
        f"{gate.entered.is_set()})"
    )


# == what close(timeout) leaves behind ==========================================================


def test_a_pymysql_stream_cut_off_by_close_leaves_no_finaliser_errors(mysql_connect: Any) -> None:
    # close(timeout=0) shuts the socket of a lease reading an unbuffered result (SSCursor); when
    # the lease comes back the pool closes the connection.  PyMySQL's cursor and result then
    # tried, as they were collected, to read the rest of the rows from the closed socket:
    # "Exception ignored in ... AttributeError: 'NoneType' object has no attribute 'read'".
    import sys

    import pymysql.cursors

    unraisable: list[Any] = []
    pool = dbpool.Pool(mysql_connect, min_size=1, max_size=1)
    conn = pool.connection()
    cur = conn.cursor(pymysql.cursors.SSCursor)
    cur.execute("select seq from seq_1_to_100000")
    assert cur.fetchone() == (1,)
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        pool.close(timeout=0)
        with pytest.raises(dbpool.PoolError):
            cur.fetchone()  # the lease is cut off: an error, never a quiet end of the rows
        conn.close()
        del cur, conn
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, [(u.object, u.exc_value) for u in unraisable]
    assert pool.stats().size == 0
