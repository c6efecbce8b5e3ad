"""Transactions: an isolation level, read-only mode, a deadline and savepoints, on one
connection, leaving nothing behind for the next borrower.

``pool.transaction()`` leases a connection of its own for the block; ``conn.transaction()`` runs
on a lease the caller already holds.  The deadline runs from BEGIN.  It is enforced by the server
where it can be (statement and lock timeouts sized to it) and by the shared watchdog thread,
which cancels the running statement when it passes; the block then ends in a rollback and
:class:`TransactionTimeout`.  A driver call still running ``_SEVER_GRACE`` seconds after the
deadline (the cancel never reached the server: a blackholed network) has its connection's socket
shut down, and the pool discards the connection.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import random
import threading
import time
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

from ._callables import callable_name, is_own_generator
from ._types import C
from .dialects.base import BROKEN, BUSY, IDLE, UNKNOWN, Dialect
from .errors import (
    CommitOutcomeUnknown,
    ConnectionUnusable,
    LeaseReleased,
    PoolError,
    PoolTimeout,
    TransactionRolledBack,
    TransactionTimeout,
)
from .isolation import Isolation
from .redact import describe
from .watchdog import watchdog

if TYPE_CHECKING:
    from .lease import Connection, Cursor
    from .pool import Pool, _Slot

__all__ = ["Transaction", "Savepoint", "Isolation", "run_transaction"]

logger = logging.getLogger("dbpool")

T = TypeVar("T")

_CANCEL_AGAIN = 0.05  # seconds between cancels while a statement still runs past the deadline
_SEVER_GRACE = 1.0  # seconds past the deadline before a call still running is cut off
_NOT_LIMITED = object()  # limit_time() was not called, or did not get through
#: ``slot.busy`` once an interrupt (KeyboardInterrupt, SystemExit) came out of a driver call:
#: truthy, as the call may have stopped half-way, but no thread is inside it any more.  Left
#: ``True``, the pool must assume a call still runs, maybe in another thread (see
#: Pool._close_raw), and a block's deadline cancels it (see Transaction._on_deadline).
INTERRUPTED: Any = "interrupted"


def in_call(busy: object) -> bool:
    """Whether ``slot.busy`` says a thread is inside a driver call on the connection: True
    (the lease's own calls), or the mark of a call that another thread may make at any time
    (lease._marked_call: a cursor's close, a driver method through the lease), which puts back
    only its own mark."""
    return busy is not False and busy is not INTERRUPTED


# How far past the deadline a lock wait may last where the dialect narrows its limit (SQLite):
# the limit is resized to the time left before a statement when it was sized longer ago.
_NARROW_SLACK = 0.01
_RETRY_FIRST_DELAY = 0.01
_RETRY_MAX_DELAY = 1.0

_NOT_STARTED = (
    "the transaction has not started: use it in a with block ('with pool.transaction() as tx:')"
)


def check_options(
    isolation: Isolation | str | None, timeout: float | None, readonly: bool
) -> Isolation | None:
    """Validate what a caller passes, before any connection is touched."""
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        try:
            finite = 0 < float(timeout) < math.inf
        except OverflowError:  # an int no float can hold (not shown: it may be huge)
            raise ValueError("timeout must be a finite number of seconds above 0") from None
        if not finite:
            raise ValueError(f"timeout must be a finite number of seconds above 0, got {timeout!r}")
    if not isinstance(readonly, bool):
        raise TypeError(f"readonly must be True or False, got {readonly!r}")
    return None if isolation is None else Isolation.parse(isolation)


def check_dialect_allows(pool: Pool[Any], isolation: Isolation | None, readonly: bool) -> None:
    """Refuse what the pool's dialect cannot do before waiting for a connection: ValueError.
    The dialect is known once the pool has connected; before that, BEGIN checks it."""
    dialect = pool._dialect
    if dialect is not None:
        dialect.check_begin(isolation, readonly)


def _call_on(slot: _Slot, call: Callable[..., object], *args: Any) -> None:
    """Make a call of the block's own on ``slot``'s connection as the lease makes the
    borrower's: busy meanwhile (cut off, too, on a network gone silent); a failure recorded
    (lease._call_failed), an interrupt half-way dooming the connection."""
    from .lease import _call_failed

    slot.busy = True
    try:
        try:
            call(*args)
        except Exception as exc:
            _call_failed(slot, exc)  # an interrupt in here is one in the call
            raise
    except Exception:
        slot.busy = False
        raise
    except BaseException:
        slot.busy = INTERRUPTED
        slot.doomed = True  # interrupted half-way: see lease._call_failed
        raise
    slot.busy = False


class Transaction(Generic[C]):
    """A transaction on one connection; use it as a context manager.

    Normal exit commits; an exception rolls back and propagates.  Past its deadline the running
    statement is cancelled, the transaction rolled back and :class:`TransactionTimeout` raised.
    If the server already ended the transaction (an error inside the block aborted it),
    :class:`TransactionRolledBack` is raised instead of committing.  If the connection is lost
    while COMMIT is in flight, :class:`CommitOutcomeUnknown` is raised and the connection
    discarded.  The object runs one block: make another for the next.
    """

    def __init__(
        self,
        source: Pool[C] | Connection[C],
        *,
        isolation: Isolation | str | None = None,
        timeout: float | None = None,
        readonly: bool = False,
    ) -> None:
        self._isolation = check_options(isolation, timeout, readonly)
        self._timeout = timeout
        # The timeout the error quotes: run_transaction's whole one, not an attempt's remainder
        self._quoted_timeout = timeout
        self._readonly = readonly
        self._source = source
        self._entered = False  # one block per object: a second run would inherit this one's state
        self._lease: Connection[C] | None = None
        self._owns_lease = False
        self._slot: _Slot | None = None
        self._deadline = math.inf
        self._expired = False
        # _active: from BEGIN until the block ends; the watchdog cancels only while it is set,
        # and sets/reads it under _cancel_lock, so no cancel can start once the block ended
        # (it would hit the next borrower's statement).  _open: BEGIN went through.
        self._cancel_lock = threading.Lock()
        self._active = False
        self._open = False
        # _ended: nothing of the block's end is left to do (committed or rolled back, and the
        # session put back; or the connection doomed).  See _left_half_way.
        self._ended = True
        self._begin_token: Any = None
        self._session: object = None  # the server session BEGIN went to (Dialect.server_session)
        self._time_token: Any = _NOT_LIMITED
        # When the server-side limit was last sized to the time left, if the dialect narrows
        # it (see Dialect.narrows_time); a wait starting later may outlast the deadline by
        # the time since.  Infinity: nothing to narrow.  _commit_sized_at: the same, for the
        # limit a lock wait of COMMIT gets (Dialect.narrows_commit_wait).
        self._narrowed_at = math.inf
        self._narrow_slack = _NARROW_SLACK  # (the dialect's, once it narrows)
        self._commit_sized_at = math.inf
        self._watch: Any = None
        # _guarded: from BEGIN until COMMIT/ROLLBACK and the session undo are over; the
        # watchdog severs the connection only while it is set (under _sever_lock).
        self._sever_lock = threading.Lock()
        self._guarded = False
        self._sever_watch: Any = None
        self._savepoints = itertools.count(1)
        # How many savepoint blocks are open: entered, and not yet ended by their RELEASE or
        # ROLLBACK TO.  A block ending normally with one still open commits nothing: the end of
        # that savepoint's block was interrupted (a signal handler can raise as its __exit__
        # is entered, before any of its code runs), and what it should undo may still be there.
        self._savepoints_open = 0
        # A savepoint statement that failed (its SAVEPOINT, RELEASE or ROLLBACK TO), and the
        # driver's error: the server may have aborted or rolled back the transaction, or kept
        # work a savepoint should have undone, so nothing more runs and nothing is committed.
        self._savepoint_failed: tuple[str, Exception] | None = None
        # Set by lease._call_failed: _failed, the first error a driver call raised through the
        # lease inside the block (a server that aborts a transaction, as PostgreSQL does, does
        # so after one); _ended_by, the error with which the server ended the transaction and
        # rolled its work back: from then on nothing more runs in the block, and nothing is
        # committed (a driver would start a new transaction, or autocommit, behind it).
        self._failed: Exception | None = None
        self._ended_by: Exception | None = None

    # -- the block ----------------------------------------------------------------------------

    def __enter__(self) -> Transaction[C]:
        from .lease import Connection

        with self._cancel_lock:  # of two threads entering it at once, one goes on
            entered, self._entered = self._entered, True
        if entered:
            raise PoolError(
                "this transaction object already ran its block: start another with "
                "pool.transaction() or conn.transaction()"
            )
        if isinstance(self._source, Connection):
            lease = self._source
        else:
            check_dialect_allows(self._source, self._isolation, self._readonly)
            lease = self._source.connection()
            self._owns_lease = True
        try:
            self._begin(lease)
        except BaseException:
            if self._owns_lease:
                lease.close()
            raise
        return self

    def _begin(self, lease: Connection[C]) -> None:
        slot = lease._live("connection")
        if slot.transaction is not None:
            raise PoolError("a transaction is already open on this connection: use tx.savepoint()")
        dialect, raw = slot.dialect, slot.raw
        dialect.check_begin(self._isolation, self._readonly)  # ValueError, before any I/O
        self._lease, self._slot = lease, slot
        if self._timeout is not None:
            # The deadline runs from here: it covers BEGIN, and the look at the connection's
            # state before it, which may be a round trip (PyMySQL's flags after a failed call)
            # that a network gone silent would hold up for as long as the driver waits.
            self._deadline = monotonic() + self._timeout
            self._guarded = True
            self._sever_watch = watchdog.watch(self._deadline + _SEVER_GRACE, self._on_overdue)
        try:
            self._check_startable(slot)
            if monotonic() >= self._deadline:
                raise self._timeout_error()  # nothing began: the block would only fail
        except BaseException as exc:
            self._unguard()
            late = monotonic() >= self._deadline  # cut off a second past it, say
            if late and isinstance(exc, Exception) and not isinstance(exc, TransactionTimeout):
                raise self._timeout_error() from exc
            raise
        slot.busy = slot.dirty = True  # from here on, a failure leaves work to roll back
        self._active = True
        limit_inside = dialect.limit_time_inside_transaction
        try:
            if self._timeout is not None:
                self._watch = watchdog.watch(self._deadline, self._on_deadline)
            if self._timeout is not None and not limit_inside:
                now = monotonic()
                self._time_token = dialect.limit_time(raw, self._deadline - now)
                if dialect.narrows_time:
                    self._narrowed_at, self._narrow_slack = now, dialect.narrow_slack
                if dialect.narrows_commit_wait:
                    self._commit_sized_at = now
            self._begin_token = dialect.begin(raw, self._isolation, self._readonly)
            self._session = dialect.server_session(raw)
            self._open, self._ended = True, False
            slot.transaction = self
            if self._timeout is not None and limit_inside:
                now = monotonic()
                self._time_token = dialect.limit_time(raw, self._deadline - now)
                if dialect.narrows_time:
                    self._narrowed_at, self._narrow_slack = now, dialect.narrow_slack
                if dialect.narrows_commit_wait:
                    self._commit_sized_at = now
        except BaseException as exc:
            # Until the handling below is done (a signal that came during a failed call is
            # handled as _stop_watching is entered): see lease._call_failed
            slot.busy = INTERRUPTED
            self._stop_watching()
            if self._open:
                self._open = False
                slot.transaction = None
            if not isinstance(exc, Exception):
                # Interrupted mid-call: the lease refuses further use (see lease._call_failed)
                # and the pool discards the connection.
                slot.doomed = True
                self._unguard()
                raise
            slot.busy = False
            self._end_quietly(slot)  # roll back what began, put the session back
            self._unguard()
            if self._expired or monotonic() >= self._deadline:
                raise self._timeout_error() from exc
            raise
        slot.busy = False

    def _check_startable(self, slot: _Slot) -> None:
        """Refuse to BEGIN on a connection that is not idle: START TRANSACTION would commit
        the work pending on it (MySQL), or a result still being read would be lost."""
        slot.busy = True  # a dialect whose flags went stale reads them again: a round trip
        try:
            if slot.exposed:  # a call through raw may have failed unseen: flags not trusted
                slot.dialect.call_failed(slot.raw)
            state = slot.dialect.fresh_transaction_state(slot.raw)
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see lease._call_failed
            raise
        slot.busy = False
        if state is IDLE or (state is UNKNOWN and not slot.dirty):
            return
        if state is BUSY:
            raise PoolError(
                "this connection has a statement running or a result not read to the end: "
                "fetch it or close its cursor, then commit or roll back, before starting a "
                "transaction on it"
            )
        if state is BROKEN:
            raise PoolError("this connection is closed or lost: release it and take a new one")
        raise PoolError(
            "this connection has work pending: commit or roll back before starting a "
            "transaction on it"
        )

    def _stop_watching(self) -> None:
        """After this, the watchdog cancels nothing more for this transaction."""
        # Wait for a cancel in progress, but not forever: a cancel whose own connection hangs
        # must not hang the block.  The connection is then doomed (it refuses further use and
        # the pool discards it), so the late cancel can only reach a connection nobody uses.
        cancel_over = self._cancel_lock.acquire(timeout=_SEVER_GRACE)
        self._active = False
        if cancel_over:
            self._cancel_lock.release()
        elif self._slot is not None:
            self._slot.doomed = True
        if self._watch is not None:
            watchdog.unwatch(self._watch)

    def _unguard(self) -> None:
        """After this, the watchdog severs nothing for this transaction."""
        slot = self._slot
        if slot is not None and slot.generation < 0:
            # The pool closed it, or it is the parent's (fork()): it is never handed out again,
            # so a late cut-off reaches nobody; and in a child forked while the watchdog's
            # thread held the lock, nothing would ever let it go.
            self._guarded = False
        else:
            with self._sever_lock:
                self._guarded = False
        if self._sever_watch is not None:
            watchdog.unwatch(self._sever_watch)

    def _owns_connection(self) -> bool:
        """Whether the lease still holds the connection the transaction began on.  A lease
        closed inside its own block loses it (the pool discards such a connection), and from
        then on nothing here may touch it: it could be another borrower's."""
        lease, slot = self._lease, self._slot
        return (
            lease is not None and slot is not None and lease._slot is slot and slot.generation >= 0
        )

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self._finish(exc)
        except BaseException:
            self._left_half_way()
            raise
        finally:
            if self._owns_lease and self._lease is not None:
                self._lease.close()

    def _finish(self, exc: BaseException | None) -> None:
        """Commit or roll back; the block's own exception, if any, propagates after this."""
        if not self._open:
            return
        try:
            self._commit_or_roll_back(exc)
        finally:
            self._failed = self._ended_by = None  # their tracebacks hold the block's frames
            self._unguard()

    def _left_half_way(self) -> None:
        """The block's end raised.  Its own errors come once it is over; anything else (an
        interrupt, or a signal handler's exception, at any point CPython runs one) may have
        stopped it anywhere: before COMMIT or ROLLBACK, or before the session was put back.
        Then nothing more is sent on the connection (the lease refuses further use, and the
        pool discards it): a caller who catches the interrupt and goes on must not commit the
        block's work with its own, nor run statements inside a block that is over.  Either
        way the watchdog lets go of the block.  No I/O, no wait: a cancel or cut-off under way
        reaches a connection nobody uses any more."""
        self._open = self._active = self._guarded = False
        for watch in (self._watch, self._sever_watch):
            if watch is not None:
                watchdog.unwatch(watch)
        slot = self._slot
        if not self._ended and slot is not None and self._owns_connection():
            slot.doomed = True
            if slot.transaction is self:
                slot.transaction = None
        self._ended = True

    def _commit_or_roll_back(self, exc: BaseException | None) -> None:
        slot = self._slot
        assert slot is not None
        self._stop_watching()
        self._open = False
        expired = self._expired or monotonic() >= self._deadline
        if not self._owns_connection():
            if exc is not None and not isinstance(exc, Exception):
                return  # SystemExit, KeyboardInterrupt: not turned into an error to catch
            if self._lease is not None and self._lease._slot is slot:
                # Still leased, but the pool closed it under the block (close() past its
                # timeout), or it is the parent's (fork()): the lease refuses use, and says so.
                if isinstance(exc, LeaseReleased):
                    return  # the block's own error says it already
                raise LeaseReleased(
                    "the pool closed this connection inside its transaction block (close() "
                    "past its timeout), or it was inherited across fork(): its work was not "
                    "committed; take a new one with pool.connection()"
                ) from exc
            raise PoolError(
                "the connection went back to the pool inside its transaction block; the pool "
                "discarded it and its work was not committed"
            ) from exc
        slot.transaction = None
        if slot.busy:
            # A driver call was interrupted half-way, or is still under way (psycopg's
            # cursor.copy() block entered and not left, which holds the connection until it
            # is; a call in another thread): nothing more is sent on the connection, which the
            # lease refuses from here on and the pool discards; a block that caught the
            # interrupt and ended normally must hear that nothing was committed.
            slot.doomed = True
            if exc is None:
                if slot.busy is INTERRUPTED:
                    what = "was interrupted half-way"
                else:
                    what = "was still under way as the block ended (a copy() block not left?)"
                raise ConnectionUnusable(
                    f"a driver call inside the transaction block {what}: the transaction was "
                    "not committed, and the connection refuses further use"
                )
            return
        if exc is None and not expired and self._savepoint_failed is None:
            self._commit_unless_rolled_back(slot)
            return
        aborted_by = self._retryable_abort(slot, exc)
        self._end_quietly(slot)
        if exc is None and self._savepoint_failed is not None:
            raise self._savepoint_failed_error()
        # Only an error becomes the timeout: SystemExit or KeyboardInterrupt go on as they are,
        # or an "except Exception" would swallow them.
        timed_out = expired and (exc is None or isinstance(exc, Exception))
        if timed_out and not isinstance(exc, TransactionTimeout):
            raise self._timeout_error() from exc
        if aborted_by is not None:
            error = TransactionRolledBack(
                "a serialization failure or deadlock inside the transaction block (chained) "
                "aborted the transaction, and the database refused the block's later "
                "statements: it was rolled back and nothing was committed"
            )
            raise error from aborted_by

    def _retryable_abort(self, slot: _Slot, exc: BaseException | None) -> Exception | None:
        """The serialization failure or deadlock the block caught, when the error ending it is
        only the server refusing a later statement in the transaction that one aborted
        (PostgreSQL's "current transaction is aborted"): that refusal tells nothing of the
        cause, and run_transaction would not retry it.  No I/O."""
        failed = self._failed
        if failed is None or failed is exc or not isinstance(exc, Exception):
            return None
        dialect = slot.dialect
        if dialect.refused_as_aborted(exc) and dialect.is_retryable(failed):
            return failed
        return None

    def _commit_unless_rolled_back(self, slot: _Slot) -> None:
        if slot.doomed:
            # No call of the block's own was interrupted, but one that another thread made
            # through the lease was (a cancel()): nothing more is sent on the connection.
            self._end_quietly(slot)
            raise _doomed_before_commit()
        if slot.may_hold_part_read():
            self._finish_reading(slot)
        slot.busy = True  # psycopg's pipeline mode syncs first: a round trip (see _commit)
        try:
            rolled_back = self._rolled_back_error(slot)
        except Exception as exc:  # a dialect's look at the state failed: end it, or doom it
            slot.busy = False
            self._end_quietly(slot)
            # psycopg's pipeline mode: the sync read a statement cancelled at the deadline
            if self._expired or monotonic() >= self._deadline:
                raise self._timeout_error() from exc
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see lease._call_failed
            raise
        slot.busy = False
        if rolled_back is not None:
            self._end_quietly(slot)
            raise rolled_back from rolled_back.__cause__
        if self._savepoints_open:
            self._end_quietly(slot)
            raise TransactionRolledBack(
                "a savepoint's block inside the transaction block did not end (interrupted as "
                "it ended?), and what it was to undo may still be there: the transaction was "
                "rolled back and nothing was committed"
            )
        rollback = False
        try:
            now = monotonic()
            if now - self._commit_sized_at > _NARROW_SLACK:
                # COMMIT too may wait for a lock, and no cancel stops it: a wait as long as
                # the limit sized at BEGIN would outlast the deadline, and meet the cut-off.
                slot.busy = True  # a round trip: cut off, too, on a network gone silent
                try:
                    self._narrow_time(now)
                except Exception as exc:
                    slot.busy = False
                    if slot.doomed:  # cut off past the deadline; COMMIT was never sent
                        raise self._timeout_error() from exc
                    if slot.dialect.transaction_state(slot.raw) is BROKEN:
                        raise _lost_before_commit(exc) from exc  # found lost by this call
                    raise
                except BaseException:
                    slot.busy = INTERRUPTED
                    slot.doomed = True  # interrupted half-way: see lease._call_failed
                    raise
                slot.busy = False
            self._commit(slot)
        except CommitOutcomeUnknown:
            raise  # the connection is doomed: nothing more is sent on it
        except Exception as exc:
            # A definite failure; the server may keep the transaction open (SQLite refuses
            # COMMIT with SQLITE_BUSY and stays in it): roll it back, or the lease's next
            # commit would commit the block's work.
            rollback = slot.dialect.transaction_state(slot.raw) is not IDLE
            # Its lock wait cut short by the limit sized to the deadline (SQLite's busy
            # timeout, PostgreSQL's lock_timeout at a deferred constraint): no error of its own.
            if slot.dialect.stopped_by_limit(exc) and monotonic() >= self._deadline:
                raise self._timeout_error() from exc
            raise
        except BaseException:
            # Interrupted, maybe before COMMIT went out: the transaction may still be open, and
            # the lease's own next commit would commit it.  Nothing more is sent (see
            # _left_half_way); a COMMIT interrupted in flight doomed the connection already.
            slot.doomed = True
            raise
        finally:
            self._end_quietly(slot, rollback=rollback)

    def _finish_reading(self, slot: _Slot) -> None:
        """Before COMMIT: end what the block left being read (lease.finish_reading), which
        COMMIT would fail on or wait for.  A failure, or the deadline passed meanwhile, rolls
        the transaction back."""
        from .lease import finish_reading

        assert self._lease is not None
        try:
            finish_reading(self._lease, slot, commit=True)
        except Exception as exc:
            self._end_quietly(slot)
            if monotonic() >= self._deadline:  # cut off (sever) past it
                raise self._timeout_error() from exc
            raise
        if monotonic() >= self._deadline:
            self._end_quietly(slot)
            raise self._timeout_error()

    def _rolled_back_error(self, slot: _Slot) -> TransactionRolledBack | None:
        """Before COMMIT: the error to raise instead, chained to its cause, if the server
        already ended or aborted the transaction (COMMIT would then commit nothing, or only
        roll back, and report success).  No I/O, but for psycopg's sync in pipeline mode."""
        if self._ended_by is not None:
            error = self._ended_error()
        elif slot.dialect.transaction_aborted(slot.raw):
            error = TransactionRolledBack(
                "an error inside the transaction block aborted the transaction: it was rolled "
                "back and nothing was committed"
            )
            error.__cause__ = self._failed
        elif slot.dialect.transaction_state(slot.raw) is BROKEN:
            # Closed (conn.raw.close()) or lost before COMMIT: the server rolls back as the
            # session ends, and no COMMIT can go out, so the outcome is known.
            error = _lost_before_commit(self._failed)
        elif slot.dialect.server_session(slot.raw) != self._session:
            # The driver reconnected (PyMySQL's ping(reconnect=True)): the transaction went
            # with the old session, and COMMIT would commit what ran since, in the new one.
            error = TransactionRolledBack(
                "the connection reconnected inside the transaction block: the server rolled "
                "the transaction back as its session ended, and what ran since ran outside it"
            )
            error.__cause__ = self._failed
        else:
            return None
        return error

    def _ended_error(self) -> TransactionRolledBack:
        error = TransactionRolledBack(
            "the server rolled the transaction back at an error inside the block (chained): "
            "the block's work is gone, and nothing more runs in it"
        )
        error.__cause__ = self._ended_by
        return error

    def _commit(self, slot: _Slot) -> None:
        dialect, raw = slot.dialect, slot.raw
        if slot.doomed:  # by another thread since the block's end began (see above)
            raise _doomed_before_commit()
        slot.busy = True
        try:
            dialect.commit(raw)
        except Exception as exc:
            dialect.call_failed(raw)  # the flags of a driver that reads them from OK packets
            slot.busy = False
            if dialect.transaction_state(raw) is BROKEN or dialect.is_disconnect(exc):
                slot.doomed = True
                raise CommitOutcomeUnknown(
                    "the connection was lost while COMMIT was in flight: the transaction may "
                    "or may not have been committed; check before doing the work again"
                ) from exc
            raise  # a definite failure: rolled back, or left open and rolled back by the caller
        except BaseException:
            slot.busy = INTERRUPTED
            # Interrupted, its reply perhaps unread: nothing more is sent on it (the end of
            # the block, _end_quietly, included), see lease._call_failed
            slot.doomed = True
            raise
        slot.busy = False
        slot.dirty = False

    def _end_quietly(self, slot: _Slot, *, rollback: bool = True) -> None:
        """Roll back (unless committed) and undo the session changes made at BEGIN.  A failure
        dooms the connection instead of raising; an interrupt leaves it busy, so either way
        the pool will not reuse it."""
        if slot.doomed:
            self._ended = True  # nothing more is sent on it
            return
        dialect, raw = slot.dialect, slot.raw
        lease = self._lease
        if rollback and lease is not None and slot.may_hold_part_read():
            from .lease import finish_reading

            try:  # else ROLLBACK fails (mysqlclient) or is refused (psycopg's stream)
                finish_reading(lease, slot, commit=False)
            except Exception:
                pass  # the connection is lost, say: the rollback below fails too, and says so
        slot.busy = True
        try:
            if rollback:
                if self._expired and dialect.interrupt_lingers:
                    slot.close_cursors()  # the interrupt stays in force while one is active
                dialect.rollback(raw)
                slot.dirty = False
            if self._time_token is not _NOT_LIMITED:
                dialect.unlimit_time(raw, self._time_token)
            dialect.end(raw, self._begin_token)
        except Exception as exc:
            slot.busy = INTERRUPTED  # until logged: see lease._call_failed
            slot.doomed = True
            logger.info(
                "pool %r: ending a transaction failed, the connection will be discarded: %s",
                self._pool_name(),
                self._describe(exc),
            )
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see lease._call_failed
            raise
        slot.busy = False
        self._ended = True

    def _timeout_error(self) -> TransactionTimeout:
        return TransactionTimeout(
            f"transaction ran past its {self._quoted_timeout:g} s deadline and was rolled back"
        )

    # -- the deadline (runs in a watchdog worker thread) --------------------------------------

    def _on_deadline(self) -> float | None:
        slot = self._slot
        with self._cancel_lock:
            if not self._active or slot is None or not self._owns_connection():
                return None
            self._expired = True
            if not slot.dialect.can_cancel:
                return None  # it runs on; still running at _on_overdue, its connection is doomed
            # Nothing running: cancel what starts before the block ends.  INTERRUPTED is no
            # call either: the one interrupted has ended, and the lease refuses further calls.
            if not in_call(slot.busy):
                return _CANCEL_AGAIN
            try:
                slot.dialect.cancel(slot.raw, self._side_connect())
            except Exception as exc:
                logger.warning(
                    "pool %r: cancelling a statement past its deadline failed: %s",
                    self._pool_name(),
                    self._describe(exc),
                )
                slot.doomed = True
                try:
                    slot.dialect.close(slot.raw)  # the statement fails; the pool discards it
                except Exception:
                    pass
                return None
        return _CANCEL_AGAIN

    def _on_overdue(self) -> float | None:
        slot = self._slot
        with self._sever_lock:
            if not self._guarded or slot is None or not self._owns_connection():
                return None
            if not in_call(slot.busy):  # (INTERRUPTED: see _on_deadline)
                return _CANCEL_AGAIN  # cut off the next call that starts this late
            if slot.dialect.can_cancel:
                logger.warning(
                    "pool %r: a transaction's statement still runs %g s past its deadline: the "
                    "cancel did not stop it, closing its connection's socket",
                    self._pool_name(),
                    _SEVER_GRACE,
                )
            else:
                logger.warning(
                    "pool %r: a transaction's statement still runs %g s past its deadline, "
                    "and the %s driver cannot stop it from another thread: its connection "
                    "will be discarded once it ends",
                    self._pool_name(),
                    _SEVER_GRACE,
                    slot.dialect.name,
                )
            slot.doomed = True
            try:
                slot.dialect.sever(slot.raw)
            except Exception as exc:
                logger.info(
                    "pool %r: cutting off a connection failed: %s",
                    self._pool_name(),
                    self._describe(exc),
                )
        return None

    def _side_connect(self) -> Callable[[], Any]:
        assert self._lease is not None
        return self._lease.pool._side_connect

    def _describe(self, exc: BaseException) -> str:
        """``exc`` for a log line, the pool's known secrets and what looks like a password
        masked."""
        return describe(exc) if self._lease is None else self._lease.pool._describe(exc)

    def _pool_name(self) -> str | None:
        return None if self._lease is None else self._lease.pool.name

    # -- inside the block ---------------------------------------------------------------------

    @property
    def connection(self) -> Connection[C]:
        """The lease the transaction runs on."""
        if self._lease is None:
            raise PoolError(_NOT_STARTED)
        return self._lease

    def _begin_on_server(self) -> None:
        """The block hands out the driver's connection: see Dialect.begin_on_server."""
        slot = self._slot
        if not self._open or slot is None or not self._owns_connection():
            return
        _call_on(slot, slot.dialect.begin_on_server, slot.raw)

    @property
    def deadline(self) -> float | None:
        """The deadline, as a :func:`time.monotonic` value, or None."""
        return None if self._deadline == math.inf else self._deadline

    def _check_open(self) -> float:
        """Called before (and after) each statement of the block; returns the time now."""
        if not self._open:
            if not self._entered:  # pool.transaction().execute(...): the 'with' was left out
                raise PoolError(_NOT_STARTED)
            raise PoolError("the transaction is over: start a new one")
        now = monotonic()
        if self._expired or now >= self._deadline:
            self._expired = True
            raise self._timeout_error()
        if self._savepoint_failed is not None:
            raise self._savepoint_failed_error()
        if self._ended_by is not None:
            raise self._ended_error()
        return now

    def _before_statement(self) -> None:
        """_check_open(), just before a statement of the block runs: where the dialect narrows
        its limit on lock waits, it is sized to the time left first.  Only here: the narrowing
        is a statement too, and sent between another's execute and its fetch, it would end
        that result (pymssql cancels what is unread as a statement starts)."""
        now = self._check_open()
        if now - self._narrowed_at > self._narrow_slack and self._owns_connection():
            assert self._slot is not None
            _call_on(self._slot, self._narrow_time, now)  # a round trip, on pymssql

    def _check_deadline(self) -> None:
        """Called before each fetch of the block: past the deadline, a fetch from a server-side
        cursor is one more statement on the server (PostgreSQL's FETCH), too short for a
        cancel to catch; it raises instead, without reading on."""
        if self._expired or monotonic() >= self._deadline:
            self._expired = True
            raise self._timeout_error()

    def _narrow_time(self, now: float) -> None:
        """Size the server-side limit to the time left, so that a lock wait starting now ends
        by the deadline (no cancel ends it)."""
        slot = self._slot
        assert slot is not None
        slot.dialect.narrow_time(slot.raw, self._deadline - now)
        self._narrowed_at = now
        if slot.dialect.narrows_commit_wait:
            self._commit_sized_at = now

    def _savepoint_failed_error(self) -> ConnectionUnusable:
        # The same case as a lease whose rollback failed: the connection's state is unknown.
        assert self._savepoint_failed is not None
        step, cause = self._savepoint_failed
        error = ConnectionUnusable(
            f"{step} failed, so the transaction's state is unknown: it cannot go on, and is "
            "rolled back when its block ends"
        )
        error.__cause__, error.__suppress_context__ = cause, True  # as "raise ... from cause"
        return error

    def cursor(self, *args: Any, **kwargs: Any) -> Cursor[C]:
        """A DB-API cursor on the transaction's connection."""
        self._check_open()
        return self.connection.cursor(*args, **kwargs)

    def execute(self, sql: Any, params: Any = None) -> Cursor[C]:
        """Run one statement and return its cursor, to fetch from.  Raises at once, without
        running it, once the deadline has passed."""
        self._check_open()
        cursor = self.connection.cursor()
        if params is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, params)
        return cursor

    def savepoint(self) -> Savepoint[C]:
        """A nested unit: ``with tx.savepoint():`` rolls back to it on exception (and
        re-raises), releases it otherwise; the outer transaction stays usable either way."""
        self._check_open()
        return Savepoint(self, f"dbpool_sp_{next(self._savepoints)}")

    def __repr__(self) -> str:
        state = "open" if self._open else "not open"
        level = self._isolation.value if self._isolation else "default isolation"
        return f"<dbpool.Transaction {state}, {level}>"


def _doomed_before_commit() -> ConnectionUnusable:
    return ConnectionUnusable(
        "a driver call on the transaction's connection was interrupted half-way (in another "
        "thread), or a cancel on it failed: the transaction was not committed, and the "
        "connection refuses further use"
    )


class Savepoint(Generic[C]):
    """A savepoint inside a transaction block, made by :meth:`Transaction.savepoint`; use it
    as a context manager.  The object runs one block: make another for the next."""

    def __init__(self, tx: Transaction[C], name: str) -> None:
        self._tx = tx
        self._name = name  # generated: never caller input, and one per object
        self._entered = False  # a second block would reuse the name, shadowing the first
        self._depth = 0  # the savepoint blocks of the transaction open around this one

    def __repr__(self) -> str:
        return f"<dbpool.Savepoint {self._name} of {self._tx!r}>"

    def _slot(self) -> _Slot:
        from .lease import _doomed

        self._tx._check_open()
        slot = self._tx._slot
        if slot is None or not self._tx._owns_connection():
            raise PoolError("the transaction's connection went back to the pool")
        if slot.doomed:  # a call was interrupted half-way, say (see lease._call_failed)
            raise _doomed()
        return slot

    def __enter__(self) -> Savepoint[C]:
        slot = self._slot()
        if self._entered:
            raise PoolError(
                "this savepoint object already ran its block: take another with tx.savepoint()"
            )
        self._entered = True
        slot.busy = True
        try:
            slot.dialect.savepoint(slot.raw, self._name)
        except Exception as failed:  # the driver answered: the call is over, the state unknown
            slot.busy = False
            self._tx._savepoint_failed = "creating a savepoint", failed
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see lease._call_failed
            raise
        slot.busy = False
        self._depth = self._tx._savepoints_open
        self._tx._savepoints_open = self._depth + 1
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        tx = self._tx
        slot = tx._slot
        if not tx._open or slot is None or not tx._owns_connection():
            return  # the transaction is over: nothing to release or roll back to
        if tx._expired or monotonic() >= tx._deadline:
            # Past the deadline the block's end rolls the whole transaction back, savepoints
            # included: nothing is sent (a statement sent this late reaches the server after
            # the deadline, and meets the watchdog's cancel or cut-off).  The block's own error
            # tells it, or, as any further statement would, TransactionTimeout.
            tx._expired = True
            if exc is None:
                raise tx._timeout_error()
            return
        if tx._ended_by is not None:
            # The server ended the whole transaction (MySQL's deadlock victim), savepoints
            # included: nothing to send.  The block's own error tells it; else, as any further
            # statement would, TransactionRolledBack chained to the error that ended it.
            if exc is None:
                raise tx._ended_error()
            return
        if slot.doomed:
            # A call inside was interrupted half-way, say (see lease._call_failed): nothing more
            # is sent; the transaction's block ends without committing.
            if exc is None:
                from .lease import _doomed

                raise _doomed()
            return
        failed_late = None  # a statement of the block's, failed as its results arrived
        if exc is None:
            slot.busy = True
            try:
                slot.dialect.settle(slot.raw)
            except Exception as failed:  # the block's own error: undone as if raised in it
                exc = failed_late = failed
            except BaseException:
                slot.busy = INTERRUPTED
                slot.doomed = True  # interrupted half-way: see lease._call_failed
                raise
            slot.busy = False
        lease = tx._lease
        if lease is not None and slot.may_hold_part_read():
            # A result the block left part-read, as before COMMIT and ROLLBACK: RELEASE would
            # fail on it (mysqlclient) or be refused (psycopg's stream), and the transaction
            # with it.  Read to its end before RELEASE, closed before ROLLBACK TO.
            from .lease import finish_reading

            try:
                finish_reading(lease, slot, commit=exc is None)
            except Exception as failed:
                if exc is None:
                    tx._savepoint_failed = "releasing a savepoint", failed
                    raise
                # the connection is lost, say: the rollback below fails too, and says so
        slot.busy = True
        if exc is None:
            try:
                slot.dialect.release_savepoint(slot.raw, self._name)
            except Exception as failed:
                slot.busy = False
                tx._savepoint_failed = "releasing a savepoint", failed
                raise
            except BaseException:
                slot.busy = INTERRUPTED
                slot.doomed = True  # interrupted half-way: see lease._call_failed
                raise
            slot.busy = False
            if tx._savepoints_open == self._depth + 1:
                # Ended, with every one inside it: else one inside was left open, and this
                # RELEASE kept what that one was to undo
                tx._savepoints_open = self._depth
            return
        try:
            slot.dialect.rollback_to_savepoint(slot.raw, self._name)
            tx._failed = None  # undone: a later abort is another error's doing
            tx._savepoints_open = self._depth  # every one inside it undone too
        except Exception as undo:
            # e.g. MySQL rolled the whole transaction back on a deadlock, savepoints included:
            # the block's own exception is the one that tells what happened, and the
            # transaction may not commit what the savepoint should have undone.
            slot.busy = INTERRUPTED  # until logged: see lease._call_failed
            logger.info(
                "pool %r: rolling back to a savepoint failed: %s",
                tx._pool_name(),
                tx._describe(undo),
            )
            tx._savepoint_failed = "rolling back to a savepoint", undo
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see lease._call_failed
            raise
        slot.busy = False
        if failed_late is not None:
            raise failed_late


def _lost_before_commit(cause: BaseException | None) -> TransactionRolledBack:
    error = TransactionRolledBack(
        "the connection was closed or lost inside the transaction block, before COMMIT: the "
        "transaction was not committed"
    )
    error.__cause__ = cause
    return error


def run_transaction(
    pool: Pool[C],
    fn: Callable[[Transaction[C]], T],
    *,
    isolation: Isolation | str | None,
    readonly: bool,
    retries: int,
    timeout: float | None,
) -> T:
    """Call ``fn(tx)`` in a transaction, again on a fresh one when the database reports a
    serialization failure or deadlock, up to ``retries`` times within ``timeout`` overall."""
    # the type and the name, never the repr: a partial's arguments may hold a password
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking the transaction, got {type(fn)!r}")
    if inspect.iscoroutinefunction(fn):
        raise TypeError(_ASYNC_FN.format(fn=callable_name(fn)))
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        # Its body runs only as the generator is iterated, after the (empty) transaction has
        # committed: the work would be lost unless iterated, and fail there if it were.
        raise TypeError(_GENERATOR_FN.format(fn=callable_name(fn)))
    check_dialect_allows(pool, check_options(isolation, timeout, readonly), readonly)
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, got {retries!r}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries!r}")
    deadline = math.inf if timeout is None else monotonic() + timeout
    last: Exception | None = None  # the error the last attempt ended with
    for attempt in itertools.count():
        remaining = None if timeout is None else deadline - monotonic()
        if remaining is not None and remaining <= 0:  # (the backoff's sleep overshot)
            raise _out_of_time(timeout, last) from last
        acquire = None if remaining is None else min(remaining, pool._acquire_timeout)
        try:
            lease = pool.connection(timeout=acquire)
        except PoolTimeout as exc:
            if last is not None:
                exc.__context__ = last  # shown with it: the error this attempt was to retry
            if acquire is None or acquire >= pool._acquire_timeout:
                raise  # the pool's own limit, not run_transaction's
            raise TransactionTimeout(
                f"run_transaction used up its {timeout:g} s waiting for a connection "
                "(PoolTimeout chained)"
            ) from exc
        try:
            with lease:
                attempt_tx = Transaction(
                    lease,
                    isolation=isolation,
                    timeout=deadline_left(deadline, timeout),
                    readonly=readonly,
                )
                attempt_tx._quoted_timeout = timeout
                with attempt_tx as tx:
                    result = fn(tx)
                    if inspect.isawaitable(result):  # raised in the block: nothing is committed
                        if inspect.iscoroutine(result):
                            result.close()  # never awaited: no "never awaited" warning later
                        raise TypeError(_ASYNC_FN.format(fn=callable_name(fn)))
                    if is_own_generator(result, fn):  # (as above, behind a decorator)
                        raise TypeError(_GENERATOR_FN.format(fn=callable_name(fn)))
                    return result
        except (CommitOutcomeUnknown, TransactionTimeout):
            raise  # never retried: the work may have happened, or there is no time left
        except Exception as exc:
            dialect = pool._dialect
            if attempt >= retries or dialect is None or not _retryable(dialect, exc):
                raise
            delay = min(_RETRY_MAX_DELAY, _RETRY_FIRST_DELAY * 2.0 ** min(attempt, 30))
            # Half of it at least: the transaction that won the conflict may still be in its
            # COMMIT (a WAL flush, a synchronous standby), and a retry that starts before it
            # ends fails the same way; the default 5 retries then span 155 ms at least.
            delay *= 0.5 + random.random() / 2
            if monotonic() + delay >= deadline:
                raise _out_of_time(timeout, exc) from exc
            last = exc
            logger.info(
                "pool %r: retrying a transaction after %s (attempt %d)",
                pool.name,
                type(exc).__name__,
                attempt + 1,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


_ASYNC_FN = (
    "fn must run the transaction and return its result, but {fn} returns an awaitable "
    "(an async function?): dbpool is synchronous; use a plain function"
)
_GENERATOR_FN = (
    "fn must run the transaction and return its result, but {fn} is a generator function "
    "(it uses yield), whose body would run only as its result is iterated, after the "
    "transaction ended: return the rows (a list) instead of yielding them"
)


def _retryable(dialect: Dialect, exc: Exception) -> bool:
    """A serialization failure or deadlock, or the TransactionRolledBack of a block that
    swallowed one: the server ended or aborted the transaction for it all the same."""
    if isinstance(exc, TransactionRolledBack):
        cause = exc.__cause__
        return cause is not None and dialect.is_retryable(cause)
    return dialect.is_retryable(exc)


def _out_of_time(timeout: float | None, last: Exception | None) -> TransactionTimeout:
    after = "" if last is None else f" (the last attempt ended in {type(last).__name__}, chained)"
    return TransactionTimeout(
        f"run_transaction used up its {timeout:g} s before the transaction could run again{after}"
    )


def deadline_left(deadline: float, timeout: float | None) -> float | None:
    """Seconds left until ``deadline`` (a transaction timeout), or None without one."""
    if timeout is None:
        return None
    return max(deadline - monotonic(), 1e-3)
