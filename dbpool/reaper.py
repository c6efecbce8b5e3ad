"""The maintenance thread: one per pool, holding only a weak reference to it.

It closes idle connections past ``idle_timeout`` (never below ``min_size``) and connections past
``max_lifetime``, refills to ``min_size``, retries connecting with backoff while connects fail and
callers are queued, and returns leases that were garbage-collected.  It ends when the pool is
closed or collected.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pool import Pool

logger = logging.getLogger("dbpool")

_FAILURE_PAUSE = 1.0  # seconds to wait after an unexpected error in maintenance


def start(pool: Pool[Any], wakeup: threading.Event) -> threading.Thread:
    thread = threading.Thread(
        target=_run,
        args=(weakref.ref(pool), wakeup, pool.name),
        name=f"dbpool-reaper-{pool.name}",
        daemon=True,
    )
    thread.start()
    return thread


def _run(pool_ref: weakref.ref[Pool[Any]], wakeup: threading.Event, name: str) -> None:
    while True:
        pool = pool_ref()
        if pool is None:
            return
        try:
            delay = pool._maintain(wakeup)
        except BaseException:  # even SystemExit from a driver: the pool needs this thread
            logger.exception("pool %r: maintenance failed; trying again shortly", name)
            delay = _FAILURE_PAUSE
        del pool  # hold no reference while asleep, so the pool can be collected
        if delay is None:
            return
        wakeup.wait(min(delay, threading.TIMEOUT_MAX))
        wakeup.clear()
