"""A transaction's deadline cancel on psycopg2 lets the rest of the process run.

psycopg2's own ``cancel()`` keeps the GIL while libpq connects to the server and waits for its
answer: every thread stops meanwhile (for as long as a connect to an unreachable server takes).
Shown here with the server behind an in-process proxy, which needs the GIL to relay the cancel
request: holding it, the cancel never arrives, and the process hangs."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dbpool.dialects.psycopg2 import Psycopg2Dialect
from tests.conftest import in_child, wait_until
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(60)


def test_a_psycopg2_cancel_lets_the_other_threads_run(postgresql_dsn: str) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    params = psycopg2.extensions.parse_dsn(postgresql_dsn)
    params.pop("hostaddr", None)
    upstream = int(params.pop("port", 5432))
    marker = "SELECT pg_sleep(20) AS dbpool_cancelled_statement"

    def running(admin: Any) -> bool:
        cursor = admin.cursor()
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE query = %s", (marker,))
        return bool(cursor.fetchone()[0])

    def body() -> list[str]:
        with FaultProxy(upstream=("127.0.0.1", upstream)) as proxy:
            proxied = {**params, "host": "127.0.0.1", "port": proxy.port, "sslmode": "disable"}
            conn = psycopg2.connect(**proxied)
            admin = psycopg2.connect(**{**params, "host": "127.0.0.1", "port": upstream})
            admin.autocommit = True
            outcome: list[str] = []

            def statement() -> None:
                try:
                    conn.cursor().execute(marker)
                    outcome.append("finished")
                except psycopg2.errors.QueryCanceled:
                    outcome.append("cancelled")

            worker = threading.Thread(target=statement)
            worker.start()
            try:
                wait_until(lambda: running(admin), timeout=10)
                Psycopg2Dialect().cancel(conn, lambda: None)
                worker.join(10)
            finally:
                admin.close()
            conn.close()
            return outcome

    # Without the fix the child never comes back: killed at the timeout, the test fails.
    assert in_child(body, timeout=20) == {"result": ["cancelled"]}
