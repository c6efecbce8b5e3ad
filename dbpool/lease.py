"""Leases: what ``pool.connection()`` and ``pool.connect()`` hand out.

A :class:`Connection` is a PEP 249 connection that borrows a driver connection from the pool
until it is closed.  It records what the borrower did that the pool must undo on return
(statements run since the last commit or rollback, a call interrupted half-way, cursors left
open, attributes set on the driver connection), so that the return path needs a round trip only
when there is something to roll back.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from collections.abc import Generator, Iterator
from inspect import GEN_SUSPENDED, getgeneratorstate
from time import monotonic
from types import GeneratorType
from typing import TYPE_CHECKING, Any, Callable, Generic, NoReturn, SupportsIndex
from weakref import WeakSet
from weakref import ref as _weak_ref

from ._types import C
from .errors import ConnectionUnusable, LeaseReleased, PoolError
from .isolation import Isolation
from .transaction import INTERRUPTED, Transaction

if TYPE_CHECKING:
    from .pool import Pool, _Slot

__all__ = ["Connection", "Cursor", "PoolCursor"]


# What _tracked_iteration returns: finish_reading may send it True or False.
_Tracked = Generator[Any, "bool | None", None]

# The pool's generation of a connection inherited across fork() (pool._INHERITED): no call
# may reach its driver objects, which talk to the parent's session.
_INHERITED = -2

# In a slot's record of what to restore on return, for a driver method the lease called whose
# effect cannot be undone (Dialect.irreversible_methods): the connection is discarded instead.
CANNOT_UNDO = object()
_MISSING = object()

# A lease lets go of the driver cursors dropped unclosed when it holds this many, then each
# time their number doubles (see _let_go_of_dropped_cursors).
_FIRST_CURSOR_CHECK = 64
# CPython's: other interpreters keep every cursor until the lease comes back.
_getrefcount: Callable[[Any], int] | None = getattr(sys, "getrefcount", None)


def _keep_copies(slot: _Slot, names: frozenset[str]) -> None:
    """Record copies of the driver connection's ``names`` (of the dialect's
    ``restored_attributes``) as they are now, unless recorded already, for the return path to
    put back: a borrower may change them where the return path does not look."""
    restore = slot.restore
    if restore is None:
        restore = slot.restore = {}
    raw = slot.raw
    for name in names:
        if name not in restore:
            value = getattr(raw, name, _MISSING)
            if value is not _MISSING:  # else an attribute this driver's version lacks
                restore[name] = copy.copy(value)


def _exposed(slot: _Slot) -> None:
    """The lease hands out the driver's connection, or a cursor that reaches it."""
    slot.dirty = slot.exposed = True
    if slot.dialect.restored_attributes:
        _keep_copies(slot, slot.dialect.restored_attributes)


def _let_go_of_dropped_cursors(slot: _Slot, cursors: list[Any]) -> None:
    """Drop the driver cursors in ``cursors`` (the lease's) that nobody else refers to any
    more and that the driver frees entirely as they are collected: code that never closes its
    cursors (``conn.cursor().execute(...)``) would otherwise pile them up, with their rows,
    for as long as the lease is held.  The others stay for the return path to close.  Called
    as their number doubles, so its cost per cursor stays constant."""
    if _getrefcount is not None:
        # References are counted against an object that only the list holds, counted the same
        # way: what the interpreter adds while counting is the same for all.
        cursors.append(object())
        try:
            counts = [_getrefcount(cursor) for cursor in cursors]
        finally:
            del cursors[-1]
        alone = counts.pop()
        drops_cleanly = slot.dialect.drops_cursor_cleanly
        cursors[:] = [
            cursor
            for cursor, count in zip(cursors, counts)
            if count > alone or not drops_cleanly(cursor)
        ]
    slot.cursors_checked_at = max(_FIRST_CURSOR_CHECK, 2 * len(cursors))


def _released(what: str) -> LeaseReleased:
    subject = "this connection" if what == "connection" else f"this {what}'s connection"
    return LeaseReleased(
        f"{subject} went back to the pool (or the pool closed it, or it was inherited across "
        "fork()); take a new one with pool.connection()"
    )


def _doomed() -> ConnectionUnusable:
    return ConnectionUnusable(
        "this connection's state is unknown (a call on it, or the end of a transaction block "
        "on it, was interrupted half-way, or a cancel, rollback or reset on it failed or could "
        "not finish): it refuses further use, and the pool discards it on release; take a new "
        "one with pool.connection()"
    )


def _warn_unreleased(message: str) -> None:
    """From a finaliser that gave the pool back an unreleased connection."""
    warnings.warn(message, ResourceWarning, stacklevel=3)


def _not_copyable(what: str) -> TypeError:
    return TypeError(
        f"a dbpool.{what} cannot be copied or pickled: it stands for one lease of one driver "
        "connection; take another with pool.connection()"
    )


def _refusal(slot: _Slot | None, what: str) -> Exception:
    """Why a lease (``what``: "connection" or "cursor") whose slot failed the check
    ``slot is None or slot.generation < 0 or slot.doomed`` refuses to run."""
    if slot is None or slot.generation < 0:
        return _released(what)
    return _doomed()


def _ends_the_block(verb: str) -> PoolError:
    return PoolError(
        f"{verb}() inside a transaction block would end the block's transaction: leave the "
        "block to commit it, raise to roll it back, or use tx.savepoint() to undo a part"
    )


def _commits_first() -> PoolError:
    return PoolError(
        "executescript() commits the open transaction before it runs the script (sqlite3): "
        "inside a transaction block, run the statements one by one with execute()"
    )


