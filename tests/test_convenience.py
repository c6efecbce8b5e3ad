"""The convenience calls (``pool.execute``, ``with_connection``, ``cursor``), the presets, and
the statistics added with them (waits and their histogram, hold and connect times, discards by
reason), on the fake driver and against SQLite, PostgreSQL and MariaDB.

Waits are bounded and synchronised on Events and the pool's own gauges.  A few tests sleep
*inside* a lease or a hook: that is the duration being measured (asserted only as a lower
bound), never a way of waiting for another thread.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import threading
import time
import uuid
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import (
    DISCARD_REASONS,
    Backend,
    Caller,
    assert_accounting,
    rows,
    scalar,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

BOUND = 10.0
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)


def as_tuples(result: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in result]


def count_rows(db: Backend, table: str) -> int:
    """Rows in ``table`` as a new connection of the test's own sees them (committed ones)."""
    raw = db.connect()
    try:
        return int(scalar(raw, f"SELECT count(*) FROM {table}"))
    finally:
        raw.close()


def unique(name: str) -> str:
    """A table name no other run of these tests uses at the same time."""
    return f"{name}_{uuid.uuid4().hex[:8]}"


def presets() -> Any:
    return importlib.import_module("dbpool.presets")


# == execute() =====================================================================================


def test_execute_returns_the_rows(db: Backend) -> None:
    with dbpool.Pool(db.connect, min_size=0, max_size=2) as pool:
        result = pool.execute("SELECT 1")
        assert isinstance(result, list)
        assert as_tuples(result) == [(1,)]
        s = assert_accounting(pool)
        assert s.in_use == 0 and s.idle == 1


def test_execute_passes_the_parameters_through(db: Backend) -> None:
    ph = db.placeholder
    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        assert as_tuples(pool.execute(f"SELECT {ph}", (42,))) == [(42,)]
        assert as_tuples(pool.execute(f"SELECT {ph}, {ph}", (7, "seven"))) == [(7, "seven")]


def test_execute_commits_dml(db: Backend) -> None:
    table = db.fresh_table(unique("dbpool_execute_dml"))
    ph = db.placeholder
    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        result = pool.execute(f"INSERT INTO {table} (id, v) VALUES ({ph}, {ph})", (1, "one"))
        assert result == []
        assert count_rows(db, table) == 1, "the insert was not committed"
        pool.execute(f"UPDATE {table} SET v = {ph} WHERE id = {ph}", ("uno", 1))
        assert as_tuples(pool.execute(f"SELECT v FROM {table} WHERE id = {ph}", (1,))) == [("uno",)]
        raw = db.connect()
        try:
            assert rows(raw, f"SELECT v FROM {table}") == [("uno",)]
        finally:
            raw.close()
        assert pool.stats().in_use == 0


@pytest.mark.postgresql
def test_execute_returns_the_rows_of_dml_with_returning(pg_connect: Any) -> None:
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        pool.execute("CREATE TEMP TABLE IF NOT EXISTS dbpool_ret (id serial, v text)")
        # A temporary table lives as long as its session: a pool of one keeps the session.
        assert as_tuples(
            pool.execute("INSERT INTO dbpool_ret (v) VALUES (%s) RETURNING v", ("x",))
        ) == [("x",)]


def test_a_failing_statement_raises_the_driver_error_and_leaves_a_clean_connection(
    db: Backend,
) -> None:
    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        pool.execute("SELECT 1")
        with pytest.raises(db.driver.Error):
            pool.execute("SELECT * FROM dbpool_no_such_table")
        s = assert_accounting(pool)
        assert s.in_use == 0, "execute() left its lease out"
        assert (s.size, s.idle) == (1, 1), s
        assert sum(s.discards.values()) == 0, "a rolled-back connection need not be discarded"
        # The same connection, clean: not left inside a failed transaction.
        assert as_tuples(pool.execute("SELECT 1")) == [(1,)]
        assert pool.stats().created == 1


