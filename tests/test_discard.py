"""``pool.discard(conn)``: a lease ended by closing its connection instead of returning it."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest

import dbpool
from tests import fakedb
from tests.conftest import Caller, assert_accounting, scalar, wait_until

pytestmark = pytest.mark.timeout(60)


def test_a_discarded_lease_is_closed_not_returned(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    events: list[Any] = []
    for kind in ("checkin", "discard", "close"):
        pool.add_listener(kind, events.append)
    conn = pool.connection()
    conn.cursor().execute("UPDATE t SET v = 1")
    raw = conn.raw
    pool.discard(conn)
    assert raw.closed
    assert server.count("rollback") == 0  # closing ends the transaction: no round trip first
    assert conn.released
    with pytest.raises(dbpool.LeaseReleased):
        conn.cursor()
    conn.close()  # nothing left to return
    s = assert_accounting(pool)
    assert (s.size, s.in_use, s.returned) == (0, 0, 1)
    assert {reason: n for reason, n in s.discards.items() if n} == {"requested": 1}
    assert [(e.event.value, e.reason) for e in events] == [
        ("checkin", None),
        ("discard", "requested"),
        ("close", "requested"),
    ]
    with pool.connection() as conn:
        assert conn.raw is not raw
    assert server.count("connect") == 2


def test_a_discard_makes_room_for_a_waiter(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    conn = pool.connection()
    raw = conn.raw
    waiter = Caller(lambda: pool.connection(timeout=30), name="waiter")
    wait_until(lambda: pool.stats().waiting == 1)
    pool.discard(conn)
    assert waiter.outcome() is None
    with waiter.value as lease:
        assert lease.raw is not raw and not lease.raw.closed


def test_discard_refuses_what_is_not_a_held_lease_of_the_pool(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool, other = make_pool(max_size=1), make_pool(max_size=1)
    with pool.connection() as conn:
        with pytest.raises(TypeError, match=r"conn\.raw"):
            pool.discard(conn.raw)
        with pytest.raises(dbpool.PoolError, match="leased from pool"):
            other.discard(conn)
        conn.cursor().execute("SELECT 1")  # untouched by the refusals
        assert not conn.raw.closed
    with pytest.raises(dbpool.LeaseReleased, match="already returned"):
        pool.discard(conn)
    s = assert_accounting(pool)
    assert (s.size, s.idle, s.discarded) == (1, 1, 0)


def test_discard_from_two_threads_closes_once(make_pool: Any, server: fakedb.Server) -> None:
    pool = make_pool(max_size=1)
    conn = pool.connection()
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def discard() -> None:
        start.wait()
        try:
            pool.discard(conn)
            outcomes.append("discarded")
        except dbpool.LeaseReleased:
            outcomes.append("refused")

    threads = [threading.Thread(target=discard) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["discarded", "refused"]
    assert server.count("close") == 1
    s = assert_accounting(pool)
    assert (s.size, s.discarded) == (0, 1)


def test_discard_inside_a_transaction_block_commits_nothing(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        with pytest.raises(dbpool.PoolError, match="discarded it and its work was not committed"):
            with conn.transaction():
                conn.cursor().execute("UPDATE t SET v = 1")
                pool.discard(conn)
    assert server.count("commit") == 0
    assert assert_accounting(pool).size == 0


def test_discard_of_a_lease_the_pool_closed_does_nothing(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    conn = pool.connection()
    pool.close(timeout=0)  # closes it under the lease
    pool.discard(conn)
    assert conn.released
    assert pool.stats().discarded == 0


def test_discard_of_a_lease_from_before_reopen_closes_it(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    conn = pool.connection()
    raw = conn.raw
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    pool.discard(conn)
    assert raw.closed
    with pool.connection(timeout=5):
        pass  # its place under max_size is free


def test_a_discarded_postgresql_connection_ends_its_backend(postgresql_dsn: str) -> None:
    with dbpool.Pool(lambda: psycopg.connect(postgresql_dsn), min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            pid = conn.info.backend_pid
        conn = pool.connection()
        assert conn.info.backend_pid == pid  # the same connection, reused
        pool.discard(conn)
        with pool.connection() as conn:
            assert conn.info.backend_pid != pid
            wait_until(
                lambda: (
                    not scalar(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
                )
            )


def test_sqlalchemys_invalidate_discards_through_its_event(sqlite_pools: Any) -> None:
    """The recipe in docs/howto/sqlalchemy.rst."""
    sa = pytest.importorskip("sqlalchemy")
    from sqlalchemy.pool import NullPool

    pool = sqlite_pools(max_size=1)
    engine = sa.create_engine("sqlite://", creator=pool.connect, poolclass=NullPool)

    @sa.event.listens_for(engine, "invalidate")
    def discard_invalidated(dbapi_connection: Any, record: Any, exception: Any) -> None:
        if not dbapi_connection.released:
            pool.discard(dbapi_connection)

    with engine.connect() as connection:
        raw = connection.connection.dbapi_connection.raw
        connection.invalidate()
    with pytest.raises(Exception, match="closed"):
        raw.execute("SELECT 1")
    assert pool.stats().discards["requested"] == 1
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT 1")).scalar() == 1
    engine.dispose()