def _call_failed(slot: _Slot, exc: Exception) -> None:
    """A driver call on ``slot``'s connection raised ``exc``; called before ``slot.busy`` is
    cleared.  Its entry is where CPython runs the handler of a signal that came during the
    call, if the call failed (Ctrl-C in SQLite's lock wait, which ends in "database is
    locked").  So it is called inside the call's own ``try``, where an interrupt in here is
    handled as one in the call (the lease refuses further use; the pool discards the
    connection): left True, ``busy`` would say a thread is still inside the call, and the
    close of a sqlite3 or pymssql connection would wait for it (see Pool._close_raw).  Only
    this error path pays for it.

    A call interrupted half-way (KeyboardInterrupt, a signal handler's exception) dooms the
    slot instead, in an ``except BaseException`` of its own: the driver may have sent the
    statement and left its reply unread, and the next call would read that reply as its own
    (PyMySQL's does: a query returns the rows of the one before), so the lease refuses further
    use, however the caller handled the interrupt.  No cost to a call that succeeds."""
    slot.dirty = True  # what the call left open is unknown: the return path must look
    slot.dialect.call_failed(slot.raw)  # where the driver's flags are now stale (PyMySQL)
    if slot.dialect.is_disconnect(exc):
        # Lost, though the driver's state says nothing (a SQLite file replaced under it): past
        # its lifetime, the return path discards it at no cost to the returns of the others.
        slot.lost = True
        slot.expires_at = -math.inf
    tx = slot.transaction
    if tx is not None:  # checked before each statement and before COMMIT
        if tx._failed is None:
            tx._failed = exc
        if tx._ended_by is None and slot.dialect.ended_transaction(slot.raw, exc):
            tx._ended_by = exc


class _LeaseFields(Generic[C]):
    """A lease's fields, with no ``__setattr__`` of its own: lease() sets them with plain
    stores, then makes the object a :class:`Connection` (same layout, no slots added)."""

    __slots__ = ("_pool", "_slot", "_claim", "_streams", "_cut_short", "__weakref__")

    _pool: Pool[C]
    _slot: _Slot | None
    # The iterators of the lease's cursor.stream() calls, for finish_reading; unset (at no
    # cost to a checkout) until the lease makes one.
    _streams: WeakSet[_Tracked]
    # The driver cursors whose result finish_reading ended, each with whether it was for
    # COMMIT, for a read on to say so; unset until it ends one.
    _cut_short: list[tuple[Any, bool]]
    # Holds the slot while this lease may return it: the first to pop it returns it, and
    # list.pop is atomic, so of two threads closing one lease only one gives the slot back,
    # and a released lease can never return the connection of a later one.
    _claim: list[_Slot]


