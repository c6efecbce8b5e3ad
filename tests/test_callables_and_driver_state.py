"""The checks on the callables a pool is given, and the psycopg 3 dialect's reading of a
connection's state, at their edges."""

from __future__ import annotations

import functools
from typing import Any, Callable
from unittest import mock

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Connector, assert_accounting

pytestmark = pytest.mark.timeout(30)

BOUND = 10.0


# == callables that can be called as the pool calls them ==========================================


def supplying(value: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that passes ``value`` as its function's first argument (as click's
    pass_context does): the wrapper takes one argument fewer than the function it wraps."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(value, *args, **kwargs)

        return wrapper

    return decorate


@pytest.mark.parametrize("hook", ["configure", "check", "reset"])
def test_a_hook_whose_decorator_supplies_an_argument_is_accepted(
    server: fakedb.Server, hook: str
) -> None:
    """The wrapper is what the pool calls, with the driver's connection alone: that the
    function it wraps takes one more argument is no reason to refuse it."""
    calls: list[Any] = []

    @supplying("settings")
    def fn(settings: str, raw: Any) -> None:
        calls.append(settings)

    with dbpool.Pool(server.connect, min_size=0, max_size=1, **{hook: fn}) as pool:
        with pool.connection(timeout=BOUND) as conn:
            conn.cursor().execute("SELECT 2")
        with pool.connection(timeout=BOUND):  # the check runs on an idle connection
            pass
        assert calls and set(calls) == {"settings"}
        assert_accounting(pool)


def test_a_listener_whose_decorator_supplies_an_argument_is_accepted(make_pool: Any) -> None:
    seen: list[str] = []

    @supplying("log")
    def listener(where: str, event: dbpool.PoolEvent) -> None:
        seen.append(where)

    pool = make_pool()
    pool.add_listener("checkout", listener)
    with pool.connection(timeout=BOUND):
        pass
    assert seen == ["log"]


@pytest.mark.parametrize("hook", ["configure", "check", "reset"])
def test_a_mock_with_a_function_spec_is_accepted_as_a_hook(
    server: fakedb.Server, hook: str
) -> None:
    """Test suites pass ``Mock(spec=real_hook)``: it poses as a function, and the pool calls it
    as it would the real hook."""

    def real_hook(raw: Any) -> None:
        pass

    fake = mock.Mock(spec=real_hook)
    with dbpool.Pool(server.connect, min_size=0, max_size=1, **{hook: fake}) as pool:
        with pool.connection(timeout=BOUND) as conn:
            conn.cursor().execute("SELECT 2")
        with pool.connection(timeout=BOUND):
            pass
        assert fake.called
        assert_accounting(pool)


def test_a_mock_with_a_function_spec_is_accepted_as_a_listener(make_pool: Any) -> None:
    def real_listener(event: dbpool.PoolEvent) -> None:
        pass

    fake = mock.Mock(spec=real_listener)
    pool = make_pool()
    pool.add_listener("checkout", fake)
    with pool.connection(timeout=BOUND):
        pass
    assert fake.call_count == 1


# == psycopg 3: a connection lost inside a pipeline ================================================


@pytest.mark.postgresql
def test_psycopg_connection_lost_inside_a_pipeline_is_discarded_as_broken(
    pg_connect: Connector,
) -> None:
    """A pipeline block that the lost connection ended leaves libpq in pipeline mode, its
    transaction status unknown: the connection is broken (and the idle ones are suspect, so
    they are pinged at their next checkout), not merely busy."""
    import psycopg

    admin = pg_connect()
    admin.autocommit = True
    with dbpool.Pool(pg_connect, min_size=0, max_size=1, acquire_timeout=5) as pool:
        with pool.connection(timeout=BOUND) as conn:
            pid = conn.raw.info.backend_pid
            with pytest.raises(psycopg.OperationalError), conn.pipeline() as pipeline:
                conn.execute("SELECT 1")
                pipeline.sync()
                # The 5 s wait: until the session has gone.
                admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
                conn.execute("SELECT 1")
                pipeline.sync()
        s = assert_accounting(pool)
        assert s.discards["broken"] == 1, s.discards


# == psycopg2: session methods that end a block's transaction ======================================

PG2_TABLE = "dbpool_recent_changes_pg2"


@pytest.fixture
def pg2_table(psycopg2_connect: Connector) -> Any:
    """An empty table ``PG2_TABLE (x int)``, and an autocommit cursor to read it with."""
    admin = psycopg2_connect()
    admin.autocommit = True
    cur = admin.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {PG2_TABLE}")
    cur.execute(f"CREATE TABLE {PG2_TABLE} (x int)")
    yield cur
    psycopg2_connect.close_all()  # first: a transaction left open would hold up the DROP
    admin = psycopg2_connect()
    admin.autocommit = True
    admin.cursor().execute(f"DROP TABLE IF EXISTS {PG2_TABLE}")
    admin.close()


