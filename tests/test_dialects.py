"""Dialect choice and the driver verbs, including pymssql through the fake driver
(no SQL Server runs here: its integration tests need DBPOOL_TEST_MSSQL_DSN)."""

from __future__ import annotations

import contextlib
import sqlite3
import sys

import pytest

import dbpool
from dbpool import dialects
from dbpool.dialects import TxState
from tests import fakedb


@pytest.fixture
def pools():
    made = []
    yield made
    for pool in made:
        pool.close(timeout=1)


def test_dialect_is_detected_from_the_driver_package(fake_server):
    assert dialects.for_connection(sqlite3.connect(":memory:")).name == "sqlite3"
    assert dialects.for_connection(fake_server.connect()).name == "generic"
    assert dialects.for_connection(fake_server.connect_mssql()).name == "pymssql"


def test_subclass_of_a_driver_connection_keeps_its_dialect(tmp_path):
    class Audited(sqlite3.Connection):
        pass

    conn = sqlite3.connect(tmp_path / "a.db", factory=Audited, check_same_thread=False)
    assert type(conn).__module__ == __name__
    assert dialects.for_connection(conn).name == "sqlite3"


def test_dialect_can_be_forced_by_name_or_instance(fake_server, pools):
    class Quiet(dialects.Dialect):
        name = "quiet"

        def transaction_state(self, conn):
            return TxState.IDLE

    by_name = dbpool.Pool(fake_server.connect, min_size=0, dialect="generic")
    by_instance = dbpool.Pool(fake_server.connect, min_size=0, dialect=Quiet())
    pools += [by_name, by_instance]
    with by_instance.connection() as conn:
        conn.cursor().execute("update t set v = 1")  # Quiet says idle: no rollback
    assert fake_server.count("rollback") == 0
    with by_name.connection() as conn:
        conn.cursor().execute("update t set v = 1")
    assert fake_server.count("rollback") == 1


def test_unknown_dialect_name_lists_the_choices():
    with pytest.raises(ValueError) as info:
        dialects.get("db2")
    for name in ("psycopg", "pymysql", "pymssql", "sqlite3", "generic"):
        assert name in str(info.value)


@pytest.fixture
def mssql_pool(fake_server, pools):
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1)
    pools.append(pool)
    return pool


def test_pymssql_clean_return_needs_no_round_trip(mssql_pool, fake_server):
    with mssql_pool.connection() as conn:
        conn.cursor().execute("update t set v = 1")
        conn.commit()
    with mssql_pool.connection():
        pass
    assert fake_server.count("rollback") == 0


def test_pymssql_pending_work_is_rolled_back(mssql_pool, fake_server):
    with mssql_pool.connection() as conn:
        conn.cursor().execute("update t set v = 1")
        raw = conn.raw
    assert fake_server.count("rollback") == 1
    assert not fake_server.in_transaction(raw)


def test_pymssql_autocommit_is_restored_for_the_next_borrower(mssql_pool, fake_server):
    with mssql_pool.connection() as conn:
        conn.raw.autocommit(True)
    with mssql_pool.connection() as conn:
        assert conn.raw.autocommit_state is False


def test_pymssql_dead_connection_is_discarded(mssql_pool, fake_server):
    with pytest.raises(fakedb.OperationalError):
        with mssql_pool.connection() as conn:
            fake_server.kill(conn.raw)
            conn.cursor().execute("select 2")
    s = mssql_pool.stats()
    assert (s.size, s.discarded) == (0, 1)
    with mssql_pool.connection() as conn:
        conn.cursor().execute("select 2")


def test_pymssql_killed_idle_connection_fails_validation(fake_server, pools):
    pool = dbpool.Pool(fake_server.connect_mssql, min_size=0, max_size=1, validate_after=0)
    pools.append(pool)
    with pool.connection():
        pass
    fake_server.kill_all()
    with pool.connection() as conn:
        conn.cursor().execute("select 2")
    assert pool.stats().discarded == 1


def test_pymssql_ping_passes_on_a_connection_made_with_as_dict(fake_server, pools):
    """pymssql.connect(as_dict=True) makes every cursor's rows dicts, and such a cursor
    refuses the unnamed column of SELECT 1: the ping reads it through a cursor of tuples, so
    a live connection passes its check instead of being replaced at every checkout."""

    def connect():
        conn = fake_server.connect_mssql()
        conn.as_dict = True
        return conn

    fake_server.set_result("select 2 as v", [(2,)], columns=("v",))
    pool = dbpool.Pool(connect, min_size=0, max_size=1, validate_after=0)
    pools.append(pool)
    for _ in range(3):
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select 2 as v")
            assert cur.fetchall() == [{"v": 2}]  # the borrower still gets its dicts
            conn.commit()
    assert fake_server.count("ping") == 2
    s = pool.stats()
    assert (s.created, s.discarded) == (1, 0)


