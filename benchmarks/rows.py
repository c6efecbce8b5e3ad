"""What a lease's cursor adds to the driver's own when reading rows and running statements.

    python benchmarks/rows.py [--quick] [--rounds N] [--drivers psycopg,sqlite3,...]

For each driver, one lease, and on it one cursor: each scenario runs on the driver's cursor
(``cur.raw``) and on the lease's cursor in turns (raw first, then lease first, ...), and the
report gives the median time of each and the difference per row or per call, in ns.

- reading 100,000 rows of one int column (``--quick``: 10,000) with a ``fetchone()`` loop,
  ``for row in cur``, a ``fetchmany(100)`` loop and ``fetchall()``;
- 10,000 (``--quick``: 1,000) times ``execute("SELECT 1")`` then ``fetchone()``;
- ``executemany`` of 10,000 (``--quick``: 1,000) rows into a temporary table, rolled back
  between runs.

Servers: ``DBPOOL_TEST_POSTGRESQL_DSN`` and ``DBPOOL_TEST_MYSQL_DSN``, or the local test
servers; a driver that cannot connect is skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare import DEFAULT_MYSQL_URL, DEFAULT_PG_DSN, mysql_params

import dbpool

TABLE = "dbpool_bench_rows"
Timing = tuple[float, float]  # median seconds: the driver's cursor, the lease's


@dataclass(frozen=True)
class Driver:
    name: str
    connect: Callable[[], Any]
    series: str  # SELECT of rows 1..{n}, one int column
    insert: str  # INSERT of one int into TABLE
    cursor_args: tuple[Callable[[], Any], ...] = ()  # each gives an argument of cursor()
    create: str = f"CREATE TEMPORARY TABLE {TABLE} (n int)"


def drivers() -> list[Driver]:
    pg_dsn = os.environ.get("DBPOOL_TEST_POSTGRESQL_DSN", DEFAULT_PG_DSN)
    mysql = mysql_params(os.environ.get("DBPOOL_TEST_MYSQL_DSN", DEFAULT_MYSQL_URL))
    pg_series = "SELECT generate_series(1, {n})"
    my_series = "SELECT seq FROM seq_1_to_{n}"
    insert = f"INSERT INTO {TABLE} VALUES (%s)"
    # A pool takes no database in memory: a file, which holds only the temporary table
    sqlite_file = str(Path(tempfile.mkdtemp(prefix="dbpool-bench-rows-")) / "rows.sqlite3")

    def psycopg_connect() -> Any:
        import psycopg

        return psycopg.connect(pg_dsn)

    def psycopg2_connect() -> Any:
        import psycopg2

        return psycopg2.connect(pg_dsn)

    def pymysql_connect() -> Any:
        import pymysql

        return pymysql.connect(**mysql)

    def mysqlclient_connect() -> Any:
        import MySQLdb

        kwargs = dict(mysql)
        kwargs["passwd"] = kwargs.pop("password")
        kwargs["db"] = kwargs.pop("database")
        return MySQLdb.connect(**kwargs)

    def pymysql_sscursor() -> Any:
        import pymysql.cursors

        return pymysql.cursors.SSCursor

    def mysqlclient_sscursor() -> Any:
        import MySQLdb.cursors

        return MySQLdb.cursors.SSCursor

    return [
        Driver("psycopg", psycopg_connect, pg_series, insert),
        Driver("psycopg2", psycopg2_connect, pg_series, insert),
        Driver("pymysql", pymysql_connect, my_series, insert),
        Driver("pymysql-ss", pymysql_connect, my_series, insert, (pymysql_sscursor,)),
        Driver("mysqlclient", mysqlclient_connect, my_series, insert),
        Driver("mysqlclient-ss", mysqlclient_connect, my_series, insert, (mysqlclient_sscursor,)),
        Driver(
            "sqlite3",
            lambda: sqlite3.connect(sqlite_file, check_same_thread=False),
            "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < {n}) "
            "SELECT n FROM s",
            f"INSERT INTO {TABLE} VALUES (?)",
            create=f"CREATE TEMP TABLE {TABLE} (n int)",
        ),
    ]


# -- scenarios: each runs on a cursor, the driver's or the lease's -------------------------------


def fetchone_loop(cur: Any, sql: str) -> None:
    cur.execute(sql)
    while cur.fetchone() is not None:
        pass


def iterate(cur: Any, sql: str) -> None:
    cur.execute(sql)
    for _row in cur:
        pass


def fetchmany_loop(cur: Any, sql: str) -> None:
    cur.execute(sql)
    while cur.fetchmany(100):
        pass


def fetchall(cur: Any, sql: str) -> None:
    cur.execute(sql)
    cur.fetchall()


def tiny_statements(cur: Any, calls: int) -> None:
    for _ in range(calls):
        cur.execute("SELECT 1")
        cur.fetchone()


def measure(
    run: Callable[[Any], None], raw: Any, wrapped: Any, rounds: int, after: Callable[[], object]
) -> Timing:
    """Median seconds of ``run`` on ``raw`` and on ``wrapped``, in turns; ``after`` runs
    untimed after each."""
    times: dict[str, list[float]] = {"raw": [], "lease": []}
    for i in range(rounds):
        order = [("raw", raw), ("lease", wrapped)]
        for key, cur in order if i % 2 == 0 else reversed(order):
            start = perf_counter()
            run(cur)
            times[key].append(perf_counter() - start)
            after()
    return statistics.median(times["raw"]), statistics.median(times["lease"])


def bench(driver: Driver, rows: int, calls: int, rounds: int) -> list[tuple[str, int, Timing]]:
    pool = dbpool.Pool(driver.connect, min_size=1, max_size=1, name="bench-rows")
    results: list[tuple[str, int, Timing]] = []
    try:
        with pool.connection() as conn:
            cursor_args = tuple(arg() for arg in driver.cursor_args)
            cur = conn.cursor(*cursor_args)
            raw = cur.raw
            cur.execute(driver.create)
            conn.commit()
            sql = driver.series.format(n=rows)
            data = [(i,) for i in range(calls)]
            scenarios: list[tuple[str, int, Callable[[Any], None]]] = [
                ("fetchone loop", rows, lambda c: fetchone_loop(c, sql)),
                ("for row in cur", rows, lambda c: iterate(c, sql)),
                ("fetchmany(100) loop", rows, lambda c: fetchmany_loop(c, sql)),
                ("fetchall()", rows, lambda c: fetchall(c, sql)),
                ("execute + fetchone", calls, lambda c: tiny_statements(c, calls)),
                ("executemany", calls, lambda c: c.executemany(driver.insert, data)),
            ]
            for label, count, run in scenarios:
                raw_s, lease_s = measure(run, raw, cur, rounds, conn.rollback)
                results.append((label, count, (raw_s, lease_s)))
            cur.close()
    finally:
        pool.close()
    return results


def report(name: str, results: list[tuple[str, int, Timing]]) -> None:
    print(f"\n{name}")
    print(f"  {'scenario':<22}{'raw ms':>10}{'lease ms':>10}{'lease/raw':>11}{'+ns each':>10}")
    for label, count, (raw_s, lease_s) in results:
        extra_ns = (lease_s - raw_s) / count * 1e9
        print(
            f"  {label:<22}{raw_s * 1e3:>10.2f}{lease_s * 1e3:>10.2f}"
            f"{lease_s / raw_s:>10.2f}x{extra_ns:>10.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and 3 rounds")
    parser.add_argument("--rounds", type=int, help="runs of each (default 9, --quick: 3)")
    parser.add_argument("--drivers", help="comma-separated (default: all)")
    args = parser.parse_args()
    # PyMySQL's SSCursor, on each execute() after a fetchone() that left the result's end unread
    warnings.filterwarnings("ignore", "Previous unbuffered result was left incomplete")
    rows, calls = (10_000, 1_000) if args.quick else (100_000, 10_000)
    rounds = args.rounds or (3 if args.quick else 9)
    wanted = set(args.drivers.split(",")) if args.drivers else None
    for driver in drivers():
        if wanted is not None and driver.name not in wanted:
            continue
        try:
            results = bench(driver, rows, calls, rounds)
        except Exception as exc:  # a missing driver or server: the others carry on
            print(f"\n{driver.name}: skipped ({type(exc).__name__}: {exc})")
            continue
        report(driver.name, results)


if __name__ == "__main__":
    main()
