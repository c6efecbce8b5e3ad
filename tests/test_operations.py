"""Operations on a running pool: ``check()``, ``health()``, ``resize()``, ``drain()`` and
``reopen()``, on the fake driver and against SQLite, PostgreSQL and MariaDB.

Threads that must block (a borrower holding a lease, a caller queued for one, a drain waiting
for it) run through :class:`tests.conftest.Caller` and are released with Events; every wait is
bounded, and no test sleeps to let something happen.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import re
import sqlite3
import threading
import uuid
import warnings
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Backend, Caller, assert_accounting, probe, rows, wait_until

pytestmark = pytest.mark.timeout(60)

BOUND = 10.0  # seconds: what should happen at once, and has not by then, is a hang
CLOSED_PORT = 1  # nothing listens on port 1 here: connects to it are refused at once
HEALTH_KEYS = {"pool", "ok", "reachable", "busy", "latency", "error", "closed", "stats"}
SERVERS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql),
    pytest.param("mysql", marks=pytest.mark.mysql),
]


# -- helpers ---------------------------------------------------------------------------------------


def use(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 2")
    cur.fetchall()
    cur.close()


class Holder:
    """A lease held by a thread of its own until :meth:`release`."""

    def __init__(self, pool: dbpool.Pool[Any], name: str = "holder") -> None:
        self.pool = pool
        self.raw: Any = None
        self._taken = threading.Event()
        self._release = threading.Event()
        self.caller = Caller(self._hold, name=name)
        wait_until(lambda: self._taken.is_set() or self.caller.done.is_set(), timeout=BOUND)
        assert self._taken.is_set(), f"{name} got no lease: {self.caller.error!r}"

    def _hold(self) -> None:
        with self.pool.connection(timeout=BOUND) as conn:
            use(conn)
            self.raw = conn.raw
            self._taken.set()
            assert self._release.wait(BOUND * 3), "the holder was never released"

    def release(self) -> BaseException | None:
        """Let the lease go; how the holding thread ended."""
        self._release.set()
        return self.caller.outcome(BOUND)


hold = Holder


def waiter(pool: dbpool.Pool[Any], name: str = "waiter", timeout: float = BOUND) -> Caller:
    """A caller queued for a lease; it returns the lease (the test closes it)."""
    before = pool.stats().waiting
    caller = Caller(lambda: pool.connection(timeout=timeout), name=name)
    wait_until(lambda: pool.stats().waiting > before or caller.done.is_set(), timeout=BOUND)
    return caller


def dbpool_text(caplog: pytest.LogCaptureFixture) -> str:
    """Everything dbpool logged, tracebacks included."""
    formatter = logging.Formatter("%(message)s")
    parts = []
    for record in caplog.records:
        if record.name == "dbpool" or record.name.startswith("dbpool."):
            parts.append(formatter.format(record))
    return "\n".join(parts)


# == check() =======================================================================================


def test_check_closes_the_dead_idle_connections_and_refills(make_pool, server):
    pool = make_pool(min_size=3, max_size=4)
    pool.wait(timeout=BOUND)
    idle = list(server.open_connections)
    assert len(idle) == 3
    dead, live = idle[:2], idle[2]
    for raw in dead:
        server.kill(raw)
    assert pool.check() == 2
    s = assert_accounting(pool)
    assert s.discards["broken"] == 2, s.discards
    assert s.discards["check_failed"] == 0, s.discards
    assert all(raw.closed for raw in dead), "a dead connection was left open"
    assert not live.closed, "check() closed a live connection"
    wait_until(lambda: pool.stats().idle == 3, timeout=BOUND, message="no refill to min_size")
    assert live in server.open_connections
    assert_accounting(pool)
    assert pool.check() == 0


def test_check_uses_the_check_hook_and_counts_check_failed(make_pool, server):
    checked: list[Any] = []

    def check(raw: Any) -> None:
        checked.append(raw)
        probe(raw)

    pool = make_pool(min_size=2, max_size=2, check=check)
    pool.wait(timeout=BOUND)
    pings_before = server.count("ping")
    victim = server.open_connections[0]
    server.kill(victim)
    assert pool.check() == 1
    assert len(checked) == 2
    assert server.count("ping") == pings_before, "check() pinged although a check hook is set"
    s = pool.stats()
    assert s.discards["check_failed"] == 1 and s.discards["broken"] == 0, s.discards
    assert victim.closed
    wait_until(lambda: pool.stats().idle == 2, timeout=BOUND)


def test_check_closes_expired_connections_without_counting_them_dead(make_pool, server):
    pool = make_pool(min_size=0, max_size=3)
    for lease in [pool.connection() for _ in range(3)]:
        lease.close()
    # Two reach max_lifetime; the reaper sleeps until a later deadline, so check() finds them.
    with pool._lock:
        for slot in list(pool._idle)[:2]:
            slot.expires_at = 0.0
    pings = server.count("ping")
    assert pool.check() == 0
    assert server.count("ping") - pings == 1, "an expired connection was pinged"
    s = assert_accounting(pool)
    assert (s.discards["expired"], s.discards["broken"], s.idle) == (2, 0, 1), s
    # Retired for their age, as the background thread retires idle ones: not thrown away
    assert s.discarded == 0, s


def test_check_pings_every_idle_connection_and_leaves_leases_alone(make_pool, server):
    pool = make_pool(min_size=0, max_size=3, validate_after=None)
    leases = [pool.connection() for _ in range(3)]
    leased = leases[0].raw
    for lease in leases[1:]:
        lease.close()
    server.kill(leased)  # leased: not the pool's to check
    pings = server.count("ping")
    assert pool.check() == 0
    assert server.count("ping") - pings == 2
    assert not leased.closed
    s = assert_accounting(pool)
    assert (s.in_use, s.idle) == (1, 2)
    leases[0].close()


def test_check_runs_its_pings_outside_the_pool_lock(make_pool, server):
    pool = make_pool(min_size=2, max_size=3)
    pool.wait(timeout=BOUND)
    gate = server.block("ping")
    checking = Caller(pool.check, name="checking")
    try:
        assert gate.entered.wait(BOUND), "check() pinged nothing"
        assert Caller(pool.stats, name="stats").outcome(BOUND) is None
        other = Caller(lambda: pool.connection(timeout=BOUND).close(), name="other")
        assert other.outcome(BOUND) is None, "a checkout waited for check()'s ping"
    finally:
        gate.release()
    assert checking.outcome(BOUND) is None
    assert checking.value == 0
    assert_accounting(pool)


def test_a_checkout_takes_an_idle_connection_check_is_not_pinging(make_pool, server):
    """check() pings the idle connections one at a time: while one ping is slow, the others
    stay idle for callers.  A full pool whose check() held them all out of the idle stack made
    a caller wait for every ping, and time out saying every connection was in use."""
    pool = make_pool(min_size=0, max_size=2, validate_after=None)
    first, second = pool.connection(), pool.connection()
    raws = {first.raw, second.raw}
    first.close()
    second.close()
    gate = server.block("ping")
    checking = Caller(pool.check, name="checking")
    try:
        assert gate.entered.wait(BOUND), "check() pinged nothing"
        with pool.connection(timeout=0) as conn:  # the one not being pinged, at once
            assert conn.raw in raws
            s = assert_accounting(pool)
            assert (s.size, s.in_use, s.idle) == (2, 2, 0), s
    finally:
        gate.release()
    assert checking.outcome(BOUND) is None
    assert checking.value == 0
    assert server.count("ping") == 2, "check() skipped the connection leased meanwhile"
    s = assert_accounting(pool)
    assert (s.size, s.idle, s.timeouts) == (2, 2, 0), s


def test_a_checkout_takes_a_suspect_connection_the_sweep_is_not_pinging(make_pool, server):
    """The sweep after a broken connection pings the suspects one at a time, so a caller
    gets one of the others (pinged at its checkout) rather than opening a new connection."""
    pool = make_pool(min_size=3, max_size=3, validate_after=None)
    pool.wait(timeout=BOUND)
    gate = server.block("ping")  # the sweep's first ping, in the maintenance thread
    with pool.connection() as conn:
        server.kill(conn.raw)
        with pytest.raises(fakedb.OperationalError):
            use(conn)
    suspects = set(server.open_connections)  # the two others; the broken one is closed
    assert len(suspects) == 2
    connects = server.connects
    try:
        assert gate.entered.wait(BOUND), "no sweep after a broken connection"
        with pool.connection(timeout=BOUND) as other:
            assert other.raw in suspects
            assert server.connects == connects, "connected while a suspect one was idle"
    finally:
        gate.release()
    wait_until(lambda: pool.stats().idle == 3, timeout=BOUND, message="no refill to min_size")
    s = assert_accounting(pool)
    assert (s.discarded, s.created) == (1, 4), s


def test_check_against_real_servers(db: Backend) -> None:
    with dbpool.Pool(db.connect, min_size=3, max_size=3, validate_after=None) as pool:
        pool.wait(timeout=BOUND)
        leases = [pool.connection(timeout=BOUND) for _ in range(3)]
        raws = [lease.raw for lease in leases]  # kept referenced: their ids stay unique
        ids = [db.backend_id(raw) for raw in raws]
        for lease in leases:
            lease.close()
        for raw in raws[:2]:
            db.kill(raw)
        assert pool.check() == 2
        s = assert_accounting(pool)
        assert s.discards["broken"] == 2, s.discards
        wait_until(lambda: pool.stats().idle == 3, timeout=BOUND, message="no refill")
        leases = [pool.connection(timeout=BOUND) for _ in range(3)]
        try:
            now = [db.backend_id(lease) for lease in leases]
            for lease in leases:
                assert rows(lease, "SELECT 1") == [(1,)]
        finally:
            for lease in leases:
                lease.close()
        assert ids[2] in now, "the live connection was not kept"
        assert not set(ids[:2]) & set(now), "a killed connection is still in the pool"


# == health() ======================================================================================


def assert_health_shape(pool: dbpool.Pool[Any], health: Any) -> None:
    assert isinstance(health, dict)
    assert set(health) == HEALTH_KEYS, sorted(health)
    assert health["pool"] == pool.name
    assert isinstance(health["ok"], bool) and isinstance(health["closed"], bool)
    assert type(health["stats"]) is dict
    json.dumps(health)  # the whole answer is JSON-serialisable


def test_health_of_a_live_pool(make_pool, server):
    pool = make_pool(min_size=1, max_size=2, name="healthy")
    pool.wait(timeout=BOUND)
    health = pool.health()
    assert_health_shape(pool, health)
    assert health["ok"] is True and health["reachable"] is True
    assert health["error"] is None and health["closed"] is False
    assert isinstance(health["latency"], float) and health["latency"] >= 0
    assert health["stats"]["name"] == "healthy"
    s = assert_accounting(pool)
    assert s.in_use == 0, "health() left a lease out"


def test_health_against_real_servers(db: Backend) -> None:
    with dbpool.Pool(db.connect, min_size=1, max_size=2) as pool:
        health = pool.health(timeout=BOUND)
        assert_health_shape(pool, health)
        assert health["ok"] is True and health["reachable"] is True, health
        assert isinstance(health["latency"], float) and health["latency"] >= 0
        assert pool.stats().in_use == 0


def test_health_of_an_unreachable_server(make_pool, server):
    server.down()
    pool = make_pool(min_size=0, max_size=2)
    health = pool.health(timeout=2)
    assert_health_shape(pool, health)
    assert health["ok"] is False and health["reachable"] is False
    assert health["closed"] is False
    error = health["error"]
    assert isinstance(error, str) and error.startswith("OperationalError"), error
    assert "\n" not in error
    assert "server is down" in error
    s = assert_accounting(pool)
    assert s.in_use == 0


def test_health_when_every_idle_connection_died_and_the_server_refuses(make_pool, server):
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(timeout=BOUND)
    server.kill_all()
    server.down()
    health = pool.health(timeout=2)
    assert_health_shape(pool, health)
    assert health["ok"] is False and health["reachable"] is False, health
    s = assert_accounting(pool)
    assert s.in_use == 0
    assert s.discards["broken"] >= 1, "the connection that failed health()'s ping was kept"
    server.up()
    wait_until(lambda: pool.health(timeout=2)["ok"], timeout=BOUND, message="no recovery")


def test_health_of_a_saturated_pool_whose_leases_keep_coming_back_is_ok_and_busy(make_pool, server):
    """No connection comes free within health()'s timeout, but leases come back sound
    meanwhile (to callers queued first): the database serves, the pool is busy. A readiness
    probe must not take every saturated instance out of rotation."""
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(timeout=BOUND)
    holder = pool.connection(timeout=BOUND)
    served = threading.Event()
    finish = threading.Event()

    def queued_first() -> None:
        with pool.connection(timeout=BOUND):
            served.set()
            finish.wait(BOUND)

    first = Caller(queued_first, name="queued first")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    checking = Caller(lambda: pool.health(timeout=0.5), name="health")
    wait_until(lambda: pool.stats().waiting == 2, timeout=BOUND)
    holder.close()  # handed to the caller queued first: health() still finds none free
    assert served.wait(BOUND)
    assert checking.outcome(BOUND) is None
    health = checking.value
    finish.set()
    assert first.outcome(BOUND) is None
    assert_health_shape(pool, health)
    assert health["ok"] is True and health["busy"] is True, health
    assert health["reachable"] is False and health["error"] is None, health
    assert health["latency"] is None


def test_health_after_the_idle_connections_died_tries_a_fresh_one(make_pool, server):
    """After a server restart the connections idle since are dead, which says nothing of the
    server now (validate_after=None: no checkout pings them): the probe discards the one it
    took and tries another, opened anew once the others were found dead too, and reports
    the server reachable. A connection opened for the probe that fails its ping is the
    server's answer: not ok."""
    pool = make_pool(min_size=2, max_size=2, validate_after=None)
    pool.wait(timeout=BOUND)
    server.kill_all()  # a restart: every session idle in the pool is gone
    health = pool.health(timeout=BOUND)
    assert_health_shape(pool, health)
    assert health["ok"] is True and health["reachable"] is True, health
    s = pool.stats()
    assert s.discards["broken"] == 2, s  # the one pinged, then the other, pinged at checkout
    server.fail_on("ping", fakedb.OperationalError("the server is shutting down"))
    pool.check()  # every idle one found failing, and discarded
    health = pool.health(timeout=BOUND)
    assert health["ok"] is False and "shutting down" in health["error"], health
    assert_accounting(pool)