def test_generic_dialect_rolls_back_only_after_statements(fake_server, pools):
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    pools.append(pool)
    with pool.connection():
        pass
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("select 2")
        conn.rollback()
        _ = cur.rowcount  # reading an attribute runs nothing
    assert fake_server.count("rollback") == 1  # only the caller's own
    with pool.connection() as conn:
        conn.raw.cursor().execute("update t set v = 1")  # behind the lease's back
    assert fake_server.count("rollback") == 2


def test_sqlite_without_check_same_thread_is_refused(tmp_path, pools):
    pool = dbpool.Pool(lambda: sqlite3.connect(tmp_path / "x.db"), min_size=0)
    pools.append(pool)
    with pytest.raises(TypeError, match="check_same_thread=False"):
        pool.connection()
    assert pool.stats().size == 0


class _AlwaysInTransaction(sqlite3.Connection):
    """What Python 3.12's sqlite3.connect(..., autocommit=False) makes, as far as the pool can
    see: a connection whose autocommit attribute is False."""

    autocommit = False


def test_sqlite_with_autocommit_off_is_refused(tmp_path, pools):
    def connect():
        return sqlite3.connect(
            tmp_path / "x.db", check_same_thread=False, factory=_AlwaysInTransaction
        )

    pool = dbpool.Pool(connect, min_size=0)
    pools.append(pool)
    with pytest.raises(TypeError, match="autocommit=False"):
        pool.connection()
    assert pool.stats().size == 0


class _LegacyTransactionControl(sqlite3.Connection):
    """A connection with the autocommit attribute of Python 3.12, at its default
    (sqlite3.LEGACY_TRANSACTION_CONTROL), on any Python."""

    autocommit = -1


@pytest.mark.parametrize("through", ["raw", "cursor.connection"])
def test_sqlite_autocommit_set_on_the_driver_connection_is_put_back(tmp_path, pools, through):
    def connect():
        return sqlite3.connect(
            tmp_path / "x.db", check_same_thread=False, factory=_LegacyTransactionControl
        )

    pool = dbpool.Pool(connect, min_size=0, max_size=1)
    pools.append(pool)
    with pool.connection() as conn:
        raw = conn.raw if through == "raw" else conn.cursor().connection
        raw.autocommit = True
    with pool.connection() as conn:
        assert conn.raw is raw
        assert raw.autocommit == -1
    assert pool.stats().discarded == 0


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sqlite3's autocommit is Python 3.12+")
def test_sqlite_next_borrower_rolls_back_after_autocommit_was_set_on_raw(tmp_path, pools):
    """With autocommit left True, the next borrower's statements would each commit at once,
    and its rollback() would undo nothing."""
    path = tmp_path / "x.db"
    pool = dbpool.Pool(lambda: sqlite3.connect(path, check_same_thread=False), max_size=1)
    pools.append(pool)
    with pool.connection() as conn:
        conn.raw.autocommit = True
        conn.execute("create table t (x int)")
    with pool.connection() as conn:
        conn.execute("insert into t values (1)")
        conn.rollback()
    assert pool.execute("select count(*) from t") == [(0,)]


def test_statements_on_the_raw_cursor_are_rolled_back(fake_server, pools):
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    pools.append(pool)
    with pool.connection() as conn:
        conn.cursor().raw.execute("update t set v = 1")
        raw = conn.raw
    assert fake_server.count("rollback") == 1
    assert not fake_server.in_transaction(raw)


def test_server_timeouts_round_up_so_the_server_never_stops_a_statement_early() -> None:
    # A transaction's server-side timeout is the time left when it is set; the server starts
    # its clock later.  Rounded down, a statement could be stopped just before the client's
    # own deadline, and the caller would get the driver's QueryCanceled, not TransactionTimeout.
    from dbpool.dialects.base import MAX_MS, milliseconds

    assert milliseconds(0.4996) == 500
    assert milliseconds(0.0000001) == 1
    assert milliseconds(2.0) == 2000
    assert milliseconds(1e12) == MAX_MS


