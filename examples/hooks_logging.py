"""Pool hooks (configure, check, reset) and event listeners for logging and tracing.

* ``configure(conn)`` runs once per new connection, before anyone uses it: session settings
  every borrower should find (``application_name``, ``search_path``, a statement timeout).
* ``check(conn)`` runs at every checkout instead of the built-in ping: here it also refuses a
  server that is a read-only standby, as one may be right after a failover.
* ``reset(conn)`` runs when a lease that used the connection comes back, after the pool's own
  rollback: here it undoes session state borrowers may change, and applies configure again.
* Listeners are told of connects, checkouts, checkins, discards and closes: here one logs them
  and one keeps per-pool timings, as a tracer or a metrics exporter would.

Each hook gets the driver's connection (a ``psycopg.Connection`` here), not a lease, and must
leave no transaction open. Run it::

    PG_DSN="host=127.0.0.1 dbname=test user=postgres" python hooks_logging.py
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import psycopg

import dbpool

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
APPLICATION_NAME = "hooks-example"

log = logging.getLogger("example.db")


# -- hooks: each takes the driver's connection -------------------------------------------------


# Session settings every borrower should find. One string, so one round trip (psycopg runs
# several statements in one execute() when there are no parameters).
SESSION_SETTINGS = (
    f"SET application_name = '{APPLICATION_NAME}'; "
    "SET search_path = public; "
    "SET statement_timeout = '30s'"
)


def configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SESSION_SETTINGS)
    # That ran in a transaction (psycopg's autocommit is off): end it. The settings stay with
    # the session.
    conn.commit()


class StandbyError(Exception):
    pass


def check(conn: psycopg.Connection[Any]) -> None:
    # At every checkout, instead of the pool's ping. If it raises, the pool discards the
    # connection and hands out another one (or a new one); the caller never sees the error.
    previous = conn.autocommit
    conn.autocommit = True  # one round trip: no BEGIN, no ROLLBACK, no transaction left open
    try:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    finally:
        conn.autocommit = previous  # the borrower gets the connection as the check leaves it
    if row is None or row[0]:
        raise StandbyError("connected to a read-only standby")


def reset(conn: psycopg.Connection[Any]) -> None:
    # After the pool's own rollback, when a lease that used the connection comes back: undo
    # the session state borrowers may leave (RESET ALL does not undo SET ROLE; RESET ROLE
    # does), then the settings of configure() again. The pool restores autocommit afterwards.
    conn.autocommit = True
    conn.execute(f"RESET ALL; RESET ROLE; SELECT pg_advisory_unlock_all(); {SESSION_SETTINGS}")


# -- listeners: each takes a dbpool.PoolEvent --------------------------------------------------


def log_event(event: dbpool.PoolEvent) -> None:
    """Log every event on the application's logger (DEBUG), slow checkouts as warnings."""
    if event.event is dbpool.Event.CHECKOUT and (event.duration or 0.0) > 0.5:
        log.warning("pool %s: waited %.3f s for a connection", event.pool, event.duration)
    log.debug(
        "pool %s: %s%s%s",
        event.pool,
        event.event.value,
        f" ({event.reason})" if event.reason else "",
        f" {event.duration * 1000:.1f} ms" if event.duration is not None else "",
    )


class Timings:
    """Totals of connect, wait and hold times, as a tracer or a metrics exporter would keep.

    Listeners run in the threads doing the work, several at once: hence the lock. They run
    outside the pool's lock, but still on the borrower's path: keep them short.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.discards: dict[str, int] = {}

    def __call__(self, event: dbpool.PoolEvent) -> None:
        with self._lock:
            name = event.event.value
            self.count[name] = self.count.get(name, 0) + 1
            if event.duration is not None:
                self.seconds[name] = self.seconds.get(name, 0.0) + event.duration
            if event.event is dbpool.Event.DISCARD and event.reason:
                self.discards[event.reason] = self.discards.get(event.reason, 0) + 1


def make_pool(dsn: str | None = None, **options: Any) -> tuple[dbpool.Pool[Any], Timings]:
    dsn = dsn or os.environ.get("PG_DSN", DEFAULT_DSN)
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 4,
        "configure": configure,
        "check": check,
        "reset": reset,
        "name": "hooks",
    }
    settings.update(options)
    pool = dbpool.Pool(lambda: psycopg.connect(dsn, connect_timeout=5), **settings)
    timings = Timings()
    for event in dbpool.Event:
        pool.add_listener(event, log_event)
        pool.add_listener(event, timings)
    return pool, timings


def main() -> int:
    logging.basicConfig(level=logging.DEBUG, format="%(threadName)s %(name)s: %(message)s")
    pool, timings = make_pool()
    with pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SHOW application_name")
            print("application_name:", cur.fetchone()[0])
            cur.execute("SET search_path = pg_catalog")  # a borrower changes the session ...
            conn.commit()  # (a SET rolled back would undo itself)
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SHOW search_path")
            print("search_path after reset:", cur.fetchone()[0])  # ... reset() undid it
    print("events:", timings.count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
