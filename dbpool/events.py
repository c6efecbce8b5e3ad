"""Pool events: what listeners registered with ``pool.add_listener()`` are told.

Listeners are for logging, tracing and metrics.  They run in the thread doing the work, outside
the pool's lock; one that raises is logged and skipped, so an observer can never break the pool.
What is no Exception (KeyboardInterrupt, SystemExit) goes through, once every listener was told.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ._callables import callable_name, check_callable

__all__ = ["Event", "PoolEvent", "DiscardReason", "Listener"]

logger = logging.getLogger("dbpool")


class Event(str, enum.Enum):
    """What a listener can be told about."""

    #: a new connection is open (and ``configure`` ran), before anyone uses it
    CONNECT = "connect"
    #: a lease was handed to a caller, in the caller's thread
    CHECKOUT = "checkout"
    #: a lease came back, before the pool cleans the connection; or ``close()`` ended it past
    #: its timeout, before closing its connection; or an exception (a CHECKOUT listener raising
    #: KeyboardInterrupt) undid its checkout: once for each CHECKOUT
    CHECKIN = "checkin"
    #: the pool dropped a connection rather than keep it (even while the pool closes);
    #: ``reason`` says why
    DISCARD = "discard"
    #: the pool closed a connection, for any reason (including closing the pool)
    CLOSE = "close"


class DiscardReason(str, enum.Enum):
    """Why the pool dropped a connection, as counted in ``PoolStats.discards``."""

    #: it failed the validation ping, or its driver reported it broken
    BROKEN = "broken"
    #: the ``check`` hook raised, or left a transaction open
    CHECK_FAILED = "check_failed"
    #: it reached ``max_lifetime``
    EXPIRED = "expired"
    #: it stayed idle longer than ``idle_timeout`` above ``min_size``
    IDLE = "idle"
    #: it could not be made clean on return: the rollback, the session reset or the ``reset``
    #: hook failed, or it came back mid-call or inside its transaction block
    RESET_FAILED = "reset_failed"
    #: ``session_reset="reconnect"`` (or a driver with no reset) retires used connections
    SESSION_RESET = "session_reset"
    #: ``resize()`` lowered ``max_size`` below the number open
    RESIZED = "resized"
    #: an exception such as ``KeyboardInterrupt`` stopped a validation or a return half-way
    INTERRUPTED = "interrupted"
    #: the borrower asked for it: ``pool.discard(conn)``
    REQUESTED = "requested"


#: The reason given with :attr:`Event.CLOSE` when the pool itself closes or drains.
POOL_CLOSED = "pool_closed"


@dataclass(frozen=True)
class PoolEvent:
    """One event, as passed to a listener."""

    event: Event
    #: the pool's name
    pool: str
    #: the driver's connection the event is about: to identify it (``id()``, the driver's
    #: process id), not to run statements on; the pool does not know what a listener sends, so
    #: work done here is not undone before the next borrower (``configure`` and ``reset`` are
    #: the hooks that may use the connection)
    connection: Any
    #: for DISCARD, a :class:`DiscardReason` value; for CLOSE, that or ``"pool_closed"``
    reason: str | None = None
    #: CONNECT: seconds the connect (and ``configure``) took; CHECKOUT: seconds the caller
    #: waited; CHECKIN: seconds the lease held the connection
    duration: float | None = None


Listener = Callable[[PoolEvent], object]


def event_named(event: object) -> Event:
    """The :class:`Event` for ``event`` (an Event or its value), or a ValueError saying which
    names exist."""
    try:
        return Event(event)
    except ValueError:
        names = ", ".join(repr(e.value) for e in Event)
        raise ValueError(f"unknown pool event {event!r}: use one of {names}") from None


class Listeners:
    """The listeners of one pool, one tuple per event.

    The tuples are replaced, never changed, so emitting reads them without a lock; an empty
    tuple is false, which is all the hot path looks at.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # serialises add and remove
        self.connect: tuple[Listener, ...] = ()
        self.checkout: tuple[Listener, ...] = ()
        self.checkin: tuple[Listener, ...] = ()
        self.discard: tuple[Listener, ...] = ()
        self.close: tuple[Listener, ...] = ()

    def add(self, event: Event | str, listener: Listener) -> None:
        kind = event_named(event)
        check_callable("a listener", listener, 1, "a callable taking one dbpool.PoolEvent")
        with self._lock:
            setattr(self, kind.value, (*getattr(self, kind.value), listener))

    def remove(self, event: Event | str, listener: Listener) -> None:
        kind = event_named(event)
        with self._lock:
            current: tuple[Listener, ...] = getattr(self, kind.value)
            if listener not in current:
                # named, not its repr: a functools.partial's shows its arguments
                raise ValueError(
                    f"{callable_name(listener)} is not listening to {kind.value!r} events"
                )
            index = current.index(listener)
            setattr(self, kind.value, current[:index] + current[index + 1 :])


def emit(
    listeners: tuple[Listener, ...],
    event: Event,
    pool: str,
    connection: Any,
    reason: str | None = None,
    duration: float | None = None,
) -> None:
    """Tell each listener; log and skip one that raises.  What is no Exception
    (KeyboardInterrupt, SystemExit) goes through to the caller, the first of them once every
    listener was told: a listener told of a CHECKOUT is then told of its CHECKIN whatever
    another one raised."""
    record = PoolEvent(event, pool, connection, reason, duration)
    stopped: BaseException | None = None
    for listener in listeners:
        try:
            listener(record)
        except Exception:
            logger.exception(
                "pool %r: a listener of %r events raised; it is skipped", pool, event.value
            )
        except BaseException as exc:
            if stopped is None:
                stopped = exc
    if stopped is not None:
        try:
            raise stopped
        finally:
            stopped = None  # no cycle through this frame
