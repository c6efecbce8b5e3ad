"""PyMySQL (MySQL and MariaDB)."""

from __future__ import annotations

import functools
import importlib
import math
import os
import random
import socket
import threading
import weakref
from typing import Any, Callable, NamedTuple

from ..isolation import Isolation
from .base import (
    BROKEN,
    BUSY,
    IDLE,
    IN_TRANSACTION,
    UNKNOWN,
    Dialect,
    SocketIdentity,
    TxState,
    _blind_fd,
    _execute,
    _run,
    derives_from,
    is_database_error,
    milliseconds,
    shutdown_socket,
    socket_identity,
)

# The errors with which the server rolled the whole transaction back: ER_LOCK_DEADLOCK, and
# ER_CHECKREAD, MariaDB's write conflict under innodb_snapshot_isolation (on by default from
# MariaDB 11.6).
_ENDED_TRANSACTION = frozenset({1213, 1020})
_RETRYABLE_ERRORS = _ENDED_TRANSACTION | {1205}  # and ER_LOCK_WAIT_TIMEOUT
# CR_SERVER_GONE_ERROR, CR_SERVER_LOST, CR_SERVER_LOST_EXTENDED
_DISCONNECT_ERRORS = frozenset({2006, 2013, 2055})
_UNKNOWN_VARIABLE = 1193  # ER_UNKNOWN_SYSTEM_VARIABLE
# Version strings that misled (see limit_time): whether the server behind one is MariaDB
# after all, or MySQL, as the server itself showed.  A few entries, one per string seen.
_MARIADB_BEHIND: dict[str, bool] = {}
# Why a connection whose driver connected again by itself (PyMySQL's ping(reconnect=True),
# mysqlclient's reconnect once ping(True) turned it on) is not handed on: a connect of the
# pool's own would have run configure on the new session.
_RECONNECTED = (
    "this connection reconnected while lent out (ping(reconnect=True), or mysqlclient's "
    "automatic reconnect), to a server session that configure never set up"
)


