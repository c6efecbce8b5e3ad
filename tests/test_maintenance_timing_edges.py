"""The maintenance thread and time: the reconnect backoff after a connect that raised a
BaseException, and leak reports (``leak_timeout``) for leases still out while the pool is
drained and after it was reopened.

Time is moved with a fake clock (the pool module's ``monotonic``, shifted forward by the test);
the tests wait on conditions (``wait_until``), never on sleeps.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import FakeClock, count_maintenance, wait_until

pytestmark = pytest.mark.timeout(60)


def run_maintenance(pool: Any, runs: Callable[[], int], times: int = 2) -> None:
    """Wake the reaper and wait until it has run ``times`` more times."""
    for _ in range(times):
        target = runs() + 1
        pool._reaper_wakeup.set()
        wait_until(lambda target=target: runs() >= target, message="the reaper did not run")


# == A connect that raised a BaseException is backed off from ===================================


class Aborted(BaseException):
    """What a connect callable, a hook or a listener may raise that is no Exception: SystemExit,
    gevent's Timeout, a framework's own."""


def make_failing_pool(make_pool: Any, server: fakedb.Server, where: str) -> tuple[Any, list[int]]:
    attempts: list[int] = []

    def connect() -> Any:
        attempts.append(1)
        if where == "connect":
            raise Aborted("the connect callable gave up")
        return server.connect()

    def configure(raw: Any) -> None:
        if where == "configure":
            raise Aborted("configure gave up")

    def listener(event: Any) -> None:
        if where == "listener":
            raise Aborted("a connect listener gave up")

    pool = make_pool(
        connect=connect,
        configure=configure,
        max_size=2,
        reconnect_delay=30.0,
        reconnect_max_delay=30.0,
    )
    pool.add_listener("connect", listener)
    pool.resize(min_size=1)  # the refill connects
    return pool, attempts


@pytest.mark.parametrize("where", ["connect", "configure", "listener"])
def test_a_connect_that_raised_a_base_exception_is_retried_after_the_backoff_delay(
    make_pool: Any, server: fakedb.Server, where: str
) -> None:
    """docs/configuration.rst: a configure hook that raises fails the connect, "connect_errors
    grows ... and the reconnect backoff applies".  A BaseException that is no Exception
    (SystemExit, gevent's Timeout) from the connect callable, configure or a connect listener
    was not counted: no backoff followed, and the refill below min_size started again as soon
    as it ended, thousands of connects a second, each logged."""
    pool, attempts = make_failing_pool(make_pool, server, where)
    wait_until(
        lambda: pool.stats().connect_errors == 1,
        message="the failed connect was not counted in connect_errors",
    )
    runs = count_maintenance(pool)
    run_maintenance(pool, runs, times=3)
    assert len(attempts) == 1, f"{len(attempts)} connects within the 30 s backoff delay"
    s = pool.stats()
    assert (s.size, s.opening, s.connect_errors) == (0, 0, 1), s


def test_a_caller_is_told_of_a_connect_that_raised_a_base_exception_when_it_times_out(
    make_pool: Any,
) -> None:
    """While connects back off, a caller queues; when its time runs out, the PoolTimeout says
    connects are failing and chains the last failure, whatever it was."""

    def connect() -> Any:
        raise Aborted("the connect callable gave up")

    pool = make_pool(connect=connect, reconnect_delay=30.0, reconnect_max_delay=30.0)
    with pytest.raises(Aborted):
        pool.connection(timeout=5)
    with pytest.raises(dbpool.PoolTimeout, match="connects to the database are failing") as info:
        pool.connection(timeout=0.05)
    assert isinstance(info.value.__cause__, Aborted)


# == Leases held too long are reported while the pool is drained, and after reopen() ===========


def hold_a_lease_across_a_drain(pool: Any) -> Any:
    return pool.connection()


def leak_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "longer than leak_timeout" in r.getMessage()]


def test_a_lease_held_while_the_pool_is_drained_is_reported_as_held_too_long(
    make_pool: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """drain() waits for every lease to come back, so a lease held too long is the one the
    report's stack should point at; but the maintenance thread of a drained pool only took
    back dropped leases, and reported none."""
    caplog.set_level(logging.WARNING, logger="dbpool")
    pool = make_pool(leak_timeout=60.0)
    lease = hold_a_lease_across_a_drain(pool)
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    runs = count_maintenance(pool)
    report = _reported_past_leak_timeout(
        pool, clock, caplog, "the drained pool never reported the lease held past leak_timeout"
    )
    assert "hold_a_lease_across_a_drain" in report, report
    run_maintenance(pool, runs)
    assert pool.stats().leak_warnings == 1, "reported more than once"
    lease.close()
    assert any("came back after" in r.getMessage() for r in caplog.records)


def _reported_past_leak_timeout(
    pool: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture, message: str
) -> str:
    """Move the clock past leak_timeout (60 s), wake the maintenance thread, and return the one
    report it logs."""
    clock.advance(61)
    pool._reaper_wakeup.set()
    # Counted, then logged, by the maintenance thread: wait for the record itself.
    wait_until(lambda: bool(leak_reports(caplog)), message=message)
    [report] = leak_reports(caplog)
    assert pool.stats().leak_warnings == 1
    return report


def hold_a_lease_across_reopen(pool: Any) -> Any:
    return pool.connection()


def test_a_lease_taken_before_reopen_is_reported_as_held_too_long_once(
    make_pool: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A lease still out when reopen() runs is no longer counted, but its borrower still holds
    it: leak_timeout applies to it as to any lease (it was never reported), once, and its
    return says how long it was out."""
    caplog.set_level(logging.WARNING, logger="dbpool")
    pool = make_pool(leak_timeout=60.0)
    lease = hold_a_lease_across_reopen(pool)
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    runs = count_maintenance(pool)
    report = _reported_past_leak_timeout(
        pool, clock, caplog, "the lease from before reopen() was never reported past leak_timeout"
    )
    assert "hold_a_lease_across_reopen" in report, report
    lease.close()
    assert any("came back after" in r.getMessage() for r in caplog.records)
    clock.advance(61)
    run_maintenance(pool, runs)
    assert pool.stats().leak_warnings == 1, "reported again, or after it came back"
