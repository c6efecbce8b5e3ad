"""The psycopg2 deadline cancel goes through the libpq psycopg2 really uses.

Where the process already has a libpq in its global symbol scope (preloaded, or linked by an
application that embeds Python), the loader binds psycopg2's libpq calls to that one, not to the
libpq a psycopg2-binary wheel ships: the cancel must read the connection with the same libpq."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_CHILD = """
import sys, threading
import psycopg2
from dbpool.dialects.psycopg2 import Psycopg2Dialect
from tests.conftest import wait_until

dsn = sys.argv[1]
marker = "SELECT pg_sleep(20) AS dbpool_preloaded_libpq_cancel"
conn, admin = psycopg2.connect(dsn), psycopg2.connect(dsn)
admin.autocommit = True
outcome = []

def statement():
    try:
        conn.cursor().execute(marker)
        outcome.append("finished")
    except psycopg2.errors.QueryCanceled:
        outcome.append("cancelled")

worker = threading.Thread(target=statement)
def running():
    cursor = admin.cursor()
    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE query = %s", (marker,))
    return bool(cursor.fetchone()[0])

worker.start()
wait_until(running, timeout=10)
try:
    Psycopg2Dialect().cancel(conn, lambda: None)
except Exception as exc:
    outcome.append(f"cancel failed: {exc}")
    admin.cursor().execute("SELECT pg_cancel_backend(%s)", (conn.get_backend_pid(),))
worker.join(10)
print(outcome)
"""


def test_a_psycopg2_cancel_uses_the_libpq_in_the_global_scope(postgresql_dsn: str) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    system_libpq = ctypes.util.find_library("pq")
    if system_libpq is None:
        pytest.skip("no system libpq to preload")
    env = {**os.environ, "LD_PRELOAD": system_libpq}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    probe = "import psycopg2.extensions as e; print(e.libpq_version())"
    own = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if own.stdout.strip() == str(psycopg2.extensions.libpq_version()):
        pytest.skip("psycopg2 uses the system libpq already")
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, postgresql_dsn],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert (child.returncode, child.stdout.strip()) == (0, "['cancelled']"), child.stderr
