"""sqlite3 from the standard library."""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Callable

from ..isolation import Isolation
from .base import BROKEN, IDLE, IN_TRANSACTION, Dialect, TxState, _execute, milliseconds

# SQLITE_BUSY, SQLITE_LOCKED: primary codes, the low byte of the extended ones that
# sqlite_errorcode holds (SQLITE_BUSY_SNAPSHOT is 517, SQLITE_LOCKED_SHAREDCACHE 262...).
_BUSY_OR_LOCKED = frozenset({5, 6})
# Plain SQLITE_LOCKED, with no extended code: a conflict inside the connection itself (a table
# dropped while one of its statements still reads it), which running the work again meets again.
_LOCKED_BY_ITSELF = 6
# Before Python 3.11 the errors carry no code, only SQLite's message for it: the same two, told
# apart the same way (a shared-cache lock names its table or schema; the plain one does not).
_BUSY_MESSAGE = "database is locked"
_LOCKED_BY_OTHERS_PREFIXES = ("database table is locked: ", "database schema is locked: ")
# SQLITE_READONLY_DBMOVED: a write through a connection whose file was renamed over or removed
# (os.replace(new, path)).  It keeps the old file open and would go on reading it; only the
# extended code tells it from a read-only database (before Python 3.11, validation does).
_DATABASE_MOVED = 1032
# The message of SQLITE_INTERRUPT (no extended code before Python 3.11).
_INTERRUPTED = "interrupted"
_MAIN_FILE = "SELECT CAST(file AS BLOB) FROM pragma_database_list WHERE name = 'main'"
# What database_file() reads for a file no longer at its path.
_REMOVED = "removed"


def _main_file(conn: Any) -> bytes | None:
    """The path SQLite opened the main database at, as bytes whatever the text_factory:
    empty for one in memory or temporary.  The table-valued pragma needs SQLite 3.16; where it
    fails, None."""
    cursor = conn.cursor()
    cursor.row_factory = None  # the connection's, copied as the cursor was made
    try:
        cursor.execute(_MAIN_FILE)
        found = cursor.fetchone()
    except sqlite3.Error:
        return None
    finally:
        cursor.close()
    return found[0] if found else None


def _pragma(conn: Any, name: str) -> Any:
    """The value PRAGMA ``name`` reads, whatever rows the connection's row_factory makes (a
    dict's one item is its key: a truthy name for query_only, no number for busy_timeout)."""
    cursor = conn.cursor()
    cursor.row_factory = None  # the connection's, copied as the cursor was made
    try:
        [(value,)] = cursor.execute(f"PRAGMA {name}").fetchall()
    finally:
        cursor.close()
    return value


