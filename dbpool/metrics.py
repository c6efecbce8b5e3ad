"""Prometheus metrics for pools, through ``prometheus_client`` (the ``prometheus`` extra).

::

    from dbpool.metrics import register

    register(pool)  # on prometheus_client.REGISTRY, served by whatever exposes it

A :class:`PoolCollector` reads :meth:`dbpool.Pool.stats` once per pool at each scrape, so the
numbers of one pool, ``dbpool_up`` included, always come from one consistent snapshot, and the
pool does no extra work between scrapes.  Every series has the label ``pool``, the pool's name
(a lone surrogate in it, which UTF-8 cannot carry, written as ``\\udcff``).

This module is the only one that imports ``prometheus_client``; ``import dbpool`` never imports
it, so the package keeps working without the extra.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections.abc import Iterator
from enum import Enum
from typing import Any

try:
    from prometheus_client.core import (
        REGISTRY,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import CollectorRegistry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dbpool.metrics needs prometheus_client: install it with "
        "python -m pip install 'dbpool[prometheus]'"
    ) from exc

from .pool import Pool, PoolStats

__all__ = ["PoolCollector", "register"]

_STATES = ("idle", "in_use", "opening")  # the ``state`` label of ``dbpool_connections``


class PoolCollector:
    """A ``prometheus_client`` collector for any number of pools.

    :param pools: the pools to report; more can be added with :meth:`add`.

    Register it once: ``prometheus_client.REGISTRY.register(PoolCollector(pool))``, or let
    :func:`register` do it.  :meth:`describe` names the metrics without reading any pool, so
    registering costs nothing; :meth:`collect` reads each pool's :meth:`~dbpool.Pool.stats`
    once per scrape.

    The collector holds its pools weakly: it never keeps a pool alive, and a pool that has been
    garbage-collected is simply absent from the next scrape.  A closed pool that is still
    referenced is reported, with ``dbpool_up`` 0 and its final counters, until it is removed
    with :meth:`remove` or dropped.

    Pool names are the ``pool`` label, so they must be unique within a collector: :meth:`add`
    refuses a second open pool of the same name (pass ``name=`` to :class:`dbpool.Pool`), and
    a new pool replaces a closed one of its name.
    """

    def __init__(self, *pools: Pool[Any]) -> None:
        # Guards _refs; no pool is read while it is held.  Made anew in a forked child: one
        # held by another thread of the parent at the fork would never be let go there.
        self._lock = threading.Lock()
        self._refs: list[weakref.ref[Pool[Any]]] = []  # in the order the pools were added
        _collectors.add(self)
        for pool in pools:
            self.add(pool)

    @property
    def pools(self) -> tuple[Pool[Any], ...]:
        """The pools reported, in the order they were added (those still alive)."""
        with self._lock:
            return tuple(self._live_locked())

    def add(self, pool: Pool[Any]) -> None:
        """Report ``pool`` from the next scrape on.  Adding a pool twice does nothing.

        Raises ``TypeError`` if ``pool`` is not a :class:`dbpool.Pool`, and ``ValueError`` if
        an open pool of the same name is already reported.  A closed pool of the same name is
        replaced.
        """
        if not isinstance(pool, Pool):
            raise TypeError(f"add() takes a dbpool.Pool, got {type(pool)!r}")
        with self._lock:
            live = self._live_locked()
            if any(other is pool for other in live):
                return
            label = _label(pool.name)
            for other in live:
                if _label(other.name) == label and not other.closed:
                    raise ValueError(
                        f"a pool named {pool.name!r} is already reported: pool names are the "
                        "'pool' label and must be unique; give each pool its own name= "
                        "(or close the old pool first)"
                    )
            kept = [other for other in live if _label(other.name) != label]
            self._refs = [weakref.ref(other) for other in kept] + [weakref.ref(pool)]

    def remove(self, pool: Pool[Any]) -> None:
        """Stop reporting ``pool``; ``ValueError`` if it is not reported."""
        with self._lock:
            live = self._live_locked()
            if not any(other is pool for other in live):
                raise ValueError(f"{pool!r} is not reported by this collector")
            self._refs = [weakref.ref(other) for other in live if other is not pool]

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples: what a registry checks for name clashes."""
        return iter(_Families())

    def collect(self) -> Iterator[Metric]:
        """The metric families with one snapshot of every pool's statistics."""
        families = _Families()
        for pool in self.pools:
            # dbpool_up from the snapshot too: pool.closed, read apart, could already tell
            # of a close() or reopen() that came after it.
            families.add(pool.stats())
        return iter(families)

    def __repr__(self) -> str:
        names = ", ".join(repr(pool.name) for pool in self.pools)
        return f"<PoolCollector pools=[{names}]>"

    def _live_locked(self) -> list[Pool[Any]]:
        """The pools still alive; the references to dead ones are dropped."""
        live = [pool for pool in (ref() for ref in self._refs) if pool is not None]
        if len(live) != len(self._refs):
            self._refs = [weakref.ref(pool) for pool in live]
        return live


