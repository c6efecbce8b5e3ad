"""dbpool under the frameworks of the how-to guides, one step past what their examples show.

Each test pins, against the real servers, what a guide says about a framework's behaviour on
top of a pool (Flask, gunicorn, SQLAlchemy, pandas, plain DB-API code): a new version of the
framework that behaves otherwise fails here, and the page must change with it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sqlite3
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Backend, Connector, in_child, rows, scalar, wait_until
from tests.test_examples import load, unique


def no_lease_out(pool: dbpool.Pool[Any]) -> bool:
    stats = pool.stats()
    return stats.in_use == 0 and stats.waiting == 0


def sa_engine(url: str, pool: dbpool.Pool[Any], **options: Any) -> Any:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    options.setdefault("poolclass", NullPool)
    if url.startswith("postgresql+psycopg:"):
        options.setdefault("use_native_hstore", False)  # see the SQLAlchemy guide
    return sa.create_engine(url, creator=pool.connect, **options)


# -- Flask -------------------------------------------------------------------------------------


def test_flask_app_closes_its_pool_when_creating_the_schema_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import atexit

    flask_app = load("flask_app")
    registered: list[Callable[..., Any]] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    missing = tmp_path / "no-such-directory" / "db.sqlite3"
    with pytest.raises(sqlite3.OperationalError):
        flask_app.create_app(
            lambda: sqlite3.connect(str(missing), check_same_thread=False), min_size=0
        )
    (close,) = registered
    pool = close.__self__
    try:
        assert pool.closed, "no application holds the pool, and it was left open"
    finally:
        pool.close()


def test_flask_streamed_response_takes_its_lease_in_the_generator(
    sqlite_connect: Connector,
) -> None:
    from flask import Response, stream_with_context

    flask_app = load("flask_app")
    app = flask_app.create_app(sqlite_connect, table=unique("notes"), min_size=0, max_size=2)
    pool = app.extensions["dbpool"]

    def numbers(conn: dbpool.Connection[Any]) -> Any:
        for i in range(3):
            yield f"{scalar(conn, 'SELECT ?', (i,))}\n"

    @app.get("/lease-of-the-view")
    def lease_of_the_view() -> Response:
        with flask_app.get_pool().connection() as conn:
            return Response(numbers(conn))  # read after the block gave the lease back

    @app.get("/lease-of-the-generator")
    def lease_of_the_generator() -> Response:
        def generate() -> Any:
            with flask_app.get_pool().connection() as conn:
                yield from numbers(conn)

        return Response(stream_with_context(generate()))

    try:
        client = app.test_client()
        with pytest.raises(dbpool.LeaseReleased):
            client.get("/lease-of-the-view")
        assert client.get("/lease-of-the-generator").get_data(as_text=True) == "0\n1\n2\n"
        assert no_lease_out(pool)

        # A client that goes away after the first chunk: the server closes the response.
        response = client.get("/lease-of-the-generator", buffered=False)
        assert next(iter(response.response)) == b"0\n"
        assert pool.stats().in_use == 1
        response.close()
        assert no_lease_out(pool)
    finally:
        pool.close()


# -- gunicorn ----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
def test_engine_made_before_the_fork_looks_the_worker_pool_up_at_each_connect(
    postgresql_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """preload_app: an engine made in the master with the pool bound keeps the master's pool,
    which the worker's get_pool() closes; one that calls get_pool() at each connect uses the
    worker's."""
    import sqlalchemy as sa

    monkeypatch.setenv("PG_DSN", postgresql_dsn)
    monkeypatch.delenv("PG_APP_NAME", raising=False)
    gunicorn_app: ModuleType = load("gunicorn_app")
    gunicorn_app.close_pool()
    try:
        master_pool = gunicorn_app.get_pool(min_size=0, max_size=2)
        bound = sa_engine("postgresql+psycopg://", master_pool)
        looked_up = sa.create_engine(
            "postgresql+psycopg://",
            creator=lambda: gunicorn_app.get_pool().connect(),
            poolclass=sa.pool.NullPool,
            use_native_hstore=False,
        )

        def worker() -> dict[str, Any]:
            report: dict[str, Any] = {}
            own = gunicorn_app.get_pool()  # what post_fork does
            try:
                with bound.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except dbpool.PoolClosed:
                report["bound"] = "PoolClosed"
            with looked_up.connect() as conn:
                report["app_name"] = conn.execute(sa.text("SHOW application_name")).scalar()
            report["worker_pool_used"] = own.stats().acquired == 1 and no_lease_out(own)
            gunicorn_app.close_pool()
            return report

        report = in_child(worker)
        assert "error" not in report, report["error"]
        result = report["result"]
        assert result["bound"] == "PoolClosed"
        assert result["app_name"] != f"gunicorn-worker-{os.getpid()}"
        assert result["worker_pool_used"] is True
        assert not master_pool.closed and master_pool.stats().acquired == 0
    finally:
        gunicorn_app.close_pool()


