"""dbpool.metrics: the Prometheus collector, scraped for real.

Each test registers a collector on a fresh ``CollectorRegistry``, drives a pool on a real
database, renders the registry in the text exposition format and parses it back, so what is
checked is what a Prometheus server would read.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading
import urllib.request
from typing import Any

import pytest

import dbpool
from tests.conftest import Caller, wait_for_child, wait_until

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import dbpool.metrics  # noqa: E402
from dbpool.metrics import PoolCollector, register  # noqa: E402

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

COUNTERS = {
    "dbpool_acquires_total": "acquired",
    "dbpool_hold_seconds_total": "held_time",
    "dbpool_returns_total": "returned",
    "dbpool_connections_created_total": "created",
    "dbpool_connections_closed_total": "closed",
    "dbpool_connect_seconds_total": "connect_time",
    "dbpool_connect_errors_total": "connect_errors",
    "dbpool_timeouts_total": "timeouts",
    "dbpool_leak_warnings_total": "leak_warnings",
    "dbpool_leaked_total": "leaked",
}
GAUGES = {
    "dbpool_connections_max": "max_size",
    "dbpool_connections_min": "min_size",
    "dbpool_waiting": "waiting",
}


# -- helpers -----------------------------------------------------------------------------------


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """The families' types by name, and every sample keyed by (name, labels)."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return types, samples


def scrape(registry: Any) -> tuple[dict[str, str], Samples]:
    return parse(generate_latest(registry).decode("utf-8"))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def pool_names(samples: Samples) -> set[str]:
    """The ``pool`` label values of ``dbpool_up``."""
    return {dict(labels)["pool"] for name, labels in samples if name == "dbpool_up"}


def check_against_stats(samples: Samples, stats: dbpool.PoolStats, *, up: bool) -> None:
    """Every series of one pool equals its stats() field; the histogram is cumulative."""
    pool = stats.name
    assert value(samples, "dbpool_up", pool=pool) == (1.0 if up else 0.0)
    for state in ("idle", "in_use", "opening"):
        assert value(samples, "dbpool_connections", pool=pool, state=state) == getattr(stats, state)
    for name, field in {**COUNTERS, **GAUGES}.items():
        assert value(samples, name, pool=pool) == pytest.approx(getattr(stats, field)), name
    assert set(stats.discards) == {reason.value for reason in dbpool.DiscardReason}
    for reason, count in stats.discards.items():
        assert value(samples, "dbpool_discards_total", pool=pool, reason=reason) == count

    # The histogram: one bucket per bound, each the running total of the pool's counts.
    running = 0
    previous = -1.0
    for bound, count in zip(stats.wait_buckets, stats.wait_histogram):
        running += count
        le = "+Inf" if bound == math.inf else repr(float(bound))
        bucket = value(samples, "dbpool_acquire_wait_seconds_bucket", pool=pool, le=le)
        assert bucket == running
        assert bucket >= previous
        previous = bucket
    buckets = [
        labels
        for name, labels in samples
        if name == "dbpool_acquire_wait_seconds_bucket" and dict(labels)["pool"] == pool
    ]
    assert len(buckets) == len(stats.wait_buckets)
    total = value(samples, "dbpool_acquire_wait_seconds_count", pool=pool)
    assert value(samples, "dbpool_acquire_wait_seconds_bucket", pool=pool, le="+Inf") == total
    assert total == sum(stats.wait_histogram) == stats.acquired
    assert value(samples, "dbpool_acquire_wait_seconds_sum", pool=pool) == pytest.approx(
        stats.wait_time
    )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def connect(request: pytest.FixtureRequest) -> Any:
    fixture = "sqlite_connect" if request.param == "sqlite" else "pg_connect"
    return request.getfixturevalue(fixture)


def drive(pool: dbpool.Pool[Any]) -> None:
    """Checkouts, a wait, a timeout and a discard, on a pool of max_size 1."""
    for _ in range(3):
        with pool.connection() as conn:
            conn.cursor().execute("select 1")

    # A caller that waits until the connection comes back.
    lease = pool.connection()
    waiter = Caller(lambda: pool.with_connection(lambda conn: None), name="waiter")
    wait_until(lambda: pool.stats().waiting == 1)
    # And one that gives up.
    timeouts = pool.stats().timeouts
    timed_out = Caller(lambda: pool.connection(timeout=0.05), name="timed-out")
    assert isinstance(timed_out.outcome(), dbpool.PoolTimeout)
    assert pool.stats().timeouts == timeouts + 1
    lease.close()
    assert waiter.outcome() is None

    # A connection closed under its lease is dropped when it comes back.
    discards = sum(pool.stats().discards.values())
    with pool.connection() as conn:
        conn.raw.close()
    assert sum(pool.stats().discards.values()) == discards + 1


# -- the scrape matches the pool's statistics ----------------------------------------------------


