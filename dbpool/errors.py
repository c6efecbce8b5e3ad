"""The exceptions dbpool raises.  Driver errors are never wrapped: they pass through unchanged."""

from __future__ import annotations

__all__ = [
    "PoolError",
    "PoolTimeout",
    "PoolClosed",
    "TooManyWaiters",
    "LeaseReleased",
    "ConnectionUnusable",
    "TransactionTimeout",
    "TransactionRolledBack",
    "CommitOutcomeUnknown",
]


class PoolError(Exception):
    """Base class of every error raised by the pool itself."""

    __module__ = "dbpool"


class PoolTimeout(PoolError, TimeoutError):
    """No connection could be handed out before the acquire deadline."""

    __module__ = "dbpool"


class PoolClosed(PoolError):
    """The pool is closed (or closing) and hands out no more connections."""

    __module__ = "dbpool"


class TooManyWaiters(PoolError):
    """The wait queue is full (``max_waiting``): the caller is refused at once."""

    __module__ = "dbpool"


class LeaseReleased(PoolError):
    """A lease, or a cursor made from it, was used after it went back to the pool."""

    __module__ = "dbpool"


class ConnectionUnusable(PoolError):
    """A lease's or a transaction's connection is in an unknown state (a driver call on it was
    interrupted half-way, or a cancel, rollback, rollback to a savepoint or session undo on it
    failed or could not finish): it refuses further statements.  A lease's is discarded when it
    is released; a transaction's is rolled back when its block ends, and discarded if that
    fails too."""

    __module__ = "dbpool"


class TransactionTimeout(PoolError, TimeoutError):
    """A transaction ran past its deadline: its statement was cancelled and it was rolled
    back."""

    __module__ = "dbpool"


class TransactionRolledBack(PoolError):
    """A transaction block ended normally, but the server had already ended its transaction
    after an error inside it (PostgreSQL aborts the transaction, SQLite and MySQL may roll it
    back), or its connection was closed or lost before COMMIT, or a savepoint's block inside
    it did not end (interrupted as it ended): it was rolled back, not committed.  Chained to
    the first driver error raised in the block, if any."""

    __module__ = "dbpool"


class CommitOutcomeUnknown(PoolError):
    """The connection was lost while COMMIT was in flight: the transaction may or may not have
    been committed.  Check before doing the work again; it is never retried automatically."""

    __module__ = "dbpool"
