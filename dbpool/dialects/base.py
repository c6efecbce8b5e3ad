"""The driver verbs the pool needs, and the generic fallback for drivers it does not know.

A dialect is a small stateless object.  Every driver quirk lives in a dialect and nowhere else:
the pool asks "what state is this connection in", "is it alive", "roll it back", "close it",
and never probes a driver with try/except of its own.
"""

from __future__ import annotations

import enum
import os
from typing import Any


class TxState(enum.Enum):
    """What a connection's transaction state is, as far as the dialect can tell without I/O."""

    IDLE = "idle"  # no transaction open: can be reused as it is
    IN_TRANSACTION = "in_transaction"  # a transaction (or a failed one) is open: roll back first
    BUSY = "busy"  # a statement is still running or a result is unread: discard
    BROKEN = "broken"  # closed or lost: discard
    UNKNOWN = "unknown"  # the driver does not say: the lease's own record decides


class Dialect:
    """The generic fallback: assumes only PEP 249.

    It cannot read the transaction state, so the pool rolls back a connection on return
    whenever the lease ran a statement since its last commit or rollback.
    """

    name = "generic"

    def check_new(self, conn: Any) -> None:
        """Refuse a freshly made connection the pool cannot use safely (raise ``TypeError``)."""

    def transaction_state(self, conn: Any) -> TxState:
        """The connection's state, read locally: no round trip."""
        closed = getattr(conn, "closed", False)
        return TxState.BROKEN if closed else TxState.UNKNOWN

    def ping(self, conn: Any) -> None:
        """One round trip that proves the connection works; raise if it does not.

        Must leave no transaction open.
        """
        cursor = conn.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        finally:
            cursor.close()
        conn.rollback()

    def client_settings(self, conn: Any) -> object:
        """The driver-side session settings a borrower could change (autocommit, isolation
        level...), read locally.  The pool restores them on return when they differ."""
        return None

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        """Put back what :meth:`client_settings` returned; called with no transaction open."""

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def close(self, conn: Any) -> None:
        conn.close()

    def detach_after_fork(self, conn: Any) -> None:
        """Make a connection inherited across ``fork()`` harmless in the child, without I/O.

        Closing it would send a goodbye message on the socket the parent still uses.  Drivers
        whose finalizer sends one get their socket replaced by ``/dev/null``, so that nothing
        the child does reaches the server.
        """
        fileno = getattr(conn, "fileno", None)
        if callable(fileno):
            _blind_fd(fileno())

    def __repr__(self) -> str:
        return f"<dbpool dialect {self.name!r}>"


def _blind_fd(fd: int) -> None:
    if fd < 0:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
