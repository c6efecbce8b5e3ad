"""A PostgreSQL transaction block with a timeout leaves its first statement to the block: the
deadline's limits are read and set with SHOW and SET LOCAL (psycopg2: a SELECT of their own
before BEGIN), which take no snapshot, where a SELECT as the transaction's first statement
would fix a REPEATABLE READ or SERIALIZABLE snapshot before the block's own first statement."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Connector, rows, wait_until

pytestmark = [pytest.mark.timeout(30), pytest.mark.postgresql]

LIMITS_SQL = (
    "select current_setting('statement_timeout'), current_setting('lock_timeout'), "
    "current_setting('idle_in_transaction_session_timeout')"
)


@pytest.fixture(params=["psycopg", "psycopg2"])
def connect(request: pytest.FixtureRequest) -> Connector:
    name = "pg_connect" if request.param == "psycopg" else "psycopg2_connect"
    connector: Connector = request.getfixturevalue(name)
    return connector


@pytest.fixture
def table(pg_connect: Connector) -> Iterator[str]:
    name = f"first_statement_{os.getpid()}_{threading.get_ident()}"
    admin = pg_connect()
    admin.autocommit = True
    rows(admin, f"drop table if exists {name}")
    rows(admin, f"create table {name} (id int primary key, v int)")
    rows(admin, f"insert into {name} values (1, 0)")
    try:
        yield name
    finally:
        rows(admin, f"drop table if exists {name}")
        admin.close()


def new_pool(connect: Callable[[], Any]) -> dbpool.Pool[Any]:
    return dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5)


def _isolation_of(tx: Any) -> str:
    level: str = rows(tx, "show transaction_isolation")[0][0]
    return level


@pytest.mark.parametrize("how", ["transaction", "run_transaction"])
def test_set_transaction_isolation_first_in_a_timed_block(connect: Connector, how: str) -> None:
    """PostgreSQL refuses SET TRANSACTION ISOLATION LEVEL "before any query" is over: the
    deadline's limits must not be a query."""

    def fn(tx: Any) -> str:
        rows(tx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        return _isolation_of(tx)

    with new_pool(connect) as pool:
        if how == "transaction":
            with pool.transaction(timeout=5) as tx:
                level = fn(tx)
        else:
            level = pool.run_transaction(fn, timeout=5)
        assert level == "serializable"


def test_set_transaction_snapshot_first_in_a_timed_block(
    connect: Connector, pg_connect: Connector, table: str
) -> None:
    """SET TRANSACTION SNAPSHOT, too, must come before any query: the block then reads
    exactly the exported snapshot, not a row committed after it."""
    exporter = pg_connect()
    writer = pg_connect()
    writer.autocommit = True
    try:
        rows(exporter, "begin isolation level repeatable read")
        snapshot = rows(exporter, "select pg_export_snapshot()")[0][0]
        rows(writer, f"insert into {table} values (2, 0)")  # after the snapshot
        with new_pool(connect) as pool:
            with pool.transaction(isolation="REPEATABLE READ", timeout=5) as tx:
                rows(tx, f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                seen = rows(tx, f"select id from {table} order by id")
        assert seen == [(1,)]
    finally:
        exporter.close()
        writer.close()


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_lock_table_first_waits_before_the_snapshot(
    connect: Connector, pg_connect: Connector, table: str, isolation: str
) -> None:
    """PostgreSQL's way to read after another session's work under snapshot isolation: LOCK
    TABLE first, whose wait comes before the snapshot.  The block must see what the lock's
    holder committed, not a snapshot fixed before it waited."""
    holder = pg_connect()
    watcher = pg_connect()
    watcher.autocommit = True
    try:
        rows(holder, f"lock table {table} in exclusive mode")
        rows(holder, f"update {table} set v = 1 where id = 1")
        with new_pool(connect) as pool:
            with pool.connection() as conn:
                backend = rows(conn, "select pg_backend_pid()")[0][0]

            def commit_once_waited_on() -> None:
                wait_until(
                    lambda: rows(
                        watcher,
                        "select 1 from pg_locks where pid = %s and not granted",
                        (backend,),
                    ),
                    timeout=10,
                    message="the block never waited for the table's lock",
                )
                holder.commit()

            committer = threading.Thread(target=commit_once_waited_on)
            committer.start()
            try:
                with pool.transaction(isolation=isolation, timeout=10) as tx:
                    rows(tx, f"lock table {table} in exclusive mode")
                    seen = rows(tx, f"select v from {table} where id = 1")
            finally:
                committer.join(15)
        assert seen == [(1,)]
    finally:
        holder.close()
        watcher.close()


def _session_limits(pool: dbpool.Pool[Any]) -> list[tuple[Any, ...]]:
    with pool.connection() as conn:
        return rows(conn, LIMITS_SQL)


def test_psycopg2_autocommit_connection_with_its_own_isolation(
    psycopg2_connect: Connector,
) -> None:
    """On a psycopg2 connection in autocommit mode with its own isolation level, the block
    begins with SQL BEGIN, so the limits are read by SHOW: the session's tighter one stays,
    the others get the deadline's, and the first statement may still be SET TRANSACTION."""

    def connect() -> Any:
        conn = psycopg2_connect()
        conn.autocommit = True
        conn.set_session(isolation_level="REPEATABLE READ")
        rows(conn, "set statement_timeout = 1500")
        return conn

    with new_pool(connect) as pool:
        before = _session_limits(pool)
        with pool.transaction(timeout=5) as tx:
            rows(tx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            inside = rows(tx, LIMITS_SQL)
            level = _isolation_of(tx)
        assert inside == [("1500ms", "5s", "5s")]
        assert level == "serializable"
        assert _session_limits(pool) == before == [("1500ms", "0", "0")]


def test_psycopg_block_inside_the_callers_pipeline(pg_connect: Connector) -> None:
    """In pipeline mode a query holds one statement: SHOW and SET LOCAL go one by one, with
    the same outcome (the session's tighter limit kept, the first statement left free)."""

    def connect() -> Any:
        conn = pg_connect()
        rows(conn, "set lock_timeout = 1200")
        conn.commit()
        return conn

    with new_pool(connect) as pool:
        with pool.connection() as conn:
            with conn.raw.pipeline():
                with conn.transaction(timeout=5) as tx:
                    tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    # (fetched at once: in pipeline mode a cursor has no description before)
                    inside = [tuple(r) for r in tx.execute(LIMITS_SQL).fetchall()]
                    level = tx.execute("show transaction_isolation").fetchone()[0]
            after = [tuple(r) for r in conn.execute(LIMITS_SQL).fetchall()]
            conn.rollback()
        assert inside == [("5s", "1200ms", "5s")]
        assert level == "repeatable read"
        assert after == [("0", "1200ms", "0")]


@pytest.mark.parametrize("shown", ["0", "250ms", "2s", "1min", "3h", "1d"])
def test_every_unit_postgresql_shows_is_read(pg_connect: Connector, shown: str) -> None:
    """SHOW writes a limit in its largest whole unit: each must be read as the session's
    limit, kept when tighter than the deadline, replaced when looser (or 0)."""
    from dbpool.dialects.psycopg import shown_ms

    def connect() -> Any:
        conn = pg_connect()
        rows(conn, f"set statement_timeout = '{shown}'")
        conn.commit()
        return conn

    deadline_ms = 90_000
    with new_pool(connect) as pool:
        with pool.transaction(timeout=deadline_ms / 1000) as tx:
            inside = rows(tx, "show statement_timeout")[0][0]
    session_ms = shown_ms(shown)
    expected = session_ms if 0 < session_ms < deadline_ms else deadline_ms
    assert shown_ms(inside) == expected