def test_health_of_a_pool_shedding_load_queues_its_probe_past_max_waiting(make_pool, server):
    """A saturated pool whose queue is full (max_waiting) turns callers away, as it should; its
    probe is not turned away with them, or every instance shedding load would fail its
    readiness probe at once: it queues, and is served in turn."""
    pool = make_pool(min_size=1, max_size=1, max_waiting=1)
    pool.wait(timeout=BOUND)
    holder = pool.connection(timeout=BOUND)
    first = Caller(lambda: pool.connection(timeout=BOUND).close(), name="queued first")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    with pytest.raises(dbpool.TooManyWaiters):
        pool.connection(timeout=BOUND)
    checking = Caller(lambda: pool.health(timeout=BOUND), name="health")
    wait_until(lambda: pool.stats().waiting == 2, timeout=BOUND)
    holder.close()
    assert first.outcome(BOUND) is None, first.error
    assert checking.outcome(BOUND) is None, checking.error
    health = checking.value
    assert_health_shape(pool, health)
    assert health["ok"] is True and health["reachable"] is True, health
    holder = pool.connection(timeout=BOUND)  # the limit still holds for the others
    queued = Caller(lambda: pool.connection(timeout=BOUND).close(), name="queued")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    with pytest.raises(dbpool.TooManyWaiters):
        pool.connection(timeout=BOUND)
    holder.close()
    assert queued.outcome(BOUND) is None, queued.error
    assert_accounting(pool)


