"""A scriptable fake DB-API 2.0 driver, for pool tests that need exact control.

Each test makes its own :class:`Server` and hands the pool one of its connect methods::

    server = fakedb.Server()
    pool = dbpool.Pool(server.connect, max_size=2)

The server is the test's remote control and its witness:

* it records every driver call as a :class:`Call` (``server.calls``; ``server.count("rollback")``),
  counts connect attempts, and knows which connections are open (``server.open_connections``,
  ``server.peak_open``);
* ``server.kill(conn)`` / ``server.kill_all()`` break connections the way a killed backend does:
  every later call on them raises :class:`OperationalError`, ``closed`` stays False, and
  ``close()`` still succeeds;
* ``server.fail_next(verb, exc, times=1)`` and ``server.fail_on(verb, exc)`` make calls raise
  ``exc`` (an instance or a class, BaseException subclasses such as KeyboardInterrupt included);
* ``server.down()`` / ``server.up()`` refuse or accept new connections, and
  ``server.connect_delay`` makes connecting slow;
* ``server.block(verb)`` returns a :class:`Gate` that holds the next thread making that call
  until ``gate.release()``; ``gate.entered`` is set once a thread is held.

Verbs are ``connect``, ``cursor``, ``execute``, ``ping``, ``commit``, ``rollback``, ``close``,
``cancel`` (the generic flavour's ``cancel()``, made to be called from another thread while a
call runs, as psycopg's is) and, for the pymssql flavour, ``autocommit``.  ``ping`` is an
execute of ``SELECT 1`` (see :data:`PING_SQL`); it is logged, scripted and counted under
``ping``, never under ``execute``.

Connections (:class:`FakeConnection`) follow DB-API implicit transactions: any statement opens a
transaction (``in_transaction`` becomes True) unless ``autocommit`` is True; ``commit()`` and
``rollback()`` end it.  Their class lives in this module, so a pool sees an unknown driver and
uses its generic dialect.

``server.connect_mssql`` returns the pymssql flavour (:class:`FakeMSSQLConnection`), whose
classes claim pymssql's module names so a pool picks its pymssql dialect.  It mirrors what
pymssql exposes to a pool: ``conn._conn.connected``, ``conn.autocommit(bool)``,
``conn.autocommit_state``, no local transaction flag, and pymssql's behaviour on a dead
connection: ``_conn.connected`` stays True until a call notices the dead socket, and rollback
then raises ``_mssql`` exceptions that are not DB-API errors.  Cursors made with ``as_dict``
refuse a result with an unnamed column (``SELECT 1`` has one), as pymssql does.  The server's
``@@TRANCOUNT`` is kept (``server.trancount(conn)``): ``BEGIN TRAN``, ``COMMIT`` and ``ROLLBACK``
run as statements open and end transactions with autocommit on too, where pymssql's
``commit()`` and ``rollback()`` send nothing.  Closing such a
connection while another thread is held inside a call on it is recorded in
``server.closed_under_a_call``: pymssql's ``close()`` frees the FreeTDS structures that call is
still using (the real driver may crash).

Every wait inside the fake is bounded (``Gate.timeout``), so a broken test fails instead of
hanging.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

apilevel = "2.0"
threadsafety = 2
paramstyle = "format"

ExcSpec = Union[BaseException, "type[BaseException]"]

#: Statements that are logged and scripted as the verb ``ping``.
PING_SQL = re.compile(r"\s*select\s+1\s*;?\s*\Z", re.IGNORECASE)

_C = TypeVar("_C", bound="_BaseConnection")

VERBS = frozenset(
    {"connect", "cursor", "execute", "ping", "commit", "rollback", "close", "cancel", "autocommit"}
)


# PEP 249 exceptions.  ``Warning`` shadows the builtin inside this module, as PEP 249 asks.
class Warning(Exception):
    pass


class Error(Exception):
    pass


class InterfaceError(Error):
    pass


class DatabaseError(Error):
    pass


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    pass


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


class ColumnsWithoutNamesError(InterfaceError):
    """pymssql's refusal of an unnamed column in a cursor made with ``as_dict``."""

    def __init__(self, columns_without_names: list[int]) -> None:
        super().__init__(columns_without_names)
        self.columns_without_names = columns_without_names


