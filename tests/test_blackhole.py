"""A blackholed network (a stall: bytes go out, nothing comes back) between the pool and a real
server, with psycopg 3 and PyMySQL through :class:`tests.faultproxy.FaultProxy`.

The drivers' own timeouts are left at "never" where they allow it, so that every bound seen here
is the pool's: the acquire deadline holds across a hung validation ping and a hung connect; a
transaction's deadline holds across a statement whose cancel cannot reach the server; close()
returns while a borrower is stuck in a query; and the pool's own threads (reaper, refill) stay
responsive meanwhile.  Each test then heals the network and shows the pool recovers by itself.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Link, heal, stop_maintenance, wait_until
from tests.faultproxy import Mode

pytestmark = pytest.mark.timeout(60)

#: How far past a deadline a bounded call may return: the ping's floor, the sever grace and
#: thread scheduling on a loaded machine.  A hang is unbounded, so this still tells them apart.
SLACK = 3.0


def timed(call: Callable[[], Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:  # the test inspects it
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


def test_hung_validation_ping_is_bounded_by_the_acquire_deadline(link: Link) -> None:
    with dbpool.Pool(link.connect, min_size=0, max_size=1, validate_after=0) as pool:
        with pool.connection():
            pass
        link.proxy.set_mode(Mode.BLACKHOLE)
        elapsed, error = timed(lambda: pool.connection(timeout=0.5).close())
        assert isinstance(error, dbpool.PoolTimeout), error
        assert "idle connection was being validated" in str(error)
        assert elapsed < 0.5 + SLACK, f"acquire(timeout=0.5) took {elapsed:.1f} s"
        s = pool.stats()
        assert s.discarded == 1, "the blackholed connection was handed out or kept"
        assert s.in_use == 0 and s.size <= 1
        heal(link)
        with pool.connection(timeout=10) as conn:
            conn.cursor().execute("SELECT 1")


def test_hung_connect_is_bounded_by_the_acquire_deadline(link: Link) -> None:
    with dbpool.Pool(link.connect, min_size=0, max_size=2) as pool:
        link.proxy.set_mode(Mode.BLACKHOLE)
        elapsed, error = timed(lambda: pool.connection(timeout=0.5).close())
        assert isinstance(error, dbpool.PoolTimeout), error
        assert "connecting to the database took longer" in str(error)
        assert elapsed < 0.5 + SLACK, f"acquire(timeout=0.5) took {elapsed:.1f} s"
        s = pool.stats()
        assert (s.opening, s.in_use, s.timeouts) == (1, 0, 1), s
        heal(link)  # the hung connect fails now; the next one succeeds
        with pool.connection(timeout=10) as conn:
            conn.cursor().execute("SELECT 1")
        wait_until(lambda: pool.stats().opening == 0)
        s = pool.stats()
        assert s.size == s.idle + s.in_use + s.opening <= 2, s


def assert_cut_off_at_the_deadline(pool: dbpool.Pool[Any], link: Link, block: Any) -> None:
    """``block``, a 0.5 s transaction whose network goes silent, ends by its deadline (give or
    take SLACK: a hang has no end) with TransactionTimeout; its connection is discarded, and
    the pool works again once the network does."""
    elapsed, error = timed(block)
    assert isinstance(error, dbpool.TransactionTimeout), error
    assert elapsed < 0.5 + SLACK, f"a 0.5 s transaction ran {elapsed:.1f} s"
    s = pool.stats()
    assert (s.in_use, s.discarded) == (0, 1), f"the cut-off connection was kept: {s}"
    heal(link)
    with pool.transaction(timeout=5) as tx:
        tx.execute("SELECT 1")


def test_transaction_deadline_holds_when_the_cancel_cannot_reach_the_server(link: Link) -> None:
    with dbpool.Pool(link.connect, min_size=0, max_size=1) as pool:

        def block() -> None:
            with pool.transaction(timeout=0.5) as tx:
                link.proxy.set_mode(Mode.BLACKHOLE)
                tx.execute("SELECT 1")

        assert_cut_off_at_the_deadline(pool, link, block)


@pytest.mark.parametrize("link", ["postgresql"], indirect=True)
def test_transaction_deadline_holds_when_the_network_stalls_as_the_block_ends(link: Link) -> None:
    """Before a COMMIT that starts late, PostgreSQL's lock wait limit is narrowed to the time
    left: a round trip that a stalled network holds up is cut off as COMMIT would be, and the
    block ends with TransactionTimeout (COMMIT was never sent: nothing was committed)."""
    with dbpool.Pool(link.connect, min_size=0, max_size=1) as pool:

        def block() -> None:
            with pool.transaction(timeout=0.5) as tx:
                tx.execute("SELECT pg_sleep(0.05)")  # COMMIT starts later than BEGIN's limit
                link.proxy.set_mode(Mode.BLACKHOLE)

        assert_cut_off_at_the_deadline(pool, link, block)


def test_close_returns_while_a_borrower_is_stuck_in_a_query(link: Link) -> None:
    pool = dbpool.Pool(link.connect, min_size=0, max_size=1)
    lease = pool.connection()
    outcome: list[BaseException | None] = []

    def stuck() -> None:
        try:
            lease.cursor().execute("SELECT 1")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    link.proxy.set_mode(Mode.BLACKHOLE)
    borrower = threading.Thread(target=stuck, daemon=True)
    borrower.start()
    wait_until(lambda: link.proxy.stats().bytes_held > 0)  # the query is in the blackhole
    elapsed, error = timed(lambda: pool.close(timeout=0.5))
    assert error is None and elapsed < 0.5 + SLACK, (elapsed, error)
    borrower.join(SLACK)
    assert not borrower.is_alive(), "the borrower is still stuck after close() cut its connection"
    assert outcome and isinstance(outcome[0], (*link.lost, dbpool.LeaseReleased)), outcome


def test_the_pool_threads_stay_responsive(link: Link, caplog: pytest.LogCaptureFixture) -> None:
    # The blackholed idle connection fails its ping and is discarded; the refill's connect made
    # to replace it hangs.  Meanwhile the reaper still reports the lease held too long, and the
    # caller gets its answer in time.
    caplog.set_level(logging.WARNING, logger="dbpool")
    with dbpool.Pool(
        link.connect, min_size=2, max_size=3, validate_after=0, leak_timeout=0.5
    ) as pool:
        pool.wait(timeout=10)
        lease = pool.connection()
        link.proxy.set_mode(Mode.BLACKHOLE)
        elapsed, error = timed(lambda: pool.connection(timeout=0.3).close())
        assert isinstance(error, dbpool.PoolTimeout) and elapsed < 0.3 + SLACK, (elapsed, error)
        wait_until(lambda: pool.stats().opening == 1)  # the refill to min_size hangs
        # Counted, then logged, by the maintenance thread: wait for the record itself.
        wait_until(
            lambda: any("longer than leak_timeout" in r.getMessage() for r in caplog.records),
            timeout=SLACK,
        )
        assert pool.stats().leak_warnings == 1
        lease.close()
        heal(link)
        wait_until(lambda: pool.stats().idle >= 2, timeout=15)


def test_drain_returns_by_its_timeout_while_a_dropped_lease_cannot_be_rolled_back(
    link: Link,
) -> None:
    # A lease garbage-collected with a transaction open is rolled back as drain() takes it
    # back; on a blackholed network that rollback never ends, unless drain() cuts it off.
    with dbpool.Pool(link.connect, min_size=0, max_size=2) as pool:
        stop_maintenance(pool)  # drain() itself returns the dropped lease
        lease = pool.connection()
        lease.cursor().execute("SELECT 1")  # a transaction, or a snapshot, to roll back
        link.proxy.set_mode(Mode.BLACKHOLE)
        with pytest.warns(ResourceWarning, match="without being released"):
            del lease
            gc.collect()
        elapsed, _ = timed(lambda: pool.drain(timeout=0.5))
        assert elapsed < 0.5 + SLACK, f"drain(timeout=0.5) took {elapsed:.1f} s"
        s = pool.stats()
        assert (s.in_use, s.size, s.leaked) == (0, 0, 1), s
        heal(link)
