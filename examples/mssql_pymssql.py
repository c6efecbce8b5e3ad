"""A pool of pymssql connections to SQL Server.

pymssql keeps no local flag saying whether a transaction is open, so on return the pool rolls a
connection back whenever the lease ran a statement since its last commit or rollback (see the
pymssql section of the drivers page). The points specific to SQL Server here:

* ``login_timeout`` bounds a connect that hangs (a host that does not answer);
* ``configure`` sets session options once per connection, and commits: with autocommit off
  (pymssql's default) a transaction is open from the start, and the pool cannot read
  pymssql's transaction state to notice one that ``configure`` leaves open;
* parameters are written ``%s`` (pymssql's paramstyle is ``pyformat``).

Run it::

    MSSQL_URL="mssql://user:password@host:1433/database" python mssql_pymssql.py
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import dbpool


def configure(conn: Any) -> None:
    """Session options for every new connection, before anyone uses it."""
    cur = conn.cursor()
    # Give up on a lock after 5 s instead of waiting for ever, and roll the whole transaction
    # back on any error inside it (not only the failing statement).
    cur.execute("SET LOCK_TIMEOUT 5000")
    cur.execute("SET XACT_ABORT ON")
    cur.close()
    conn.commit()


POOL_OPTIONS: dict[str, Any] = {
    "min_size": 1,
    "max_size": 4,
    "acquire_timeout": 10.0,
    "configure": configure,
    "name": "mssql",
}


def make_pool(
    url: str | None = None, *, connect: Callable[[], Any] | None = None, **options: Any
) -> dbpool.Pool[Any]:
    """A pool for ``url`` (default ``$MSSQL_URL``), or for a connect callable of your own."""
    settings = {**POOL_OPTIONS, **options}
    if connect is not None:
        return dbpool.Pool(connect, **settings)
    url = url or os.environ["MSSQL_URL"]
    if "login_timeout=" not in url:
        url += ("&" if "?" in url else "?") + "login_timeout=10"
    # create_pool() passes the URL's parts and query to pymssql.connect(); the password never
    # shows in a repr, a log line or an error message.
    return dbpool.create_pool(url, **settings)


def create_table(pool: dbpool.Pool[Any], table: str) -> None:
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute(
            f"IF OBJECT_ID('{table}', 'U') IS NULL "
            f"CREATE TABLE {table} (id INT PRIMARY KEY, name NVARCHAR(100) NOT NULL)"
        )
        conn.commit()


def add_customer(pool: dbpool.Pool[Any], table: str, customer_id: int, name: str) -> None:
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (customer_id, name))
        conn.commit()


def customer_names(pool: dbpool.Pool[Any], table: str) -> list[str]:
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute(f"SELECT name FROM {table} ORDER BY id")
        return [row[0] for row in cur.fetchall()]
        # No commit: the pool rolls back on return what a read left open.


def drop_table(pool: dbpool.Pool[Any], table: str) -> None:
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute(f"IF OBJECT_ID('{table}', 'U') IS NOT NULL DROP TABLE {table}")
        conn.commit()


def main() -> int:
    if not os.environ.get("MSSQL_URL"):
        print("set MSSQL_URL=mssql://user:password@host:1433/database", file=sys.stderr)
        return 2
    table = f"dbpool_example_customers_{os.getpid()}"
    with make_pool() as pool:
        create_table(pool, table)
        try:
            add_customer(pool, table, 1, "Ada")
            add_customer(pool, table, 2, "Grace")
            print(customer_names(pool, table), pool.stats())
        finally:
            drop_table(pool, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