class Connection(_LeaseFields[C]):
    """A leased DB-API connection.  ``close()`` (or leaving ``with``) returns it to the pool.

    A transaction still open on return is rolled back, never committed.  Attributes and methods
    the lease does not define are those of the driver's connection, :attr:`raw`; attributes set
    through the lease are restored to their previous value on return (one the driver's connection
    lacks raises :exc:`AttributeError`: set it on :attr:`raw`).
    """

    __slots__ = ()  # none added: lease() turns a _LeaseFields into one (see there)

    def __init__(self) -> None:
        raise TypeError("a dbpool.Connection is not made directly: use pool.connection()")

    # -- the lease itself ---------------------------------------------------------------------

    @property
    def raw(self) -> C:
        """The driver's connection.  Statements run on it directly are assumed to leave a
        transaction open, so the pool rolls back on return when it cannot read the state."""
        slot = self._live("connection")
        _exposed(slot)
        if slot.transaction is not None:
            slot.transaction._begin_on_server()
        return slot.raw  # type: ignore[no-any-return]

    @property
    def pool(self) -> Pool[C]:
        """The pool this connection was leased from."""
        return self._pool

    @property
    def released(self) -> bool:
        """Whether the lease is over: it went back to the pool, or the pool closed its
        connection (``close()`` past its timeout), or it was inherited across ``fork()``.
        A lease that is over refuses use: take a new one."""
        # Its slot goes first (close()): a lease can refuse use a little sooner
        slot = self._slot
        return not self._claim or (slot is not None and slot.generation < 0)

    def close(self) -> None:
        """Return the connection to the pool.  Calling it again does nothing."""
        # The lease refuses use from here on; the pool takes the connection out of its claim
        # (of two threads closing it at once, one finds it there).  A signal handler raising
        # in between (CPython runs one as a call to a C function returns, or as a function is
        # entered) leaves the claim to a later close() or the finaliser.
        _set_slot(self, None)
        self._pool._give_back(self._claim)

    def __enter__(self) -> Connection[C]:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        # close(), written out: every lease ends here, and a call more costs ~5 % of a checkout
        _set_slot(self, None)
        self._pool._give_back(self._claim)

    def _live(self, what: str) -> _Slot:
        slot = self._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, what)
        slot.used = True  # whatever the caller does next, the return path must look
        return slot

    def transaction(
        self,
        *,
        isolation: Isolation | str | None = None,
        timeout: float | None = None,
        readonly: bool = False,
    ) -> Transaction[C]:
        """A transaction on this connection: ``with conn.transaction(isolation=...) as tx:``.

        See :meth:`Pool.transaction`; the lease stays with the caller afterwards.
        """
        return Transaction(self, isolation=isolation, timeout=timeout, readonly=readonly)

    # -- PEP 249 ------------------------------------------------------------------------------

    # The statement paths check the lease as _live() does, written out: one call fewer each.

    def cursor(self, *args: Any, **kwargs: Any) -> Cursor[C]:
        slot = self._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "connection")
        slot.used = True
        raw = slot.raw.cursor(*args, **kwargs)
        # The slot keeps the driver's cursor, never the wrapper: the wrapper refers to this
        # lease, which must stay collectable so a dropped lease finds its way back.
        cursors = slot.cursors
        if cursors is None:
            slot.cursors = [raw]
        else:
            cursors.append(raw)
            if len(cursors) >= slot.cursors_checked_at:
                _let_go_of_dropped_cursors(slot, cursors)
        # Plain stores, then the class swap, as in lease()
        fields: _CursorFields[C] = _new(_CursorFields)
        fields._lease = self
        fields._raw = raw
        fields._open = True
        fields.__class__ = Cursor
        return fields  # type: ignore[return-value]  # a Cursor now

    def commit(self) -> None:
        slot = self._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "connection")
        tx = slot.transaction
        if tx is not None:
            tx._check_open()  # past its deadline: TransactionTimeout, as for a statement
            raise _ends_the_block("commit")
        # Results still being read end first (a lease with either has been used already).  A
        # stream has its cursor there too, unless the borrower closed the cursor under it,
        # which leaves the stream suspended, holding the connection (psycopg's lock)
        # (slot.may_hold_part_read(), written out: a call fewer on every commit)
        if (slot.cursors or slot.tracks_reads) and slot.dialect.part_read_results:
            finish_reading(self, slot, commit=True)
        slot.used = slot.busy = True
        try:
            try:
                slot.raw.commit()
            except Exception as exc:
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED  # no thread is inside the call any more
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        slot.dirty = False

    def rollback(self) -> None:
        slot = self._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "connection")
        tx = slot.transaction
        if tx is not None:
            tx._check_open()
            raise _ends_the_block("rollback")
        if (slot.cursors or slot.tracks_reads) and slot.dialect.part_read_results:
            try:  # (as in commit())
                finish_reading(self, slot, commit=False)
            except Exception:
                pass  # the connection is lost, say: the rollback below fails too, and says so
        slot.used = slot.busy = True
        try:
            try:
                slot.raw.rollback()
            except Exception as exc:
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        slot.dirty = False

    # -- pass-through to the driver's connection ---------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name in _LeaseFields.__slots__:  # not yet set: __init__ did not finish
            raise AttributeError(name)
        slot = self._slot
        if slot is None or slot.generation < 0:
            raise _released("connection")
        slot.used = True  # what it returns may reach the connection: the return path must look
        value = getattr(slot.raw, name)
        if isinstance(value, type):
            # PEP 249's conn.Error and the other exception classes: no call on the connection,
            # and looked up in ``except conn.Error:`` after a call interrupted half-way doomed
            # the lease, where refusing would put ConnectionUnusable in the interrupt's place.
            return value
        if callable(value):  # a driver method may run a statement the lease cannot see
            if slot.doomed:
                raise _doomed()  # reading an attribute (conn.closed, say) is still allowed
            slot.dirty = True
            if name in slot.dialect.exposing_methods:
                slot.exposed = True
            if name in slot.dialect.irreversible_methods:
                if slot.restore is None:
                    slot.restore = {}
                slot.restore[name] = CANNOT_UNDO
            # The driver's statement methods (sqlite3's and psycopg's conn.execute, PyMySQL's
            # conn.query...) are watched as cursor.execute is: a failure marks what the driver
            # caches as stale, and inside a block the deadline can cancel them.
            if slot.transaction is not None and name in _ENDS_TRANSACTION:
                raise _ends_the_block(name)  # begin(), autocommit(True): MySQL commits first
            kind = _CONNECTION_STATEMENTS.get(name)
            if kind is not None:
                if name == "executescript" and slot.transaction is not None:
                    raise _commits_first()
                return _tracked_call(self, value, "connection", kind is _STATEMENT, kind is _HANDLE)
            if getattr(value, "__self__", None) is slot.raw:
                if name in slot.dialect.connection_arguments:
                    value = _passing_driver_connections(value)
                # Its other methods may talk to the server too (PyMySQL's ping(), select_db(),
                # autocommit()): watched, so that one interrupted half-way dooms the connection
                return _watched_method(self, value)
        elif name in slot.dialect.restored_attributes:  # conn.decoders[...] = ... changes it
            _keep_copies(slot, frozenset((name,)))
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        slot = self._live("connection")
        if slot.transaction is not None and name in _ENDS_TRANSACTION:
            raise PoolError(  # sqlite3 commits on autocommit = True or isolation_level = None
                f"setting {name} inside a transaction block could end the block's transaction: "
                "set it before the block, or on a lease outside one"
            )
        raw = slot.raw
        if slot.restore is None:
            slot.restore = {}
        if name not in slot.restore:
            previous = getattr(raw, name, _MISSING)
            if previous is _MISSING:
                # Nothing to restore it to; and a misspelt setting (conn.autocomit = True) that
                # the driver would take silently fails here, where the message says so.
                driver = type(raw)
                raise AttributeError(
                    f"{driver.__module__}.{driver.__qualname__} has no attribute {name!r}: a "
                    "lease sets only the driver connection's own attributes, restored on "
                    "return; check the name, or set it on conn.raw (it then stays with the "
                    "connection)"
                )
            slot.restore[name] = previous
        setattr(raw, name, value)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        # Else copy.copy() fails on the copy's unset slots (AttributeError: _slot), and
        # pickle and deepcopy on whatever of the pool they meet first.
        raise _not_copyable("Connection")

    def __repr__(self) -> str:
        slot = self._slot
        if slot is None:
            return f"<dbpool.Connection released, pool {self._pool.name!r}>"
        driver = type(slot.raw)
        return (
            f"<dbpool.Connection leased from pool {self._pool.name!r}: "
            f"{driver.__module__}.{driver.__qualname__}>"
        )

    def __del__(self) -> None:
        try:
            claim = self._claim
        except AttributeError:  # never set up
            return
        if not claim:  # released, or never armed; nothing else can reach this lease now
            return
        if claim[0].generation < 0:  # the pool closed it, or it is the parent's: not leaked
            return
        # Queued for the maintenance thread to return, with no call before (see close()), and
        # before the warning, which may raise (-W error).
        slot = claim[0]
        del claim[0]
        self._pool._orphans.append(slot)
        _warn_unreleased(
            f"a connection leased from pool {self._pool.name!r} was garbage-collected without "
            "being released; use 'with pool.connection() as conn' or call conn.close()",
        )


class _CursorFields(Generic[C]):
    """A cursor's fields, with no ``__setattr__`` of its own: set with plain stores, then the
    object made a :class:`Cursor` (see lease())."""

    __slots__ = ("_lease", "_raw", "_open")

    _lease: Connection[C]
    _raw: Any
    _open: bool


