"""dbpool: a synchronous, thread-safe connection pool for any DB-API 2.0 driver."""

import logging
from typing import TYPE_CHECKING

from . import dialects
from .errors import (
    CommitOutcomeUnknown,
    ConnectionUnusable,
    LeaseReleased,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiters,
    TransactionTimeout,
)
from .isolation import Isolation
from .lease import Connection, Cursor
from .pool import Pool, PoolStats
from .transaction import Transaction

if TYPE_CHECKING:
    from .url import create_pool

__all__ = [
    "Pool",
    "PoolStats",
    "Connection",
    "Cursor",
    "create_pool",
    "dialects",
    "PoolError",
    "PoolTimeout",
    "PoolClosed",
    "TooManyWaiters",
    "LeaseReleased",
    "ConnectionUnusable",
    "TransactionTimeout",
    "CommitOutcomeUnknown",
    "Isolation",
    "Transaction",
]

__version__ = "0.1.0"

logging.getLogger("dbpool").addHandler(logging.NullHandler())


def __getattr__(name: str) -> object:
    # create_pool lives with the URL parser, imported on first use.
    if name == "create_pool":
        from .url import create_pool

        return create_pool
    raise AttributeError(f"module 'dbpool' has no attribute {name!r}")
