"""The fault-injection proxy (tests/faultproxy.py) against the real servers, with psycopg 3 and
PyMySQL used directly (no pool), plus its COMMIT detector on hand-made byte streams.

Each test is bounded in time and waits on conditions (the proxy's counters, thread joins with a
deadline, the drivers' own timeouts); none sleeps or asserts how long anything took.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from tests.conftest import wait_until
from tests.faultproxy import FaultProxy, Mode, commit_scanner

pytestmark = pytest.mark.timeout(30)

TABLE = f"faultproxy_cut_{os.getpid()}"  # per process: the servers may be shared by other runs
JOIN = 10.0  # seconds: bound on waiting for a client thread that should be finishing


class Target:
    """One real server behind a started proxy, as a test sees it."""

    def __init__(
        self,
        name: str,
        driver: Any,
        proxy: FaultProxy,
        connect: Callable[..., Any],
        direct: Callable[[], Any],
    ) -> None:
        self.name = name
        self.driver = driver
        self.proxy = proxy
        self._connect = connect
        self._direct = direct
        self._conns: list[Any] = []
        # what a driver raises when its connection is cut under it
        self.lost = (
            (driver.OperationalError,)
            if name == "postgresql"
            else (driver.OperationalError, driver.InterfaceError)
        )

    def __repr__(self) -> str:
        return f"<Target {self.name} via {self.proxy!r}>"

    def through(self, **options: Any) -> Any:
        """A new driver connection through the proxy (not in autocommit)."""
        conn = self._connect(self.proxy.port, **options)
        self._conns.append(conn)
        return conn

    def direct(self) -> Any:
        """A new autocommit connection straight to the server."""
        conn = self._direct()
        self._conns.append(conn)
        return conn

    @staticmethod
    def scalar(conn: Any, sql: str) -> Any:
        cur = conn.cursor()
        try:
            cur.execute(sql)
            return cur.fetchone()[0]
        finally:
            cur.close()

    def close_all(self) -> None:
        for conn in self._conns:
            try:
                conn.close()
            except Exception:
                pass  # broken by the test


def _postgresql(
    request: pytest.FixtureRequest,
) -> tuple[Any, tuple[str, int], Callable[..., Any], Callable[[], Any]]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    dsn = request.getfixturevalue("postgresql_dsn")
    params = conninfo_to_dict(dsn)
    host = params.get("hostaddr") or params.get("host")
    if host != "127.0.0.1":
        pytest.skip(f"the fault proxy relays to 127.0.0.1 only; PostgreSQL is at {host!r}")
    upstream = ("127.0.0.1", int(params.get("port") or 5432))
    params.pop("hostaddr", None)

    def connect(port: int, **options: Any) -> Any:
        # no TLS or GSS encryption, so the proxy can read the protocol
        merged = {
            **params,
            "host": "127.0.0.1",
            "port": port,
            "sslmode": "disable",
            "gssencmode": "disable",
            "connect_timeout": 10,
            **options,
        }
        return psycopg.connect(**merged)

    return (
        psycopg,
        upstream,
        connect,
        lambda: psycopg.connect(dsn, autocommit=True, connect_timeout=10),
    )


def _mysql(
    request: pytest.FixtureRequest,
) -> tuple[Any, tuple[str, int], Callable[..., Any], Callable[[], Any]]:
    import pymysql

    params = request.getfixturevalue("mysql_params")
    if params["host"] != "127.0.0.1" or "ssl" in params:
        pytest.skip(
            f"the fault proxy relays plain TCP to 127.0.0.1 only; MariaDB is at {params['host']!r}"
        )
    upstream = ("127.0.0.1", int(params["port"]))

    def connect(port: int, **options: Any) -> Any:
        return pymysql.connect(
            **{**params, "host": "127.0.0.1", "port": port, "connect_timeout": 10, **options}
        )

    return pymysql, upstream, connect, lambda: pymysql.connect(**{**params, "autocommit": True})


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    driver, upstream, connect, direct = (_postgresql if request.param == "postgresql" else _mysql)(
        request
    )
    with FaultProxy(upstream=upstream) as proxy:
        target = Target(request.param, driver, proxy, connect, direct)
        try:
            yield target
        finally:
            target.close_all()
    prefix = f"faultproxy-{proxy.port}-"
    assert not [t for t in threading.enumerate() if t.name.startswith(prefix)], (
        "proxy threads left running"
    )


@pytest.fixture
def table(target: Target) -> Iterator[str]:
    """An empty table ``TABLE (id int primary key, v text)``, dropped after the test."""
    admin = target.direct()
    cur = admin.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
    cur.execute(f"CREATE TABLE {TABLE} (id int primary key, v text)")
    yield TABLE
    target.close_all()  # so no transaction left open by a failed test holds a lock on the table
    admin = target.direct()
    admin.cursor().execute(f"DROP TABLE IF EXISTS {TABLE}")
    admin.close()


class Outcome:
    """Runs ``fn`` in a daemon thread and keeps its result or exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(fn,), name=f"test-{name}", daemon=True
        )
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def finished(self) -> bool:
        return not self.thread.is_alive()

    def join(self) -> None:
        self.thread.join(JOIN)
        assert self.finished(), (
            f"{self.thread.name} still running {JOIN}s after it should have ended"
        )