def test_a_failing_dml_statement_commits_nothing(db: Backend) -> None:
    table = db.fresh_table(unique("dbpool_execute_fail"))
    ph = db.placeholder
    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        with pytest.raises(db.driver.Error):
            pool.execute(
                f"INSERT INTO {table} (id, v) VALUES ({ph}, {ph}), ({ph}, {ph})", (1, "a", 1, "b")
            )
        assert count_rows(db, table) == 0
        assert pool.stats().in_use == 0
        pool.execute(f"INSERT INTO {table} (id, v) VALUES ({ph}, {ph})", (1, "c"))
        assert count_rows(db, table) == 1


def test_execute_on_the_fake_driver_commits_once_and_returns_scripted_rows(make_pool, server):
    server.set_result("SELECT a, b FROM t", [(1, "x"), (2, "y")], columns=("a", "b"))
    pool = make_pool(max_size=1)
    assert pool.execute("SELECT a, b FROM t") == [(1, "x"), (2, "y")]
    assert server.count("commit") == 1
    assert pool.execute("DELETE FROM t") == []
    assert server.count("commit") == 2
    assert not server.in_transaction(server.connections[0])
    assert pool.stats().in_use == 0


def test_execute_rolls_back_and_reraises_the_same_error(make_pool, server):
    pool = make_pool(max_size=1)
    boom = fakedb.ProgrammingError("syntax error at or near 'SELEC'")
    server.fail_next("execute", boom)
    with pytest.raises(fakedb.ProgrammingError) as info:
        pool.execute("SELEC 1")
    assert info.value is boom
    assert server.count("commit") == 0
    assert server.count("rollback") >= 1
    s = assert_accounting(pool)
    assert (s.in_use, s.idle) == (0, 1)


def test_execute_when_the_commit_fails(make_pool, server):
    pool = make_pool(max_size=1)
    server.fail_next("commit", fakedb.OperationalError)
    with pytest.raises(fakedb.OperationalError):
        pool.execute("UPDATE t SET a = 1")
    s = assert_accounting(pool)
    assert s.in_use == 0
    assert pool.execute("SELECT 1") == [(1,)]


