"""A script whose database code was written for plain DB-API connections, fed from a pool.

``pool.connect()`` returns a lease that is a DB-API connection: ``cursor()``, ``commit()``,
``rollback()``, and ``close()``, which gives it back to the pool instead of closing it. So
functions written for a driver's connection take a lease unchanged, and a function that takes
a ``connect`` callable takes ``pool.connect``.

Run it against the local MariaDB (PyMySQL)::

    MYSQL_URL=mysql://root@127.0.0.1:3306/test python script_dbapi.py
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import dbpool

DEFAULT_URL = "mysql://root@127.0.0.1:3306/test"


# -- code written for any DB-API connection; it knows nothing of the pool ----------------------


def create_tasks(conn: Any, table: str, count: int) -> None:
    cur = conn.cursor()
    try:
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, done INT, archived INT)")
        cur.executemany(
            f"INSERT INTO {table} (id, done, archived) VALUES (%s, %s, 0)",
            [(i, i % 2) for i in range(count)],
        )
        conn.commit()
    finally:
        cur.close()


def archive_done(conn: Any, table: str) -> int:
    """Mark finished tasks archived; commits its own work, as DB-API code usually does."""
    cur = conn.cursor()
    try:
        cur.execute(f"UPDATE {table} SET archived = 1 WHERE done = 1 AND archived = 0")
        changed = cur.rowcount
        conn.commit()
        return int(changed)
    finally:
        cur.close()


def count_archived(connect: Callable[[], Any], table: str) -> int:
    """Code that opens and closes connections itself, from a ``connect`` callable."""
    conn = connect()
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT COUNT(*) FROM {table} WHERE archived = 1")
        (count,) = cur.fetchone()
        return int(count)
    finally:
        conn.close()


# -- the script -------------------------------------------------------------------------------


def main(url: str | None = None, table: str | None = None) -> int:
    url = url or os.environ.get("MYSQL_URL", DEFAULT_URL)
    table = table or f"dbpool_example_tasks_{os.getpid()}"
    # A script runs a few threads for a while: no connections kept warm, none kept for long.
    pool = dbpool.create_pool(url, min_size=0, max_size=4, acquire_timeout=10.0, name="script")
    try:
        conn = pool.connect()  # a lease: a DB-API connection
        try:
            create_tasks(conn, table, count=100)
            archived = archive_done(conn, table)
        finally:
            conn.close()  # back to the pool; the server session stays open for the next caller

        # contextlib.closing() does the same try/finally.
        with contextlib.closing(pool.connect()) as conn:
            assert archive_done(conn, table) == 0  # nothing left to archive

        # Code that wants a connect callable gets pool.connect: each call borrows a connection,
        # each close() returns it, and four threads share at most max_size connections.
        with ThreadPoolExecutor(max_workers=4) as executor:
            counts = list(executor.map(lambda _: count_archived(pool.connect, table), range(20)))
        assert counts == [archived] * 20

        stats = pool.stats()
        print(f"archived {archived} tasks; {stats.created} connections for {stats.acquired} leases")
        return 0
    finally:
        with contextlib.closing(pool.connect()) as conn:
            cur = conn.cursor()
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        pool.close()


if __name__ == "__main__":
    raise SystemExit(main())