def test_health_whose_own_connect_hangs_is_not_busy(make_pool, server):
    """Leases come back sound while the probe's own connect hangs, with room in the pool: the
    database serves those sessions but does not take new ones. That is no saturated pool
    (busy): the probe's timeout is reported."""
    pool = make_pool(min_size=0, max_size=2)
    holder = pool.connection(timeout=BOUND)
    use(holder)
    gate = server.block("connect")
    try:
        checking = Caller(lambda: pool.health(timeout=2), name="health")
        assert gate.entered.wait(BOUND)
        holder.close()  # a lease back sound, put back while the probe connects
        assert not checking.done.is_set(), "the probe's time ran out before the lease came back"
        assert checking.outcome(BOUND) is None, checking.error
    finally:
        gate.release()
    health = checking.value
    assert_health_shape(pool, health)
    assert health["busy"] is False and health["ok"] is False, health
    assert "connecting to the database took longer" in health["error"], health


@pytest.mark.parametrize("ending", ["server gone", "interrupted"])
def test_health_of_a_saturated_pool_whose_leases_come_back_unfit_is_not_ok(
    make_pool, server, ending
):
    """No connection comes free within health()'s timeout, and the leases that come back
    meanwhile are discarded as unfit (the server went away under them; a time limit
    interrupted their hung statements) while connecting hangs: the database does not serve,
    and the pool is not reported ok as merely busy."""
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(timeout=BOUND)
    may_end = threading.Event()

    def borrower() -> None:
        with pool.connection(timeout=BOUND) as conn:
            conn.cursor().execute("SELECT 2")  # opens a transaction
            assert may_end.wait(BOUND)
            if ending == "server gone":
                server.kill_all()  # its rollback on return fails
            else:
                server.fail_next("execute", KeyboardInterrupt)
                conn.cursor().execute("SELECT 3")

    holder = Caller(borrower, name="borrower")
    wait_until(lambda: pool.stats().in_use == 1, timeout=BOUND)
    server.block("connect", times=None)  # a blackholed network: connecting hangs
    checking = Caller(lambda: pool.health(timeout=0.5), name="health")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    may_end.set()
    holder.outcome(BOUND)
    assert checking.outcome(BOUND) is None
    health = checking.value
    assert_health_shape(pool, health)
    assert health["ok"] is False and health["busy"] is False, health
    assert health["error"] is not None, health
    s = pool.stats()
    assert s.discards["reset_failed"] + s.discards["interrupted"] == 1, s
    server.release_all()


def test_health_of_a_pool_whose_leases_never_come_back_is_not_ok(make_pool, server):
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(timeout=BOUND)
    with pool.connection(timeout=BOUND):
        health = pool.health(timeout=0.2)
    assert_health_shape(pool, health)
    assert health["ok"] is False and health["busy"] is False, health
    assert health["error"] is not None and "PoolTimeout" in health["error"], health


def test_health_never_raises_on_a_connect_callable_error(make_pool, server):
    def connect() -> Any:
        raise ValueError("no such host in this configuration")

    pool = make_pool(min_size=0, max_size=1, connect=connect)
    health = pool.health(timeout=1)
    assert_health_shape(pool, health)
    assert health["ok"] is False
    assert health["error"] == "ValueError: no such host in this configuration"


class SeverFailsPing(dbpool.dialects.Dialect):
    """The generic dialect, for a driver whose sever() makes the ping held at ``gate`` fail,
    as a shut-down socket would."""

    name = "sever-fails-ping"
    gate: Any = None

    def sever(self, conn: Any) -> None:
        if self.gate is not None:
            self.gate.release(fakedb.OperationalError)


def test_a_health_ping_cut_short_by_its_timeout_makes_no_connection_suspect(make_pool, server):
    """A ping cut short by health()'s own short timeout says nothing about the server (the
    link may just be slow): its connection, shut down, is discarded, but as for check(), no
    sweep follows and the other idle connections are not pinged again, by it or at checkout."""
    dialect = SeverFailsPing()
    pool = make_pool(min_size=3, max_size=3, validate_after=None, dialect=dialect)
    pool.wait(timeout=BOUND)
    dialect.gate = server.block("ping")
    health = pool.health(timeout=0)  # the ping still gets its 0.1 s, then is cut short
    assert health["reachable"] is False, health
    assert "took longer" in health["error"] or "OperationalError" in health["error"], health
    wait_until(lambda: pool.stats().idle == 3, timeout=BOUND, message="no refill to min_size")
    leases = [pool.connection(timeout=BOUND) for _ in range(3)]
    for lease in leases:
        lease.close()
    assert server.count("ping") == 1, "idle connections were pinged as suspects"
    s = assert_accounting(pool)
    assert (s.discards["broken"], s.created) == (1, 4), s