# -- SQLAlchemy --------------------------------------------------------------------------------


def test_sqlalchemy_own_pool_holds_leases_until_engine_dispose(
    pg_connect: Connector, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlalchemy as sa

    with dbpool.Pool(pg_connect, min_size=0, max_size=2) as pool:
        engine = sa_engine("postgresql+psycopg://", pool, poolclass=sa.pool.QueuePool)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert pool.stats().in_use == 1  # closed for SQLAlchemy, kept in its pool
        engine.dispose()
        assert no_lease_out(pool)

        # Not disposed: close() closes the lease under SQLAlchemy, and pre-ping lets dbpool's
        # refusal through.
        pinged = sa_engine(
            "postgresql+psycopg://", pool, poolclass=sa.pool.QueuePool, pool_pre_ping=True
        )
        with pinged.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        with caplog.at_level(logging.WARNING, logger="dbpool"):
            pool.close(timeout=0)
        assert "closing 1 connection still leased" in caplog.text
        with pytest.raises(dbpool.LeaseReleased):
            pinged.connect()
        pinged.dispose()


def test_sqlalchemy_psycopg2_dialect_refuses_a_lease(psycopg2_connect: Connector) -> None:
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        engine = sa_engine("postgresql+psycopg2://", pool)
        with pytest.raises(TypeError, match="must be a connection, cursor or None"):
            engine.connect()
        assert no_lease_out(pool)


def test_sqlalchemy_json_deserializer_needs_the_configure_hook_with_a_creator(
    pg_connect: Connector,
) -> None:
    import sqlalchemy as sa
    from psycopg.types.json import set_json_loads

    def loads(text: str | bytes) -> Any:
        return ["loaded", json.loads(text)]

    query = sa.select(sa.cast(sa.literal('{"a": 1}'), sa.JSON))
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        engine = sa_engine("postgresql+psycopg://", pool, json_deserializer=loads)
        with engine.connect() as conn:
            assert conn.execute(query).scalar() == {"a": 1}  # the option went nowhere
    configured = dbpool.Pool(
        pg_connect, min_size=0, max_size=1, configure=lambda raw: set_json_loads(loads, raw)
    )
    with configured:
        with sa_engine("postgresql+psycopg://", configured).connect() as conn:
            assert conn.execute(query).scalar() == ["loaded", {"a": 1}]


def test_sqlalchemy_invalidate_gives_the_lease_back_for_reuse(pg_connect: Connector) -> None:
    import sqlalchemy as sa

    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        engine = sa_engine("postgresql+psycopg://", pool)
        with engine.connect() as conn:
            first = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
            conn.invalidate()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() == first
        stats = pool.stats()
        assert stats.created == 1 and stats.discarded == 0 and no_lease_out(pool)


def _kill_mysql_session(admin: Any, session: int) -> None:
    """End a session from the server's side, and wait until it is gone."""
    rows(admin, f"KILL CONNECTION {int(session)}")
    gone = "SELECT id FROM information_schema.processlist WHERE id = %s"
    wait_until(lambda: not rows(admin, gone, (session,)))


def test_sqlalchemy_isolation_level_on_mysql_is_session_state_the_pool_keeps(
    mysql_connect: Connector,
) -> None:
    """On MySQL, SQLAlchemy sets a level with SET SESSION, which the pool does not undo:
    SQLAlchemy sets it back when its connection closes, but not after invalidate(), and never
    for an engine's isolation_level. session_reset="discard" undoes both."""
    import sqlalchemy as sa

    def level_of_next_borrower(pool: dbpool.Pool[Any]) -> str:
        with sa_engine("mysql+pymysql://", pool).connect() as conn:
            return str(conn.get_isolation_level())  # read from the server

    with dbpool.Pool(mysql_connect, min_size=0, max_size=1) as pool:
        default = level_of_next_borrower(pool)
        assert default != "SERIALIZABLE"
        engine = sa_engine("mysql+pymysql://", pool)
        with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
            assert conn.get_isolation_level() == "SERIALIZABLE"
        assert level_of_next_borrower(pool) == default
        with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
            conn.invalidate()
        assert level_of_next_borrower(pool) == "SERIALIZABLE"
        assert pool.stats().created == 1

    for session_reset, expected in ((None, "SERIALIZABLE"), ("discard", default)):
        with dbpool.Pool(
            mysql_connect, min_size=0, max_size=1, session_reset=session_reset
        ) as pool:
            engine = sa_engine("mysql+pymysql://", pool, isolation_level="SERIALIZABLE")
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            assert level_of_next_borrower(pool) == expected


def test_sqlalchemy_drops_the_lease_when_setting_the_mysql_level_back_fails(
    mysql_connect: Connector,
) -> None:
    """A session lost after SQLAlchemy's rollback and before it sets the level back: its
    close() raises the driver's error and never closes the lease, which comes back to the pool
    only when it is garbage-collected."""
    import pymysql
    import sqlalchemy as sa

    admin = mysql_connect()
    admin.autocommit(True)
    with dbpool.Pool(mysql_connect, min_size=0, max_size=1) as pool:
        engine = sa_engine("mysql+pymysql://", pool)

        @sa.event.listens_for(engine, "reset")
        def lose_the_session(dbapi_connection: Any, record: Any, state: Any) -> None:
            # Its transaction is rolled back already; the level is set back after this event.
            _kill_mysql_session(admin, dbapi_connection.thread_id())

        conn = engine.connect().execution_options(isolation_level="SERIALIZABLE")
        conn.execute(sa.text("SELECT 1"))
        # Only the traceback refers to the lease once close() raised: it goes with it.
        with pytest.warns(ResourceWarning, match="garbage-collected without being released"):
            with pytest.raises(pymysql.OperationalError):  # the driver's, not SQLAlchemy's
                conn.close()
            assert pool.stats().in_use == 1  # not given back
            gc.collect()
        with pool.connection() as lease:  # the next checkout takes the dropped one back first
            assert scalar(lease, "SELECT 1") == 1
        stats = pool.stats()
        assert stats.leaked == 1 and stats.discards["broken"] == 1 and no_lease_out(pool)


# -- pandas ------------------------------------------------------------------------------------


def test_pandas_to_sql_on_the_driver_connection_commits_the_lease_work(
    sqlite_connect: Connector,
) -> None:
    import pandas as pd

    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        pool.execute("CREATE TABLE earlier (x INTEGER)")
        with pool.connection() as conn:
            conn.cursor().execute("INSERT INTO earlier VALUES (1)")  # not committed
            pd.DataFrame({"n": [1, 2]}).to_sql("frame", conn.raw, index=False)
            assert not conn.raw.in_transaction
        # No commit, and the lease went back: both were kept all the same.
        assert pool.execute("SELECT count(*) FROM earlier") == [(1,)]
        assert pool.execute("SELECT count(*) FROM frame") == [(2,)]


def test_pandas_to_sql_on_a_lease_fails_outside_sqlite(pg_connect: Connector) -> None:
    import pandas as pd
    import psycopg

    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the one every such call gets
            # pandas before 3 wraps every driver's error in its own; pandas 3 sqlite3's only.
            wrapped = int(pd.__version__.split(".")[0]) < 3
            raised = pd.errors.DatabaseError if wrapped else psycopg.ProgrammingError
            with pytest.raises(raised, match="0 placeholders") as info:
                pd.DataFrame({"n": [1]}).to_sql(unique("frame"), conn, index=False)
            if wrapped:
                assert isinstance(info.value.__cause__, psycopg.ProgrammingError)
        assert no_lease_out(pool)


def test_pandas_chunks_stopped_early_on_sqlite_keep_the_read_lock_until_closed(
    tmp_path: Path,
) -> None:
    import pandas as pd

    path = str(tmp_path / "chunks.sqlite3")

    def write(value: int) -> None:
        other = sqlite3.connect(path, timeout=0)  # fails at once while the lock is held
        try:
            other.execute("INSERT INTO numbers VALUES (?)", (value,))
            other.commit()
        finally:
            other.close()

    pool = dbpool.Pool(lambda: sqlite3.connect(path, check_same_thread=False), min_size=0)
    with pool:
        with pool.connection() as conn:
            pd.DataFrame({"n": range(100)}).to_sql("numbers", conn.raw, index=False)
            chunks = pd.read_sql("SELECT n FROM numbers", conn.raw, chunksize=10)
            assert len(next(chunks)) == 10
        assert no_lease_out(pool)
        if sys.version_info >= (3, 11):
            with pytest.raises(sqlite3.OperationalError, match="database is locked"):
                write(100)
        else:  # sqlite3's close() ends the connection's statements, the discard's included
            write(100)
        chunks.close()
        write(101)


# -- DB-API code -------------------------------------------------------------------------------


def test_psycopg_with_block_commits_where_a_lease_rolls_back(
    pg_connect: Connector, postgresql_dsn: str
) -> None:
    import psycopg

    table = unique("with_block")
    with psycopg.connect(postgresql_dsn) as admin:
        admin.execute(f"CREATE TABLE {table} (x int)")
    try:
        with psycopg.connect(postgresql_dsn) as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
            with pool.connection() as lease:
                lease.execute(f"INSERT INTO {table} VALUES (2)")
            assert pool.execute(f"SELECT x FROM {table}") == [(1,)]

            # Code that tests conn.closed before reusing a connection must test released.
            lease.close()
            assert lease.released
            with pytest.raises(dbpool.LeaseReleased):
                _ = lease.closed
    finally:
        with psycopg.connect(postgresql_dsn, autocommit=True) as admin:
            admin.execute(f"DROP TABLE {table}")


def test_a_lease_cursor_is_an_iterator_as_the_drivers_are(db: Backend) -> None:
    """``next(cur)`` works on every driver's cursor (``first = next(cur, None)``), so it must
    on a lease's; a released lease's cursor refuses it as it refuses fetchone()."""
    import collections.abc

    with dbpool.Pool(db.connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            assert isinstance(cur, collections.abc.Iterator)
            cur.execute("SELECT 1 UNION ALL SELECT 2")
            if isinstance(cur.raw, collections.abc.Iterator):
                assert tuple(next(cur)) == (1,)
                assert [tuple(row) for row in cur] == [(2,)]
                assert next(cur, None) is None
            else:  # psycopg before 3.3: refused as the driver's cursor refuses it, no harm done
                with pytest.raises(TypeError, match="not an iterator"):
                    next(cur)
                assert [tuple(row) for row in cur] == [(1,), (2,)]
            cur.execute("SELECT 3")
        with pytest.raises(dbpool.LeaseReleased):
            next(cur)
        assert no_lease_out(pool) and pool.stats().discarded == 0