class Cursor(_CursorFields[C]):
    """A driver cursor that refuses to run once its lease has gone back to the pool."""

    __slots__ = ()  # none added: made from a _CursorFields (see Connection.cursor)

    def __init__(self) -> None:
        raise TypeError("a dbpool.Cursor is not made directly: use conn.cursor()")

    @property
    def raw(self) -> Any:
        """The driver's cursor.  Statements run on it directly are assumed to leave a
        transaction open, as with :attr:`Connection.raw`."""
        slot = self._slot()
        _exposed(slot)
        if slot.transaction is not None:
            slot.transaction._begin_on_server()  # its connection is within reach
        return self._raw

    def _slot(self) -> _Slot:
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        return slot

    # The statement and fetch paths check the lease as _slot() does, written out.

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        if slot.transaction is not None:
            slot.transaction._before_statement()  # past its deadline: raise without running it
        if slot.tracks_reads:  # a stream left part-read may hold the connection
            _check_not_reading(self._lease, slot)
        raw = self._raw
        slot.dirty = slot.busy = True
        try:
            try:
                result = raw.execute(*args, **kwargs)
            except Exception as exc:
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        if slot.transaction is not None:
            # Ended past the deadline, though cancelled: a server may let it finish (MySQL's
            # SLEEP() returns 1 when interrupted), and its result must not reach the block.
            slot.transaction._check_open()
        return self if result is raw else result

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        if slot.transaction is not None:
            slot.transaction._before_statement()  # past its deadline: raise without running it
        if slot.tracks_reads:  # a stream left part-read may hold the connection
            _check_not_reading(self._lease, slot)
        raw = self._raw
        slot.dirty = slot.busy = True
        try:
            try:
                result = raw.executemany(*args, **kwargs)
            except Exception as exc:
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        if slot.transaction is not None:
            # Ended past the deadline, though cancelled: a server may let it finish (MySQL's
            # SLEEP() returns 1 when interrupted), and its result must not reach the block.
            slot.transaction._check_open()
        return self if result is raw else result

    def fetchone(self) -> Any:
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        tx = slot.transaction
        if tx is not None and (tx._expired or monotonic() >= tx._deadline):
            tx._check_deadline()  # past the block's deadline: raise without reading on
        slot.busy = True
        try:
            try:
                row = self._raw.fetchone()
            except Exception as exc:
                _check_not_cut_short(self._lease, self._raw, exc)  # "cursor closed" (mysqlclient)
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        if row is None and slot.tracks_reads:  # the result's end, or one cut short?
            _check_not_cut_short(self._lease, self._raw)
        return row

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        tx = slot.transaction
        if tx is not None and (tx._expired or monotonic() >= tx._deadline):
            tx._check_deadline()  # past the block's deadline: raise without reading on
        slot.busy = True
        try:
            try:
                rows = self._raw.fetchmany(*args, **kwargs)
            except Exception as exc:
                _check_not_cut_short(self._lease, self._raw, exc)  # "cursor closed" (mysqlclient)
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        if not rows and slot.tracks_reads:  # the result's end, or one cut short?
            _check_not_cut_short(self._lease, self._raw)
        return rows

    def fetchall(self) -> Any:
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        tx = slot.transaction
        if tx is not None and (tx._expired or monotonic() >= tx._deadline):
            tx._check_deadline()  # past the block's deadline: raise without reading on
        slot.busy = True
        try:
            try:
                rows = self._raw.fetchall()
            except Exception as exc:
                _check_not_cut_short(self._lease, self._raw, exc)  # "cursor closed" (mysqlclient)
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        if not rows and slot.tracks_reads:  # the result's end, or one cut short?
            _check_not_cut_short(self._lease, self._raw)
        return rows

    def __next__(self) -> Any:
        # Every driver's cursor is its own iterator (``first = next(cur, None)``); read as
        # fetchone() reads.
        slot = self._lease._slot
        if slot is None or slot.generation < 0 or slot.doomed:
            raise _refusal(slot, "cursor")
        tx = slot.transaction
        if tx is not None and (tx._expired or monotonic() >= tx._deadline):
            tx._check_deadline()  # past the block's deadline: raise without reading on
        slot.busy = True
        try:
            try:
                row = next(self._raw)
            except StopIteration:
                if slot.tracks_reads:
                    _check_not_cut_short(self._lease, self._raw)
                raise
            except Exception as exc:
                _check_not_cut_short(self._lease, self._raw, exc)
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:  # StopIteration included
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        return row

    def __iter__(self) -> Iterator[Any]:
        slot = self._slot()
        raw = self._raw
        dialect = slot.dialect
        # Outside a block only for a driver whose cached flags a failed fetch leaves stale
        # (PyMySQL), or whose iteration ends quietly where finish_reading cut it short
        # (mysqlclient before 2.3): a sqlite3 cursor would iterate ~50% slower for nothing.
        # (mysqlclient 2.3's SSCursor, ~25% slower, would say why finish_reading cut it short:
        # it says "cursor closed" as it is.)
        watched = (
            slot.transaction is not None or dialect.flags_go_stale or dialect.quiet_when_cut_short
        )
        if not watched or not dialect.fetches_as_it_goes(raw):
            return iter(raw)
        # A cursor that fetches as it goes: each step is watched, as fetchone() is.
        return _tracked_iteration(self._lease, iter(raw), raw)

    def close(self) -> None:
        if self._open:
            _set_cursor_open(self, False)
            slot = self._lease._slot
            if slot is None or slot.generation < 0:
                # The connection went back (its cursors were closed there), the pool closed
                # it, or it was inherited across fork(): closing the driver's cursor would
                # talk to a session that is not this lease's (a named cursor's CLOSE).
                return
            _close_cursor(slot, self._raw)

    def __enter__(self) -> Cursor[C]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name in _CursorFields.__slots__:
            raise AttributeError(name)
        slot = self._slot()
        value = getattr(self._raw, name)
        if value is slot.raw:  # cursor.connection: the driver's connection, as conn.raw is
            _exposed(slot)
            if slot.transaction is not None:
                slot.transaction._begin_on_server()
            return value
        if callable(value):  # callproc, nextset, scroll...: may run a statement
            slot.dirty = True
            kind = _CURSOR_STATEMENTS.get(name)
            if name == "executescript" and slot.transaction is not None:
                raise _commits_first()
            if kind is not None:  # watched as execute() is, inside a block or not
                if kind is _STREAM:
                    return _tracked_stream(self._lease, value, self._raw)
                if kind is _BLOCK:
                    return _tracked_block(self._lease, value)
                return _tracked_call(
                    self._lease, value, "cursor", kind is _STATEMENT, raw=self._raw
                )
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self._slot()
        setattr(self._raw, name, value)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise _not_copyable(type(self).__name__)  # as for Connection

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<dbpool.Cursor {state} on {self._lease!r}>"


# -- driver methods reached through the pass-through, watched as execute() is -------------------

_STATEMENT = "statement"  # runs a statement: the deadline is checked before and after
_FETCH = "fetch"  # reads what a statement returned: marked busy only, as fetchone() is
_STREAM = "stream"  # returns an iterator that fetches as it goes (psycopg's cursor.stream())
_BLOCK = "block"  # returns a context manager busy for its whole block (psycopg's cursor.copy())
_HANDLE = "handle"  # returns an object that holds the connection until closed: closed on return