def test_health_of_an_exhausted_pool_does_not_raise(make_pool, server):
    pool = make_pool(min_size=0, max_size=1)
    with pool.connection():
        health = pool.health(timeout=0.2)
    assert_health_shape(pool, health)
    assert health["ok"] is False
    assert "PoolTimeout" in health["error"]
    assert_accounting(pool)


def test_health_is_bounded_by_its_timeout_when_connecting_hangs(make_pool, server):
    pool = make_pool(min_size=0, max_size=1)
    gate = server.block("connect")
    try:
        checking = Caller(lambda: pool.health(timeout=0.3), name="health")
        assert checking.outcome(BOUND) is None, "health() raised or hung on a hung connect"
        assert_health_shape(pool, checking.value)
        assert checking.value["ok"] is False
    finally:
        gate.release()


def test_health_of_a_closed_pool(make_pool, server):
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(timeout=BOUND)
    pool.close()
    health = pool.health()
    assert_health_shape(pool, health)
    assert health["closed"] is True and health["ok"] is False


def _canary() -> tuple[str, str]:
    token = uuid.uuid4().hex
    return token, f"Canary-S3cr3t-{token}"


def _down_connects(password: str) -> list[tuple[str, Callable[[], Any]]]:
    connects: list[tuple[str, Callable[[], Any]]] = []
    try:
        import psycopg
        from psycopg.conninfo import make_conninfo

        dsn = make_conninfo(
            host="127.0.0.1",
            port=CLOSED_PORT,
            dbname="app",
            user="app",
            password=password,
            connect_timeout=5,
        )
        connects.append(("psycopg", lambda: psycopg.connect(dsn)))
    except ImportError:
        pass
    try:
        import pymysql

        connects.append(
            (
                "pymysql",
                lambda: pymysql.connect(
                    host="127.0.0.1",
                    port=CLOSED_PORT,
                    user="app",
                    password=password,
                    database="app",
                    connect_timeout=5,
                ),
            )
        )
    except ImportError:
        pass
    return connects


@pytest.mark.parametrize("driver", ["psycopg", "pymysql"])
def test_health_reports_an_unreachable_server_without_the_password(driver, caplog):
    caplog.set_level(logging.DEBUG, logger="dbpool")
    token, password = _canary()
    connects = dict(_down_connects(password))
    if driver not in connects:
        pytest.skip(f"{driver} is not installed")
    with dbpool.Pool(connects[driver], min_size=0, max_size=1, name="down") as pool:
        health = pool.health(timeout=BOUND)
        assert_health_shape(pool, health)
        assert health["ok"] is False and health["reachable"] is False, health
        assert isinstance(health["error"], str) and health["error"]
        assert token not in json.dumps(health)
        assert token not in repr(pool)
    assert token not in dbpool_text(caplog)


def test_health_of_a_url_pool_keeps_the_url_password_out(caplog):
    pytest.importorskip("psycopg")
    caplog.set_level(logging.DEBUG, logger="dbpool")
    token, password = _canary()
    url = f"postgresql://app:{password}@127.0.0.1:{CLOSED_PORT}/app?connect_timeout=5"
    pool = dbpool.create_pool(url, min_size=0, max_size=1)
    try:
        health = pool.health(timeout=BOUND)
    finally:
        pool.close()
    assert health["ok"] is False and health["reachable"] is False, health
    assert token not in json.dumps(health)
    assert token not in dbpool_text(caplog)


@pytest.mark.parametrize("backend", SERVERS)
def test_health_through_a_refusing_proxy_after_the_connections_were_dropped(
    backend: str, request: pytest.FixtureRequest
) -> None:
    from tests.faultproxy import FaultProxy, Mode

    if backend == "postgresql":
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(request.getfixturevalue("postgresql_dsn"))
        upstream = int(params.get("port", 5432))
    else:
        import pymysql

        params = dict(request.getfixturevalue("mysql_params"))
        upstream = int(params.get("port", 3306))
    with FaultProxy(upstream=("127.0.0.1", upstream)) as proxy:
        if backend == "postgresql":
            params.update(host="127.0.0.1", port=proxy.port, sslmode="disable", connect_timeout=5)
            params.pop("hostaddr", None)

            def connect() -> Any:
                return psycopg.connect(**params)
        else:
            params.update(host="127.0.0.1", port=proxy.port, connect_timeout=5)

            def connect() -> Any:
                return pymysql.connect(**params)

        with dbpool.Pool(connect, min_size=1, max_size=1, validate_after=0) as pool:
            assert pool.health(timeout=BOUND)["ok"] is True
            proxy.set_mode(Mode.REFUSE)
            proxy.drop_all()
            health = pool.health(timeout=BOUND)
            assert_health_shape(pool, health)
            assert health["ok"] is False and health["reachable"] is False, health
            assert isinstance(health["error"], str) and health["error"], health
            proxy.set_mode(Mode.PASS)
            wait_until(lambda: pool.health(timeout=BOUND)["ok"], timeout=BOUND)


# == resize() ======================================================================================