def test_scrape_matches_stats(connect: Any) -> None:
    registry = CollectorRegistry()
    with dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5, name="main") as pool:
        collector = register(pool, registry=registry)
        assert collector.pools == (pool,)
        drive(pool)
        types, samples = scrape(registry)
        stats = pool.stats()  # the pool is quiet: the same numbers as the scrape's snapshot
        check_against_stats(samples, stats, up=True)
        assert stats.acquired >= 5 and stats.timeouts == 1 and stats.returned >= 5
        assert sum(stats.discards.values()) == 1
        assert value(samples, "dbpool_acquire_wait_seconds_sum", pool="main") > 0
        assert pool_names(samples) == {"main"}

    assert types["dbpool_acquire_wait_seconds"] == "histogram"
    assert types["dbpool_connections"] == "gauge"
    assert types["dbpool_up"] == "gauge"
    for name in COUNTERS:
        assert types[name[: -len("_total")]] == "counter"
    assert types["dbpool_discards"] == "counter"


def test_served_over_http(sqlite_pools: Any) -> None:
    """A real scrape: the registry served on a free port and fetched with urllib, in the
    classic text format and in OpenMetrics (what Prometheus asks for first)."""
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )

    pool = sqlite_pools(max_size=2, name="served")
    registry = CollectorRegistry()
    register(pool, registry=registry)
    with pool.connection() as conn:
        conn.cursor().execute("select 1")

    def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            assert response.status == 200
            return response.headers["Content-Type"], response.read().decode("utf-8")

    server, thread = serve(registry)
    try:
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}/metrics"
        content_type, text = fetch(url)
        om_type, om_text = fetch(url, "application/openmetrics-text; version=1.0.0")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert content_type.startswith("text/plain")
    _, samples = parse(text)
    check_against_stats(samples, pool.stats(), up=True)
    assert value(samples, "dbpool_acquires_total", pool="served") == 1

    assert om_type.startswith("application/openmetrics-text")
    # The strict parser (untyped in prometheus_client)
    families = {family.name: family for family in parse_openmetrics(om_text)}  # type: ignore[no-untyped-call]
    assert families["dbpool_acquire_wait_seconds"].unit == "seconds"
    assert families["dbpool_hold_seconds"].type == "counter"
    om_samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert om_samples == samples


def serve(registry: Any) -> tuple[Any, threading.Thread]:
    """Serve ``registry`` on 127.0.0.1, on a free port: (server, its thread)."""
    from prometheus_client import start_http_server

    if _version(prometheus_client) >= (0, 20):  # start_http_server returns its server since 0.20
        server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        return server, thread
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread


def _version(module: Any) -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(part) for part in version(module.__name__).split(".")[:2] if part.isdigit())


# -- which pools a scrape shows --------------------------------------------------------------------


def test_two_pools_two_label_values(sqlite_pools: Any) -> None:
    a = sqlite_pools(max_size=2, name="a")
    b = sqlite_pools(max_size=3, min_size=1, name="b")
    b.wait(timeout=10)
    registry = CollectorRegistry()
    registry.register(PoolCollector(a, b))
    with a.connection():
        _, samples = scrape(registry)
        check_against_stats(samples, a.stats(), up=True)
    check_against_stats(samples, b.stats(), up=True)
    assert pool_names(samples) == {"a", "b"}
    assert value(samples, "dbpool_connections_max", pool="a") == 2
    assert value(samples, "dbpool_connections_max", pool="b") == 3
    assert value(samples, "dbpool_connections", pool="a", state="in_use") == 1
    assert value(samples, "dbpool_connections", pool="b", state="idle") == 1


def test_closed_pool_reports_down(sqlite_pools: Any) -> None:
    pool = sqlite_pools(name="shut")
    registry = CollectorRegistry()
    register(pool, registry=registry)
    with pool.connection() as conn:
        conn.cursor().execute("select 1")
    _, samples = scrape(registry)
    assert value(samples, "dbpool_up", pool="shut") == 1
    pool.close()
    _, samples = scrape(registry)
    check_against_stats(samples, pool.stats(), up=False)
    assert value(samples, "dbpool_connections_closed_total", pool="shut") == 1


def test_dropped_pool_disappears(sqlite_connect: Any) -> None:
    registry = CollectorRegistry()
    kept = dbpool.Pool(sqlite_connect, min_size=0, name="kept")
    dropped = dbpool.Pool(sqlite_connect, min_size=0, name="dropped")
    try:
        collector = register(kept, registry=registry)
        register(dropped, registry=registry)
        _, samples = scrape(registry)
        assert pool_names(samples) == {"kept", "dropped"}

        dropped.close()
        del dropped
        gc.collect()
        _, samples = scrape(registry)
        assert pool_names(samples) == {"kept"}
        assert collector.pools == (kept,)
        assert not any(dict(labels).get("pool") == "dropped" for _, labels in samples)
    finally:
        kept.close()


