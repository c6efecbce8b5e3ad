"""Cases first seen in randomized runs that mix leases, transactions, drains and network faults
on psycopg2 and mysqlclient, each reduced to a deterministic test on the fake driver.

Threads that must block run through :class:`tests.conftest.Caller` and are held by Events;
every wait is bounded.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

import dbpool
from tests.conftest import Caller, assert_accounting

pytestmark = pytest.mark.timeout(60)

BOUND = 10.0  # seconds: what should happen at once, and has not by then, is a hang


class Validation:
    """A ``check`` hook that holds the checkout of the thread named ``taker`` until let go."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go_on = threading.Event()

    def __call__(self, raw: Any) -> None:
        if threading.current_thread().name == "taker":
            self.started.set()
            assert self.go_on.wait(BOUND)


def returned_then_taken(make_pool: Any) -> tuple[dbpool.Pool[Any], Validation, Caller]:
    """A pool of one connection, which this thread leased and returned, and which another
    thread has now taken and is validating."""
    validation = Validation()
    pool = make_pool(min_size=0, max_size=1, check=validation)
    pool.connection().close()

    def take() -> None:
        with pool.connection():
            pass

    taker = Caller(take, name="taker")
    assert validation.started.wait(BOUND)
    return pool, validation, taker


def test_a_returned_connection_is_not_counted_as_held_by_its_last_borrower_on_timeout(
    make_pool: Any,
) -> None:
    # The advice about nested acquires is for a thread that holds a lease itself.
    pool, validation, taker = returned_then_taken(make_pool)
    try:
        with pytest.raises(dbpool.PoolTimeout) as info:
            pool.connection(timeout=0)
        assert "this thread itself holds" not in str(info.value)
    finally:
        validation.go_on.set()
    assert taker.outcome(BOUND) is None
    s = assert_accounting(pool)
    assert (s.in_use, s.idle) == (0, 1), s


def test_drain_does_not_count_a_returned_connection_as_held_by_this_thread(
    make_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dbpool")
    pool, validation, taker = returned_then_taken(make_pool)
    try:
        with pytest.raises(dbpool.PoolTimeout) as info:
            pool.drain(timeout=0)
        assert "by this thread" not in str(info.value)
        assert not [r for r in caplog.records if "by this thread" in r.getMessage()]
    finally:
        validation.go_on.set()
    # Drained while its check ran: told so, not lent the connection.
    assert isinstance(taker.outcome(BOUND), dbpool.PoolClosed)
    s = assert_accounting(pool)
    assert (s.size, s.in_use) == (0, 0), s
