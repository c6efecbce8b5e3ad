"""Observability at its edges: events, counters and log lines on the less common paths (a failed
health() ping, a lease out across reopen(), leases close() ends, a checkout undone by a listener
that raised, a discard while the pool drains, a checkout timing out in validation, a transaction
whose end fails).

Interleavings are forced with fakedb gates, Events and wait_until, never with sleeps.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, FakeClock, Recorder, wait_until

pytestmark = pytest.mark.timeout(30)


def dbpool_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dbpool"]


# == health(): a lease whose ping failed fires CHECKIN, as every lease that comes back ===========


def test_health_with_a_failing_ping_emits_checkin_for_the_lease_it_checked_out(
    make_pool: Any, server: fakedb.Server
) -> None:
    # validate_after=None: the checkout itself sends no ping; health()'s own ping is the one
    # that fails.
    pool = make_pool(max_size=1, validate_after=None)
    with pool.connection():
        pass
    rec = Recorder().listen_to_all(pool)
    server.fail_on("ping", fakedb.OperationalError("fakedb: server closed the connection"))

    report = pool.health(timeout=1)

    assert report["ok"] is False and report["reachable"] is False
    kinds = rec.kinds()
    # The idle one, then (it was older than the probe) one opened for it
    assert kinds.count("checkout") == 2, kinds
    assert kinds.count("discard") == kinds.count("close") == 2, kinds
    stats = pool.stats()
    assert stats.returned == 3, stats  # the stats count the health leases as come back ...
    # ... and every other lease that comes back, broken or not, fires CHECKIN first: a
    # listener pairing CHECKOUT with CHECKIN (a span, an in-flight gauge) is left with one
    # lease out forever per failed health check.
    assert kinds.count("checkin") == kinds.count("checkout"), kinds


# == A lease out across drain() and reopen() is counted as it comes back, with a CHECKIN =========


def test_a_lease_taken_before_reopen_is_counted_as_returned_and_fires_checkin(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=2)
    rec = Recorder().listen_to_all(pool)
    lease = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)  # a deploy: the lease is still out
    pool.reopen()  # "with the same options and counters"

    lease.close()  # the borrower gives it back: the pool closes it, as documented

    assert wait_until(lambda: server.open_connections == [])
    kinds = rec.kinds()
    assert kinds.count("checkout") == 1 and "close" in kinds, kinds
    stats = pool.stats()
    assert stats.acquired == 1, stats
    # It came back, and was held for a while; the stats say neither, and no CHECKIN fired:
    # acquires_total - returns_total (leases out) stays off by one for good after the deploy.
    assert stats.returned == 1 and stats.held_time > 0, stats
    assert kinds.count("checkin") == 1, kinds


# == Leases that close() ends past its timeout are counted as returned ==========================


@pytest.mark.parametrize("driver", ["fake", "sqlite"])  # closed under the borrower, or left open
def test_leases_close_ends_past_its_timeout_are_counted_as_returned(
    make_pool: Any, server: fakedb.Server, sqlite_connect: Any, driver: str
) -> None:
    pool = make_pool(max_size=3, connect=server.connect if driver == "fake" else sqlite_connect)
    before_reopen = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    after_reopen = pool.connection()

    pool.close(timeout=0)  # ends both leases: conn.released is true for them now

    assert before_reopen.released and after_reopen.released
    s = pool.stats()
    # Every lease is over: acquired - returned is the number still out, 0, as in_use says.
    assert (s.acquired, s.returned, s.in_use) == (2, 2, 0), s
    assert s.held_time > 0, s
    before_reopen.close()  # the borrowers let go: nothing more to count
    after_reopen.close()
    s = pool.stats()
    assert (s.acquired, s.returned, s.in_use) == (2, 2, 0), s


@pytest.mark.parametrize("driver", ["fake", "sqlite"])  # closed under the borrower, or left open
@pytest.mark.parametrize("leased", ["now", "before reopen"])
def test_leases_close_ends_past_its_timeout_fire_one_checkin_each(
    make_pool: Any, server: fakedb.Server, sqlite_connect: Any, driver: str, leased: str
) -> None:
    pool = make_pool(max_size=2, connect=server.connect if driver == "fake" else sqlite_connect)
    rec = Recorder().listen_to_all(pool)
    lease = pool.connection()
    raw = lease.raw
    if leased == "before reopen":
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
        pool.reopen()

    pool.close(timeout=0)  # the lease ends here, counted in returned

    assert lease.released
    # Every CHECKOUT has its CHECKIN, told as the lease ends, before its connection's CLOSE:
    # a tracing span or an in-flight gauge that pairs them is not left open for good.
    kinds = rec.kinds()
    assert kinds.count("checkout") == kinds.count("checkin") == pool.stats().returned == 1, kinds
    (checkin,) = rec.of("checkin")
    assert checkin.connection is raw
    assert checkin.duration is not None and checkin.duration >= 0
    if driver == "fake":  # sqlite3's is left open for its borrower to close
        assert kinds.index("checkin") < kinds.index("close"), kinds
    pool.release(lease)  # the borrower lets go: nothing to refuse, nothing more to tell
    lease.close()
    assert rec.kinds().count("checkin") == 1, rec.kinds()
    assert rec.kinds().count("close") == 1, rec.kinds()
    assert pool.stats().returned == 1


def test_a_health_ping_close_cuts_off_fires_one_checkin(
    make_pool: Any, server: fakedb.Server
) -> None:
    # close() ends the lease health() pings (and tells its CHECKIN), shutting its socket
    # down: the ping fails, and health() gives back a lease already ended.
    pool = make_pool(max_size=1, validate_after=None)
    with pool.connection():
        pass
    rec = Recorder().listen_to_all(pool)
    gate = server.block("ping")
    checking = Caller(lambda: pool.health(timeout=5))
    assert gate.entered.wait(5)
    closing = Caller(lambda: pool.close(timeout=0))
    wait_until(lambda: rec.kinds().count("checkin") == 1)
    gate.release(fakedb.OperationalError("fakedb: connection shut down"))
    assert checking.outcome() is None and closing.outcome() is None
    assert checking.value["ok"] is False

    kinds = rec.kinds()
    assert kinds.count("checkout") == kinds.count("checkin") == 1, kinds
    s = pool.stats()
    assert (s.acquired, s.returned, s.in_use) == (2, 2, 0), s


@pytest.mark.parametrize("served", ["at once", "after a ping"])
def test_a_checkout_close_ends_before_its_lease_is_made_fires_checkin_after_checkout(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, served: str
) -> None:
    # close() lands between the checkout's count and the lease it makes: the caller is lent an
    # ended lease, and its CHECKIN is told as that lease comes back, after its CHECKOUT.
    pool = make_pool(max_size=2, validate_after=None if served == "at once" else 0)
    with pool.connection():
        pass
    rec = Recorder().listen_to_all(pool)
    make_lease = dbpool.pool.lease

    def close_first(*args: Any) -> Any:
        monkeypatch.undo()
        pool.close(timeout=0)
        return make_lease(*args)

    monkeypatch.setattr(dbpool.pool, "lease", close_first)
    lease = pool.connection()
    assert lease.released
    assert rec.kinds().count("checkin") == 0, rec.kinds()
    lease.close()
    lease.close()
    kinds = [k for k in rec.kinds() if k in ("checkout", "checkin")]
    assert kinds == ["checkout", "checkin"], rec.kinds()


@pytest.mark.parametrize("served", ["at once", "after a ping"])
def test_a_checkout_close_ends_before_its_lease_is_made_is_counted_as_returned(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, served: str
) -> None:
    # close() past its timeout, in another thread, lands between the checkout's count and the
    # lease it makes (forced here by running it as the lease is made): that checkout is
    # counted in acquired, so close() must count it as returned, as it does a lease.
    pool = make_pool(max_size=2, validate_after=None if served == "at once" else 0)
    with pool.connection():
        pass
    make_lease = dbpool.pool.lease

    def close_first(*args: Any) -> Any:
        monkeypatch.undo()
        pool.close(timeout=0)
        return make_lease(*args)

    monkeypatch.setattr(dbpool.pool, "lease", close_first)
    lease = pool.connection()
    assert lease.released, "lent as if close() had not ended it"
    lease.close()
    s = pool.stats()
    assert (s.acquired, s.returned, s.in_use) == (2, 2, 0), s


@pytest.mark.parametrize(
    "served", ["after a ping", "by a connect", "by a hand-over", "by a hand-over to validate"]
)
def test_a_checkout_close_ends_as_its_wait_ends_is_counted_once(
    make_pool: Any, server: fakedb.Server, monkeypatch: pytest.MonkeyPatch, served: str
) -> None:
    # close() past its timeout, in another thread, lands as a caller that was not served at
    # once takes the connection it was given as its own (forced here by running it as the
    # caller asks for its thread's ident) or, lent one by a return, as it wakes up with it:
    # the caller is told the pool closed, never lent a lease close() did not count.
    pool = make_pool(max_size=1, validate_after=0 if served == "after a ping" else None)
    if served == "after a ping":
        with pool.connection():
            pass
    rec = Recorder().listen_to_all(pool)
    holder = pool.connection() if served.startswith("by a hand-over") else None
    if served == "by a hand-over to validate":  # a broken connection was found since
        pool._broken_at = time.monotonic() + 3600  # private: when the last one was found

    class CloseFirst:
        """dbpool.pool's view of the threading module, whose get_ident() closes the pool."""

        def __getattr__(self, name: str) -> Any:
            return getattr(threading, name)

        def get_ident(self) -> int:
            monkeypatch.undo()
            pool.close(timeout=0)
            return threading.get_ident()

    def checkout() -> None:
        with pytest.raises(dbpool.PoolClosed, match="closed while this caller waited"):
            pool.connection(timeout=5).close()

    granted = pool._granted

    def close_first(*args: Any) -> Any:
        """The queued caller's first step once woken up (a private method, wrapped)."""
        monkeypatch.undo()
        pool.close(timeout=0)
        return granted(*args)

    if holder is None:
        monkeypatch.setattr(dbpool.pool, "threading", CloseFirst())
        checkout()
    else:
        waiter = Caller(checkout, name="waiter")
        wait_until(lambda: pool.stats().waiting == 1)
        if served == "by a hand-over":
            monkeypatch.setattr(pool, "_granted", close_first)
        else:
            monkeypatch.setattr(dbpool.pool, "threading", CloseFirst())
        holder.close()  # handed to the caller queued
        assert waiter.outcome() is None
    assert "_granted" not in vars(pool), "close() never ran"
    assert dbpool.pool.threading is threading, "close() never ran"
    s = pool.stats()
    assert s.acquired - s.returned == s.in_use == 0, s
    kinds = rec.kinds()
    assert kinds.count("checkout") == kinds.count("checkin"), kinds