MSSQL_CURRENT_LEVEL = (
    "SELECT transaction_isolation_level FROM sys.dm_exec_sessions WHERE session_id = @@SPID"
)


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_pymssql_block_on_an_autocommit_lease_is_one_transaction(fake_server, pools, ending):
    """With autocommit on, pymssql commits each statement alone and its commit() and
    rollback() do nothing: the block turns it off (BEGIN TRAN) and back on at its end."""

    class Undo(Exception):
        pass

    def connect() -> fakedb.FakeMSSQLConnection:
        conn = fake_server.connect_mssql()
        conn.autocommit(True)  # as pymssql.connect(autocommit=True)
        return conn

    fake_server.set_result(MSSQL_CURRENT_LEVEL, [(2,)])  # READ COMMITTED, the default
    pool = dbpool.Pool(connect, min_size=0, max_size=1)
    pools.append(pool)
    with pool.connection() as conn:
        start = len(fake_server.calls)
        with pytest.raises(Undo) if ending == "rollback" else contextlib.nullcontext():
            with conn.transaction(isolation="serializable") as tx:
                tx.execute("update t set v = 1")
                if ending == "rollback":
                    raise Undo
        seen = [c.sql or c.verb for c in fake_server.calls[start:] if c.verb != "cursor"]
        assert seen == [
            "autocommit",  # off: BEGIN TRAN
            MSSQL_CURRENT_LEVEL,
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "update t set v = 1",
            ending,
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
            "autocommit",  # back on
        ]
        assert conn.raw.autocommit_state is True
    s = pool.stats()
    assert s.discarded == 0, s


def test_only_cursors_that_fetch_as_they_go_are_watched_when_iterated(
    pg_connect, mysql_connect, psycopg2_connect, mysqlclient_connect, tmp_path
):
    """Inside a block, iterating a cursor is watched step by step only where a step may wait
    for the server: a client-side cursor already holds its rows, and watching each of them
    made iteration half as fast again."""
    import MySQLdb.cursors
    import pymysql.cursors

    pg = pg_connect()
    psycopg = dialects.PsycopgDialect()
    assert not psycopg.fetches_as_it_goes(pg.cursor())
    assert psycopg.fetches_as_it_goes(pg.cursor(name="server_side"))
    with pg.pipeline():  # fetching syncs the pipeline: a round trip
        assert psycopg.fetches_as_it_goes(pg.cursor())
    pg2 = psycopg2_connect()
    psycopg2 = dialects.Psycopg2Dialect()
    assert not psycopg2.fetches_as_it_goes(pg2.cursor())
    assert psycopg2.fetches_as_it_goes(pg2.cursor(name="server_side"))
    my = mysql_connect()
    pymysql_dialect = dialects.PyMySQLDialect()
    assert not pymysql_dialect.fetches_as_it_goes(my.cursor())
    assert not pymysql_dialect.fetches_as_it_goes(my.cursor(pymysql.cursors.DictCursor))
    assert pymysql_dialect.fetches_as_it_goes(my.cursor(pymysql.cursors.SSCursor))
    assert pymysql_dialect.fetches_as_it_goes(my.cursor(pymysql.cursors.SSDictCursor))
    mc = mysqlclient_connect()
    mysqldb = dialects.MySQLdbDialect()
    assert not mysqldb.fetches_as_it_goes(mc.cursor())
    assert mysqldb.fetches_as_it_goes(mc.cursor(MySQLdb.cursors.SSCursor))
    with contextlib.closing(sqlite3.connect(str(tmp_path / "db.sqlite3"))) as lite:
        assert dialects.SQLiteDialect().fetches_as_it_goes(lite.cursor())  # steps the statement


def test_only_cursors_that_leave_nothing_behind_may_be_dropped_unclosed(
    pg_connect, mysql_params, psycopg2_connect, mysqlclient_connect, tmp_path
):
    """A lease lets go of the cursors it dropped unclosed only where the driver's own
    collection of them leaves nothing on the server or the connection."""
    import pymysql.cursors
    from pymysql.constants import CLIENT

    pg = pg_connect()
    psycopg = dialects.PsycopgDialect()
    assert psycopg.drops_cursor_cleanly(pg.cursor())
    assert not psycopg.drops_cursor_cleanly(pg.cursor(name="server_side", withhold=True))
    pg2 = psycopg2_connect()
    psycopg2 = dialects.Psycopg2Dialect()
    assert psycopg2.drops_cursor_cleanly(pg2.cursor())
    assert not psycopg2.drops_cursor_cleanly(pg2.cursor(name="server_side", withhold=True))
    my = pymysql.connect(**mysql_params, client_flag=CLIENT.MULTI_STATEMENTS)
    pymysql_dialect = dialects.PyMySQLDialect()
    plain = my.cursor()
    assert pymysql_dialect.drops_cursor_cleanly(plain)
    plain.execute("SELECT 1")
    assert pymysql_dialect.drops_cursor_cleanly(plain)
    multi = my.cursor()
    multi.execute("SELECT 1; SELECT 2")  # the second result is still to read
    assert not pymysql_dialect.drops_cursor_cleanly(multi)
    multi.close()
    assert not pymysql_dialect.drops_cursor_cleanly(my.cursor(pymysql.cursors.SSCursor))
    my.close()
    assert not dialects.MySQLdbDialect().drops_cursor_cleanly(mysqlclient_connect().cursor())
    with contextlib.closing(sqlite3.connect(str(tmp_path / "db.sqlite3"))) as lite:
        assert dialects.SQLiteDialect().drops_cursor_cleanly(lite.cursor())