def test_remove_and_add_again(sqlite_pools: Any) -> None:
    pool = sqlite_pools(name="p")
    registry = CollectorRegistry()
    collector = register(pool, registry=registry)
    collector.add(pool)  # twice: nothing changes
    assert collector.pools == (pool,)
    collector.remove(pool)
    assert pool_names(scrape(registry)[1]) == set()
    with pytest.raises(ValueError, match="not reported"):
        collector.remove(pool)
    assert register(pool, registry=registry) is collector
    assert pool_names(scrape(registry)[1]) == {"p"}


def test_names_must_be_unique(sqlite_pools: Any) -> None:
    first = sqlite_pools(name="same")
    second = sqlite_pools(name="same")
    collector = PoolCollector(first)
    with pytest.raises(ValueError, match="'same' is already reported"):
        collector.add(second)
    first.close()
    collector.add(second)  # a closed pool of that name gives way
    assert collector.pools == (second,)
    with pytest.raises(TypeError, match=r"dbpool\.Pool"):
        collector.add("same")  # type: ignore[arg-type]


# -- registration --------------------------------------------------------------------------------


def test_register_once_per_registry(sqlite_pools: Any) -> None:
    a, b = sqlite_pools(name="one"), sqlite_pools(name="two")
    registry, other = CollectorRegistry(), CollectorRegistry()
    collector = register(a, registry=registry)
    assert register(b, registry=registry) is collector  # no DuplicateTimeseries
    assert register(a, registry=other) is not collector
    assert pool_names(scrape(registry)[1]) == {"one", "two"}
    assert pool_names(scrape(other)[1]) == {"one"}


def test_register_refuses_what_is_no_pool_or_no_registry_and_registers_nothing(
    sqlite_pools: Any,
) -> None:
    pool = sqlite_pools(name="misplaced")
    # A name where the registry goes: told what the argument is for, not about weak references.
    with pytest.raises(TypeError, match=r"registry must be a prometheus_client CollectorRegistry"):
        register(pool, registry="misplaced")  # type: ignore[arg-type]
    # What is no pool is refused before a collector is made: the registry stays empty.
    registry = CollectorRegistry()
    with pytest.raises(TypeError, match=r"register\(\) takes a dbpool\.Pool"):
        register("misplaced", registry=registry)  # type: ignore[arg-type]
    assert generate_latest(registry) == b""
    assert register(pool, registry=registry).pools == (pool,)


def test_register_on_the_default_registry(sqlite_pools: Any) -> None:
    pool = sqlite_pools(name="default-registry")
    collector = register(pool)
    try:
        assert register(pool) is collector
        _, samples = scrape(prometheus_client.REGISTRY)
        assert value(samples, "dbpool_up", pool="default-registry") == 1
    finally:
        collector.remove(pool)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
def test_a_forked_child_scrapes_though_a_parent_thread_held_the_locks(sqlite_pools: Any) -> None:
    """Locks held by a thread of the parent at the fork (one adding a pool, say) would stay
    held in the child, whose scrapes and registrations then waited forever."""
    pool = sqlite_pools(name="forked")
    registry = CollectorRegistry()
    collector = register(pool, registry=registry)
    with collector._lock, dbpool.metrics._defaults_lock:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                assert pool_names(scrape(registry)[1]) == {"forked"}
                assert register(pool, registry=registry) is collector
                code = 0
            finally:
                os._exit(code)
    assert wait_for_child(pid, timeout=20) == 0


def test_registering_reads_no_pool(sqlite_pools: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """describe() names the metrics without a snapshot, even on an auto-describing registry;
    each scrape takes exactly one snapshot per pool."""
    pool: dbpool.Pool[Any] = sqlite_pools(name="counted")
    snapshots = []
    original = pool.stats

    def counting_stats() -> dbpool.PoolStats:
        snapshots.append(1)
        return original()

    monkeypatch.setattr(pool, "stats", counting_stats)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(pool))
    assert snapshots == []
    scrape(registry)
    assert len(snapshots) == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PoolCollector())  # the same names: refused, as for any collector


def test_empty_collector_scrapes(sqlite_pools: Any) -> None:
    registry = CollectorRegistry()
    registry.register(PoolCollector())
    types, samples = scrape(registry)
    assert samples == {}
    assert types["dbpool_acquire_wait_seconds"] == "histogram"


# -- without prometheus_client ---------------------------------------------------------------------


def test_dbpool_imports_without_prometheus_client() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if it were not installed\n"
        "import dbpool\n"
        "pool = dbpool.Pool(lambda: None, min_size=0)\n"
        "pool.close()\n"
        "assert 'dbpool.metrics' not in sys.modules\n"
        "try:\n"
        "    import dbpool.metrics\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "dbpool[prometheus]" in result.stdout
