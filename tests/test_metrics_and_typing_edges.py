"""Statistics snapshots and the Prometheus collector at their edges: a pool closed or reopened
while a scrape reads it, a pool name that is not valid UTF-8, snapshots used as values
(hashed, compared, deduplicated), and the exception names each module exports.  The static
types are checked by tests/test_typing.py, on the files in tests/typing.

The interleavings are forced by a ``stats`` that closes or reopens the pool right after it
took its snapshot, never by sleeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import dbpool

pytestmark = pytest.mark.timeout(30)


def samples(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape rendered as text and parsed back, keyed by (name, labels)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# == one scrape, one view of each pool ==========================================================


@pytest.mark.parametrize("change", ["close", "reopen"])
def test_dbpool_up_comes_from_the_same_snapshot_as_the_other_series(
    sqlite_pools: Any, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A pool closed (or reopened) just after the scrape took its snapshot is reported as
    that snapshot saw it: never up=0 beside an open pool's idle connections, nor up=1 beside
    a closed pool's numbers."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from dbpool.metrics import register

    pool = sqlite_pools(min_size=1, name="flip")
    pool.wait(timeout=10)
    if change == "reopen":
        pool.close()
    registry = CollectorRegistry()
    register(pool, registry=registry)
    snapshot = pool.stats

    def stats_then_change() -> dbpool.PoolStats:
        stats = snapshot()
        getattr(pool, change)()  # as another thread could, between two reads of the scrape
        return stats

    monkeypatch.setattr(pool, "stats", stats_then_change)
    scraped = samples(registry)
    monkeypatch.undo()

    up = scraped[("dbpool_up", frozenset({("pool", "flip")}))]
    idle = scraped[("dbpool_connections", frozenset({("pool", "flip"), ("state", "idle")}))]
    if change == "close":  # the snapshot saw the pool open, with its idle connection
        assert (up, idle) == (1.0, 1.0)
    else:  # closed, with nothing idle
        assert (up, idle) == (0.0, 0.0)


def test_a_snapshot_says_whether_the_pool_was_closed(make_pool: Any) -> None:
    pool = make_pool()
    assert pool.stats().pool_closed is False
    pool.drain()
    assert pool.stats().pool_closed is True
    pool.reopen()
    assert pool.stats().pool_closed is False
    pool.close()
    closed = pool.stats()
    assert closed.pool_closed is True
    assert closed.as_dict()["pool_closed"] is True


def test_the_help_of_returns_and_hold_seconds_counts_leases_close_ends(make_pool: Any) -> None:
    # close() past its timeout ends a lease: returned and held_time count it (stats docs);
    # the help texts a dashboard shows for them say so too.
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dbpool.metrics import PoolCollector

    pool = make_pool(max_size=1)
    lease = pool.connection()
    pool.close(timeout=0)
    assert lease.released and pool.stats().returned == 1
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))
    text = generate_latest(registry).decode("utf-8")
    helps = {family.name: family.documentation for family in text_string_to_metric_families(text)}
    for name in ("dbpool_returns", "dbpool_hold_seconds"):
        assert "close()" in helps[name], (name, helps[name])


# == pool names that UTF-8 cannot carry ==========================================================


def test_a_pool_name_with_a_lone_surrogate_does_not_break_the_scrape(sqlite_pools: Any) -> None:
    """A name decoded with os.fsdecode() from bytes that are not UTF-8 holds lone surrogates,
    which the UTF-8 exposition cannot carry: the scrape of every pool failed.  The name is
    written with the surrogate escaped, so the pool stays identifiable."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    from dbpool.metrics import PoolCollector

    odd = sqlite_pools(name="db-\udcff-main")
    plain = sqlite_pools(name="plain")
    registry = CollectorRegistry()
    registry.register(PoolCollector(odd, plain))
    with odd.connection():
        scraped = samples(registry)
    assert scraped[("dbpool_up", frozenset({("pool", "plain")}))] == 1.0
    escaped = "db-\\udcff-main"
    assert scraped[("dbpool_up", frozenset({("pool", escaped)}))] == 1.0
    in_use = frozenset({("pool", escaped), ("state", "in_use")})
    assert scraped[("dbpool_connections", in_use)] == 1.0
    assert b"db-\\\\udcff-main" in openmetrics(registry)  # Prometheus's own format too


def test_two_pool_names_written_as_the_same_label_are_refused(sqlite_pools: Any) -> None:
    """Names are unique as labels: one whose surrogate is escaped into another's spelling
    would make duplicate series."""
    pytest.importorskip("prometheus_client")
    from dbpool.metrics import PoolCollector

    odd = sqlite_pools(name="x\udcff")
    look_alike = sqlite_pools(name="x\\udcff")
    collector = PoolCollector(odd)
    with pytest.raises(ValueError, match="already reported"):
        collector.add(look_alike)
    odd.close()
    collector.add(look_alike)  # a closed pool of that label gives way, as for equal names
    assert collector.pools == (look_alike,)


# == snapshots as values ========================================================================


def test_snapshots_are_hashable_and_equal_ones_hash_alike(make_pool: Any) -> None:
    """A frozen dataclass is expected to hash (to dedupe snapshots, key a cache); the dict of
    discards made every snapshot unhashable."""
    pool = make_pool()
    with pool.connection():
        pass
    first, second = pool.stats(), pool.stats()
    assert first == second and first is not second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1
    with pool.connection():
        pass
    assert len({first, second, pool.stats()}) == 2


def test_snapshots_equal_whatever_the_order_of_their_discards(make_pool: Any) -> None:
    pool = make_pool()
    stats = pool.stats()
    reordered = dataclasses.replace(stats, discards=dict(reversed(stats.discards.items())))
    assert list(reordered.discards) != list(stats.discards)
    assert reordered == stats
    assert hash(reordered) == hash(stats)
    keyed_by_reason = {dbpool.DiscardReason(key): n for key, n in stats.discards.items()}
    by_enum = dataclasses.replace(stats, discards=keyed_by_reason)
    assert by_enum == stats and hash(by_enum) == hash(stats)


# == the public names ===========================================================================


def test_every_exception_is_exported_by_both_modules() -> None:
    """``from dbpool.errors import *`` and ``from dbpool import *`` give every exception the
    pool raises (ConnectionUnusable was missing from the first)."""
    import inspect

    import dbpool.errors

    defined = {
        name
        for name, value in vars(dbpool.errors).items()
        if inspect.isclass(value) and issubclass(value, dbpool.PoolError)
    }
    assert defined <= set(dbpool.errors.__all__)
    assert defined <= set(dbpool.__all__)
    assert "ConnectionUnusable" in defined


@pytest.mark.parametrize("change", ["close", "reopen"])
def test_health_says_closed_as_its_stats_do(
    sqlite_pools: Any, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """health()'s ``closed`` and ``ok`` agree with the snapshot its ``stats`` show, even when
    the pool is closed (or reopened) between its ping and that snapshot."""
    pool = sqlite_pools(min_size=1, name="probe")
    pool.wait(timeout=10)
    if change == "reopen":
        pool.close()  # health() finds it closed, then it is reopened before the snapshot
    snapshot = pool.stats

    def change_then_stats() -> dbpool.PoolStats:
        # as another thread could, after health() read ``closed`` the old way
        pool.close() if change == "close" else pool.reopen()
        return snapshot()

    monkeypatch.setattr(pool, "stats", change_then_stats)
    report = pool.health(timeout=5)
    closed = change == "close"
    assert report["closed"] is report["stats"]["pool_closed"] is closed
    if closed:  # pinged while open, reported as the closed pool it then was
        assert report["reachable"] is True and report["ok"] is False
