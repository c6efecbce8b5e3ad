"""A transaction's deadline only ever tightens the server-side limits the session already has:
a limit the session was given (connect options, the configure hook, a SET in the block) that
is tighter than the time left stays in force, at BEGIN and before a late COMMIT, and every
session setting is as it was once the block is over."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import FakeClock, rows, unavailable

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 30  # seconds: a deadline far looser than the session's own limits below

PG_LIMITS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
PG_LIMITS_SQL = "select " + ", ".join(f"current_setting('{name}')" for name in PG_LIMITS)
MARIADB_LIMITS_SQL = "select @@session.innodb_lock_wait_timeout, @@session.max_statement_time"


@pytest.fixture
def tx_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The transaction module's clock, shifted forward by ``advance()``: a statement or COMMIT
    then starts late enough in the block for the deadline to narrow the limits first."""
    fake = FakeClock()
    monkeypatch.setattr(dbpool.transaction, "monotonic", fake)
    return fake


def new_pool(connect: Callable[[], Any], **options: Any) -> dbpool.Pool[Any]:
    return dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5, **options)


def pg_ms(setting: str) -> int:
    """A PostgreSQL time setting as SHOW writes it (``0``, ``750ms``, ``2s``, ``10min``), in ms."""
    for unit, factor in (("ms", 1), ("s", 1000), ("min", 60_000), ("h", 3_600_000)):
        if setting.endswith(unit) and setting[: -len(unit)].isdigit():
            return int(setting[: -len(unit)]) * factor
    return int(setting)


def pg_connector(postgresql_dsn: str, driver: str, settings: dict[str, str]) -> Callable[[], Any]:
    """Connections whose session gets ``settings`` from the connect options (``-c name=value``)."""
    options = " ".join(f"-c {name}={value}" for name, value in settings.items())
    extra = {"options": options, "application_name": "deadline_limit_edges", "connect_timeout": 10}
    if driver == "psycopg":
        import psycopg

        return lambda: psycopg.connect(postgresql_dsn, **extra)
    try:
        import psycopg2
    except ImportError as exc:
        unavailable(f"psycopg2 is not installed: {exc}")
    return lambda: psycopg2.connect(postgresql_dsn, **extra)


PG_DRIVERS = [
    pytest.param("psycopg", marks=pytest.mark.postgresql),
    pytest.param("psycopg2", marks=pytest.mark.postgresql),
]


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_postgresql_deadline_keeps_the_sessions_tighter_limits(
    postgresql_dsn: str, driver: str
) -> None:
    """Session limits tighter than the deadline (from the connect options) stay in force in the
    block: a 30 s deadline does not loosen a 1.5 s statement_timeout."""
    session = {
        "statement_timeout": "1500ms",
        "lock_timeout": "750ms",
        "idle_in_transaction_session_timeout": "2s",
    }
    with new_pool(pg_connector(postgresql_dsn, driver, session)) as pool:
        with pool.transaction(timeout=TIMEOUT) as tx:
            assert rows(tx, PG_LIMITS_SQL) == [tuple(session.values())]
        with pool.connection() as conn:
            assert rows(conn, PG_LIMITS_SQL) == [tuple(session.values())]
            conn.rollback()
        assert pool.stats().discarded == 0


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_postgresql_deadline_tightens_the_sessions_looser_or_absent_limits(
    postgresql_dsn: str, driver: str
) -> None:
    """Limits looser than the deadline, or none ('0'), are sized to the deadline in the block,
    and are the session's own again after it."""
    session = {
        "statement_timeout": "0",
        "lock_timeout": "10min",
        "idle_in_transaction_session_timeout": "1h",
    }
    with new_pool(pg_connector(postgresql_dsn, driver, session)) as pool:
        with pool.transaction(timeout=TIMEOUT) as tx:
            [inside] = rows(tx, PG_LIMITS_SQL)
            assert all(0 < pg_ms(value) <= TIMEOUT * 1000 for value in inside), inside
        with pool.connection() as conn:
            assert rows(conn, PG_LIMITS_SQL) == [tuple(session.values())]
            conn.rollback()
        assert pool.stats().discarded == 0


# The lock_timeout in force when COMMIT runs the deferred checks, reported by a deferred
# constraint trigger that fails the COMMIT with it.
PG_COMMIT_PROBE = (
    "create function pg_temp.deadline_limit_report() returns trigger language plpgsql as $$ "
    "begin raise exception 'lock_timeout at commit: %', current_setting('lock_timeout'); end $$",
    "create temp table deadline_limit_probe (id int)",
    "create constraint trigger deadline_limit_report after insert on deadline_limit_probe "
    "deferrable initially deferred for each row execute function pg_temp.deadline_limit_report()",
)


