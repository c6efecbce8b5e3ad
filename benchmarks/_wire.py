"""Counting the round trips a server receives, per library, on ordinary driver connections.

PostgreSQL: libpq's protocol trace of each connection (``PGconn.trace``).  Every message that
asks the server for an answer (a simple ``Query``, or the ``Sync`` that closes an
extended-protocol exchange) is one round trip, labelled with its SQL.  This sees what crosses
the wire: psycopg's ``rollback()`` on an idle connection, for one, sends nothing and counts
nothing.  (``pg_stat_statements`` would need the server restarted with the module preloaded,
and it would mix in every other client of the server.)

MariaDB: a PyMySQL ``Connection`` subclass that counts every command packet it sends
(``COM_QUERY`` with its SQL, ``COM_PING``, ...).  Pools detect it as PyMySQL: it is one.

Counting runs in a pass of its own after the timed rounds, so it costs the timings nothing.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import threading
from collections import Counter
from typing import IO, Any

from _libraries import Source

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _label(sql: str) -> str:
    sql = " ".join(sql.split())
    return sql if sql else "empty query (ping)"


def pg_round_trips(before: str, during: str) -> Counter[str]:
    """Round trips in a libpq trace (``SUPPRESS_TIMESTAMPS | REGRESS_MODE``), by SQL.

    Counts those in ``during``; ``before`` (the trace up to then) is read only for the names
    of the statements psycopg prepared: later executions carry the name, not the SQL.
    """
    prepared: dict[str, str] = {}
    _read_trace(before, prepared, Counter())
    counts: Counter[str] = Counter()
    _read_trace(during, prepared, counts)
    return counts


def _read_trace(trace: str, prepared: dict[str, str], counts: Counter[str]) -> None:
    pending: str | None = None  # the SQL of the extended-protocol exchange under way
    for line in trace.splitlines():
        fields = line.split("\t", 3)
        if len(fields) < 3 or fields[0] != "F":
            continue  # what the server sent back
        kind = fields[2]
        quoted = _QUOTED.findall(fields[3]) if len(fields) > 3 else []
        if kind == "Query":
            counts[_label(quoted[0] if quoted else "")] += 1
        elif kind == "Parse" and len(quoted) >= 2:
            name, pending = quoted[0], _label(quoted[1])
            if name:
                prepared[name] = pending
        elif kind == "Bind" and len(quoted) >= 2 and pending is None:
            pending = prepared.get(quoted[1], f"prepared statement {quoted[1]}")
        elif kind == "Sync":
            counts[pending or "extended-protocol exchange"] += 1
            pending = None


class PgWire:
    """Makes psycopg connections whose round trips can be counted between start() and stop().

    Each connection is traced into a file of its own from birth; start() notes where each
    file stands, stop() counts what came after.
    """

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._lock = threading.Lock()
        self._traces: list[tuple[Any, IO[bytes]]] = []
        self._marks: dict[int, int] = {}  # index in _traces -> size when counting started

    def connect(self) -> Any:
        import psycopg

        conn = psycopg.connect(self._dsn)
        self.adopt(conn)
        return conn

    def adopt(self, conn: Any) -> None:
        """Trace this connection too (also psycopg_pool's ``configure`` hook)."""
        file = tempfile.TemporaryFile()  # noqa: SIM115 - outlives this call: stop() closes it
        _trace(conn, file)
        with self._lock:
            self._traces.append((conn, file))

    def source(self) -> Source:
        return Source(connect=self.connect, dsn=self._dsn, configure=self.adopt)

    def start(self) -> None:
        with self._lock:
            for index, (conn, file) in enumerate(self._traces):
                if conn.closed:
                    continue
                conn.pgconn.untrace()  # flushes libpq's buffer into the file
                self._marks[index] = os.fstat(file.fileno()).st_size
                _trace(conn, file)  # a fresh stream, writing on from the end

    def stop(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        with self._lock:
            traces, self._traces = self._traces, []
            marks, self._marks = self._marks, {}
        for index, (conn, file) in enumerate(traces):
            if not conn.closed:
                conn.pgconn.untrace()
            with file:
                if index in marks:
                    file.seek(0)
                    data = file.read()
                    mark = marks[index]
                    counts.update(pg_round_trips(_text(data[:mark]), _text(data[mark:])))
        return counts


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _trace(conn: Any, file: IO[bytes]) -> None:
    from psycopg import pq

    conn.pgconn.trace(file.fileno())
    conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)


@functools.cache
def _counting_pymysql_class() -> Any:
    import pymysql
    from pymysql.constants import COMMAND

    names = {value: name for name, value in vars(COMMAND).items() if name.startswith("COM_")}

    class CountingConnection(pymysql.connections.Connection):  # type: ignore[misc]
        """Counts the command packets sent while ``bench_counts`` is set."""

        bench_counts: Counter[str] | None = None

        def _execute_command(self, command: int, sql: Any) -> Any:
            counts = self.bench_counts
            if counts is not None:
                if command == COMMAND.COM_QUERY:
                    text = sql.decode("utf-8", "replace") if isinstance(sql, bytes) else sql
                    counts[_label(text)] += 1
                else:
                    counts[names.get(command, str(command)).removeprefix("COM_")] += 1
            return super()._execute_command(command, sql)

    return CountingConnection


class MySQLWire:
    """Makes PyMySQL connections whose round trips can be counted between start() and stop()."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params
        self._lock = threading.Lock()
        self._conns: list[Any] = []

    def connect(self) -> Any:
        conn = _counting_pymysql_class()(**self._params)
        with self._lock:
            self._conns.append(conn)
        return conn

    def source(self) -> Source:
        return Source(connect=self.connect)

    def start(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.bench_counts = Counter()

    def stop(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        with self._lock:
            for conn in self._conns:
                if conn.bench_counts is not None:
                    counts.update(conn.bench_counts)
                    conn.bench_counts = None
        return counts