BAD_RESIZES = [
    ({"max_size": True}, TypeError),
    ({"min_size": False}, TypeError),
    ({"max_size": 3.0}, TypeError),
    ({"min_size": "1"}, TypeError),
    ({"max_size": None, "min_size": 1.5}, TypeError),
    ({"max_size": -1}, ValueError),
    ({"max_size": 0}, ValueError),
    ({"min_size": -1}, ValueError),
    ({"min_size": 5}, ValueError),  # above the current max_size=4
    ({"max_size": 1}, ValueError),  # below the current min_size=2
    ({"min_size": 3, "max_size": 2}, ValueError),
    ({"min_size": 1, "max_size": -1}, ValueError),  # the valid half is not applied either
    ({"min_size": 0, "max_size": True}, TypeError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_RESIZES, ids=[repr(k) for k, _ in BAD_RESIZES])
def test_resize_refuses_bad_values_and_changes_nothing(make_pool, server, kwargs, error):
    pool = make_pool(min_size=2, max_size=4, validate_after=None)
    pool.wait(timeout=BOUND)
    lease = pool.connection()
    before = pool.stats()
    with pytest.raises(error):
        pool.resize(**kwargs)
    assert pool.stats() == before
    assert (pool.min_size, pool.max_size) == (2, 4)
    lease.close()


def test_resize_only_takes_keywords(make_pool, server):
    pool = make_pool(min_size=0, max_size=2)
    with pytest.raises(TypeError):
        pool.resize(1, 3)  # type: ignore[misc]
    assert (pool.min_size, pool.max_size) == (0, 2)


def test_growing_max_size_serves_the_waiting_callers(make_pool, server):
    pool = make_pool(min_size=0, max_size=1)
    holder = hold(pool)
    waiters = [waiter(pool, f"waiter-{i}") for i in range(2)]
    assert pool.stats().waiting == 2
    pool.resize(max_size=3)
    try:
        for w in waiters:
            assert w.outcome(BOUND) is None, "a waiter was not served after max_size grew"
        s = assert_accounting(pool)
        assert (s.max_size, s.size, s.in_use, s.waiting) == (3, 3, 3, 0), s
        assert pool.max_size == 3
    finally:
        for w in waiters:
            if w.value is not None:
                w.value.close()
        assert holder.release() is None


def test_shrinking_max_size_below_in_use_closes_leases_as_they_return(make_pool, server):
    pool = make_pool(min_size=0, max_size=4)
    leases = [pool.connection() for _ in range(4)]
    raws = [lease.raw for lease in leases]
    pool.resize(max_size=2)
    s = assert_accounting(pool, resized=True)
    assert (s.max_size, s.size, s.in_use) == (2, 4, 4), s
    leases[0].close()
    s = assert_accounting(pool, resized=True)
    assert (s.size, s.idle, s.discards["resized"]) == (3, 0, 1), s
    assert raws[0].closed
    leases[1].close()
    s = assert_accounting(pool, resized=True)
    assert (s.size, s.idle, s.discards["resized"]) == (2, 0, 2), s
    leases[2].close()
    leases[3].close()
    s = assert_accounting(pool, resized=True)
    assert (s.size, s.idle, s.discards["resized"]) == (2, 2, 2), s
    assert not raws[2].closed and not raws[3].closed
    # And the pool never grows past the new cap.
    a, b = pool.connection(), pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.connection(timeout=0.1)
    assert pool.stats().size == 2
    a.close()
    b.close()


def test_shrinking_max_size_closes_extra_idle_connections_at_once(make_pool, server):
    pool = make_pool(min_size=0, max_size=4)
    leases = [pool.connection() for _ in range(4)]
    for lease in leases:
        lease.close()
    assert pool.stats().idle == 4
    pool.resize(max_size=1)
    s = assert_accounting(pool, resized=True)
    assert (s.size, s.idle, s.max_size) == (1, 1, 1), s
    assert s.discards["resized"] == 3
    assert len(server.open_connections) == 1


def test_a_waiter_is_served_only_once_the_pool_is_back_under_the_new_max(make_pool, server):
    pool = make_pool(min_size=0, max_size=2)
    a, b = pool.connection(), pool.connection()
    raw_a, raw_b = a.raw, b.raw
    queued = waiter(pool)
    pool.resize(max_size=1)
    a.close()  # size 2 > 1: closed, and the waiter may not have it
    assert raw_a.closed
    s = assert_accounting(pool, resized=True)
    assert (s.size, s.waiting) == (1, 1), s
    assert not queued.done.is_set()
    b.close()  # size 1: handed on
    assert queued.outcome(BOUND) is None
    assert queued.value.raw is raw_b
    assert pool.stats().size == 1
    queued.value.close()


def test_raising_min_size_refills_and_lowering_it_lets_idle_ones_go(make_pool, server):
    pool = make_pool(min_size=0, max_size=4, idle_timeout=0.05)
    pool.resize(min_size=3)
    assert pool.min_size == 3
    wait_until(lambda: pool.stats().idle == 3, timeout=BOUND, message="no refill to min_size=3")
    pool.resize(min_size=0)
    wait_until(lambda: pool.stats().size == 0, timeout=BOUND, message="idle ones kept past min")
    assert pool.stats().discards["idle"] == 3


def test_resize_with_both_bounds_at_once(make_pool, server):
    pool = make_pool(min_size=1, max_size=2)
    pool.resize(min_size=3, max_size=5)  # valid together, though min 3 > the old max 2
    assert (pool.min_size, pool.max_size) == (3, 5)
    wait_until(lambda: pool.stats().idle == 3, timeout=BOUND)
    pool.resize(min_size=0, max_size=1)
    s = assert_accounting(pool, resized=True)
    assert (s.size, s.min_size, s.max_size) == (1, 0, 1), s


def test_resize_fires_discard_events_with_the_resized_reason(make_pool, server):
    pool = make_pool(min_size=0, max_size=3)
    reasons: list[Any] = []
    pool.add_listener("discard", lambda e: reasons.append(e.reason))
    leases = [pool.connection() for _ in range(3)]
    leases[0].close()
    pool.resize(max_size=1)  # the idle one now, the leased ones on return
    leases[1].close()
    leases[2].close()
    assert reasons == ["resized", "resized"]
    assert pool.stats().size == 1


def test_resize_interrupted_after_letting_connections_go_still_closes_them(
    make_pool, server, monkeypatch
):
    """A signal handler raising in resize() once the idle connections above the new cap are let
    go (here, as it logs the new sizes): they are closed all the same, and drain() does not wait
    for them."""
    pool = make_pool(min_size=0, max_size=3)
    leases = [pool.connection() for _ in range(3)]
    for lease in leases:
        lease.close()
    assert len(server.open_connections) == 3

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("a signal handler raised")

    monkeypatch.setattr(logging.getLogger("dbpool"), "info", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pool.resize(max_size=1)
    monkeypatch.undo()
    assert len(server.open_connections) == 1, "the connections let go were left open"
    pool.drain(timeout=BOUND)  # PoolTimeout if their close still counted as under way
    assert not server.open_connections


def test_resize_while_in_use_keeps_the_accounting(make_pool, server):
    pool = make_pool(min_size=0, max_size=4, validate_after=None)
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                with pool.connection(timeout=0.2) as conn:
                    use(conn)
            except dbpool.PoolTimeout:
                pass
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    workers = [Caller(worker, name=f"worker-{i}") for i in range(6)]
    rng = random.Random(6)
    try:
        for _ in range(150):
            pool.resize(max_size=rng.randint(1, 4))
            assert_accounting(pool, resized=True)
    finally:
        stop.set()
        for w in workers:
            assert w.outcome(BOUND) is None
    assert not errors, errors
    pool.resize(max_size=2)
    s = assert_accounting(pool, resized=True)
    assert s.in_use == 0 and s.size <= 2, s
    wait_until(
        lambda: len(server.open_connections) == pool.stats().size,
        timeout=BOUND,
        message="connections left open that the pool no longer counts",
    )


# == drain() and reopen() ==========================================================================


def test_drain_refuses_waiters_and_checkouts_and_waits_for_the_lease(make_pool, server):
    pool = make_pool(min_size=0, max_size=1)
    holder = hold(pool)
    queued = waiter(pool)
    draining = Caller(pool.drain, name="drain")
    error = queued.outcome(BOUND)
    assert isinstance(error, dbpool.PoolClosed), repr(error)
    assert "drained" in str(error), error
    wait_until(lambda: pool.closed, timeout=BOUND)
    with pytest.raises(dbpool.PoolClosed) as info:
        pool.connection(timeout=1)
    message = str(info.value)
    assert "reopen()" in message and "drain" in message.lower(), message
    assert not draining.done.is_set(), "drain() returned while a lease was still out"
    assert holder.release() is None
    assert draining.outcome(BOUND) is None
    assert holder.raw.closed, "the returned lease's connection was kept"
    s = assert_accounting(pool)
    assert (s.size, s.in_use, s.idle) == (0, 0, 0), s
    assert sum(s.discards.values()) == 0, "closes while draining are no discards"
    assert not server.open_connections
    assert pool.closed


def test_drain_closes_idle_connections_at_once(make_pool, server):
    pool = make_pool(min_size=0, max_size=3)
    holder = hold(pool)
    leases = [pool.connection() for _ in range(2)]
    idle = [lease.raw for lease in leases]
    for lease in leases:
        lease.close()
    draining = Caller(pool.drain, name="drain")
    wait_until(
        lambda: all(raw.closed for raw in idle),
        timeout=BOUND,
        message="idle connections kept open while draining",
    )
    assert pool.stats().idle == 0
    assert not draining.done.is_set()
    assert holder.release() is None
    assert draining.outcome(BOUND) is None


def test_drain_with_nothing_out_returns_at_once(make_pool, server):
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(timeout=BOUND)
    run = Caller(lambda: pool.drain(timeout=0), name="drain")
    assert run.outcome(BOUND) is None
    assert pool.closed and not server.open_connections


@pytest.mark.parametrize("out", [1, 2])
def test_drain_timeout_names_the_leases_still_out(make_pool, server, out):
    pool = make_pool(min_size=0, max_size=3)
    holders = [hold(pool, f"holder-{i}") for i in range(out)]
    with pytest.raises(dbpool.PoolTimeout) as info:
        pool.drain(timeout=0.2)
    assert re.search(rf"\b{out}\b", str(info.value)), str(info.value)
    assert pool.closed
    for holder in holders:
        assert holder.release() is None
        assert holder.raw.closed, "a lease returned after the drain timed out was kept"
    s = assert_accounting(pool)
    assert (s.size, s.in_use) == (0, 0), s
    assert not server.open_connections


def test_drain_by_a_thread_holding_a_lease_says_so(make_pool, caplog):
    # It would wait for its own lease (forever, without a timeout): the log and the timeout
    # say which leases are the caller's own.
    caplog.set_level(logging.WARNING, logger="dbpool")
    pool = make_pool(min_size=0, max_size=2)
    mine = pool.connection()
    with pytest.raises(dbpool.PoolTimeout, match=r"still leased \(1 by this thread\)"):
        pool.drain(timeout=0.05)
    assert any("1 leased by this thread are still out" in r.getMessage() for r in caplog.records)
    mine.close()
    assert_accounting(pool)


@pytest.mark.parametrize("call", ["drain", "close"])
def test_a_wait_with_no_timeout_for_this_threads_own_lease_is_refused(make_pool, call):
    # It could end only if another thread returned the lease: with a timeout, drain() and
    # close() still wait for that (see the test above), without one they would hang.
    pool = make_pool(min_size=0, max_size=2)

    def holding() -> BaseException | None:
        with pool.connection() as mine:
            try:
                getattr(pool, call)(timeout=None)
            except dbpool.PoolError as exc:
                mine.cursor().execute("SELECT 2")  # still usable: nothing was closed
                return exc
        return None

    run = Caller(holding, name=f"{call}-holding")
    assert run.outcome(BOUND) is None, f"{call}() raised instead of refusing"
    assert isinstance(run.value, dbpool.PoolError), repr(run.value)
    assert "this thread holds 1 of them" in str(run.value), run.value
    assert not pool.closed, "refused, yet it closed the pool"
    with pool.connection(timeout=BOUND):
        pass
    assert_accounting(pool)


@pytest.mark.parametrize("call", ["drain", "close"])
def test_a_wait_with_no_timeout_after_dropping_a_lease_unreleased_takes_it_back(
    make_pool, server, call
):
    # The dropped lease is queued for the pool to take back, as drain() and close() do: the
    # thread that dropped it no longer holds it.
    pool = make_pool(min_size=0, max_size=2)

    def dropping() -> None:
        conn = pool.connection()
        use(conn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del conn
            gc.collect()
        getattr(pool, call)(timeout=None)

    run = Caller(dropping, name=f"{call}-after-dropping")
    assert run.outcome(BOUND) is None, f"{call}() refused: {run.error!r}"
    assert pool.closed and not server.open_connections
    s = assert_accounting(pool)
    assert s.leaked == 1 and s.acquired == s.returned == 1, s


@pytest.mark.parametrize("validation", ["ping", "check"])
@pytest.mark.parametrize("call", ["drain", "close"])
def test_drain_or_close_stops_a_caller_whose_validation_is_under_way(
    make_pool, server, call, validation
):
    # As a caller whose connect was under way: told the pool closed, not lent a connection
    # that drain() then waits for, or close() shuts down under it past its timeout.
    armed, held, go = threading.Event(), threading.Event(), threading.Event()

    def slow_check(raw: Any) -> None:
        if armed.is_set():
            held.set()
            assert go.wait(BOUND)

    if validation == "check":
        pool = make_pool(min_size=0, max_size=1, check=slow_check)
        with pool.connection(timeout=BOUND) as conn:  # a new connection: not checked
            raw = conn.raw
        armed.set()
    else:
        pool = make_pool(min_size=0, max_size=1, validate_after=0)
        with pool.connection(timeout=BOUND) as conn:
            raw = conn.raw
        gate = server.block("ping")
        held, go.set = gate.entered, gate.release
    taker = Caller(lambda: pool.connection(timeout=BOUND), name="validated")
    try:
        assert held.wait(BOUND)
        stopping = Caller(lambda: getattr(pool, call)(timeout=BOUND), name=call)
        wait_until(lambda: pool.closed, timeout=BOUND)
    finally:
        go.set()
    error = taker.outcome(BOUND)
    if error is None:
        taker.value.close()
    assert isinstance(error, dbpool.PoolClosed), repr(error)
    assert stopping.outcome(BOUND) is None
    assert raw.closed and not server.open_connections
    assert_accounting(pool)


def test_a_connection_close_left_open_under_its_validation_is_not_lent_after_reopen(
    make_pool, sqlite_connect
):
    # close() past its timeout ends the connection a caller's check is validating (sqlite3's
    # is left open, to be closed once the caller lets go), and reopen() follows before the
    # check ends: the caller was lent that ended connection, and counted as holding a lease
    # for good (close() counted no return of a connection not lent yet).
    armed, held, go = threading.Event(), threading.Event(), threading.Event()

    def slow_check(raw: Any) -> None:
        if armed.is_set():
            held.set()
            assert go.wait(BOUND)

    pool = make_pool(min_size=0, max_size=1, check=slow_check, connect=sqlite_connect)
    with pool.connection(timeout=BOUND) as conn:  # a new connection: not checked
        raw = conn.raw
    armed.set()
    taker = Caller(lambda: pool.connection(timeout=BOUND), name="validated")
    try:
        assert held.wait(BOUND)
        pool.close(timeout=0)
        pool.reopen()
    finally:
        go.set()
    error = taker.outcome(BOUND)
    if error is None:
        taker.value.close()
    assert isinstance(error, dbpool.PoolClosed), repr(error)
    with pytest.raises(sqlite3.ProgrammingError):  # closed, not left open
        raw.execute("SELECT 1")
    s = assert_accounting(pool)
    assert s.acquired == s.returned == 1, s
    armed.clear()
    with pool.connection(timeout=BOUND) as conn:
        use(conn)


def test_drain_stops_a_caller_whose_connect_is_under_way(make_pool, server):
    pool = make_pool(min_size=0, max_size=1)
    gate = server.block("connect")
    connecting = Caller(lambda: pool.connection(timeout=BOUND), name="connecting")
    try:
        assert gate.entered.wait(BOUND)
        draining = Caller(lambda: pool.drain(timeout=BOUND), name="drain")
        error = connecting.outcome(BOUND)
        assert isinstance(error, dbpool.PoolClosed), repr(error)
        assert "drained" in str(error), error  # as a queued caller is told
    finally:
        gate.release()
    assert draining.outcome(BOUND) is None
    wait_until(
        lambda: not server.open_connections,
        timeout=BOUND,
        message="the connection finished after the drain was kept open",
    )
    wait_until(lambda: pool.stats().size == 0, timeout=BOUND)
    assert_accounting(pool)


@pytest.mark.parametrize("stop", ["drain", "close"])
@pytest.mark.parametrize("ending", ["returned", "discarded", "connected"])
def test_drain_and_close_return_once_the_last_connection_is_closed(make_pool, server, stop, ending):
    # The last connection is closed by the thread that gives it back (or that connected it):
    # drain() and close() wait for that close, not only for the counts to drop.
    pool = make_pool(min_size=0, max_size=1)
    stopping = None
    if ending == "connected":
        connect_gate = server.block("connect")
        connecting = Caller(lambda: pool.connection(timeout=BOUND), name="connecting")
        assert connect_gate.entered.wait(BOUND)
        stopping = Caller(lambda: getattr(pool, stop)(timeout=BOUND), name=stop)
        assert isinstance(connecting.outcome(BOUND), dbpool.PoolClosed)
        close_gate = server.block("close")
        ending_call = connect_gate.release
    else:
        lease = pool.connection(timeout=BOUND)
        use(lease)
        if ending == "discarded":
            server.kill(lease.raw)  # found broken on its return: a discard, not a put-back
        stopping = Caller(lambda: getattr(pool, stop)(timeout=BOUND), name=stop)
        wait_until(lambda: pool.closed, timeout=BOUND)
        close_gate = server.block("close", conn=lease.raw)
        ending_call = lease.close
    ending_thread = Caller(ending_call, name=ending)
    try:
        assert close_gate.entered.wait(BOUND), "the connection was never closed"
        assert not stopping.done.wait(0.2), f"{stop}() returned before the connection was closed"
    finally:
        close_gate.release()
    assert ending_thread.outcome(BOUND) is None
    assert stopping.outcome(BOUND) is None
    assert not server.open_connections
    s = assert_accounting(pool)
    assert (s.size, s.in_use) == (0, 0), s


def test_reopen_after_drain_refills_and_serves(make_pool, server):
    pool = make_pool(min_size=2, max_size=3)
    pool.wait(timeout=BOUND)
    pool.drain(timeout=BOUND)
    assert pool.closed and not server.open_connections
    pool.reopen()
    assert not pool.closed
    wait_until(lambda: pool.stats().idle == 2, timeout=BOUND, message="no refill after reopen()")
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    assert_accounting(pool)
    pool.close()
    assert pool.closed
    assert not server.open_connections, "close() after reopen() left connections open"


def test_reopen_after_close(make_pool, server):
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(timeout=BOUND)
    pool.close()
    pool.reopen()
    pool.wait(timeout=BOUND)
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    pool.close()
    assert not server.open_connections


def test_reopen_of_an_open_pool_is_refused(make_pool, server):
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(timeout=BOUND)
    before = pool.stats()
    with pytest.raises(dbpool.PoolError):
        pool.reopen()
    assert pool.stats() == before
    with pool.connection(timeout=BOUND) as conn:
        use(conn)


def test_reopen_restarts_the_maintenance(make_pool, server):
    pool = make_pool(min_size=0, max_size=2, idle_timeout=0.05)
    pool.drain(timeout=BOUND)
    pool.reopen()
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    wait_until(
        lambda: pool.stats().size == 0,
        timeout=BOUND,
        message="no idle reaping after reopen(): the maintenance thread is not running",
    )
    assert pool.stats().discards["idle"] >= 1


def test_a_lease_from_before_the_drain_never_rejoins_the_reopened_pool(make_pool, server):
    pool = make_pool(min_size=0, max_size=2)
    holder = hold(pool)
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0.1)
    pool.reopen()
    with pool.connection(timeout=BOUND) as conn:
        fresh = conn.raw
    assert holder.release() is None
    assert holder.raw.closed, "a lease from before the drain went back into the reopened pool"
    s = assert_accounting(pool)
    assert (s.size, s.idle, s.in_use) == (1, 1, 0), s
    assert server.open_connections == [fresh]


def test_drain_and_close_events(make_pool, server):
    pool = make_pool(min_size=0, max_size=2)
    closes: list[Any] = []
    discards: list[Any] = []
    pool.add_listener("close", lambda e: closes.append((e.connection, e.reason)))
    pool.add_listener("discard", discards.append)
    holder = hold(pool)
    idle_lease = pool.connection()
    idle = idle_lease.raw
    idle_lease.close()
    draining = Caller(pool.drain, name="drain")
    wait_until(lambda: len(closes) == 1, timeout=BOUND)
    assert holder.release() is None
    assert draining.outcome(BOUND) is None
    assert closes == [(idle, "pool_closed"), (holder.raw, "pool_closed")]
    assert discards == []


def test_drain_and_reopen_keep_the_accounting_under_load(make_pool, server):
    pool = make_pool(min_size=1, max_size=3)
    stop = threading.Event()
    unexpected: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                with pool.connection(timeout=0.2) as conn:
                    use(conn)
            except (dbpool.PoolClosed, dbpool.PoolTimeout):
                pass
            except BaseException as exc:  # reported below
                unexpected.append(exc)
                return

    workers = [Caller(worker, name=f"worker-{i}") for i in range(5)]
    try:
        for _ in range(10):
            pool.drain(timeout=BOUND)
            s = assert_accounting(pool)
            assert (s.size, s.in_use) == (0, 0), s
            pool.reopen()
            assert_accounting(pool)
    finally:
        stop.set()
        for w in workers:
            assert w.outcome(BOUND) is None
    assert not unexpected, unexpected
    pool.close()
    assert not server.open_connections


@pytest.mark.parametrize("db", SERVERS, indirect=True)
def test_drain_leaves_no_session_of_the_pool_on_the_server(db: Backend) -> None:
    tag = f"dbpool-drain-{uuid.uuid4().hex[:12]}"
    sessions: set[Any] = set()
    lock = threading.Lock()

    def configure(raw: Any) -> None:
        # Noted here, not by a connect listener added after Pool(): the refill may open a
        # connection before the listener is in place
        with lock:
            sessions.add(db.backend_id(raw))
        if db.name == "postgresql":
            raw.execute(f"SET application_name = '{tag}'")
            raw.commit()

    admin = db.connect()
    if db.name == "postgresql":
        admin.autocommit = True
    else:
        admin.autocommit(True)

    def ours() -> int:
        cur = admin.cursor()
        try:
            if db.name == "postgresql":
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (tag,)
                )
            else:
                with lock:
                    ids = sorted(sessions)
                marks = ", ".join(["%s"] * len(ids))
                cur.execute(
                    f"SELECT count(*) FROM information_schema.processlist WHERE id IN ({marks})",
                    tuple(ids),
                )
            return int(cur.fetchall()[0][0])
        finally:
            cur.close()

    with dbpool.Pool(db.connect, min_size=2, max_size=3, configure=configure) as pool:
        pool.wait(timeout=BOUND)
        holder = hold(pool)
        wait_until(lambda: ours() == len(sessions) >= 2, timeout=BOUND)
        draining = Caller(lambda: pool.drain(timeout=BOUND * 2), name="drain")
        assert not draining.done.is_set()
        assert holder.release() is None
        assert draining.outcome(BOUND * 3) is None
        wait_until(
            lambda: ours() == 0,
            timeout=BOUND,
            message="sessions of the drained pool are still on the server",
        )
        assert pool.closed


# == races and interruptions across the operations =================================================


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_check_interrupted_half_way_puts_the_other_connections_back(make_pool, server, exc):
    interrupting = threading.Event()
    interrupting.set()

    def check(raw: Any) -> None:
        if interrupting.is_set():
            interrupting.clear()
            raise exc("interrupted during check()")

    pool = make_pool(min_size=3, max_size=3, check=check)
    pool.wait(timeout=BOUND)
    with pytest.raises(exc):
        pool.check()
    s = assert_accounting(pool)
    assert s.in_use == 0, f"check() left connections counted as in use: {s}"
    assert s.discards["interrupted"] == 1, s.discards
    wait_until(lambda: pool.stats().idle == 3, timeout=BOUND, message="no refill after check()")
    leases = [pool.connection(timeout=1) for _ in range(3)]
    for lease in leases:
        lease.close()
    assert len(server.open_connections) == 3


def test_check_racing_close(make_pool, server):
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(timeout=BOUND)
    gate = server.block("ping")
    checking = Caller(pool.check, name="checking")
    assert gate.entered.wait(BOUND)
    closing = Caller(lambda: pool.close(timeout=BOUND), name="closing")
    gate.release()
    assert closing.outcome(BOUND) is None
    error = checking.outcome(BOUND)
    assert error is None or isinstance(error, dbpool.PoolClosed), repr(error)
    wait_until(
        lambda: not server.open_connections,
        timeout=BOUND,
        message="connections left open after check() raced close()",
    )
    s = pool.stats()
    assert (s.size, s.in_use, s.idle) == (0, 0, 0), s


def test_close_after_a_timed_out_drain_closes_the_leases_still_out(make_pool, server):
    pool = make_pool(min_size=0, max_size=2)
    holder = hold(pool)
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0.05)
    pool.close(timeout=0)
    assert holder.raw.closed, "close() after a timed-out drain left the lease's connection open"
    assert holder.release() is None  # returning it afterwards is harmless
    s = pool.stats()
    assert (s.size, s.in_use) == (0, 0), s
    assert not server.open_connections


