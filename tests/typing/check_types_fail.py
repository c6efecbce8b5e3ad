"""What must NOT type-check.  Read by mypy, never run or collected.

Each line ending in ``# error: CODE`` must get a mypy error with that code, and no other line
may get one (tests/test_typing.py checks both), so each misuse below is rejected on its own.
"""

from __future__ import annotations

import sqlite3

import psycopg
from psycopg.rows import TupleRow

from dbpool import Pool

PgConnection = psycopg.Connection[TupleRow]


def pg_connect() -> PgConnection:
    return psycopg.connect("dbname=test")


def takes_sqlite(conn: sqlite3.Connection) -> None:
    pass


def takes_str(conn: str) -> None:
    pass


def wrong_hooks() -> None:
    # A hook for another driver's connection: with the pool's type spelt out, the hook is
    # checked against it; left to inference, no connection type fits both.
    Pool[PgConnection](pg_connect, configure=takes_sqlite)  # error: arg-type
    Pool[PgConnection](pg_connect, check=takes_sqlite)  # error: arg-type
    Pool[PgConnection](pg_connect, reset=takes_str)  # error: arg-type
    Pool(pg_connect, configure=takes_sqlite)  # error: misc
    # A lambda hook calling what the driver connection does not have.
    Pool(lambda: sqlite3.connect(":memory:"), check=lambda conn: conn.pgconn)  # error: attr-defined


def not_a_connection() -> None:
    # connect must return a DB-API connection.
    Pool(lambda: 42)  # error: type-var


def bare_generic_connect() -> None:
    # psycopg.connect is generic in its row type, which mypy cannot pick for it: the README
    # says to spell the pool's type out (check_types.py), and why.
    Pool(psycopg.connect)  # error: arg-type


def raw_of_another_driver(pool: Pool[PgConnection]) -> sqlite3.Connection:
    return pool.connection().raw  # error: return-value


def pool_of_another_driver(pool: Pool[PgConnection]) -> Pool[sqlite3.Connection]:
    with pool.transaction() as tx:
        return tx.connection.pool  # error: return-value


def lease_for_another_driver(pool: Pool[PgConnection]) -> None:
    pool.with_connection(takes_sqlite)  # error: arg-type


def health_report_key_misspelt(pool: Pool[PgConnection]) -> object:
    return pool.health()["healthy"]  # error: typeddict-item


def listener_of_another_kind(pool: Pool[PgConnection]) -> None:
    # A listener is told a dbpool.PoolEvent.
    pool.add_listener("checkout", takes_str)  # error: arg-type
