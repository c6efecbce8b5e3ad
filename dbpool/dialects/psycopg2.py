"""psycopg2."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import importlib
import os
import re
import weakref
from collections.abc import Iterator
from typing import Any, Callable

from ..isolation import Isolation
from .base import BROKEN, IDLE, IN_TRANSACTION, Dialect, TxState, _execute, milliseconds
from .psycopg import (
    _IN_FAILED_TRANSACTION,
    _INVALID_CURSOR_NAME,
    _NARROW_TIME_SQL,
    _PQ_IDLE,
    _PQ_INERROR,
    _RETRYABLE_SQLSTATES,
    _STOPPED_BY_LIMIT_SQLSTATES,
    LIBPQ_STATES,
    TIME_LIMITS,
    _begin_sql,
    _rollback_even_two_phase,
    drop_received,
    limits_to_set,
    prepared_two_phase_left,
    set_local_sql,
)

# psycopg2.extensions.STATUS_READY: psycopg2 has no transaction of its own open, so it sends
# BEGIN before the next statement (unless in autocommit); STATUS_PREPARED: after tpc_prepare().
_STATUS_READY = 1
_STATUS_PREPARED = 5

# What client_settings() reads, in the order restore_client_settings() sets them back.
_CLIENT_SETTINGS = ("autocommit", "isolation_level", "readonly", "deferrable", "cursor_factory")


def _encoding_name(server_name: str | None) -> str:
    """The server's name of an encoding (``EUC_JP``, ``SQL_ASCII``) as psycopg2 writes it in
    ``conn.encoding``: its letters and digits only, upper-cased."""
    return "".join(c for c in server_name or "" if c.isalnum()).upper()


class Psycopg2Dialect(Dialect):
    name = "psycopg2"
    limit_time_inside_transaction = True

    # As for psycopg (its dialect says why), but psycopg2 refuses every statement meanwhile.
    exposing_methods = frozenset({"tpc_prepare"})
    # reset() is RESET ALL and SET SESSION AUTHORIZATION DEFAULT: what configure set on the
    # server (a role, statement_timeout, search_path) is gone, and the next borrowers would
    # run as the login user, without its limits.  Only a new connection has it again.
    irreversible_methods = frozenset({"reset"})

    def after_exposure(self, conn: Any) -> None:
        if conn.status == _STATUS_PREPARED:
            raise prepared_two_phase_left()

    def check_new(self, conn: Any) -> None:
        # An asynchronous connection refuses commit(), rollback() and autocommit changes, and
        # its statements return before they have run: every return would find it busy or
        # fail to restore it, and discard it.  (Green threads, with a wait callback, make
        # connections that are synchronous to their caller: those are fine.)
        if getattr(conn, "async_", False):
            raise TypeError(
                "a pooled psycopg2 connection must be synchronous: the pool waits for each "
                "call and ends transactions itself; connect without async_=True"
            )
        # The cancel key is copied out of the connection now, while no other thread has it:
        # psycopg2's close() frees what it is copied from with the GIL let go, so a cancel
        # copying it from another thread could read freed memory.  (psycopg2's own cancel()
        # uses a key it copied as it connected, kept as long as the connection object.)
        libpq = _libpq_cancel()
        if libpq is not None:
            libpq.remember(conn)

    def transaction_state(self, conn: Any) -> TxState:
        if conn.closed:
            return BROKEN
        # conn.info makes an object per call
        state = LIBPQ_STATES.get(conn.get_transaction_status(), BROKEN)
        if state is IDLE and conn.status not in (_STATUS_READY, _STATUS_PREPARED):
            # psycopg2 keeps its own record of the transaction it began and trusts it over
            # libpq's: a COMMIT or ROLLBACK run as a statement ends the server's transaction
            # but not that record, and psycopg2 then sends no BEGIN, so the next borrower's
            # statements would each commit at once and its rollback() undo nothing.  A
            # rollback (one ROLLBACK) puts the record back in step.  Not after tpc_prepare():
            # the prepared transaction is not the pool's to roll back (after_exposure).
            return IN_TRANSACTION
        return state

    def transaction_aborted(self, conn: Any) -> bool:
        return not conn.closed and conn.get_transaction_status() == _PQ_INERROR

    def client_settings(self, conn: Any) -> object:
        # With the cursor factory: it decides what the next borrower's cursors return.  In
        # the order of _CLIENT_SETTINGS; spelled out, as every return reads them.  Then the
        # server messages (notices, notifications) the connection holds: those a lease
        # received are its borrower's, and may name its data.  The client encoding
        # (set_client_encoding()) before them: the next borrower's text would be sent and
        # decoded in it.  And which objects receive those messages (psycopg2 takes any with an
        # append() in their place): one a borrower put there would get the next borrowers'.
        # By identity, as a new empty list equals the one it replaced; the objects themselves
        # too, to put back.  psycopg2 before 2.9.10 leaves the notifications that come with
        # commit(), rollback() and set_session() with libpq until its next statement, the next
        # borrower's: poll() takes them in now (no round trip: it reads what has arrived).
        # Last, the session parameters psycopg2 sends and reads values by, as the server last
        # reported them (libpq keeps them; see _READ_BY).
        if _notifications_taken_in_late():
            conn.poll()
        notices, notifies = conn.notices, conn.notifies
        return (
            conn.autocommit,
            conn.isolation_level,
            conn.readonly,
            conn.deferrable,
            conn.cursor_factory,
            conn.encoding,
            id(notices),
            id(notifies),
            notices,
            notifies,
            _held(notices),
            _held(notifies),
            _read_by(conn),
        )

    def restore_client_settings(self, conn: Any, settings: Any) -> None:
        if settings[0] and not conn.autocommit:
            # The session characteristics first, locally while autocommit is off, then
            # autocommit on with them in force.
            conn.isolation_level, conn.readonly, conn.deferrable = settings[1:4]
            _autocommit_on(conn)
        # Only those that differ, in this order: in autocommit mode psycopg2 sends a SET for
        # each session characteristic assigned, even the value it has.
        for name, value in zip(_CLIENT_SETTINGS, settings):
            if getattr(conn, name) != value:
                setattr(conn, name, value)
        if conn.encoding != settings[5]:
            conn.set_client_encoding(settings[5])
        reported = settings[12]
        if _read_by(conn) != reported:
            # Changed by a statement (set_client_encoding() would have changed conn.encoding
            # too, and was undone above; it sends nothing for the encoding psycopg2 already
            # has): set back with SQL, outside a transaction block, where a rollback would
            # undo it.
            _set_parameters(conn, reported)
        if conn.notices is not settings[8]:
            conn.notices = settings[8]
        if conn.notifies is not settings[9]:
            conn.notifies = settings[9]
        # The messages received since it was opened, on the end; those from before stay.
        for messages, held in zip(settings[8:10], settings[10:12]):
            if held is not None:
                drop_received(messages, held)

    def restore_attribute(self, conn: Any, name: str, value: Any) -> None:
        if name == "autocommit" and value:
            # Even if on: the lease may have turned it off and on again (_autocommit_on).
            _autocommit_on(conn)
        else:
            setattr(conn, name, value)

    def fetches_as_it_goes(self, cursor: Any) -> bool:
        return getattr(cursor, "name", None) is not None  # a named cursor is server-side

    def drops_cursor_cleanly(self, cursor: Any) -> bool:
        return not self.fetches_as_it_goes(cursor)  # as with psycopg

    def close_cursor(self, cursor: Any) -> None:
        try:
            cursor.close()
        except cursor.connection.Error as exc:
            # A named cursor whose transaction ended (cur.connection.commit(), a block's
            # rollback): the server closed it then, and psycopg2 refuses, with no I/O, "named
            # cursor isn't valid anymore", whatever transaction is open now.  A WITH HOLD one
            # it closes whatever the transaction, and if that one was rolled back its CLOSE
            # finds none.  Nothing is left open (a transaction the CLOSE aborted is rolled back
            # next).
            code = getattr(exc, "pgcode", None)
            refused = code is None and isinstance(exc, cursor.connection.ProgrammingError)
            gone = (refused and not cursor.withhold) or code == _INVALID_CURSOR_NAME
            if cursor.name is None or not gone:
                raise

    def ping(self, conn: Any) -> None:
        # psycopg2 sends BEGIN before the first statement unless in autocommit mode
        with _in_autocommit(conn), conn.cursor() as cursor:
            cursor.execute("SELECT 1")

    can_reset_session = True

    def reset_session(self, conn: Any) -> None:
        autocommit = conn.autocommit  # DISCARD ALL refuses to run inside a transaction block
        with _in_autocommit(conn):
            with conn.cursor() as cursor:
                cursor.execute("DISCARD ALL")
                # It also set client_encoding and DateStyle back to what the session started
                # with, which psycopg2 does not read again: it would go on sending and decoding
                # text in the encoding it set last (set_client_encoding(), or configure's), and
                # parses dates in the ISO style only, which it set as it connected if the
                # server's was another.
                encoding = conn.encoding
                if _encoding_name(conn.get_parameter_status("client_encoding")) != encoding:
                    cursor.execute("SELECT set_config('client_encoding', %s, false)", (encoding,))
                if not (conn.get_parameter_status("DateStyle") or "").startswith("ISO"):
                    cursor.execute("SELECT set_config('DateStyle', 'ISO', false)")
                if autocommit:
                    # In autocommit mode psycopg2 keeps these in the session (SET
                    # default_transaction_...), which DISCARD ALL just reset: set them again.
                    for name, value in _session_characteristics(conn):
                        cursor.execute("SELECT set_config(%s, %s, false)", (name, value))
        # What the server said to the previous borrower, kept by psycopg2 on the connection
        for messages in (conn.notices, conn.notifies):
            try:
                messages.clear()
            except AttributeError:
                pass

    def check_begin(self, isolation: Isolation | None, readonly: bool) -> None:
        pass  # every level, and read-only

    def begin(self, conn: Any, isolation: Isolation | None, readonly: bool) -> Any:
        switched = False
        if conn.autocommit:
            if (conn.isolation_level, conn.readonly, conn.deferrable) != (None, None, None):
                # psycopg2 keeps these in the session in autocommit mode: leave it on
                _execute(conn, _begin_sql(isolation, readonly))
                return None
            # Off for the block (no I/O): psycopg2 then sends BEGIN itself and knows it is
            # in a transaction, so named cursors work
            conn.autocommit = False
            switched = True
        token = (conn.isolation_level, conn.readonly, switched)
        conn.set_session(
            isolation_level=isolation.value if isolation is not None else token[0],
            readonly=True if readonly else token[1],
        )
        return token

    def end(self, conn: Any, token: Any) -> None:
        if token is not None:  # None in these attributes means the server default
            conn.isolation_level, conn.readonly, switched = token
            if switched:
                conn.autocommit = True

    # In autocommit mode psycopg2's commit() and rollback() do nothing, so a transaction
    # opened with an explicit BEGIN must be ended with SQL.
    def commit(self, conn: Any) -> None:
        if conn.autocommit:
            _execute(conn, "COMMIT")
        else:
            conn.commit()

    def rollback(self, conn: Any) -> None:
        if conn.autocommit and conn.info.transaction_status != _PQ_IDLE:
            _execute(conn, "ROLLBACK")
            return
        _rollback_even_two_phase(conn)

    def limit_time(self, conn: Any, seconds: float) -> Any:
        limits = limits_to_set(_limits_in_force(conn), milliseconds(seconds))
        _execute(conn, set_local_sql(limits))  # one query; ends with the transaction
        return None

    narrows_commit_wait = True

    def narrow_time(self, conn: Any, seconds: float) -> None:
        _execute(conn, _NARROW_TIME_SQL, (str(milliseconds(seconds)),))

    def cancel(self, conn: Any, side_connect: Callable[[], Any]) -> None:
        # psycopg2's cancel() keeps the GIL while libpq connects to the server and waits for
        # its answer: every thread of the process stops meanwhile, for as long as a connect to
        # a server that does not answer takes.  libpq's own calls, made here, let it go.
        libpq = _libpq_cancel()
        if libpq is None or conn.closed:
            conn.cancel()  # (closed: psycopg2 raises InterfaceError, as it should)
            return
        libpq.send(conn)

    def is_retryable(self, exc: BaseException) -> bool:
        return getattr(exc, "pgcode", None) in _RETRYABLE_SQLSTATES

    def refused_as_aborted(self, exc: BaseException) -> bool:
        return getattr(exc, "pgcode", None) == _IN_FAILED_TRANSACTION

    def stopped_by_limit(self, exc: BaseException) -> bool:
        return getattr(exc, "pgcode", None) in _STOPPED_BY_LIMIT_SQLSTATES


# psycopg2's isolation_level values (psycopg2.extensions.ISOLATION_LEVEL_*)
_PG2_LEVELS = {1: "read committed", 2: "repeatable read", 3: "serializable", 4: "read uncommitted"}


def _session_characteristics(conn: Any) -> list[tuple[str, str]]:
    settings = []
    if conn.isolation_level is not None:
        settings.append(("default_transaction_isolation", _PG2_LEVELS[conn.isolation_level]))
    if conn.readonly is not None:
        settings.append(("default_transaction_read_only", "on" if conn.readonly else "off"))
    if conn.deferrable is not None:
        settings.append(("default_transaction_deferrable", "on" if conn.deferrable else "off"))
    return settings


# Session parameters psycopg2 reads at connect and never again, though it sends and reads
# values by them: a borrower's SET statement changes them on the server only.  The server's
# client_encoding would read the next borrower's text in another encoding than psycopg2's,
# and store it so; its IntervalStyle (sql_standard, postgres_verbose) would have intervals
# parsed wrong; a DateStyle other than ISO fails to parse dates.  No error says so for the
# first two.  The server reports each change (ParameterStatus): comparing costs no round trip.
_READ_BY = ("client_encoding", "DateStyle", "IntervalStyle")


def _read_by(conn: Any) -> tuple[str | None, ...]:
    """The _READ_BY parameters, as the server last reported them."""
    status = conn.get_parameter_status
    return status("client_encoding"), status("DateStyle"), status("IntervalStyle")


def _set_parameters(conn: Any, values: tuple[str | None, ...]) -> None:
    """Set the _READ_BY parameters back to ``values`` where they changed: one round trip."""
    changed = [
        (name, value)
        for name, value, now in zip(_READ_BY, values, _read_by(conn))
        if value is not None and value != now
    ]
    if not changed:  # one libpq did not report at connect (a server before IntervalStyle)
        return
    calls = ", ".join("set_config(%s, %s, false)" for _ in changed)
    with _in_autocommit(conn), conn.cursor() as cursor:
        cursor.execute(f"SELECT {calls}", [part for pair in changed for part in pair])


_READ_LIMITS_SQL = "SELECT " + ", ".join(f"current_setting('{name}')" for name in TIME_LIMITS)


def _limits_in_force(conn: Any) -> list[str]:
    """TIME_LIMITS as in force now, read without fixing the snapshot of the transaction (see
    TIME_LIMITS): before psycopg2 sends its BEGIN, by a SELECT of their own, one round trip;
    in a transaction open already (begun with SQL on an autocommit connection), by SHOW, a
    round trip each, as psycopg2 keeps the last result of a query only."""
    plain_cursor = importlib.import_module("psycopg2.extensions").cursor  # makes tuples

    if conn.status == _STATUS_READY and not conn.autocommit:
        with _in_autocommit(conn), conn.cursor(cursor_factory=plain_cursor) as cursor:
            cursor.execute(_READ_LIMITS_SQL)
            return list(cursor.fetchone())
    shown = []
    with conn.cursor(cursor_factory=plain_cursor) as cursor:
        for name in TIME_LIMITS:
            cursor.execute(f"SHOW {name}")
            shown.append(cursor.fetchone()[0])
    return shown


@contextlib.contextmanager
def _in_autocommit(conn: Any) -> Iterator[None]:
    """Autocommit on for the pool's own statements (psycopg2 then sends no ``BEGIN``), and
    back as it was, with no I/O of its own: the switch is local once the session
    characteristics are at their defaults, but leaving autocommit with any of them set,
    psycopg2 sends a ``SET default_transaction_... TO default`` for each.  Outside autocommit
    they are psycopg2's alone (each ``BEGIN`` carries them): put aside locally meanwhile."""
    autocommit = conn.autocommit
    saved = (conn.isolation_level, conn.readonly, conn.deferrable)
    aside = not autocommit and saved != (None, None, None)
    if aside:
        conn.isolation_level = conn.readonly = conn.deferrable = None  # local: no I/O
    conn.autocommit = True
    try:
        yield
    finally:
        conn.autocommit = autocommit
        if aside:
            conn.isolation_level, conn.readonly, conn.deferrable = saved


