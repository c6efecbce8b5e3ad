"""A slow link (every round trip takes 0.3 s) between the pool and a real server,
with psycopg 3 and PyMySQL through :class:`tests.faultproxy.FaultProxy`.

``pool.check()`` and the sweep that follows a broken connection share a time budget among
their pings.  On such a link a ping cut short by that budget says nothing about the server, and
cutting it discards a live connection: neither may happen, and no discard may start another
sweep, which would cut more pings short in turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

import dbpool
import dbpool.pool
from tests.conftest import Link, assert_accounting, wait_until

pytestmark = pytest.mark.timeout(60)

LATENCY = 0.3  # seconds added to every round trip
SIZE = 6


def _session(link: Link, raw: Any) -> Any:
    return raw.info.backend_pid if link.name == "postgresql" else raw.thread_id()


def _kill(link: Link, raw: Any, request: pytest.FixtureRequest) -> None:
    """End ``raw``'s session from a direct connection (not through the proxy)."""
    session = _session(link, raw)
    if link.name == "postgresql":
        import psycopg

        with psycopg.connect(request.getfixturevalue("postgresql_dsn"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (session,))
    else:
        import pymysql

        admin = pymysql.connect(**request.getfixturevalue("mysql_params"))
        try:
            admin.cursor().execute(f"KILL CONNECTION {int(session)}")
        finally:
            admin.close()


@pytest.fixture
def pool(link: Link, caplog: pytest.LogCaptureFixture) -> Iterator[dbpool.Pool[Any]]:
    """A pool of SIZE connections, filled, then the link made slow; INFO logs captured."""
    caplog.set_level(logging.INFO, logger="dbpool")
    with dbpool.Pool(link.connect, min_size=SIZE, max_size=SIZE, validate_after=None) as pool:
        pool.wait(timeout=30)
        link.proxy.latency = LATENCY
        yield pool


def test_check_on_a_slow_link_keeps_the_live_connections(
    pool: dbpool.Pool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    timeout = 1.9 * LATENCY  # time for one ping and most of a second
    started = time.monotonic()
    dead = pool.check(timeout=timeout)
    elapsed = time.monotonic() - started
    assert dead == 0
    s = assert_accounting(pool)
    assert (s.discarded, s.idle) == (0, SIZE), s
    # The second is not started: cut short, it would discard a live connection.
    assert any(
        f"{SIZE - 1} of {SIZE} idle connections left unpinged" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert elapsed < timeout + 1.0, f"check() ran {elapsed:.2f} s"


def test_the_sweep_on_a_slow_link_discards_only_the_broken_connection(
    pool: dbpool.Pool[Any],
    link: Link,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A sweep budget for one ping and most of a second, of the five suspects.
    monkeypatch.setattr(dbpool.pool, "_SWEEP_TIME", 2.5 * LATENCY)
    victim = pool.connection()
    _kill(link, victim.raw, request)
    with pytest.raises(link.lost):
        victim.cursor().execute("SELECT 1")
    victim.close()  # discarded as broken: the others, older, are suspects
    wait_until(
        lambda: any("older than it were dead" in r.getMessage() for r in caplog.records),
        timeout=15,
        message="no sweep",
    )
    sweeps = [r.getMessage() for r in caplog.records if "older than it" in r.getMessage()]
    assert sweeps == [
        f"pool {pool.name!r}: a broken connection was found; 0 of {SIZE - 1} idle "
        "connections older than it were dead too"
    ], sweeps
    assert any(
        f"{SIZE - 2} of {SIZE - 1} idle connections left unpinged" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    wait_until(lambda: pool.stats().idle == SIZE, timeout=15, message="no refill")
    s = assert_accounting(pool)
    assert s.discards["broken"] == 1, s.discards
    # The ones left unpinged are pinged as they are leased: every connection works.
    link.proxy.latency = 0.0
    leases = [pool.connection(timeout=10) for _ in range(SIZE)]
    for lease in leases:
        lease.cursor().execute("SELECT 1")
        lease.close()
    s = assert_accounting(pool)
    assert (s.discarded, s.size) == (1, SIZE), s
    sweeps = [r.getMessage() for r in caplog.records if "older than it" in r.getMessage()]
    assert len(sweeps) == 1, f"the sweep started others: {sweeps}"


def test_a_ping_cut_short_by_check_starts_no_sweep(
    pool: dbpool.Pool[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Less time than a round trip: the first ping is cut short, its connection shut down
    # and discarded; that proves nothing about the server, so the others are left alone.
    assert pool.check(timeout=0.01) == 1
    wait_until(lambda: pool.stats().idle == SIZE, timeout=15, message="no refill")
    s = assert_accounting(pool)
    assert s.discards["broken"] == 1, s.discards
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "a broken connection was found" in m], messages
