"""Test fixtures: the real database servers, the fake driver, and guards against leaks.

Servers are found through environment variables (defaults: the local servers):

* ``DBPOOL_TEST_POSTGRESQL_DSN``: a libpq conninfo string or URI for psycopg.
* ``DBPOOL_TEST_MYSQL_DSN``: ``mysql://user:password@host:port/database?option=value`` for PyMySQL.
* ``DBPOOL_TEST_MSSQL_DSN``: ``mssql://user:password@host:port/database`` for pymssql; optional,
  its tests skip when it is unset.

A server that cannot be reached, or whose driver is missing, skips its tests with the reason.
With ``DBPOOL_REQUIRE_SERVERS=1`` (as CI sets it) that is a failure instead, so a run can never
pass without them.

Fixtures:

* ``pg_connect``, ``mysql_connect``, ``sqlite_connect``, ``mssql_connect``: zero-argument
  callables returning a new driver connection (closed at the end of the test if still open);
* ``db``: parametrized over sqlite, postgresql and mysql; a :class:`Backend`;
* ``fake_server``: a :class:`tests.fakedb.Server`;
* ``link``: parametrized over postgresql and mysql; a :class:`Link`, the server behind a
  :class:`tests.faultproxy.FaultProxy` and a connect callable that goes through it.

:func:`wait_until` is how tests wait for a condition; they never sleep and hope.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

import dbpool
import dbpool.pool
from tests import fakedb
from tests.faultproxy import FaultProxy, Mode

PG_ENV = "DBPOOL_TEST_POSTGRESQL_DSN"
MYSQL_ENV = "DBPOOL_TEST_MYSQL_DSN"
MSSQL_ENV = "DBPOOL_TEST_MSSQL_DSN"
REQUIRE_ENV = "DBPOOL_REQUIRE_SERVERS"

PG_DEFAULT = "host=127.0.0.1 port=5432 dbname=test user=postgres"
MYSQL_DEFAULT = "mysql://root@127.0.0.1:3306/test"

CONNECT_TIMEOUT = 10  # seconds, for every connection the fixtures open


def _trace_instructions_once() -> None:
    """Trace one call with per-instruction events.  CPython 3.12.1 gives none to the first
    function a process traces so: the tests that raise at chosen instructions (a signal
    handler's stand-in) would find or reach none of them in the first such test."""

    def local(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    def traced() -> int:
        return 1

    # A tracer already set (coverage's, a debugger's) is put back: unset, it would trace
    # nothing more in this thread
    previous = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local if frame.f_code is traced.__code__ else None)
    try:
        traced()
    finally:
        sys.settrace(previous)


_trace_instructions_once()


# -- helpers -----------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, message: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails the test (AssertionError) if it is still falsy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout}s: {predicate!r}")
        time.sleep(interval)


def rows(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a lease, a transaction or a driver connection; its rows as tuples."""
    cur = conn.cursor()
    try:
        if params is None:
            cur.execute(sql)
        else:
            cur.execute(sql, params)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []
    finally:
        cur.close()


def scalar(conn: Any, sql: str, params: Any = None) -> Any:
    """The first column of the first row of one statement."""
    return rows(conn, sql, params)[0][0]


#: Every discard reason the pool counts (written out: the tests check the public names).
DISCARD_REASONS = {
    "broken",
    "check_failed",
    "expired",
    "idle",
    "reset_failed",
    "session_reset",
    "resized",
    "interrupted",
    "requested",
}


def links(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception chained to it (cause and context)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]


def stop_maintenance(pool: Any) -> None:
    """End the pool's maintenance thread (it stops once its wakeup is no longer the pool's), so
    that only the test's own calls return garbage-collected leases."""
    old = pool._reaper_wakeup
    pool._reaper_wakeup = threading.Event()
    old.set()
    pool._reaper_thread.join(5)
    assert not pool._reaper_thread.is_alive()


def assert_accounting(pool: Any, *, resized: bool = False) -> Any:
    """The pool's invariants, read through its public stats; returns the snapshot.
    ``resized``: max_size was lowered, so size may exceed it until the leases come back."""
    s = pool.stats()
    assert s.size == s.idle + s.in_use + s.opening, s
    assert min(s.size, s.idle, s.in_use, s.opening, s.waiting) >= 0, s
    if not resized:
        assert s.size <= s.max_size, s
    return s


def probe(raw: Any) -> None:
    """A check hook that proves a driver connection works and leaves no transaction open."""
    cur = raw.cursor()
    try:
        cur.execute("SELECT 'alive'")
        cur.fetchall()
    finally:
        cur.close()
    raw.rollback()


def wait_for_child(pid: int, timeout: float) -> int:
    """The child's exit code; kill it and fail if it has not exited within ``timeout``."""

    def exited() -> Any:
        done, status = os.waitpid(pid, os.WNOHANG)
        return (status,) if done == pid else None

    try:
        (status,) = wait_until(exited, timeout=timeout, message=f"child {pid} still running")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return os.waitstatus_to_exitcode(status)


def child_report(pid: int, read_fd: int, timeout: float) -> tuple[int, dict[str, Any]]:
    """A forked child's exit code and the JSON report it wrote to the pipe ``read_fd`` (closed
    here); kill it and fail if it has not exited within ``timeout``."""
    try:
        code = wait_for_child(pid, timeout=timeout)
        with os.fdopen(read_fd, "rb") as pipe:
            read_fd = -1
            report: dict[str, Any] = json.loads(pipe.read() or b"{}")
    finally:
        if read_fd >= 0:
            os.close(read_fd)
    return code, report


def in_child(body: Callable[[], Any], timeout: float = 10.0) -> dict[str, Any]:
    """Run ``body`` in a forked child: ``{"result": ...}`` or ``{"error": traceback}`` as the
    parent reads it.  The child always ends with os._exit(); one still running after
    ``timeout`` seconds is killed and the test fails."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        report: dict[str, Any] = {}
        try:
            os.close(read_fd)
            report["result"] = body()
        except BaseException as exc:
            report["error"] = "".join(traceback.format_exception(exc))[-4000:]
        finally:
            try:
                os.write(write_fd, json.dumps(report, default=repr).encode())
            finally:
                os._exit(0)
    os.close(write_fd)
    code, report = child_report(pid, read_fd, timeout=timeout)
    assert code == 0, f"child exited {code}: {report}"
    return report


def servers_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip, or fail when servers are required."""
    if servers_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set)", pytrace=False)
    pytest.skip(reason)