def _autocommit_on(conn: Any) -> None:
    """Turn autocommit on with the session characteristics in force.  In autocommit mode
    psycopg2 keeps them in the session (SET default_transaction_...), and turning it off sets
    them back to the server's defaults (each BEGIN then carries them), but turning it on again
    sends nothing: the session would be writable under ``readonly=True``.  Assigned again once
    it is on, each sends its SET."""
    conn.autocommit = True
    for name in _CLIENT_SETTINGS[1:4]:
        value = getattr(conn, name)
        if value is not None:
            setattr(conn, name, value)


@functools.cache
def _notifications_taken_in_late() -> bool:
    """Whether psycopg2 (before 2.9.10) moves the notifications libpq received into
    ``conn.notifies`` only after a statement or a ``poll()``, not after ``commit()``,
    ``rollback()`` or ``set_session()``."""
    psycopg2 = importlib.import_module("psycopg2")
    numbers = re.match(r"(\d+)\.(\d+)\.(\d+)", psycopg2.__version__)
    if numbers is None:
        return True  # unreadable: poll(), which any release takes
    return tuple(int(number) for number in numbers.groups()) < (2, 9, 10)


def _held(messages: Any) -> tuple[int, Any] | None:
    """How many messages psycopg2 holds in ``messages`` (a list, or the deque its docs
    suggest), and the newest, for ``drop_received()``: ``None`` for another object with an
    ``append()``, which psycopg2 also takes (a logger's, say), and whose messages are not the
    pool's to drop."""
    if not isinstance(messages, (list, collections.deque)):
        return None
    return (len(messages), messages[-1]) if messages else (0, None)