#: The driver connections' methods that reach the server (sqlite3, psycopg, PyMySQL,
#: mysqlclient), other than those Connection defines.
_CONNECTION_STATEMENTS = {
    "execute": _STATEMENT,
    "executemany": _STATEMENT,
    "executescript": _STATEMENT,  # sqlite3
    "query": _STATEMENT,  # PyMySQL, mysqlclient
    "next_result": _FETCH,  # PyMySQL, mysqlclient: the next result set of a multi-statement
    # sqlite3: a Blob, which holds a lock on the file, and reads and writes the row, until
    # closed; iterdump()'s generator, whose statement holds a lock until it is done or closed.
    "blobopen": _HANDLE,
    "iterdump": _HANDLE,
    # psycopg: a generator that holds the connection's lock (not reentrant) while suspended:
    # every later call on the connection, the return path's and the next borrower's, waits.
    "notifies": _HANDLE,
}
#: The driver connections' methods and attributes that end a transaction (MySQL's BEGIN and SET
#: autocommit = 1 commit first; so do sqlite3's autocommit = True and isolation_level = None;
#: psycopg's set_autocommit() and psycopg2's set_session(autocommit=True) before the block's
#: first statement leave it with none; psycopg2's set_isolation_level() and set_client_encoding()
#: roll back first, and so do psycopg2's reset(), which also puts the session's settings back to
#: the server's defaults, and mysqlclient's change_user(), which leaves the session in the
#: server's autocommit).
_ENDS_TRANSACTION = frozenset(
    {
        "begin",
        "autocommit",
        "isolation_level",
        "set_autocommit",
        "set_session",
        "set_isolation_level",
        "set_client_encoding",
        "reset",
        "change_user",
    }
)
#: The driver cursors' methods that reach the server, other than those Cursor defines.
_CURSOR_STATEMENTS = {
    "callproc": _STATEMENT,
    "executescript": _STATEMENT,  # sqlite3
    "copy_expert": _STATEMENT,  # psycopg2
    "copy_from": _STATEMENT,
    "copy_to": _STATEMENT,
    "nextset": _FETCH,
    "scroll": _FETCH,  # a server-side cursor's MOVE
    "stream": _STREAM,  # psycopg
    "fetchall_unbuffered": _STREAM,  # PyMySQL's SSCursor
    "copy": _BLOCK,  # psycopg
}


def _live_slot(lease: Connection[Any], what: str) -> _Slot:
    slot = lease._slot
    if slot is None or slot.generation < 0 or slot.doomed:
        raise _refusal(slot, what)
    return slot


def _close_cursor(slot: _Slot, raw: Any) -> None:
    """Close ``raw``, a driver cursor of the lease that holds ``slot``."""
    # Closing may wait for the server (psycopg's named cursor sends CLOSE, PyMySQL's SSCursor
    # reads the rest of its rows): busy meanwhile, so that inside a block the deadline
    # cancels or cuts it off as it does a fetch.  _marked_call(slot, raw.close), written out
    # (change both): every cursor a borrower closes comes here, and the call cost a third of
    # the wrapper's close.
    busy = slot.busy
    mark = object()
    if busy is False or busy is INTERRUPTED:
        slot.busy = mark
    try:
        try:
            raw.close()
        except Exception as exc:
            _call_failed(slot, exc)  # an interrupt in here is one in the call
            raise
    except Exception:
        if slot.busy is mark:
            slot.busy = busy
        raise
    except BaseException:
        if slot.busy is mark:
            slot.busy = INTERRUPTED
        slot.doomed = True  # interrupted half-way: see _call_failed
        raise
    if slot.busy is mark:
        slot.busy = busy
    cursors = slot.cursors
    if cursors:  # the return path need not close it again
        try:
            cursors.remove(raw)
        except ValueError:
            pass


def finish_reading(lease: Connection[Any], slot: _Slot, *, commit: bool) -> None:
    """Before COMMIT (``commit``) or ROLLBACK on ``lease``'s connection: close the lease's
    cursors whose result the server is still sending (Dialect.holds_unread_rows, and
    Dialect.result_sets_follow: result sets of further statements), their driver reading the
    rest of it (the MySQL drivers have no other way), and end the lease's streams left
    part-read (psycopg's cursor.stream(), which holds the connection until it
    ends: COMMIT would wait for it forever).  Before COMMIT a stream is read to its end, as
    those cursors are, for its cancel would abort the transaction; before ROLLBACK it is
    closed, and its statement cancelled.  A cursor or stream read on afterwards finds its
    result ended, and raises PoolError on the lease's read paths, which say so: a loop that
    commits every so many rows as it reads would otherwise end as if the result were read.
    A stream not yet begun holds nothing, and is left to run its statement when first read.
    Called only where the dialect says a result can be left part-read
    (Dialect.part_read_results)."""
    cursors = slot.cursors
    dialect = slot.dialect
    if cursors and dialect.unbuffered_cursors:
        maybe = dialect.may_hold_unread_result
        unread = [cursor for cursor in cursors if maybe(cursor)]
        if unread:
            _end_unread_results(lease, slot, unread, commit)
    # Unset until the lease makes a stream: looked up only once it has (an unset attribute
    # raises AttributeError, which would cost every commit with a cursor open ~1 us)
    streams = getattr(lease, "_streams", None) if slot.tracks_reads else None
    if streams:
        for stream in list(streams):
            if getgeneratorstate(stream) == GEN_SUSPENDED:  # part-read (see _tracked_iteration)
                # Ended once and for all: a later COMMIT must not resume it where it waits
                # to say so
                streams.discard(stream)
                stream.send(commit)


def _end_unread_results(
    lease: Connection[Any], slot: _Slot, unread: list[Any], commit: bool
) -> None:
    """Close those of ``unread``, driver cursors of ``lease`` that may hold a result, whose
    result the server is still sending (see finish_reading).  Those with rows to come first:
    the server sends one statement's results at a time, and such a cursor ran the latest, so
    a look at another's further result sets before it is closed would ask for them out of
    turn (mysqlclient's nextset() reads the connection's next result, whoever's it is, and
    fails with "Commands out of sync" while rows are still to come)."""
    dialect = slot.dialect
    for look in (dialect.holds_unread_rows, dialect.result_sets_follow):
        for raw in list(unread):
            # The look may read from the server: marked as any call is, for the deadline to
            # cut it off, and so that an interrupt or a lost connection during it is recorded
            if _marked_call(slot, look, raw):
                _cut_short_by(lease, slot, raw, commit)
                _close_cursor(slot, raw)
                unread.remove(raw)