def _replied_with_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error reply of the server's, which leaves the connection in step
    (the client library's own errors, 2000 to 2999, say it was lost or out of step)."""
    if not is_database_error(exc) or not exc.args:
        return False
    code = exc.args[0]
    return isinstance(code, int) and code >= 1000 and not 2000 <= code < 3000


def _result_set_follows(cursor: Any) -> bool:
    """Whether the results still to come after the one ``cursor`` read to its end (of a
    multi-statement string's further statements, or a CALL's) include a result set.  Those
    before it, of statements that return no rows (a CALL's own final status, last), are read
    and passed: the reads COMMIT would make to drop them.  No I/O where none are to come."""
    while cursor.nextset():
        if cursor.description is not None:
            return True
    return False


class _MySQLTransactions:
    """Transaction verbs shared by the MySQL drivers (PyMySQL and mysqlclient)."""

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        pass  # every level, and read-only

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        if isolation is not None:  # without SESSION: for the next transaction only
            _execute(conn, f"SET TRANSACTION ISOLATION LEVEL {isolation.value}")
        try:
            _execute(conn, "START TRANSACTION READ ONLY" if readonly else "START TRANSACTION")
        except Exception:
            if isolation is not None:  # the one-time level would apply to the next one
                try:
                    conn.rollback()
                except Exception:  # lost, say: the error that tells it goes on; the caller's
                    pass  # own rollback fails too, and then the connection is not reused
            raise
        return None

    def limit_time(self, conn: Any, seconds: float) -> Any:
        # The version string tells MariaDB from MySQL, unless a proxy in between reports its
        # own (ProxySQL's default says "5.5.30"): the variable the server then did not know
        # tells instead, and the other is used from then on for that version string.
        reported = conn.get_server_info()
        mariadb = _MARIADB_BEHIND.get(reported, "MariaDB" in reported)
        try:
            return self._limit_time(conn, seconds, mariadb)
        except Exception as exc:
            if not (is_database_error(exc) and exc.args and exc.args[0] == _UNKNOWN_VARIABLE):
                raise
        _MARIADB_BEHIND[reported] = not mariadb
        return self._limit_time(conn, seconds, not mariadb)

    def _limit_time(self, conn: Any, seconds: float, mariadb: bool) -> Any:
        # MariaDB bounds every statement (max_statement_time, seconds); MySQL only SELECTs
        # (max_execution_time, milliseconds).  Lock waits: whole seconds, at least 1.
        if mariadb:
            variable, value = "max_statement_time", max(seconds, 0.001)
        else:
            variable, value = "max_execution_time", milliseconds(seconds)
        [previous] = _run(
            self._tuple_cursor(conn),
            f"SELECT @@session.innodb_lock_wait_timeout, @@session.{variable}",
        )
        # A tighter limit of the session's stays: a lock wait timeout of 0 is no wait at all,
        # a statement limit of 0 none.
        lock_wait, statement = previous
        value = statement if 0 < statement < value else value
        _execute(
            conn,
            f"SET SESSION innodb_lock_wait_timeout = %s, {variable} = %s",
            (min(lock_wait, max(1, math.ceil(seconds))), value),
        )
        return variable, previous

    def unlimit_time(self, conn: Any, token: Any) -> None:
        variable, (lock_wait, statement) = token
        _execute(
            conn,
            f"SET SESSION innodb_lock_wait_timeout = %s, {variable} = %s",
            (lock_wait, statement),
        )

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        # KILL QUERY stops the statement and leaves the session usable.
        side = side_connect()
        try:
            _execute(side, "KILL QUERY %s", (conn.thread_id(),))
        finally:
            side.close()

    def is_retryable(self, exc: BaseException) -> bool:
        return is_database_error(exc) and bool(exc.args) and exc.args[0] in _RETRYABLE_ERRORS

    def _tuple_cursor(self, conn: Any) -> Any:
        """A cursor whose rows are tuples, whatever cursor class the connection was made with
        (a DictCursor's row would unpack to its column names)."""
        raise NotImplementedError

    def _check_in_step(self, conn: Any) -> None:
        """Raise if ``conn`` reads the replies of earlier calls as its own: one left unread
        makes the driver read it as the next call's, without an error, and every later call's
        answer is then the reply of the call before it.  A statement whose answer is known
        shows it: its column name, which no cursor class or converter of the connection's
        changes.  One round trip."""
        name = f"dbpool_{random.getrandbits(62):x}"
        cursor = conn.cursor()
        try:
            cursor.execute(f"SELECT 1 AS {name}")
            described = cursor.description
            cursor.fetchall()
        finally:
            cursor.close()
        if not described or described[0][0] != name:
            raise RuntimeError(
                "this connection's replies are out of step with its statements: a reply was "
                "left unread (a call interrupted half-way, or mysqlclient's send_query() "
                "without read_query_result())"
            )

    def ended_transaction(self, conn: Any, exc: Exception) -> bool:
        # A lock wait timeout (1205) undoes the statement only, unless the server runs with
        # innodb_rollback_on_timeout; other errors (a DDL statement's, after the implicit
        # COMMIT it begins with) end nothing.
        return is_database_error(exc) and bool(exc.args) and exc.args[0] in _ENDED_TRANSACTION

    def is_disconnect(self, exc: BaseException) -> bool:
        # mysqlclient keeps `open` true after a lost connection: its error code says it
        return is_database_error(exc) and bool(exc.args) and exc.args[0] in _DISCONNECT_ERRORS


_IN_TRANS = 0x0001  # SERVER_STATUS_IN_TRANS
_AUTOCOMMIT = 0x0002  # SERVER_STATUS_AUTOCOMMIT
_COM_RESET_CONNECTION = 0x1F  # MySQL 5.7.3+, MariaDB 10.2.4+


class _StaleStatus(int):
    """PyMySQL's ``server_status`` after a call that raised.  PyMySQL reads the flags from OK
    and EOF packets only, so an error leaves those of the call before, which may predate a
    transaction the failed statement opened (a procedure's START TRANSACTION).  The other bits
    are kept (PyMySQL's escaping and autocommit read them); IN_TRANS is set, so that an open
    transaction is assumed.  The next packet PyMySQL reads replaces it with a plain int."""

    __slots__ = ()


class PyMySQLDialect(_MySQLTransactions, Dialect):
    name = "pymysql"
    flags_go_stale = True
    part_read_results = unbuffered_cursors = True  # SSCursor (holds_unread_rows)

    def _tuple_cursor(self, conn: Any) -> Any:
        # The driver's base cursor class (imported by now: a PyMySQL connection exists).
        return conn.cursor(importlib.import_module("pymysql.cursors").Cursor)

    def transaction_state(self, conn: Any) -> TxState:
        if not conn.open:
            return BROKEN
        result = conn._result
        if result is not None:
            if result.unbuffered_active:
                return BUSY
            if result.has_next:  # the flags are the first reply's: the unread ones (a CALL's,
                return IN_TRANSACTION  # say) may open a transaction; ROLLBACK reads them first
        status = conn.server_status or 0
        if status & _IN_TRANS:
            return IN_TRANSACTION
        if status & _AUTOCOMMIT:
            return IDLE
        # With autocommit off, a plain read opens a consistent snapshot that MariaDB does not
        # report in the status flags: only the lease's record of statements can tell.
        return UNKNOWN

    def call_failed(self, conn: Any) -> None:
        status = conn.server_status
        if status is not None and type(status) is not _StaleStatus:
            conn.server_status = _StaleStatus(status | _IN_TRANS)

    def after_exposure(self, conn: Any) -> None:
        # A call on the driver's connection or cursor interrupted half-way (KeyboardInterrupt)
        # may leave its reply unread, which the return path's ROLLBACK would read as its own,
        # leaving ROLLBACK's for the next borrower's statement, and so on.
        self._check_in_step(conn)

    def fresh_transaction_state(self, conn: Any) -> TxState:
        state = self.transaction_state(conn)
        if state is IN_TRANSACTION and type(conn.server_status) is _StaleStatus:
            conn.ping(reconnect=False)  # its OK packet carries the server's flags
            state = self.transaction_state(conn)
        return state

    # The converter dicts, changed in place (decoders[FIELD_TYPE.NEWDECIMAL] = float), would
    # change what the next borrower's parameters and results are made of; comparing them on
    # every return would cost every lease.  The encoding PyMySQL writes statements in, set
    # directly, is not in the character set compared below, and use_unicode=False has the
    # next borrower's text come back as bytes.  And what the session reset replays from the
    # connection (sql_mode, init_command), changed on conn.raw, would reach the next
    # borrower's session with session_reset="discard".
    restored_attributes = frozenset(
        {"encoders", "decoders", "encoding", "use_unicode", "sql_mode", "init_command"}
    )

    def client_settings(self, conn: Any) -> object:
        # With the character set: set_character_set() also changes the encoding PyMySQL
        # sends statements in, which the next borrower's text would be encoded with; and the
        # cursor class, which decides what the next borrower's cursors return.  Last, the
        # server session, which is not put back: see restore_client_settings().
        autocommit = bool((conn.server_status or 0) & _AUTOCOMMIT)
        return autocommit, conn.charset, conn.collation, conn.cursorclass, conn.server_thread_id

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        autocommit, charset, collation, cursorclass, session = settings
        if conn.server_thread_id != session:
            raise RuntimeError(_RECONNECTED)
        conn.cursorclass = cursorclass
        if bool((conn.server_status or 0) & _AUTOCOMMIT) != autocommit:
            if not autocommit:  # the lease turned autocommit on: a SET TRANSACTION (for the
                conn.rollback()  # next transaction, unflagged) may be pending; ROLLBACK drops it
            conn.autocommit(autocommit)
        if (conn.charset, conn.collation) != (charset, collation):
            conn.set_character_set(charset, collation)

    def server_session(self, conn: Any) -> object:
        return conn.server_thread_id  # the handshake's, which ping(reconnect=True) does again

    def close_cursor(self, cursor: Any) -> None:
        conn = cursor.connection  # None once closed
        try:
            cursor.close()
        except Exception as exc:
            # Closing reads the replies of a multi-statement string's statements left unread:
            # one that failed ended the string there, and its error left the connection in
            # step, as any failed call does, with its flags stale (a failed CALL may have
            # opened a transaction).
            if conn is None or not _replied_with_error(exc):
                raise
            self.call_failed(conn)

    def fetches_as_it_goes(self, cursor: Any) -> bool:
        # SSCursor and its subclasses; the others read the whole result at execute()
        return derives_from(cursor, "pymysql.cursors", "SSCursor")

    def may_hold_unread_result(self, cursor: Any) -> bool:
        # An SSCursor still reading: the driver would read the rest itself before the next
        # statement, with a warning.  Or one read to its end with the results of further
        # statements to come (a multi-statement string's, a CALL's), which the driver would
        # read and drop: a buffered cursor's current rows are read already, and its later
        # sets stay to come (no look without replacing them).  Private, so looked up.
        result = getattr(cursor, "_result", None)
        if getattr(result, "unbuffered_active", False):
            return True
        return getattr(result, "has_next", False) and self.fetches_as_it_goes(cursor)

    def holds_unread_rows(self, cursor: Any) -> bool:
        # Its last row read, it still waits for the end of the result: one more row read
        # tells (as mysqlclient's below), the I/O closing it would do.
        return bool(cursor._result.unbuffered_active) and cursor.fetchone() is not None

    def result_sets_follow(self, cursor: Any) -> bool:
        return _result_set_follows(cursor)

    def drops_cursor_cleanly(self, cursor: Any) -> bool:
        # Not an SSCursor, whose collection reads the rest of its rows, nor one with results of
        # a multi-statement string still to read: the next statement would read them, and
        # raise the error of one that failed.  Private, so looked up.
        result = getattr(cursor, "_result", None)
        return not getattr(result, "has_next", False) and not self.fetches_as_it_goes(cursor)

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)

    def close(self, conn: Any) -> None:
        try:
            conn.close()
        finally:
            # An unbuffered result (an SSCursor's) still reading when the connection was cut
            # off (sever) would try to read its remaining rows from the closed socket once
            # collected, and PyMySQL's finalisers print the error.  Nobody reads it any more.
            result = conn._result
            if result is not None:
                result.unbuffered_active = False

    def sever(self, conn: Any) -> None:
        sock = conn._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more

    def detach_after_fork(self, conn: Any) -> None:
        # No fileno() on a PyMySQL connection: its socket is reached directly.
        sock = conn._sock
        if sock is not None:
            _blind_fd(sock.fileno())
        # An unbuffered result (an SSCursor's) the parent is reading: the child's copy, once
        # collected, would try to read the rest of it (PyMySQL's finalisers), and print the
        # error.  Nobody reads it in the child.
        result = conn._result
        if result is not None:
            result.unbuffered_active = False

    can_reset_session = True

    def reset_session(self, conn: Any) -> None:
        # COM_RESET_CONNECTION: the session as if new, without authenticating again.  It also
        # resets the character set, sql_mode and autocommit to the server's defaults, so what
        # PyMySQL set up when it connected is applied again, as it did then (the character
        # set the connection had before the lease: the return path restores it after this).
        conn._execute_command(_COM_RESET_CONNECTION, b"")
        conn._read_ok_packet()
        conn.set_character_set(conn.charset, conn.collation)  # the lease's, if it changed it
        # The reset keeps the session's current database, which select_db() or USE changed;
        # its name goes in the connection's character set, set just now.  An empty name is no
        # database, as PyMySQL itself connects.
        if conn.db:
            conn.select_db(conn.db)
        elif _execute(conn, "SELECT 1 FROM DUAL WHERE DATABASE() IS NOT NULL"):
            raise RuntimeError(  # no statement leaves a session with no database again
                "a borrower selected a database on a connection made without one: only a new "
                "connection has none"
            )
        if conn.sql_mode is not None:
            _execute(conn, "SET sql_mode=%s", (conn.sql_mode,))
        if conn.init_command is not None:
            _execute(conn, conn.init_command)
        if conn.autocommit_mode is not None:
            conn.autocommit(conn.autocommit_mode)