def test_two_drains_at_once_both_return(make_pool, server):
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(timeout=BOUND)
    holder = hold(pool)
    first = Caller(lambda: pool.drain(timeout=BOUND), name="drain-1")
    second = Caller(lambda: pool.drain(timeout=BOUND), name="drain-2")
    wait_until(lambda: pool.closed, timeout=BOUND)
    assert holder.release() is None
    assert first.outcome(BOUND) is None and second.outcome(BOUND) is None
    assert not server.open_connections


def test_health_and_execute_on_a_drained_pool(make_pool, server):
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(timeout=BOUND)
    pool.drain(timeout=BOUND)
    health = pool.health(timeout=1)
    assert health["closed"] is True and health["ok"] is False
    with pytest.raises(dbpool.PoolClosed):
        pool.execute("SELECT 1")
    with pytest.raises(dbpool.PoolClosed):
        pool.with_connection(lambda conn: None)
    with pytest.raises(dbpool.PoolClosed):
        pool.cursor()


def test_lowering_max_size_while_a_connect_is_under_way(make_pool, server):
    pool = make_pool(min_size=0, max_size=2)
    first = pool.connection()
    gate = server.block("connect")
    connecting = Caller(lambda: pool.connection(timeout=BOUND), name="connecting")
    try:
        assert gate.entered.wait(BOUND)
        pool.resize(max_size=1)
    finally:
        gate.release()
    assert connecting.outcome(BOUND) is None  # its slot was reserved before the resize
    second = connecting.value
    s = assert_accounting(pool, resized=True)
    assert s.size == 2 and s.max_size == 1, s
    first.close()
    second.close()
    s = assert_accounting(pool, resized=True)
    assert s.size <= 1, f"the pool stayed above its new max_size once everything came back: {s}"
    assert s.discards["resized"] == 1, s.discards