def _check_not_reading(lease: Connection[Any], slot: _Slot) -> None:
    """Before a statement through ``lease``, whose slot ``tracks_reads``: raise the driver's
    error (Dialect.check_not_reading) if a stream of the lease is suspended part-read, holding
    the connection (psycopg's lock, not reentrant): the statement would wait for it forever.
    Not for a stream read to its end, nor while another thread's call alone holds the
    connection: the statement waits for that call, as it would on the driver's connection."""
    streams = getattr(lease, "_streams", None)  # unset: only a result cut short
    if streams:
        for stream in list(streams):
            if getgeneratorstate(stream) == GEN_SUSPENDED:
                slot.dialect.check_not_reading(slot.raw)
                return


def _cut_short_by(lease: Connection[Any], slot: _Slot, raw: Any, commit: bool) -> None:
    """Record that finish_reading ends the result of ``raw``, a driver cursor of ``lease``,
    before COMMIT (``commit``) or ROLLBACK."""
    try:
        cut = lease._cut_short
    except AttributeError:  # the first
        cut = []
        _set_cut_short(lease, cut)
        slot.tracks_reads = True
    cut.append((raw, commit))


def _check_not_cut_short(
    lease: Connection[Any], raw: Any, cause: BaseException | None = None
) -> None:
    """At what looks like the end of ``raw``'s result (no more rows, or the driver's "cursor
    closed", ``cause``): raise if finish_reading cut it short instead."""
    cut = getattr(lease, "_cut_short", None)  # unset: it cut none short
    if cut:
        for cursor, commit in cut:
            if cursor is raw:
                raise _cut_short(commit) from cause


def _cut_short(commit: bool) -> PoolError:
    if commit:
        how = (
            "COMMIT (or a savepoint's RELEASE): the lease read the rest of its rows and "
            "dropped them first"
        )
    else:
        how = (
            "ROLLBACK (or a rollback to a savepoint): the lease closed it first, dropping the "
            "rest of its rows"
        )
    return PoolError(
        f"this result was cut short by {how} (a connection takes no other command while a "
        "result is still being read from it): read a result to its end before conn.commit(), "
        "conn.rollback() or the end of its transaction block or savepoint, or read it with a "
        "buffered cursor, or on a connection of its own"
    )


def _tracked_call(
    lease: Connection[Any],
    method: Callable[..., Any],
    what: str,
    statement: bool,
    handle: bool = False,
    raw: Any = None,
) -> Callable[..., Any]:
    """``method`` of the driver, run as Cursor.execute runs a statement (``statement``) or as
    Cursor.fetchone reads one: busy while it runs, so the watchdog can cancel it.  What a
    ``handle`` method returns is closed as the lease comes back.  ``raw``: the driver cursor
    of a read (nextset()), whose end is checked as Cursor.fetchone checks it."""

    def call(*args: Any, **kwargs: Any) -> Any:
        slot = _live_slot(lease, what)
        tx = slot.transaction
        if tx is not None:  # past its deadline: raise without running it
            if statement:
                tx._before_statement()
            else:
                tx._check_deadline()  # as in Cursor.fetchone()
        if slot.tracks_reads:  # a stream left part-read may hold the connection
            _check_not_reading(lease, slot)
        slot.dirty = slot.busy = True
        try:
            try:
                result = method(*args, **kwargs)
            except Exception as exc:
                if raw is not None and not statement:
                    _check_not_cut_short(lease, raw, exc)  # "cursor closed"
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        slot.busy = False
        if not result and raw is not None and not statement and slot.tracks_reads:
            _check_not_cut_short(lease, raw)  # no more sets, or cut short?
        if handle or (what == "connection" and callable(getattr(result, "fetchone", None))):
            # A driver cursor (sqlite3's and psycopg's conn.execute()) or a handle: closed on
            # return, as the lease's own cursors are, so that what a lease left open holds no
            # lock once the lease is back, nor reaches the connection from the borrower's
            # hands (a driver cursor's execute() runs in whatever session its connection has
            # next).  Weakly, in a list (a WeakSet costs ~3 us a lease), rid of the dead as
            # their number doubles (as _let_go_of_dropped_cursors runs): a lease may run
            # millions of them.
            try:
                held = _weak_ref(result)
            except TypeError:  # not weakly referable
                pass
            else:
                loose = slot.loose_cursors
                if loose is None:
                    slot.loose_cursors = [held]
                else:
                    loose.append(held)
                    if len(loose) >= slot.loose_checked_at:
                        loose[:] = [one for one in loose if one() is not None]
                        slot.loose_checked_at = max(_FIRST_CURSOR_CHECK, 2 * len(loose))
        if statement and tx is not None and slot.transaction is tx:
            tx._check_open()  # ended past the deadline, though cancelled (see execute())
        return result

    return call


def _watched_method(lease: Connection[Any], method: Callable[..., Any]) -> Callable[..., Any]:
    """A method of the driver's connection that runs no statement of the borrower's, busy while
    it runs (as Cursor.fetchone is) and dooming the connection if interrupted half-way: one
    that talks to the server may leave its reply unread (see _call_failed)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return _marked_call(_live_slot(lease, "connection"), method, *args, **kwargs)

    return call


def _marked_call(slot: _Slot, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)``, a driver call that may run in another thread than the
    lease's statements (psycopg's cancel() is made for that; a cursor's close), with ``busy``
    marked meanwhile, and the connection doomed if it is interrupted half-way.

    Another thread may be inside a call on the connection: ``busy`` is then that call's, which
    clears it as it ends, maybe before this one ends (a cancelled statement does), and this one
    must not set it again (the connection would go back as if still in a call, and be
    discarded).  Or this one runs in another thread while nothing runs, and the lease's
    statement starts before it ends: ``busy`` is then the statement's, and putting back the
    "no call" found at the start would leave the statement unmarked (given back, its
    connection would go to the next borrower under it; the watchdog would not cancel it; a
    sqlite3 connection would be closed under it).  So this call marks ``busy`` with an object
    of its own, and puts it back only where its mark is still there (no call between the check
    and the write: on CPython 3.11 and later, no thread switch comes between them).  Otherwise
    it stays as it was: a call interrupted earlier leaves it set, for the pool to discard the
    connection.  _close_cursor has this body written out: change both."""
    busy = slot.busy
    mark = object()
    if busy is False or busy is INTERRUPTED:  # not in_call(busy), written out: cursors close here
        slot.busy = mark
    try:
        try:
            result = method(*args, **kwargs)
        except Exception as exc:
            _call_failed(slot, exc)  # an interrupt in here is one in the call
            raise
    except Exception:
        if slot.busy is mark:
            slot.busy = busy
        raise
    except BaseException:
        if slot.busy is mark:
            slot.busy = INTERRUPTED
        slot.doomed = True  # interrupted half-way: see _call_failed
        raise
    if slot.busy is mark:
        slot.busy = busy
    return result