# == A checkout undone after it was counted is counted as returned too ==========================


def test_a_checkout_undone_by_a_listener_raising_keyboardinterrupt_is_counted_as_returned(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=2)

    def interrupt(event: Any) -> None:
        raise KeyboardInterrupt  # not an Exception: it goes through to the caller

    pool.add_listener("checkout", interrupt)
    for _ in range(2):  # a connect made for the caller, then an idle connection served at once
        with pytest.raises(KeyboardInterrupt):
            pool.connection()

    s = pool.stats()
    # Counted as handed out (a counter never goes down), and back in the pool: a lease that
    # came back, or acquired - returned tells of two leases out for good.
    assert (s.acquired, s.in_use, s.idle) == (2, 0, 1), s
    assert s.returned == s.acquired, s
    assert sum(s.wait_histogram) == s.acquired, s


@pytest.mark.parametrize("served", ["by a connect", "at once"])
def test_a_checkout_undone_by_a_listener_raising_keyboardinterrupt_fires_checkin_once(
    make_pool: Any, server: fakedb.Server, served: str
) -> None:
    # The listeners before the one that raised were told of the checkout, and those after it
    # too: each is told of its end once, as of any other lease, and checkin events stay as
    # many as ``returned``.
    pool = make_pool(max_size=2)
    if served == "at once":
        with pool.connection():
            pass
    before = Recorder().listen_to_all(pool)

    def interrupt(event: Any) -> None:
        raise KeyboardInterrupt  # not an Exception: it goes through to the caller

    pool.add_listener("checkout", interrupt)
    after = Recorder().listen_to_all(pool)

    with pytest.raises(KeyboardInterrupt):
        pool.connection()

    s = pool.stats()
    assert s.acquired - s.returned == s.in_use == 0, s
    for rec in (before, after):
        kinds = [k for k in rec.kinds() if k in ("checkout", "checkin")]
        assert kinds == ["checkout", "checkin"], rec.kinds()
        (checkout,), (checkin,) = rec.of("checkout"), rec.of("checkin")
        assert checkin.connection is checkout.connection
        assert checkin.duration is not None and checkin.duration >= 0
    pool.remove_listener("checkout", interrupt)
    with pool.connection():  # the connection went back, as the stats say
        pass
    assert pool.stats().in_use == 0