_SOCKET_CHANGED = (
    "this mysqlclient connection's socket changed since its server session was read: it "
    "reconnected, or was closed"
)


class _Session(NamedTuple):
    thread_id: int  # the server's, for KILL QUERY
    fd: int
    socket: SocketIdentity | None  # what fd was when thread_id was read


class _Sessions:
    """The server session of each mysqlclient connection, for cancel and sever.

    mysqlclient refuses every call on a connection while another thread is inside one
    ("already in use from another thread"), ``thread_id()`` and ``fileno()`` included, and
    cancel and sever run in a watchdog thread exactly then.  So the thread id and the socket are
    read beforehand, in a thread that may use the connection, and kept here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weakly keyed: an entry goes with its connection.
        self._of: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()
        if hasattr(os, "register_at_fork"):  # a child forked as another thread held the lock
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def record(self, conn: Any) -> None:
        """Read ``conn``'s session; only where no other thread can be using it."""
        fd = conn.fileno()
        session = _Session(conn.thread_id(), fd, socket_identity(fd))
        try:
            with self._lock:
                self._of[conn] = session
        except TypeError:  # no weak references: nothing recorded, so no cancel or sever
            pass

    def current(self, conn: Any) -> _Session:
        """The recorded session, if the connection still has the socket it had then.

        A reconnect (``ping(True)``, or mysqlclient's automatic reconnect once that turned it
        on) opens a new socket and a new server session; the recorded thread id is then the
        old session's, which a restarted server may have given to another client.
        """
        try:
            with self._lock:
                session = self._of.get(conn)
        except TypeError:
            session = None
        if session is None or session.socket is None:
            raise RuntimeError("this mysqlclient connection's server session is unknown")
        if socket_identity(session.fd) != session.socket:
            raise RuntimeError(_SOCKET_CHANGED)
        return session


