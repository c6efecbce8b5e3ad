"""psycopg 3."""

from __future__ import annotations

import re
from typing import Any, Callable

from ..isolation import Isolation
from .base import (
    BROKEN,
    BUSY,
    IDLE,
    IN_TRANSACTION,
    Dialect,
    TxState,
    derives_from,
    milliseconds,
)

_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
# query_canceled (statement_timeout), lock_not_available (lock_timeout): a deadline's limits
_STOPPED_BY_LIMIT_SQLSTATES = frozenset({"57014", "55P03"})
_INVALID_CURSOR_NAME = "34000"
_IN_FAILED_TRANSACTION = "25P02"  # a statement after an error, before ROLLBACK (TO SAVEPOINT)


def _set_tighter(setting: str) -> str:
    """SQL that sets ``setting`` (a time in milliseconds) for the rest of the transaction to
    the tighter of its value now and the milliseconds of a ``%s`` parameter: '0' is no limit.
    The value is read on the server, in the same statement: a limit the session or the block
    set stays in force when the deadline is looser.  SHOW writes it with a unit ('750ms',
    '2s', '1d'), which an interval reads."""
    now_ms = f"(extract(epoch FROM current_setting('{setting}')::interval) * 1000)::bigint"
    return f"set_config('{setting}', least(nullif({now_ms}, 0), %s::bigint)::text, true)"


# The limits a block's deadline sets for the rest of its transaction (SET LOCAL).
TIME_LIMITS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
# SHOW and SET take no snapshot, where any SELECT does: as a transaction's first statement, a
# SELECT would fix a REPEATABLE READ or SERIALIZABLE snapshot before the block's own first
# statement, which then could not be SET TRANSACTION (refused "before any query") or a LOCK
# TABLE meant to come before the snapshot (its reads would miss what the lock waited for).
_SHOW_LIMITS_SQL = "; ".join(f"SHOW {name}" for name in TIME_LIMITS)
_MS_PER_UNIT = {"": 1, "ms": 1, "s": 1_000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}


def shown_ms(shown: str) -> int:
    """A time limit as SHOW and current_setting() write it ('0', '750ms', '2s', '1min',
    '1d'), in milliseconds; 0 is no limit."""
    match = re.fullmatch(r"(\d+)(ms|s|min|h|d|)", shown.strip())
    if match is None:
        raise ValueError(f"not a time limit in milliseconds as PostgreSQL shows one: {shown!r}")
    return int(match[1]) * _MS_PER_UNIT[match[2]]


def set_local_sql(limits: dict[str, int]) -> str:
    """SET LOCAL statements, one per ``name: milliseconds``; one query when run unbound."""
    return "; ".join(f"SET LOCAL {name} = {int(ms)}" for name, ms in limits.items())


def tighter_limits(shown: list[str], ms: int) -> dict[str, int]:
    """The TIME_LIMITS the deadline's ``ms`` must leave at their ``shown`` values: those a
    session or block set tighter (a limit of 0 is none)."""
    return {name: now for name, now in zip(TIME_LIMITS, map(shown_ms, shown)) if 0 < now < ms}


def limits_to_set(shown: list[str], ms: int) -> dict[str, int]:
    """Each of TIME_LIMITS at the deadline's ``ms``, or at its ``shown`` value if tighter."""
    limits = dict.fromkeys(TIME_LIMITS, ms)
    limits.update(tighter_limits(shown, ms))
    return limits


# Before a late COMMIT: its deferred constraint checks may wait for another session's lock.
_NARROW_TIME_SQL = "SELECT " + _set_tighter("lock_timeout")


def _begin_sql(isolation: Isolation | None, readonly: bool) -> str:
    sql = "BEGIN"
    if isolation is not None:
        sql += f" ISOLATION LEVEL {isolation.value}"
    return sql + " READ ONLY" if readonly else sql


def _begin_sql_for(conn: Any, isolation: Isolation | None, readonly: bool) -> str:
    """The BEGIN psycopg itself would send on ``conn`` (with its ``isolation_level``,
    ``read_only`` and ``deferrable``), with the block's isolation level and read-only mode
    where it sets them."""
    from psycopg import IsolationLevel

    sql = "BEGIN"
    if isolation is not None:
        sql += f" ISOLATION LEVEL {isolation.value}"
    elif conn.isolation_level is not None:
        sql += " ISOLATION LEVEL " + IsolationLevel(conn.isolation_level).name.replace("_", " ")
    if readonly or conn.read_only:
        sql += " READ ONLY"
    elif conn.read_only is not None:
        sql += " READ WRITE"
    if conn.deferrable is not None:
        sql += " DEFERRABLE" if conn.deferrable else " NOT DEFERRABLE"
    return sql