class _CancelKey:
    """A libpq ``PGcancel``: what a cancel request needs, copied out of a connection; freed
    with this object, which a cancel under way holds."""

    __slots__ = ("pointer", "_free")

    def __init__(self, pointer: int, free: Callable[[int], None]) -> None:
        self.pointer = pointer
        self._free = free

    def __del__(self) -> None:
        self._free(self.pointer)


class _Libpq:
    """The cancel calls of the libpq psycopg2 itself uses, and the cancel key of each
    connection the pool made."""

    def __init__(
        self,
        get_cancel: Callable[[Any], int | None],
        free_cancel: Callable[[int], None],
        request: Callable[[int, Any, int], int],
    ) -> None:
        self._get_cancel = get_cancel
        self._free_cancel = free_cancel
        self._request = request
        # Weakly keyed: a key goes with its connection object.
        self._keys: weakref.WeakKeyDictionary[Any, _CancelKey] = weakref.WeakKeyDictionary()

    def _copy_key(self, conn: Any) -> _CancelKey | None:
        pointer = self._get_cancel(conn.pgconn_ptr)
        return None if not pointer else _CancelKey(pointer, self._free_cancel)

    def remember(self, conn: Any) -> None:
        """Keep ``conn``'s cancel key; only where no other thread can be closing it."""
        key = self._copy_key(conn)
        if key is not None:
            try:
                self._keys[conn] = key
            except TypeError:  # no weak references: its cancels copy the key as they go
                pass

    def send(self, conn: Any) -> None:
        """Cancel ``conn``'s running statement, the GIL let go while the request is sent."""
        try:
            key = self._keys.get(conn)
        except TypeError:
            key = None
        if key is None:  # a connection the pool did not make (so not closed by the pool)
            key = self._copy_key(conn)
            if key is None:
                raise conn.OperationalError("libpq could not make a cancel request")
        error = ctypes.create_string_buffer(256)
        if not self._request(key.pointer, error, len(error)):
            raise conn.OperationalError(error.value.decode(errors="replace"))