_collectors: weakref.WeakSet[PoolCollector] = weakref.WeakSet()
_defaults_lock = threading.Lock()
# The collector register() made for each registry; it goes with the registry.
_defaults: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = weakref.WeakKeyDictionary()


def _after_fork_in_child() -> None:
    # _refs and _defaults change by one assignment or one store, so they are whole whatever
    # the parent's threads were doing; only the locks they held must be let go.
    global _defaults_lock
    _defaults_lock = threading.Lock()
    for collector in list(_collectors):
        collector._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def register(pool: Pool[Any], registry: CollectorRegistry | None = None) -> PoolCollector:
    """Report ``pool`` on ``registry`` (default ``prometheus_client.REGISTRY``).

    The first call for a registry makes a :class:`PoolCollector` and registers it there; later
    calls add their pool to that same collector, which is returned, so that
    ``register(pool).remove(pool)`` undoes a call.  The rules of :meth:`PoolCollector.add`
    apply: pools are held weakly and their names must be unique.  ``TypeError`` if ``pool``
    is not a :class:`dbpool.Pool` or ``registry`` not a registry; nothing is registered then.
    """
    # Both checked before any collector is made and registered: a call that fails changes
    # nothing (and a wrong registry would fail as a weak reference, saying nothing useful).
    if not isinstance(pool, Pool):
        raise TypeError(f"register() takes a dbpool.Pool, got {type(pool)!r}")
    target = REGISTRY if registry is None else registry
    if not callable(getattr(target, "register", None)):
        raise TypeError(
            "register()'s registry must be a prometheus_client CollectorRegistry (or None for "
            f"the default one, prometheus_client.REGISTRY), got {type(registry)!r}"
        )
    with _defaults_lock:
        collector = _defaults.get(target)
        if collector is None or not _registered(target, collector):
            # None yet, or the one made before was taken off with registry.unregister(): a
            # new one, so that what was unregistered stays so.
            collector = PoolCollector()
            target.register(collector)
            _defaults[target] = collector
    collector.add(pool)
    return collector


def _registered(registry: CollectorRegistry, collector: PoolCollector) -> bool:
    """Whether ``collector`` is still registered on ``registry`` (assumed so for a registry
    that does not say)."""
    registered = getattr(registry, "_collector_to_names", None)
    if registered is None:
        return True
    return collector in registered


def _bound_label(bound: float) -> str:
    """A bucket's upper bound as the ``le`` label writes it: ``0.005``, ``1.0``, ``+Inf``."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _label(name: str) -> str:
    """A pool name as the ``pool`` label: prometheus_client writes UTF-8, so a lone surrogate
    (in a name made with ``os.fsdecode()`` from bytes that are not UTF-8, say) would fail the
    whole scrape; it is written as its escape, ``\\udcff``, instead."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _text(value: object) -> str:
    """A label value: an enum member (a :class:`dbpool.DiscardReason`) as its value."""
    return str(value.value) if isinstance(value, Enum) else str(value)


