"""The driver verbs the pool needs, and the generic fallback for drivers it does not know.

A dialect is a small stateless object.  Every driver quirk lives in a dialect and nowhere else:
the pool asks "what state is this connection in", "is it alive", "roll it back", "close it",
and never probes a driver with try/except of its own.
"""

from __future__ import annotations

import enum
import math
import os
import socket
import stat
from typing import Any, Callable

from ..isolation import Isolation


class TxState(enum.Enum):
    """What a connection's transaction state is, as far as the dialect can tell without I/O."""

    IDLE = "idle"  # no transaction open: can be reused as it is
    IN_TRANSACTION = "in_transaction"  # a transaction (or a failed one) is open: roll back first
    BUSY = "busy"  # a statement is still running or a result is unread: discard
    BROKEN = "broken"  # closed or lost: discard
    UNKNOWN = "unknown"  # the driver does not say: the lease's own record decides


# The members under plain names, for the code every return runs: on Python 3.9 to 3.11 naming
# a member through its class goes through EnumType.__getattr__, about 0.1 µs each time.
IDLE = TxState.IDLE
IN_TRANSACTION = TxState.IN_TRANSACTION
BUSY = TxState.BUSY
BROKEN = TxState.BROKEN
UNKNOWN = TxState.UNKNOWN


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
        return BROKEN if closed else UNKNOWN

    #: Whether :meth:`call_failed` does anything: a failed call leaves the driver's cached
    #: transaction flags stale (PyMySQL), so calls that may fail unseen are watched.
    flags_go_stale = False
    #: Whether the driver's own iteration of a cursor of :meth:`fetches_as_it_goes` ends as if
    #: every row were read once COMMIT or ROLLBACK cut its result short (mysqlclient before
    #: 2.3, whose closed ``SSCursor`` then yields nothing more): such iteration is watched
    #: outside a transaction block too, and says it was cut short.
    quiet_when_cut_short = False
    #: Driver methods that can change what the pool cannot read back, like mysqlclient's
    #: ping(True), which turns its automatic reconnect on for good: a lease that called one
    #: counts as having handed out the driver's connection (see :meth:`after_exposure`).
    exposing_methods: frozenset[str] = frozenset()
    #: Driver methods whose effect the pool can neither read back nor undo, like sqlite3's
    #: set_authorizer(): a lease that called one through the lease has its connection
    #: discarded on return, so that the next borrower gets one as ``configure`` left it.
    irreversible_methods: frozenset[str] = frozenset()
    #: Attributes of the driver's connection a borrower can change where no cheap comparison
    #: sees it: in place (PyMySQL's converter dicts), or on the driver's connection itself
    #: (what the session reset replays).  The lease takes a copy of one as it is read through
    #: the lease, and of each as it hands out the driver's connection or cursor; the return
    #: path puts the copies back.  Leases that touch none of them pay nothing.
    restored_attributes: frozenset[str] = frozenset()

    #: Driver methods that take another driver connection, which the driver checks the type
    #: of (sqlite3's ``backup(target)``): a lease passed to one, called through a lease, is
    #: replaced by its driver connection.
    connection_arguments: frozenset[str] = frozenset()

    def after_exposure(self, conn: Any) -> None:
        """On the return of a lease that handed out the driver's connection or cursor, or
        called one of :attr:`exposing_methods`: undo what the pool cannot read; no transaction
        is open.  May do I/O (only such leases pay for it).  Raises if the connection cannot
        be made fit for the next borrower: it is discarded."""

    def call_failed(self, conn: Any) -> None:
        """A driver call on ``conn`` raised (or may have, unseen: the lease handed out the
        driver's connection or cursor).  Where that can leave the driver's transaction
        flags stale, make :meth:`transaction_state` report ``IN_TRANSACTION`` until the driver
        hears from the server again (the pool then rolls back on return).  No I/O."""

    def fresh_transaction_state(self, conn: Any) -> TxState:
        """:meth:`transaction_state`, read again from the server (one round trip) when a
        failed call left the driver's flags stale; otherwise the same, with no I/O.  For BEGIN
        and COMMIT, not for the return path."""
        return self.transaction_state(conn)

    def ended_transaction(self, conn: Any, exc: Exception) -> bool:
        """Whether the failed call that raised ``exc`` made the server end the open
        transaction, rolling back its work (MySQL's deadlock victim, SQLite's conflict resolved
        with ROLLBACK).  Read from the error or the driver's local state: no I/O."""
        return False

    def transaction_aborted(self, conn: Any) -> bool:
        """Whether the open transaction failed, so that the server accepts only ROLLBACK
        (PostgreSQL after an error: COMMIT would roll it back).  Before COMMIT.  No I/O, unless
        the driver's local state may be stale (psycopg's pipeline mode: one round trip)."""
        return False

    def fetches_as_it_goes(self, cursor: Any) -> bool:
        """Whether iterating the driver's ``cursor`` may wait for the server (a server-side
        cursor, an unbuffered result; SQLite runs its statement step by step): such iteration
        is watched one step at a time, inside a transaction block (for the deadline) and,
        where :attr:`flags_go_stale` or :attr:`quiet_when_cut_short`, outside one.  No I/O.
        When in doubt, True."""
        return True

    #: Whether a result can be left part-read on a connection of the driver, in COMMIT's and
    #: ROLLBACK's way: a cursor of :attr:`unbuffered_cursors`, or a ``stream()`` that holds
    #: the connection (psycopg's).  A lease ends such results first (see
    #: :meth:`holds_unread_rows`); the other drivers' commits spare themselves the look.
    part_read_results = False
    #: Whether :meth:`holds_unread_rows` can be True (MySQL's ``SSCursor``).
    unbuffered_cursors = False

    def may_hold_unread_result(self, cursor: Any) -> bool:
        """Whether the driver's ``cursor`` may have a result the server is still sending (see
        :meth:`holds_unread_rows` and :meth:`result_sets_follow`, which the lease then asks).
        No I/O: asked of every cursor of a lease at each COMMIT and ROLLBACK through it."""
        return False

    def holds_unread_rows(self, cursor: Any) -> bool:
        """Whether the driver's ``cursor``, for which :meth:`may_hold_unread_result` is True,
        has rows of its result still to come, that COMMIT or ROLLBACK would find in its way
        (an unbuffered result left part-read): the lease closes such a cursor of its own
        before either, its driver reading the rest and dropping it.  Not a server-side
        cursor, which the transaction's end closes (or keeps, WITH HOLD), nor one read to its
        end, its last row included.  May read from the server where the driver cannot tell
        otherwise (the MySQL drivers read one row of a result about to be dropped), so the
        lease calls it as it calls the driver: busy meanwhile, and the connection doomed if
        interrupted.  Asked of each cursor before :meth:`result_sets_follow` is of any: the
        server sends one statement's results at a time, and a cursor with rows to come ran
        the latest statement."""
        return False

    def result_sets_follow(self, cursor: Any) -> bool:
        """Whether the driver's ``cursor``, for which :meth:`may_hold_unread_result` is True
        and :meth:`holds_unread_rows` was not, has result sets of further statements still to
        come (a ``CALL``'s, a multi-statement string's), closed before COMMIT or ROLLBACK as
        one with rows to come is; or False once it read and dropped them itself, where closing
        would take the cursor's own rows from its borrower (mysqlclient's buffered cursors).
        May read from the server, as :meth:`holds_unread_rows`."""
        return False

    def check_not_reading(self, conn: Any) -> None:
        """Raise the driver's error if a statement sent on ``conn`` now would wait forever for
        a result still being read in the calling thread (psycopg's ``cursor.stream()`` left
        part-read holds the connection's lock, which is not reentrant).  A lease asks before
        its statements, and before a stream's first read, only while a stream of its own is
        suspended part-read (looked for once it has made one: the slot's ``tracks_reads``, so
        that the others pay one attribute read); not while another thread's call alone holds
        the connection, which the statement waits for.  No I/O."""

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

    def close_cursor(self, cursor: Any) -> None:
        """Close a cursor a lease left open, as its connection comes back."""
        cursor.close()

    def drops_cursor_cleanly(self, cursor: Any) -> bool:
        """Whether ``cursor``, once nobody refers to it, may be let go unclosed: the driver
        frees all it holds as it is collected, with no I/O, and leaves nothing for the next
        statement on the connection (no server-side cursor, no result still to read).  Else
        the lease keeps it, for the return path to close.  No I/O.  When in doubt, False."""
        return False

    def client_settings(self, conn: Any) -> object:
        """The driver-side session settings a borrower could change (autocommit, isolation
        level...), read locally.  The pool restores them on return when they differ."""
        return None

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        """Put back what :meth:`client_settings` returned; called with no transaction open.
        Raises if the connection cannot be made fit for the next borrower: it is discarded."""

    def server_session(self, conn: Any) -> object:
        """Which server session ``conn`` is on, read locally: no I/O.  For drivers that can
        open a new one on the same connection object by themselves (PyMySQL's and
        mysqlclient's reconnect), so that a connection that did is told from one that did not:
        the server rolled back the old session's transaction, and the new session has nothing
        ``configure`` set up.  ``None`` where the driver never does."""
        return None

    def database_file(self, conn: Any) -> object:
        """Which file the path ``conn`` opened its database at names now, for drivers whose
        database is a local file that another can be put in place of while the connection
        keeps the old one open (SQLite: the file's device and inode).  Read as the connection
        is made and again as it is validated: one whose file is no longer the one at its path
        fails validation.  Local I/O only, never on a checkout that does not validate.
        ``None`` where there is no such file."""
        return None

    def restore_attribute(self, conn: Any, name: str, value: Any) -> None:
        """Put back an attribute a lease set through the lease, before
        :meth:`restore_client_settings`; called with no transaction open."""
        setattr(conn, name, value)

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    #: Whether a transaction may outlive the driver's ``commit()`` and ``rollback()``, where
    #: the driver has no flag to tell (SQL Server: a COMMIT only lowers ``@@TRANCOUNT`` that a
    #: ``BEGIN TRAN`` statement raised, and pymssql sends nothing for either with autocommit
    #: on).  Then a lease that used the connection has :meth:`end_left_open` run on return even
    #: when it committed or rolled back last.
    commit_may_leave_open = False

    def end_left_open(self, conn: Any) -> None:
        """End a transaction left open past the lease's last commit or rollback, in one round
        trip (see :attr:`commit_may_leave_open`)."""
        self.rollback(conn)

    def close(self, conn: Any) -> None:
        conn.close()

    def sever(self, conn: Any) -> None:
        """Make a call blocked on ``conn`` in another thread fail at once, without I/O: shut
        its socket down.  The connection is unusable afterwards.  A driver with no socket to
        reach is left alone: its own timeouts must bound a hung call."""
        fileno = getattr(conn, "fileno", None)
        if callable(fileno):
            shutdown_socket(fileno())

    #: Whether :meth:`close` may run while another thread is inside a call on the connection,
    #: as ``pool.close()`` does past its timeout, and a return does for a lease given back by
    #: one thread while another is inside a call on it.  Where it may not (sqlite3: the call
    #: fails with any error, or the interpreter crashes), the connection is only cut off with
    #: :meth:`sever`, and closed when its borrower returns it, or once that call has ended.
    closes_under_a_call = True

    #: Whether :meth:`reset_session` exists for this driver; without it, the ``"discard"``
    #: session reset policy reconnects instead.
    can_reset_session = False

    def reset_session(self, conn: Any) -> None:
        """Undo server-side session state (settings, roles, temporary tables, variables,
        prepared statements) with the server's own reset; called with no transaction open.
        Leaves the driver's client settings as they were."""
        raise NotImplementedError(f"the {self.name} dialect has no session reset")

    # -- transactions (dbpool.transaction) --------------------------------------------------
    # Every SQL text below is fixed or built from dbpool.Isolation values and numbers the pool
    # computed itself: nothing a caller passes is ever interpolated.

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        """Raise ``ValueError`` for what the driver or server cannot honour.  No I/O."""
        if isolation is not None or readonly:
            raise ValueError(
                f"the {self.name} dialect cannot set an isolation level or read-only mode: "
                "pass dialect= with a dialect that knows this driver"
            )

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        """Start a transaction (after :meth:`check_begin` accepted the arguments).  Returns
        what :meth:`end` needs to undo session changes."""
        return None  # PEP 249: the transaction starts with the first statement

    def begin_on_server(self, conn: Any) -> None:
        """Inside a block, before the driver's connection is handed out: have the server's
        transaction begun, where :meth:`begin` left that to the driver's next statement, so
        that what the caller does with the driver itself finds it open."""

    def commit(self, conn: Any) -> None:
        """Commit the transaction :meth:`begin` started."""
        conn.commit()

    def is_disconnect(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the connection was lost, for drivers whose state does not
        (or, for SQLite, that its database file was replaced under it).  No I/O."""
        return False

    def end(self, conn: Any, token: Any) -> None:
        """Undo what :meth:`begin` changed in the session; called after COMMIT or ROLLBACK."""

    #: Whether :meth:`limit_time` must run inside the transaction (PostgreSQL's SET LOCAL);
    #: otherwise it runs before BEGIN, so that the limit covers BEGIN too.
    limit_time_inside_transaction = False

    def limit_time(self, conn: Any, seconds: float) -> Any:
        """Have the server itself stop the transaction's statements after ``seconds``, or
        sooner where the session's own limit is tighter: that one stays in force.  Returns
        what :meth:`unlimit_time` needs."""
        return None

    #: Whether the limit :meth:`limit_time` sets is a length each wait starts afresh, and no
    #: cancel ends such a wait (SQLite's busy timeout): before each statement and COMMIT, the
    #: transaction then shortens it to the time left with :meth:`narrow_time`.
    narrows_time = False

    #: Where :attr:`narrows_time`: how long after the limit was sized a statement may start
    #: before it is sized again, so the most a lock wait may outlast the deadline.  A local call
    #: (SQLite's PRAGMA) is cheap before nearly every statement; a round trip is paid at most
    #: once in this time.
    narrow_slack = 0.01

    #: Whether a lock wait of COMMIT, which the watchdog does not cancel, is bounded by a limit
    #: each wait starts afresh (SQLite's busy timeout, PostgreSQL's lock_timeout at a deferred
    #: constraint): before a COMMIT that starts more than a few milliseconds after the limit
    #: was sized, the transaction shortens it to the time left with :meth:`narrow_time`.
    narrows_commit_wait = False

    def narrow_time(self, conn: Any, seconds: float) -> None:
        """Shorten the limit on lock waits in force now (the one :meth:`limit_time` set, or a
        tighter one the block set since) to ``seconds``, the time left before the deadline,
        never lengthening it; :meth:`unlimit_time` undoes both."""

    def unlimit_time(self, conn: Any, token: Any) -> None:
        """Undo :meth:`limit_time`; called after COMMIT or ROLLBACK."""

    #: Whether a :meth:`cancel` stays in force while any statement of the connection is
    #: active (SQLite's interrupt()): the cursors are closed before a timed-out block's rollback.
    interrupt_lingers = False

    #: Whether :meth:`cancel` may be called while another thread is inside a call on the
    #: connection.  Where it may not (pymssql: neither its cancel nor its close is safe then),
    #: a statement past a transaction's deadline runs on, stopped only by the server-side
    #: limits and the driver's own timeouts; a call still running :meth:`sever`'s grace period
    #: later dooms the connection, which the pool discards once the call ends.
    can_cancel = True

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        """Stop the statement running on ``conn``, from another thread.  The fallback, for
        drivers with no cancel, closes the connection: the statement fails, the pool
        discards it."""
        conn.close()

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` reports a serialization failure or deadlock: the transaction was
        rolled back and may succeed if run again."""
        return False

    def refused_as_aborted(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the server refusing a statement only because an earlier error
        aborted the transaction (PostgreSQL's 25P02, "current transaction is aborted"), not
        an error of the statement's own.  No I/O."""
        return False

    def stopped_by_limit(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the server stopping a statement at a limit :meth:`limit_time` or
        :meth:`narrow_time` set (a lock wait or a statement cut short), rather than an error of
        the statement's own.  A COMMIT that fails so once the deadline has passed ends the
        block with :class:`TransactionTimeout`.  No I/O."""
        return False

    def settle(self, conn: Any) -> None:
        """Have the answers to every statement sent so far arrive, raising the error of one
        that failed: before a savepoint's RELEASE, where such an error is its block's, undone
        by rolling back to the savepoint.  Only a driver that queues results (psycopg's
        pipeline mode) has any to wait for."""

    def savepoint(self, conn: Any, name: str) -> None:
        _execute(conn, f"SAVEPOINT {name}")

    def release_savepoint(self, conn: Any, name: str) -> None:
        _execute(conn, f"RELEASE SAVEPOINT {name}")

    def rollback_to_savepoint(self, conn: Any, name: str) -> None:
        _execute(conn, f"ROLLBACK TO SAVEPOINT {name}")

    def detach_after_fork(self, conn: Any) -> None:
        """Make a connection inherited across ``fork()`` harmless in the child, without I/O.

        Closing it would send a goodbye message on the socket the parent still uses.  The
        socket is replaced by ``/dev/null``: nothing the child does reaches the server, and the
        child no longer holds the parent's sessions open once the parent is gone.
        """
        fileno = getattr(conn, "fileno", None)
        if callable(fileno):
            _blind_fd(fileno())

    def __repr__(self) -> str:
        return f"<dbpool dialect {self.name!r}>"


#: The most milliseconds the servers' timeout settings take (a signed 32-bit int).
MAX_MS = 2**31 - 1


def derives_from(obj: object, module: str, name: str) -> bool:
    """Whether ``obj`` is an instance of the class ``module.name``, without importing it."""
    return any(c.__name__ == name and c.__module__ == module for c in type(obj).__mro__)


def milliseconds(seconds: float) -> int:
    """``seconds`` as a server timeout in milliseconds: at least 1, at most :data:`MAX_MS`.

    Rounded up: the server starts its clock after the caller measured ``seconds``, so it then
    never stops a statement before the caller's own deadline (which is what makes the caller
    see the stop as its timeout rather than as a plain driver error).
    """
    ms = seconds * 1000
    if not ms < MAX_MS:  # (also one that overflowed to infinity: above ~1.8e305 s)
        return MAX_MS
    return max(1, math.ceil(ms))


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a driver's PEP 249 ``DatabaseError``: error codes in its args mean
    something only then (an application's ``KeyError(1205)`` is no deadlock)."""
    return any(klass.__name__ == "DatabaseError" for klass in type(exc).__mro__)


def _execute(conn: Any, sql: str, params: Any = None) -> list[Any]:
    """Run one statement on a driver connection; its rows, if it returned any, as the
    connection's cursors make them (dicts, say): to read values, use :func:`_run` on a cursor
    that makes tuples."""
    return _run(conn.cursor(), sql, params)


def _run(cursor: Any, sql: str, params: Any = None) -> list[Any]:
    """Run one statement on ``cursor``, then close it; its rows, if it returned any."""
    try:
        if params is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, params)
        return list(cursor.fetchall()) if cursor.description else []
    finally:
        cursor.close()


SocketIdentity = tuple[int, int]


def socket_identity(fd: int) -> SocketIdentity | None:
    """What tells the socket behind ``fd`` from whatever later gets the same number once it is
    closed: its device and inode.  None if ``fd`` is not an open socket."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISSOCK(info.st_mode) else None


def shutdown_socket(fd: int, identity: SocketIdentity | None = None) -> bool:
    """Shut down the socket behind ``fd`` for both directions; anything else is left alone.

    With ``identity`` (from :func:`socket_identity`), only if ``fd`` is still that socket: a
    number recorded earlier may have been closed and reused since.  Returns False when ``fd``
    was left alone for not being the socket asked for.
    """
    if fd < 0:
        return False
    duplicate = os.dup(fd)  # a socket object of our own, so that closing it leaves fd open
    # Checked on the duplicate, which keeps that file open: the check and the shutdown see the
    # same socket even if fd is closed and reused in between.
    if identity is not None and socket_identity(duplicate) != identity:
        os.close(duplicate)
        return False
    try:
        sock = socket.socket(fileno=duplicate)
    except OSError:  # not a socket
        os.close(duplicate)
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more
    finally:
        sock.close()
    return True


def _blind_fd(fd: int) -> None:
    if fd < 0:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
