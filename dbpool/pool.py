"""The pool: one lock, an idle stack, a FIFO of waiters, and the accounting between them.

Every decision is taken under the lock; every driver call (connect, ping, rollback, close) runs
outside it, so one slow server round trip never stalls another thread's checkout.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import itertools
import logging
import math
import os
import random
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from functools import partial
from time import monotonic
from types import FrameType
from typing import Any, Callable, Generic, NoReturn, SupportsIndex, TypeVar

from . import _fork, reaper
from ._callables import callable_name, check_callable, is_own_generator
from ._options import unknown_options
from ._types import C
from .dialects import Dialect
from .dialects import for_connection as _detect_dialect
from .dialects import get as _dialect_named
from .dialects.base import BROKEN, IDLE, IN_TRANSACTION, UNKNOWN, TxState
from .errors import LeaseReleased, PoolClosed, PoolError, PoolTimeout, TooManyWaiters
from .events import POOL_CLOSED, DiscardReason, Event, Listener, Listeners, emit
from .isolation import Isolation
from .lease import (
    _FIRST_CURSOR_CHECK,
    _INHERITED,
    CANNOT_UNDO,
    Connection,
    PoolCursor,
    detach,
    lease,
    pool_cursor,
    revoke,
)
from .redact import describe, mask_credentials, scrub_exception, scrub_text, secrets_in
from .stats import WAIT_BUCKETS, HealthReport, PoolStats, no_discards, wait_bucket
from .transaction import Transaction, in_call, run_transaction
from .watchdog import Overdue

T = TypeVar("T")

__all__ = ["Pool", "PoolStats"]

logger = logging.getLogger("dbpool")

_pool_numbers = itertools.count(1)
_NEVER = math.inf
_LIFETIME_JITTER = 0.05  # each connection lives max_lifetime * uniform(0.95, 1.0)
_CLOSE_POLL = 0.1  # close() looks for garbage-collected leases this often
_MIN_PING_TIME = 0.1  # a validation ping may take this long even past the caller's deadline
_SWEEP_TIME = 2.0  # the reaper's pings of suspect idle connections, all together
# The reaper's time for the return of one lease garbage-collected unreleased (its rollback and
# resets), and for all of a run's: then the connection is shut down, and the rest wait.  While
# it runs nothing else is maintained (refill, connects for queued callers, reaping, leak
# reports), and on a dead network the rollback would last until the TCP timeout, minutes.
# PostgreSQL rolls back in milliseconds whatever the work; InnoDB undoes it row by row, but
# finishes the rollback when the client goes, so cutting one off costs only a reconnect.  A
# fixed time: acquire_timeout bounds a caller's wait, and may be far below what a rollback needs.
_ORPHAN_RETURN_TIME = 5.0
_MIN_TICK = 0.005  # the reaper's shortest sleep between two runs
# How long the close of a connection given back while another thread is still inside a call
# on it waits for that call to end, where the driver cannot be closed under a call (sqlite3's
# busy timeout is 5 s by default, and no interrupt cuts a lock wait short).  Past it the
# connection is left for the garbage collector to close.
_CALL_END_WAIT = 10.0
# check() and the sweep start no ping with less than this many times their slowest ping so far
# left: cut short, it would discard a live connection on a slow link.
_PING_HEADROOM = 2.0
# Slot generations below 0: the pool no longer counts the connection.
_FORGOTTEN = -1  # closed (or being closed) by whoever forgot it
# Let go by close() past its timeout but left open, as its driver cannot be closed under a call
# (Dialect.closes_under_a_call): cut off, and closed by whoever returns it.
_LEFT_OPEN = -3
# _INHERITED (-2, from .lease): inherited across fork(): must never be touched
# An earlier generation (0 or more): leased before reopen(), which stopped counting it; still
# usable by its borrower, and closed by whoever returns it.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SESSION_RESETS = (None, "discard", "reconnect")
# Checkouts rotate through up to _ROTATION idle connections; one returned less than
# _BACK_TO_BACK ago is not handed out again while another is idle, and after _WIDEN_AFTER such
# checkouts in a row stale connections join the rotation (see _pop_idle_locked).
_BACK_TO_BACK = 0.001
_ROTATION = 4
_WIDEN_AFTER = 8
_RESET_FAILED = DiscardReason.RESET_FAILED  # a global: the return path names it often

_CONFIGURE_HOOK = "the configure hook"
_CHECK_HOOK = "the check hook"
_RESET_HOOK = "the reset hook"
_CONNECT_LISTENER = "a connect listener"
_CHECKOUT_LISTENER = "a checkout listener"
_CHECKIN_LISTENER = "a checkin listener"


class _Slot:
    """One driver connection and the pool's record of it.

    The lease fields (``dirty`` ... ``restore``, ``used``, ``exposed``) are written by the
    thread that holds the lease.  Every lease sets ``used`` before it touches the connection;
    the return path then puts them back to their defaults, or discards the connection: so an
    idle connection has them all at their defaults, and a lease that did nothing needs no
    cleaning.
    """

    __slots__ = (
        "raw",
        "dialect",
        "expires_at",
        "used_at",
        "alive_at",
        "leased_at",
        "generation",
        "dirty",
        "busy",
        "cursors",
        "tracks_reads",
        "cursors_checked_at",
        "loose_cursors",
        "loose_checked_at",
        "restore",
        "settings",
        "session",
        "database",
        "claim",
        "doomed",
        "lost",
        "transaction",
        "owner",
        "used",
        "exposed",
        "borrowed",
        "__weakref__",
    )

    def __init__(self, generation: int) -> None:
        self.raw: Any = None  # None while the connection is being opened
        self.dialect: Dialect
        self.expires_at = 0.0
        # Monotonic times: when a borrower last returned it (or it was opened), the clock of
        # idle_timeout and of the checkout order; and when it was last known to work (that,
        # or a ping since), the clock of validate_after.
        self.used_at = self.alive_at = 0.0
        self.leased_at = 0.0  # monotonic time of the checkout, for the hold time
        self.generation = generation
        self.dirty = False  # a statement ran since the last commit or rollback
        # True while a driver call runs, and after one was interrupted half-way (then
        # transaction.INTERRUPTED, once the interrupt came out of the call)
        self.busy: object = False
        self.doomed = False  # a cancel, rollback or reset failed: never reuse it
        # A call failed with an error that says the connection is lost where the driver's
        # state does not (Dialect.is_disconnect): expired at once, discarded as broken on return
        self.lost = False
        self.transaction: Any = None  # the Transaction whose block is running on it
        self.owner = 0  # threading.get_ident() of the thread that leased it, or is closing it
        self.used = False  # the lease touched the connection: the return path must clean it
        # The lease handed out the driver's connection or cursor (raw): a call the lease could
        # not see may have failed, leaving state the driver caches (PyMySQL's flags) stale.
        self.exposed = False
        # With leak_timeout: (monotonic time, stack, thread name) of the checkout, and whether
        # the lease was reported as held too long.
        self.borrowed: _Borrowed | None = None
        self.cursors: list[Any] | None = None  # driver cursors the lease made
        # The lease made a stream, or finish_reading cut a result of it short: its _streams or
        # _cut_short is set, for a COMMIT, ROLLBACK or the end of a result to look at
        self.tracks_reads = False
        # How many there are when the lease next lets go of those dropped unclosed (lease.py)
        self.cursors_checked_at = _FIRST_CURSOR_CHECK
        # The driver's cursors that conn.execute() returned through the lease, and the handles
        # of blobopen() and the like, weakly held: closed on return (see lease._tracked_call)
        self.loose_cursors: list[weakref.ref[Any]] | None = None
        self.loose_checked_at = _FIRST_CURSOR_CHECK  # their number when next rid of the dead
        self.restore: dict[str, Any] | None = None
        self.settings: object = None  # the dialect's client settings as first connected
        # The server session configure set up (Dialect.server_session): a driver that connects
        # again by itself, on the same connection object, opens one configure never saw.
        self.session: object = None
        # The database file it opened (Dialect.database_file): validation fails once the file
        # at its path is another (a SQLite file replaced under the pool by a deploy or restore).
        self.database: object = None
        # The claim of the lease that has it last (see lease.Connection._claim): empty while
        # no lease may return the slot.
        self.claim: list[_Slot] = []

    def may_hold_part_read(self) -> bool:
        """Whether the lease may have left a result part-read, to be ended before COMMIT,
        ROLLBACK or a savepoint's end (see lease.finish_reading); written out on the lease's
        commit and rollback paths."""
        return bool(self.cursors or self.tracks_reads) and self.dialect.part_read_results

    def close_cursors(self) -> None:
        """Close the driver cursors the lease left open: its own, those conn.execute() returned
        (the driver's own), and the handles of blobopen() and the like."""
        if self.cursors:
            cursors, self.cursors = self.cursors, None
            dialect = self.dialect
            if dialect.unbuffered_cursors and len(cursors) > 1:
                # The one with rows still to come first: it ran the latest statement, and a
                # MySQL driver closing another asks for the connection's next result, out of
                # turn while those rows come (mysqlclient: "Commands out of sync").  The look
                # reads a row of a result about to be dropped.
                def rows_to_come(cursor: Any) -> bool:
                    return dialect.may_hold_unread_result(cursor) and dialect.holds_unread_rows(
                        cursor
                    )

                cursors.sort(key=rows_to_come, reverse=True)  # stable: the rest in order
            for cursor in cursors:
                dialect.close_cursor(cursor)
        if self.loose_cursors is not None:
            loose, self.loose_cursors = self.loose_cursors, None
            self.loose_checked_at = _FIRST_CURSOR_CHECK
            for held in loose:
                cursor = held()
                if cursor is not None:
                    self.dialect.close_cursor(cursor)


class _Borrowed:
    """Where and when a lease was taken, recorded when leak detection is on."""

    __slots__ = ("at", "stack", "thread", "reported")

    def __init__(self) -> None:
        self.at = monotonic()
        # The borrower's frames only (the pool's own would hide the line that matters), as
        # plain tuples: their source lines are read only if a report is written.
        stack: list[tuple[str, int, str]] = []
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if not code.co_filename.startswith(_PACKAGE_DIR):
                stack.append((code.co_filename, frame.f_lineno, code.co_name))
            frame = frame.f_back
        stack.reverse()  # outermost first, as a traceback reads
        self.stack = stack
        self.thread = threading.current_thread().name
        self.reported = False

    def where(self) -> str:
        frames = traceback.StackSummary.from_list(
            [(name, line, function, None) for name, line, function in self.stack]
        )
        return "".join(frames.format()).rstrip()


class _Waiter:
    """A caller waiting for a connection: queued for a free one, or for the connect made on its
    behalf.  ``wakeup`` is held until the caller is served."""

    __slots__ = ("wakeup", "grant", "slot", "error", "abandoned", "since", "ident")

    def __init__(self, since: float = 0.0, ident: int = 0) -> None:
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        # A queued caller's: when it asked for a connection (the start of its wait), and its
        # thread (the owner of a connection lent to it)
        self.since = since
        self.ident = ident
        self.grant: object = None  # _LENT, _HANDED, _OPEN, _FAILED or _CLOSED once served
        self.slot: _Slot | None = None
        # Why the connect failed, with _FAILED; the PoolTimeout of a queued caller whose time
        # ran out, with no grant
        self.error: BaseException | None = None
        # The caller gave up (timed out or was interrupted): what it waited for goes to the
        # pool instead.  Written and read under the pool lock.
        self.abandoned = False


# What a waiter is granted.
_LENT = "a connection returned just now, fit for use: leased to it, and counted, as handed over"
_HANDED = "a live connection, to validate"
_OPEN = "a reserved slot to open a connection in"
_FAILED = "the connect made for it failed"
_CLOSED = "the pool closed"


# Why a connection whose check hook connected it again is not handed out.  PyMySQL's ping()
# reconnects by default before 1.2, and mysqlclient's ping(True) does.
_CHECK_RECONNECTED = (
    "the check connected it again (ping() with reconnect), to a server session that "
    "configure never set up"
)

# Why a connection whose database file was replaced (or removed) is not handed out: it still
# reads the old file, and writes to it fail (SQLite: "attempt to write a readonly database").
_FILE_REPLACED = "the file at its database's path is no longer the one it opened"

_GENERATOR_WITH_CONNECTION = (
    "fn must use the connection before it goes back, but {fn} is a generator function (it "
    "uses yield), whose body would run only as its result is iterated, the connection back "
    "in the pool: return the rows (a list) instead"
)

# A bound on times given as ints: a larger one has no float, nor a deadline, to stand for it.
_LARGEST_SECONDS = 1e300


def _check_number(
    name: str, value: object, *, allow_none: bool, positive: bool, finite: bool = False
) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if allow_none else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    hint = " (or None to disable it)" if allow_none else ""
    bound = "greater than 0" if positive else "0 or more"
    # The limit that really holds: a finite time's is the threading primitives', not this
    # bound of ints; where infinity is accepted, the message says so.
    limit = threading.TIMEOUT_MAX if finite else _LARGEST_SECONDS
    if isinstance(value, int) and abs(value) > limit:  # not shown: it may be huge
        unlimited = "" if finite else ", or float('inf') for no limit"
        raise ValueError(f"{name} must be {bound} and at most {limit:g} seconds{unlimited}{hint}")
    if not (value > 0 if positive else value >= 0):  # also catches NaN
        raise ValueError(f"{name} must be {bound}{hint}, got {value!r}")
    if finite and not value <= threading.TIMEOUT_MAX:
        raise ValueError(
            f"{name} must be at most {threading.TIMEOUT_MAX:g} seconds{hint}, got {value!r}"
        )


def _detached(exc: BaseException) -> BaseException:
    """A copy of a connect error, caught in ``Pool._open``, for the pool to keep (it chains
    later timeouts to it), with the traceback of the connect alone: the caller that raises
    ``exc`` adds its own frames to it, and so would ``_open``'s frame (its waiter holds
    ``exc``); kept, they would keep the caller's locals alive, a lease it dropped among them,
    until the next connect.  ``exc`` itself if it cannot be copied."""
    try:
        kept = copy.copy(exc)
    except Exception:
        return exc
    if type(kept) is not type(exc):
        return exc
    caught = exc.__traceback__  # _open's frame first: it caught the error
    kept.__traceback__ = None if caught is None else caught.tb_next
    kept.__cause__, kept.__context__ = exc.__cause__, exc.__context__
    kept.__suppress_context__ = exc.__suppress_context__
    return kept


def _connections(count: int) -> str:
    return "1 connection" if count == 1 else f"{count} connections"


def _bounded(seconds: float) -> float:
    """A wait of ``seconds``, clamped to what the threading primitives accept."""
    return min(max(seconds, 0.0), threading.TIMEOUT_MAX)


def _check_count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, got {value}")
    return value


class Pool(Generic[C]):
    """A thread-safe pool of DB-API 2.0 connections made by ``connect()``.

    :param connect: called with no arguments for every new connection; returns a DB-API
        connection of any driver.  The pool's type is inferred from it, except from a
        driver's ``connect`` generic in its row type passed bare: write
        ``Pool[psycopg.Connection](psycopg.connect)`` for ``Pool(psycopg.connect)``.
    :param min_size: connections kept open, opened in the background from the start.
    :param max_size: hard cap on connections open or being opened.
    :param acquire_timeout: seconds a caller may wait for a connection.
    :param idle_timeout: seconds after which an idle connection above ``min_size`` is closed
        (``None``: never).
    :param max_lifetime: seconds after which a connection is retired, minus up to 5 % jitter so
        that connections made together do not expire together (``None``: never).
    :param max_waiting: how many callers may queue; ``0`` for no limit.
    :param validate_after: a connection idle for longer than this many seconds is pinged before
        it is handed out (``0``: always; ``None``: only after a broken connection was found,
        for the connections returned before that).
    :param reconnect_delay: first delay after a failed connect; it doubles with each failure.
    :param reconnect_max_delay: cap of that delay.
    :param session_reset: what undoes server-side session state (``SET`` / ``SET ROLE``,
        temporary tables, user variables, prepared statements) before the next borrower:
        ``None`` (default) nothing beyond the rollback and the driver settings;
        ``"discard"`` the server's own reset (``DISCARD ALL`` on PostgreSQL, a connection
        reset on MySQL/MariaDB with PyMySQL, then PyMySQL's connect-time setup) after each
        lease that used the connection (one round trip on PostgreSQL, four on MariaDB with
        PyMySQL's defaults), or a reconnect where the driver has no reset; ``"reconnect"``
        closes every connection a lease ran something on.
    :param leak_timeout: a lease held longer than this many seconds is logged as a warning
        with the stack of the code that took it (``None``: off; costs a stack capture per
        checkout when on).
    :param configure: called with each new driver connection before anyone uses it (``SET
        application_name``, ``search_path``, ``autocommit``...); must commit what it changes
        in a transaction: a transaction left open fails the connect (where the driver reports
        it; elsewhere it is rolled back).  If it raises, the connect fails.  What it sets is
        what every return restores.
    :param check: called with the driver connection at every checkout, instead of the idle ping
        (``validate_after`` is then unused); if it raises, the connection is discarded and
        another one is taken.  Bounded by the caller's deadline like the ping, as far as it
        waits on the connection's socket.
    :param reset: called with the driver connection on return, after the pool's rollback, when
        the lease used it; if it raises or leaves a transaction open, the connection is
        discarded.  Runs outside the pool's lock.
    :param dialect: a :class:`dbpool.dialects.Dialect` or its name; by default detected from
        the driver of the first connection.
    :param name: shown in logs, errors and ``repr``; default ``pool-1``, ``pool-2``, ...
    """

    def __new__(cls, *args: Any, **options: Any) -> Pool[Any]:
        # Before __init__, whose bare error would name the argument only: an option another
        # pool takes, a misspelt one or one passed by position is told what to write instead.
        # Pool's own options only: a subclass's __init__ may take more.
        if cls.__init__ is Pool.__init__:
            unknown = options.keys() - POOL_OPTIONS - {"connect"}  # (connect=... is fine)
            if unknown:
                raise TypeError(unknown_options(unknown, POOL_OPTIONS))
            if len(args) > 1:
                raise TypeError(
                    "Pool() takes the connect callable as its only positional argument, and "
                    "its options by name: Pool(connect, max_size=10)"
                )
        return super().__new__(cls)

    def __init__(
        self,
        connect: Callable[[], C],
        *,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 30.0,
        idle_timeout: float | None = 600.0,
        max_lifetime: float | None = 3600.0,
        max_waiting: int = 0,
        validate_after: float | None = 1.0,
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
        session_reset: str | None = None,
        leak_timeout: float | None = None,
        configure: Callable[[C], object] | None = None,
        check: Callable[[C], object] | None = None,
        reset: Callable[[C], object] | None = None,
        dialect: Dialect | str | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(connect, type) and _detect_dialect(connect).name != "generic":
            # A driver's connection given for the function that makes them, told first: sqlite3's
            # is callable (it makes statements), its signature readable from Python 3.13 on.
            driver = type(connect).__module__.partition(".")[0]
            raise TypeError(
                f"connect must be a callable that returns a new DB-API connection, got a "
                f"{driver} connection: pass the function that makes one (for example "
                f"lambda: {driver}.connect(...))"
            )
        if isinstance(connect, str):  # psycopg_pool takes one: not quoted, it may hold a password
            raise TypeError(
                "connect must be a callable that returns a new DB-API connection, got a str: "
                "for a URL use dbpool.create_pool(url); for a driver's connection string pass "
                "a function that connects with it (for example lambda: psycopg.connect(dsn))"
            )
        check_callable(
            "connect",
            connect,
            0,
            "a callable taking no arguments that returns a DB-API connection "
            "(for example lambda: psycopg.connect(dsn))",
        )
        _check_count("min_size", min_size, minimum=0)
        _check_count("max_size", max_size, minimum=1)
        if min_size > max_size:
            raise ValueError(
                f"min_size ({min_size}) must not exceed max_size ({max_size}): "
                "raise max_size or lower min_size"
            )
        _check_number("acquire_timeout", acquire_timeout, allow_none=False, positive=False)
        _check_number("idle_timeout", idle_timeout, allow_none=True, positive=True)
        _check_number("max_lifetime", max_lifetime, allow_none=True, positive=True)
        _check_count("max_waiting", max_waiting, minimum=0)
        _check_number("validate_after", validate_after, allow_none=True, positive=False)
        _check_number(
            "reconnect_delay", reconnect_delay, allow_none=False, positive=True, finite=True
        )
        _check_number(
            "reconnect_max_delay", reconnect_max_delay, allow_none=False, positive=True, finite=True
        )
        if reconnect_max_delay < reconnect_delay:
            raise ValueError(
                f"reconnect_max_delay ({reconnect_max_delay}) must not be below "
                f"reconnect_delay ({reconnect_delay}): raise reconnect_max_delay or lower "
                "reconnect_delay"
            )
        if session_reset not in _SESSION_RESETS:
            error = ValueError if isinstance(session_reset, str) else TypeError
            raise error(
                f"session_reset must be None, 'discard' or 'reconnect', got {session_reset!r}"
            )
        _check_number("leak_timeout", leak_timeout, allow_none=True, positive=True, finite=True)
        for hook_name, hook in (("configure", configure), ("check", check), ("reset", reset)):
            if hook is not None:
                check_callable(
                    hook_name, hook, 1, "a callable taking the driver's connection, or None"
                )
        if isinstance(dialect, str):
            dialect = _dialect_named(dialect)
        elif dialect is not None and not isinstance(dialect, Dialect):
            raise TypeError(
                "dialect must be a dbpool.dialects.Dialect, a dialect name or None, "
                f"got {dialect!r}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        if name is not None and not name.strip():  # it names threads, log lines, metrics
            raise ValueError(
                f"name must not be empty or only spaces, got {name!r}: give a name, or None "
                "for pool-1, pool-2, ..."
            )

        self._connect = connect
        try:
            self._secrets = secrets_in(connect)  # scrubbed from connect errors
        except Exception:  # whatever it meets: the pool works without
            self._secrets = ()
        self._name = name if name is not None else f"pool-{next(_pool_numbers)}"
        self._min_size = min_size
        self._max_size = max_size
        self._acquire_timeout = float(acquire_timeout)
        self._idle_timeout = _NEVER if idle_timeout is None else float(idle_timeout)
        self._max_lifetime = _NEVER if max_lifetime is None else float(max_lifetime)
        self._max_waiting = max_waiting
        if check is not None:
            self._validate_after = -1.0  # the check runs at every checkout, instead of the ping
        else:
            self._validate_after = _NEVER if validate_after is None else float(validate_after)
        self._reconnect_delay = float(reconnect_delay)
        self._reconnect_max_delay = float(reconnect_max_delay)
        self._session_reset = session_reset
        self._leak_timeout = leak_timeout
        self._configure = configure
        self._check = check
        self._reset = reset
        self._dialect: Dialect | None = dialect
        self._listeners = Listeners()

        # Leases dropped without release are queued here by their finalizer, which may run in
        # any thread at any moment and so must not take the lock; the reaper returns them
        # (the next acquire wakes it), and so do drain() and close().
        self._orphans: deque[_Slot] = deque()
        # Per thread, the hooks and listeners it is running on one of this pool's connections,
        # innermost last: drain() and close() called from one of them would wait for that very
        # connection, which the pool gets back only once the call returns, and refuse at once
        # instead.  Made here, not as dbpool is imported: under gevent's monkey-patching,
        # threads are greenlets, and a threading.local made before the patching is shared by
        # all the greenlets of a thread.
        self._handling = threading.local()
        self._setup_state()
        _fork.register(self)
        self._start_reaper()

    def _setup_state(self) -> None:
        """The state the lock guards, made afresh in ``__init__`` and in a forked child."""
        # Reentrant only so that an exception landing just after this thread took the lock
        # (a signal handler runs as soon as acquire() returns) can be recovered from: see
        # _drop_lock_if_held().  Nothing takes it twice on purpose.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # wait() and close() wait on it
        # --- guarded by self._lock --------------------------------------------------------
        # Invariants, true whenever the lock is free:
        #   size == len(idle) + in_use + opening <= max_size
        #   idle and waiters are never both non-empty: a free connection goes to the oldest
        #     waiter first, and a waiter is granted a slot to open as soon as there is room
        #     and connects are not backing off
        #   every connection the pool owns is in `everyone`: idle, leased, or being validated
        self._idle: deque[_Slot] = deque()  # most recently returned on the right
        self._back_to_back = 0  # checkouts in a row, each right after a return
        self._waiters: deque[_Waiter] = deque()  # oldest on the left
        self._everyone: set[_Slot] = set()
        self._size = 0
        self._in_use = 0
        self._opening = 0
        # Connections let go by the thread that returned, discarded or opened them (or that the
        # reaper retired), counted off the above and being closed by that thread (its ident in
        # slot.owner): drain() and close() wait for them too.  Each is added after its counts
        # drop; once closed, that thread puts it in `_closed_off` without the lock (a signal
        # handler may raise as a thread waits for it), and _settle_closes_locked() takes it out.
        self._closing: set[_Slot] = set()
        self._closed_off: deque[_Slot] = deque()  # appended to without the lock
        # Leased before reopen(), no longer counted: each is closed as it comes back (and
        # taken out then, without the lock: one borrower holds it); a forked child drops them.
        # Still open and lent out: stats() adds them to size and in_use.
        self._retired: set[_Slot] = set()
        # Left open by close() for their borrowers to close (_LEFT_OPEN): a forked child drops
        # them.  Weakly: a lease dropped unreleased takes its connection along.
        self._left_open: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._closed = getattr(self, "_closed", False)
        # Closed by drain(): reopen() may open it again, and close() still closes what is out.
        self._drained = getattr(self, "_drained", False)
        self._generation = getattr(self, "_generation", -1) + 1
        # Reconnect backoff: while connects fail, one attempt per delay, by whoever comes first.
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._last_connect_error: BaseException | None = None
        # Connections last returned before a broken one was found are pinged at checkout, and
        # by the reaper, once per broken one found (_swept_at: the last it swept for).
        self._broken_at = self._swept_at = -_NEVER
        # Counters.
        self._created = self._closed_count = self._discarded = 0
        self._served_at_once = self._timeouts = self._connect_errors = 0
        self._leak_warnings = self._leaked = 0
        self._wait_time = self._held_time = self._connect_time = 0.0
        self._returned = 0
        # Of those, the leases whose connection was not put back: discarded or closed as it
        # came back, or ended by close() (health() wants returns that prove the database serves)
        self._not_kept = 0
        # Checkouts are counted as they are served, never taken back, so that the counters
        # only grow: those served at once from the idle stack (_served_at_once, above), and
        # the others with their wait, by bucket.  stats() adds the first to the first bucket,
        # and both make ``acquired``.
        self._wait_counts = [0] * len(WAIT_BUCKETS)
        self._waits_recorded = 0
        self._discards = no_discards()
        self._refilling = False  # a refill thread is running
        self._exiting = False  # the interpreter is exiting: no more refills (_settle_at_exit)
        self._stopping = 0  # close() and drain() calls under way: reopen() must wait for them
        # Callers waiting for a connect made for them (not in the queue); close() tells them.
        self._connecting: set[_Waiter] = set()
        # Threads checking out for health(), by ident: a probe queues past max_waiting (it
        # sheds no load), and is marked True once its wait in the queue ran out: only that
        # says the pool is busy (not a connect or a validation that ran out of time).
        self._probes: dict[int, bool] = {}
        # --- end of guarded state ----------------------------------------------------------
        # Driver connections open in a connect thread, not counted yet (configure and the
        # connect listeners run first): a forked child detaches them as it does those counted.
        # By id; each is added and removed by its connect thread, one dict operation each.
        self._being_opened: dict[int, Any] = {}
        self._reaper_wakeup = threading.Event()
        self._reaper_thread: threading.Thread | None = None
        # A forked child's pool: its reaper starts with the child's first use of the pool
        # (_wake_after_fork), not at the fork.  Set only then; cleared under the lock.
        self._asleep = False

    def _start_reaper(self) -> None:
        if self._closed:
            return
        self._reaper_thread = reaper.start(self, self._reaper_wakeup)

    def _wake_after_fork(self) -> None:
        """Start the maintenance of a pool inherited across fork(), at the child's first use
        of it (checkout, stats(), wait(), check(), resize()).  A child that never uses the
        pool, as one that is about to exec() a program, gets no thread of it, and so no
        connect.  The first checkout always comes here: the child's idle stack is empty."""
        with self._lock:
            if not self._asleep:
                return
            self._asleep = False  # the thread is this caller's to start: the others go on
            if self._closed:
                return
            wakeup = self._reaper_wakeup
        # Started once the lock is let go, which the new thread takes first thing (as the
        # watchdog's: under gevent, a lock made before the monkey-patching, as at fork, held
        # across start() would block the process).
        try:
            thread = reaper.start(self, wakeup)
        except BaseException:
            with self._lock:
                self._asleep = not self._closed  # tried again at the next use
            raise
        with self._lock:
            if self._reaper_wakeup is wakeup:  # else reopen() started one of its own
                self._reaper_thread = thread

    # -- public API ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def min_size(self) -> int:
        return self._min_size

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def closed(self) -> bool:
        return getattr(self, "_closed", True)  # True too if the constructor raised

    def connection(self, *, timeout: float | None = None) -> Connection[C]:
        """Lease a connection, for use as ``with pool.connection() as conn:``.

        Waits up to ``timeout`` seconds (default ``acquire_timeout``) in strict FIFO order;
        raises :class:`PoolTimeout`, :class:`TooManyWaiters`, :class:`PoolClosed`, or the
        driver's own error when this caller had to connect and the connect failed.
        """
        if timeout is not None:
            _check_number("timeout", timeout, allow_none=False, positive=False)
        slot = None  # a connection this call holds (counted in acquired), to give back on error
        waiter = None  # this call's place in the queue, until it is served
        started = None  # set when this checkout could not be served at once: its wait counts
        conn = None
        told = False  # checkout listeners were told of the lease: an undo tells its checkin
        try:
            # The common case, inline: an idle connection that needs no round trip.
            now = monotonic()
            fresh = False
            if not self._orphans:
                # acquire() and release() rather than "with": half the cost on CPython 3.11
                self._lock.acquire()
                try:
                    idle = self._idle
                    if idle:  # then nobody is waiting, and the pool is open
                        # _pop_idle_locked's body, written out (a call fewer on every
                        # checkout): change both
                        depth = len(idle)
                        if depth > _ROTATION:
                            depth = _ROTATION
                        if now - idle[-1].used_at < _BACK_TO_BACK:
                            self._back_to_back += 1
                        else:
                            self._back_to_back = 0
                        if depth > 1 and self._back_to_back < _WIDEN_AFTER:
                            while depth > 1 and now - idle[-depth].alive_at > self._validate_after:
                                depth -= 1
                            if depth == 1 and self._back_to_back:
                                depth = 2
                        # An index and a del, not pop(), and no call until it is counted (see
                        # _pop_idle_locked)
                        slot = idle[-depth]
                        del idle[-depth]
                        self._in_use += 1
                        alive_at = slot.alive_at
                        fresh = (
                            now - alive_at <= self._validate_after
                            and alive_at > self._broken_at
                            and now < slot.expires_at
                        )
                        if fresh:  # served at once: counted now, under the lock
                            self._served_at_once += 1
                            # Leased from now on: a close() past its timeout that ends it
                            # before the lease is made counts it as returned
                            slot.owner = threading.get_ident()
                            slot.leased_at = now
                    elif (
                        self._waiters  # then the pool is full: no room to connect
                        and not self._closed  # (a close() cut short may leave some queued)
                        and not self._connect_failures
                        and (not self._max_waiting or len(self._waiters) < self._max_waiting)
                    ):
                        # The busy pool's common case, inline: in the queue at once (_take's
                        # own, in short)
                        waiter = _Waiter(now, threading.get_ident())
                        self._waiters.append(waiter)
                finally:
                    self._lock.release()
            deadline = None
            if waiter is not None:
                started = now
                if timeout is None:
                    timeout = self._acquire_timeout
                deadline = now + timeout
                self._await_grant(waiter, deadline, timeout)
                slot, fresh = self._granted(waiter)  # lent: counted, as one served at once is
                waiter = None  # served: the slot is what is left to undo
                if not fresh:
                    candidate, slot = slot, None  # _ready keeps or gives it back itself
                    slot = self._ready(candidate, deadline, timeout, started)
            elif slot is not None and not fresh:  # counted once validated, as a wait
                started = now
                deadline = now + (self._acquire_timeout if timeout is None else timeout)
                candidate, slot = slot, None  # validation keeps or discards it itself
                if self._fit_for_use(candidate, deadline, since=now):
                    slot = candidate
                elif now >= candidate.expires_at:
                    deadline = None  # discarded for its age, with no ping: no time spent
            if slot is None:
                again = started is not None  # served, and what it was served failed
                if started is None:
                    started = now  # taken before the fast path's look at the idle stack
                slot, fresh = self._acquire(timeout, deadline, started, again=again)
            if self._leak_timeout is not None:
                slot.borrowed = _Borrowed()
            if started is None:
                conn = lease(self, slot)
                slot.claim.append(slot)  # the lease is stored: its first close() returns it
                if self._listeners.checkout:
                    told = True
                    self._emit_handling(
                        _CHECKOUT_LISTENER, self._listeners.checkout, Event.CHECKOUT, slot.raw, 0.0
                    )
                return conn
            if fresh:  # lent by a return: leased and counted as it was handed over
                waited = slot.leased_at - started
            else:
                me = threading.get_ident()
                now = monotonic()
                waited = now - started
                bucket = wait_bucket(waited)
                # Under the lock, as close() past its timeout ends leases under it: either it
                # ended this one first, as this caller validated it or woke up with it, and
                # counted no return of it (no owner yet), or it finds the owner and the count
                # of the checkout set, and counts the lease it ends as returned.  Owner and
                # counts are set with no call among them (see _pop_idle_locked).
                self._lock.acquire()
                try:
                    if slot.generation >= 0:
                        slot.owner = me
                        slot.leased_at = now
                        self._wait_time += waited
                        self._wait_counts[bucket] += 1
                        self._waits_recorded += 1
                        fresh = True  # counted in acquired, as one served at once is
                finally:
                    self._lock.release()
            if not fresh or slot.generation < 0 or self._closed:
                # Ended by close() (which counted its return if its checkout was counted), or
                # the pool was closed or drained meanwhile: told so, rather than lent it, as
                # _fit_for_use tells one.  _put_back closes it, counting the return of a
                # counted checkout (or _close_if_retired does, for one close() left open).
                held = 0.0 if fresh else None
                back, slot = [slot], None
                try:
                    if fresh:  # counted as a checkout and as its return: told as both
                        self._tell_refused_checkout(back[0], waited)
                    self._put_back(back, held)
                except BaseException:
                    if back:  # a signal handler raised as _put_back was entered
                        self._discard(back[0], DiscardReason.INTERRUPTED, broken=False, held=held)
                    raise
                how = "drained" if self._drained else "closed"
                raise PoolClosed(
                    f"pool {self._name!r} was {how} while this caller waited for a connection"
                )
            conn = lease(self, slot)
            slot.claim.append(slot)
            if self._listeners.checkout:
                told = True
                self._emit_handling(
                    _CHECKOUT_LISTENER, self._listeners.checkout, Event.CHECKOUT, slot.raw, waited
                )
            return conn
        except BaseException:
            self._drop_lock_if_held()
            if waiter is not None:  # whatever it was granted meanwhile goes back
                self._abandon(waiter)
            if slot is not None:
                # A lease made meanwhile must never return it: it may be referenced (from the
                # traceback) long after the connection went to someone else.  Taking its claim
                # (armed or not) keeps the slot here: the borrower never had the lease.  Taken
                # as a return takes it, with an index and a del: either close() ended the lease
                # first and told its checkin (its owner then 0), or it finds no claim and
                # leaves that to this undo.
                try:
                    del slot.claim[0]
                except IndexError:  # not stored yet, or close() is ending the lease now
                    told = False
                if conn is not None:
                    revoke(conn)
                try:
                    if told and slot.owner:  # a lease told of ends: once for each checkout
                        self._tell_checkin(slot, monotonic() - slot.leased_at)
                finally:
                    self._untake(slot, counted=fresh)
            raise

    def connect(self, *, timeout: float | None = None) -> Connection[C]:
        """Lease a connection as a drop-in PEP 249 source: ``conn.close()`` returns it."""
        return self.connection(timeout=timeout)

    def transaction(
        self,
        *,
        isolation: Isolation | str | None = None,
        timeout: float | None = None,
        readonly: bool = False,
    ) -> Transaction[C]:
        """A transaction on a connection of its own: ``with pool.transaction() as tx:``.

        :param isolation: one of the four ANSI levels (a :class:`dbpool.Isolation` or its name
            in any case, with spaces or underscores); ``None`` keeps the server's default.
            A level the driver or server cannot honour raises ``ValueError``.
        :param timeout: seconds from BEGIN; past them the running statement is cancelled,
            the transaction rolled back and :class:`dbpool.TransactionTimeout` raised.
        :param readonly: start a read-only transaction where the server has them.

        Normal exit commits; an exception rolls back and propagates; the lease is released in
        any case.  Bad arguments raise before any connection is taken, and so does a level
        or read-only mode the dialect cannot give once the pool has connected (before that,
        BEGIN refuses it on the first connection).
        """
        return Transaction(self, isolation=isolation, timeout=timeout, readonly=readonly)

    def run_transaction(
        self,
        fn: Callable[[Transaction[C]], T],
        *,
        isolation: Isolation | str | None = None,
        readonly: bool = False,
        retries: int = 5,
        timeout: float | None = None,
    ) -> T:
        """Return ``fn(tx)`` run in a transaction, re-run on a fresh transaction, after a
        jittered exponential backoff, when the database reports a serialization failure or a
        deadlock (PostgreSQL 40001 / 40P01, MySQL 1213 / 1205 and MariaDB's 1020, SQLite busy,
        SQL Server 1205 / 3960 and its memory-optimized tables' 41301 / 41302 / 41305 / 41325 /
        41823 / 41839 / 41840), at COMMIT too, at most ``retries`` times, all within ``timeout``
        seconds.  Such an error that ``fn`` caught counts too (the block then raises
        :class:`dbpool.TransactionRolledBack`).  Never re-run after
        :class:`dbpool.CommitOutcomeUnknown`; when the time runs out, even between attempts,
        :class:`dbpool.TransactionTimeout`, chained to the last error."""
        return run_transaction(
            self, fn, isolation=isolation, readonly=readonly, retries=retries, timeout=timeout
        )

    def release(self, conn: Connection[C]) -> None:
        """Return a leased connection; the same as ``conn.close()``."""
        if not isinstance(conn, Connection):
            raise TypeError(
                f"release() takes the dbpool.Connection that pool.connection() returned "
                f"(not the driver's connection, conn.raw), got {type(conn)!r}"
            )
        # By the claim, not conn.released: a lease the pool ended (close() past its timeout,
        # fork()) was never given back, and its release() does nothing, as its close() does.
        if conn._pool is self and not conn._claim:
            raise LeaseReleased(
                "this connection was already returned to the pool: release it once "
                "(conn.close() and leaving 'with' may be repeated, release() may not)"
            )
        self._release(conn)

    def discard(self, conn: Connection[C]) -> None:
        """End a lease and close its connection instead of returning it, for a connection
        the caller knows is unfit for the next borrower (a protocol error the driver did not
        notice, session state it cannot undo).  Counted in ``discards`` as ``"requested"``;
        the pool opens another as needed.  Like ``release()``, it refuses a lease already
        returned, and does nothing for one the pool ended itself."""
        if not isinstance(conn, Connection):
            raise TypeError(
                f"discard() takes the dbpool.Connection that pool.connection() returned "
                f"(not the driver's connection, conn.raw), got {type(conn)!r}"
            )
        if conn._pool is not self:
            raise PoolError(
                f"this connection was leased from pool {conn._pool.name!r}, not from "
                f"pool {self._name!r}: discard it through the pool it came from"
            )
        slot = detach(conn)
        if slot is None:
            raise LeaseReleased(
                "this connection was already returned to the pool: it can no longer be "
                "discarded (pool.discard() takes a lease still held)"
            )
        if slot.generation != self._generation:
            # Leased before reopen() (closed as it comes back), or ended by the pool: as close()
            self._give_back([slot])
            return
        held = 0.0
        try:
            held = monotonic() - slot.leased_at  # (a signal handler may raise as it returns)
            if slot.borrowed is not None:
                self._note_return_of_borrowed(slot)
            if self._listeners.checkin:  # it came back, as every lease does
                self._emit_handling(
                    _CHECKIN_LISTENER, self._listeners.checkin, Event.CHECKIN, slot.raw, held
                )
        finally:  # whatever a listener raised, the connection is not reused
            self._discard(slot, DiscardReason.REQUESTED, broken=False, held=held)

    def wait(self, timeout: float = 30.0) -> None:
        """Block until ``min_size`` connections are open.

        Raises :class:`PoolTimeout`, chained to the last connect error if connects are
        failing, or :class:`PoolClosed`.
        """
        _check_number("timeout", timeout, allow_none=False, positive=False)
        if self._asleep:
            self._wake_after_fork()
        deadline = monotonic() + timeout
        with self._lock:
            if self._closed:
                raise PoolClosed(self._closed_message())
            while len(self._idle) + self._in_use < self._min_size:
                if self._closed:
                    raise PoolClosed(self._closed_message())
                remaining = deadline - monotonic()
                if remaining <= 0:
                    opened = len(self._idle) + self._in_use
                    error = self._last_connect_error
                    message = (
                        f"pool {self._name!r}: {opened} of min_size={self._min_size} "
                        f"connections open after {timeout:g} s"
                    )
                    if error is not None:
                        message += f"; connects are failing: {self._describe(error)}"
                    raise PoolTimeout(message) from error
                self._cond.wait(_bounded(remaining))

    def stats(self) -> PoolStats:
        """A consistent snapshot of the pool's gauges and counters."""
        if self._asleep:
            self._wake_after_fork()
        with self._lock:
            return self._stats_locked()

    # -- events ---------------------------------------------------------------------------------

    def add_listener(self, event: Event | str, listener: Listener) -> None:
        """Call ``listener(pool_event)`` on each ``event`` (a :class:`dbpool.Event` or its name:
        ``"connect"``, ``"checkout"``, ``"checkin"``, ``"discard"``, ``"close"``).

        Listeners run in the thread doing the work, outside the pool's lock; one that raises is
        logged and skipped.  They are for logging, tracing and metrics: a listener that uses
        the connection it is told about races with the connection's borrower.  A connect,
        checkout or checkin listener that calls :meth:`drain` or :meth:`close` of this pool
        gets :class:`PoolError` (they would wait for that connection).
        """
        self._listeners.add(event, listener)

    def remove_listener(self, event: Event | str, listener: Listener) -> None:
        """Stop calling ``listener`` on ``event``; ``ValueError`` if it was not listening."""
        self._listeners.remove(event, listener)

    # -- operations -----------------------------------------------------------------------------

    def check(self, timeout: float = 5.0) -> int:
        """Ping every idle connection now (with the ``check`` hook if there is one), close the
        dead ones, and open replacements in the background up to ``min_size``.  Returns how
        many were dead.  Connections leased meanwhile are not touched: each is taken out of the
        idle ones only for its own ping, so callers get the others meanwhile.

        The pings share ``timeout`` seconds: none starts once less than twice the slowest so
        far is left (it would likely be cut short, which discards a live connection on a slow
        link), and those not pinged stay as they were."""
        _check_number("timeout", timeout, allow_none=False, positive=False)
        if self._asleep:
            self._wake_after_fork()
        deadline = monotonic() + timeout
        with self._lock:
            if self._closed:
                raise PoolClosed(self._closed_message())
            idle = list(self._idle)
        count = len(idle)
        dead = self._probe_all(idle, deadline)
        if dead:
            logger.info(
                "pool %r: check() found %d of %d idle connections dead", self._name, dead, count
            )
            self._reaper_wakeup.set()  # refill to min_size
        return dead

    def health(self, timeout: float = 5.0) -> HealthReport:
        """A small report for readiness probes: whether a pooled connection answers a ping
        within ``timeout`` seconds, how long the ping took, and the stats.  When every
        connection stays busy for the whole ``timeout`` while leases keep coming back sound,
        the report is ok and ``busy``: the database serves, the pool is saturated.  The probe
        queues past ``max_waiting``, which sheds callers, not probes.  A connection idle
        since before the probe that fails its ping is discarded, and another one tried.

        Never raises for a database or pool problem: ``ok`` is false and ``error`` says what
        happened (the exception's type and first line), unless the pool is only busy.
        """
        _check_number("timeout", timeout, allow_none=False, positive=False)
        reachable = busy = False
        latency = None
        error = None
        deadline = monotonic() + timeout
        me = threading.get_ident()
        outer = None  # the probe of a health() this one runs inside (a listener's, say)
        try:
            with self._lock:  # what says, if no connection comes free, whether it is busy
                kept_before = self._returned - self._not_kept
                broken = self._discards["broken"]
                connect_errors = self._connect_errors
                outer = self._probes.get(me)
                self._probes[me] = False
            probed_at = monotonic()
            wait = timeout  # for the first connection; another gets what is left
            while not reachable:  # (a connection dead since before the probe: another)
                latency = self._ping_one(timeout, wait, deadline, probed_at)
                reachable = latency is not None
                wait = max(deadline - monotonic(), 0.0)
        except Exception as exc:
            error = self._describe(exc)
            busy = isinstance(exc, PoolTimeout)
        finally:
            self._drop_lock_if_held()
            with self._lock:
                queued_out = self._probes.pop(me, False)
                if outer is not None:
                    self._probes[me] = outer
        busy = busy and queued_out  # no connection came free: not a connect that hung
        stats = self.stats()  # "closed" from the snapshot: a close() in between would split them
        with self._lock:  # read after: a lease not kept since then only lowers the count kept
            kept = stats.returned - self._not_kept
        # Busy, if a lease came back sound meanwhile, none broken, and no connect failed: the
        # database serves, and every connection is busy doing so.  Reported as ok: a readiness
        # probe would otherwise take every saturated instance out of rotation at once.  One
        # discarded or closed as it came back is no sign that the database serves: its
        # rollback failed, its call was interrupted (the server gone, a hung statement cut
        # short), or it was retired (max_lifetime, session_reset, resize(), pool.discard())
        # and the connect that replaces it may hang as well.
        busy = (
            busy
            and kept > kept_before  # some came back sound, and were put back
            and stats.discards["broken"] == broken
            and stats.connect_errors == connect_errors
        )
        if busy:
            error = None
        return {
            "pool": self._name,
            "ok": (reachable or busy) and not stats.pool_closed,
            "reachable": reachable,
            "busy": busy,
            "latency": latency,
            "error": error,
            "closed": stats.pool_closed,
            "stats": stats.as_dict(),
        }

    def _ping_one(
        self, timeout: float, wait: float, deadline: float, probed_at: float
    ) -> float | None:
        """health()'s look at one connection, waited for up to ``wait`` seconds (the probe's
        ``timeout``, or what is left of it): how long its ping took; or, where it failed
        its ping (and was discarded) though it was older than the probe (``probed_at``) and
        time is left, ``None``, to try another: after a restart of the server, the connections
        idle since are dead, which says nothing of the server now (the failure made the
        others suspect: the next checkout pings them first).  Raises otherwise."""
        with self.connection(timeout=wait) as conn:
            slot = conn._slot
            assert slot is not None
            dialect, raw = slot.dialect, slot.raw
            started = monotonic()
            limit = max(deadline, started + _MIN_PING_TIME)
            guard = None
            try:
                with Overdue(limit, lambda: dialect.sever(raw)) as guard:
                    dialect.ping(raw)
                if guard.fired:  # answered, but its socket was shut down meanwhile
                    raise PoolTimeout(f"the ping took longer than {timeout:g} s")
            except BaseException as exc:  # failed its ping: never hand it out again
                if detach(conn) is None:
                    raise
                if slot.generation != self._generation:
                    self._give_back([slot])  # ended by close() meanwhile: as discard()
                    raise
                # As for check(): cut short by a budget under _SWEEP_TIME, the ping proves
                # nothing about the server (the link may be slow), and starts no sweep,
                # which would ping every idle connection again.
                cut_short = guard is not None and guard.fired
                evidence = not (cut_short and limit - started < _SWEEP_TIME)
                held = monotonic() - slot.leased_at
                try:
                    self._tell_checkin(slot, held)  # it came back, as every lease does
                finally:  # whatever a listener raised, the connection is not reused
                    if isinstance(exc, Exception):
                        self._discard(slot, DiscardReason.BROKEN, broken=evidence, held=held)
                    else:
                        self._discard(slot, DiscardReason.INTERRUPTED, broken=False, held=held)
                stale = slot.alive_at < probed_at and not cut_short
                if isinstance(exc, Exception) and stale and monotonic() < deadline:
                    return None
                raise
            return monotonic() - started

    def resize(self, *, min_size: int | None = None, max_size: int | None = None) -> None:
        """Change ``min_size`` and/or ``max_size`` while the pool is in use.

        Raising ``max_size`` lets queued callers connect at once; lowering it closes idle
        connections above it now and leased ones as they come back.  Raising ``min_size``
        opens connections in the background.  Bad values raise and change nothing.
        """
        if min_size is not None:
            _check_count("min_size", min_size, minimum=0)
        if max_size is not None:
            _check_count("max_size", max_size, minimum=1)
        if self._asleep:
            self._wake_after_fork()
        with self._lock:
            new_min = self._min_size if min_size is None else min_size
            new_max = self._max_size if max_size is None else max_size
            if new_min > new_max:
                raise ValueError(
                    f"min_size ({new_min}) must not exceed max_size ({new_max}): "
                    "pass both to move them together"
                )
            self._min_size = new_min
            self._max_size = new_max
            self._cond.notify_all()  # wait() compares with min_size
            # The least recently used idle connections above the new cap go now; leased ones
            # as they come back (_put_back).  Until then size may exceed max_size.  Leases
            # from before a reopen() count against the cap until they come back.
            excess = min(len(self._idle), self._size + len(self._retired) - new_max)
            surplus = [self._idle.popleft() for _ in range(excess)]
            self._forget_locked(surplus, DiscardReason.RESIZED)  # and lets waiters use new room
            me = threading.get_ident()
            for slot in surplus:  # drain() and close() wait for their close too
                slot.owner = me
                self._closing.add(slot)
        try:
            logger.info("pool %r resized: min_size=%d max_size=%d", self._name, new_min, new_max)
            self._reaper_wakeup.set()  # refill up to the new min_size
        finally:  # closed even if a signal handler raised: drain() and close() wait for them
            interrupted = self._close_all(
                surplus, DiscardReason.RESIZED, "resize() lowered max_size", counted=True
            )
        if interrupted is not None:
            raise interrupted

    # -- convenience ----------------------------------------------------------------------------

    def execute(self, sql: Any, params: Any = None, *, timeout: float | None = None) -> list[Any]:
        """Run one statement on a connection of its own and commit; return all its rows (``[]``
        for a statement with no result set).  ``sql`` is whatever the driver's
        ``cursor.execute()`` takes (a str, or psycopg's ``sql.Composed``, say).  On error the
        transaction is rolled back, the connection returned and the error raised."""
        with self.connection(timeout=timeout) as conn:
            cursor = conn.cursor()
            if params is None:
                cursor.execute(sql)
            else:
                cursor.execute(sql, params)
            rows = list(cursor.fetchall()) if cursor.description is not None else []
            cursor.close()
            conn.commit()
            return rows

    def with_connection(
        self, fn: Callable[[Connection[C]], T], *, timeout: float | None = None
    ) -> T:
        """Return ``fn(conn)`` run on a leased connection, returned to the pool afterwards
        whatever happens (without a commit: ``fn`` commits what it wants kept)."""
        # the type and the name, never the repr: a SQL string or a partial's arguments may
        # hold a password
        if not callable(fn):
            raise TypeError(f"fn must be a callable taking the connection, got {type(fn)!r}")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"fn must use the connection before it goes back, but {callable_name(fn)} is "
                "an async function: dbpool is synchronous; use a plain function"
            )
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(_GENERATOR_WITH_CONNECTION.format(fn=callable_name(fn)))
        with self.connection(timeout=timeout) as conn:
            result = fn(conn)
            if is_own_generator(result, fn):  # (as above, behind a decorator)
                raise TypeError(_GENERATOR_WITH_CONNECTION.format(fn=callable_name(fn)))
            return result

    def cursor(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> PoolCursor[C]:
        """A cursor on a connection of its own, leased until the cursor is closed: for
        streaming a large result (``pool.cursor(name="big")`` makes psycopg's server-side
        cursor).  Arguments go to the driver's ``cursor()``.  Closing it returns the
        connection; work not committed (``cur.connection.commit()``) is rolled back."""
        conn = self.connection(timeout=timeout)
        try:
            return pool_cursor(conn, conn.cursor(*args, **kwargs))
        except BaseException:
            conn.close()
            raise

    def close(self, timeout: float | None = 5.0) -> None:
        """Close the pool.  Idempotent.

        Waiters get :class:`PoolClosed` at once, idle connections are closed, and leased ones
        are closed as they come back; those still out after ``timeout`` seconds are closed
        under their borrowers (``None``: wait for them as long as it takes).  After a
        :meth:`drain` that timed out, closes what is still out the same way.

        Raises :class:`PoolError` at once, changing nothing, when called from a hook or a
        connect, checkout or checkin listener of this pool (it would wait for the connection
        the calling thread is handling), or with ``timeout=None`` by a thread that holds
        leases.
        """
        if timeout is not None:
            _check_number("timeout", timeout, allow_none=True, positive=False)
        with self._lock:
            # Done already, unless a signal handler cut a first close() short.
            if self._closed and not self._drained and not (self._idle or self._waiters):
                return
            self._refuse_inside_a_hook("close()")
            if timeout is None:
                held = self._held_by_this_thread_locked()
                if held:
                    raise self._own_leases_error("close(timeout=None)", held)
            self._drained = False
            idle = self._stop_checkouts_locked()
            self._stopping += 1
        try:
            self._finish_close(idle, timeout)
        finally:
            with self._lock:
                self._stopping -= 1

    def _finish_close(self, idle: list[_Slot], timeout: float | None) -> None:
        # An interrupt while closing one connection must not leave the others open, nor stop
        # close() half-way (a second close() does nothing): it is raised at the end.
        deadline = _NEVER if timeout is None else monotonic() + timeout
        interrupted = self._close_stopped(idle, deadline)
        leased = []
        ended: list[tuple[Any, float]] = []  # (connection, time held) of the leases ended here
        if not self._await_returns(deadline):
            with self._lock:
                # Everything still counted is leased (or being returned or validated).
                leased = list(self._everyone)
                self._in_use -= len(leased)
                self._forget_locked(leased)
                # And so are those leased before reopen(), counted off then, that no return
                # is closing yet (it sets their generation under the lock too).
                retired = [slot for slot in self._retired if slot.generation >= 0]
                self._retired.difference_update(retired)
                self._closed_count += len(retired)  # as _forget_locked counts the others
                for slot in retired:
                    slot.generation = _FORGOTTEN
                leased += retired
                # The leases end here (the pool's own pings, owned by no thread, are none):
                # counted as come back, with their time so far, as a return would count them;
                # forgotten now, a return under way counts nothing more.
                now = monotonic()
                for slot in leased:
                    if slot.owner:
                        held = now - slot.leased_at
                        self._returned += 1
                        self._not_kept += 1
                        self._held_time += held
                        if self._end_lease_locked(slot):
                            ended.append((slot.raw, held))
                left_open = [slot for slot in leased if not slot.dialect.closes_under_a_call]
                for slot in left_open:
                    self._leave_open_locked(slot)
            leased = [slot for slot in leased if slot.dialect.closes_under_a_call]
            if left_open:
                logger.warning(
                    "pool %r closed: %s still leased cut off, each closed as it comes back",
                    self._name,
                    _connections(len(left_open)),
                )
        if self._listeners.checkin:
            # Told here, as the leases end, before their connections are closed: a borrower
            # that lets go later, or never, tells nothing more.
            for raw, held in ended:
                try:
                    self._emit_handling(
                        _CHECKIN_LISTENER, self._listeners.checkin, Event.CHECKIN, raw, held
                    )
                except BaseException as exc:  # the connections are closed all the same
                    interrupted = interrupted or exc
        if leased:
            logger.warning(
                "pool %r closed: closing %s still leased", self._name, _connections(len(leased))
            )
        interrupted = (
            self._close_all(leased, POOL_CLOSED, "still leased", sever=True) or interrupted
        )
        logger.info("pool %r closed", self._name)
        if interrupted is not None:
            raise interrupted

    def drain(self, timeout: float | None = None) -> None:
        """Stop handing out connections and close them all as they come back, for a deploy
        without dropped requests; :meth:`reopen` opens the pool again.

        New checkouts and waiters get :class:`PoolClosed`, idle connections are closed at once,
        and this call returns once every lease is back and closed.  Past ``timeout`` seconds
        (``None``: no limit) it raises :class:`PoolTimeout`; the leases still out are closed as
        they come back (or by :meth:`close`).

        Raises :class:`PoolError` at once, changing nothing, when called from a hook or a
        connect, checkout or checkin listener of this pool, or with ``timeout=None`` by a thread
        that holds leases: it would wait for a connection the calling thread itself holds.
        """
        if timeout is not None:
            _check_number("timeout", timeout, allow_none=True, positive=False)
        with self._lock:
            if self._closed and not self._drained:
                return  # closed for good: nothing left to drain
            self._refuse_inside_a_hook("drain()")
            held = self._held_by_this_thread_locked()
            if held and timeout is None:
                raise self._own_leases_error("drain()", held)
            self._drained = True
            idle = self._stop_checkouts_locked()
            self._stopping += 1
        if held:  # handed to another thread to close, maybe: waited for, until the timeout
            logger.warning(
                "pool %r: drain() waits for every lease to come back, and %d leased by this "
                "thread are still out: close them first, or drain from another thread",
                self._name,
                held,
            )
        try:
            deadline = _NEVER if timeout is None else monotonic() + timeout
            interrupted = self._close_stopped(idle, deadline)
            if interrupted is not None:
                raise interrupted
            if not self._await_returns(deadline):
                with self._lock:
                    leased, opening = self._in_use + len(self._retired), self._opening
                    closing = self._closes_pending_locked()
                mine = f" ({held} by this thread)" if held else ""
                raise PoolTimeout(
                    f"pool {self._name!r}: after draining for {timeout:g} s, "
                    f"{_connections(leased)} still leased{mine}, {opening} being opened and "
                    f"{closing} being closed; each lease is closed when it comes back "
                    "(close() closes those now)"
                )
        finally:
            with self._lock:
                self._stopping -= 1
        logger.info("pool %r drained", self._name)

    def reopen(self) -> None:
        """Open a pool closed by :meth:`drain` or :meth:`close` again: connections are made
        afresh (``min_size`` of them in the background), with the same options and counters.
        Leases still out from before count against ``max_size`` (and in the ``size`` and
        ``in_use`` of :meth:`stats`) until they come back, and :meth:`drain` and :meth:`close`
        treat them as any lease."""
        with self._lock:
            if not self._closed:
                raise PoolError(f"pool {self._name!r} is open: reopen() follows drain() or close()")
            if self._stopping:
                raise PoolError(
                    f"pool {self._name!r} is being closed or drained: reopen() it once close() "
                    "or drain() has returned"
                )
            self._closed = self._drained = False
            # Leases still out after a drain() that timed out are no longer counted: the next
            # generation starts empty, and each of them is closed as it comes back (stats()
            # still reports them, as open and in use: see _stats_locked).
            leased = list(self._everyone)  # the idle stack is empty while closed
            self._everyone.clear()
            self._retired.update(leased)
            self._in_use -= len(leased)
            self._size -= len(leased)
            self._generation += 1
            # A reaper of the closed pool still running sees its wakeup replaced, and stops.
            self._reaper_wakeup = threading.Event()
            self._asleep = False  # started here
        self._start_reaper()
        logger.info("pool %r reopened", self._name)

    def _end_lease_locked(self, slot: _Slot) -> bool:
        """For close(), ending a lease past its timeout: whether its CHECKIN is told there.

        So it is when the borrower still holds the lease: the claim is taken from it, as a
        return takes it (of the two, one finds it), then handed back with no owner, for
        ``release()`` and ``discard()`` to do nothing as before, and for the return to close a
        connection left open.  Otherwise a return is under way, or the lease not made yet, and
        _give_back tells it, as the lease comes back with its owner still set."""
        claim = slot.claim
        try:
            del claim[0]
        except IndexError:
            return False
        slot.owner = 0  # before the claim is back: the lease's return tells nothing
        claim.append(slot)
        return True

    def _stop_checkouts_locked(self) -> list[_Slot]:
        """Close the pool to callers: turn waiters away; return the idle connections, no
        longer counted, for the caller to close.  Runs again on what a first run interrupted
        by a signal handler left (close() calls it while idle or waiters remain)."""
        self._closed = True
        idle = list(self._idle)
        if idle:
            self._idle = deque()
            self._forget_locked(idle)
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            del waiters[0]  # then no call until it is served: see _free_locked
            waiter.grant = _CLOSED
            waiter.wakeup.release()
        for waiter in list(self._connecting):  # their connects finish on their own
            waiter.abandoned = True
            self._serve_locked(waiter, _CLOSED)
        self._cond.notify_all()
        return idle

    def _close_stopped(self, idle: list[_Slot], deadline: float) -> BaseException | None:
        """After _stop_checkouts_locked: stop the reaper and close the idle connections; the
        wait for the reaper is part of the caller's time (to ``deadline``), a second at most."""
        self._reaper_wakeup.set()
        logger.debug("pool %r closing: %d idle connections", self._name, len(idle))
        interrupted = self._close_all(idle, POOL_CLOSED)
        thread = self._reaper_thread
        if thread is not None and thread is not threading.current_thread() and not self._drained:
            thread.join(timeout=_bounded(min(deadline - monotonic(), 1.0)))
        return interrupted

    def _await_returns(self, deadline: float) -> bool:
        """Wait until no connection is leased, being opened or being closed by the thread that
        let it go; False if the deadline passed."""
        while True:
            self._return_orphans(deadline)  # leases garbage-collected meanwhile come back so
            with self._lock:
                pending = self._in_use + len(self._retired) + self._opening
                if pending + self._closes_pending_locked() == 0:
                    return True
                remaining = deadline - monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, _CLOSE_POLL))

    def _settle_at_exit(self, deadline: float) -> None:
        """At interpreter exit (see _fork): start no more refills, and wait until ``deadline``
        for the connects under way to end.  Never past it: an exit must not hang, even on a
        lock some thread holds."""
        if not self._lock.acquire(timeout=max(0.0, deadline - monotonic())):
            return
        try:
            self._exiting = True
            while self._opening and monotonic() < deadline:
                self._cond.wait(min(deadline - monotonic(), _CLOSE_POLL))
        finally:
            self._lock.release()

    def __enter__(self) -> Pool[C]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # A shallow copy would share the idle connections, and close them as it is collected
        # (__del__); a pickled one (for a child started with spawn or forkserver) would fail
        # on a lock, or on the connect callable, with no word of why.
        name = self.__dict__.get("_name")
        raise TypeError(
            f"a dbpool.Pool cannot be copied or pickled (pool {name!r}): it owns open "
            "connections and the threads that look after them; make a pool in each process "
            "that needs one (a child process forked from this one drops the connections it "
            "inherits, and its pool opens its own)"
        )

    def __repr__(self) -> str:
        if "_lock" not in self.__dict__:
            return "<Pool not initialised: its constructor raised>"
        state = "closed" if self._closed else "open"
        retired = len(self._retired)  # counted as stats() counts them
        return (
            f"<Pool {self._name!r} {state} size={self._size + retired} idle={len(self._idle)} "
            f"in_use={self._in_use + retired} waiting={len(self._waiters)}>"
        )

    def __del__(self) -> None:
        # Leases dropped unreleased as the pool goes (they held its last references): queued
        # for the maintenance thread, which will not run again.  Closed here, open or closed
        # (drained) pool alike; not those inherited across fork(), which are the parent's.
        orphans = [s for s in self.__dict__.get("_orphans", ()) if s.generation != _INHERITED]
        if orphans:
            self._close_all(orphans, POOL_CLOSED, "its lease and the pool were garbage-collected")
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._reaper_wakeup.set()
        # Before the warning, which may raise (-W error).
        self._close_all(list(self._idle), POOL_CLOSED, "the pool was garbage-collected")
        warnings.warn(
            f"pool {self._name!r} was garbage-collected while open; call pool.close() or use "
            "'with Pool(...) as pool'",
            ResourceWarning,
            stacklevel=2,
        )

    # -- acquire ------------------------------------------------------------------------------

    def _acquire(
        self, timeout: float | None, deadline: float | None, since: float, *, again: bool = False
    ) -> tuple[_Slot, bool]:
        """The general checkout: queue, connect, validate.  ``timeout`` was checked;
        ``deadline`` is set when a validation already used part of the time; ``since``: when
        the caller asked; ``again``: it was served, and what it was served failed validation.
        Returns the connection, and whether it was lent (see _LENT)."""
        if self._asleep:
            self._wake_after_fork()
        if timeout is None:
            timeout = self._acquire_timeout
        if deadline is None:
            deadline = monotonic() + timeout
        elif monotonic() >= deadline:
            raise self._validation_timeout(timeout)
        while True:
            if self._orphans:  # the reaper returns them: a rollback of one may hang, and this
                self._reaper_wakeup.set()  # caller's deadline must hold
            slot, lent = self._take(deadline, timeout, since, again)
            if lent:
                return slot, True
            ready = self._ready(slot, deadline, timeout, since)
            if ready is not None:
                return ready, False
            again = True
            now = monotonic()
            if now >= deadline and now < slot.expires_at:  # (an expired one cost no ping)
                raise self._validation_timeout(timeout)

    def _ready(self, slot: _Slot, deadline: float, timeout: float, since: float) -> _Slot | None:
        """What a checkout that arrived at ``since`` took or was granted, made ready to lend:
        a connection opened in a slot reserved empty, or an idle connection validated
        (``None`` if it failed, and was discarded)."""
        if slot.raw is None:
            return self._connect_for_caller(slot, deadline, timeout)
        if self._fit_for_use(slot, deadline, since=since):
            return slot
        return None

    def _validation_timeout(self, timeout: float) -> PoolTimeout:
        """The PoolTimeout of a caller whose connection failed validation as its time ran out;
        the room that discard kept for it goes to the queue."""
        what = "its ping" if self._check is None else "the check hook"  # which validated it
        with self._lock:
            self._timeouts += 1
            self._grant_room_locked()
            s = self._stats_locked()
        error = PoolTimeout(
            f"pool {self._name!r}: no connection within {timeout:g} s "
            f"(size={s.size}/{s.max_size} in_use={s.in_use} idle={s.idle} "
            f"opening={s.opening} waiting={s.waiting}): the time ran out while an idle "
            f"connection was being validated, and it failed {what}"
        )
        error.__cause__ = self._last_connect_error
        logger.warning("%s", error)
        return error

    def _take(
        self, deadline: float, timeout: float, since: float, again: bool
    ) -> tuple[_Slot, bool]:
        """A connection the caller now owns, or an empty slot reserved for it to open; and
        whether the connection was lent (see _LENT).  ``since``: when the caller asked;
        ``again``: it asks again, after what it was served failed validation."""
        slot = waiter = None  # what this call holds, for the undo
        try:
            with self._lock:
                if self._closed:
                    raise PoolClosed(self._closed_message())
                if self._idle:  # then nobody is waiting
                    slot = self._pop_idle_locked(monotonic())
                    self._in_use += 1
                    return slot, False
                waiters = self._waiters
                if (
                    # ... or all came later: this caller is back after the connection it was
                    # served failed validation, and the room that made is its own (_discard)
                    (not waiters or waiters[0].since > since)
                    and self._size + len(self._retired) < self._max_size
                    and self._may_connect_locked(monotonic())
                ):
                    slot = self._reserve_locked()
                    return slot, False
                # One asking again was let in when it came: max_waiting turns away arrivals
                if (
                    not again
                    and self._max_waiting
                    and len(waiters) >= self._max_waiting
                    and threading.get_ident() not in self._probes
                ):
                    waiting = len(self._waiters)
                    raise TooManyWaiters(
                        f"pool {self._name!r}: {waiting} caller{'s are' if waiting > 1 else ' is'} "
                        "already waiting "
                        f"(max_waiting={self._max_waiting}); raise max_waiting or max_size, or "
                        "shed load"
                    )
                waiter = _Waiter(since, threading.get_ident())
                # In order of arrival: one back after a failed validation keeps its place
                # ahead of those who came after it (strictly first in, first out)
                place = len(waiters)
                while place and waiters[place - 1].since > since:
                    place -= 1
                waiters.insert(place, waiter)
                if self._connect_failures:
                    self._reaper_wakeup.set()  # it serves queued callers when the delay is up
            self._await_grant(waiter, deadline, timeout)
            return self._granted(waiter)  # (a signal handler may raise as it is entered)
        except BaseException:
            # e.g. KeyboardInterrupt in the wait, or a signal handler raising as the lock was
            # let go: undo whatever this call took, or was granted meanwhile.
            self._drop_lock_if_held()
            if slot is not None:
                self._untake(slot)
            elif waiter is not None:
                self._abandon(waiter)
            raise

    def _await_grant(self, waiter: _Waiter, deadline: float, timeout: float) -> None:
        """Wait until the queued ``waiter`` is served, or its time runs out: then it leaves
        the queue with no grant and its PoolTimeout in ``error``.  The caller abandons the
        waiter if this raises."""
        if waiter.wakeup.acquire(timeout=_bounded(deadline - monotonic())):
            return  # served: the grant was written before wakeup was released
        with self._lock:
            if waiter.grant is None:  # nothing was handed over in the meantime
                if waiter in self._waiters:  # (a signal handler may have cut a hand-off)
                    self._waiters.remove(waiter)
                self._timeouts += 1
                waiter.error = self._timeout_error_locked(timeout)
                if waiter.ident in self._probes:
                    self._probes[waiter.ident] = True

    def _granted(self, waiter: _Waiter) -> tuple[_Slot, bool]:
        """What a queued caller was served, as _take returns it; raises PoolTimeout for one
        whose time ran out, PoolClosed for one the pool turned away."""
        grant = waiter.grant
        if grant is None:
            error, waiter.error = waiter.error, None
            assert error is not None
            logger.warning("%s", error)
            raise error from self._last_connect_error
        if grant is _CLOSED:
            how = "drained" if self._drained else "closed"
            raise PoolClosed(f"pool {self._name!r} was {how} while waiting for a connection")
        assert waiter.slot is not None
        return waiter.slot, grant is _LENT

    def _pop_idle_locked(self, now: float) -> _Slot:
        """Take the idle connection to hand out: the least recently returned of the
        ``_ROTATION`` on top of the stack that is fresh (returned or pinged within
        validate_after), else the top one; but a checkout under ``_BACK_TO_BACK`` after the top
        one's return takes another, and after ``_WIDEN_AFTER`` such checkouts in a row the
        stale ones on top take part too.

        A connection asked for again soon after its return answers measurably slower than one
        idle a little longer (docs/benchmarks), so checkouts under load rotate through a few
        connections; the others sink to the bottom of the stack and age out.  A stale one
        taken costs a ping, after which it is fresh for validate_after: a short burst after a
        pause pings at most one more connection than it uses, a sustained one at most
        ``_ROTATION - 1``.

        Written out in connection()'s common case: change both.
        """
        idle = self._idle
        depth = len(idle)
        if depth > _ROTATION:
            depth = _ROTATION
        if now - idle[-1].used_at < _BACK_TO_BACK:
            self._back_to_back += 1
        else:
            self._back_to_back = 0
        if depth > 1 and self._back_to_back < _WIDEN_AFTER:
            while depth > 1 and now - idle[-depth].alive_at > self._validate_after:
                depth -= 1  # the ones above it were returned later: fresher, as a rule
            if depth == 1 and self._back_to_back:
                depth = 2  # not the one just returned, stale or not
        # An index and a del, not popleft() or pop(): CPython runs a pending signal handler as
        # a call to a C function returns, and one raising there would drop the slot unrecorded.
        slot = idle[-depth]
        del idle[-depth]
        return slot

    def _untake(self, slot: _Slot, *, counted: bool = False) -> None:
        """Undo a checkout that took or was granted ``slot`` (a connection, or a reservation
        to open one) and does not hand it out after all.  One interrupted after it was counted
        in ``acquired`` (``counted``) stays counted, since that counter never goes down, and
        is counted as returned at once, so that ``acquired - returned`` stays the leases out."""
        if slot.raw is None:
            with self._lock:
                self._unreserve_locked()
            return
        self._put_back([slot], 0.0 if counted else None)

    def _drop_lock_if_held(self) -> None:
        """Called first by a handler that undoes an interrupted step: if the exception landed
        just after this thread took the lock, nothing was done under it yet; let it go, so
        that the undo can take it as usual (and others are not locked out forever)."""
        if self._lock._is_owned():  # type: ignore[attr-defined]
            self._lock.release()

    def _abandon(self, waiter: _Waiter) -> None:
        """Undo a wait interrupted by an exception, whatever was granted meanwhile."""
        with self._lock:
            grant = waiter.grant
            if grant is None:
                self._connecting.discard(waiter)
                waiter.abandoned = True
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                return
        slot = waiter.slot
        if (grant is _HANDED or grant is _OPEN) and slot is not None:
            self._untake(slot)  # a connection, or room to open one: back as if never taken
        elif grant is _LENT and slot is not None:
            self._untake(slot, counted=True)  # its checkout was counted as it was lent

    def _fit_for_use(
        self, slot: _Slot, deadline: float, *, probe: bool = False, since: float = math.inf
    ) -> bool:
        """Check an idle connection taken out of the stack; discard it and say so if it is not
        fit.  ``probe``: ping it even if it was used just now.  ``since``: the arrival of the
        checkout it is for, which asks again if it is not fit (see _grant_room_locked).

        The ping (or the ``check`` hook) is bounded by the deadline (at least
        ``_MIN_PING_TIME``): past it, the connection's socket is shut down, so a blackholed
        connection fails at once.  Raises :class:`PoolClosed` (not for a ``probe``) if the
        pool closed meanwhile.
        """
        try:
            problem = self._problem_of(slot, deadline, probe)
        except BaseException:  # e.g. KeyboardInterrupt, wherever it lands: nothing is kept
            self._discard(slot, DiscardReason.INTERRUPTED, broken=False)
            raise
        if problem is None:
            if self._closed and not probe:
                # Closed or drained while this caller's ping or check ran: told so, as a
                # caller whose connect was under way is, rather than lent a connection that
                # drain() then waits for and close() shuts under it.  _put_back closes it.
                back = [slot]
                try:
                    self._put_back(back)
                except BaseException:
                    if back:  # a signal handler raised as _put_back was entered
                        self._discard(slot, DiscardReason.INTERRUPTED, broken=False)
                    raise
                how = "drained" if self._drained else "closed"
                raise PoolClosed(
                    f"pool {self._name!r} was {how} while an idle connection was being "
                    "validated for this caller"
                )
            return True
        reason, broken = problem
        self._discard(slot, reason, broken=broken, since=since)
        return False

    def _problem_of(
        self, slot: _Slot, deadline: float, probe: bool
    ) -> tuple[DiscardReason, bool] | None:
        """For _fit_for_use: why the connection is not fit, and whether that suggests the
        server went away; ``None`` if it is fit.

        A probe's ping cut off by its budget with less than ``_SWEEP_TIME`` allowed proves
        nothing about the server (the link may just be slow): the connection, shut down, is
        discarded, but no sweep follows, which would cut more pings short on such a link."""
        now = monotonic()
        if now >= slot.expires_at:
            return DiscardReason.EXPIRED, False
        fresh = now - slot.alive_at <= self._validate_after and slot.alive_at > self._broken_at
        if fresh and not probe:
            return None
        dialect, raw = slot.dialect, slot.raw
        check = self._check
        limit = max(deadline, now + _MIN_PING_TIME)
        guard = None
        try:
            with Overdue(limit, lambda: dialect.sever(raw)) as guard:
                if check is None:
                    dialect.ping(raw)
                else:
                    _while_handling(self, _CHECK_HOOK, check, raw)
                    if dialect.server_session(raw) != slot.session:
                        raise RuntimeError(_CHECK_RECONNECTED)
                    # A check that ran a query opened a transaction on most drivers: end it
                    # (where the driver cannot tell, end whatever may be open).
                    state = dialect.transaction_state(raw)
                    if state is IN_TRANSACTION or state is UNKNOWN:
                        dialect.rollback(raw)
                if dialect.database_file(raw) != slot.database:
                    raise RuntimeError(_FILE_REPLACED)
            fit = not guard.fired and dialect.transaction_state(raw) in (
                IDLE,
                UNKNOWN,
            )
        except Exception as exc:
            what = "validation" if check is None else "its check"
            if guard is not None and guard.fired:
                why = f"no answer within {limit - now:.3g} s, so it was shut down"
            else:
                why = self._describe(exc)
            logger.info("pool %r: idle connection failed %s: %s", self._name, what, why)
            fit = False
        if fit:
            return None
        cut_short = guard is not None and guard.fired
        evidence = not (probe and cut_short and limit - now < _SWEEP_TIME)
        if check is None:
            return DiscardReason.BROKEN, evidence
        return DiscardReason.CHECK_FAILED, evidence and _is_broken(slot)

    # -- opening connections ------------------------------------------------------------------

    def _may_connect_locked(self, now: float) -> bool:
        """Whether a new connect may start now.  While connects fail, allow one per delay."""
        if not self._connect_failures:
            return True
        if now < self._next_connect_at:
            return False
        self._next_connect_at = now + self._backoff_delay()
        return True

    def _backoff_delay(self) -> float:
        exponent = min(self._connect_failures - 1, 30)
        delay = min(self._reconnect_max_delay, self._reconnect_delay * 2.0**exponent)
        return delay * (0.5 + random.random() / 2)  # jitter: spread reconnects out

    def _reserve_locked(self) -> _Slot:
        slot = _Slot(self._generation)  # first: a signal handler may raise as the call returns
        self._size += 1
        self._opening += 1
        return slot

    def _unreserve_locked(self) -> None:
        self._size -= 1
        self._opening -= 1
        self._grant_room_locked()

    def _connect_for_caller(self, slot: _Slot, deadline: float, timeout: float) -> _Slot:
        """Open a connection in a slot reserved for the caller and hand it over.

        The connect runs in a thread of its own, so that the caller's deadline holds even when
        connecting hangs (a blackholed network): a caller that gives up leaves the connection,
        once made, to the pool.  A failed connect raises the driver's own error.
        """
        # The reservation is this call's to give back until the connect thread takes the
        # token; a thread that finds it taken does nothing.
        token = waiter = None
        try:
            left = deadline - monotonic()  # of the caller's timeout, for the connect
            token = threading.Lock()
            waiter = _Waiter()
            with self._lock:
                if self._closed:
                    raise PoolClosed(self._closed_message())
                self._connecting.add(waiter)
            self._start_connect(slot, waiter, token)
            waiter.wakeup.acquire(timeout=_bounded(deadline - monotonic()))
            with self._lock:
                grant = waiter.grant
                if grant is None:
                    self._connecting.discard(waiter)
                    waiter.abandoned = True
                    self._timeouts += 1
                    error = self._connect_timeout_error_locked(timeout, left)
        except BaseException:  # e.g. KeyboardInterrupt: whatever the connect gives, the pool keeps
            self._drop_lock_if_held()
            if token is None or waiter is None or token.acquire(False):  # no connect started
                with self._lock:
                    self._connecting.discard(waiter)
                    self._unreserve_locked()
            else:
                self._abandon(waiter)
            raise
        if grant is None:
            logger.warning("%s", error)
            raise error from self._last_connect_error
        if grant is _FAILED:
            failure, waiter.error = waiter.error, None
            assert failure is not None
            raise failure
        if grant is _CLOSED:
            how = "drained" if self._drained else "closed"
            raise PoolClosed(f"pool {self._name!r} was {how} while connecting")
        return slot

    def _check_left_open(self, dialect: Dialect, raw: Any, culprit: str) -> TxState:
        """Refuse a new connection that ``culprit`` ("connect" or "configure") left inside a
        transaction, or closed; returns the state read."""
        state = dialect.transaction_state(raw)
        if state is BROKEN:
            raise PoolError(
                f"pool {self._name!r}: {culprit} left the new connection closed or broken: "
                f"{culprit} must leave it open"
            )
        if state is not IDLE and state is not UNKNOWN:
            left = state.value.replace("_", " ")
            raise PoolError(
                f"pool {self._name!r}: {culprit} left the new connection {left}: end its "
                "transaction with conn.commit() (or set autocommit first)"
            )
        return state

    def _start_connect(self, slot: _Slot, waiter: _Waiter, token: threading.Lock) -> None:
        """Connect into ``slot`` for ``waiter`` in a thread of its own, if that thread is the
        first to take ``token``; otherwise the caller gives the reservation back."""

        def connect() -> None:
            if token.acquire(False):
                context.run(self._open, slot, waiter)

        # The caller's context variables go along, for connect callables that read them.
        context = contextvars.copy_context()
        _start_thread(connect, f"dbpool-connect-{self._name}", lambda: None)

    def _open(self, slot: _Slot, waiter: _Waiter | None) -> bool:
        """Connect into a reserved slot (in a connect thread, or the refill thread).

        The connection goes to ``waiter``, the caller it was opened for, unless that caller
        gave up; otherwise to the oldest queued caller or the idle stack.  A failure is counted,
        logged and handed to ``waiter``; nothing is raised here.  Returns whether it connected.
        """
        raw = None
        told = False  # connect listeners were told of it: its close is told too
        try:
            started = monotonic()
            raw = self._connect()
            if raw is None:  # None marks a slot still being opened: never a connection
                raise TypeError(
                    f"pool {self._name!r}: connect returned None instead of a DB-API "
                    "connection: the callable must return what it opens (for example "
                    "lambda: psycopg.connect(dsn))"
                )
            self._being_opened[id(raw)] = raw
            dialect = self._dialect
            if dialect is None:
                dialect = self._dialect = _detect_dialect(raw)
            dialect.check_new(raw)
            database = dialect.database_file(raw)  # first: the file may be replaced any time
            # What the callable ran is checked as configure's is, where the driver can tell
            # with no round trip: a transaction it left open would be rolled back at the
            # first borrower's return, with its SET, or committed by that borrower.
            self._check_left_open(dialect, raw, "connect")
            if self._configure is not None:
                _while_handling(self, _CONFIGURE_HOOK, self._configure, raw)
                if self._check_left_open(dialect, raw, "configure") is UNKNOWN:
                    # The driver cannot tell whether configure left a transaction open: end
                    # any, so that no idle connection holds locks (what it committed stays).
                    dialect.rollback(raw)
            now = monotonic()
            slot.raw = raw
            slot.dialect = dialect
            slot.settings = dialect.client_settings(raw)
            slot.session = dialect.server_session(raw)
            slot.database = database
            slot.used_at = slot.alive_at = now
            slot.expires_at = now + self._max_lifetime * (1 - _LIFETIME_JITTER * random.random())
            if self._listeners.connect:
                told = True
                self._emit_handling(
                    _CONNECT_LISTENER, self._listeners.connect, Event.CONNECT, raw, now - started
                )
            self._lock.acquire()
        except BaseException as exc:  # nothing counted yet: give the reservation back
            self._drop_lock_if_held()
            if raw is not None:
                _close_quietly(_dialect_of(self, raw), raw)
                self._being_opened.pop(id(raw), None)
            self._scrub(exc)  # before the caller, health() or a log line can quote it
            kept = _detached(exc)  # outside the lock: it runs the exception's copy code
            with self._lock:
                # Whatever it raised: this runs in a connect or refill thread, where no signal
                # handler runs, so a SystemExit came from the callable, a hook or a listener,
                # and comes again; not backed off from, the refill would retry without pause.
                self._note_connect_failure_locked(kept)
                self._unreserve_locked()
                if waiter is not None and not waiter.abandoned:
                    waiter.error = exc
                    self._serve_locked(waiter, _FAILED)
            if told and self._listeners.close:  # a connect listener raised what is no Exception
                try:
                    reason = DiscardReason.INTERRUPTED.value
                    emit(self._listeners.close, Event.CLOSE, self._name, raw, reason)
                except BaseException:  # (in a connect thread: the failure is told already)
                    pass
            logger.warning(
                "pool %r: connect failed (%d in a row): %s",
                self._name,
                self._connect_failures,
                self._describe(exc),
            )
            return False
        try:
            recovered = self._connect_failures > 0
            surplus = False
            self._connect_failures = 0
            self._last_connect_error = None
            self._opening -= 1
            self._created += 1
            self._connect_time += now - started
            closed = self._closed
            caller = waiter if waiter is not None and not waiter.abandoned else None
            if closed:
                self._size -= 1
                self._closed_count += 1
                slot.owner = threading.get_ident()  # the thread closing it
                self._closing.add(slot)
                if caller is not None:
                    self._serve_locked(caller, _CLOSED)
            else:
                slot.generation = self._generation  # reserved before a reopen(), maybe
                self._everyone.add(slot)
                if caller is not None:
                    self._in_use += 1
                    caller.slot = slot
                    self._serve_locked(caller, _HANDED)
                elif self._size + len(self._retired) > self._max_size:  # resize() lowered it
                    surplus = True
                    self._forget_locked([slot], DiscardReason.RESIZED)
                    slot.owner = threading.get_ident()  # the thread closing it
                    self._closing.add(slot)
                else:
                    self._free_locked(slot)
                if recovered:
                    self._grant_room_locked()  # queued callers may connect again
            self._cond.notify_all()  # wait() and close() count connections
        finally:
            try:
                self._lock.release()
            finally:  # even if a signal handler raised as the lock was let go
                if closed:
                    self._close_counted(
                        slot, POOL_CLOSED, "the pool closed while it was connecting"
                    )
                elif surplus:
                    self._close_counted(slot, DiscardReason.RESIZED, "resize() lowered max_size")
                self._being_opened.pop(id(raw), None)  # counted (in `everyone`), or closed
        if recovered:
            logger.info("pool %r: connecting works again", self._name)
        logger.debug("pool %r: opened a connection", self._name)
        return True

    def _note_connect_failure_locked(self, kept: BaseException) -> None:
        """Count a failed connect; ``kept``: its error as the pool keeps it (_detached)."""
        self._connect_errors += 1
        self._connect_failures += 1
        self._last_connect_error = kept
        self._next_connect_at = monotonic() + self._backoff_delay()
        if self._waiters or self._size - 1 < self._min_size:
            self._reaper_wakeup.set()  # it retries when the delay is up

    # -- release ------------------------------------------------------------------------------

    def _release(self, lease: Connection[C]) -> None:
        if lease._pool is not self:
            raise PoolError(
                f"this connection was leased from pool {lease._pool.name!r}, not from "
                f"pool {self._name!r}: return it to the pool it came from"
            )
        lease.close()

    def _return_orphans(self, deadline: float | None = None) -> None:
        """Take back the leases garbage-collected unreleased.  Cleaning one may roll back,
        which hangs on a dead network: past its time the connection is shut down and
        discarded.  drain() and close() give them all until ``deadline`` (the pool hands out
        nothing then); the reaper (no ``deadline``) gives each ``_ORPHAN_RETURN_TIME``, and
        starts none after that long: the rest wait for its next run."""
        orphans = self._orphans
        until = monotonic() + _ORPHAN_RETURN_TIME if deadline is None else _NEVER
        while orphans:
            if monotonic() >= until:
                return
            box: list[_Slot] = []
            try:
                with self._lock:  # finalisers only ever append: the head stays until taken
                    if not orphans:
                        return
                    box = [orphans[0]]
                    del orphans[0]
                    if box[0].generation != _INHERITED:  # a lease of the parent's: not ours
                        self._leaked += 1
                    generation = self._generation
                slot = box[0]
                began = monotonic()
                if deadline is None:
                    limit, allowed = began + _ORPHAN_RETURN_TIME, _ORPHAN_RETURN_TIME
                else:
                    limit, allowed = deadline, None
                cut_off = partial(self._cut_off, slot, generation, slot.alive_at, allowed)
                with Overdue(limit, cut_off):
                    self._give_back(box)
            except BaseException:  # a signal handler raised before _give_back took it
                if box:  # counted as leaked already, and a counter never goes down: closed,
                    slot = box[0]  # as _give_back closes one it was interrupted with, not queued
                    held = monotonic() - slot.leased_at
                    self._discard(slot, DiscardReason.INTERRUPTED, broken=False, held=held)
                raise

    def _cut_off(
        self, slot: _Slot, generation: int, alive_at: float, allowed: float | None
    ) -> None:
        """Called by the watchdog when _return_orphans' time for ``slot`` is up: shut its
        connection down, unless the return is past cleaning it.  Back in the pool (its
        ``alive_at`` set anew), a borrower may hold it; counted off (its ``generation`` no
        longer the pool's when the return began), it may be closed and its socket's number
        reused.  Both take the lock first, so the check and the shutdown (which does not
        block) are made under it.  A reopen() meanwhile leaves the connection to the return,
        which closes it: still cut off.  ``allowed``: the reaper's time, to log."""
        with self._lock:
            if slot.generation != generation or slot.alive_at != alive_at:
                return
            # Past its lifetime, so that whatever meets it next (the return's own check, a
            # checkout, the reaper) discards it, even if the call cut off ended well.
            slot.expires_at = -math.inf
            slot.dialect.sever(slot.raw)
        if allowed is not None:
            logger.warning(
                "pool %r: a lease garbage-collected unreleased was still being taken back after "
                "%g s (its rollback got no answer?): its connection was shut down and discarded",
                self._name,
                allowed,
            )

    def _give_back(self, box: list[_Slot]) -> None:
        """Take back a connection from its borrower: clean it, then reuse or discard it.

        The connection comes in ``box`` (a lease's claim), a one-item list that the callee
        empties first thing, with an index and a del: a signal handler raising as a function is
        entered (where CPython runs one) then leaves it where the caller's undo, or the lease's
        finaliser, finds it.  Of two callers with the same box, only the first finds it there.
        """
        try:
            slot = box[0]
            del box[0]
        except IndexError:  # released already
            return
        if slot.generation != self._generation:
            # Inherited across fork(), or ended by close() (counted then): not ours to count.
            # Or leased before reopen(): it came back all the same (the counters span
            # reopen()); close it.
            held: float | None = None
            try:
                generation = slot.generation
                if generation >= 0:
                    held = 0.0  # a borrower's return, counted even if interrupted before the time
                    if slot.borrowed is not None:  # the reaper reports it no more
                        self._note_return_of_borrowed(slot)
                    held = monotonic() - slot.leased_at
                    self._tell_checkin(slot, held)
                elif generation != _INHERITED and slot.owner:
                    # Ended by close() as its return began, or before its lease was made:
                    # close() counted it, and left its CHECKIN to this return.
                    self._tell_checkin(slot, monotonic() - slot.leased_at)
            finally:
                self._close_if_retired(slot, held)
            return
        held = 0.0
        cleaning = False
        try:
            now = monotonic()
            held = now - slot.leased_at
            if self._listeners.checkin:
                self._emit_handling(
                    _CHECKIN_LISTENER, self._listeners.checkin, Event.CHECKIN, slot.raw, held
                )
            if slot.borrowed is not None:
                self._note_return_of_borrowed(slot)
            problem = None
            if slot.used:  # else the lease did nothing with the connection: nothing to undo
                cleaning = True
                problem = self._clean(slot)
                cleaning = False
                now = monotonic()
            if problem is None and now >= slot.expires_at:
                if slot.lost:  # expired by _call_failed
                    problem = DiscardReason.BROKEN, "a call's error said it was lost"
                else:
                    problem = DiscardReason.EXPIRED, "it reached max_lifetime"
            broken = problem is not None and _is_broken(slot)
        except BaseException:
            # KeyboardInterrupt in a listener or in the reset, or a signal handler raising as a
            # call returned: whatever the connection's state, it is not reused.
            self._discard(slot, DiscardReason.INTERRUPTED, broken=cleaning, held=held)
            raise
        if problem is not None:
            reason, detail = problem
            self._discard(slot, reason, broken=broken, held=held, detail=detail)
            return
        slot.used_at = slot.alive_at = now
        # _put_back's common case, written out (a call fewer on every return): change both.
        # Its slot.borrowed = None is done above.  Anything else (a waiter after a broken
        # connection was found, a pool closed, shrunk or reopened meanwhile) goes to _put_back
        # itself, after the lock is let go.
        kept = False
        try:
            self._lock.acquire()
            try:
                waiters = self._waiters
                if (
                    slot.generation == self._generation
                    and not self._closed
                    and not self._retired
                    and self._size <= self._max_size
                ):
                    if not waiters:
                        self._in_use -= 1
                        self._returned += 1
                        self._held_time += held
                        slot.owner = 0
                        kept = True  # before the call: a signal handler may raise as it returns
                        self._idle.append(slot)
                    elif (
                        self._validate_after > 0  # else a ping or the check hook is due
                        and now > self._broken_at
                        and now < slot.expires_at  # (cut off by _return_orphans' watchdog)
                    ):  # else it is validated first: see _put_back
                        # Lent to the oldest waiter: as fit for use as one the checkout's fast
                        # path takes from the idle stack (used just now, not expired, returned
                        # after the last broken one was found), and leased as that one is,
                        # owned and counted here, so that the waiter wakes up with nothing to
                        # do under the lock.  The clock is read again (a listener or the lock
                        # may have taken a while: the wait never comes out negative) and the
                        # bucket found before anything is counted; then no call until it is
                        # served (see _pop_idle_locked).
                        waiter = waiters[0]
                        now = monotonic()
                        waited = now - waiter.since
                        bucket = wait_bucket(waited)
                        del waiters[0]
                        self._returned += 1
                        self._held_time += held
                        kept = True
                        slot.owner = waiter.ident
                        slot.leased_at = now
                        self._wait_time += waited
                        self._wait_counts[bucket] += 1
                        self._waits_recorded += 1
                        waiter.slot = slot
                        waiter.grant = _LENT
                        waiter.wakeup.release()
            finally:
                self._lock.release()
        except BaseException:
            # A signal handler raised as the lock was taken or let go: as in _put_back, the
            # connection is discarded unless it was put back (counted) already.
            self._drop_lock_if_held()
            if not kept:
                self._discard(slot, DiscardReason.INTERRUPTED, broken=False, held=held)
            raise
        if kept:
            return
        # A box of its own: the lease's claim stays empty, so that a second close() racing this
        # one finds nothing to return (it would emit CHECKIN and clean the connection again).
        back = [slot]
        try:
            self._put_back(back, held)
        except BaseException:
            if back:  # a signal handler raised as _put_back was entered: nothing was counted
                self._discard(slot, DiscardReason.INTERRUPTED, broken=False, held=held)
            raise

    def _tell_refused_checkout(self, slot: _Slot, waited: float) -> None:
        """Tell the listeners of a checkout counted as it was handed over (and counted as
        returned at once) that the caller was then refused, the pool being closed meanwhile:
        a checkout and its checkin, as ``stats()`` counts them."""
        try:
            if self._listeners.checkout:
                self._emit_handling(
                    _CHECKOUT_LISTENER, self._listeners.checkout, Event.CHECKOUT, slot.raw, waited
                )
        finally:
            self._tell_checkin(slot, 0.0)

    def _tell_checkin(self, slot: _Slot, held: float) -> None:
        if self._listeners.checkin:
            self._emit_handling(
                _CHECKIN_LISTENER, self._listeners.checkin, Event.CHECKIN, slot.raw, held
            )

    def _put_back(self, box: list[_Slot], held: float | None = None) -> None:
        """Return a clean connection the caller holds (in ``box``, as for _give_back) to the
        pool: to the oldest waiter, the idle stack, or closed if the pool closed or shrank
        meanwhile.  ``held``: how long a borrower had it (``None``: it was the pool's own, or
        never handed out)."""
        try:
            slot = box[0]
            del box[0]
        except IndexError:  # another caller took it
            return
        slot.borrowed = None
        try:
            self._lock.acquire()
        except BaseException:  # interrupted before anything was counted
            self._drop_lock_if_held()
            self._discard(slot, DiscardReason.INTERRUPTED, broken=False, held=held)
            raise
        reason: str | None = None  # why it is closed instead, if it is
        try:
            try:
                if slot.generation == self._generation:  # else close() or reopen() let it go
                    # Over the cap resize() lowered, counting the leases from before a reopen()
                    # (worked out before the counts change: no call among them, see _discard).
                    over = self._size > self._max_size
                    if self._retired:
                        over = self._size + len(self._retired) > self._max_size
                    self._in_use -= 1
                    if held is not None:
                        self._returned += 1
                        self._held_time += held
                    if not self._closed and not over:  # the common case
                        # (With no waiter, nothing retired: written out in _give_back, change
                        # both.)
                        # No borrower's until its next lease: the thread that returned it no
                        # longer holds it while another validates it or wakes up with it.
                        slot.owner = 0
                        if self._waiters:
                            self._free_locked(slot)
                        else:
                            self._idle.append(slot)
                        return
                    reason = POOL_CLOSED if self._closed else DiscardReason.RESIZED
                    if held is not None:
                        self._not_kept += 1
                    self._forget_locked([slot], None if self._closed else DiscardReason.RESIZED)
                    slot.owner = threading.get_ident()  # now the thread closing it
                    self._closing.add(slot)
            finally:
                self._lock.release()
        finally:  # even if a signal handler raised as the lock was let go
            if reason is not None:
                try:
                    self._close_raw(slot, reason)
                finally:  # _close_counted's work, written out: a signal handler may raise as
                    self._closed_off.append(slot)  # a function is entered (CPython runs one)
                    self._wake_closers()
        if reason is None:
            # A lease from before a reopen() that came while this return ran, or one close()
            # ended meanwhile
            self._close_if_retired(slot, held)

    def _leave_open_locked(self, slot: _Slot) -> None:
        """For close(): cut off a leased connection its driver cannot close under a call in
        another thread (sqlite3 may crash the interpreter), and leave its close to its return.
        Under the lock, which that return takes to see it (_close_if_retired): the cut off (no
        I/O) never meets the close."""
        try:
            slot.dialect.sever(slot.raw)
        except Exception as exc:
            logger.debug("cutting off a connection failed: %s", self._describe(exc))
        slot.generation = _LEFT_OPEN
        self._left_open.add(slot)

    def _close_if_retired(self, slot: _Slot, held: float | None = None) -> None:
        """Close a connection leased before reopen(), which stopped counting it, or one
        close() left open, as it comes back.  Its borrower alone holds it, so this runs once.
        ``held``: how long the lease had it, counted here for one from before reopen()."""
        generation = _FORGOTTEN  # until it is read under the lock
        try:
            with self._lock:  # close() may be leaving it open, or closing it, just now
                generation = slot.generation
                if generation == _LEFT_OPEN:
                    self._left_open.discard(slot)
                if generation >= 0 or generation == _LEFT_OPEN:
                    slot.generation = _FORGOTTEN  # closed here, and by nobody else
                if generation >= 0:
                    # Counted first, with no call among the counts: a signal handler may raise
                    # as one returns.
                    self._closed_count += 1  # no longer in stats()' size: closed from now on
                    if held is not None:
                        # Counted with the claim of its close: a close() that ends it first
                        # counts it there instead, once.
                        self._returned += 1
                        self._not_kept += 1
                        self._held_time += held
                    # Let go as a discarded connection is: its place under max_size is free,
                    # and drain() and close() wait for its close, except in this thread (a
                    # close listener may call them).
                    self._retired.discard(slot)
                    slot.owner = threading.get_ident()  # now the thread closing it
                    self._closing.add(slot)
                    self._grant_room_locked()
        finally:  # even if a signal handler raised as the lock was let go: nobody else closes it
            if generation == _LEFT_OPEN:
                self._close_raw(slot, POOL_CLOSED, "left open by close() until it came back")
            elif generation >= 0:
                self._close_counted(slot, POOL_CLOSED, "leased before the pool was reopened")

    def _note_return_of_borrowed(self, slot: _Slot) -> None:
        borrowed, slot.borrowed = slot.borrowed, None
        if borrowed is not None and borrowed.reported:
            logger.warning(
                "pool %r: the connection reported as held too long came back after %.1f s",
                self._name,
                monotonic() - borrowed.at,
            )

    def _clean(self, slot: _Slot) -> tuple[DiscardReason, str] | None:
        """Make a returned connection fit for the next borrower, with no round trip when the
        state says it is clean.  Returns why it must be discarded instead, or ``None``."""
        if slot.busy:
            return _RESET_FAILED, "returned with a driver call interrupted"
        if slot.doomed:
            # Lost or closed, the usual reason its rollback failed (a session killed inside a
            # transaction block): counted as broken, as it is when no block ran.
            if _driver_says_broken(slot):
                return DiscardReason.BROKEN, "returned broken"
            return _RESET_FAILED, "its transaction could not be cancelled, rolled back or reset"
        if slot.transaction is not None:
            return _RESET_FAILED, "returned inside its transaction block"
        raw = slot.raw
        dialect = slot.dialect
        try:
            if slot.exposed:
                dialect.call_failed(raw)  # as if a call had failed: its cached state is not read
            if slot.cursors or slot.loose_cursors is not None:
                slot.close_cursors()
            state = dialect.transaction_state(raw)
            # A driver connection or cursor handed out may have run statements since the last
            # commit or rollback through the lease: the record cannot tell, so it counts too.
            if state is IN_TRANSACTION or (state is UNKNOWN and (slot.dirty or slot.exposed)):
                dialect.rollback(raw)
                state = dialect.transaction_state(raw)
                if state is not IDLE and state is not UNKNOWN:
                    return _RESET_FAILED, f"still {state.value} after rollback"
            elif state is UNKNOWN and dialect.commit_may_leave_open:
                dialect.end_left_open(raw)  # (only a used lease's connection is cleaned)
            elif state is BROKEN:
                return DiscardReason.BROKEN, "returned broken"
            elif state is not IDLE and state is not UNKNOWN:
                return _RESET_FAILED, f"returned {state.value}"
            if slot.restore:
                restore, slot.restore = slot.restore, None
                for name, value in restore.items():
                    if value is CANNOT_UNDO:
                        return _RESET_FAILED, f"the lease called {name}(), which cannot be undone"
                    dialect.restore_attribute(raw, name, value)
            if slot.exposed:
                dialect.after_exposure(raw)
            if self._session_reset is not None:
                if self._session_reset == "reconnect" or not dialect.can_reset_session:
                    return DiscardReason.SESSION_RESET, "session_reset: used, so not reused"
                dialect.reset_session(raw)
        except Exception as exc:
            slot.doomed = True
            reason = DiscardReason.BROKEN if _driver_says_broken(slot) else _RESET_FAILED
            return reason, f"reset failed: {self._describe(exc)}"
        if self._reset is not None:
            try:
                _while_handling(self, _RESET_HOOK, self._reset, raw)
                state = dialect.transaction_state(raw)
            except Exception as exc:
                logger.warning(
                    "pool %r: the reset hook raised; the connection is discarded: %s",
                    self._name,
                    self._describe(exc),
                )
                return _RESET_FAILED, f"the reset hook raised {self._describe(exc)}"
            if state is not IDLE and state is not UNKNOWN:
                return _RESET_FAILED, f"the reset hook left it {state.value}"
            if state is UNKNOWN:
                # The driver cannot tell whether the hook left a transaction open: end any, so
                # that no idle connection holds its locks (what it committed stays).
                try:
                    dialect.rollback(raw)
                except Exception as exc:
                    slot.doomed = True
                    why = self._describe(exc)
                    return _RESET_FAILED, f"the rollback after the reset hook failed: {why}"
        try:
            # May read the socket (psycopg2 before 2.9.10 takes in notifications), where a
            # session the server ended is first noticed
            if dialect.client_settings(raw) != slot.settings:
                dialect.restore_client_settings(raw, slot.settings)
        except Exception as exc:
            slot.doomed = True
            reason = DiscardReason.BROKEN if _driver_says_broken(slot) else _RESET_FAILED
            return reason, f"reset failed: {self._describe(exc)}"
        slot.used = slot.dirty = slot.exposed = slot.tracks_reads = False
        return None

    def _discard(
        self,
        slot: _Slot,
        reason: DiscardReason,
        *,
        broken: bool,
        held: float | None = None,
        detail: str = "",
        since: float = math.inf,
        retired: bool = False,
    ) -> None:
        """Drop a connection the caller holds (leased or under validation) and close it.
        ``held``: how long its borrower had it, when it comes back from a lease; ``since``:
        the arrival of a checkout that failed to validate it and will ask again; ``retired``:
        an idle one closed for its age, not counted in ``discarded`` (as the reaper's)."""
        key = reason._value_  # a plain attribute (.value is a property: a function call)
        counted: bool | None = None  # None until it is decided under the lock
        try:
            with self._lock:
                counted = slot.generation == self._generation
                if counted:
                    # _forget_locked's work, written out: its place is freed with no call among
                    # the counts (a signal handler may raise as one returns: _pop_idle_locked).
                    self._in_use -= 1
                    self._size -= 1
                    self._closed_count += 1
                    slot.generation = _FORGOTTEN  # a lease still holding it returns nothing
                    # By its reason even while the pool closes: it was found unfit (or the
                    # borrower asked), which ``discarded``, ``discards`` and the DISCARD event
                    # all tell alike; one retired for its age only ``discards`` and the event.
                    if not retired:
                        self._discarded += 1
                    self._discards[key] += 1
                    if held is not None:
                        self._returned += 1
                        self._not_kept += 1
                        self._held_time += held
                    slot.owner = threading.get_ident()  # now the thread closing it
                    self._closing.add(slot)
                    if broken:
                        self._broken_at = max(self._broken_at, monotonic())
                    self._grant_room_locked(since)
                    self._everyone.discard(slot)
        finally:  # closed even if a signal handler raised once it was counted off
            if counted:
                try:
                    self._close_raw(slot, reason, detail)
                finally:  # _close_counted's work, written out: see _put_back
                    self._closed_off.append(slot)
                    self._wake_closers()
            elif counted is not None:  # close() took it back; or it was leased before reopen()
                self._close_if_retired(slot, held)

    # -- hand-off (all under the lock) ---------------------------------------------------------

    def _free_locked(self, slot: _Slot) -> None:
        """A connection is free: the oldest waiter gets it, else it goes idle."""
        waiters = self._waiters
        if not waiters:
            self._idle.append(slot)
            return
        # No call until it is served (see _pop_idle_locked); a queued caller is never among
        # those waiting for a connect, so _serve_locked has nothing more to do for it.
        waiter = waiters[0]
        del waiters[0]
        waiter.slot = slot
        waiter.grant = _HANDED
        self._in_use += 1
        waiter.wakeup.release()

    def _grant_room_locked(self, before: float = math.inf) -> None:
        """Room was made under max_size: let waiters open connections in it.  ``before``: the
        arrival of a caller that will ask again (its connection failed validation): the room
        is its own, unless one that came earlier is waiting."""
        if self._closed:
            self._cond.notify_all()
            return
        while (
            self._waiters
            and self._waiters[0].since < before
            and self._size + len(self._retired) < self._max_size
            and self._may_connect_locked(monotonic())
        ):
            slot = self._reserve_locked()
            waiter = self._waiters[0]
            del self._waiters[0]  # then no call until it is served: see _free_locked
            waiter.slot = slot
            waiter.grant = _OPEN
            waiter.wakeup.release()

    def _serve_locked(self, waiter: _Waiter, grant: object) -> None:
        # A queued caller is served with no call before its grant (see _pop_idle_locked); only
        # connect threads and close() serve one that waits for a connect.
        if waiter in self._connecting:
            self._connecting.discard(waiter)
        waiter.grant = grant
        waiter.wakeup.release()

    def _forget_locked(self, slots: list[_Slot], reason: DiscardReason | None = None) -> None:
        """Stop counting connections about to be closed (idle ones already out of the stack);
        ``reason``: why the open pool drops them (``None`` when the pool closes)."""
        key = None if reason is None else reason.value
        count = len(slots)
        self._size -= count  # the counts first, with no call among them: see _discard
        self._closed_count += count
        if key is not None:
            self._discards[key] += count
        for slot in slots:
            slot.generation = _FORGOTTEN  # a lease still holding it returns nothing
            self._everyone.discard(slot)
        self._grant_room_locked()

    def _close_raw(self, slot: _Slot, reason: str, detail: str = "") -> None:
        """Close a connection no longer counted.  ``reason``: a :class:`DiscardReason` or
        ``POOL_CLOSED``, told to listeners."""
        reason = reason.value if isinstance(reason, DiscardReason) else reason
        logger.debug("pool %r: closing a connection (%s) %s", self._name, reason, detail)
        # Given back (or discarded, or let go by close()) by one thread while another is inside
        # a call on it: closed under that call, the driver may crash the interpreter.  (An
        # interrupted call leaves transaction.INTERRUPTED instead: nobody is inside.)
        closes = not in_call(slot.busy) or slot.dialect.closes_under_a_call
        try:
            if reason != POOL_CLOSED and self._listeners.discard:
                emit(self._listeners.discard, Event.DISCARD, self._name, slot.raw, reason)
        finally:  # whatever a listener raises, the connection is closed
            if not closes:
                closes = self._await_call_end(slot)
            if closes:
                _close_quietly(slot.dialect, slot.raw)
        if closes and self._listeners.close:
            emit(self._listeners.close, Event.CLOSE, self._name, slot.raw, reason)

    def _await_call_end(self, slot: _Slot) -> bool:
        """Cut off the call another thread runs on ``slot``'s connection, no longer counted, and
        wait until it has ended (it clears ``busy``); False if it still runs after
        ``_CALL_END_WAIT``: the connection is then left to the garbage collector."""
        try:
            slot.dialect.sever(slot.raw)
        except Exception as exc:
            logger.debug("cutting off a connection failed: %s", self._describe(exc))
        deadline = monotonic() + _CALL_END_WAIT
        pause = 0.001
        while in_call(slot.busy):
            if monotonic() >= deadline:
                logger.warning(
                    "pool %r: a connection was given back while another thread was inside a "
                    "call on it, still running after %g s: left open, for the garbage collector "
                    "to close (use a lease from one thread at a time)",
                    self._name,
                    _CALL_END_WAIT,
                )
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return True

    def _close_counted(self, slot: _Slot, reason: str, detail: str = "") -> None:
        """_close_raw a connection in ``_closing``, then say it is closed: drain() and close()
        wait for it."""
        try:
            self._close_raw(slot, reason, detail)
        finally:
            self._closed_off.append(slot)
            self._wake_closers()

    def _wake_closers(self) -> None:
        """Count off the closes done, and wake drain() and close() (which also look every
        _CLOSE_POLL: a signal handler raising here delays them at most that long)."""
        with self._lock:
            self._settle_closes_locked()
            self._cond.notify_all()

    def _settle_closes_locked(self) -> None:
        closing, closed_off = self._closing, self._closed_off
        while closed_off:
            closing.discard(closed_off[0])
            del closed_off[0]

    def _closes_pending_locked(self) -> int:
        """How many connections let go are still being closed, leaving out this thread's own
        (a listener of their close may call drain())."""
        self._settle_closes_locked()
        if not self._closing:
            return 0
        me = threading.get_ident()
        return sum(1 for slot in self._closing if slot.owner != me)

    def _close_all(
        self,
        slots: list[_Slot],
        reason: str,
        detail: str = "",
        *,
        sever: bool = False,
        counted: bool = False,
    ) -> BaseException | None:
        """Close every one of ``slots`` (no longer counted), even if closing one of them is
        interrupted; return the first such interruption for the caller to raise.  ``sever``
        first shuts down the socket of each, for a borrower blocked on it; ``counted``: they
        are in ``_closing`` (a thread where no signal handler runs: the reaper's)."""
        interrupted = None
        for slot in slots:
            try:
                if sever and slot.raw is not None:
                    try:
                        slot.dialect.sever(slot.raw)
                    except Exception as exc:
                        logger.debug("cutting off a connection failed: %s", self._describe(exc))
                if counted:
                    self._close_counted(slot, reason, detail)
                else:
                    self._close_raw(slot, reason, detail)
            except BaseException as exc:
                interrupted = interrupted or exc
        return interrupted

    # -- maintenance (run by the reaper thread) ------------------------------------------------

    def _maintain(self, wakeup: threading.Event) -> float | None:
        """Close idle connections past their time, refill to min_size, serve queued callers
        while connects back off.  Returns seconds until the next run, or None once closed (or
        once ``wakeup``, the calling reaper's, is no longer the pool's: reopen() replaced it)."""
        if wakeup is not self._reaper_wakeup:
            return None
        if self._orphans:
            self._return_orphans()  # each bounded, so that the rest below goes on
            if self._orphans:  # more than one run's share: the next run comes at once
                wakeup.set()
        now = monotonic()
        me = threading.get_ident()
        expired: list[_Slot] = []
        idle: list[_Slot] = []
        with self._lock:
            draining = self._closed
            if draining:
                # Drained with leases still out: keep taking back those dropped unreleased,
                # to close them, and reporting those held too long, which drain() waits for
                # (close() and reopen() end this thread).  Those leased before a reopen() are
                # out too, though no longer counted in `everyone`.
                if not (self._drained and (self._everyone or self._retired)):
                    return None
            else:
                expired, idle = self._pick_retired_locked(now)
                self._forget_locked(expired, DiscardReason.EXPIRED)
                self._forget_locked(idle, DiscardReason.IDLE)
                for slot in (*expired, *idle):  # drain() waits for their close too
                    slot.owner = me
                    self._closing.add(slot)
        interrupted = self._close_all(expired, DiscardReason.EXPIRED, counted=True)
        interrupted = self._close_all(idle, DiscardReason.IDLE, counted=True) or interrupted
        if interrupted is not None:
            raise interrupted
        if expired or idle:
            logger.debug("pool %r: reaped %d connections", self._name, len(expired) + len(idle))
        if self._leak_timeout is not None:
            self._report_leaks(now)
        if draining:
            leak = self._leak_timeout
            return 1.0 if leak is None else max(min(1.0, leak / 2), _MIN_TICK)
        if self._broken_at > self._swept_at:
            self._sweep_suspects()
        with self._lock:
            if self._closed:
                return None
            refill = (
                not self._refilling
                and self._refill_wanted_locked()
                and (not self._connect_failures or monotonic() >= self._next_connect_at)
            )
            if refill:
                self._refilling = True
        if refill:
            self._start_refill()
        return self._tick()

    def _refill_wanted_locked(self) -> bool:
        if self._exiting:  # else the reaper starts refills that stop at once, again and again
            return False
        wanted = self._size < self._min_size or bool(self._waiters)
        return wanted and self._size + len(self._retired) < self._max_size

    def _start_refill(self) -> None:
        def not_started() -> None:
            with self._lock:
                self._refilling = False

        _start_thread(self._refill, f"dbpool-refill-{self._name}", not_started)

    def _refill(self) -> None:
        """Open connections one at a time while some are wanted (below ``min_size``, or callers
        queued while connects back off); stop at the first failure, after which the reaper
        starts this again when the backoff delay is up.  Runs in a thread of its own, so the
        reaper never waits on a connect that hangs."""
        try:
            while True:
                with self._lock:
                    if (
                        self._closed
                        or not self._refill_wanted_locked()
                        or not self._may_connect_locked(monotonic())
                    ):
                        return
                    slot = self._reserve_locked()
                if not self._open(slot, None):
                    return
        finally:
            with self._lock:
                self._refilling = False
            self._reaper_wakeup.set()  # it times the next attempt, now that one may start

    def _sweep_suspects(self) -> None:
        """A broken connection was found: ping every idle connection returned before it now,
        so that after a server restart the dead ones are retired together, not one checkout
        at a time.  They count as in use meanwhile."""
        with self._lock:
            broken_at = self._swept_at = self._broken_at
            suspects = [slot for slot in self._idle if slot.alive_at <= broken_at]
        if not suspects:
            return
        count = len(suspects)
        dead = self._probe_all(suspects, monotonic() + _SWEEP_TIME)
        logger.info(
            "pool %r: a broken connection was found; %d of %d idle connections older than it "
            "were dead too",
            self._name,
            dead,
            count,
        )

    def _probe_all(self, slots: list[_Slot], deadline: float) -> int:
        """Ping the idle connections ``slots``, all by ``deadline``; put the live ones back,
        discard the dead.  Returns how many were dead.

        Each is taken out of the idle stack only for its own ping (counted in use meanwhile):
        the others stay there for checkouts, so that a slow ping never keeps a caller waiting,
        nor makes it open a connection, while idle ones are left.  One no longer idle (leased,
        reaped, closed) is skipped.  Once the time left is under ``_PING_HEADROOM`` times the
        slowest ping so far, the rest stay as they are: a suspect one is pinged when next
        leased."""
        dead = 0
        slowest = 0.0
        count = len(slots)
        box: list[_Slot] = []  # the one being pinged, to hand back (see _give_back)
        try:
            for done, slot in enumerate(slots):
                started = monotonic()
                left = deadline - started
                if left <= 0 or left < _PING_HEADROOM * slowest:
                    logger.info(
                        "pool %r: %d of %d idle connections left unpinged: the time for the "
                        "pings ran out (the slowest took %.3f s)",
                        self._name,
                        count - done,
                        count,
                        slowest,
                    )
                    break
                with self._lock:
                    idle = self._idle
                    if slot not in idle:
                        continue
                    # An index and a del, and no call until it is counted: see _pop_idle_locked.
                    where = idle.index(slot)
                    box = [slot]
                    del idle[where]
                    self._in_use += 1  # held by the pool itself meanwhile
                slot.owner = 0
                if started >= slot.expires_at:  # closed for its age, unpinged: not a dead one
                    self._discard(slot, DiscardReason.EXPIRED, broken=False, retired=True)
                    del box[0]
                    continue
                if self._fit_for_use(slot, deadline, probe=True):
                    slot.alive_at = now = monotonic()  # not used_at: a ping is no use of it
                    slowest = max(slowest, now - started)
                    self._put_back(box)
                else:
                    del box[0]  # discarded already
                    dead += 1
        except BaseException:
            # One handed back already, or discarded, is not the pool's to count again: a
            # discarded one's generation is no longer the pool's, and _put_back leaves it.
            self._drop_lock_if_held()
            self._put_back(box)
            raise
        return dead

    def _report_leaks(self, now: float) -> None:
        assert self._leak_timeout is not None
        overdue = []
        with self._lock:
            # Leases from before reopen() too: still out, though no longer counted.
            for slot in itertools.chain(self._everyone, self._retired):
                borrowed = slot.borrowed
                if borrowed and not borrowed.reported and now - borrowed.at > self._leak_timeout:
                    borrowed.reported = True
                    overdue.append(borrowed)
            self._leak_warnings += len(overdue)
        for borrowed in overdue:
            logger.warning(
                "pool %r: a connection has been leased for %.1f s, longer than leak_timeout=%g s, "
                "by thread %r; it was acquired at:\n%s",
                self._name,
                now - borrowed.at,
                self._leak_timeout,
                borrowed.thread,
                # the stack's source lines may hold a DSN or a password typed into the code
                mask_credentials(scrub_text(borrowed.where(), self._secrets)),
            )

    def _pick_retired_locked(self, now: float) -> tuple[list[_Slot], list[_Slot]]:
        """Take out of the idle stack the connections past max_lifetime, and those idle too
        long above min_size, least recently used first."""
        expired = []
        stale = []
        # Those past max_lifetime go anyway: only what stays above min_size may go for idling.
        surplus = self._size - self._min_size
        surplus -= sum(1 for slot in self._everyone if now >= slot.expires_at)
        for slot in self._idle:
            if now >= slot.expires_at:
                expired.append(slot)
            elif now - slot.used_at > self._idle_timeout:
                stale.append(slot)
        # By their last use, not their place in the stack: check() and the sweep put what they
        # pinged back on top, above connections returned meanwhile, used later.
        stale.sort(key=_last_use)
        idle = stale[: max(surplus, 0)]
        if expired or idle:
            gone = {*expired, *idle}
            self._idle = deque(slot for slot in self._idle if slot not in gone)
        return expired, idle

    def _tick(self) -> float:
        tick = min(1.0, self._idle_timeout / 2, self._max_lifetime / 2)
        if self._leak_timeout is not None:
            tick = min(tick, self._leak_timeout / 2)
        # While connects fail, run again when the next may start; not while a refill is under
        # way, nor when none is wanted (its delay past, that would poll every 5 ms).
        with self._lock:
            if self._connect_failures and not self._refilling and self._refill_wanted_locked():
                tick = min(tick, self._next_connect_at - monotonic())
        return max(tick, _MIN_TICK)

    # -- fork -----------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """Drop every inherited connection without closing it and start afresh."""
        inherited = [*self._everyone, *self._orphans, *self._retired, *self._left_open]
        counted = {id(slot.raw) for slot in inherited}
        opening = [raw for key, raw in self._being_opened.items() if key not in counted]
        self._orphans.clear()
        self._setup_state()
        # Held by another thread of the parent at fork, it would never be let go here.
        self._listeners._lock = threading.Lock()
        for slot in inherited:
            slot.generation = _INHERITED
            if slot.raw is not None:
                _fork.keep_forever(slot.dialect, slot.raw)
        for raw in opening:  # (its connect thread is not in the child: nothing finishes it)
            _fork.keep_forever(_dialect_of(self, raw), raw)
        self._asleep = not self._closed  # the child's first use starts the reaper

    # -- reporting ----------------------------------------------------------------------------

    def _stats_locked(self) -> PoolStats:
        # Leases from before reopen() still out are no longer the pool's own (each is closed as
        # it comes back), but they are open, lent out and count against max_size: shown with
        # the others, so that size == idle + in_use + opening <= max_size holds for what is
        # reported too, and ``closed`` counts their connections once they are being closed.
        retired = len(self._retired)
        waited = self._waits_recorded
        wait_time = self._wait_time
        wait_histogram = list(self._wait_counts)
        wait_histogram[0] += self._served_at_once  # no wait
        return PoolStats(
            name=self._name,
            min_size=self._min_size,
            max_size=self._max_size,
            size=self._size + retired,
            idle=len(self._idle),
            in_use=self._in_use + retired,
            opening=self._opening,
            waiting=len(self._waiters),
            created=self._created,
            closed=self._closed_count,
            discarded=self._discarded,
            acquired=self._served_at_once + waited,
            timeouts=self._timeouts,
            connect_errors=self._connect_errors,
            leak_warnings=self._leak_warnings,
            leaked=self._leaked,
            wait_time=wait_time,
            wait_histogram=tuple(wait_histogram),
            held_time=self._held_time,
            returned=self._returned,
            connect_time=self._connect_time,
            discards=dict(self._discards),
            pool_closed=self._closed,
        )

    def _emit_handling(
        self, what: str, listeners: tuple[Listener, ...], event: Event, raw: Any, duration: float
    ) -> None:
        """Tell connect, checkout or checkin listeners (``what``) of the connection this thread
        handles: drain() and close() called from one of them refuse (see _handling)."""
        _while_handling(self, what, emit, listeners, event, self._name, raw, None, duration)

    def _hook_running(self) -> str | None:
        """The innermost hook or listener this thread runs on one of this pool's connections,
        if any (see _handling)."""
        running: list[str] = getattr(self._handling, "running", [])
        return running[-1] if running else None

    def _refuse_inside_a_hook(self, call: str) -> None:
        """Raise if this thread is running a hook or a listener on one of this pool's
        connections: ``call`` (drain() or close()) would wait for that connection forever, or
        until its timeout and then close it under the hook."""
        what = self._hook_running()
        if what is not None:
            kind = what.rpartition(" ")[2]  # hook or listener
            raise PoolError(
                f"pool {self._name!r}: {call} called from {what}, which runs while this "
                f"thread handles one of the pool's connections: {call} would wait for that "
                f"connection, which comes back only once the {kind} returns; call it from "
                "another thread"
            )

    def _own_leases_error(self, call: str, held: int) -> PoolError:
        """Why drain() or close(timeout=None), which wait with no deadline for every lease, are
        refused to a thread that holds ``held`` leases: they cannot come back while it waits
        (unless it handed them to another thread, for which a timeout says how long to wait)."""
        return PoolError(
            f"pool {self._name!r}: {call} waits for every lease to come back, and this thread "
            f"holds {held} of them, which cannot come back while it waits: close them first "
            "(or, if another thread returns them, pass a timeout)"
        )

    def _closed_message(self) -> str:
        if self._drained:
            return f"pool {self._name!r} was drained and hands out no connections: reopen() it"
        return f"pool {self._name!r} is closed and hands out no connections: reopen() it first"

    def _timeout_error_locked(self, timeout: float) -> PoolTimeout:
        s = self._stats_locked()
        message = (
            f"pool {self._name!r}: no connection available within {timeout:g} s "
            f"(size={s.size}/{s.max_size} in_use={s.in_use} idle={s.idle} "
            f"opening={s.opening} waiting={s.waiting})"
        )
        error = self._last_connect_error
        if error is not None:
            message += f"; connects to the database are failing: {self._describe(error)}"
        else:
            message += "; every connection is in use: raise max_size or return connections sooner"
            held = self._held_by_this_thread_locked()
            if held:
                message += (
                    f"; this thread itself holds {held} of them: a nested acquire needs a pool "
                    "larger than the nesting depth, or pass the connection down instead"
                )
            running = self._hook_running()
            if running is not None:
                message += (
                    f"; this thread is running {running} on one of them, which no caller gets "
                    "before it returns"
                )
        return PoolTimeout(message)

    def _connect_timeout_error_locked(self, timeout: float, left: float) -> PoolTimeout:
        """``left``: what was left of ``timeout`` when the connect started."""
        before = timeout - left
        if before > max(timeout * 0.1, 0.01):  # much of the time went elsewhere
            took = (
                f"did not finish in the {max(left, 0.0):.3g} s left of the {timeout:g} s acquire "
                f"timeout (the first {before:.3g} s went to waiting in the queue or validating "
                "idle connections)"
            )
        else:
            took = f"took longer than the {timeout:g} s acquire timeout"
        message = (
            f"pool {self._name!r}: connecting to the database {took}; the connection joins the "
            "pool if the connect succeeds"
        )
        error = self._last_connect_error
        if error is not None:
            message += f"; connects are failing: {self._describe(error)}"
        return PoolTimeout(message)

    def _held_by_this_thread_locked(self) -> int:
        """The leases this thread holds: not those it dropped unreleased (their claim is
        emptied as they are queued for the maintenance thread, which takes them back) nor
        those being returned."""
        me = threading.get_ident()
        leased = self._everyone.difference(self._idle)
        return sum(
            1 for slot in itertools.chain(leased, self._retired) if slot.owner == me and slot.claim
        )

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self._secrets)

    def _scrub(self, exc: BaseException) -> None:
        """Scrub the passwords read in ``connect`` from a connect error, in place."""
        if self._secrets:
            try:
                scrub_exception(exc, self._secrets)
            except Exception:  # (a RecursionError, say): log lines still go through describe()
                pass

    def _side_connect(self) -> Any:
        """A connection outside the pool (the side connection of a MySQL cancel): connect
        errors scrubbed as the pool's own are."""
        try:
            return self._connect()
        except BaseException as exc:
            self._scrub(exc)
            raise


