"""The pools at interpreter exit, and what the return path restores."""

from __future__ import annotations

from time import monotonic

import pytest

import dbpool
from tests import fakedb

pytestmark = pytest.mark.timeout(30)


def test_the_maintenance_thread_starts_no_refill_once_the_interpreter_exits() -> None:
    # A refill started then stops at once and wakes the maintenance thread, which would start
    # another: threads made one after another for the rest of the exit.
    server = fakedb.Server()
    pool = dbpool.Pool(server.connect, min_size=0, max_size=2)
    try:
        pool._settle_at_exit(monotonic())  # nothing under way: returns at once
        started: list[bool] = []
        pool._start_refill = lambda: started.append(True)  # type: ignore[method-assign]
        with pool._lock:
            pool._min_size = 2  # below it now, as a pool whose refill the exit stopped
        assert pool._maintain(pool._reaper_wakeup) is not None
        assert started == []
    finally:
        pool.close()
