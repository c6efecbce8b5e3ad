"""What mypy must infer for dbpool's public API.  Read by mypy, never run or collected.

tests/test_typing.py runs ``mypy`` on this file and requires no error: each ``assert_type``
below fails the check if the inferred type is anything else.  tests/typing/check_types_fail.py
holds what must NOT type-check.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, TupleRow, dict_row
from typing_extensions import assert_type

import dbpool
from dbpool import Pool, Transaction

PgConnection = psycopg.Connection[TupleRow]


def pg_connect() -> PgConnection:
    return psycopg.connect("dbname=test")


def leases() -> None:
    # The pool is generic over what connect() returns, inferred from a lambda as well.
    pool = Pool(lambda: psycopg.connect("dbname=test"), min_size=0)
    assert_type(pool, Pool[psycopg.Connection[TupleRow]])
    assert_type(Pool(pg_connect), Pool[PgConnection])

    lease = pool.connection()
    assert_type(lease, dbpool.Connection[PgConnection])
    assert_type(lease.raw, PgConnection)
    assert_type(lease.pool, Pool[PgConnection])
    assert_type(pool.connect(), dbpool.Connection[PgConnection])
    with pool.connection() as conn:
        assert_type(conn, dbpool.Connection[PgConnection])
        assert_type(conn.raw, PgConnection)
        assert_type(conn.cursor(), dbpool.Cursor[PgConnection])
    with pool as same:
        assert_type(same, Pool[PgConnection])

    # Any DB-API driver: sqlite3's connection is a driver connection too.
    lite = Pool(lambda: sqlite3.connect(":memory:", check_same_thread=False))
    assert_type(lite, Pool[sqlite3.Connection])
    assert_type(lite.connection().raw, sqlite3.Connection)

    # The driver's own connect(), generic over its row type: mypy cannot pick the default row
    # type of a generic function passed bare, so the pool's type is spelt out (or connect is
    # wrapped in a lambda, or a partial).
    bare: Pool[PgConnection] = Pool(psycopg.connect, min_size=0)
    assert_type(bare.connection().raw, PgConnection)
    assert_type(Pool[PgConnection](psycopg.connect), Pool[PgConnection])
    assert_type(Pool[psycopg.Connection](psycopg.connect), Pool[PgConnection])  # as in README
    dicts = Pool(functools.partial(psycopg.connect, "dbname=test", row_factory=dict_row))
    assert_type(dicts, Pool[psycopg.Connection[DictRow]])
    assert_type(dicts.connection().raw, psycopg.Connection[DictRow])

    # A pool made from a URL cannot know its driver statically.
    assert_type(dbpool.create_pool("sqlite:///:memory:"), Pool[Any])


def transactions(pool: Pool[PgConnection]) -> None:
    assert_type(pool.transaction(), Transaction[PgConnection])
    assert_type(pool.transaction(isolation="serializable"), Transaction[PgConnection])
    with pool.transaction() as tx:
        assert_type(tx, Transaction[PgConnection])
        assert_type(tx.connection, dbpool.Connection[PgConnection])
        assert_type(tx.connection.raw, PgConnection)
        with tx.savepoint() as savepoint:
            assert_type(savepoint, dbpool.Savepoint[PgConnection])
    with pool.connection() as conn:
        assert_type(conn.transaction(), Transaction[PgConnection])

    def count(tx: Transaction[PgConnection]) -> int:
        return 1

    assert_type(pool.run_transaction(count), int)


def conveniences(pool: Pool[PgConnection]) -> None:
    def server_version(conn: dbpool.Connection[PgConnection]) -> int:
        return conn.raw.info.server_version

    assert_type(pool.with_connection(server_version), int)
    assert_type(pool.with_connection(lambda conn: conn.raw.info.dbname), str)
    assert_type(pool.execute("select 1"), list[Any])
    # Whatever the driver's execute() takes, as tx.execute() does.
    assert_type(pool.execute(sql.SQL("select {}").format(sql.Literal(1))), list[Any])
    assert_type(pool.execute(b"select 1"), list[Any])
    with pool.cursor(name="big") as cursor:
        assert_type(cursor, dbpool.PoolCursor[PgConnection])
        assert_type(cursor.connection.raw, PgConnection)


def observing(pool: Pool[PgConnection]) -> None:
    stats = pool.stats()
    assert_type(stats, dbpool.PoolStats)
    assert_type(stats.pool_closed, bool)
    assert_type(stats.discards, dict[str, int])
    assert_type({stats, pool.stats()}, set[dbpool.PoolStats])  # snapshots hash
    report = pool.health()
    assert_type(report, dbpool.HealthReport)
    assert_type(report["ok"], bool)
    assert_type(report["latency"], float | None)

    def on_checkout(event: dbpool.PoolEvent) -> None:
        pass

    pool.add_listener(dbpool.Event.CHECKOUT, on_checkout)
    pool.add_listener("discard", lambda event: assert_type(event.reason, str | None))
    try:
        pool.execute("select 1")
    except (dbpool.ConnectionUnusable, dbpool.PoolTimeout) as exc:
        assert_type(exc, dbpool.ConnectionUnusable | dbpool.PoolTimeout)


# Hooks receive the driver connection: Callable[[C], object].
def set_timezone(conn: psycopg.Connection[Any]) -> None:  # a wider parameter is fine
    conn.execute("set timezone to 'UTC'")
    conn.commit()


def ping(conn: PgConnection) -> bool:  # whatever a hook returns is ignored
    return conn.execute("select 1").fetchone() is not None


def forget(conn: object) -> None:
    pass


def hooks() -> None:
    pool = Pool(pg_connect, configure=set_timezone, check=ping, reset=forget)
    assert_type(pool, Pool[PgConnection])
    # A lambda hook's parameter is the driver connection, with the driver's own methods.
    with_lambdas = Pool(
        lambda: psycopg.connect("dbname=test"),
        configure=lambda conn: conn.execute("set search_path to app"),
        check=lambda conn: conn.execute("select 1"),
        reset=lambda conn: conn.execute("discard all"),
    )
    assert_type(with_lambdas, Pool[PgConnection])
    lite = Pool(
        lambda: sqlite3.connect(":memory:"),
        configure=lambda conn: conn.execute("pragma foreign_keys = on"),
        reset=forget,
    )
    assert_type(lite, Pool[sqlite3.Connection])