def stat(proxy: FaultProxy, name: str) -> int:
    return int(getattr(proxy.stats(), name))


# -- against the servers -----------------------------------------------------------------------


def test_pass_relays_both_ways(target: Target) -> None:
    proxy = target.proxy
    conn = target.through()
    assert target.scalar(conn, "select 1") == 1
    stats = proxy.stats()
    assert (stats.accepted, stats.open) == (1, 1)
    assert stats.bytes_to_server > 0 and stats.bytes_to_client > 0
    assert (stats.bytes_held, stats.commits_cut, stats.dropped) == (0, 0, 0)
    conn.close()
    wait_until(lambda: stat(proxy, "open") == 0, message="connection still open after close()")


def test_drop_all_breaks_open_connections_and_new_ones_work(target: Target) -> None:
    proxy = target.proxy
    conn = target.through()
    assert target.scalar(conn, "select 1") == 1

    assert proxy.drop_all() == 1
    with pytest.raises(target.driver.OperationalError):
        target.scalar(conn, "select 1")
    wait_until(lambda: stat(proxy, "open") == 0, message="dropped connection still open")

    assert proxy.mode is Mode.PASS
    assert target.scalar(target.through(), "select 2") == 2
    stats = proxy.stats()
    assert (stats.accepted, stats.open, stats.dropped) == (2, 1, 1)


@pytest.mark.postgresql
def test_blackhole_hangs_queries_and_connects_until_the_proxy_stops(
    request: pytest.FixtureRequest,
) -> None:
    driver, upstream, connect, _ = _postgresql(request)
    conns: list[Any] = []
    with FaultProxy(upstream=upstream) as proxy:
        conn = connect(proxy.port)
        conns.append(conn)
        assert conn.execute("select 1").fetchone() == (1,)

        to_client = stat(proxy, "bytes_to_client")
        proxy.set_mode(Mode.BLACKHOLE)
        query = Outcome(lambda: conn.execute("select 1").fetchone(), "query")
        new = Outcome(lambda: conns.append(connect(proxy.port, connect_timeout=25)), "connect")
        wait_until(
            lambda: stat(proxy, "bytes_held") > 0 and stat(proxy, "accepted") == 2,
            message="the query and the new connection did not reach the proxy",
        )
        # The proxy holds the query and has not even connected the newcomer upstream: neither
        # client can have had an answer.
        assert not query.finished() and not new.finished()
        assert stat(proxy, "bytes_to_client") == to_client
        proxy.stop()

    query.join()
    new.join()
    assert isinstance(query.error, driver.OperationalError), query.error or query.result
    assert isinstance(new.error, driver.OperationalError), new.error or "connected"
    for c in conns:
        c.close()


@pytest.mark.mysql
def test_blackhole_is_bounded_by_pymysql_read_timeout(request: pytest.FixtureRequest) -> None:
    driver, upstream, connect, _ = _mysql(request)
    with FaultProxy(upstream=upstream) as proxy:
        conn = connect(proxy.port, read_timeout=1)
        try:
            assert Target.scalar(conn, "select 1") == 1
            proxy.set_mode(Mode.BLACKHOLE)

            with pytest.raises(driver.OperationalError):
                Target.scalar(conn, "select 1")
            # the query reached the proxy and stayed there
            wait_until(
                lambda: stat(proxy, "bytes_held") > 0, message="the query never reached the proxy"
            )
            with pytest.raises(driver.OperationalError):
                connect(proxy.port, read_timeout=1)  # no greeting ever comes
            wait_until(
                lambda: stat(proxy, "accepted") == 2, message="the connect never reached the proxy"
            )

            proxy.set_mode(Mode.PASS)
            fresh = connect(proxy.port, read_timeout=1)
            assert Target.scalar(fresh, "select 3") == 3
            fresh.close()
        finally:
            conn.close()


