"""Core pool behaviour, driven through the scriptable fake driver for exact control."""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
import warnings
from typing import Any

import pytest

import dbpool
from dbpool.pool import _ROTATION as ROTATION
from dbpool.pool import _WIDEN_AFTER as WIDEN_AFTER
from tests import fakedb
from tests.conftest import wait_until


@pytest.fixture
def server(fake_server):
    return fake_server


@pytest.fixture
def make_pool(server):
    pools = []

    def make(**options):
        options.setdefault("min_size", 0)
        options.setdefault("acquire_timeout", 5.0)
        pool = dbpool.Pool(options.pop("connect", server.connect), **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(timeout=1)


def accounting_holds(pool: dbpool.Pool) -> bool:
    s = pool.stats()
    return s.size == s.idle + s.in_use + s.opening and s.size <= s.max_size


def start(target, *args):
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


# -- checkout and return ------------------------------------------------------------------


def test_lease_runs_statements_and_returns(make_pool, server):
    pool = make_pool(max_size=2)
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("select 1")
        assert cur.fetchall() == [(1,)]
        conn.commit()
        assert pool.stats().in_use == 1
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.acquired, s.created) == (1, 1, 0, 1, 1)
    assert conn.released


def test_clean_return_costs_no_round_trip(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        conn.cursor().execute("update t set v = 1")
        conn.commit()
    with pool.connection() as conn:
        pass
    assert server.count("rollback") == 0


def test_open_transaction_is_rolled_back_never_committed(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        conn.cursor().execute("update t set v = 1")
        raw = conn.raw
    assert server.count("rollback") == 1
    assert server.count("commit") == 0
    assert not server.in_transaction(raw)


def test_exception_in_block_rolls_back_and_propagates(make_pool, server):
    pool = make_pool(max_size=1)
    with pytest.raises(ZeroDivisionError):
        with pool.connection() as conn:
            conn.cursor().execute("insert into t values (1)")
            raise ZeroDivisionError
    assert server.count("rollback") == 1
    assert pool.stats().idle == 1


def test_failed_rollback_discards_the_connection(make_pool, server):
    pool = make_pool(max_size=1)
    server.fail_next("rollback", fakedb.OperationalError("rollback failed"))
    with pool.connection() as conn:
        conn.cursor().execute("update t set v = 1")
        first = conn.raw
    s = pool.stats()
    assert (s.size, s.discarded, s.closed) == (0, 1, 1)
    assert first.closed
    with pool.connection() as conn:
        assert conn.raw is not first


def test_connection_interrupted_mid_call_is_discarded(make_pool, server):
    pool = make_pool(max_size=1)
    server.fail_next("execute", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        with pool.connection() as conn:
            conn.cursor().execute("select pg_sleep(10)")
    s = pool.stats()
    assert (s.size, s.in_use, s.discarded) == (0, 0, 1)


def test_cursors_left_open_are_closed_on_return(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("select 1")
        raw_cursor = cur.raw
    assert raw_cursor._closed


def test_attributes_set_through_the_lease_are_restored(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        assert conn.autocommit is False
        conn.autocommit = True
        assert conn.raw.autocommit is True
    with pool.connection() as conn:
        assert conn.autocommit is False


def test_checkout_validation_only_when_idle_long_enough(make_pool, server):
    hot = make_pool(max_size=1, validate_after=None)
    for _ in range(3):
        with hot.connection():
            pass
    assert server.count("ping") == 0
    always = make_pool(max_size=1, validate_after=0)
    for _ in range(3):
        with always.connection():
            pass
    # the first checkout opens a fresh connection, the two after it are idle ones
    assert server.count("ping") == 2


def test_dead_idle_connection_is_replaced_without_error(make_pool, server):
    pool = make_pool(max_size=2, validate_after=0)
    with pool.connection() as a, pool.connection() as b:
        dead = {a.raw.id, b.raw.id}
    server.kill_all()
    with pool.connection() as conn:
        conn.cursor().execute("select 2")
        assert conn.raw.id not in dead
    s = pool.stats()
    assert s.discarded == 2
    assert accounting_holds(pool)


def test_connection_broken_in_use_is_discarded_on_return(make_pool, server):
    pool = make_pool(max_size=1)
    with pytest.raises(fakedb.OperationalError):
        with pool.connection() as conn:
            server.kill(conn.raw)
            conn.cursor().execute("select 1")
    s = pool.stats()
    assert (s.size, s.discarded) == (0, 1)


# -- leases ---------------------------------------------------------------------------------


def test_close_is_idempotent_and_released_lease_refuses_use(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.connect()
    cur = conn.cursor()
    conn.close()
    conn.close()
    assert pool.stats().in_use == 0
    for use in (conn.cursor, conn.commit, lambda: conn.raw, lambda: conn.autocommit):
        with pytest.raises(dbpool.LeaseReleased):
            use()
    with pytest.raises(dbpool.LeaseReleased):
        cur.execute("select 1")
    assert isinstance(dbpool.LeaseReleased("x"), dbpool.PoolError)


def test_returning_to_the_wrong_pool_raises(make_pool):
    one, two = make_pool(name="one"), make_pool(name="two")
    conn = one.connect()
    with pytest.raises(dbpool.PoolError, match="'one'"):
        two.release(conn)
    assert one.stats().in_use == 1 and two.stats().in_use == 0
    one.release(conn)
    assert one.stats().in_use == 0


def test_dropped_lease_is_returned_with_resource_warning(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.connect()
    with pytest.warns(ResourceWarning, match="without being released"):
        del conn
        gc.collect()
    # the next acquire takes the orphan back instead of timing out
    with pool.connection(timeout=1):
        pass
    assert accounting_holds(pool)


# -- waiting --------------------------------------------------------------------------------


def test_waiters_are_served_in_strict_fifo_order(make_pool):
    pool = make_pool(max_size=1)
    holder = pool.connect()
    served = []

    def wait_then_record(i):
        with pool.connection(timeout=10):
            served.append(i)

    threads = []
    for i in range(8):
        threads.append(start(wait_then_record, i))
        wait_until(lambda: pool.stats().waiting == i + 1)  # noqa: B023 - called in this turn
    holder.close()
    for t in threads:
        t.join(10)
    assert served == list(range(8))


def test_returning_thread_cannot_barge_ahead_of_a_waiter(make_pool):
    pool = make_pool(max_size=1)
    holder = pool.connect()
    got = threading.Event()

    def waiter():
        with pool.connection(timeout=10):
            got.set()

    t = start(waiter)
    wait_until(lambda: pool.stats().waiting == 1)
    holder.close()
    with pytest.raises(dbpool.PoolTimeout):
        pool.connection(timeout=0).close()  # the connection went to the waiter already
    t.join(10)
    assert got.is_set()


def test_timed_out_waiter_never_swallows_a_connection(make_pool):
    pool = make_pool(max_size=1)
    holder = pool.connect()
    with pytest.raises(dbpool.PoolTimeout):
        pool.connection(timeout=0.05)
    later = []
    t = start(lambda: later.append(pool.connection(timeout=10)))
    wait_until(lambda: pool.stats().waiting == 1)
    holder.close()
    t.join(10)
    later[0].close()
    s = pool.stats()
    assert (s.size, s.idle, s.in_use, s.waiting, s.timeouts) == (1, 1, 0, 0, 1)


def test_timeout_message_names_pool_timeout_and_stats(make_pool):
    pool = make_pool(max_size=1, name="orders")
    with pool.connection():
        with pytest.raises(dbpool.PoolTimeout) as info:
            pool.connection(timeout=0.05)
    message = str(info.value)
    for part in ("'orders'", "0.05 s", "size=1/1", "in_use=1", "idle=0", "waiting=0", "in use"):
        assert part in message
    assert isinstance(info.value, TimeoutError)
    assert info.value.__cause__ is None


def test_connect_timeout_message_tells_the_queueing_from_the_connect(make_pool, server):
    pool = make_pool(max_size=1)
    holder = pool.connection()
    gate = server.block("connect")
    try:
        queued = {}

        def wait_then_time_out():
            try:
                pool.connection(timeout=1.0)
            except dbpool.PoolTimeout as exc:
                queued["error"] = exc

        t = start(wait_then_time_out)
        wait_until(lambda: pool.stats().waiting == 1)
        time.sleep(0.3)  # queued for at least that long
        server.kill(holder.raw)
        holder.close()  # found broken: discarded, and the queued caller may connect
        assert gate.entered.wait(5)
        t.join(10)
    finally:
        gate.release()
    message = str(queued["error"])
    assert "connecting to the database did not finish in the" in message, message
    assert "left of the 1 s acquire timeout" in message and "waiting in the queue" in message
    empty = make_pool(max_size=1)
    gate = server.block("connect")
    try:
        with pytest.raises(dbpool.PoolTimeout, match="connecting to the database took longer"):
            empty.connection(timeout=0.5)  # the whole wait is the connect's
    finally:
        gate.release()


def test_too_many_waiters_refused_at_once(make_pool):
    pool = make_pool(max_size=1, max_waiting=1)
    holder = pool.connect()
    t = start(lambda: pool.connection(timeout=5).close())
    wait_until(lambda: pool.stats().waiting == 1)
    with pytest.raises(
        dbpool.TooManyWaiters, match=r"1 caller is already waiting \(max_waiting=1\)"
    ):
        pool.connection(timeout=5)
    assert pool.stats().waiting == 1
    holder.close()
    t.join(10)


def test_nested_acquire_on_pool_of_one_times_out(make_pool):
    pool = make_pool(max_size=1)
    with pool.connection():
        with pytest.raises(dbpool.PoolTimeout):
            pool.connection(timeout=0.1)
    assert accounting_holds(pool)


def test_max_size_never_exceeded_under_64_threads(make_pool, server):
    pool = make_pool(max_size=4, acquire_timeout=30)
    seen = []
    errors = []

    def work():
        try:
            for _ in range(50):
                with pool.connection() as conn:
                    conn.cursor().execute("select 2")
                    seen.append(pool.stats().size)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [start(work) for _ in range(64)]
    for t in threads:
        t.join(60)
    assert errors == []
    assert max(seen) <= 4
    assert server.peak_open <= 4
    s = pool.stats()
    assert (s.in_use, s.waiting, s.acquired) == (0, 0, 64 * 50)


# -- connecting -----------------------------------------------------------------------------


def test_min_size_is_prefilled_and_refilled(make_pool, server):
    pool = make_pool(min_size=3, max_size=5)
    pool.wait(5)
    assert len(server.open_connections) == 3
    with pool.connection() as conn:
        server.kill(conn.raw)
        with pytest.raises(fakedb.OperationalError):
            conn.cursor().execute("select 1")
    wait_until(lambda: pool.stats().size == 3 and pool.stats().opening == 0)
    assert server.connects == 4


def test_caller_gets_the_driver_error_when_its_connect_fails(make_pool, server):
    pool = make_pool(max_size=2)
    server.down()
    with pytest.raises(fakedb.OperationalError, match="refused"):
        pool.connection()
    s = pool.stats()
    assert (s.size, s.connect_errors) == (0, 1)


def test_while_connects_fail_callers_wait_and_the_timeout_says_why(make_pool, server):
    pool = make_pool(max_size=2, reconnect_delay=5, reconnect_max_delay=5)
    server.down()
    with pytest.raises(fakedb.OperationalError):
        pool.connection()
    attempts = server.connect_attempts
    with pytest.raises(dbpool.PoolTimeout) as info:
        pool.connection(timeout=0.1)
    assert "connects to the database are failing" in str(info.value)
    assert isinstance(info.value.__cause__, fakedb.OperationalError)
    assert server.connect_attempts == attempts  # backing off: no herd


def test_pool_heals_when_the_server_comes_back(make_pool, server):
    server.down()
    pool = make_pool(min_size=1, max_size=2, reconnect_delay=0.01, reconnect_max_delay=0.05)
    with pytest.raises(dbpool.PoolTimeout) as info:
        pool.wait(0.2)
    assert isinstance(info.value.__cause__, fakedb.OperationalError)
    server.up()
    pool.wait(5)
    with pool.connection(timeout=5):
        pass


def test_slow_connect_does_not_stall_other_checkouts(make_pool, server):
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(5)
    first = pool.connect()
    gate = server.block("connect")
    opener = start(lambda: pool.connection(timeout=10).close())
    assert gate.entered.wait(5)
    first.close()  # returning, re-acquiring and reading stats all go on meanwhile
    with pool.connection(timeout=1):
        assert pool.stats().opening == 1
    gate.release()
    opener.join(10)
    assert accounting_holds(pool)


def test_slow_rollback_does_not_stall_other_checkouts(make_pool, server):
    pool = make_pool(max_size=2)
    with pool.connection(), pool.connection():
        pass
    gate = server.block("rollback")

    def dirty_return():
        with pool.connection() as conn:
            conn.cursor().execute("update t set v = 1")

    t = start(dirty_return)
    assert gate.entered.wait(5)
    with pool.connection(timeout=1):
        pass
    gate.release()
    t.join(10)
    assert pool.stats().in_use == 0


# -- which idle connection a checkout gets -----------------------------------------------------


def returned_in_order(pool, stale, fresh):
    """Open ``stale + fresh`` connections and return them in order, the first ``stale`` of
    them made to look unused and unchecked for longer than validate_after (as after a
    pause).  Returns the driver connections in the order returned: the last is on top."""
    leases = [pool.connect() for _ in range(stale + fresh)]
    raws = [lease.raw for lease in leases]
    for lease in leases[:stale]:
        lease.close()
    for slot in pool._idle:
        slot.used_at -= 10.0
        slot.alive_at -= 10.0
    for lease in leases[stale:]:
        lease.close()
    return raws


def checkouts(pool, count):
    """The driver connections that ``count`` checkouts in a row got."""
    seen = []
    for _ in range(count):
        with pool.connection() as conn:
            seen.append(conn.raw)
    return seen


def test_back_to_back_checkouts_rotate_through_the_most_recent_few(make_pool, server):
    pool = make_pool(max_size=6, validate_after=None)
    raws = returned_in_order(pool, stale=0, fresh=6)
    window = raws[-ROTATION:]  # the four returned last, least recent first
    assert checkouts(pool, 2 * ROTATION) == window + window
    # the ones returned first never came out again: they are the ones idle_timeout closes
    assert [slot.raw for slot in list(pool._idle)[:2]] == raws[:2]


def test_the_rotation_skips_connections_idle_past_validate_after(make_pool, server, monkeypatch):
    monkeypatch.setattr("dbpool.pool._BACK_TO_BACK", 0.0)  # no checkout counts as back-to-back
    pool = make_pool(max_size=5, validate_after=5.0)
    raws = returned_in_order(pool, stale=2, fresh=3)
    stale, fresh = raws[:2], raws[2:]
    # three fresh ones in turn: the stale one in the window skipped
    assert checkouts(pool, 6) == fresh + fresh
    assert server.count("ping") == 0
    assert [slot.raw for slot in list(pool._idle)[:2]] == stale


def test_back_to_back_checkouts_bring_stale_connections_back_into_the_rotation(
    make_pool, server, monkeypatch
):
    monkeypatch.setattr("dbpool.pool._BACK_TO_BACK", 60.0)  # every checkout is back-to-back
    monkeypatch.setattr("dbpool.pool._WIDEN_AFTER", 3)
    pool = make_pool(max_size=ROTATION, validate_after=5.0)
    *stale, second, top = returned_in_order(pool, stale=ROTATION - 1, fresh=1)
    # the first two alternate between the fresh one and the stale one below it; from the
    # third in a row the stale ones join the rotation, least recently returned first
    assert checkouts(pool, 2 + ROTATION) == [second, top, *stale, second, top]
    assert server.count("ping") == ROTATION - 1  # each stale one once, then all are fresh


def test_a_short_burst_after_a_pause_pings_one_connection_more_at_most(
    make_pool, server, monkeypatch
):
    monkeypatch.setattr("dbpool.pool._BACK_TO_BACK", 60.0)  # every checkout is back-to-back
    pool = make_pool(max_size=ROTATION, validate_after=5.0)
    *_, second, top = returned_in_order(pool, stale=ROTATION, fresh=0)
    burst = WIDEN_AFTER - 1
    assert checkouts(pool, burst) == [second, top] * (burst // 2) + [second] * (burst % 2)
    assert server.count("ping") == 2  # the top one, as any checkout after a pause; and one more


def test_a_stale_connection_is_not_lent_instead_of_a_fresh_one(make_pool, server, monkeypatch):
    monkeypatch.setattr("dbpool.pool._BACK_TO_BACK", 0.0)  # no checkout counts as back-to-back
    pool = make_pool(max_size=2, validate_after=5.0)
    stale, recent = returned_in_order(pool, stale=1, fresh=1)
    assert checkouts(pool, 2) == [recent, recent]
    assert server.count("ping") == 0
    assert pool._idle[0].raw is stale


def test_back_to_back_checkouts_ping_a_stale_second_connection_once(make_pool, server, monkeypatch):
    monkeypatch.setattr("dbpool.pool._BACK_TO_BACK", 60.0)  # every checkout is back-to-back
    pool = make_pool(max_size=2, validate_after=5.0)
    stale, recent = returned_in_order(pool, stale=1, fresh=1)
    assert checkouts(pool, 4) == [stale, recent, stale, recent]
    assert server.count("ping") == 1  # then both are fresh


# -- reaping --------------------------------------------------------------------------------


def test_idle_connections_above_min_size_are_reaped(make_pool, server):
    pool = make_pool(min_size=1, max_size=4, idle_timeout=0.1)
    leases = [pool.connect() for _ in range(4)]
    for lease in leases:
        lease.close()
    wait_until(lambda: pool.stats().size == 1)
    assert len(server.open_connections) == 1


def test_pinging_idle_connections_does_not_keep_them_from_idle_timeout(make_pool, server):
    # check() proves connections alive, which spares their next checkout a ping; it is no
    # use of them, so connections the load no longer needs are still closed
    pool = make_pool(min_size=0, max_size=2, idle_timeout=0.3)
    leases = [pool.connect() for _ in range(2)]
    for lease in leases:
        lease.close()
    wait_until(lambda: pool.check() == 0 and pool.stats().size == 0)
    assert server.count("ping") >= 2


def test_connections_past_max_lifetime_are_retired(make_pool, server):
    pool = make_pool(min_size=1, max_size=1, max_lifetime=0.1)
    pool.wait(5)
    first = server.open_connections[0]
    wait_until(lambda: first.closed)
    pool.wait(5)
    with pool.connection() as conn:
        assert conn.raw is not first


def test_expired_connection_is_not_handed_out(make_pool, server):
    # the reaper ticks at most every max_lifetime / 2, so checkout must check too
    pool = make_pool(max_size=1, max_lifetime=30)
    with pool.connection() as conn:
        first = conn.raw
    for slot in pool._idle:  # make it look old, as if the reaper had not run yet
        slot.expires_at = 0
    with pool.connection() as conn:
        assert conn.raw is not first
    assert first.closed


def test_expired_idle_connections_cost_no_time_of_a_zero_timeout(make_pool, server):
    # Discarding a connection for its age sends nothing: the checkout goes on to the next idle
    # one even with no time left, instead of timing out as if a ping had failed.  Two expired
    # ones: the fast path's pick, then the general path's.
    pool = make_pool(max_size=3, idle_timeout=None, validate_after=60)
    leases = [pool.connection() for _ in range(3)]
    for lease in leases:
        lease.close()
    *expired, fresh = list(pool._idle)  # taken bottom first: all are fresh for the rotation
    for slot in expired:
        slot.expires_at = 0  # as if max_lifetime had passed since
    pings = server.count("ping")
    with pool.connection(timeout=0) as conn:
        assert conn.raw is fresh.raw
    s = pool.stats()
    assert (s.timeouts, s.discards["expired"], s.size) == (0, 2, 1), s
    assert server.count("ping") == pings
    assert all(slot.raw.closed for slot in expired)


# -- close ----------------------------------------------------------------------------------


def test_close_with_waiters_and_leases_out(make_pool, server):
    pool = make_pool(max_size=1)
    lease = pool.connect()
    outcome = []

    def waiter():
        try:
            pool.connection(timeout=10)
        except dbpool.PoolClosed as exc:
            outcome.append(exc)

    t = start(waiter)
    wait_until(lambda: pool.stats().waiting == 1)
    closer = start(pool.close, 10)
    t.join(5)
    assert len(outcome) == 1
    assert not lease.raw.closed  # still in use
    raw = lease.raw
    lease.close()
    closer.join(5)
    assert raw.closed
    assert pool.closed
    with pytest.raises(dbpool.PoolClosed):
        pool.connection()
    pool.close()  # idempotent
    assert not any(t.name.startswith(f"dbpool-reaper-{pool.name}") for t in threading.enumerate())
    s = pool.stats()
    assert (s.size, s.in_use) == (0, 0)


def test_close_timeout_force_closes_leases(make_pool, server):
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(5)
    lease = pool.connect()
    pool.close(timeout=0.05)
    assert all(c.closed for c in server.connections)
    lease.close()  # returning afterwards is harmless
    assert pool.stats().size == 0


def test_pool_as_context_manager_closes(server):
    with dbpool.Pool(server.connect, min_size=1) as pool:
        pool.wait(5)
    assert pool.closed
    assert all(c.closed for c in server.connections)


def test_unclosed_pool_warns_when_collected(server):
    pool = dbpool.Pool(server.connect, min_size=0)
    with pytest.warns(ResourceWarning, match="garbage-collected while open"):
        del pool
        gc.collect()


@pytest.mark.parametrize("drained", [False, True])
def test_a_lease_dropped_with_its_pool_has_its_connection_closed(server, drained):
    # The lease held the pool's last reference: the maintenance thread that takes dropped
    # leases back goes with the pool, so the pool closes that connection as it is collected.
    def lease_only() -> Any:
        pool = dbpool.Pool(server.connect, min_size=0, max_size=2)
        lease = pool.connection()
        lease.cursor().execute("SELECT 2")
        if drained:
            with pytest.raises(dbpool.PoolTimeout):
                pool.drain(timeout=0)
        return lease

    lease = lease_only()
    raw = lease.raw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del lease
        gc.collect()
    # (the maintenance thread may hold the pool for a moment, and let it go last)
    wait_until(
        lambda: raw.closed, message="the connection of a lease dropped with its pool stayed open"
    )
    assert not server.open_connections


# -- BaseException accounting -------------------------------------------------------------


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize(
    "step",
    ["connect", "ping", "execute", "rollback", "close_on_discard"],
)
def test_base_exception_at_each_step_keeps_accounting_exact(make_pool, server, step, exc):
    pool = make_pool(max_size=3, validate_after=0)
    with pool.connection(), pool.connection():
        pass  # two idle connections
    if step == "connect":
        with pool.connection(), pool.connection():
            server.fail_next("connect", exc)
            with pytest.raises(exc):
                pool.connection(timeout=0.1)
    elif step == "ping":
        server.fail_next("ping", exc)
        with pytest.raises(exc):
            pool.connection()
    elif step == "rollback":
        server.fail_next("rollback", exc)
        with pytest.raises(exc):
            with pool.connection() as conn:
                conn.cursor().execute("update t set v = 1")
    elif step == "close_on_discard":
        server.fail_next("close", exc)
        server.fail_next("rollback", fakedb.OperationalError("gone"))
        with pytest.raises(exc):
            with pool.connection() as conn:
                conn.cursor().execute("update t set v = 1")
    elif step == "execute":
        with pytest.raises(exc):
            with pool.connection() as conn:
                cur = conn.cursor()
                server.fail_next("execute", exc)
                cur.execute("select 2")
    assert accounting_holds(pool)
    assert pool.stats().in_use == 0
    # and every slot is still usable
    with pool.connection(timeout=1), pool.connection(timeout=1), pool.connection(timeout=1):
        pass
    assert server.peak_open <= 3


def test_keyboard_interrupt_while_waiting_leaves_no_trace(make_pool):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are delivered to the main thread only")
    pool = make_pool(max_size=1)
    holder = pool.connect()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            pool.connection(timeout=10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert pool.stats().waiting == 0
    holder.close()
    s = pool.stats()
    assert (s.idle, s.in_use) == (1, 0)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"min_size": 5, "max_size": 2}, ValueError, "raise max_size"),
        ({"max_size": 0}, ValueError, "max_size must be 1 or more"),
        ({"min_size": -1}, ValueError, "min_size"),
        ({"max_size": 2.5}, TypeError, "max_size must be an int"),
        ({"max_size": True}, TypeError, "max_size must be an int"),
        ({"acquire_timeout": -1}, ValueError, "acquire_timeout must be 0 or more"),
        ({"acquire_timeout": float("nan")}, ValueError, "acquire_timeout"),
        ({"acquire_timeout": "5"}, TypeError, "acquire_timeout must be a number"),
        ({"idle_timeout": 0}, ValueError, "None to disable"),
        ({"max_lifetime": -3}, ValueError, "max_lifetime"),
        ({"max_waiting": -1}, ValueError, "max_waiting"),
        ({"validate_after": -1}, ValueError, "validate_after"),
        ({"reconnect_delay": 2, "reconnect_max_delay": 1}, ValueError, "reconnect_max_delay"),
        ({"dialect": "oracle"}, ValueError, "unknown dialect 'oracle'"),
        ({"dialect": 3}, TypeError, "dialect must be"),
        ({"name": 7}, TypeError, "name must be a str"),
    ],
)
def test_bad_configuration_is_refused_before_connecting(server, options, error, words):
    with pytest.raises(error, match=words):
        dbpool.Pool(server.connect, **options)
    assert server.connect_attempts == 0


def test_connect_must_be_callable():
    with pytest.raises(TypeError, match="callable taking no arguments"):
        dbpool.Pool(42)
    # A DSN given as psycopg_pool takes it: told how to connect with it, and not quoted
    with pytest.raises(TypeError, match="pass a function that connects with it") as info:
        dbpool.Pool("host=db dbname=app password=secret")
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("timeout", [-1, "1", float("nan")])
def test_bad_acquire_timeout_leaves_pool_untouched(make_pool, timeout):
    pool = make_pool(max_size=1)
    before = pool.stats()
    with pytest.raises((ValueError, TypeError)):
        pool.connection(timeout=timeout)
    assert pool.stats() == before


def test_repr_shows_name_and_state(make_pool):
    pool = make_pool(max_size=3, name="reports")
    with pool.connection():
        assert repr(pool) == "<Pool 'reports' open size=1 idle=0 in_use=1 waiting=0>"
    pool.close()
    assert repr(pool).startswith("<Pool 'reports' closed")


def test_default_names_are_numbered(make_pool):
    first, second = make_pool(), make_pool()
    assert first.name.startswith("pool-") and second.name.startswith("pool-")
    assert int(second.name[5:]) == int(first.name[5:]) + 1


def test_lifecycle_is_logged_without_secrets(make_pool, server, caplog):
    caplog.set_level(logging.DEBUG, logger="dbpool")
    pool = make_pool(max_size=1, validate_after=0)
    with pool.connection():
        pass
    server.kill_all()
    with pool.connection():
        pass
    text = caplog.text
    assert "opened a connection" in text
    assert "failed validation" in text