class SQLiteDialect(Dialect):
    name = "sqlite3"

    # Callbacks every later statement runs through (one that denies or interrupts them, or
    # sees their text), loaded code and lowered limits: sqlite3 reads none of them back.  And
    # deserialize(), which puts an in-memory image in place of the file: the next borrowers'
    # commits would reach memory only, and be lost with the connection.
    irreversible_methods = frozenset(
        {
            "set_authorizer",
            "set_progress_handler",
            "set_trace_callback",
            "enable_load_extension",
            "load_extension",
            "setlimit",
            "deserialize",
        }
    )

    # Python 3.12's autocommit, which a borrower may set on conn.raw: left True, the next
    # borrower's rollback() would undo nothing.  Copied as the lease hands out the driver's
    # connection, so that only such leases pay for it (client_settings runs on every return).
    restored_attributes = frozenset({"autocommit"})

    # backup(target): sqlite3 takes only its own Connection there, not a lease.
    connection_arguments = frozenset({"backup"})

    def check_new(self, conn: Any) -> None:
        # sqlite3 has no public flag for check_same_thread: use the connection from another
        # thread once, as every pooled connection will be.
        refused: list[BaseException] = []

        def touch() -> None:
            try:
                conn.cursor().close()  # attribute reads are not checked; methods are
            except sqlite3.ProgrammingError as exc:
                refused.append(exc)

        probe = threading.Thread(target=touch, name="dbpool-sqlite-probe")
        probe.start()
        probe.join()
        if refused:
            raise TypeError(
                "a pooled sqlite3 connection is used by many threads: make it with "
                "sqlite3.connect(..., check_same_thread=False)"
            ) from refused[0]
        # Python 3.12's autocommit=False opens a new transaction as each one ends: the pool
        # could never tell a returned connection from one with work to undo, nor BEGIN a block.
        if getattr(conn, "autocommit", None) is False:
            raise TypeError(
                "a pooled sqlite3 connection with autocommit=False always has a transaction "
                "open, and the pool begins and ends transactions itself: leave autocommit at "
                "its default (sqlite3.LEGACY_TRANSACTION_CONTROL), or set it to True"
            )
        # A database with no file name: ':memory:', '' (a temporary file), 'file::memory:'
        # and the other URIs of mode=memory.  Each connection to one is a database of its own,
        # or, with cache=shared (which nothing on a connection tells apart), one that lasts
        # only while a connection to it is open; the pool closes and replaces its connections
        # even at max_size=1 (max_lifetime, idle_timeout, discards).
        if _main_file(conn) == b"":
            raise TypeError(
                "each sqlite3 connection to ':memory:' (or to another database with no file "
                "name: '', 'file::memory:', mode=memory, cache=shared too) is a separate, "
                "empty database, or one that lasts only while a connection to it is open, so "
                "a pool of them would lose data, even of one connection, which the pool "
                "replaces (max_lifetime, idle_timeout, discards): use a file; or, for a "
                "database in memory all the pool's connections share, connect to "
                "'file:/NAME?vfs=memdb' with uri=True, and keep one connection to it open "
                "outside the pool for as long as the data must last"
            )

    def after_exposure(self, conn: Any) -> None:
        # A statement still active on the connection (a cursor made on conn.raw and read in
        # part, which the return path never saw) keeps its read transaction, and its lock on
        # the file, open while in_transaction says False: the next borrower would read that
        # old snapshot and miss later commits (WAL), and an interrupt() would stop its
        # statements too (SQLite keeps the flag set while any statement is active).  sqlite3
        # cannot say whether one is active; interrupt() then a statement can: with none
        # active, SQLite clears the flag as the statement starts.
        conn.interrupt()
        cursor = conn.cursor()
        try:
            cursor.execute("SELECT 1")
        except sqlite3.OperationalError as exc:
            if str(exc) != _INTERRUPTED:
                raise
            raise RuntimeError(
                "returned with a statement still active on the driver's connection (a cursor "
                "of conn.raw read in part, still referenced): it holds a read lock, and its "
                "snapshot would be the next borrower's; close such cursors before the lease "
                "ends"
            ) from exc
        finally:
            cursor.close()

    def transaction_state(self, conn: Any) -> TxState:
        try:
            in_transaction = conn.in_transaction
        except sqlite3.ProgrammingError:  # closed
            return BROKEN
        return IN_TRANSACTION if in_transaction else IDLE

    def client_settings(self, conn: Any) -> object:
        # With the row and text factories: they decide what the next borrower's rows are.
        return conn.isolation_level, conn.row_factory, conn.text_factory

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        isolation_level, conn.row_factory, conn.text_factory = settings
        if conn.isolation_level != isolation_level:
            conn.isolation_level = isolation_level

    def drops_cursor_cleanly(self, cursor: Any) -> bool:
        return True  # collected, it resets its statement, which lets go of its lock

    def ping(self, conn: Any) -> None:
        # The database is in-process: a usable handle is all there is to check.
        _ = conn.total_changes  # raises ProgrammingError once closed

    def database_file(self, conn: Any) -> object:
        path = _main_file(conn)
        if not path:  # in memory, or SQLite too old to say: nothing is compared
            return None
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return _REMOVED
        return info.st_dev, info.st_ino

    def is_disconnect(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlite_errorcode", None) == _DATABASE_MOVED

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        # SQLite transactions are serializable; weaker levels do not exist here (READ
        # UNCOMMITTED only with a shared cache), and are refused rather than upgraded.
        if isolation not in (None, Isolation.SERIALIZABLE):
            raise ValueError(
                f"sqlite3 cannot run a transaction at {isolation.value}: it offers SERIALIZABLE "
                "(BEGIN IMMEDIATE), or no isolation argument for a plain BEGIN"
            )

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        # BEGIN IMMEDIATE takes the write lock at once, so that two writers cannot both read
        # and then fail to upgrade.
        # A read-only transaction takes no write lock: a plain BEGIN is serializable already.
        begin = "BEGIN IMMEDIATE" if isolation is not None and not readonly else "BEGIN"
        # The token: whether query_only was turned on here, to turn off at the end (a
        # connection configured read-only stays so).
        restore = False
        if readonly and not _pragma(conn, "query_only"):
            conn.execute("PRAGMA query_only = ON")
            restore = True
        try:
            conn.execute(begin)
        except BaseException:
            if restore:
                conn.execute("PRAGMA query_only = OFF")
            raise
        return restore

    def end(self, conn: Any, token: Any) -> None:
        if token:
            conn.execute("PRAGMA query_only = OFF")

    def limit_time(self, conn: Any, seconds: float) -> Any:
        # interrupt() cannot stop a wait for another connection's lock: bound that wait
        previous = int(_pragma(conn, "busy_timeout"))
        conn.execute(f"PRAGMA busy_timeout = {min(previous, milliseconds(seconds))}")
        return previous

    # A wait for the lock that starts inside the block would otherwise last the whole timeout
    narrows_time = True
    narrows_commit_wait = True

    def narrow_time(self, conn: Any, seconds: float) -> None:
        # Read first: a tighter one of the connection's, or of the block's own PRAGMA, stays.
        now = int(_pragma(conn, "busy_timeout"))
        ms = milliseconds(seconds)
        if ms < now:
            conn.execute(f"PRAGMA busy_timeout = {ms}")

    def unlimit_time(self, conn: Any, token: Any) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(token)}")

    def stopped_by_limit(self, exc: BaseException) -> bool:
        return self.is_retryable(exc)  # busy: the wait busy_timeout bounds

    # With the autocommit attribute of Python 3.12+ set to True, commit() and rollback() do
    # nothing: the explicit BEGIN must be ended with SQL.
    def commit(self, conn: Any) -> None:
        if getattr(conn, "autocommit", None) is True:
            _execute(conn, "COMMIT")
        else:
            conn.commit()

    def rollback(self, conn: Any) -> None:
        if getattr(conn, "autocommit", None) is True and conn.in_transaction:
            _execute(conn, "ROLLBACK")
        else:
            conn.rollback()

    interrupt_lingers = True

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        conn.interrupt()

    def sever(self, conn: Any) -> None:
        conn.interrupt()  # no socket: stopping the statement is all there is to do

    # sqlite3 closed in one thread while another is inside a call on the connection makes
    # that call fail with MemoryError or "bad parameter or other API misuse", or crashes.
    closes_under_a_call = False

    def ended_transaction(self, conn: Any, exc: Exception) -> bool:
        # A block's transaction is open from its BEGIN: closed after an error, the error
        # rolled it back (ON CONFLICT ROLLBACK, RAISE(ROLLBACK)).  executescript(), which
        # commits first, is refused inside a block.
        try:
            return not conn.in_transaction
        except Exception:  # closed: it is discarded anyway
            return False

    def is_retryable(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code != _LOCKED_BY_ITSELF and code & 0xFF in _BUSY_OR_LOCKED
        if not isinstance(exc, sqlite3.OperationalError) or len(exc.args) != 1:
            return False
        message = exc.args[0]
        return isinstance(message, str) and (
            message == _BUSY_MESSAGE or message.startswith(_LOCKED_BY_OTHERS_PREFIXES)
        )

    def detach_after_fork(self, conn: Any) -> None:
        pass