# The options Pool() takes: its keyword-only parameters, each with a default
POOL_OPTIONS = frozenset(Pool.__init__.__kwdefaults__ or ())
# help(), inspect.signature() and the docs read a class's signature from its __new__ first:
# Pool's is __init__'s (a subclass's own __init__ comes first for them all the same).
Pool.__new__.__signature__ = inspect.signature(Pool.__init__)  # type: ignore[attr-defined]


def _while_handling(pool: Pool[Any], what: str, call: Callable[..., object], *args: Any) -> None:
    """``call(*args)``, a hook or listener (``what``) run on a connection this thread handles
    for ``pool``, recorded meanwhile in ``_handling``."""
    try:
        running = pool._handling.running
    except AttributeError:
        running = pool._handling.running = []
    depth = len(running)
    try:
        running.append(what)  # inside the try: a signal handler may raise as it returns
        call(*args)
    finally:
        del running[depth:]


def _start_thread(target: Callable[[], object], name: str, not_started: Callable[[], None]) -> None:
    """Run ``target`` in a new daemon thread.  ``Thread.start()`` interrupted half-way may or
    may not have launched it: exactly one of ``target`` and ``not_started`` then runs, the
    first to take the token."""
    token = threading.Lock()

    def run() -> None:
        if token.acquire(False):
            target()

    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except BaseException:
        if token.acquire(False):
            not_started()
        raise


def _last_use(slot: _Slot) -> float:
    return slot.used_at


def _dialect_of(pool: Pool[Any], raw: Any) -> Dialect:
    return pool._dialect if pool._dialect is not None else _detect_dialect(raw)


def _is_broken(slot: _Slot) -> bool:
    """Whether a discarded connection suggests the server went away (the others are then
    suspect): its driver says so, or a cancel, rollback or reset on it failed."""
    return slot.doomed or slot.lost or _driver_says_broken(slot)


def _driver_says_broken(slot: _Slot) -> bool:
    try:
        return slot.dialect.transaction_state(slot.raw) is BROKEN
    except Exception:
        return True


def _close_quietly(dialect: Dialect, raw: Any) -> None:
    try:
        dialect.close(raw)
    except Exception as exc:
        logger.debug("closing a connection failed: %s", describe(exc))