def mysql_kwargs(dsn: str) -> dict[str, Any]:
    """PyMySQL ``connect()`` arguments from ``mysql://user:password@host:port/db?opt=value``."""
    url = urlsplit(dsn)
    if url.scheme not in ("mysql", "mariadb"):
        raise ValueError(f"{MYSQL_ENV} must be a mysql:// URL, not {url.scheme!r}")
    kwargs: dict[str, Any] = {
        "host": url.hostname or "127.0.0.1",
        "port": url.port or 3306,
        "user": unquote(url.username) if url.username else "root",
        "password": unquote(url.password) if url.password else "",
        "connect_timeout": CONNECT_TIMEOUT,
    }
    database = unquote(url.path.lstrip("/"))
    if database:
        kwargs["database"] = database
    for key, value in parse_qsl(url.query):
        kwargs[key] = int(value) if value.isdigit() else value
    return kwargs


def mssql_kwargs(dsn: str) -> dict[str, Any]:
    """pymssql ``connect()`` arguments from ``mssql://user:password@host:port/db``."""
    url = urlsplit(dsn)
    if url.scheme != "mssql":
        raise ValueError(f"{MSSQL_ENV} must be an mssql:// URL, not {url.scheme!r}")
    kwargs: dict[str, Any] = {
        "server": url.hostname or "127.0.0.1",
        "port": str(url.port or 1433),
        "user": unquote(url.username or ""),
        "password": unquote(url.password or ""),
        "database": unquote(url.path.lstrip("/")),
        "login_timeout": CONNECT_TIMEOUT,
    }
    kwargs.update(parse_qsl(url.query))
    return kwargs