def pg2_values(cur: Any) -> list[int]:
    cur.execute(f"SELECT x FROM {PG2_TABLE} ORDER BY x")
    return [x for (x,) in cur.fetchall()]


@pytest.mark.postgresql
def test_psycopg2_set_session_autocommit_inside_a_block_is_refused(
    psycopg2_connect: Connector, pg2_table: Any
) -> None:
    """psycopg2 begins lazily: before the block's first statement ``set_session(autocommit=
    True)`` is accepted, and the block's statements then commit one by one, its rollback
    undoing nothing.  It is refused, as setting ``autocommit`` is."""
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pytest.raises(LookupError), pool.transaction(timeout=BOUND) as tx:
            with pytest.raises(dbpool.PoolError):
                tx.connection.set_session(autocommit=True)
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (1)")
            raise LookupError("the block fails")
        assert pg2_values(pg2_table) == [], "the block's statement was committed on its own"
        assert_accounting(pool)


@pytest.mark.postgresql
def test_psycopg2_set_isolation_level_inside_a_block_is_refused(
    psycopg2_connect: Connector, pg2_table: Any
) -> None:
    """psycopg2's ``set_isolation_level()`` rolls back the transaction in progress: inside a
    block it would undo the block's work so far, and the block would commit the rest."""
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pool.transaction(timeout=BOUND) as tx:
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (1)")
            with pytest.raises(dbpool.PoolError):
                tx.connection.set_isolation_level(3)
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (2)")
        assert pg2_values(pg2_table) == [1, 2], "the block committed only part of its work"
        assert_accounting(pool)


@pytest.mark.postgresql
def test_psycopg2_set_client_encoding_inside_a_block_is_refused(
    psycopg2_connect: Connector, pg2_table: Any
) -> None:
    """psycopg2's ``set_client_encoding()`` rolls back the transaction in progress before it
    sets the encoding, as ``set_isolation_level()`` does: the block lost its first insert and
    committed the second, with no error."""
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pool.transaction(timeout=BOUND) as tx:
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (1)")
            with pytest.raises(dbpool.PoolError):
                tx.connection.set_client_encoding("LATIN1")
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (2)")
        assert pg2_values(pg2_table) == [1, 2], "the block committed only part of its work"
        assert_accounting(pool)


@pytest.mark.postgresql
def test_psycopg2_reset_inside_a_block_is_refused(
    psycopg2_connect: Connector, pg2_table: Any
) -> None:
    """psycopg2's ``reset()`` rolls back the transaction in progress and puts the session back
    to the server's defaults: the block lost its first insert, and committed the second outside
    its isolation level and server-side time limits, with no error."""
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pool.transaction(isolation="SERIALIZABLE", timeout=BOUND) as tx:
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (1)")
            with pytest.raises(dbpool.PoolError, match="reset"):
                tx.connection.reset()
            level = tx.execute("SELECT current_setting('transaction_isolation')").fetchone()
            assert level == ("serializable",)
            tx.execute(f"INSERT INTO {PG2_TABLE} VALUES (2)")
        assert pg2_values(pg2_table) == [1, 2], "the block committed only part of its work"
        assert_accounting(pool)


@pytest.mark.postgresql
def test_psycopg2_reset_outside_a_block_does_not_reach_the_next_borrower(
    psycopg2_connect: Connector,
) -> None:
    """psycopg2's ``reset()`` undoes what configure set on the server, the role included: the
    next borrower would run as the login user, with no statement_timeout.  The connection is
    discarded on return, and the next borrower gets a new one that configure set up."""

    def configure(raw: Any) -> None:
        with raw.cursor() as cur:
            cur.execute("SET ROLE pg_read_all_data")
            cur.execute("SET statement_timeout = '7s'")
        raw.commit()

    def session(conn: Any) -> Any:
        cur = conn.cursor()
        cur.execute("SELECT current_user, current_setting('statement_timeout')")
        return cur.fetchone()

    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection() as conn:
            assert session(conn) == ("pg_read_all_data", "7s")
            conn.reset()
            assert session(conn)[0] != "pg_read_all_data"
        with pool.connection() as conn:
            assert session(conn) == ("pg_read_all_data", "7s")
        assert pool.stats().discards["reset_failed"] == 1
        assert_accounting(pool)