@pytest.mark.parametrize("where", ["block", "session"])
@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_postgresql_late_commit_keeps_a_tighter_lock_timeout(
    postgresql_dsn: str, driver: str, where: str, tx_clock: FakeClock
) -> None:
    """Before a COMMIT that starts well after BEGIN, the deadline shortens lock_timeout to the
    time left, but not past a tighter one the block set (SET LOCAL) or the session had."""
    session = {"lock_timeout": "250ms"} if where == "session" else {}
    with new_pool(pg_connector(postgresql_dsn, driver, session)) as pool:
        with pool.connection() as conn:
            for statement in PG_COMMIT_PROBE:
                rows(conn, statement)
            conn.commit()
        with pytest.raises(Exception, match="lock_timeout at commit: 250ms"):
            with pool.transaction(timeout=TIMEOUT) as tx:
                if where == "block":
                    rows(tx, "set local lock_timeout = '250ms'")
                rows(tx, "insert into deadline_limit_probe values (1)")
                tx_clock.advance(1)  # COMMIT starts late: lock_timeout is narrowed first


# -- MariaDB -----------------------------------------------------------------------------------


def mariadb_connector(mysql_params: dict[str, Any], driver: str) -> Callable[[], Any]:
    if driver == "pymysql":
        import pymysql

        connect: Callable[[], Any] = lambda: pymysql.connect(**mysql_params)  # noqa: E731
    else:
        try:
            import MySQLdb
        except ImportError as exc:
            unavailable(f"mysqlclient is not installed: {exc}")
        connect = lambda: MySQLdb.connect(**mysql_params)  # noqa: E731
    probe = connect()
    try:
        if "MariaDB" not in probe.get_server_info():
            pytest.skip("needs MariaDB (max_statement_time)")
    finally:
        probe.close()
    return connect


def mariadb_limits(conn: Any) -> tuple[int, float]:
    [(lock_wait, statement)] = rows(conn, MARIADB_LIMITS_SQL)
    return int(lock_wait), float(statement)


MARIADB_DRIVERS = [
    pytest.param("pymysql", marks=pytest.mark.mysql),
    pytest.param("mysqlclient", marks=pytest.mark.mysql),
]


@pytest.mark.parametrize(
    ("session", "timeout", "expected"),
    [
        pytest.param((3, 1.5), TIMEOUT, (3, 1.5), id="session-tighter"),
        pytest.param((0, 1.5), TIMEOUT, (0, 1.5), id="no-lock-wait"),
        pytest.param((50, 1.25), 0.5, (1, 0.5), id="deadline-tighter"),
        pytest.param((50, 0), 2, (2, 2.0), id="no-statement-limit"),
    ],
)
@pytest.mark.parametrize("driver", MARIADB_DRIVERS)
def test_mariadb_deadline_keeps_the_sessions_tighter_limits(
    mysql_params: dict[str, Any],
    driver: str,
    session: tuple[int, float],
    timeout: float,
    expected: tuple[int, float],
) -> None:
    """The limits a block runs with are the tighter of the session's (set by the configure
    hook; innodb_lock_wait_timeout 0 is no wait at all, max_statement_time 0 no limit) and the
    deadline's; the session's own are back once the block is over."""

    def configure(raw: Any) -> None:
        rows(
            raw,
            "SET SESSION innodb_lock_wait_timeout = %s, max_statement_time = %s",
            session,
        )

    connect = mariadb_connector(mysql_params, driver)
    with new_pool(connect, configure=configure) as pool:
        with pool.transaction(timeout=timeout) as tx:
            lock_wait, statement = mariadb_limits(tx)
            assert lock_wait == expected[0]
            assert 0 < statement <= expected[1]
            if expected[1] == session[1]:
                assert statement == expected[1]
        with pool.connection() as conn:
            assert mariadb_limits(conn) == (session[0], float(session[1]))
        assert pool.stats().discarded == 0