class _Families:
    """The metric families of one scrape; :meth:`add` appends one pool's samples."""

    def __init__(self) -> None:
        pool = ["pool"]
        self.up = GaugeMetricFamily(
            "dbpool_up", "1 while the pool is open, 0 once it is closed.", labels=pool
        )
        self.connections = GaugeMetricFamily(
            "dbpool_connections",
            "Connections the pool holds, by state: idle, in_use (leased) or opening.",
            labels=["pool", "state"],
        )
        self.max = GaugeMetricFamily(
            "dbpool_connections_max", "The pool's max_size: the cap on connections.", labels=pool
        )
        self.min = GaugeMetricFamily(
            "dbpool_connections_min", "The pool's min_size: connections kept open.", labels=pool
        )
        self.waiting = GaugeMetricFamily(
            "dbpool_waiting", "Callers queued for a connection.", labels=pool
        )
        self.acquires = CounterMetricFamily(
            "dbpool_acquires", "Connections handed out by the pool.", labels=pool
        )
        self.wait = HistogramMetricFamily(
            "dbpool_acquire_wait_seconds",
            "Seconds each checkout waited for its connection (0 when one was idle).",
            labels=pool,
            unit="seconds",
        )
        self.hold = CounterMetricFamily(
            "dbpool_hold_seconds",
            "Seconds leases held their connection, counted as each ends: at its return, or "
            "when close() ends it past its timeout.",
            labels=pool,
            unit="seconds",
        )
        self.returns = CounterMetricFamily(
            "dbpool_returns",
            "Leases that ended: returned to the pool, or ended by close() past its timeout "
            "(acquires - returns: the leases out).",
            labels=pool,
        )
        self.created = CounterMetricFamily(
            "dbpool_connections_created", "Connections opened.", labels=pool
        )
        self.closed = CounterMetricFamily(
            "dbpool_connections_closed", "Connections closed, for any reason.", labels=pool
        )
        self.connect_time = CounterMetricFamily(
            "dbpool_connect_seconds",
            "Seconds spent in successful connects, configure hook included.",
            labels=pool,
            unit="seconds",
        )
        self.connect_errors = CounterMetricFamily(
            "dbpool_connect_errors", "Connects that failed.", labels=pool
        )
        self.discards = CounterMetricFamily(
            "dbpool_discards",
            "Connections the pool dropped rather than keep them, by reason.",
            labels=["pool", "reason"],
        )
        self.timeouts = CounterMetricFamily(
            "dbpool_timeouts", "Callers that gave up waiting (PoolTimeout).", labels=pool
        )
        self.leak_warnings = CounterMetricFamily(
            "dbpool_leak_warnings", "Leases reported as held longer than leak_timeout.", labels=pool
        )
        self.leaked = CounterMetricFamily(
            "dbpool_leaked", "Leases garbage-collected without being released.", labels=pool
        )

    def add(self, stats: PoolStats) -> None:
        label = _label(stats.name)
        name = [label]
        self.up.add_metric(name, 0.0 if stats.pool_closed else 1.0)
        for state, count in zip(_STATES, (stats.idle, stats.in_use, stats.opening)):
            self.connections.add_metric([label, state], count)
        self.max.add_metric(name, stats.max_size)
        self.min.add_metric(name, stats.min_size)
        self.waiting.add_metric(name, stats.waiting)
        self.acquires.add_metric(name, stats.acquired)
        # The pool counts each bucket on its own; Prometheus wants each bucket to count every
        # wait up to its bound, and the last, +Inf, to count them all.
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(stats.wait_buckets, stats.wait_histogram):
            total += count
            buckets.append((_bound_label(bound), total))
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", total))
        self.wait.add_metric(name, buckets, sum_value=stats.wait_time)
        self.hold.add_metric(name, stats.held_time)
        self.returns.add_metric(name, stats.returned)
        self.created.add_metric(name, stats.created)
        self.closed.add_metric(name, stats.closed)
        self.connect_time.add_metric(name, stats.connect_time)
        self.connect_errors.add_metric(name, stats.connect_errors)
        for reason, count in sorted(stats.discards.items()):
            self.discards.add_metric([label, _text(reason)], count)
        self.timeouts.add_metric(name, stats.timeouts)
        self.leak_warnings.add_metric(name, stats.leak_warnings)
        self.leaked.add_metric(name, stats.leaked)

    def __iter__(self) -> Iterator[Metric]:
        return iter(
            (
                self.up,
                self.connections,
                self.max,
                self.min,
                self.waiting,
                self.acquires,
                self.wait,
                self.hold,
                self.returns,
                self.created,
                self.closed,
                self.connect_time,
                self.connect_errors,
                self.discards,
                self.timeouts,
                self.leak_warnings,
                self.leaked,
            )
        )