def _passing_driver_connections(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, called with each lease among its arguments replaced by the lease's driver
    connection (handed out, as ``raw`` hands it out)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(arg.raw if isinstance(arg, Connection) else arg for arg in args)
        for key, arg in kwargs.items():
            if isinstance(arg, Connection):
                kwargs[key] = arg.raw
        return method(*args, **kwargs)

    return call


def _tracked_iteration(
    lease: Connection[Any], iterator: Iterator[Any], raw: Any = None
) -> _Tracked:
    """``iterator``'s items, the lease's connection marked busy while each is fetched, and
    while the iterator is closed early (psycopg then cancels and drains the rest).  ``raw``:
    the driver cursor it reads, whose end is checked as Cursor.fetchone checks it.

    finish_reading ends a stream part-read by sending, at its ``yield``, True (before COMMIT:
    the rest is read and dropped) or False (before ROLLBACK: closed); the step after raises
    PoolError, which says so, where the loop reading it would otherwise end as if the result
    were read.  Not when COMMIT's read found the result's end at once (its last row was
    read, and only the end was still to come): the step after ends the iteration."""
    ended: bool | None = None  # what finish_reading sent
    dropped = False  # a row read and dropped since
    try:
        # Its first step sends the statement: not while another stream of the lease holds the
        # connection (this one, running, is not suspended)
        first = _live_slot(lease, "cursor")
        if first.tracks_reads:
            _check_not_reading(lease, first)
        while True:
            slot = lease._slot  # checked as _live_slot() does, written out: one call fewer a row
            if slot is None or slot.generation < 0 or slot.doomed:
                raise _refusal(slot, "cursor")
            tx = slot.transaction
            if tx is not None and (tx._expired or monotonic() >= tx._deadline):
                tx._check_deadline()  # as in Cursor.fetchone()
            slot.busy = True
            try:
                try:
                    item = next(iterator)
                except StopIteration:
                    raise
                except Exception as exc:
                    if raw is not None:
                        _check_not_cut_short(lease, raw, exc)  # "cursor closed" (mysqlclient)
                    _call_failed(slot, exc)  # an interrupt in here is one in the call
                    raise
            except StopIteration:
                slot.busy = False
                if ended is not None:
                    break  # read to its end for COMMIT
                if raw is not None and slot.tracks_reads:
                    _check_not_cut_short(lease, raw)
                return
            except Exception:
                slot.busy = False
                raise
            except BaseException:
                slot.busy = INTERRUPTED
                slot.doomed = True  # interrupted half-way: see _call_failed
                raise
            slot.busy = False
            if ended is None:
                ended = yield item
                if ended is False:
                    break  # closed below, for ROLLBACK
            else:
                dropped = True
        _end_iteration(lease, iterator)
        yield None  # back to finish_reading
        if dropped or not ended:
            raise _cut_short(bool(ended))
        if raw is not None:  # its cursor's result cut short before (PyMySQL's SSCursor)?
            _check_not_cut_short(lease, raw)
    finally:
        _end_iteration(lease, iterator)


def _end_iteration(lease: Connection[Any], iterator: Iterator[Any]) -> None:
    """Close ``iterator``, read by _tracked_iteration for ``lease``, if a generator."""
    # A generator stopped early (psycopg's) may still talk to the server as it closes; a
    # cursor that is its own iterator (sqlite3's, psycopg2's) must stay open for reuse.
    # Not when busy: a fetch was interrupted (the pool discards the connection), or this
    # runs in a thread collecting the abandoned iterator while the owner is in a call.
    current = lease._slot
    if (
        type(iterator) is GeneratorType
        and current is not None
        and current.generation >= 0
        and not current.busy
    ):
        current.busy = True
        try:
            try:
                iterator.close()
            except Exception as exc:
                _call_failed(current, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            current.busy = False
            raise
        except BaseException:
            current.busy = INTERRUPTED
            current.doomed = True  # interrupted half-way: see _call_failed
            raise
        current.busy = False


def _tracked_stream(
    lease: Connection[Any], method: Callable[..., Any], raw: Any
) -> Callable[..., Any]:
    """``method``, a stream of ``raw``, a driver cursor of ``lease`` (see _tracked_iteration)."""

    def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
        slot = _live_slot(lease, "cursor")
        if slot.transaction is not None:
            slot.transaction._before_statement()
        slot.dirty = True
        iterator = _tracked_iteration(lease, iter(method(*args, **kwargs)), raw)
        # For a COMMIT or ROLLBACK through the lease to end first (finish_reading); weakly, as
        # one ended, or dropped, concerns nobody.
        try:
            streams = lease._streams
        except AttributeError:
            streams = WeakSet()
            _set_streams(lease, streams)
            slot.tracks_reads = True
        streams.add(iterator)
        return iterator

    return stream


class _TrackedBlock:
    """A driver's context manager (psycopg's ``cursor.copy()``), its connection busy from
    ``__enter__`` to ``__exit__``: the data goes to and from the server all along."""

    __slots__ = ("_lease", "_manager")

    def __init__(self, lease: Connection[Any], manager: Any) -> None:
        self._lease = lease
        self._manager = manager

    def __enter__(self) -> Any:
        slot = _live_slot(self._lease, "cursor")
        if slot.transaction is not None:
            slot.transaction._before_statement()
        slot.dirty = slot.busy = True
        try:
            try:
                return self._manager.__enter__()
            except Exception as exc:
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise

    def __exit__(self, *exc_info: Any) -> Any:
        slot = self._lease._slot
        if slot is not None and slot.generation == _INHERITED:
            return None  # ending the block (a COPY) would end it in the parent's session
        if slot is None or slot.generation < 0:  # released inside the block: not ours now
            return self._manager.__exit__(*exc_info)
        try:
            try:
                result = self._manager.__exit__(*exc_info)
            except Exception as exc:
                _call_failed(slot, exc)  # an interrupt in here is one in the call
                raise
        except Exception:
            slot.busy = False
            raise
        except BaseException:
            slot.busy = INTERRUPTED
            slot.doomed = True  # interrupted half-way: see _call_failed
            raise
        if exc_info[0] is not None and not issubclass(exc_info[0], Exception):
            # Interrupted inside the block, with data half sent or read: the pool discards the
            # connection, and the lease refuses further use (see _call_failed)
            slot.busy = INTERRUPTED
            slot.doomed = True
            return result
        slot.busy = False
        return result


def _tracked_block(lease: Connection[Any], method: Callable[..., Any]) -> Callable[..., Any]:
    def block(*args: Any, **kwargs: Any) -> _TrackedBlock:
        return _TrackedBlock(lease, method(*args, **kwargs))

    return block


def _slot_setter(cls: type, name: str) -> Callable[[Any, Any], None]:
    """The setter of a ``__slots__`` attribute, to call without any attribute lookup."""
    setter: Callable[[Any, Any], None] = cls.__dict__[name].__set__
    return setter


# Leases and cursors are made for every checkout and statement: with no class call, their
# fields set with plain stores before the class swap (see lease()); later stores to a slot go
# through these descriptors, with no __setattr__ lookup.
_new = object.__new__
_set_slot = _slot_setter(_LeaseFields, "_slot")
_set_streams = _slot_setter(_LeaseFields, "_streams")
_set_cut_short = _slot_setter(_LeaseFields, "_cut_short")
_set_cursor_open = _slot_setter(_CursorFields, "_open")


def detach(conn: Connection[C]) -> _Slot | None:
    """End a lease without returning its connection, for the pool to dispose of; ``None`` if
    it was released already."""
    _set_slot(conn, None)  # first, as in close()
    claim = conn._claim
    try:
        slot = claim[0]
        del claim[0]
    except IndexError:
        return None
    return slot


def lease(pool: Pool[C], slot: _Slot) -> Connection[C]:
    """A new lease of ``slot``'s connection, for the pool's checkout path.

    It returns nothing (neither ``close()`` nor its finaliser) until the caller, holding it,
    arms it with ``slot.claim.append(slot)``: an interrupt between the two drops a lease that
    cannot return the connection, and the checkout's own undo keeps it.
    """
    # Its fields set with plain stores on a _LeaseFields, which then becomes a Connection:
    # Connection's own __setattr__ (the driver's attributes) would otherwise leave only the
    # slots' descriptors to call, three calls on every checkout for what the class swap does
    # in one store (about 1,200 instructions fewer a checkout on CPython 3.11).  Until the
    # swap it has no finaliser, and nothing refers to it.
    fields: _LeaseFields[C] = _new(_LeaseFields)
    fields._pool = pool
    fields._slot = slot
    claim: list[_Slot] = []
    fields._claim = claim
    fields.__class__ = Connection
    conn: Connection[C] = fields  # type: ignore[assignment]  # it is one now
    slot.claim = claim
    # The slot's lease fields are at their defaults (the return path saw to it), but for its
    # owner and leased_at, which the checkout set as it counted the lease.
    return conn


def revoke(conn: Connection[C]) -> None:
    """End a lease the checkout made but does not hand out (its claim emptied): it refers to
    nothing from now on."""
    _set_slot(conn, None)


class PoolCursor(Cursor[C]):
    """A cursor from ``pool.cursor()``, holding a connection of its own until it is closed.

    Closing it (or leaving ``with``) returns the connection to the pool; work not committed
    through :attr:`connection` is rolled back there, as for any lease.
    """

    __slots__ = ()

    @property
    def connection(self) -> Connection[C]:
        """The lease this cursor holds."""
        return self._lease

    def close(self) -> None:
        """Close the cursor and return its connection.  Calling it again does nothing."""
        try:
            slot = self._lease._slot
            if slot is None or slot.generation < 0:
                # The connection went back (its cursors were closed there) or the pool closed
                # it: the driver's cursor is no longer this cursor's to touch.
                _set_cursor_open(self, False)
            else:
                super().close()
        finally:
            self._lease.close()

    def __enter__(self) -> PoolCursor[C]:
        return self

    # While it is read, the cursor stays referenced: `for row in pool.cursor().execute(...)`
    # holds only what it iterates, and a PoolCursor collected meanwhile gives its connection
    # back under the loop.

    def __iter__(self) -> Iterator[Any]:
        return _held_by(self, super().__iter__())

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if _CURSOR_STATEMENTS.get(name) is _STREAM:  # stream(), fetchall_unbuffered()
            method = value

            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                return _held_by(self, method(*args, **kwargs))

            return stream
        return value

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<dbpool.PoolCursor {state} on {self._lease!r}>"

    def __del__(self) -> None:
        try:
            lease = self._lease
        except AttributeError:  # never set up
            return
        claim = lease._claim
        if not claim:
            return  # closed
        if claim[0].generation < 0:
            return  # the pool closed it, or it is the parent's: as in Connection.__del__
        slot = None
        try:
            _set_slot(lease, None)  # the lease may still be referenced elsewhere
        finally:  # even if a signal handler raised as that returned: a finaliser swallows it
            if claim:
                slot = claim[0]
                del claim[0]
                lease._pool._orphans.append(slot)  # as in Connection.__del__
        if slot is None:
            return  # closed meanwhile
        _warn_unreleased(
            f"a cursor from pool {lease._pool.name!r}.cursor() was garbage-collected without "
            "being closed; use 'with pool.cursor() as cur' or call cur.close()",
        )


def _held_by(owner: PoolCursor[Any], iterator: Iterator[Any]) -> Iterator[Any]:
    """``iterator``'s items, with ``owner`` referenced until it ends.  A plain loop, not
    ``yield from``, which would close a cursor that is its own iterator (sqlite3's,
    psycopg2's) when the loop stops early."""
    for item in iterator:  # noqa: UP028 (see above)
        yield item


def pool_cursor(conn: Connection[C], cursor: Cursor[C]) -> PoolCursor[C]:
    """Turn ``cursor``, just made on ``conn``, into the cursor that owns ``conn``."""
    owner: _CursorFields[C] = _new(_CursorFields)
    owner._lease = conn
    owner._raw = cursor._raw
    owner._open = True
    owner.__class__ = PoolCursor
    return owner  # type: ignore[return-value]  # a PoolCursor now
