"""SQLAlchemy Core on top of a dbpool pool.

SQLAlchemy takes a ``creator``: a callable returning a DB-API connection. Given
``pool.connect``, every SQLAlchemy connection borrows a lease, and closing the SQLAlchemy
connection closes the lease, which returns it to dbpool. ``NullPool`` turns SQLAlchemy's own
pooling off, so that connections are pooled once, by dbpool, with its limits, checks and
statistics.

Run it (PostgreSQL from ``$PG_DSN``, and a SQLite file in a temporary directory)::

    PG_DSN="host=127.0.0.1 dbname=test user=postgres" python sqlalchemy_core.py
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import dbpool

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"


def postgresql_engine(pool: dbpool.Pool[Any]) -> sa.Engine:
    return sa.create_engine(
        "postgresql+psycopg://",  # no host or database: the creator connects
        creator=pool.connect,
        poolclass=NullPool,
        # SQLAlchemy looks up the hstore type at first connect with psycopg's TypeInfo.fetch(),
        # which accepts only a psycopg.Connection, not a lease. Without hstore it does not.
        use_native_hstore=False,
    )


def sqlite_engine(pool: dbpool.Pool[Any]) -> sa.Engine:
    return sa.create_engine("sqlite://", creator=pool.connect, poolclass=NullPool)


def demo(engine: sa.Engine, pool: dbpool.Pool[Any], table_name: str) -> list[tuple[Any, ...]]:
    """Create a table, insert and select with SQLAlchemy Core, drop the table; the rows."""
    metadata = sa.MetaData()
    items = sa.Table(
        table_name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("qty", sa.Integer, nullable=False),
    )
    metadata.create_all(engine)
    try:
        # engine.begin(): one connection, COMMIT at the end of the block (ROLLBACK on an error).
        with engine.begin() as conn:
            conn.execute(
                items.insert(),
                [
                    {"name": "apple", "qty": 3},
                    {"name": "pear", "qty": 0},
                    {"name": "plum", "qty": 7},
                ],
            )
            assert pool.stats().in_use == 1  # the SQLAlchemy connection holds one lease

        # Closing the SQLAlchemy connection (the end of the block) returns the lease.
        assert pool.stats().in_use == 0

        with engine.connect() as conn:
            query = (
                sa.select(items.c.name, items.c.qty).where(items.c.qty > 0).order_by(items.c.name)
            )
            rows = [tuple(row) for row in conn.execute(query)]
        assert pool.stats().in_use == 0
        return rows
    finally:
        metadata.drop_all(engine)


def main() -> int:
    table = f"dbpool_example_items_{os.getpid()}"
    dsn = os.environ.get("PG_DSN", DEFAULT_DSN)
    with dbpool.Pool(lambda: psycopg.connect(dsn, connect_timeout=5), max_size=4) as pool:
        rows = demo(postgresql_engine(pool), pool, table)
        print("postgresql:", rows, pool.stats())

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "example.sqlite3")
        # check_same_thread=False: the pool passes connections between threads.
        with dbpool.Pool(
            lambda: sqlite3.connect(path, check_same_thread=False), max_size=4
        ) as pool:
            rows = demo(sqlite_engine(pool), pool, table)
            print("sqlite:", rows, pool.stats())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