def test_blackhole_then_pass_delivers_the_held_query(target: Target) -> None:
    proxy = target.proxy
    conn = target.through()
    assert target.scalar(conn, "select 1") == 1

    proxy.set_mode(Mode.BLACKHOLE)
    query = Outcome(lambda: target.scalar(conn, "select 4"), "query")
    wait_until(lambda: stat(proxy, "bytes_held") > 0, message="the query did not reach the proxy")
    assert not query.finished()  # held by the proxy: the server has not seen it
    proxy.set_mode(Mode.PASS)
    query.join()
    assert query.error is None and query.result == 4


def test_latency_delays_every_reply_and_stop_cuts_it_short(target: Target) -> None:
    proxy = target.proxy
    conn = target.through()
    proxy.latency = 0.2
    started = time.monotonic()
    assert target.scalar(conn, "select 7") == 7
    assert time.monotonic() - started >= 0.2
    proxy.latency = 60.0  # a reply held this long: stop() ends the wait
    sent = stat(proxy, "bytes_to_server")
    query = Outcome(lambda: target.scalar(conn, "select 8"), "query")
    wait_until(lambda: stat(proxy, "bytes_to_server") > sent)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5.0
    query.join()
    assert query.error is not None


def test_refuse_fails_new_connects_and_keeps_open_ones(target: Target) -> None:
    proxy = target.proxy
    conn = target.through()
    assert target.scalar(conn, "select 1") == 1

    proxy.set_mode(Mode.REFUSE)
    with pytest.raises(target.driver.OperationalError) as refused:
        target.through()
    assert "refused" in str(refused.value).lower()
    assert target.scalar(conn, "select 5") == 5  # the open connection still works
    assert proxy.port == proxy.address[1]

    proxy.set_mode(Mode.PASS)  # listening again, on the same port
    assert target.scalar(target.through(), "select 6") == 6
    stats = proxy.stats()
    assert (stats.accepted, stats.open) == (2, 2)


def test_cut_after_commit_loses_the_reply_but_the_row_is_committed(
    target: Target, table: str
) -> None:
    proxy = target.proxy
    proxy.set_mode(Mode.CUT_AFTER_COMMIT)
    conn = target.through()
    cur = conn.cursor()
    # decoys: none of these is a COMMIT statement
    cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    cur.execute(f"INSERT INTO {table} (id, v) VALUES (1, 'commit')")
    cur.execute(f"SELECT v FROM {table} WHERE v = 'COMMIT' OR v LIKE 'commit%'")
    assert cur.fetchall() and proxy.stats().commits_cut == 0

    with pytest.raises(target.lost):
        conn.commit()
    assert stat(proxy, "commits_cut") == 1
    # The server closes its end once it has read past the COMMIT; the proxy then closes the link.
    wait_until(
        lambda: stat(proxy, "open") == 0, timeout=10, message="server end still open after the cut"
    )
    assert target.scalar(target.direct(), f"SELECT count(*) FROM {table} WHERE id = 1") == 1
    assert proxy.mode is Mode.CUT_AFTER_COMMIT


@pytest.mark.postgresql
def test_cut_after_commit_sent_with_the_extended_protocol(request: pytest.FixtureRequest) -> None:
    """psycopg sends COMMIT as Parse/Bind/Execute/Sync when asked for binary results; the
    second connection shows that the mode stays on after a cut."""
    driver, upstream, connect, direct = _postgresql(request)
    with FaultProxy(upstream=upstream, mode=Mode.CUT_AFTER_COMMIT, protocol="postgresql") as proxy:
        pg = Target("postgresql", driver, proxy, connect, direct)
        try:
            admin = pg.direct()
            admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
            admin.execute(f"CREATE TABLE {TABLE} (id int primary key, v text)")
            for n in (1, 2):
                conn = pg.through()
                conn.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (n,))  # a Parse, not a COMMIT
                with pytest.raises(driver.OperationalError):
                    conn.execute("COMMIT", binary=True)
                wait_until(lambda: stat(proxy, "open") == 0, timeout=10, message="link still open")
                assert stat(proxy, "commits_cut") == n
            assert admin.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (2,)
        finally:
            pg.close_all()
            with direct() as admin:
                admin.execute(f"DROP TABLE IF EXISTS {TABLE}")


# -- without servers ---------------------------------------------------------------------------


def test_only_loopback_upstreams() -> None:
    for host in ("10.0.0.1", "localhost", "0.0.0.0", "::1"):
        with pytest.raises(ValueError):
            FaultProxy(upstream=(host, 5432))
    with pytest.raises(ValueError):
        FaultProxy(upstream=("127.0.0.1", 5432), protocol="oracle")