def test_a_checkout_undone_after_close_ended_it_fires_checkin_once(
    make_pool: Any, server: fakedb.Server
) -> None:
    # close() past its timeout ends the lease while its checkout is being told (and tells its
    # checkin then); the checkout is then undone by a listener raising: no second checkin.
    pool = make_pool(max_size=1)
    rec = Recorder().listen_to_all(pool)

    def close_then_interrupt(event: Any) -> None:
        Caller(lambda: pool.close(timeout=0), name="closer").outcome()
        raise KeyboardInterrupt

    pool.add_listener("checkout", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pool.connection()

    kinds = [k for k in rec.kinds() if k in ("checkout", "checkin")]
    assert kinds == ["checkout", "checkin"], rec.kinds()
    s = pool.stats()
    assert (s.acquired, s.returned, s.in_use) == (1, 1, 0), s


# == A connection discarded while the pool drains is counted by its reason =====================


@pytest.mark.parametrize("how", ["requested", "reset_failed"])
def test_a_discard_while_draining_is_counted_by_reason_and_fires_discard(
    make_pool: Any, server: fakedb.Server, how: str
) -> None:
    pool = make_pool(max_size=2)
    rec = Recorder().listen_to_all(pool)
    lease = pool.connection()
    lease.cursor().execute("UPDATE t SET x = 1")  # a transaction for the return to roll back
    draining = Caller(lambda: pool.drain(timeout=5))
    wait_until(lambda: pool.stats().pool_closed)

    if how == "requested":
        pool.discard(lease)  # "counted in discards as 'requested'", pool open or not
    else:
        server.fail_next("rollback", fakedb.OperationalError("fakedb: rollback failed"))
        lease.close()
    assert draining.outcome() is None

    s = pool.stats()
    assert s.discarded == 1 and s.discards[how] == 1, s
    # Every connection counted in ``discarded`` is in ``discards`` too, by its reason.
    assert s.discarded <= sum(s.discards.values()), s
    assert [e.reason for e in rec.of("discard")] == [how], rec.kinds()
    assert [e.reason for e in rec.of("close")] == [how], rec.kinds()


# == A checkout that times out validating an idle connection is logged ===========================


def test_a_checkout_timing_out_in_validation_is_logged_as_a_warning(
    make_pool: Any, server: fakedb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    pool = make_pool(max_size=2, validate_after=0)  # every idle connection is pinged
    with pool.connection():
        pass
    server.fail_next("ping", fakedb.OperationalError("fakedb: server closed the connection"))

    with pytest.raises(dbpool.PoolTimeout) as raised:
        pool.connection(timeout=0)

    assert pool.stats().timeouts == 1  # counted as a timeout ...
    warnings = [r for r in dbpool_records(caplog) if r.levelno >= logging.WARNING]
    # ... but, unlike every other checkout timeout, never logged: behaviour.rst promises a
    # WARNING for "a checkout that timed out".
    assert any(str(raised.value) in r.getMessage() for r in warnings), [
        r.getMessage() for r in dbpool_records(caplog)
    ]


# == A failed rollback at the end of a transaction is logged masked, with the pool's name =========


def test_a_failed_transaction_rollback_log_line_masks_a_password(
    make_pool: Any, server: fakedb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    pool = make_pool(max_size=1)
    secret = "Tr0ub4dor-and-3"
    server.fail_next(
        "rollback",
        fakedb.OperationalError(f"fakedb: lost connection to host=db user=app password={secret}"),
    )

    with pytest.raises(ZeroDivisionError):
        with pool.transaction() as tx:
            tx.execute("UPDATE t SET x = 1")
            1 / 0  # noqa: B018

    lines = [r.getMessage() for r in dbpool_records(caplog)]
    assert any("ending a transaction failed" in line for line in lines), lines
    # configuration.rst: "Whatever the pool writes about an error (log lines, health(),
    # PoolTimeout) also masks what looks like a password."
    assert not any(secret in line for line in lines), lines


def test_a_failed_transaction_rollback_log_line_names_its_pool(
    make_pool: Any, server: fakedb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    pool = make_pool(max_size=1, name="billing")
    server.fail_next("rollback", fakedb.OperationalError("fakedb: connection lost"))

    with pytest.raises(ZeroDivisionError):
        with pool.transaction() as tx:
            tx.execute("UPDATE t SET x = 1")
            1 / 0  # noqa: B018

    lines = [r.getMessage() for r in dbpool_records(caplog)]
    (line,) = [line for line in lines if "ending a transaction failed" in line]
    # configuration.rst, name: "The name appears in repr(pool), in log lines, ...": with two
    # pools, this line cannot be told apart.
    assert "'billing'" in line, line


# == health(): busy only if a lease came back and was put back ==================================


@pytest.mark.parametrize("retired", ["session_reset", "expired", "requested"])
def test_health_of_a_saturated_pool_whose_leases_are_retired_as_they_come_back_is_not_ok(
    make_pool: Any, server: fakedb.Server, clock: FakeClock, retired: str
) -> None:
    # No connection comes free within health()'s timeout; the one lease that comes back
    # meanwhile is closed rather than put back, and the connect that would replace it hangs:
    # nothing says the database serves, so the pool is not "busy".
    session_reset = "reconnect" if retired == "session_reset" else None
    pool = make_pool(max_size=1, session_reset=session_reset, max_lifetime=3600)
    may_end = threading.Event()

    def borrower() -> None:
        conn = pool.connection()
        conn.cursor().execute("SELECT 1")
        assert may_end.wait(5)
        if retired == "requested":
            pool.discard(conn)
            return
        if retired == "expired":
            clock.advance(3600)
        conn.close()

    holder = Caller(borrower, name="borrower")
    wait_until(lambda: pool.stats().in_use == 1)
    server.block("connect", times=None)  # connecting hangs
    checking = Caller(lambda: pool.health(timeout=0.5), name="health")
    wait_until(lambda: pool.stats().waiting == 1)
    may_end.set()
    assert holder.outcome() is None
    assert checking.outcome() is None
    health = checking.value
    s = pool.stats()
    assert s.returned == 1 and s.discards[retired] == 1, s
    assert health["ok"] is False and health["busy"] is False, health
    server.release_all()