def _rollback_even_two_phase(conn: Any) -> None:
    """``conn.rollback()``, or ``tpc_rollback()`` inside a two-phase transaction, which
    rollback() refuses (psycopg and psycopg2 alike)."""
    try:
        conn.rollback()
    except conn.ProgrammingError as refused:
        if conn.closed:
            raise
        try:
            conn.tpc_rollback()
        except conn.ProgrammingError:  # no two-phase transaction: rollback()'s reason stands
            raise refused from None


# psycopg.pq.TransactionStatus values, kept as ints so the return path needs no import.
_PQ_IDLE, _PQ_ACTIVE, _PQ_INTRANS, _PQ_INERROR, _PQ_UNKNOWN = range(5)
# What libpq's transaction status says (psycopg and psycopg2 both read it); UNKNOWN, or any
# other value, means closed or broken.
LIBPQ_STATES = {
    _PQ_IDLE: IDLE,
    _PQ_ACTIVE: BUSY,
    _PQ_INTRANS: IN_TRANSACTION,
    _PQ_INERROR: IN_TRANSACTION,
}


def _reading(conn: Any) -> bool:
    """Whether a result is still being read, outside pipeline mode: a ``cursor.stream()`` left
    part-read holds the connection's lock (not reentrant) until it ends, and a statement the
    pool sent now would wait for it forever in the same thread (psycopg, with the lock free,
    refuses it at once)."""
    pgconn = conn.pgconn
    return bool(pgconn.transaction_status == _PQ_ACTIVE and not pgconn.pipeline_status)


def _sync_pipeline(conn: Any) -> None:
    """In pipeline mode, libpq knows the transaction status as of the last sync only (a fetch
    sends a flush request): sync, so that it is the server's now.  A nested pipeline block
    syncs as it ends; it raises the error of a statement whose result nobody read yet."""
    if conn.pgconn.pipeline_status:
        with conn.pipeline():
            pass


def _refuse_while_reading(conn: Any) -> None:
    if _reading(conn):
        raise conn.OperationalError(
            "another command is already in progress: a result is still being read on this "
            "connection (a cursor.stream() left part-read, or a copy() not finished)"
        )


def drop_received(messages: Any, held: tuple[int, Any]) -> None:
    """Drop the messages received since ``held`` was read from a driver's queue of server
    messages (notices, notifications): how many it held, and the newest, read inline in
    client_settings().  Those after that newest one go, or all of them once it is gone.  Not
    by count: the borrower may have taken some off the front (conn.notifies() does, as
    psycopg2's docs do with pop(0)), and psycopg2 drops the oldest notices past 50 (a deque,
    past its maxlen)."""
    newest = held[1]
    while messages and messages[-1] is not newest:
        messages.pop()


def _execute_with_values(conn: Any, sql: str, values: tuple[str, ...]) -> None:
    """Run ``sql``, with ``%s`` placeholders for ``values``, on a cursor of psycopg's default
    class: the connection's ``cursor_factory`` may be one that takes other placeholders
    (``RawCursor`` takes PostgreSQL's own ``$1``)."""
    from psycopg import Cursor

    with Cursor(conn) as cursor:
        cursor.execute(sql, values, prepare=False)


def prepared_two_phase_left() -> RuntimeError:
    return RuntimeError(
        "returned with a prepared two-phase transaction that neither tpc_commit() nor "
        "tpc_rollback() finished: the driver refuses commit() from then on; the transaction "
        "stays prepared on the server, for tpc_recover()"
    )


def settings_through_properties(conn: Any, received: tuple[int, Any]) -> tuple[Any, ...]:
    """PsycopgDialect.client_settings(), read through the connection's properties (and its
    handlers' lists, where it has them): for a psycopg without the fields it reads."""
    try:
        handlers = (tuple(conn._notice_handlers), tuple(conn._notify_handlers))
    except AttributeError:
        handlers = ((), ())
    return (
        conn.autocommit,
        conn.isolation_level,
        conn.read_only,
        conn.deferrable,
        conn.row_factory,
        conn.cursor_factory,
        conn.server_cursor_factory,
        conn.prepare_threshold,
        *handlers,
        getattr(conn, "_num_transactions", 0),
        received,
    )