def test_stop_is_idempotent_and_joins_its_threads() -> None:
    proxy = FaultProxy(upstream=("127.0.0.1", 9))
    proxy.stop()  # never started: nothing to do
    with FaultProxy(upstream=("127.0.0.1", 9), mode=Mode.REFUSE) as proxy:
        assert proxy.address == ("127.0.0.1", proxy.port) and proxy.port > 0
        names = [t.name for t in threading.enumerate() if t.name.startswith("faultproxy-")]
        assert names == [f"faultproxy-{proxy.port}-accept"]
        thread = next(t for t in threading.enumerate() if t.name == names[0])
        assert thread.daemon
    proxy.stop()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        proxy.start()


def pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def pg_stream(*messages: bytes) -> bytes:
    startup_body = struct.pack("!I", 196608) + b"user\0postgres\0database\0test\0\0"
    ssl_request = struct.pack("!II", 8, 80877103)
    return (
        ssl_request + struct.pack("!I", len(startup_body) + 4) + startup_body + b"".join(messages)
    )


def mysql_packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def expected_cuts(points: list[int], step: int) -> list[int]:
    """The cuts a scanner reports for cut ``points`` when fed ``step`` bytes at a time: the first
    one in each chunk (the proxy stops relaying at it)."""
    seen: dict[int, int] = {}
    for point in points:
        seen.setdefault((point - 1) // step, point)
    return list(seen.values())


def cuts(stream: bytes, protocol: str | None, step: int) -> list[int]:
    """Offsets in ``stream`` where the scanner asks for a cut, feeding ``step`` bytes at a time."""
    scanner = commit_scanner(protocol)
    found = []
    for start in range(0, len(stream), step):
        cut = scanner.feed(stream[start : start + step])
        if cut is not None:
            found.append(start + cut)
    return found


def query(sql: str) -> bytes:
    return pg_message(b"Q", sql.encode() + b"\0")


@pytest.mark.parametrize("protocol", ["postgresql", None])
def test_commit_scanner_postgresql_at_any_chunk_boundary(protocol: str | None) -> None:
    decoys = [
        query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED"),
        query("select 'commit'"),
        query("SET autocommit TO on"),
        pg_message(b"X", b""),
    ]
    commit = query("commit work")
    parse = pg_message(b"P", b"\0COMMIT\0\0\0")
    extended = [
        parse,
        pg_message(b"B", b"\0\0" + b"\0" * 6),
        pg_message(b"E", b"\0\0\0\0\0"),
        pg_message(b"S", b""),
    ]
    stream = pg_stream(*decoys[:3], commit, query("select 1"), *extended, *decoys)
    first = stream.index(commit) + len(commit)
    second = stream.index(parse) + sum(map(len, extended))
    for step in (1, 2, 3, 5, 7, 64, len(stream)):
        assert cuts(stream, protocol, step) == expected_cuts([first, second], step)


@pytest.mark.parametrize("protocol", ["mysql", None])
def test_commit_scanner_mysql_at_any_chunk_boundary(protocol: str | None) -> None:
    handshake = mysql_packet(1, (0x000FA685).to_bytes(4, "little") + b"\0" * 28 + b"root\0")
    packets = [
        handshake,
        mysql_packet(0, b"\x03SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"),
        mysql_packet(0, b"\x03INSERT INTO t VALUES ('commit')"),
        mysql_packet(0, b"\x03 COMMIT"),
        mysql_packet(2, b"\x03COMMIT"),  # not a command (sequence 2): file contents, say
        mysql_packet(0, b"\x16COMMIT"),  # COM_STMT_PREPARE: not understood, documented
        mysql_packet(0, b"\x03select 1; commit"),
    ]
    stream = b"".join(packets)
    points = [sum(map(len, packets[:4])), len(stream)]
    for step in (1, 2, 3, 4, 5, 9, 64, len(stream)):
        assert cuts(stream, protocol, step) == expected_cuts(points, step)


def test_commit_scanner_gives_up_on_encrypted_streams() -> None:
    tls = b"\x16\x03\x01\x02\x00\x01" + b"COMMIT" * 20
    scanner = commit_scanner("postgresql")
    assert scanner.feed(struct.pack("!II", 8, 80877103) + tls + query("COMMIT")) is None
    assert scanner.opaque

    ssl_request = mysql_packet(1, (0x000FAE85).to_bytes(4, "little") + b"\0" * 28)
    scanner = commit_scanner(None)
    assert scanner.feed(ssl_request + tls + mysql_packet(0, b"\x03COMMIT")) is None
    assert scanner.opaque
