"""pandas.read_sql() and DataFrame.to_sql() with connections from a dbpool pool.

pandas takes two kinds of connection without complaint: a ``sqlite3.Connection``, and a
SQLAlchemy engine or connection. Anything else (a psycopg connection, or a dbpool lease, which
is not an instance of the driver's class) works for simple queries but raises a
``UserWarning`` ("pandas only supports SQLAlchemy connectable ...") on every call. So:

* SQLite: lease a connection and give pandas the driver's connection, ``conn.raw``;
* other databases: a SQLAlchemy engine whose creator is ``pool.connect`` (see
  ``sqlalchemy_core.py``).

Run it (PostgreSQL from ``$PG_DSN``, and a SQLite file in a temporary directory)::

    PG_DSN="host=127.0.0.1 dbname=test user=postgres" python pandas_read_sql.py
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any

import pandas as pd
import psycopg
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import dbpool

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"

PRICES = pd.DataFrame({"item": ["apple", "pear", "plum"], "price": [1.5, 2.0, 0.5]})


def sqlite_roundtrip(pool: dbpool.Pool[Any], table: str) -> pd.DataFrame:
    """Write PRICES with to_sql() and read part of it back with read_sql(), on SQLite."""
    with pool.connection() as conn:
        # conn.raw is the sqlite3.Connection, which pandas supports directly. The lease stays
        # in charge: the connection goes back to the pool at the end of the block, and a
        # transaction left open is rolled back then.
        PRICES.to_sql(table, conn.raw, index=False)  # commits by itself (pandas)
        return pd.read_sql(
            f"SELECT item, price FROM {table} WHERE price > ? ORDER BY item",
            conn.raw,
            params=(1.0,),
        )


def postgresql_engine(pool: dbpool.Pool[Any]) -> sa.Engine:
    # As in sqlalchemy_core.py: one lease per SQLAlchemy connection, no second pool.
    return sa.create_engine(
        "postgresql+psycopg://", creator=pool.connect, poolclass=NullPool, use_native_hstore=False
    )


def postgresql_roundtrip(pool: dbpool.Pool[Any], table: str) -> pd.DataFrame:
    """The same with PostgreSQL, through a SQLAlchemy engine drawing on the pool."""
    engine = postgresql_engine(pool)
    PRICES.to_sql(table, engine, index=False)  # pandas commits through the engine
    try:
        query = sa.text(f"SELECT item, price FROM {table} WHERE price > :low ORDER BY item")
        return pd.read_sql(query, engine, params={"low": 1.0})
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE {table}"))


def main() -> int:
    table = f"dbpool_example_prices_{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "example.sqlite3")
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), max_size=2
        ) as pool:
            print(sqlite_roundtrip(pool, table))

    dsn = os.environ.get("PG_DSN", DEFAULT_DSN)
    with dbpool.Pool(lambda: psycopg.connect(dsn, connect_timeout=5), max_size=2) as pool:
        print(postgresql_roundtrip(pool, table))
        print(pool.stats())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
