"""Statistics and metrics at their edges: a collector unregistered from its registry, and the
counters of a forked child.

Interleavings are forced with events and wait_until, never with sleeps.
"""

from __future__ import annotations

import gc
import os
import warnings
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import in_child

pytestmark = pytest.mark.timeout(30)


# == register(): a collector taken off its registry ================================================


def test_register_after_the_collector_was_unregistered_reports_the_pool(
    sqlite_connect: Any,
) -> None:
    """``registry.unregister(collector)`` is prometheus_client's own way to stop exporting a
    collector; a later ``register(pool)`` on that registry must export ``pool`` again rather
    than add it to the collector no registry reads."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from dbpool.metrics import register

    registry = CollectorRegistry()
    with (
        dbpool.Pool(sqlite_connect, min_size=0, name="first") as first,
        dbpool.Pool(sqlite_connect, min_size=0, name="second") as second,
    ):
        registry.unregister(register(first, registry=registry))
        assert 'pool="first"' not in generate_latest(registry).decode()

        collector = register(second, registry=registry)
        text = generate_latest(registry).decode()
        assert 'dbpool_up{pool="second"} 1.0' in text
        assert 'pool="first"' not in text  # what was unregistered stays so
        assert collector.pools == (second,)
        assert register(second, registry=registry) is collector  # then one collector again


# == fork: a child counts only its own leases ===================================================


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
def test_a_lease_inherited_across_fork_and_dropped_in_the_child_is_not_counted_as_leaked(
    make_pool: Any, server: fakedb.Server
) -> None:
    """The child's counters start at the fork and count its own leases: a lease of the parent,
    dropped in the child, is no lease of the child's pool (nor is its connection returned)."""
    pool = make_pool(max_size=2, name="forked")
    held = [pool.connection()]

    def drop_the_lease() -> dict[str, int]:
        warnings.simplefilter("ignore")
        held.clear()
        gc.collect()
        pool.close()  # takes back whatever leases were dropped
        s = pool.stats()
        return {"leaked": s.leaked, "acquired": s.acquired, "returned": s.returned}

    report = in_child(drop_the_lease, timeout=20)
    lease = held[0]
    lease.close()
    assert report == {"result": {"leaked": 0, "acquired": 0, "returned": 0}}, report
    s = pool.stats()
    assert (s.leaked, s.acquired, s.returned, s.in_use) == (0, 1, 1, 0), s