# pymssql's low-level exceptions: they do not derive from the DB-API ``Error``.
class MSSQLException(Exception):
    __module__ = "pymssql._mssql"


class MSSQLDatabaseException(MSSQLException):
    """As pymssql raises it: one argument, ``(number, message)``, and the number again as
    ``number`` (``cursor.execute()`` turns it into a DB-API error whose ``args`` are that pair;
    ``cursor.executemany()`` with a ``batch_size`` above 1 lets it through as it is)."""

    __module__ = "pymssql._mssql"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        first = args[0] if args else None
        self.number = first[0] if isinstance(first, tuple) and first else 0


class MSSQLDriverException(MSSQLException):
    __module__ = "pymssql._mssql"


def _make_exc(exc: ExcSpec, what: str) -> BaseException:
    if isinstance(exc, BaseException):
        return exc.with_traceback(None)
    if isinstance(exc, type) and issubclass(exc, BaseException):
        return exc(f"fakedb: injected failure of {what}")
    raise TypeError(f"expected an exception instance or class, got {exc!r}")


def _check_verb(verb: str) -> None:
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}; expected one of {sorted(VERBS)}")


def _unwrap(conn: Any) -> _BaseConnection:
    """Accept a fake connection or anything with ``.raw`` (a pool lease)."""
    raw = conn if isinstance(conn, _BaseConnection) else getattr(conn, "raw", None)
    if not isinstance(raw, _BaseConnection):
        raise TypeError(f"not a fakedb connection: {conn!r}")
    return raw


@dataclass
class Call:
    """One driver call as the server saw it.  ``error`` is filled in when the call raised."""

    conn_id: int | None  # None for a connect that failed
    verb: str
    sql: str | None = None
    at: float = field(default_factory=time.monotonic)
    error: BaseException | None = None


class Gate:
    """Holds threads inside a call until released.  Made by :meth:`Server.block`."""

    def __init__(self, verb: str, conn_id: int | None, times: int | None, timeout: float) -> None:
        self.verb = verb
        self.timeout = timeout
        self.entered = threading.Event()  # set once a thread is held
        self._conn_id = conn_id
        self._remaining = times  # None: every matching call until released
        self._cond = threading.Condition()
        self._inside = 0
        self._released = False
        self._exc: ExcSpec | None = None

    @property
    def inside(self) -> int:
        """How many threads are held right now."""
        with self._cond:
            return self._inside

    @property
    def released(self) -> bool:
        with self._cond:
            return self._released

    def release(self, exc: ExcSpec | None = None) -> None:
        """Let the held threads go on; with ``exc``, they raise it instead.  Idempotent."""
        with self._cond:
            if not self._released:
                self._released = True
                self._exc = exc
                self._cond.notify_all()

    def _done(self) -> bool:
        with self._cond:
            return self._released or self._remaining == 0

    def _claim(self, verb: str, conn_id: int | None) -> bool:
        # Called under the server lock.
        with self._cond:
            if self._released or verb != self.verb or self._remaining == 0:
                return False
            if self._conn_id is not None and self._conn_id != conn_id:
                return False
            if self._remaining is not None:
                self._remaining -= 1
            return True

    def _hold(self) -> None:
        with self._cond:
            self._inside += 1
            self.entered.set()
            try:
                released = self._cond.wait_for(lambda: self._released, timeout=self.timeout)
            finally:
                self._inside -= 1
            exc = self._exc
        if not released:
            raise RuntimeError(
                f"fakedb: gate on {self.verb!r} was not released within {self.timeout}s"
            )
        if exc is not None:
            raise _make_exc(exc, f"{self.verb} (gate)")

    def __repr__(self) -> str:
        return f"<Gate {self.verb!r} inside={self.inside} released={self.released}>"


