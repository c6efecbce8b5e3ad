"""A return that hands its connection to the oldest queued caller: what the hand-over keeps.

The return leases a connection it cleaned just now to that caller with no check, but only where
a checkout from the idle stack would need none: the ``check`` hook and ``validate_after=0``
still run for a queued caller, a connection cut off or closed meanwhile never reaches it, the
wait counted is the caller's own, and a pool closed meanwhile is said to be closed.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, wait_until

pytestmark = pytest.mark.timeout(60)


def _queue_one(pool: dbpool.Pool[Any]) -> Caller:
    """A caller queued for the pool's only connection; it closes what it gets."""
    waiter = Caller(lambda: pool.connection(timeout=5).close(), name="waiter")
    wait_until(lambda: pool.stats().waiting == 1)
    return waiter


@pytest.mark.parametrize("how", ["check hook", "validate_after=0"])
def test_a_queued_caller_gets_a_connection_checked_as_at_every_checkout(
    make_pool: Any, server: fakedb.Server, how: str
) -> None:
    checked: list[Any] = []
    if how == "check hook":
        pool = make_pool(max_size=1, check=lambda raw: checked.append(raw))
        done = lambda: len(checked)  # noqa: E731
    else:
        pool = make_pool(max_size=1, validate_after=0)
        done = lambda: server.count("ping")  # noqa: E731
    holder = pool.connection()
    before = done()
    waiter = _queue_one(pool)
    holder.close()
    assert waiter.outcome() is None, waiter.error
    assert done() == before + 1, f"{how}: the queued caller's connection was not checked"


def test_the_wait_counted_is_the_queued_callers_own(make_pool: Any) -> None:
    # The return's listener runs before the connection is handed over; a caller that queued
    # meanwhile waited less than the return took, never a negative time.
    pool = make_pool(max_size=1)
    waited: list[float] = []
    pool.add_listener("checkout", lambda event: waited.append(event.duration))
    holder = pool.connection()
    slow = threading.Event()
    go_on = threading.Event()

    def slow_checkin(event: Any) -> None:
        if not slow.is_set():
            slow.set()
            go_on.wait(10)  # until a caller queued meanwhile

    pool.add_listener("checkin", slow_checkin)
    closer = Caller(holder.close, name="returner")
    assert slow.wait(5)
    waiter = _queue_one(pool)  # queued while the return's listener runs
    go_on.set()
    assert closer.outcome() is None and waiter.outcome() is None, waiter.error
    s = pool.stats()
    assert waited[-1] >= 0, f"the caller's wait came out negative: {waited}"
    assert s.wait_time >= 0, s
    assert abs(s.wait_time - sum(waited)) < 1e-9, (s.wait_time, waited)  # as told, every one


@pytest.mark.parametrize("served", ["lent", "validated"])
@pytest.mark.parametrize("stop", ["drain", "close"])
def test_a_pool_stopped_as_the_caller_wakes_up_says_so(
    make_pool: Any,
    server: fakedb.Server,
    monkeypatch: pytest.MonkeyPatch,
    stop: str,
    served: str,
) -> None:
    # drain(), or close() within its timeout, runs between the hand-over and the caller's first
    # step once woken up, or once it validated what it was handed (forced by running it there,
    # in the first step after the validation, the wait's bucket): the caller is told, not lent
    # a lease.
    if served == "lent":
        pool = make_pool(max_size=1)
        module, name = pool, "_granted"  # private: the queued caller's first step once woken
    else:
        pool = make_pool(max_size=1, validate_after=0)
        module, name = dbpool.pool, "wait_bucket"
    told: list[str] = []
    for kind in ("checkout", "checkin"):
        pool.add_listener(kind, lambda event: told.append(event.event.value))
    holder = pool.connection()
    step = getattr(module, name)
    stopper: list[Caller] = []

    def stop_first(*args: Any) -> Any:
        monkeypatch.undo()
        stopping = getattr(pool, stop)
        stopper.append(Caller(lambda: stopping(timeout=5), name=stop))
        wait_until(lambda: pool.closed)
        return step(*args)

    outcome: list[BaseException | None] = []

    def checkout() -> None:
        try:
            pool.connection(timeout=5).close()
        except dbpool.PoolClosed as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    waiter = Caller(checkout, name="waiter")
    wait_until(lambda: pool.stats().waiting == 1)
    monkeypatch.setattr(module, name, stop_first)
    holder.close()
    assert waiter.outcome() is None, waiter.error
    assert stopper and stopper[0].outcome() is None, stopper[0].error if stopper else "no stop"
    assert isinstance(outcome[0], dbpool.PoolClosed), "lent a lease by a closed pool"
    said = {"drain": "was drained while", "close": "was closed while"}[stop]
    assert said in str(outcome[0]), outcome[0]
    s = pool.stats()
    assert (s.in_use, s.acquired - s.returned) == (0, 0), s
    # A checkout counted (as it was handed over, or once validated) is told as one, and its
    # end as a checkin: the events stay as many as the counts
    assert (told.count("checkout"), told.count("checkin")) == (s.acquired, s.returned), told
    assert all(raw.closed for raw in server.connections), "a connection left open"


def test_a_caller_finding_a_closed_pools_queue_is_told_at_once(make_pool: Any) -> None:
    # A close() cut short by a signal handler may leave callers queued; one arriving after
    # that is told the pool is closed, rather than queued behind them until its time runs out.
    pool = make_pool(max_size=1)
    holder = pool.connection()
    queued = _queue_one(pool)
    with pool._lock:  # private: what an interrupted close() leaves, the pool closed, one queued
        pool._closed = True
    with pytest.raises(dbpool.PoolClosed):  # queued, it would time out (PoolTimeout)
        pool.connection(timeout=5)
    assert pool.stats().waiting == 1, "left queued on a closed pool"
    pool.close(timeout=1)  # turns the queued caller away
    assert isinstance(queued.outcome(), (type(None), dbpool.PoolClosed))
    holder.close()