def test_execute_honours_its_timeout(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.connection():
        with pytest.raises(dbpool.PoolTimeout):
            pool.execute("SELECT 1", timeout=0.1)
    assert pool.stats().timeouts == 1


# == with_connection() =============================================================================


def test_with_connection_returns_the_value_of_fn(db: Backend) -> None:
    seen: list[Any] = []

    def fn(conn: Any) -> Any:
        seen.append(conn)
        assert pool.stats().in_use == 1
        return scalar(conn, "SELECT 1")

    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        assert pool.with_connection(fn) == 1
        assert isinstance(seen[0], dbpool.Connection)
        assert seen[0].released
        assert pool.stats().in_use == 0


def test_with_connection_releases_on_an_exception(make_pool, server):
    pool = make_pool(max_size=1)
    boom = KeyError("the application failed")

    def fn(conn: Any) -> None:
        conn.cursor().execute("UPDATE t SET a = 1")
        raise boom

    with pytest.raises(KeyError) as info:
        pool.with_connection(fn)
    assert info.value is boom
    s = assert_accounting(pool)
    assert (s.in_use, s.idle) == (0, 1)
    assert not server.in_transaction(server.connections[0]), "the work was not rolled back"


def test_with_connection_does_not_commit(make_pool, server):
    pool = make_pool(max_size=1)
    pool.with_connection(lambda conn: conn.cursor().execute("UPDATE t SET a = 1"))
    assert server.count("commit") == 0
    assert server.count("rollback") == 1


def test_with_connection_does_not_commit_on_a_real_server(db: Backend) -> None:
    table = db.fresh_table(unique("dbpool_with_connection"))
    ph = db.placeholder
    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        pool.with_connection(
            lambda conn: conn.cursor().execute(
                f"INSERT INTO {table} (id, v) VALUES ({ph}, {ph})", (1, "x")
            )
        )
        assert count_rows(db, table) == 0

        def commit_it(conn: Any) -> None:
            conn.cursor().execute(f"INSERT INTO {table} (id, v) VALUES ({ph}, {ph})", (2, "y"))
            conn.commit()

        pool.with_connection(commit_it)
        assert count_rows(db, table) == 1


def test_with_connection_honours_its_timeout(make_pool, server):
    pool = make_pool(max_size=1)
    called: list[Any] = []
    with pool.connection():
        with pytest.raises(dbpool.PoolTimeout):
            pool.with_connection(called.append, timeout=0.1)
    assert called == []


# == cursor() ======================================================================================


@pytest.mark.postgresql
def test_a_server_side_cursor_streams_a_large_result_holding_its_lease(pg_connect: Any) -> None:
    n = 100_000
    with dbpool.Pool(pg_connect, min_size=0, max_size=2) as pool:
        with pool.cursor(name="s") as cur:
            assert isinstance(cur, dbpool.PoolCursor)
            lease = cur.connection
            assert isinstance(lease, dbpool.Connection)
            cur.execute("SELECT generate_series(1, %s)", (n,))
            assert pool.stats().in_use == 1
            count = total = 0
            for (value,) in cur:
                if count == 0:
                    # The rows come from a cursor on the server, not from one big fetch.
                    names = [r[0] for r in lease.raw.execute("SELECT name FROM pg_cursors")]
                    assert "s" in names, names
                count += 1
                total += value
            assert (count, total) == (n, n * (n + 1) // 2)
            assert pool.stats().in_use == 1
        s = assert_accounting(pool)
        assert s.in_use == 0 and s.idle == 1
        assert lease.released


@pytest.mark.mysql
def test_an_unbuffered_cursor_streams_on_mariadb(mysql_connect: Any) -> None:
    import pymysql.cursors

    with dbpool.Pool(mysql_connect, min_size=0, max_size=1) as pool:
        cur = pool.cursor(pymysql.cursors.SSCursor)
        try:
            cur.execute("SELECT seq FROM seq_1_to_100000")
            assert pool.stats().in_use == 1
            assert sum(1 for _ in cur) == 100_000
        finally:
            cur.close()
        s = assert_accounting(pool)
        assert s.in_use == 0
        assert as_tuples(pool.execute("SELECT 1")) == [(1,)]  # the connection was left usable


def test_cursor_on_every_backend(db: Backend) -> None:
    sql = {
        "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500) "
        "SELECT i FROM n",
        "postgresql": "SELECT generate_series(1, 500)",
        "mysql": "SELECT seq FROM seq_1_to_500",
    }[db.name]
    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        cur = pool.cursor()
        cur.execute(sql)
        assert cur.description is not None
        assert tuple(cur.fetchone()) == (1,)
        assert [tuple(r) for r in cur.fetchmany(2)] == [(2,), (3,)]
        assert sum(1 for _ in cur) == 497
        assert pool.stats().in_use == 1
        cur.close()
        assert pool.stats().in_use == 0
        with pytest.raises(Exception):  # noqa: B017 - any error, as long as it refuses
            cur.execute(sql)
        assert pool.stats().in_use == 0


def test_closing_a_cursor_twice_returns_its_lease_once(make_pool, server):
    pool = make_pool(max_size=1)
    cur = pool.cursor()
    cur.execute("SELECT 1")
    cur.close()
    cur.close()
    s = assert_accounting(pool)
    assert (s.in_use, s.idle, s.returned) == (0, 1, 1), s


def test_a_cursor_rolls_back_uncommitted_work_on_close(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        raw = cur.connection.raw
    assert not server.in_transaction(raw)
    assert server.count("rollback") == 1 and server.count("commit") == 0


@pytest.mark.postgresql
def test_a_cursor_does_not_commit_on_postgresql(pg_connect: Any) -> None:
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        pool.execute("CREATE TEMP TABLE IF NOT EXISTS dbpool_cur (v int)")
        with pool.cursor() as cur:
            cur.execute("INSERT INTO dbpool_cur VALUES (1)")
        assert as_tuples(pool.execute("SELECT count(*) FROM dbpool_cur")) == [(0,)]
        with pool.cursor() as cur:
            cur.execute("INSERT INTO dbpool_cur VALUES (2)")
            cur.connection.commit()
        assert as_tuples(pool.execute("SELECT count(*) FROM dbpool_cur")) == [(1,)]


def test_a_garbage_collected_cursor_warns_and_returns_its_lease(make_pool, server):
    pool = make_pool(max_size=1)
    cur = pool.cursor()
    cur.execute("SELECT 1")
    assert pool.stats().in_use == 1
    with pytest.warns(ResourceWarning):
        del cur
        gc.collect()
    with pool.connection(timeout=2):  # the lease came back: a pool of one serves again
        pass
    wait_until(lambda: pool.stats().in_use == 0, timeout=BOUND)
    assert_accounting(pool)


def test_a_cursor_the_driver_refuses_returns_its_lease(make_pool, server):
    pool = make_pool(max_size=1)
    with pytest.raises(TypeError):
        pool.cursor("the fake driver's cursor() takes no arguments")
    s = assert_accounting(pool)
    assert s.in_use == 0


def test_cursor_honours_its_timeout_and_keeps_it_from_the_driver(make_pool, server):
    pool = make_pool(max_size=1)
    with pool.connection():
        with pytest.raises(dbpool.PoolTimeout):
            pool.cursor(timeout=0.1)
    with pool.cursor(timeout=1) as cur:  # not passed to the fake cursor(), which takes none
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]


# == presets =======================================================================================


PRESET_VALUES = {
    "production": dict(
        min_size=2,
        max_size=10,
        acquire_timeout=10,
        idle_timeout=300,
        max_lifetime=1800,
        validate_after=1.0,
        max_waiting=100,
        leak_timeout=None,
        session_reset=None,
    ),
    "development": dict(
        min_size=0,
        max_size=5,
        acquire_timeout=5,
        validate_after=0,
        leak_timeout=30,
        session_reset="discard",
    ),
    "test": dict(
        min_size=0,
        max_size=2,
        acquire_timeout=2,
        idle_timeout=None,
        max_lifetime=None,
        validate_after=0,
        leak_timeout=5,
        session_reset="discard",
        reconnect_delay=0.05,
        reconnect_max_delay=0.5,
    ),
}


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_a_preset_has_its_documented_values_and_makes_a_pool(name, server):
    options = getattr(presets(), name)()
    assert isinstance(options, dict)
    for key, value in PRESET_VALUES[name].items():
        assert key in options, f"{name}() lacks {key}"
        assert options[key] == value, f"{name}()[{key!r}] is {options[key]!r}, not {value!r}"
    with dbpool.Pool(server.connect, **options) as pool:
        pool.wait(timeout=BOUND)
        with pool.connection(timeout=BOUND) as conn:
            conn.cursor().execute("SELECT 1")
        s = pool.stats()
        assert (s.min_size, s.max_size) == (options["min_size"], options["max_size"])


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_a_preset_takes_overrides(name, server):
    options = getattr(presets(), name)(max_size=20, acquire_timeout=1.5)
    assert options["max_size"] == 20 and options["acquire_timeout"] == 1.5
    assert options["min_size"] == PRESET_VALUES[name]["min_size"]
    with dbpool.Pool(server.connect, **options) as pool:
        assert pool.max_size == 20


@pytest.mark.parametrize(
    ("name", "override", "sizes"),
    [
        ("production", dict(max_size=1), (1, 1)),
        ("test", dict(min_size=3), (3, 3)),
        ("development", dict(max_size=3), (0, 3)),
    ],
)
def test_a_size_override_moves_the_presets_other_size_it_would_clash_with(
    name, override, sizes, server
):
    # production(max_size=1) kept the preset's min_size=2, which Pool() refused: "min_size (2)
    # must not exceed max_size (1)", though the caller gave no min_size
    options = getattr(presets(), name)(**override)
    with dbpool.Pool(server.connect, **options) as pool:
        assert (pool.min_size, pool.max_size) == sizes


@pytest.mark.parametrize(
    ("override", "delays"),
    [
        (dict(reconnect_delay=1.0), (1.0, 1.0)),
        (dict(reconnect_max_delay=0.01), (0.01, 0.01)),
        (dict(reconnect_delay=0.2), (0.2, 0.5)),  # no clash: the preset's maximum stays
    ],
)
def test_a_reconnect_delay_override_moves_the_presets_other_delay_it_would_clash_with(
    override, delays, server
):
    # test(reconnect_delay=1.0) kept the preset's reconnect_max_delay=0.5, which Pool() refused:
    # "reconnect_max_delay (0.5) must not be below reconnect_delay (1.0)", though the caller
    # gave no reconnect_max_delay
    options = presets().test(**override)
    assert (options["reconnect_delay"], options["reconnect_max_delay"]) == delays
    with dbpool.Pool(server.connect, **options) as pool:
        with pool.connection(timeout=BOUND):
            pass


def test_reconnect_delays_both_given_to_a_preset_are_left_for_pool_to_check(server):
    options = presets().test(reconnect_delay=2.0, reconnect_max_delay=1.0)
    assert (options["reconnect_delay"], options["reconnect_max_delay"]) == (2.0, 1.0)
    with pytest.raises(ValueError, match="reconnect_max_delay"):
        dbpool.Pool(server.connect, **options)


def test_sizes_both_given_to_a_preset_are_left_for_pool_to_check(server):
    options = presets().production(min_size=3, max_size=1)
    assert (options["min_size"], options["max_size"]) == (3, 1)
    with pytest.raises(ValueError, match="min_size"):
        dbpool.Pool(server.connect, **options)


def test_a_preset_takes_any_pool_option_as_an_override(server):
    """Demanding reading: the overrides are Pool keywords, so one the preset does not set (a
    name, a hook) is accepted too."""
    configured: list[Any] = []
    options = presets().production(name="svc", configure=configured.append, min_size=0)
    assert options["name"] == "svc"
    with dbpool.Pool(server.connect, **options) as pool:
        with pool.connection(timeout=BOUND):
            pass
        assert pool.name == "svc" and len(configured) == 1


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_an_unknown_override_names_the_valid_options(name):
    with pytest.raises(TypeError) as info:
        getattr(presets(), name)(max_sise=20)
    message = str(info.value)
    assert "max_sise" in message
    assert "max_size" in message and "min_size" in message, message


@pytest.mark.parametrize("name", sorted(PRESET_VALUES))
def test_a_preset_returns_a_fresh_dict_each_call(name):
    make = getattr(presets(), name)
    first = make()
    assert first is not make()
    first["max_size"] = 999
    first["invented"] = True
    again = make()
    assert again["max_size"] == PRESET_VALUES[name]["max_size"]
    assert "invented" not in again


# == stats =========================================================================================


def test_the_new_stats_fields_of_a_fresh_pool(make_pool, server):
    pool = make_pool(max_size=2)
    s = pool.stats()
    assert s.wait_buckets == BUCKETS
    assert s.wait_histogram == (0,) * len(BUCKETS)
    assert isinstance(s.wait_histogram, tuple)
    assert s.wait_time == 0.0 and s.held_time == 0.0 and s.connect_time == 0.0
    assert s.returned == 0
    assert set(s.discards) == DISCARD_REASONS == {r.value for r in dbpool.DiscardReason}
    assert all(v == 0 for v in s.discards.values())


def test_a_stats_snapshot_cannot_change_the_pool(make_pool, server):
    pool = make_pool(max_size=2)
    s = pool.stats()
    try:
        s.discards["broken"] = 99
    except TypeError:
        pass  # an immutable mapping is fine too
    assert pool.stats().discards["broken"] == 0


def test_as_dict_is_a_json_serialisable_plain_dict(make_pool, server):
    pool = make_pool(max_size=2)
    with pool.connection():
        pass
    s = pool.stats()
    d = s.as_dict()
    assert type(d) is dict
    assert type(d["discards"]) is dict
    field_names = set(s.__dataclass_fields__)
    assert set(d) == field_names
    assert d["acquired"] == 1 and d["name"] == pool.name
    assert d["wait_buckets"][-1] is None  # the unbounded bucket: strict JSON has no infinity
    assert d["wait_buckets"][:-1] == list(s.wait_buckets[:-1])
    text = json.dumps(d, allow_nan=False)
    again = json.loads(text)
    assert again["wait_histogram"] == list(s.wait_histogram)
    d["discards"]["broken"] = 5  # a copy: the snapshot is untouched
    assert s.discards["broken"] == 0


def test_immediate_checkouts_wait_zero_and_land_in_the_first_bucket(make_pool, server):
    pool = make_pool(min_size=1, max_size=1, validate_after=None)
    pool.wait(timeout=BOUND)
    for _ in range(5):
        with pool.connection():
            pass
    s = pool.stats()
    assert s.acquired == 5
    assert s.wait_time == 0.0, "a checkout served from the idle stack must count as no wait"
    assert s.wait_histogram == (5,) + (0,) * (len(BUCKETS) - 1)


def test_a_forced_wait_lands_above_the_first_bucket(make_pool, server):
    pool = make_pool(min_size=1, max_size=1, validate_after=None)
    pool.wait(timeout=BOUND)
    release = threading.Event()
    taken = threading.Event()

    def holder() -> None:
        with pool.connection(timeout=BOUND):
            taken.set()
            assert release.wait(BOUND)

    holding = Caller(holder, name="holder")
    assert taken.wait(BOUND)
    waiter = Caller(lambda: pool.connection(timeout=BOUND).close(), name="waiter")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    pause = 0.03
    time.sleep(pause)  # the wait being measured; the order comes from `waiting` above
    release.set()
    assert holding.outcome(BOUND) is None and waiter.outcome(BOUND) is None
    s = pool.stats()
    assert s.acquired == 2
    assert sum(s.wait_histogram) == s.acquired
    assert s.wait_histogram[0] == 1, s.wait_histogram  # the holder's, served at once
    # 0.03 s or more lands in the bucket bounded by 0.05 or a later one.
    assert sum(s.wait_histogram[BUCKETS.index(0.05) :]) == 1, s.wait_histogram
    assert s.wait_time >= pause


def test_a_checkout_that_fails_validation_is_never_counted(make_pool, server):
    """Counters only grow (metrics export them as Prometheus counters, where a fall reads as
    a restart): a connection is counted in ``acquired`` once it is handed out, not while it
    is being validated."""
    seen: list[int] = []

    def check(raw: Any) -> None:
        seen.append(pool.stats().acquired)  # what a scrape at this moment reports
        raise RuntimeError("not fit")

    pool = make_pool(min_size=1, max_size=1, check=check, validate_after=0, acquire_timeout=0)
    pool.wait(timeout=BOUND)
    with pytest.raises(dbpool.PoolTimeout):
        pool.connection()
    assert seen == [0]
    s = pool.stats()
    assert (s.acquired, sum(s.wait_histogram)) == (0, 0), s


def test_a_waited_checkout_is_counted_once_in_its_own_bucket(make_pool, server):
    """A checkout handed a connection after a wait is counted with its wait, once: never
    first as a wait of zero and then moved to its bucket (the first bucket would fall)."""
    pool = make_pool(min_size=1, max_size=1, validate_after=None)
    pool.wait(timeout=BOUND)
    snapshots: list[dbpool.PoolStats] = []

    def take_snapshot(event: dbpool.PoolEvent) -> None:
        snapshots.append(pool.stats())

    holder = pool.connection()
    waiter = Caller(lambda: pool.connection(timeout=BOUND).close(), name="waiter")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    pool.add_listener("checkout", take_snapshot)
    time.sleep(0.01)  # a wait above the first bucket's bound, 1 ms
    holder.close()  # hands the connection to the waiter, whose checkout event takes a snapshot
    assert waiter.outcome(BOUND) is None
    (during,) = snapshots
    after = pool.stats()
    assert during.acquired == after.acquired == 2
    assert during.wait_histogram == after.wait_histogram, (during, after)
    assert after.wait_histogram[0] == 1  # the holder's: served at once


def test_counters_never_fall_under_load(make_pool, server):
    """Snapshots taken while threads queue for one connection: every counter, and every
    cumulative bucket of the wait histogram, is at least what the one before showed."""
    pool = make_pool(min_size=1, max_size=1, validate_after=None)
    pool.wait(timeout=BOUND)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            with pool.connection(timeout=BOUND):
                pass

    workers = [Caller(work, name=f"worker-{i}") for i in range(4)]
    falls = []
    previous = pool.stats()
    for _ in range(2000):
        s = pool.stats()
        for field in ("acquired", "returned", "created", "closed", "wait_time", "held_time"):
            if getattr(s, field) < getattr(previous, field):
                falls.append((field, getattr(previous, field), getattr(s, field)))
        for i in range(len(BUCKETS)):
            if sum(s.wait_histogram[: i + 1]) < sum(previous.wait_histogram[: i + 1]):
                falls.append((f"bucket {BUCKETS[i]}", previous.wait_histogram, s.wait_histogram))
        previous = s
    stop.set()
    for worker in workers:
        assert worker.outcome(BOUND) is None
    assert not falls, falls[:5]
    assert previous.acquired > 0


def test_the_histogram_sums_to_acquired_through_timeouts_and_failures(make_pool, server):
    pool = make_pool(max_size=2, validate_after=0, reconnect_delay=0.01, reconnect_max_delay=0.02)
    a = pool.connection()
    b = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.connection(timeout=0.05)
    a.close()
    b.close()
    server.kill(server.connections[0])
    server.kill(server.connections[1])
    with pool.connection():  # two failed validations, then a connect
        pass
    server.down()
    server.kill(server.connections[-1])
    with pytest.raises(fakedb.OperationalError):
        pool.connection(timeout=1)
    server.up()
    for _ in range(3):
        pool.execute("SELECT 1")
    s = assert_accounting(pool)
    assert s.acquired == 6, s
    assert sum(s.wait_histogram) == s.acquired, (s.wait_histogram, s.acquired)
    assert len(s.wait_histogram) == len(BUCKETS)


def test_held_time_grows_by_the_hold(make_pool, server):
    pool = make_pool(max_size=1)
    hold = 0.05
    with pool.connection():
        time.sleep(hold)  # the hold being measured
    s = pool.stats()
    assert s.returned == 1
    assert s.held_time >= hold
    held_before = s.held_time
    lease = pool.connection()
    assert pool.stats().held_time == held_before, "held_time is counted at return"
    time.sleep(hold)  # the hold being measured
    lease.close()
    s = pool.stats()
    assert s.returned == 2
    assert s.held_time >= held_before + hold


def test_returned_counts_leases_whose_connection_was_discarded(make_pool, server):
    pool = make_pool(max_size=1)
    server.fail_next("rollback", fakedb.OperationalError)
    with pool.connection() as conn:
        conn.cursor().execute("UPDATE t SET a = 1")
    s = pool.stats()
    assert s.discards["reset_failed"] == 1
    assert s.returned == 1


def test_connect_time_counts_successful_connects_and_configure(make_pool, server):
    server.connect_delay = 0.02
    pause = 0.03
    pool = make_pool(max_size=2, configure=lambda raw: time.sleep(pause))
    with pool.connection():
        pass
    s = pool.stats()
    assert s.connect_time >= 0.02 + pause, s.connect_time
    before = s.connect_time
    server.down()
    with pool.connection() as held:
        assert held  # the idle one: no connect
        with pytest.raises(fakedb.OperationalError):
            pool.connection(timeout=2)  # a second one must connect, and fails
    assert pool.stats().connect_time == before, "a failed connect was counted"
    assert pool.stats().connect_errors == 1


def test_expired_connections_are_counted(make_pool, server):
    pool = make_pool(min_size=0, max_size=1, max_lifetime=0.05)
    with pool.connection():
        pass
    wait_until(
        lambda: pool.stats().discards["expired"] >= 1,
        timeout=BOUND,
        message="a connection past max_lifetime was not counted as expired",
    )
    s = assert_accounting(pool)
    assert s.discards["idle"] == 0


def test_idle_connections_closed_by_idle_timeout_are_counted(make_pool, server):
    pool = make_pool(min_size=0, max_size=2, idle_timeout=0.05)
    a, b = pool.connection(), pool.connection()
    a.close()
    b.close()
    wait_until(lambda: pool.stats().size == 0, timeout=BOUND)
    s = pool.stats()
    assert s.discards["idle"] == 2, s.discards
    assert s.discards["expired"] == 0


def test_discards_by_reason_for_broken_and_session_reset(make_pool, server):
    pool = make_pool(max_size=1, validate_after=0, session_reset="reconnect")
    with pool.connection():
        pass  # not used: kept
    server.kill(server.connections[0])
    with pool.connection() as conn:  # the dead one fails validation
        conn.cursor().execute("SELECT 1")  # used: session_reset="reconnect" drops it
    s = pool.stats()
    assert s.discards["broken"] == 1, s.discards
    assert s.discards["session_reset"] == 1, s.discards
    assert sum(s.discards.values()) <= s.closed


def test_every_discard_is_a_close(make_pool, server):
    pool = make_pool(max_size=3, validate_after=0, idle_timeout=0.05, max_lifetime=30)
    leases = [pool.connection() for _ in range(3)]
    for lease in leases:
        lease.cursor().execute("SELECT 1")
        lease.close()
    server.kill(server.connections[0])
    pool.check()
    pool.resize(max_size=1)
    wait_until(lambda: pool.stats().size == 0, timeout=BOUND)
    s = pool.stats()
    assert sum(s.discards.values()) == s.closed, (s.discards, s.closed)


def test_a_connection_past_max_lifetime_is_expired_on_return(make_pool, server):
    pool = make_pool(min_size=0, max_size=1, max_lifetime=0.05)
    reasons: list[Any] = []
    pool.add_listener("discard", lambda e: reasons.append(e.reason))
    with pool.connection():
        time.sleep(0.1)  # the lease outlives the connection's lifetime
    s = pool.stats()
    assert s.discards["expired"] == 1 and s.size == 0, s
    assert reasons == ["expired"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_validation_ping_is_counted(make_pool, server, exc):
    pool = make_pool(min_size=0, max_size=1, validate_after=0)
    with pool.connection():
        pass
    server.fail_next("ping", exc)
    with pytest.raises(exc):
        pool.connection()
    s = assert_accounting(pool)
    assert s.discards["interrupted"] == 1, s.discards
    assert s.in_use == 0


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_execute_interrupted_mid_statement_returns_its_lease(make_pool, server, exc):
    pool = make_pool(min_size=0, max_size=1)
    server.fail_next("execute", exc)
    with pytest.raises(exc):
        pool.execute("UPDATE t SET a = 1")
    s = assert_accounting(pool)
    assert s.in_use == 0, s
    assert s.returned == 1
    assert pool.execute("SELECT 1") == [(1,)]
