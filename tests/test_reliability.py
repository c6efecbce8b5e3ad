"""Session-state isolation between borrowers (``session_reset``), leak detection
(``leak_timeout``), and the retirement together of connections older than a broken one.

Session resets run against the real servers: what one borrower leaves in its server session
(role, search_path, temporary tables, session isolation level, user variables, prepared
statements) must not reach the next borrower of the same connection, and what the driver set up
when it connected (character set, autocommit, sql_mode) must survive the reset.
"""

from __future__ import annotations

import gc
import logging
import sqlite3
import time
import weakref
from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import scalar, wait_until

pytestmark = pytest.mark.timeout(30)


def one_connection_pool(connect: Any, **options: Any) -> dbpool.Pool[Any]:
    """A pool whose every lease gets the same connection (unless it was discarded)."""
    return dbpool.Pool(connect, min_size=0, max_size=1, **options)


# == PostgreSQL ==================================================================================


def _pg_dirty_the_session(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute("DROP ROLE IF EXISTS dbpool_tenant_a")
    cur.execute("CREATE ROLE dbpool_tenant_a")
    conn.commit()
    cur.execute("SET ROLE dbpool_tenant_a")
    cur.execute("SET search_path = pg_catalog")
    cur.execute("CREATE TEMP TABLE tenant_a_scratch (secret text)")
    cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    cur.execute("PREPARE tenant_a_stmt AS SELECT 1")
    conn.commit()


def _pg_session(conn: Any) -> tuple[Any, ...]:
    cur = conn.cursor()
    cur.execute(
        "SELECT current_user, current_setting('search_path'), "
        "current_setting('default_transaction_isolation'), "
        "(SELECT count(*) FROM pg_prepared_statements WHERE name = 'tenant_a_stmt'), "
        "to_regclass('pg_temp.tenant_a_scratch') IS NOT NULL"
    )
    row = tuple(cur.fetchone())
    conn.commit()
    return row


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_postgresql_discard_leaves_nothing_to_the_next_borrower(
    driver: str, request: pytest.FixtureRequest
) -> None:
    connect = request.getfixturevalue("pg_connect" if driver == "psycopg" else "psycopg2_connect")
    baseline = _pg_session(connect())
    try:
        with one_connection_pool(connect, session_reset="discard") as pool:
            with pool.connection() as conn:
                _pg_dirty_the_session(conn)
                assert _pg_session(conn) != baseline  # the test can see what leaks
            with pool.connection() as conn:
                assert _pg_session(conn) == baseline
            assert pool.stats().created == 1, "the reset reconnected instead"
    finally:
        admin = connect()
        admin.autocommit = True
        admin.cursor().execute("DROP ROLE IF EXISTS dbpool_tenant_a")


def test_postgresql_without_a_reset_policy_the_session_state_stays(pg_connect: Any) -> None:
    # The default, documented: only the transaction and the driver's own settings are reset.
    with one_connection_pool(pg_connect) as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SET search_path = pg_catalog")
            conn.commit()
        with pool.connection() as conn:
            assert scalar(conn, "SHOW search_path") == "pg_catalog"


def test_psycopg_prepared_statements_keep_working_across_resets(pg_connect: Any) -> None:
    # DISCARD ALL drops server-side prepared statements; psycopg must forget its own cache.
    with one_connection_pool(pg_connect, session_reset="discard") as pool:
        for _ in range(3):
            with pool.connection() as conn:
                for n in range(3):
                    cur = conn.raw.execute("SELECT %s::int + 1", (n,), prepare=True)
                    assert cur.fetchone() == (n + 1,)


def test_postgresql_discard_runs_after_an_open_transaction_is_rolled_back(pg_connect: Any) -> None:
    with one_connection_pool(pg_connect, session_reset="discard") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SET search_path = pg_catalog")  # inside a transaction
        with pool.connection() as conn:
            assert scalar(conn, "SHOW search_path") == '"$user", public'


# == MariaDB =====================================================================================


def _mysql_session(conn: Any) -> tuple[Any, ...]:
    cur = conn.cursor()
    cur.execute(
        "SELECT @@session.tx_isolation, @tenant_secret, @@session.sql_mode, "
        "@@session.character_set_client, @@session.autocommit"
    )
    row = tuple(cur.fetchone())
    try:  # MariaDB 10 lists temporary tables nowhere: look for it
        cur.execute("SELECT COUNT(*) FROM tenant_a_scratch")
        row += ("temporary table",)
    except Exception:
        pass
    conn.commit()
    return row


def test_mariadb_reset_leaves_nothing_and_keeps_the_driver_setup(
    mysql_params: dict[str, Any],
) -> None:
    import pymysql

    options = dict(mysql_params, charset="utf8mb4", sql_mode="ANSI_QUOTES", autocommit=True)
    opened: list[Any] = []

    def connect() -> Any:
        opened.append(pymysql.connect(**options))
        return opened[-1]

    try:
        baseline = _mysql_session(connect())
        with one_connection_pool(connect, session_reset="discard") as pool:
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                cur.execute("SET @tenant_secret = 'tenant A'")
                cur.execute("SET NAMES latin1")
                cur.execute("CREATE TEMPORARY TABLE tenant_a_scratch (secret TEXT)")
                cur.execute("SET autocommit = 0")
                assert _mysql_session(conn) != baseline
            with pool.connection() as conn:
                assert _mysql_session(conn) == baseline
                # the character set PyMySQL encodes with is the session's again
                text = "€ üñí 漢字 🙂"
                assert scalar(conn, f"SELECT '{text}'") == text
            assert pool.stats().created == 1, "the reset reconnected instead"
    finally:
        for conn in opened:
            if conn.open:
                conn.close()


def test_mariadb_reset_replays_init_command(mysql_params: dict[str, Any]) -> None:
    import pymysql

    options = dict(mysql_params, init_command="SET @tenant_secret = 'set at connect'")
    with one_connection_pool(lambda: pymysql.connect(**options), session_reset="discard") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SET @tenant_secret = 'tenant A'")
        with pool.connection() as conn:
            assert scalar(conn, "SELECT @tenant_secret") == "set at connect"


def test_mysqlclient_has_no_reset_so_discard_reconnects(mysqlclient_connect: Any) -> None:
    with one_connection_pool(mysqlclient_connect, session_reset="discard") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("SET @tenant_secret = 'tenant A'")
        with pool.connection() as conn:
            assert scalar(conn, "SELECT @tenant_secret") is None
        assert pool.stats().created == 2


# == reconnect, and what counts as using a connection ===========================================


def test_reconnect_policy_replaces_a_used_connection(tmp_path: Any) -> None:
    path = str(tmp_path / "db.sqlite")
    connect = lambda: sqlite3.connect(path, check_same_thread=False)  # noqa: E731
    with one_connection_pool(connect, session_reset="reconnect") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("CREATE TEMP TABLE tenant_a_scratch (secret TEXT)")
        with pool.connection():  # ran nothing: kept as it is
            pass
        with pool.connection() as conn:
            assert scalar(conn, "SELECT count(*) FROM sqlite_temp_master") == 0
        s = pool.stats()
        assert (s.created, s.discarded) == (2, 2)


def test_sqlite_has_no_reset_so_discard_reconnects(tmp_path: Any) -> None:
    path = str(tmp_path / "db.sqlite")
    connect = lambda: sqlite3.connect(path, check_same_thread=False)  # noqa: E731
    with one_connection_pool(connect, session_reset="discard") as pool:
        with pool.connection() as conn:
            conn.cursor().execute("CREATE TEMP TABLE tenant_a_scratch (secret TEXT)")
        with pool.connection() as conn:
            assert scalar(conn, "SELECT count(*) FROM sqlite_temp_master") == 0


def test_a_failing_reset_discards_the_connection(pg_connect: Any) -> None:
    with one_connection_pool(pg_connect, session_reset="discard") as pool:
        with pool.connection() as conn:
            # psycopg refuses autocommit changes while a result is being read: the reset
            # fails, and the connection must not be reused half-reset
            conn.raw.execute("SELECT 1")
            conn.cursor().execute("SET search_path = pg_catalog")
            conn.raw.pgconn.finish()  # the reset's DISCARD ALL cannot go through
        s = pool.stats()
        assert (s.size, s.discarded) == (0, 1)
        with pool.connection() as conn:
            assert scalar(conn, "SHOW search_path") == '"$user", public'


# == server settings that outlive a reset ========================================================


def test_postgresql_discard_undoes_configure_but_keeps_the_connect_options(
    request: pytest.FixtureRequest,
) -> None:
    # DISCARD ALL resets every setting to the session's default: what configure SET is gone,
    # what the connection's startup options set is the default, and stays (docs: session_reset).
    import psycopg

    dsn = request.getfixturevalue("postgresql_dsn")

    def configure(conn: Any) -> None:
        conn.execute("SET TIME ZONE 'Asia/Tokyo'")
        conn.commit()

    connect = lambda: psycopg.connect(dsn, options="-c search_path=pg_catalog")  # noqa: E731
    with one_connection_pool(connect, session_reset="discard", configure=configure) as pool:
        with pool.connection() as conn:
            assert scalar(conn, "SHOW TIME ZONE") == "Asia/Tokyo"
            conn.cursor().execute("SET search_path = public")
        with pool.connection() as conn:
            assert scalar(conn, "SHOW TIME ZONE") != "Asia/Tokyo"  # configure ran once only
            assert scalar(conn, "SHOW search_path") == "pg_catalog"
        assert pool.stats().created == 1


@pytest.mark.parametrize(
    ("server", "setting", "other", "show", "value"),
    [
        ("postgresql", "SET TIME ZONE 'Asia/Tokyo'", "SET TIME ZONE 'UTC'", "SHOW TIME ZONE",
         "Asia/Tokyo"),
        ("mariadb", "SET SESSION time_zone = '+09:00'", "SET SESSION time_zone = '+01:00'",
         "SELECT @@session.time_zone", "+09:00"),
    ],
)  # fmt: skip
def test_the_reset_hook_reapplies_server_settings_after_the_session_reset(
    request: pytest.FixtureRequest, server: str, setting: str, other: str, show: str, value: str
) -> None:
    if server == "postgresql":
        connect = request.getfixturevalue("pg_connect")
    else:
        import pymysql

        params = request.getfixturevalue("mysql_params")
        connect = lambda: pymysql.connect(**params)  # noqa: E731

    def reapply(conn: Any) -> None:
        conn.cursor().execute(setting)
        conn.commit()

    with one_connection_pool(
        connect, session_reset="discard", configure=reapply, reset=reapply
    ) as pool:
        for _ in range(2):
            with pool.connection() as conn:
                assert scalar(conn, show) == value
                conn.cursor().execute(other)  # undone by the reset, then set again by the hook
        assert pool.stats().created == 1


@pytest.mark.parametrize("policy", ["discard", "reconnect", None, "DISCARD", "none", 1])
def test_session_reset_is_checked(policy: Any, fake_server: fakedb.Server) -> None:
    if policy in ("discard", "reconnect", None):
        dbpool.Pool(fake_server.connect, min_size=0, session_reset=policy).close()
        return
    error = ValueError if isinstance(policy, str) else TypeError  # a name unknown, or no str
    with pytest.raises(error, match="session_reset must be None, 'discard' or 'reconnect'"):
        dbpool.Pool(fake_server.connect, session_reset=policy)


# == leak detection ==============================================================================


def hold_a_lease_too_long(pool: dbpool.Pool[Any]) -> dbpool.Connection[Any]:
    return pool.connection()


def test_a_lease_held_too_long_is_reported_once_with_its_stack(
    fake_server: fakedb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dbpool")
    with dbpool.Pool(fake_server.connect, min_size=0, name="orders", leak_timeout=0.05) as pool:
        lease = hold_a_lease_too_long(pool)

        def reports() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "leak_timeout" in r.getMessage()]

        # The maintenance thread counts the report, then logs it: wait for the record itself.
        wait_until(lambda: bool(reports()))
        [report] = reports()
        assert pool.stats().leak_warnings == 1
        text = report.getMessage()
        assert "'orders'" in text and "leak_timeout=0.05" in text
        assert "hold_a_lease_too_long" in text and __file__ in text  # the borrower's code
        assert "dbpool/pool.py" not in text  # and not the pool's own frames
        # (A lease returned within leak_timeout is not reported: with 0.05 s, a busy machine
        # could hold one past it, so that is left to tests with a clock they control.)
        lease.close()
        assert any("came back after" in r.getMessage() for r in caplog.records)
        assert pool.stats().leak_warnings == 1


def test_only_a_lease_still_out_past_leak_timeout_is_reported(
    fake_server: fakedb.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dbpool")
    with dbpool.Pool(fake_server.connect, min_size=0, leak_timeout=60) as pool:
        with pool.connection():
            pass  # returned in time
        held = pool.connection()
        pool._report_leaks(time.monotonic() + 120)  # as the reaper would two minutes on
        assert pool.stats().leak_warnings == 1
        held.close()


def test_a_dropped_lease_is_counted_as_leaked(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        lease = pool.connection()
        with pytest.warns(ResourceWarning, match="without being released"):
            del lease
            gc.collect()
        with pool.connection(timeout=1):
            pass
        s = pool.stats()
        assert (s.leaked, s.in_use, s.leak_warnings) == (1, 0, 0)


def test_leak_detection_is_off_by_default(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0) as pool:
        with pool.connection():
            assert all(slot.borrowed is None for slot in pool._everyone)  # no stack captured


# == a broken connection found: the older idle ones are retired together =======================


def test_idle_connections_older_than_a_broken_one_are_retired_together(pg_connect: Any) -> None:
    # validate_after=None: only a broken connection makes the pool ping the others.
    with dbpool.Pool(pg_connect, min_size=4, max_size=4, validate_after=None) as pool:
        pool.wait(timeout=10)
        leases = [pool.connection() for _ in range(4)]
        pids = [lease.raw.info.backend_pid for lease in leases]
        for lease in leases:
            lease.close()
        admin = pg_connect()
        admin.autocommit = True
        for pid in pids:  # the server restarts, as far as these sessions can tell
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pool.connection() as conn:
            with pytest.raises(Exception, match=r"terminat|closed"):
                conn.cursor().execute("SELECT 2")
        # No caller asks for the other three: the reaper finds them dead by itself.
        wait_until(lambda: pool.stats().discarded == 4)
        wait_until(lambda: pool.stats().idle == 4)  # refilled
        with pool.connection() as conn:
            conn.cursor().execute("SELECT 2")


def test_a_retirement_sweep_keeps_the_live_connections(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, min_size=3, max_size=3, validate_after=None) as pool:
        pool.wait(timeout=5)
        with pool.connection() as conn:
            fake_server.kill(conn.raw)
            with pytest.raises(fakedb.OperationalError):
                conn.cursor().execute("SELECT 2")
        wait_until(lambda: fake_server.count("ping") >= 2)  # the two others were checked
        wait_until(lambda: pool.stats().idle == 3)
        s = pool.stats()
        assert (s.discarded, s.created) == (1, 4)


# == wrong calls =================================================================================


def test_releasing_twice_through_the_pool_is_an_error(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0) as pool:
        conn = pool.connection()
        pool.release(conn)
        before = pool.stats()
        with pytest.raises(dbpool.LeaseReleased, match="already returned"):
            pool.release(conn)
        conn.close()  # closing again stays harmless, like leaving `with` after close()
        assert pool.stats() == before


def test_a_nested_acquire_timeout_says_this_thread_holds_the_connection(
    fake_server: fakedb.Server,
) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        with pool.connection():
            with pytest.raises(dbpool.PoolTimeout, match="this thread itself holds 1 of them"):
                pool.connection(timeout=0.05)


def test_a_long_held_lease_does_not_keep_its_closed_cursors(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0) as pool:
        with pool.connection() as conn:
            for _ in range(100):
                cur = conn.cursor()
                cur.execute("SELECT 2")
                cur.close()
            open_cursor = conn.cursor()
            assert conn._slot.cursors == [open_cursor.raw]  # only what the return must close


def test_a_long_held_lease_lets_go_of_the_cursors_it_dropped_unclosed(
    sqlite_connect: Any, pg_connect: Any
) -> None:
    """DB-API code that never closes its cursors (``conn.cursor().execute(...)``) on a lease
    held for a long time: each dropped cursor, and the rows it holds, is let go as it would be
    on the driver's own connection, not kept until the lease comes back."""
    for connect in (sqlite_connect, pg_connect):
        with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
            with pool.connection() as conn:
                kept = conn.cursor()
                kept.execute("SELECT 1 UNION ALL SELECT 2")
                dropped = []
                for _ in range(500):
                    cur = conn.cursor()
                    cur.execute("SELECT 1")
                    dropped.append(weakref.ref(cur.raw))
                del cur
                alive = sum(ref() is not None for ref in dropped)
                assert alive < 100, f"{alive} of 500 dropped cursors still held"
                assert kept.fetchall() == [(1,), (2,)]  # the one still referenced stays


def test_a_long_held_lease_keeps_no_record_of_the_driver_cursors_it_dropped(
    sqlite_connect: Any, pg_connect: Any
) -> None:
    """``conn.execute()`` returns the driver's own cursor, which the return path closes if it
    is still referenced: the lease holds it weakly, and its record of those collected does not
    grow with each statement; one kept is still closed."""
    for connect in (sqlite_connect, pg_connect):
        with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
            with pool.connection() as conn:
                kept = conn.execute("SELECT 1")
                for _ in range(1000):
                    conn.execute("SELECT 2").fetchall()
                record = conn._slot.loose_cursors
                assert record is not None and len(record) < 200
                assert kept in [held() for held in record]
            with pytest.raises(Exception, match="closed"):
                kept.fetchall()


def test_a_dropped_server_side_cursor_is_still_closed_on_return(pg_connect: Any) -> None:
    """A cursor whose collection would leave something on the server (a WITH HOLD cursor
    outlives the transaction) stays the lease's to close, however many cursors it drops."""
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            conn.autocommit = True
            held = conn.cursor("dbpool_dropped_held", withhold=True)
            held.execute("SELECT generate_series(1, 10)")
            held.fetchone()
            del held
            for _ in range(500):
                conn.cursor().execute("SELECT 1")
            assert scalar(conn, "SELECT count(*) FROM pg_cursors") == 1
        with pool.connection() as conn:
            assert scalar(conn, "SELECT count(*) FROM pg_cursors") == 0


def test_an_unusable_lease_still_answers_attribute_reads(fake_server: fakedb.Server) -> None:
    # After a failed undo the lease refuses statements, but code deciding what to do next
    # may still look at the driver connection's state.
    with dbpool.Pool(fake_server.connect, min_size=0) as pool:
        with pool.connection() as conn:
            conn._slot.doomed = True  # private: what a failed rollback or cancel leaves
            assert conn.closed is False
            with pytest.raises(dbpool.ConnectionUnusable):
                conn.cursor()
            with pytest.raises(dbpool.ConnectionUnusable):
                conn.commit()
        assert pool.stats().discarded == 1