@pytest.mark.parametrize("how", ["ping", "check hook"])
def test_a_caller_whose_handed_connection_fails_validation_keeps_its_place(
    make_pool: Any, server: fakedb.Server, how: str
) -> None:
    """The oldest caller is handed the returned connection, which fails validation (after a
    server restart, say) and is discarded: the room that makes is that caller's to connect
    in, and if it must wait again, it waits ahead of those who came after it.  It used to
    join the queue's end, the room going to the next caller: the first to ask was served
    last, or timed out."""
    failed = threading.Event()

    def check(raw: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise fakedb.OperationalError("server closed the connection")

    if how == "ping":
        pool = make_pool(max_size=1, validate_after=0)
    else:
        pool = make_pool(max_size=1, check=check)
    order: list[str] = []

    def take(name: str) -> None:
        conn = pool.connection(timeout=5)
        order.append(name)
        conn.close()

    holder = pool.connection()
    first = Caller(lambda: take("first"), name="first")
    wait_until(lambda: pool.stats().waiting == 1)
    second = Caller(lambda: take("second"), name="second")
    wait_until(lambda: pool.stats().waiting == 2)
    if how == "ping":
        server.fail_next("ping", fakedb.OperationalError("server closed the connection"))
    holder.close()
    assert first.outcome() is None, first.error
    assert second.outcome() is None, second.error
    assert order == ["first", "second"]
    assert sum(pool.stats().discards.values()) == 1


def test_a_caller_asking_again_queues_by_its_arrival(make_pool: Any) -> None:
    """A checkout that must queue again (its connection failed validation, and the pool may
    not connect just now) joins the queue in order of arrival, ahead of those who came after
    it: here one that asked before the queued caller, queued while the pool is full, is
    served first."""
    from time import monotonic

    pool = make_pool(max_size=1)
    holder = pool.connection()
    asked_first = monotonic()
    order: list[str] = []

    def take_later() -> None:
        conn = pool.connection(timeout=5)
        order.append("later")
        conn.close()

    def ask_again() -> None:
        slot, lent = pool._acquire(5.0, None, asked_first)  # as _ready's failure leads to
        order.append("first")
        pool._untake(slot, counted=lent)

    later = Caller(take_later, name="later")
    wait_until(lambda: pool.stats().waiting == 1)
    again = Caller(ask_again, name="again")
    wait_until(lambda: pool.stats().waiting == 2)
    holder.close()
    assert again.outcome() is None, again.error
    assert later.outcome() is None, later.error
    assert order == ["first", "later"]


def test_max_waiting_does_not_turn_away_a_caller_asking_again(
    make_pool: Any, server: fakedb.Server
) -> None:
    """``max_waiting`` bounds the callers that arrive: one that was served, and must queue
    again because its connection failed validation while connects are held back, keeps its
    admission even when a later caller now fills the queue, and is served first."""
    pool = make_pool(
        max_size=2,
        max_waiting=1,
        validate_after=0,
        reconnect_delay=30,
        reconnect_max_delay=30,
    )
    holder = pool.connection()
    server.fail_next("connect", fakedb.OperationalError("refused"))
    with pytest.raises(fakedb.OperationalError):
        pool.connection()  # the room is there, but connects now wait for the delay
    order: list[str] = []

    def take(name: str) -> None:
        with pool.connection(timeout=5):
            order.append(name)

    first = Caller(lambda: take("first"), name="first")
    wait_until(lambda: pool.stats().waiting == 1)
    ping = server.block("ping")  # the hand-over's validation, as validate_after=0 asks
    server.fail_next("ping", fakedb.OperationalError("gone"))
    holder.close()
    assert ping.entered.wait(5)
    later = Caller(lambda: take("later"), name="later")
    wait_until(lambda: pool.stats().waiting == 1)  # the queue is full again
    ping.release()  # the ping fails: the first caller asks again, and queues
    wait_until(lambda: pool.stats().waiting == 2)
    with pool._lock:  # the delay is over: the next connect serves the queue's head
        pool._next_connect_at = 0.0
    pool._reaper_wakeup.set()
    assert first.outcome() is None, first.error
    assert later.outcome() is None, later.error
    assert order[0] == "first"


def test_the_room_a_failed_validation_made_goes_on_when_its_caller_times_out(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queued caller handed a connection whose ping fails after its own deadline passed
    times out; the room the discard made was kept for it, and is passed on to the next
    queued caller at once rather than left until the background thread's next run."""
    import time

    offset = [0.0]
    monkeypatch.setattr(dbpool.pool, "monotonic", lambda: time.monotonic() + offset[0])
    pool = make_pool(max_size=1, validate_after=0)
    holder = pool.connection()
    first = Caller(lambda: pool.connection(timeout=1).close(), name="first")
    wait_until(lambda: pool.stats().waiting == 1)
    second = Caller(lambda: pool.connection(timeout=60).close(), name="second")
    wait_until(lambda: pool.stats().waiting == 2)
    ping = server.block("ping")
    holder.close()  # handed to the first caller, which pings it
    assert ping.entered.wait(5)
    offset[0] = 2.0  # the first caller's deadline has passed meanwhile
    ping.release(fakedb.OperationalError("server closed the connection unexpectedly"))
    assert isinstance(first.outcome(), dbpool.PoolTimeout), first.error
    s = pool.stats()
    assert s.waiting == 0 and s.size == 1, s  # the second caller connects in the room
    assert second.outcome() is None, second.error