@functools.cache
def _sscursor_ends_quietly() -> bool:
    """Whether mysqlclient's ``SSCursor``, closed under a loop iterating it, ends the loop as
    if every row were read: before 2.3, which raises "cursor closed" there, it returns no more
    rows."""
    version = getattr(importlib.import_module("MySQLdb"), "version_info", None)
    return not isinstance(version, tuple) or version < (2, 3)


class _MySQLdbSettings(NamedTuple):
    """What a mysqlclient borrower can change on the connection object, read locally."""

    autocommit: bool
    cursorclass: Any
    # The client library's character set, which it escapes with and the driver decodes
    # results with; set_character_set() changes it, and so does a SET NAMES statement, which
    # MariaDB Connector/C follows through the server's session tracking.
    charset: str
    encoding: str  # the Python codec the driver encodes statements and parameters with
    executemany_fallback: str | None  # mysqlclient 2.3 and later: "multi" batches statements
    # Copies, so that an entry changed in place (converter[FIELD_TYPE.NEWDECIMAL] = float)
    # shows: the type converters results are made with, and the encoders parameters are.
    converter: dict[Any, Any]
    encoders: dict[Any, Any]
    session: int  # the server's thread id: not put back, see restore_client_settings()


class MySQLdbDialect(_MySQLTransactions, Dialect):
    """mysqlclient: no local transaction flag, so the lease's record decides."""

    name = "mysqlclient"
    part_read_results = unbuffered_cursors = True  # SSCursor (holds_unread_rows)
    # change_user() starts the server session afresh, maybe as another user: what configure
    # set in it is gone, and the next borrowers would run without it, with that user's
    # privileges.  Only a new connection has it again (as psycopg2's reset()).
    irreversible_methods = frozenset({"change_user"})
    # close() refuses, as every call does, while another thread is inside a call on the
    # connection ("already in use from another thread"), and leaves it open, with its server
    # session: such a connection is cut off, and closed once that call has ended.
    closes_under_a_call = False

    def __init__(self) -> None:
        self._sessions = _Sessions()

    def _tuple_cursor(self, conn: Any) -> Any:
        return conn.cursor(importlib.import_module("MySQLdb.cursors").Cursor)

    def check_new(self, conn: Any) -> None:
        self._sessions.record(conn)  # no other thread has the connection yet
        # The driver's, imported by now: the same for every connection.
        self.quiet_when_cut_short = _sscursor_ends_quietly()
        if os.name == "posix":  # (on Windows, fileno() is a socket handle, not a descriptor)
            # libmariadb leaves its socket inheritable: a program this process starts with
            # its descriptors open (os.system(), close_fds=False) would hold the session, and
            # a transaction's locks, after this process is gone.  Python's own are not (PEP 446).
            os.set_inheritable(conn.fileno(), False)

    def transaction_state(self, conn: Any) -> TxState:
        if not conn.open:
            return BROKEN
        # `open` stays true once the connection is lost; the last call's error, kept locally,
        # says so (the driver's next calls fail with CR_SERVER_GONE_ERROR until it reconnects)
        return BROKEN if conn.errno() in _DISCONNECT_ERRORS else UNKNOWN

    def client_settings(self, conn: Any) -> object:
        return _MySQLdbSettings(
            conn.get_autocommit(),
            conn.cursorclass,
            conn.character_set_name(),
            conn.encoding,
            getattr(conn, "executemany_fallback", None),
            dict(conn.converter),
            dict(conn.encoders),
            conn.thread_id(),
        )

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        if conn.thread_id() != settings.session:
            raise RuntimeError(_RECONNECTED)
        if conn.get_autocommit() != settings.autocommit:
            conn.autocommit(settings.autocommit)
        if conn.character_set_name() != settings.charset:
            # One SET NAMES, with the character set's default collation: mysqlclient keeps no
            # record of one given to connect().  (A collation set alone is the server's, and
            # stays, as after SET collation_connection.)
            conn.set_character_set(settings.charset)
        conn.cursorclass = settings.cursorclass
        conn.encoding = settings.encoding
        if settings.executemany_fallback is not None:
            conn.executemany_fallback = settings.executemany_fallback
        # Copies: the settings stay as connected whatever the next lease does to the dicts.
        if conn.converter != settings.converter:
            conn.converter = dict(settings.converter)
        if conn.encoders != settings.encoders:
            conn.encoders = dict(settings.encoders)

    def server_session(self, conn: Any) -> object:
        return conn.thread_id()  # a new one once the driver reconnected

    def close_cursor(self, cursor: Any) -> None:
        try:
            cursor.close()
        except Exception as exc:
            # As with PyMySQL: a multi-statement string's statement that failed, read as the
            # cursor closes, ended the string; the connection is in step after its error.
            if not _replied_with_error(exc):
                raise

    def fetches_as_it_goes(self, cursor: Any) -> bool:
        return derives_from(cursor, "MySQLdb.cursors", "CursorUseResultMixIn")  # SSCursor...

    def may_hold_unread_result(self, cursor: Any) -> bool:
        # Every other statement fails with "Commands out of sync" (2014) until the results of
        # the latest statement are read: an SSCursor's rows, and the results of further
        # statements after them (a CALL's final status, a multi-statement string's).  A
        # buffered cursor read its rows at execute(): only those further results may be to
        # come, which the connection's flags tell (no I/O).  Before mysqlclient 2.3 it has no
        # more_results(): maybe, and result_sets_follow's next_result() tells (no I/O either
        # when none are to come).  Private, so looked up.
        conn = cursor.connection
        if conn is None:
            return False  # closed
        if self.fetches_as_it_goes(cursor):
            return getattr(cursor, "_result", None) is not None
        more_results = getattr(conn, "more_results", None)
        return more_results is None or bool(more_results())

    def holds_unread_rows(self, cursor: Any) -> bool:
        # The driver keeps no mark of one read to its end: one more row read tells, with no
        # I/O at the end (and elsewhere the row goes, as the rest is about to).  A buffered
        # cursor has all its rows already: a row taken here would be the borrower's.
        return self.fetches_as_it_goes(cursor) and cursor.fetchone() is not None

    def result_sets_follow(self, cursor: Any) -> bool:
        # nextset() reads the connection's next result, whoever's it is: asked only once no
        # cursor has rows to come, when those to come are the latest statement's.
        if self.fetches_as_it_goes(cursor):
            return _result_set_follows(cursor)
        # A buffered cursor's own rows stay readable (nextset() would replace them): the
        # results still to come are read on the connection and dropped, a failed statement's
        # error raised, as PyMySQL drops them before its next command (those of statements
        # that return no rows, as a CALL's final status, lose nothing).  The connection's,
        # not this cursor's: another buffered cursor of the lease may have run the statement.
        conn = cursor.connection
        while conn.next_result() == 0:
            conn.discard_result()
        return False

    def ping(self, conn: Any) -> None:
        conn.ping()
        self._sessions.record(conn)  # a ping may have reconnected

    exposing_methods = frozenset({"ping", "send_query"})

    def after_exposure(self, conn: Any) -> None:
        # ping() with no argument turns off the reconnect that ping(True) turned on for good:
        # a session lost later would be replaced silently, in autocommit (the server's default)
        self.ping(conn)
        # send_query() leaves its reply to read_query_result(); unread, the driver takes the
        # connection for idle all the same, and each later call reads the reply of the call
        # before it, without an error.
        self._check_in_step(conn)

    def limit_time(self, conn: Any, seconds: float) -> Any:
        # First: the deadline may pass during the round trips below, and the cancel needs it.
        self._sessions.record(conn)
        return super().limit_time(conn, seconds)

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        side = side_connect()
        try:
            # Looked up after connecting: as close to the KILL as possible.
            thread_id = self._sessions.current(conn).thread_id
            _execute(side, "KILL QUERY %s", (thread_id,))
        finally:
            side.close()

    def sever(self, conn: Any) -> None:
        session = self._sessions.current(conn)
        if not shutdown_socket(session.fd, session.socket):
            raise RuntimeError(_SOCKET_CHANGED)