@dataclass
class _Fault:
    verb: str
    exc: ExcSpec
    remaining: int | None  # None: until cleared
    conn_id: int | None


class Server:
    """A fake database server: makes connections, records calls, injects faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._faults: list[_Fault] = []
        self._gates: list[Gate] = []
        self._conns: list[_BaseConnection] = []
        self._results: dict[str, tuple[list[tuple[Any, ...]], Sequence[str]]] = {}
        self._down = False
        self._next_id = 1
        self.peak_open = 0
        self._closed_under_a_call: list[int] = []
        #: Seconds every connect takes before it succeeds or fails.
        self.connect_delay = 0.0

    # -- connecting -------------------------------------------------------------------------

    def connect(self) -> FakeConnection:
        """Open a generic-flavour connection (use as the pool's connect callable)."""
        return self._open(FakeConnection)

    def connect_mssql(self) -> FakeMSSQLConnection:
        """Open a pymssql-flavour connection (autocommit off, like ``pymssql.connect()``)."""
        return self._open(FakeMSSQLConnection)

    def _open(self, cls: type[_C]) -> _C:
        call = self._enter(None, "connect")
        try:
            if self.connect_delay > 0:
                time.sleep(self.connect_delay)
            with self._lock:
                if self._down:
                    raise OperationalError("fakedb: connection refused (server is down)")
                conn = cls(self, self._next_id)
                self._next_id += 1
                self._conns.append(conn)
                call.conn_id = conn.id
                self.peak_open = max(self.peak_open, self._open_count())
            return conn
        except BaseException as exc:
            call.error = exc
            raise

    def down(self) -> None:
        """Refuse new connections (existing ones are untouched: see :meth:`kill_all`)."""
        with self._lock:
            self._down = True

    def up(self) -> None:
        with self._lock:
            self._down = False

    # -- breaking connections ---------------------------------------------------------------

    def kill(self, conn: Any) -> None:
        """Terminate one backend: every later call on ``conn`` fails; ``close()`` still works."""
        raw = _unwrap(conn)
        with self._lock:
            raw._killed = True

    def kill_all(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn._killed = True

    # -- scripting --------------------------------------------------------------------------

    def fail_next(self, verb: str, exc: ExcSpec, times: int = 1, *, conn: Any = None) -> None:
        """Make the next ``times`` calls of ``verb`` (on ``conn``, if given) raise ``exc``."""
        _check_verb(verb)
        if times < 1:
            raise ValueError("times must be >= 1")
        self._add_fault(_Fault(verb, exc, times, None if conn is None else _unwrap(conn).id))

    def fail_on(self, verb: str, exc: ExcSpec, *, conn: Any = None) -> None:
        """Make every call of ``verb`` (on ``conn``, if given) raise ``exc`` until cleared."""
        _check_verb(verb)
        self._add_fault(_Fault(verb, exc, None, None if conn is None else _unwrap(conn).id))

    def _add_fault(self, fault: _Fault) -> None:
        _make_exc(fault.exc, fault.verb)  # reject a bad spec now, not inside the pool
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self, verb: str | None = None) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if verb is not None and f.verb != verb]

    def block(
        self, verb: str, *, times: int | None = 1, conn: Any = None, timeout: float = 10.0
    ) -> Gate:
        """Hold the next ``times`` calls of ``verb`` (all of them if None) until released.

        A held thread gives up after ``timeout`` seconds with RuntimeError.
        """
        _check_verb(verb)
        gate = Gate(verb, None if conn is None else _unwrap(conn).id, times, timeout)
        with self._lock:
            self._gates = [g for g in self._gates if not g._done()]
            self._gates.append(gate)
        return gate

    def release_all(self) -> None:
        """Release every gate (tests' teardown calls this so no thread stays held)."""
        with self._lock:
            gates, self._gates = self._gates, []
        for gate in gates:
            gate.release()

    def set_result(
        self, sql: str, rows: Sequence[Sequence[Any]], columns: Sequence[str] = ("col",)
    ) -> None:
        """Rows returned by executing exactly ``sql`` (compared stripped and case-folded).

        Without one, a SELECT returns ``[(1,)]`` and other statements return no result set.
        """
        with self._lock:
            self._results[_key(sql)] = ([tuple(r) for r in rows], tuple(columns))

    # -- observing --------------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """A snapshot of every call so far, in the order the calls started."""
        with self._lock:
            return list(self._calls)

    def count(self, verb: str, *, conn: Any = None, failed: bool | None = None) -> int:
        """How many ``verb`` calls were made (on ``conn``; only failed / succeeded ones)."""
        _check_verb(verb)
        conn_id = None if conn is None else _unwrap(conn).id
        with self._lock:
            return sum(
                1
                for c in self._calls
                if c.verb == verb
                and (conn_id is None or c.conn_id == conn_id)
                and (failed is None or (c.error is not None) == failed)
            )

    def statements(self, conn: Any = None) -> list[str]:
        """The SQL of every execute and ping (on ``conn``, if given), in order."""
        conn_id = None if conn is None else _unwrap(conn).id
        with self._lock:
            return [
                c.sql
                for c in self._calls
                if c.sql is not None and (conn_id is None or c.conn_id == conn_id)
            ]

    @property
    def connect_attempts(self) -> int:
        return self.count("connect")

    @property
    def connects(self) -> int:
        """Successful connects."""
        return self.count("connect", failed=False)

    @property
    def connections(self) -> list[_BaseConnection]:
        """Every connection ever made, oldest first."""
        with self._lock:
            return list(self._conns)

    @property
    def open_connections(self) -> list[_BaseConnection]:
        """Connections not closed yet (killed ones included), oldest first."""
        with self._lock:
            return [c for c in self._conns if not c._closed]

    @property
    def closed_under_a_call(self) -> list[int]:
        """Ids of pymssql-flavour connections closed while another thread was held inside a
        call on them (see the module's docstring)."""
        with self._lock:
            return list(self._closed_under_a_call)

    def in_transaction(self, conn: Any) -> bool:
        """Whether ``conn`` has work since its last commit/rollback (the server's view)."""
        raw = _unwrap(conn)
        with self._lock:
            return raw._dirty

    def trancount(self, conn: Any) -> int:
        """SQL Server's ``@@TRANCOUNT`` on a pymssql-flavour connection."""
        raw = _unwrap(conn)
        if not isinstance(raw, FakeMSSQLConnection):
            raise TypeError(f"not a pymssql-flavour connection: {conn!r}")
        with self._lock:
            return raw._trancount

    def _open_count(self) -> int:
        return sum(1 for c in self._conns if not c._closed)

    # -- the path of every call -------------------------------------------------------------

    def _enter(self, conn: _BaseConnection | None, verb: str, sql: str | None = None) -> Call:
        """Log a call, hold it at a gate, then raise a scripted fault if one matches.

        Returns the logged call; the caller sets ``call.error`` if it fails later.
        """
        conn_id = None if conn is None else conn.id
        call = Call(conn_id, verb, sql)
        with self._lock:
            self._calls.append(call)
            gate = next((g for g in self._gates if g._claim(verb, conn_id)), None)
            inside = gate is not None and conn is not None and verb != "close"
            if inside:
                conn._held += 1  # type: ignore[union-attr]
        try:
            if gate is not None:
                try:
                    gate._hold()
                finally:
                    if inside:
                        with self._lock:
                            conn._held -= 1  # type: ignore[union-attr]
            with self._lock:
                fault = self._pop_fault(verb, conn_id)
            if fault is not None:
                raise _make_exc(fault, verb)
        except BaseException as exc:
            call.error = exc
            raise
        return call

    def _pop_fault(self, verb: str, conn_id: int | None) -> ExcSpec | None:
        for i, f in enumerate(self._faults):
            if f.verb == verb and (f.conn_id is None or f.conn_id == conn_id):
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining == 0:
                        del self._faults[i]
                return f.exc
        return None

    def _result(
        self, sql: str, columns: Sequence[str] = ("col",)
    ) -> tuple[list[tuple[Any, ...]], Sequence[str] | None]:
        """The rows of ``sql``: scripted, or ``[(1,)]`` in ``columns`` for a SELECT."""
        with self._lock:
            scripted = self._results.get(_key(sql))
        if scripted is not None:
            return list(scripted[0]), scripted[1]
        if _key(sql).startswith("select"):
            return [(1,)], columns
        return [], None

    def __repr__(self) -> str:
        with self._lock:
            state = "down" if self._down else "up"
            return f"<fakedb.Server {state} open={self._open_count()} calls={len(self._calls)}>"


