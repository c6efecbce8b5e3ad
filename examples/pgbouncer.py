"""A pool of psycopg connections to PgBouncer in transaction pooling mode.

In that mode PgBouncer lends a server session to a client for one transaction, then to another
client. Three settings follow from it:

* ``prepare_threshold=None``: psycopg must not prepare statements on the server, because the
  prepared statement would stay in a session this client may never see again;
* ``session_reset=None``: nothing the pool sends after a transaction reaches the session the
  transaction ran on, so a ``DISCARD ALL`` would only reset some other client's session.
  Session state is avoided instead: ``SET LOCAL`` / ``set_config(..., true)``, transactions
  that end;
* ``validate_after``: the ping reaches PgBouncer, not the session the next transaction runs on;
  it catches client connections PgBouncer dropped. Each ping takes a server connection for one
  statement, so a few seconds between pings of an idle connection is plenty.

Run it against a PgBouncer (``pool_mode = transaction``)::

    PGBOUNCER_DSN="host=127.0.0.1 port=6432 dbname=test user=postgres" python pgbouncer.py
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

import dbpool

DEFAULT_DSN = "host=127.0.0.1 port=6432 dbname=test user=postgres"


def make_pool(dsn: str | None = None, **options: Any) -> dbpool.Pool[psycopg.Connection[Any]]:
    dsn = dsn or os.environ.get("PGBOUNCER_DSN", DEFAULT_DSN)

    def connect() -> psycopg.Connection[Any]:
        # application_name is one of the parameters PgBouncer keeps per client and sets on
        # whichever server session it lends, so it may be given here.
        return psycopg.connect(
            dsn, prepare_threshold=None, connect_timeout=5, application_name="pgbouncer-example"
        )

    settings: dict[str, Any] = {
        "min_size": 1,
        # Keep it within the server connections PgBouncer gives this database and user
        # (default_pool_size): then callers queue in dbpool, where acquire_timeout and
        # max_waiting apply, rather than inside PgBouncer, where neither does.
        "max_size": 4,
        "acquire_timeout": 10.0,
        "session_reset": None,
        "validate_after": 5.0,
        "name": "pgbouncer",
    }
    settings.update(options)
    return dbpool.Pool(connect, **settings)


def record_order(pool: dbpool.Pool[Any], table: str, order_id: int, tenant: str) -> None:
    """One transaction with a per-transaction setting, as transaction pooling requires."""
    with pool.transaction(timeout=5) as tx:
        # set_config(..., true) is SET LOCAL: it ends with the transaction, so it never reaches
        # the next client of this server session. A plain SET would.
        tx.execute("SELECT set_config('app.tenant', %s, true)", (tenant,))
        tx.execute(
            f"INSERT INTO {table} (id, tenant) VALUES (%s, current_setting('app.tenant'))",
            (order_id,),
        )


def count_orders(pool: dbpool.Pool[Any], table: str, tenant: str) -> int:
    with pool.connection() as conn:
        cur = conn.cursor()
        # The same parametrized statement, again and again on the same connection: with
        # psycopg's default prepare_threshold it would be prepared on the server at the fifth
        # run, and fail on the next transaction that lands on another server session.
        cur.execute(f"SELECT count(*) FROM {table} WHERE tenant = %s", (tenant,))
        (count,) = cur.fetchone()
        return int(count)


def run(pool: dbpool.Pool[Any], table: str, threads: int = 8, orders: int = 20) -> dict[str, int]:
    """Write ``orders`` rows from each of ``threads`` threads; the count per tenant."""
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, tenant text NOT NULL)")
        conn.commit()
    try:

        def work(worker: int) -> None:
            for n in range(orders):
                record_order(pool, table, worker * orders + n, f"tenant-{worker % 2}")
                count_orders(pool, table, f"tenant-{worker % 2}")

        with ThreadPoolExecutor(max_workers=threads) as executor:
            list(executor.map(work, range(threads)))
        return {tenant: count_orders(pool, table, tenant) for tenant in ("tenant-0", "tenant-1")}
    finally:
        with pool.connection() as conn:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {table}")
            conn.commit()


def main() -> int:
    with make_pool() as pool:
        counts = run(pool, f"dbpool_example_orders_{os.getpid()}")
        print(counts, pool.stats())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