def describe_pg(dsn: str) -> str:
    """The DSN without its password, for messages."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    return " ".join(f"{k}={v}" for k, v in params.items() if k != "password")


def describe_url(kwargs: dict[str, Any]) -> str:
    host = kwargs.get("host") or kwargs.get("server")
    return f"{kwargs.get('user')}@{host}:{kwargs.get('port')}/{kwargs.get('database', '')}"


class Connector:
    """A zero-argument connect callable that remembers its connections, to close leftovers."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._made: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        conn = self._connect()
        with self._lock:
            self._made.append(conn)
        return conn

    def close_all(self) -> None:
        with self._lock:
            made, self._made = self._made, []
        for conn in made:
            try:
                conn.close()
            except Exception:
                pass  # already closed, or killed by the test


# -- server probes (once per session) ----------------------------------------------------------


@pytest.fixture(scope="session")
def postgresql_dsn() -> str:
    """The PostgreSQL DSN, once a connection to it has worked."""
    try:
        import psycopg
    except ImportError as exc:
        unavailable(f"psycopg is not installed: {exc}")
    dsn = os.environ.get(PG_ENV, PG_DEFAULT)
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL ({describe_pg(dsn)}) is not reachable: {exc}")
    return dsn


@pytest.fixture(scope="session")
def mysql_params() -> dict[str, Any]:
    """PyMySQL connect arguments, once a connection with them has worked."""
    try:
        import pymysql
    except ImportError as exc:
        unavailable(f"PyMySQL is not installed: {exc}")
    kwargs = mysql_kwargs(os.environ.get(MYSQL_ENV, MYSQL_DEFAULT))
    try:
        conn = pymysql.connect(**{**kwargs, "connect_timeout": 5})
        conn.close()
    except pymysql.Error as exc:
        unavailable(f"MariaDB/MySQL ({describe_url(kwargs)}) is not reachable: {exc}")
    return kwargs


@pytest.fixture(scope="session")
def mssql_params() -> dict[str, Any]:
    """pymssql connect arguments; SQL Server tests run only when their DSN is set."""
    dsn = os.environ.get(MSSQL_ENV)
    if not dsn:
        pytest.skip(f"{MSSQL_ENV} is not set")
    try:
        import pymssql
    except ImportError as exc:
        unavailable(f"pymssql is not installed: {exc}")
    kwargs = mssql_kwargs(dsn)
    try:
        pymssql.connect(**kwargs).close()
    except (pymssql.Error, pymssql._mssql.MSSQLException) as exc:
        unavailable(f"SQL Server ({describe_url(kwargs)}) is not reachable: {exc}")
    return kwargs


# -- connect callables -------------------------------------------------------------------------


@pytest.fixture
def pg_connect(postgresql_dsn: str) -> Iterator[Connector]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    extra = (
        {}
        if "connect_timeout" in conninfo_to_dict(postgresql_dsn)
        else {"connect_timeout": CONNECT_TIMEOUT}
    )
    connector = Connector(lambda: psycopg.connect(postgresql_dsn, **extra))
    yield connector
    connector.close_all()


@pytest.fixture
def mysql_connect(mysql_params: dict[str, Any]) -> Iterator[Connector]:
    import pymysql

    connector = Connector(lambda: pymysql.connect(**mysql_params))
    yield connector
    connector.close_all()


@pytest.fixture
def psycopg2_connect(postgresql_dsn: str) -> Iterator[Connector]:
    try:
        import psycopg2
    except ImportError as exc:
        unavailable(f"psycopg2 is not installed: {exc}")
    connector = Connector(lambda: psycopg2.connect(postgresql_dsn, connect_timeout=CONNECT_TIMEOUT))
    yield connector
    connector.close_all()


