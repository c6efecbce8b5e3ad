"""A transaction's deadline cancel on psycopg2 lets the rest of the process run, through the libpq
psycopg2 really uses.

psycopg2's own ``cancel()`` keeps the GIL while libpq connects to the server and waits for its
answer: every thread stops meanwhile (for as long as a connect to an unreachable server takes).
Shown with the server behind an in-process proxy, which needs the GIL to relay the cancel
request: holding it, the cancel never arrives, and the process hangs.  Where the process already
has a libpq in its global symbol scope (preloaded, or linked by an application that embeds
Python), the loader binds psycopg2's libpq calls to that one, not to the one a psycopg2-binary
wheel ships: the cancel must read the connection with the same libpq."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
import threading
from typing import Any, Callable

import pytest

from dbpool.dialects.psycopg2 import Psycopg2Dialect
from tests.conftest import in_child, wait_until
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(60)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(
    script: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``script`` run by a new interpreter, with ``args``, this project importable, and ``env``
    added to the environment."""
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=30,
    )


def cancel_a_running_statement(
    connect: Callable[[], Any], connect_admin: Callable[[], Any] | None = None
) -> list[str]:
    """Run a long statement on a connection from ``connect`` in a thread and cancel it with the
    dialect once the server runs it (seen through a second connection, from ``connect_admin``
    or else ``connect``): how the statement ended, or why the cancel failed.  Both connections
    are closed at the end."""
    conn = connect()
    try:
        admin = (connect_admin or connect)()
    except BaseException:
        conn.close()
        raise
    admin.autocommit = True
    try:
        return _cancel_on(conn, admin)
    finally:
        admin.close()
        conn.close()


def _cancel_on(conn: Any, admin: Any) -> list[str]:
    import psycopg2

    marker = "SELECT pg_sleep(20) AS dbpool_cancelled_statement"
    outcome: list[str] = []

    def statement() -> None:
        try:
            conn.cursor().execute(marker)
            outcome.append("finished")
        except psycopg2.errors.QueryCanceled:
            outcome.append("cancelled")

    def running() -> bool:
        cursor = admin.cursor()
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE query = %s", (marker,))
        return bool(cursor.fetchone()[0])

    worker = threading.Thread(target=statement)
    worker.start()
    wait_until(running, timeout=10)
    try:
        Psycopg2Dialect().cancel(conn, lambda: None)
    except Exception as exc:
        outcome.append(f"cancel failed: {exc}")
        admin.cursor().execute("SELECT pg_cancel_backend(%s)", (conn.get_backend_pid(),))
    worker.join(10)
    return outcome


def test_a_psycopg2_cancel_lets_the_other_threads_run(postgresql_dsn: str) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    params = psycopg2.extensions.parse_dsn(postgresql_dsn)
    params.pop("hostaddr", None)
    upstream = int(params.pop("port", 5432))

    def body() -> list[str]:
        with FaultProxy(upstream=("127.0.0.1", upstream)) as proxy:
            proxied = {**params, "host": "127.0.0.1", "port": proxy.port, "sslmode": "disable"}
            return cancel_a_running_statement(
                lambda: psycopg2.connect(**proxied),
                lambda: psycopg2.connect(**{**params, "host": "127.0.0.1", "port": upstream}),
            )

    # Without the fix the child never comes back: killed at the timeout, the test fails.
    assert in_child(body, timeout=20) == {"result": ["cancelled"]}


_PRELOADED_CHILD = """
import sys
import psycopg2
from tests.test_psycopg2_cancel import cancel_a_running_statement

print(cancel_a_running_statement(lambda: psycopg2.connect(sys.argv[1])))
"""


def test_a_psycopg2_cancel_uses_the_libpq_in_the_global_scope(postgresql_dsn: str) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    system_libpq = ctypes.util.find_library("pq")
    if system_libpq is None:
        pytest.skip("no system libpq to preload")
    env = {"LD_PRELOAD": system_libpq}
    probe = "import psycopg2.extensions as e; print(e.libpq_version())"
    own = run_script(probe, env=env)
    if own.stdout.strip() == str(psycopg2.extensions.libpq_version()):
        pytest.skip("psycopg2 uses the system libpq already")
    child = run_script(_PRELOADED_CHILD, postgresql_dsn, env=env)
    assert (child.returncode, child.stdout.strip()) == (0, "['cancelled']"), child.stderr