def _key(sql: str) -> str:
    return sql.strip().casefold()


class _BaseConnection:
    """What both flavours share: identity, state, and running a call through the server."""

    # PEP 249's optional extension: the module's exceptions, as attributes of the connection
    # (``except conn.Error``).
    Error = Error
    DatabaseError = DatabaseError
    OperationalError = OperationalError

    def __init__(self, server: Server, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self._closed = False
        self._killed = False
        self._dirty = False  # the server's view: work since the last commit/rollback
        self._autocommit = False
        self._held = 0  # threads held at a gate inside a call on this connection

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def killed(self) -> bool:
        """Whether the server killed this connection (a test-side view, no driver has it)."""
        return self._killed

    def _call(self, verb: str, sql: str | None = None) -> Call:
        """Run the common checks of a call; raise as a closed or killed connection would."""
        call = self.server._enter(self, verb, sql)
        try:
            if self._closed:
                self._raise_closed(verb)
            elif self._killed:
                self._raise_dead(verb)
        except BaseException as exc:
            call.error = exc
            raise
        return call

    def _raise_closed(self, verb: str) -> None:
        raise InterfaceError("fakedb: connection already closed")

    def _raise_dead(self, verb: str) -> None:
        raise OperationalError("fakedb: server closed the connection unexpectedly")

    #: The column of an unscripted ``SELECT 1`` (the ping).
    _ping_columns: Sequence[str] = ("col",)

    def _run(self, sql: str) -> tuple[list[tuple[Any, ...]], Sequence[str] | None]:
        ping = PING_SQL.match(sql) is not None
        call = self._call("ping" if ping else "execute", sql)
        with self.server._lock:
            error = self._ran(sql)
        if error is not None:
            call.error = error
            raise error
        return self.server._result(sql, self._ping_columns if ping else ("col",))

    def _ran(self, sql: str) -> BaseException | None:
        """What running ``sql`` does to the server's transaction (under the server lock); the
        error the statement fails with, if any."""
        if not self._autocommit:
            self._dirty = True
        return None

    def _end_transaction(self, verb: str) -> None:
        self._call(verb)
        with self.server._lock:
            self._dirty = False

    def _close(self) -> None:
        try:
            self.server._enter(self, "close")
        finally:
            # The socket is gone even when close() raises: a failed close leaves nothing open.
            with self.server._lock:
                self._closed = True
                self._dirty = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "killed" if self._killed else "open"
        return f"<{type(self).__name__} id={self.id} {state}>"


class FakeConnection(_BaseConnection):
    """A generic DB-API connection; its class lives in this module (an unknown driver)."""

    @property
    def in_transaction(self) -> bool:
        """True from the first statement until commit/rollback (like ``sqlite3``'s flag)."""
        return self._dirty

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        with self.server._lock:
            self._autocommit = bool(value)

    def cursor(self) -> FakeCursor:
        self._call("cursor")
        return FakeCursor(self)

    def commit(self) -> None:
        self._end_transaction("commit")

    def rollback(self) -> None:
        self._end_transaction("rollback")

    def cancel(self) -> None:
        """Ask the server to stop the statement running on this connection (from another
        thread, as psycopg's ``cancel()``); does nothing to the fake's calls."""
        self._call("cancel")

    def close(self) -> None:
        """Close the connection; succeeds on a killed one and when already closed."""
        self._close()


class FakeCursor:
    """A DB-API cursor over rows the server scripted; fetching is local (no calls logged)."""

    arraysize = 1

    def __init__(self, connection: _BaseConnection) -> None:
        self.connection = connection
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rowcount = -1
        self._rows: list[tuple[Any, ...]] = []
        self._closed = False

    def execute(self, sql: str, params: Any = None) -> None:
        if self._closed:
            raise InterfaceError("fakedb: cursor already closed")
        rows, columns = self.connection._run(sql)
        self._rows = rows
        self.description = (
            None
            if columns is None
            else tuple((c, None, None, None, None, None, None) for c in columns)
        )
        self.rowcount = len(rows) if columns is not None else -1

    def executemany(self, sql: str, seq_of_params: Sequence[Any]) -> None:
        """One ``execute`` call for the whole batch."""
        self.execute(sql)

    def fetchone(self) -> tuple[Any, ...] | None:
        self._check()
        return self._rows.pop(0) if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        self._check()
        n = self.arraysize if size is None else size
        rows, self._rows = self._rows[:n], self._rows[n:]
        return rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        self._check()
        rows, self._rows = self._rows, []
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self

    def __next__(self) -> tuple[Any, ...]:
        row = self.fetchone()
        if row is None:
            raise StopIteration
        return row

    def setinputsizes(self, sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass

    def close(self) -> None:
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise InterfaceError("fakedb: cursor already closed")
        if self.connection.closed:
            raise InterfaceError("fakedb: connection already closed")


class FakeDictCursor(FakeCursor):
    """pymssql's cursor with ``as_dict``: each row a dict keyed by column name; a result with
    an unnamed column raises ColumnsWithoutNamesError (an InterfaceError) from execute()."""

    def execute(self, sql: str, params: Any = None) -> None:
        super().execute(sql, params)
        if self.description is not None:
            names = [column[0] for column in self.description]
            unnamed = [i for i, name in enumerate(names) if not name]
            if unnamed:
                raise ColumnsWithoutNamesError(unnamed)
            self._rows = [dict(zip(names, row)) for row in self._rows]  # type: ignore[misc]


# -- the pymssql flavour ----------------------------------------------------------------------

#: FreeTDS's message for a call on a connection whose socket died.
_DEAD_MESSAGE = b"DB-Lib error message 20047, severity 9:\nDBPROCESS is dead or not enabled\n"

# Statements that change SQL Server's @@TRANCOUNT.  A named ROLLBACK TRANSACTION goes back to a
# savepoint and changes nothing; COMMIT and ROLLBACK with none open fail (3902, 3903).
_BEGIN_TRAN = re.compile(r"\s*begin\s+tran(saction)?\b", re.IGNORECASE)
_COMMIT_TRAN = re.compile(
    r"\s*commit(\s+(tran|transaction)(\s+\w+)?|\s+work)?\s*;?\s*\Z", re.IGNORECASE
)
_ROLLBACK_TRAN = re.compile(r"\s*rollback(\s+(tran|transaction|work))?\s*;?\s*\Z", re.IGNORECASE)
_ROLLBACK_IF_OPEN = re.compile(
    r"\s*if\s+@@trancount\s*>\s*0\s+rollback(\s+(tran|transaction|work))?\s*;?\s*\Z",
    re.IGNORECASE,
)
# What dbpool's pymssql dialect sends to put back the one transaction pymssql keeps open.
_ONE_OPEN = re.compile(
    r"\s*if\s+@@trancount\s*<>\s*1\s+begin\s+if\s+@@trancount\s*>\s*0\s+rollback\s+"
    r"transaction\s*;\s*begin\s+transaction\s+end\s*;?\s*\Z",
    re.IGNORECASE,
)
_NO_BEGIN_FOR_COMMIT = (
    b"The COMMIT TRANSACTION request has no corresponding BEGIN TRANSACTION.DB-Lib error "
    b"message 20018, severity 16:\nGeneral SQL Server error: Check messages from the SQL Server\n"
)
_NO_BEGIN_FOR_ROLLBACK = (
    b"The ROLLBACK TRANSACTION request has no corresponding BEGIN TRANSACTION.DB-Lib error "
    b"message 20018, severity 16:\nGeneral SQL Server error: Check messages from the SQL Server\n"
)


class FakeMSSQLSocket:
    """Mirrors ``pymssql._mssql.MSSQLConnection``, reached as ``conn._conn``."""

    __module__ = "pymssql._mssql"

    def __init__(self) -> None:
        self._connected = True

    @property
    def connected(self) -> bool:
        """True while the socket is believed open: a killed backend is noticed on next use."""
        return self._connected


class FakeMSSQLConnection(_BaseConnection):
    """Mirrors ``pymssql.Connection`` with autocommit off.

    pymssql keeps a server-side transaction open at all times (``BEGIN TRAN`` after connect,
    commit and rollback) and has no local flag saying whether work is pending.  The server's
    ``@@TRANCOUNT`` is kept (``server.trancount(conn)``): ``BEGIN TRAN``, ``COMMIT`` and
    ``ROLLBACK`` run as statements change it as SQL Server does, with autocommit on too, where
    pymssql's ``commit()`` and ``rollback()`` send nothing; ``autocommit(True)`` sends
    ``ROLLBACK TRAN``, which fails, as a low-level ``_mssql`` error, with none open.
    """

    __module__ = "pymssql._pymssql"

    _ping_columns = ("",)  # SQL Server names no column of SELECT 1

    def __init__(self, server: Server, conn_id: int) -> None:
        super().__init__(server, conn_id)
        self._socket: FakeMSSQLSocket | None = FakeMSSQLSocket()
        self._trancount = 1  # pymssql.connect() sends BEGIN TRAN

    def _ran(self, sql: str) -> BaseException | None:
        if _ONE_OPEN.match(sql):
            if self._trancount != 1:
                self._trancount = 1
                self._dirty = False
        elif _ROLLBACK_IF_OPEN.match(sql):
            self._trancount = 0
            self._dirty = False
        elif _ROLLBACK_TRAN.match(sql):
            if self._trancount == 0:
                return OperationalError(3903, _NO_BEGIN_FOR_ROLLBACK)
            self._trancount = 0
            self._dirty = False
        elif _COMMIT_TRAN.match(sql):
            if self._trancount == 0:
                return OperationalError(3902, _NO_BEGIN_FOR_COMMIT)
            self._trancount -= 1  # only the outermost COMMIT commits
            self._dirty = self._dirty and self._trancount > 0
        elif _BEGIN_TRAN.match(sql):
            self._trancount += 1
            self._dirty = True
        elif self._trancount > 0:
            self._dirty = True
        return None

    @property
    def _conn(self) -> FakeMSSQLSocket:
        if self._socket is None:
            raise InterfaceError("Connection is closed.")
        return self._socket

    @property
    def autocommit_state(self) -> bool:
        return self._autocommit

    def autocommit(self, status: bool) -> None:
        if bool(status) == self._autocommit:
            return  # no round trip, like pymssql
        call = self._call("autocommit")
        with self.server._lock:
            if status and self._trancount == 0:
                # ROLLBACK TRAN with none open: pymssql lets the low-level error through
                error = MSSQLDatabaseException((3903, _NO_BEGIN_FOR_ROLLBACK))
            else:
                error = None
                self._autocommit = bool(status)
                if status:  # ROLLBACK TRAN
                    self._trancount = 0
                    self._dirty = False
                else:  # BEGIN TRAN
                    self._trancount += 1
        if error is not None:
            call.error = error
            raise error

    #: pymssql.connect(as_dict=True): cursors make dicts, keyed by column name
    as_dict = False

    def cursor(self, as_dict: bool | None = None) -> FakeCursor:
        self._call("cursor")
        if self.as_dict if as_dict is None else as_dict:
            return FakeDictCursor(self)
        return FakeCursor(self)

    def commit(self) -> None:
        if self._autocommit:
            return  # sends nothing, whatever a BEGIN TRAN statement opened
        call = self._call("commit")
        with self.server._lock:
            if self._trancount == 0:  # COMMIT TRAN fails, and no BEGIN TRAN follows
                error: BaseException | None = OperationalError(
                    f"Cannot commit transaction: {(3902, _NO_BEGIN_FOR_COMMIT)}"
                )
            else:
                error = None
                self._trancount -= 1  # COMMIT TRAN: only the outermost commits
                self._dirty = self._dirty and self._trancount > 0
                self._trancount += 1  # BEGIN TRAN
        if error is not None:
            call.error = error
            raise error

    def rollback(self) -> None:
        if self._autocommit:
            return  # sends nothing, whatever a BEGIN TRAN statement opened
        self._call("rollback")
        with self.server._lock:
            # ROLLBACK TRAN (its error with none open ignored), then BEGIN TRAN
            self._trancount = 1
            self._dirty = False

    def close(self) -> None:
        with self.server._lock:
            if self._held and self._socket is not None:
                # pymssql's close() runs FreeTDS's dbclose(), which frees the DBPROCESS the
                # other thread's call is still using.
                self.server._closed_under_a_call.append(self.id)
        try:
            self._close()
        finally:
            self._socket = None

    def _raise_closed(self, verb: str) -> None:
        # pymssql reaches the socket through ``_conn``, which refuses once closed.
        if verb == "cursor":
            return  # making a cursor does not touch the socket
        if verb == "commit":
            raise OperationalError("Cannot commit transaction: Connection is closed.")
        raise InterfaceError("Connection is closed.")

    def _raise_dead(self, verb: str) -> None:
        if verb == "cursor":
            return  # making a cursor does not touch the socket
        socket = self._conn
        first = socket._connected
        socket._connected = False  # this call noticed the dead socket
        if verb in ("rollback", "autocommit"):
            # pymssql re-raises the low-level exception here, not a DB-API error.
            if first:
                raise MSSQLDatabaseException((20047, _DEAD_MESSAGE))
            raise MSSQLDriverException("Not connected to any MS SQL server")
        if verb == "commit":
            # commit() wraps whatever the low-level call raised, with str() of its args[0]
            if first:
                raise OperationalError(f"Cannot commit transaction: {(20047, _DEAD_MESSAGE)}")
            raise OperationalError("Cannot commit transaction: Not connected to any MS SQL server")
        if first:  # cursor.execute(): the error's number and message, as two arguments
            raise OperationalError(20047, _DEAD_MESSAGE)
        raise InterfaceError("Not connected to any MS SQL server")


# -- module-level connect() -------------------------------------------------------------------

#: The server that the module-level :func:`connect` talks to.  Tests should make their own.
default_server = Server()


def connect(server: Server | None = None) -> FakeConnection:
    """PEP 249 entry point: a connection to ``server`` (default: :data:`default_server`)."""
    return (server or default_server).connect()


__all__ = [
    "apilevel",
    "threadsafety",
    "paramstyle",
    "connect",
    "Server",
    "Gate",
    "Call",
    "FakeConnection",
    "FakeCursor",
    "FakeMSSQLConnection",
    "FakeMSSQLSocket",
    "PING_SQL",
    "VERBS",
    "Warning",
    "Error",
    "InterfaceError",
    "DatabaseError",
    "DataError",
    "OperationalError",
    "IntegrityError",
    "InternalError",
    "ProgrammingError",
    "NotSupportedError",
    "MSSQLException",
    "MSSQLDatabaseException",
    "MSSQLDriverException",
    "ColumnsWithoutNamesError",
]
