"""The pool's statistics: a snapshot type and the fixed buckets of the wait histogram."""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, TypedDict

from .events import DiscardReason

__all__ = ["HealthReport", "PoolStats", "WAIT_BUCKETS"]

#: Upper bounds, in seconds, of the acquire-wait histogram's buckets; the last catches the rest.
WAIT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)  # fmt: skip


def wait_bucket(seconds: float) -> int:
    """The index of the first bucket whose bound is at least ``seconds``."""
    return bisect_left(WAIT_BUCKETS, seconds)


def no_discards() -> dict[str, int]:
    return dict.fromkeys((reason.value for reason in DiscardReason), 0)


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool's gauges and counters.

    Snapshots are values: two are equal when all their fields are, and equal ones hash alike,
    so a set deduplicates them.  The hash leaves out ``discards``, a dict, which has none; that
    dict is the snapshot's own copy: read it, do not change it.
    """

    name: str
    min_size: int
    max_size: int
    #: connections open or being opened: ``idle + in_use + opening``
    size: int
    idle: int
    in_use: int
    opening: int
    #: callers queued for a connection (one waiting for a connect made for it: in ``opening``)
    waiting: int
    #: connections opened since the pool was made
    created: int
    #: connections closed, for any reason
    closed: int
    #: of those, the ones thrown away at checkout or on return (broken, interrupted, busy,
    #: failing validation or a reset, or past max_lifetime), found dead by a ping of
    #: ``check()``, ``health()`` or the background sweep, or closed by ``pool.discard()``; not
    #: the idle ones retired for age or idleness (by the background thread, or ``check()``),
    #: nor those ``resize()`` closes
    discarded: int
    #: leases handed out
    acquired: int
    #: checkouts that ended in :exc:`PoolTimeout`
    timeouts: int
    #: connects that failed: the connect callable, the ``configure`` hook or a connect
    #: listener raised
    connect_errors: int
    #: leases reported as held longer than ``leak_timeout``
    leak_warnings: int
    #: leases garbage-collected without being released (their connection was returned)
    leaked: int
    #: seconds callers spent waiting in ``pool.connection()`` for the connections they got, in
    #: total (a connection taken at once from the idle stack counts as no wait; a wait that
    #: ended in :exc:`PoolTimeout` is counted in ``timeouts`` only)
    wait_time: float = 0.0
    #: upper bounds of the histogram's buckets, :data:`WAIT_BUCKETS`
    wait_buckets: tuple[float, ...] = WAIT_BUCKETS
    #: checkouts per bucket (not cumulative): a wait lands in the first bucket whose bound is at
    #: least as long; the counts add up to ``acquired``
    wait_histogram: tuple[int, ...] = (0,) * len(WAIT_BUCKETS)
    #: seconds leases held their connections, in total, counted as they come back
    held_time: float = 0.0
    #: leases that came back, or that ended otherwise: ended by ``close()`` past its timeout,
    #: or undone by an exception after they were counted in ``acquired``; ``acquired -
    #: returned`` is the number of leases out
    returned: int = 0
    #: seconds spent opening connections that opened (``configure`` included), in total
    connect_time: float = 0.0
    #: connections the pool dropped rather than keep them, by :class:`dbpool.DiscardReason`
    #: value (every reason is a key): those of ``discarded``, even while the pool closes, and
    #: the idle ones the background thread retires and ``resize()`` closes; not those closed
    #: only because the pool closed
    discards: dict[str, int] = dataclasses.field(default_factory=no_discards, hash=False)
    #: the pool was closed (or drained) when the snapshot was taken: ``pool.closed`` then
    pool_closed: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as plain values that strict JSON accepts: the last bucket, which has no
        upper bound, shows ``None`` as its bound."""
        values = dataclasses.asdict(self)
        values["wait_buckets"] = [None if math.isinf(b) else b for b in self.wait_buckets]
        values["wait_histogram"] = list(self.wait_histogram)
        return values


class HealthReport(TypedDict):
    """What :meth:`dbpool.Pool.health` returns: plain values, ready for a readiness probe's
    JSON."""

    #: the pool's name
    pool: str
    #: the pool is open, and a pooled connection answered the ping, or every one was busy
    #: serving callers (``busy``)
    ok: bool
    #: a pooled connection answered the ping within the timeout
    reachable: bool
    #: the probe's wait in the queue ran out (no connection came free within the timeout;
    #: not its own connect or validation), yet a lease came back sound meanwhile
    #: (put back for reuse: not discarded or closed as it came back, for any reason), none
    #: broken, and no connect failed: the pool is saturated, the database serves
    busy: bool
    #: seconds the ping took (``None`` when it did not answer)
    latency: float | None
    #: why it is not ok: the exception's type and first line, secrets masked (else ``None``)
    error: str | None
    #: the pool was closed (or drained) when the report was made
    closed: bool
    #: :meth:`PoolStats.as_dict` of the snapshot taken with the report
    stats: dict[str, Any]