def test_resize_racing_drain_and_reopen(make_pool, server):
    pool = make_pool(min_size=1, max_size=3)
    pool.wait(timeout=BOUND)
    stop = threading.Event()
    unexpected: list[BaseException] = []

    def resizer() -> None:
        rng = random.Random(3)
        while not stop.is_set():
            try:
                high = rng.randint(1, 3)
                pool.resize(min_size=rng.randint(0, high), max_size=high)
            except BaseException as exc:  # reported below
                unexpected.append(exc)
                return

    def borrower() -> None:
        while not stop.is_set():
            try:
                with pool.connection(timeout=0.2) as conn:
                    use(conn)
            except (dbpool.PoolClosed, dbpool.PoolTimeout):
                pass
            except BaseException as exc:  # reported below
                unexpected.append(exc)
                return

    threads = [Caller(resizer, name="resizer")] + [
        Caller(borrower, name=f"borrower-{i}") for i in range(3)
    ]
    try:
        for _ in range(15):
            pool.drain(timeout=BOUND)
            assert pool.stats().in_use == 0
            pool.reopen()
    finally:
        stop.set()
        for thread in threads:
            assert thread.outcome(BOUND) is None
    assert not unexpected, unexpected
    pool.close()
    s = pool.stats()
    assert (s.size, s.in_use, s.opening) == (0, 0, 0), s
    wait_until(lambda: not server.open_connections, timeout=BOUND)
