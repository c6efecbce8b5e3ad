"""dbpool: a synchronous, thread-safe connection pool for any DB-API 2.0 driver."""

import logging
from typing import TYPE_CHECKING

from . import dialects, presets
from .errors import (
    CommitOutcomeUnknown,
    ConnectionUnusable,
    LeaseReleased,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
    TransactionRolledBack,
    TransactionTimeout,
)
from .events import DiscardReason, Event, PoolEvent
from .isolation import Isolation
from .lease import Connection, Cursor, PoolCursor
from .pool import Pool
from .stats import WAIT_BUCKETS, HealthReport, PoolStats
from .transaction import Savepoint, Transaction

if TYPE_CHECKING:
    from .url import create_pool

__all__ = [
    "Pool",
    "PoolStats",
    "HealthReport",
    "Connection",
    "Cursor",
    "PoolCursor",
    "create_pool",
    "dialects",
    "presets",
    "Event",
    "PoolEvent",
    "DiscardReason",
    "WAIT_BUCKETS",
    "PoolError",
    "PoolTimeout",
    "PoolClosed",
    "TooManyWaiters",
    "LeaseReleased",
    "ConnectionUnusable",
    "TransactionRolledBack",
    "TransactionTimeout",
    "CommitOutcomeUnknown",
    "Isolation",
    "Transaction",
    "Savepoint",
]

__version__ = "0.1.0"

logging.getLogger("dbpool").addHandler(logging.NullHandler())


def __getattr__(name: str) -> object:
    # create_pool lives with the URL parser, imported on first use.
    if name == "create_pool":
        from .url import create_pool

        return create_pool
    raise AttributeError(f"module 'dbpool' has no attribute {name!r}")