@functools.cache
def _libpq_cancel() -> _Libpq | None:
    """The cancel of a psycopg2 connection's running statement through the libpq psycopg2
    itself uses (found through its extension module), with the GIL let go while the request
    is sent; ``None`` where that libpq or ``pgconn_ptr`` (psycopg2 2.8+) is out of reach."""
    try:
        _psycopg = importlib.import_module("psycopg2._psycopg")
        if not hasattr(_psycopg.connection, "pgconn_ptr"):
            return None
        # The loader binds psycopg2's libpq calls to a libpq already in the process's global
        # scope (preloaded, or linked by an application embedding Python) before the one its
        # wheel ships: look there first too (Windows has no such scope, and its ctypes cannot
        # open None).  Another libpq than psycopg2's would misread its connections (another
        # layout): a version that is not psycopg2's is not used.
        in_scope = os.name != "nt" and hasattr(ctypes.CDLL(None), "PQgetCancel")
        name = None if in_scope else _psycopg.__file__
        # PyDLL keeps the GIL while the cancel key is copied out of the connection, as
        # psycopg2's cancel() does; CDLL lets it go for the request, which uses that copy only.
        holding, releasing = ctypes.PyDLL(name), ctypes.CDLL(name)
        if holding.PQlibVersion() != _psycopg.libpq_version():
            return None
        get_cancel, free_cancel = holding.PQgetCancel, holding.PQfreeCancel
        request = releasing.PQcancel
    except (ImportError, OSError, AttributeError):
        return None
    get_cancel.restype, get_cancel.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    free_cancel.restype, free_cancel.argtypes = None, [ctypes.c_void_p]
    request.restype = ctypes.c_int
    request.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    return _Libpq(get_cancel, free_cancel, request)