@pytest.mark.parametrize("driver", MARIADB_DRIVERS)
def test_mariadb_behind_a_proxy_that_reports_a_mysql_version_gets_its_limits(
    mysql_params: dict[str, Any], driver: str
) -> None:
    """A proxy between client and server can report a version string of its own (ProxySQL's
    default is "5.5.30"), which does not say MariaDB: the deadline's limits are still set,
    with MariaDB's variable, the server's refusal of MySQL's telling which, and from the
    second block on without that refusal."""
    server = mariadb_connector(mysql_params, driver)
    reported = f"5.5.30-proxy-{driver}-{id(server):x}"  # a string no other test has taught
    refused: list[str] = []

    def connect() -> Any:
        raw = server()
        raw.get_server_info = lambda: reported
        raw.query = counting_refusals(raw.query, refused)
        return raw

    with new_pool(connect) as pool:
        with pool.connection() as conn:
            before = mariadb_limits(conn)
        assert before[0] > 2 and not 0 < before[1] <= 2  # looser than the deadline's
        for _ in range(2):
            with pool.transaction(timeout=2) as tx:
                lock_wait, statement = mariadb_limits(tx)
                assert lock_wait == 2 and 0 < statement <= 2
        with pool.connection() as conn:
            assert mariadb_limits(conn) == before
        assert pool.stats().discarded == 0
    assert refused == ["max_execution_time"]  # asked once: the answer is kept


def counting_refusals(query: Callable[..., Any], refused: list[str]) -> Callable[..., Any]:
    """``query`` (both drivers send every statement through their connection's query()),
    noting each statement the server refused as naming an unknown variable."""

    def counted(sql: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return query(sql, *args, **kwargs)
        except Exception as exc:
            if exc.args and exc.args[0] == 1193:  # ER_UNKNOWN_SYSTEM_VARIABLE
                text = sql.decode() if isinstance(sql, bytes) else sql
                refused.append(text.rsplit("@@session.", 1)[-1])
            raise

    return counted


# -- pymssql (the fake driver) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "expected"),
    [
        pytest.param(2000, "SET LOCK_TIMEOUT 2000", id="session-tighter"),
        pytest.param(0, "SET LOCK_TIMEOUT 0", id="no-wait"),
    ],
)
def test_pymssql_deadline_keeps_the_sessions_tighter_lock_timeout(
    fake_server: fakedb.Server, session: int, expected: str
) -> None:
    """LOCK_TIMEOUT for the block is the tighter of the session's (0: no wait, -1: none) and
    the deadline's, and the session's own is put back after the block."""
    fake_server.set_result("SELECT @@LOCK_TIMEOUT", [(session,)])
    with new_pool(fake_server.connect_mssql) as pool:
        with pool.transaction(timeout=TIMEOUT) as tx:
            tx.execute("UPDATE t SET v = 1")
    statements = [s for s in fake_server.statements() if s.startswith("SET LOCK_TIMEOUT")]
    assert statements == [expected, f"SET LOCK_TIMEOUT {session}"]


def test_pymssql_deadline_sizes_an_unlimited_lock_timeout(fake_server: fakedb.Server) -> None:
    fake_server.set_result("SELECT @@LOCK_TIMEOUT", [(-1,)])
    with new_pool(fake_server.connect_mssql) as pool:
        with pool.transaction(timeout=TIMEOUT) as tx:
            tx.execute("UPDATE t SET v = 1")
    limit, restore = [s for s in fake_server.statements() if s.startswith("SET LOCK_TIMEOUT")]
    assert 0 < int(limit.split()[-1]) <= TIMEOUT * 1000, limit
    assert restore == "SET LOCK_TIMEOUT -1"


# -- SQLite ------------------------------------------------------------------------------------


def busy_timeout(conn: Any) -> int:
    [(value,)] = rows(conn, "PRAGMA busy_timeout")
    return int(value)


def test_sqlite_deadline_keeps_the_connections_tighter_busy_timeout(
    tmp_path: Any, tx_clock: FakeClock
) -> None:
    """A connection made with a 0.2 s busy timeout keeps it in a 30 s block, at BEGIN and at
    each statement's narrowing, and after the block."""
    path = str(tmp_path / "limits.db")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, timeout=0.2, check_same_thread=False)

    with new_pool(connect) as pool:
        with pool.transaction(timeout=TIMEOUT) as tx:
            assert busy_timeout(tx) == 200
            tx_clock.advance(1)  # the next statement narrows busy_timeout first
            rows(tx, "create table t (id integer)")
            assert busy_timeout(tx) == 200
        with pool.connection() as conn:
            assert busy_timeout(conn) == 200


def test_sqlite_narrowing_keeps_a_tighter_busy_timeout_the_block_set(
    tmp_path: Any, tx_clock: FakeClock
) -> None:
    path = str(tmp_path / "limits.db")

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(path, timeout=5, check_same_thread=False)

    with new_pool(connect) as pool:
        with pool.transaction(timeout=TIMEOUT) as tx:
            assert 0 < busy_timeout(tx) <= TIMEOUT * 1000
            rows(tx, "PRAGMA busy_timeout = 150")
            tx_clock.advance(1)
            rows(tx, "create table t (id integer)")
            assert busy_timeout(tx) == 150
        with pool.connection() as conn:
            assert busy_timeout(conn) == 5000