@pytest.fixture
def mysqlclient_connect(mysql_params: dict[str, Any]) -> Iterator[Connector]:
    try:
        import MySQLdb
    except ImportError as exc:
        unavailable(f"mysqlclient is not installed: {exc}")
    params = dict(mysql_params)  # the same arguments as PyMySQL's
    connector = Connector(lambda: MySQLdb.connect(**params))
    yield connector
    connector.close_all()


@pytest.fixture
def mssql_connect(mssql_params: dict[str, Any]) -> Iterator[Connector]:
    import pymssql

    connector = Connector(lambda: pymssql.connect(**mssql_params))
    yield connector
    connector.close_all()


@pytest.fixture
def sqlite_connect(tmp_path: Any) -> Iterator[Connector]:
    path = str(tmp_path / "db.sqlite3")
    connector = Connector(lambda: sqlite3.connect(path, check_same_thread=False))
    yield connector
    connector.close_all()


@pytest.fixture
def sqlite_pools(sqlite_connect: Any) -> Iterator[Any]:
    """A factory of SQLite pools (min_size 0), closed at the end of the test."""
    pools: list[dbpool.Pool[Any]] = []

    def make(**options: Any) -> dbpool.Pool[Any]:
        options.setdefault("min_size", 0)
        options.setdefault("acquire_timeout", 5.0)
        pool = dbpool.Pool(sqlite_connect, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(timeout=1)


# -- the fake driver's pools, and calls run in threads ------------------------------------------


@pytest.fixture
def server(fake_server: fakedb.Server) -> fakedb.Server:
    return fake_server


@pytest.fixture
def make_pool(server: fakedb.Server) -> Iterator[Callable[..., Any]]:
    """A factory of pools on the fake driver (min_size 0, acquire_timeout 5 s by default),
    closed at the end of the test; a test module may define its own."""
    import dbpool

    pools: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("min_size", 0)
        options.setdefault("acquire_timeout", 5.0)
        pool = dbpool.Pool(options.pop("connect", server.connect), **options)
        pools.append(pool)
        return pool

    yield make
    server.release_all()
    for pool in pools:
        pool.close(timeout=1)


class Caller:
    """Runs one call in a daemon thread of its own and records how it ended."""

    def __init__(self, call: Callable[[], Any], name: str = "caller") -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.value = call()
        except BaseException as exc:  # reported to the test
            self.error = exc
        finally:
            self.done.set()

    def outcome(self, timeout: float = 10.0) -> BaseException | None:
        """Wait for the call to end; its exception, or None if it returned."""
        assert self.done.wait(timeout), f"{self.thread.name} still running after {timeout}s"
        self.thread.join(timeout)
        return self.error


# -- the db fixture: one real backend ----------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Backend:
    """One real database, as a test sees it.

    ``name``: "sqlite", "postgresql" or "mysql"; ``connect``: a zero-argument connect callable;
    ``placeholder``: the driver's parameter marker; ``driver``: the DB-API module (for
    ``driver.Error``).
    """

    def __init__(
        self, name: str, connect: Connector, driver: Any, admin_connect: Callable[[], Any]
    ) -> None:
        self.name = name
        self.connect = connect
        self.driver = driver
        self.placeholder = "?" if name == "sqlite" else "%s"
        self._admin_connect = admin_connect
        self._admin: Any = None
        self._tables: list[str] = []

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"

    def backend_id(self, conn: Any) -> Any:
        """The server's id of this session (PostgreSQL pid, MariaDB thread id)."""
        raw = getattr(conn, "raw", conn)  # a pool lease or a driver connection
        if self.name == "postgresql":
            return raw.info.backend_pid
        if self.name == "mysql":
            return raw.thread_id()
        return id(raw)

    def kill(self, conn: Any) -> None:
        """Kill this session from another connection, and wait until the server dropped it."""
        raw = getattr(conn, "raw", conn)
        if self.name == "sqlite":
            raw.close()
            return
        session = self.backend_id(raw)
        if self.name == "postgresql":
            self._admin_execute("select pg_terminate_backend(%s)", (session,))
            alive = "select 1 from pg_stat_activity where pid = %s"
        else:
            self._admin_execute(f"KILL CONNECTION {int(session)}")
            alive = "select 1 from information_schema.processlist where id = %s"
        wait_until(
            lambda: not self._admin_execute(alive, (session,)),
            timeout=10,
            message=f"{self.name} session {session} still alive after kill",
        )

    def fresh_table(self, name: str) -> str:
        """Create an empty table ``name (id int primary key, v text)``; dropped after the test."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain table name: {name!r}")
        suffix = " ENGINE=InnoDB" if self.name == "mysql" else ""
        self._admin_execute(f"DROP TABLE IF EXISTS {name}")
        self._admin_execute(f"CREATE TABLE {name} (id int primary key, v text){suffix}")
        if name not in self._tables:
            self._tables.append(name)
        return name

    def _admin_execute(self, sql: str, params: tuple[Any, ...] | None = None) -> list[Any]:
        if self._admin is None:
            self._admin = self._open_admin()
        cur = self._admin.cursor()
        try:
            cur.execute(sql, params or ())
            rows = cur.fetchall() if cur.description else []
            if self.name == "sqlite":
                self._admin.commit()
            return list(rows)
        finally:
            cur.close()

    def _open_admin(self) -> Any:
        conn = self._admin_connect()
        if self.name == "postgresql":
            conn.autocommit = True
            conn.execute("SET lock_timeout = '5s'")
        elif self.name == "mysql":
            conn.autocommit(True)
            conn.cursor().execute("SET SESSION lock_wait_timeout = 5")
        return conn

    def cleanup(self) -> None:
        """Close the test's connections, drop its tables, close the admin connection."""
        self.connect.close_all()  # so no transaction left open holds a lock on the tables
        try:
            for table in self._tables:
                self._admin_execute(f"DROP TABLE IF EXISTS {table}")
        finally:
            if self._admin is not None:
                self._admin.close()
                self._admin = None


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def db(request: pytest.FixtureRequest) -> Iterator[Backend]:
    name = request.param
    if name == "sqlite":
        connect = request.getfixturevalue("sqlite_connect")
        driver: Any = sqlite3
        admin_connect: Callable[[], Any] = connect._connect
    elif name == "postgresql":
        import psycopg

        connect = request.getfixturevalue("pg_connect")
        driver, admin_connect = psycopg, connect._connect
    else:
        import pymysql

        connect = request.getfixturevalue("mysql_connect")
        driver, admin_connect = pymysql, connect._connect
    backend = Backend(name, connect, driver, admin_connect)
    yield backend
    backend.cleanup()


@pytest.fixture
def fake_server() -> Iterator[fakedb.Server]:
    server = fakedb.Server()
    yield server
    server.release_all()


# -- a real server behind a fault-injecting proxy -----------------------------------------


class Link:
    """A server behind a proxy, and a connect callable that goes through it."""

    def __init__(
        self, name: str, proxy: FaultProxy, connect: Callable[[], Any], lost: tuple[type, ...]
    ) -> None:
        self.name = name
        self.proxy = proxy
        self.connect = connect
        self.lost = lost  # what the driver raises on a connection cut under it


def _pg_link(request: pytest.FixtureRequest, proxy: FaultProxy) -> Link:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(request.getfixturevalue("postgresql_dsn"))
    params.update(host="127.0.0.1", port=proxy.port, sslmode="disable")
    params.pop("hostaddr", None)
    params.pop("connect_timeout", None)  # no driver timeout: the pool's bounds are on trial
    return Link("postgresql", proxy, lambda: psycopg.connect(**params), (psycopg.OperationalError,))


def _mysql_link(request: pytest.FixtureRequest, proxy: FaultProxy) -> Link:
    import pymysql

    params = dict(request.getfixturevalue("mysql_params"))
    params.update(host="127.0.0.1", port=proxy.port)
    params.pop("read_timeout", None)
    params.pop("write_timeout", None)
    lost = (pymysql.OperationalError, pymysql.InterfaceError)
    return Link("mysql", proxy, lambda: pymysql.connect(**params), lost)


@pytest.fixture(params=["postgresql", "mysql"])
def link(request: pytest.FixtureRequest) -> Iterator[Link]:
    upstream_port = 5432 if request.param == "postgresql" else 3306
    if request.param == "postgresql":
        from psycopg.conninfo import conninfo_to_dict

        upstream_port = int(
            conninfo_to_dict(request.getfixturevalue("postgresql_dsn")).get("port", 5432)
        )
    else:
        upstream_port = int(request.getfixturevalue("mysql_params").get("port", 3306))
    with FaultProxy(upstream=("127.0.0.1", upstream_port)) as proxy:
        make = _pg_link if request.param == "postgresql" else _mysql_link
        yield make(request, proxy)
        proxy.latency = 0.0
        proxy.set_mode(Mode.PASS)
        proxy.drop_all()  # hung connects and queries fail now, and their threads end


def heal(link: Link) -> None:
    link.proxy.set_mode(Mode.PASS)
    link.proxy.drop_all()


# -- markers and leak guard --------------------------------------------------------------------

_MARKER_FIXTURES = {
    "pg_connect": "postgresql",
    "postgresql_dsn": "postgresql",
    "mysql_connect": "mysql",
    "mysql_params": "mysql",
    "mssql_connect": "mssql",
    "mssql_params": "mssql",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use a server's fixtures, so ``-m "not mysql"`` leaves them out."""
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            marker = _MARKER_FIXTURES.get(fixture)
            if marker and not item.get_closest_marker(marker):
                item.add_marker(marker)


def _open_pools() -> list[Any]:
    pool_class = getattr(sys.modules.get("dbpool"), "Pool", None)
    if not isinstance(pool_class, type):
        return []
    return [o for o in gc.get_objects() if isinstance(o, pool_class) and not o.closed]


@pytest.fixture(autouse=True)
def leak_guard() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running or pools open."""
    threads_before = set(threading.enumerate())
    pools_before = {id(p): p for p in _open_pools()}
    yield

    def leftover_threads() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in threads_before and not t.daemon and t.is_alive()
        ]

    try:
        wait_until(lambda: not leftover_threads(), timeout=2.0)
    except AssertionError:
        pass
    problems = [f"thread still running: {t!r}" for t in leftover_threads()]
    for pool in _open_pools():
        if id(pool) not in pools_before:
            problems.append(f"pool left open: {pool!r}")
            pool.close(timeout=1.0)
    if problems:
        pytest.fail("test leaked resources:\n  " + "\n  ".join(problems), pytrace=False)


class Recorder:
    """A listener that keeps every event with the thread it ran in, and an optional probe."""

    def __init__(self, also: Callable[[Any], Any] | None = None) -> None:
        self.events: list[Any] = []
        self.threads: list[int] = []
        self.probed: list[Any] = []
        self._also = also
        self._lock = threading.Lock()

    def __call__(self, event: Any) -> None:
        extra = self._also(event) if self._also is not None else None
        with self._lock:
            self.events.append(event)
            self.threads.append(threading.get_ident())
            self.probed.append(extra)

    def of(self, kind: str) -> list[Any]:
        with self._lock:
            return [e for e in self.events if e.event == kind]

    def kinds(self) -> list[str]:
        with self._lock:
            return [str(e.event.value) for e in self.events]

    def listen_to_all(self, pool: dbpool.Pool[Any]) -> Recorder:
        for event in dbpool.Event:
            pool.add_listener(event, self)
        return self


class FakeClock:
    """The pool module's clock, shifted forward by ``advance()``: lets a test jump past a
    backoff delay, an idle timeout or a lifetime without waiting for it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(dbpool.pool, "monotonic", fake)
    return fake


def count_maintenance(pool: Any) -> Callable[[], int]:
    """Count the reaper's completed runs (it looks ``pool._maintain`` up at each run)."""
    runs = [0]
    original = pool._maintain

    def maintain(wakeup: threading.Event) -> Any:
        try:
            return original(wakeup)
        finally:
            runs[0] += 1

    pool._maintain = maintain
    return lambda: runs[0]