class PsycopgDialect(Dialect):
    name = "psycopg"
    limit_time_inside_transaction = True
    part_read_results = True  # cursor.stream(): its cursors read what execute() fetched
    # The pool's own statements go with prepare=False: a connection with prepare_threshold=0
    # prepares every statement, PostgreSQL refuses to prepare a query of several (a deadline's
    # SHOW ...; SET LOCAL ...), and each savepoint's name would leave a prepared one behind.

    # tpc_prepare() ends the session's transaction (libpq says idle) but leaves the driver in
    # two-phase mode until tpc_commit() or tpc_rollback().  The prepared transaction is its
    # transaction manager's to finish, from any connection: the pool leaves it prepared, and
    # discards the connection (psycopg keeps the mode in a private attribute).
    exposing_methods = frozenset({"tpc_prepare"})

    def after_exposure(self, conn: Any) -> None:
        if getattr(conn, "_tpc", None) is not None:
            raise prepared_two_phase_left()

    def transaction_state(self, conn: Any) -> TxState:
        # libpq's own status, read without the cost of conn.info: it says UNKNOWN for a
        # connection that is closed or broken.  A pipeline left open says IDLE once nothing is
        # pending, but only the borrower's Pipeline object can take the connection out of
        # pipeline mode: busy.  A connection lost in a pipeline stays in that mode: broken.
        # Busy too while something holds the connection's lock: a conn.notifies() generator
        # suspended at a notification, taken from the driver's connection itself, or a call in
        # another thread.  Every later call on it would wait for that lock.
        pgconn = conn.pgconn
        state = LIBPQ_STATES.get(pgconn.transaction_status, BROKEN)
        if state is not BROKEN and (pgconn.pipeline_status or conn.lock.locked()):
            return BUSY
        return state

    def fresh_transaction_state(self, conn: Any) -> TxState:
        # Before BEGIN: a block may run inside the caller's own conn.pipeline() block, where
        # the status is the last sync's (a BEGIN the caller sent as SQL may not be heard of),
        # and where an autocommit statement not synced yet is in the server's implicit
        # transaction, which a BEGIN would make the block's (rolled back with it).  A sync
        # commits that one, and reads the status.
        pgconn = conn.pgconn
        if LIBPQ_STATES.get(pgconn.transaction_status, BROKEN) is BROKEN:
            return BROKEN
        if conn.lock.locked():
            return BUSY  # BEGIN would wait for the lock (see transaction_state)
        _sync_pipeline(conn)
        return LIBPQ_STATES.get(pgconn.transaction_status, BROKEN)

    def transaction_aborted(self, conn: Any) -> bool:
        # In pipeline mode, after a sync: an error the borrower caught came with a flush, and
        # the status still says the transaction is open (or idle, BEGIN being SQL in autocommit
        # mode), where COMMIT would roll it back and report success.
        _sync_pipeline(conn)
        return bool(conn.pgconn.transaction_status == _PQ_INERROR)

    def client_settings(self, conn: Any) -> object:
        # The row and cursor factories (server-side cursors' too) shape what the next
        # borrower's cursors return (tuples, dicts), and prepare_threshold=None is what lets
        # PgBouncer's transaction mode work.
        # With the notice and notify handlers it has (those configure added), not only how
        # many: a borrower's own would get the next borrowers' messages, and pile up, and one
        # that removed configure's (to add its own in its place, say) would leave the next
        # borrowers without it.  psycopg keeps them in private lists: a psycopg version
        # without them has none.  Then the notifications waiting for the next conn.notifies()
        # (psycopg 3.2+): those a lease received are its borrower's, and may name its data.
        backlog = getattr(conn, "_notifies_backlog", None)
        received = (len(backlog), backlog[-1]) if backlog else (0, None)
        try:
            # Read on every return: the fields behind the properties (psycopg 3.1 to 3.3),
            # read directly, cost a quarter of what the property calls do
            return (
                conn._autocommit,
                conn._isolation_level,
                conn._read_only,
                conn._deferrable,
                conn.row_factory,
                conn.cursor_factory,
                conn.server_cursor_factory,
                conn._prepared.prepare_threshold,
                tuple(conn._notice_handlers),
                tuple(conn._notify_handlers),
                # psycopg's own transaction() blocks not left: see restore_client_settings
                conn._num_transactions,
                received,
            )
        except AttributeError:  # a psycopg that keeps them elsewhere
            return settings_through_properties(conn, received)

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        if getattr(conn, "_num_transactions", 0):
            # A transaction() block of the driver's connection (reached through conn.raw, or
            # a cursor's connection) left suspended, in a generator say, after SQL ended its
            # transaction: libpq says IDLE, but psycopg refuses commit() and rollback() until
            # that block exits, which only its holder can make it do.
            raise RuntimeError(
                "returned inside a transaction() block of the driver's connection that was "
                "never left: the driver refuses commit() and rollback() until it is"
            )
        conn.autocommit, conn.isolation_level, conn.read_only, conn.deferrable = settings[:4]
        conn.row_factory, conn.cursor_factory, conn.server_cursor_factory = settings[4:7]
        conn.prepare_threshold = settings[7]
        for name, kept in (("_notice_handlers", settings[8]), ("_notify_handlers", settings[9])):
            handlers = getattr(conn, name, None)
            if handlers is not None:
                handlers[:] = kept  # in place: psycopg reads the list it made
        backlog = getattr(conn, "_notifies_backlog", None)
        if backlog:
            drop_received(backlog, settings[-1])  # those received since it was opened

    def close_cursor(self, cursor: Any) -> None:
        # A server-side cursor's close sends CLOSE: not while a result is being read, nor while
        # something else holds the connection's lock (the connection then goes back busy and
        # is discarded, which ends the cursor with it).
        if hasattr(cursor, "name"):
            conn = cursor.connection
            if _reading(conn) or conn.lock.locked():
                return
        try:
            cursor.close()
        except Exception as exc:
            # One whose transaction ended without keeping it (rolled back, or committed and
            # not WITH HOLD) while another is open now, or a WITH HOLD one rolled back: the
            # server dropped it then, and its CLOSE finds none.  Nothing is left open (the
            # transaction the CLOSE aborted is rolled back next); psycopg, which marks the
            # cursor closed only once the CLOSE went through, is told so locally.
            if getattr(exc, "sqlstate", None) != _INVALID_CURSOR_NAME or not hasattr(
                cursor, "name"
            ):
                raise
            close_locally = getattr(cursor, "_close", None)  # private, so looked up
            if close_locally is not None:
                close_locally()

    def check_not_reading(self, conn: Any) -> None:
        _refuse_while_reading(conn)

    def commit(self, conn: Any) -> None:
        _refuse_while_reading(conn)
        # psycopg's commit() sends COMMIT only if libpq says a transaction is open, which in
        # pipeline mode it knows as of the last sync: after a fetch, the block's BEGIN (SQL, in
        # autocommit mode) may not be heard of yet, and the work was left to the rollback on
        # return.
        _sync_pipeline(conn)
        conn.commit()

    def settle(self, conn: Any) -> None:
        _sync_pipeline(conn)  # as psycopg's own nested transaction() does as it ends

    def savepoint(self, conn: Any, name: str) -> None:
        _refuse_while_reading(conn)
        # The error of a statement queued before it raises here, outside the savepoint (which
        # could not undo it), as psycopg's own nested transaction() does as it is entered
        _sync_pipeline(conn)
        conn.execute(f"SAVEPOINT {name}", prepare=False)

    def release_savepoint(self, conn: Any, name: str) -> None:
        _refuse_while_reading(conn)
        conn.execute(f"RELEASE SAVEPOINT {name}", prepare=False)

    def rollback_to_savepoint(self, conn: Any, name: str) -> None:
        _refuse_while_reading(conn)
        # Out of the aborted state an error inside the savepoint's block left a pipeline in,
        # where the server skips every statement until a sync (as psycopg's rollback() does)
        _sync_pipeline(conn)
        conn.execute(f"ROLLBACK TO SAVEPOINT {name}", prepare=False)
        _sync_pipeline(conn)  # its own failure raises here, before the block is told undone

    def fetches_as_it_goes(self, cursor: Any) -> bool:
        # A client-side cursor holds its rows, unless the connection is in pipeline mode
        # (fetching then syncs the pipeline); a server-side cursor has a name.
        return hasattr(cursor, "name") or cursor.connection.pgconn.pipeline_status != 0

    def drops_cursor_cleanly(self, cursor: Any) -> bool:
        # A client-side cursor holds its result in memory only; a server-side one (WITH HOLD)
        # may outlive the transaction on the server
        return not self.fetches_as_it_goes(cursor)

    def ping(self, conn: Any) -> None:
        # An empty query is one round trip; in autocommit mode it opens no transaction.
        if conn.autocommit:
            conn.execute("", prepare=False)
            return
        conn.autocommit = True
        try:
            conn.execute("", prepare=False)
        finally:
            conn.autocommit = False

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        pass  # every level, and read-only

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        if conn.autocommit:
            # With the connection's own characteristics where the block sets none, as
            # psycopg's own conn.transaction() would in autocommit mode.
            conn.execute(_begin_sql_for(conn, isolation, readonly), prepare=False)
            return None
        # psycopg sends BEGIN itself before the next statement, with these settings in it.
        from psycopg import IsolationLevel

        token = (conn.isolation_level, conn.read_only)
        if isolation is not None:
            conn.isolation_level = IsolationLevel[isolation.name]
        if readonly:
            conn.read_only = True
        return token

    def end(self, conn: Any, token: Any) -> None:
        if token is not None:
            conn.isolation_level, conn.read_only = token

    def begin_on_server(self, conn: Any) -> None:
        # psycopg's own conn.transaction() is BEGIN ... COMMIT when it finds no transaction
        # open, a savepoint otherwise: it must find the block's.  An empty query, after which
        # psycopg sends its BEGIN first (and syncs, in pipeline mode).  In pipeline mode an
        # idle status may be stale: the block's BEGIN, SQL in autocommit mode, is heard of at
        # a sync only.  (ACTIVE, results pending: psycopg's transaction() syncs first itself.)
        pgconn = conn.pgconn
        if pgconn.transaction_status != _PQ_IDLE:
            return
        _sync_pipeline(conn)
        if pgconn.transaction_status == _PQ_IDLE and not conn.autocommit:
            conn.execute("", prepare=False)

    def rollback(self, conn: Any) -> None:
        _refuse_while_reading(conn)
        _rollback_even_two_phase(conn)

    def limit_time(self, conn: Any, seconds: float) -> Any:
        # One round trip: SHOW what is in force now, then SET the deadline's limits; a second
        # puts back those the session set tighter.  All end with the transaction.
        from psycopg import Cursor
        from psycopg.rows import tuple_row

        ms = milliseconds(seconds)
        cursor: Any
        with Cursor(conn, row_factory=tuple_row) as cursor:
            if conn.pgconn.pipeline_status:  # one statement per query in pipeline mode
                shown = []
                for name in TIME_LIMITS:
                    cursor.execute(f"SHOW {name}", prepare=False)
                    shown.append(cursor.fetchone()[0])
                for name, value in limits_to_set(shown, ms).items():
                    cursor.execute(set_local_sql({name: value}), prepare=False)
                return None
            limits = set_local_sql(dict.fromkeys(TIME_LIMITS, ms))
            cursor.execute(f"{_SHOW_LIMITS_SQL}; {limits}", prepare=False)
            shown = [cursor.fetchone()[0]]
            for _ in TIME_LIMITS[1:]:
                cursor.nextset()
                shown.append(cursor.fetchone()[0])
            tighter = tighter_limits(shown, ms)
            if tighter:
                cursor.execute(set_local_sql(tighter), prepare=False)
        return None

    narrows_commit_wait = True

    def narrow_time(self, conn: Any, seconds: float) -> None:
        _refuse_while_reading(conn)  # before COMMIT, which refuses it too
        _execute_with_values(conn, _NARROW_TIME_SQL, (str(milliseconds(seconds)),))

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        cancel = getattr(conn, "cancel_safe", None) or conn.cancel
        cancel()

    can_reset_session = True

    def reset_session(self, conn: Any) -> None:
        # DISCARD ALL refuses to run inside a transaction block.
        if conn.autocommit:
            conn.execute("DISCARD ALL", prepare=False)
        else:
            conn.autocommit = True
            try:
                conn.execute("DISCARD ALL", prepare=False)
            finally:
                conn.autocommit = False
        # It drops the session's prepared statements, but psycopg forgets its own only when it
        # sees DISCARD ALL for the first time with some prepared (once counted, the statement
        # goes by unnoticed), and before 3.3.5 never: the next borrower's would not exist.
        # Private, so looked up.
        prepared = getattr(conn, "_prepared", None)
        if prepared is not None and prepared.clear():
            # clear() leaves a DEALLOCATE ALL for the next statement to send: none are left
            flush = getattr(prepared, "_to_flush", None)
            if flush is not None:
                flush.clear()
        # What the server said to the previous borrower: the notifications psycopg queued on
        # the connection while no notifies() ran, for the next one (DISCARD ALL only stops
        # more from coming).  Private, so looked up.
        backlog = getattr(conn, "_notifies_backlog", None)
        if backlog:
            backlog.clear()

    def is_retryable(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in _RETRYABLE_SQLSTATES

    def refused_as_aborted(self, exc: BaseException) -> bool:
        # In pipeline mode the server skips the statements after the error until a sync, and
        # psycopg raises PipelineAborted (no SQLSTATE) for each
        if getattr(exc, "sqlstate", None) == _IN_FAILED_TRANSACTION:
            return True
        return derives_from(exc, "psycopg.errors", "PipelineAborted")

    def stopped_by_limit(self, exc: BaseException) -> bool:
        # COMMIT runs the deferred constraint checks, which may wait for another session's lock
        return getattr(exc, "sqlstate", None) in _STOPPED_BY_LIMIT_SQLSTATES
