"""dbpool under gevent's monkey-patching, where threads are greenlets sharing one OS thread.

Each test runs a script in a subprocess, with ``DBPOOL_TEST_GEVENT_PYTHON`` (default: this
interpreter), that calls ``gevent.monkey.patch_all()``; the tests skip when that interpreter
cannot import gevent.  The script prints a JSON report as its last line.  A script that hangs
(the hub blocked by an OS-level lock, say) is killed at its timeout and the test fails.

Most scripts patch first, as gevent asks.  Those named ``..._imported_first`` import dbpool
before patching, as a gunicorn ``post_fork`` hook or ``preload_app`` does (gunicorn's gevent
worker patches after both), and make the pool after: that must work too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEVENT_PYTHON_ENV = "DBPOOL_TEST_GEVENT_PYTHON"
SCRIPT_TIMEOUT = 30.0  # seconds; a script normally takes well under one

# What every script starts with: the patch (or dbpool first, then the patch), a quiet hub, and
# report() for the last line.
_PATCH_FIRST = """
from gevent import monkey
monkey.patch_all()
import dbpool
"""
_IMPORTED_FIRST = """
import dbpool
from gevent import monkey
monkey.patch_all()
"""
_COMMON = """
import json, os, sys, threading, gevent
gevent.get_hub().exception_stream = None  # greenlets' errors are reported, not printed
PARAMS = json.loads(os.environ["GEVENT_TEST_PARAMS"])

def report(**values):
    print(json.dumps(values))
"""


@pytest.fixture(scope="module")
def gevent_python() -> str:
    python = os.environ.get(GEVENT_PYTHON_ENV, sys.executable)
    probe = subprocess.run(
        [python, "-c", "import gevent"], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT
    )
    if probe.returncode != 0:
        pytest.skip(f"gevent is not importable by {python} (set {GEVENT_PYTHON_ENV})")
    return python


def run_script(
    python: str, body: str, *, imported_first: bool = False, params: Any = None
) -> dict[str, Any]:
    """Run ``body`` under gevent; the report it printed last."""
    prelude = _IMPORTED_FIRST if imported_first else _PATCH_FIRST
    code = prelude + _COMMON + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GEVENT_TEST_PARAMS": json.dumps(params)}
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, env=env, timeout=SCRIPT_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the script hung for {SCRIPT_TIMEOUT:g} s; its stderr:\n{exc.stderr!r}")
    assert done.returncode == 0, f"the script failed:\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"the script printed no report:\n{done.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


# The connect callable for each server, as script text: PARAMS holds its arguments.
_CONNECT = {
    "mysql": """
import pymysql
SLEEP = "SELECT SLEEP(%s)"
def connect():
    return pymysql.connect(**PARAMS)
""",
    "postgresql": """
import psycopg
SLEEP = "SELECT pg_sleep(%s)"
def connect():
    return psycopg.connect(PARAMS, application_name="dbpool-test-gevent")
""",
}


@pytest.fixture(params=["mysql", "postgresql"])
def server(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """(name, connect arguments) of a real server, through the session's probes."""
    if request.param == "mysql":
        return "mysql", request.getfixturevalue("mysql_params")
    return "postgresql", request.getfixturevalue("postgresql_dsn")


# -- with real servers: checkout, waiting, deadlines, cancellation -----------------------------


def test_many_greenlets_share_a_small_pool(gevent_python: str, server: tuple[str, Any]) -> None:
    name, params = server
    report = run_script(
        gevent_python,
        _CONNECT[name]
        + """
pool = dbpool.Pool(connect, min_size=1, max_size=4, acquire_timeout=20, name="gevent-share")

def work(i):
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("SELECT %s", (i,))
        return cur.fetchall()[0][0]

greenlets = [gevent.spawn(work, i) for i in range(300)]
gevent.joinall(greenlets)
s = pool.stats()
report(
    answers=[g.value for g in greenlets],
    errors=[repr(g.exception) for g in greenlets if g.exception],
    size=s.size, in_use=s.in_use, acquired=s.acquired, returned=s.returned,
)
pool.close()
""",
        params=params,
    )
    assert report["errors"] == []
    assert report["answers"] == list(range(300)), "a greenlet read another one's answer"
    assert report["size"] <= 4 and report["in_use"] == 0
    assert report["acquired"] == report["returned"] == 300


def test_waiting_greenlets_are_served_in_order_and_time_out(
    gevent_python: str, server: tuple[str, Any]
) -> None:
    name, params = server
    report = run_script(
        gevent_python,
        _CONNECT[name]
        + """
pool = dbpool.Pool(connect, min_size=0, max_size=2, name="gevent-order")
held = [pool.connection(), pool.connection()]
served = []

def wait(i):
    with pool.connection(timeout=20):
        served.append(i)
        gevent.sleep(0)

waiters = []
for i in range(50):
    waiters.append(gevent.spawn(wait, i))
    gevent.sleep(0)  # queued in this order
try:
    pool.connection(timeout=0.05)
    timed_out = False
except dbpool.PoolTimeout:
    timed_out = True
waiting = pool.stats().waiting
for lease in held:
    lease.close()
gevent.joinall(waiters)
s = pool.stats()
report(served=served, timed_out=timed_out, waiting=waiting, in_use=s.in_use, size=s.size)
pool.close()
""",
        params=params,
    )
    assert report["timed_out"], "acquire_timeout did not hold for a greenlet"
    assert report["waiting"] == 50
    assert report["served"] == list(range(50)), "waiters were not served first come, first served"
    assert (report["in_use"], report["size"]) == (0, 2)


def test_the_hub_runs_while_a_greenlet_waits_on_the_database(
    gevent_python: str, server: tuple[str, Any]
) -> None:
    # Nothing in a checkout, a query or a transaction's deadline may block the OS thread: the
    # other greenlets run meanwhile.  A ticker records its turns between two events.
    name, params = server
    report = run_script(
        gevent_python,
        _CONNECT[name]
        + """
pool = dbpool.Pool(connect, min_size=1, max_size=1, name="gevent-hub")
events = []

def ticker():
    while True:
        events.append("tick")
        gevent.sleep(0.01)

def query():
    with pool.connection() as conn:
        events.append("query")
        conn.cursor().execute(SLEEP, (0.2,))
    events.append("query done")

def deadline():
    try:
        with pool.transaction(timeout=0.2) as conn:
            events.append("transaction")
            conn.cursor().execute(SLEEP, (5,))
    except dbpool.TransactionTimeout:
        events.append("deadline")

tick = gevent.spawn(ticker)
first = gevent.spawn(query)
second = gevent.spawn(deadline)  # waits for the only connection
gevent.joinall([first, second])
tick.kill()
s = pool.stats()
report(events=events, errors=[repr(g.exception) for g in (first, second) if g.exception],
       in_use=s.in_use)
pool.close()
""",
        params=params,
    )
    assert report["errors"] == []
    events = report["events"]
    assert "deadline" in events, "the transaction's deadline did not cancel its statement"
    for start, end in (("query", "query done"), ("transaction", "deadline")):
        during = events[events.index(start) : events.index(end)]
        assert "tick" in during, f"no other greenlet ran between {start!r} and {end!r}: {events}"
    assert report["in_use"] == 0


def test_greenlets_cut_off_by_timeout_or_kill_lose_no_connection(
    gevent_python: str, server: tuple[str, Any]
) -> None:
    # gevent.Timeout and Greenlet.kill() raise in the greenlet where it waits: in the queue
    # for a connection, or inside the driver's read of a query's answer.  Neither may lose a
    # slot, nor hand the next borrower a connection left half-way through a statement.
    name, params = server
    report = run_script(
        gevent_python,
        _CONNECT[name]
        + """
pool = dbpool.Pool(connect, min_size=0, max_size=3, name="gevent-cut")
inside = []  # one per greenlet that got a connection: each is cut off inside its query

def slow_query():
    with pool.connection() as conn:
        inside.append(1)
        conn.cursor().execute(SLEEP, (5,))

def within(seconds, call):
    with gevent.Timeout(seconds):
        call()

# Three inside a query, three more queued for a connection: all cut off by a Timeout.
timed = [gevent.spawn(within, 0.2, slow_query) for _ in range(6)]
gevent.joinall(timed)
# The same, killed from outside.
killed = [gevent.spawn(slow_query) for _ in range(6)]
gevent.sleep(0.2)
gevent.killall(killed)
after_cut = pool.stats()

def echo(i):
    with pool.connection(timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("SELECT %s", (i,))
        return cur.fetchall()[0][0]

echoes = [gevent.spawn(echo, i) for i in range(30)]
gevent.joinall(echoes)
s = pool.stats()
report(
    timed=sorted({type(g.exception).__name__ for g in timed}),
    killed=sorted({type(g.exception).__name__ if g.exception else type(g.value).__name__
                   for g in killed}),
    in_use_after_cut=after_cut.in_use, waiting_after_cut=after_cut.waiting, inside=len(inside),
    answers=[g.value for g in echoes], errors=[repr(g.exception) for g in echoes if g.exception],
    size=s.size, in_use=s.in_use, discards={k: v for k, v in s.discards.items() if v},
)
pool.close()
""",
        params=params,
    )
    assert report["timed"] == ["Timeout"]
    assert report["killed"] == ["GreenletExit"]
    assert (report["in_use_after_cut"], report["waiting_after_cut"]) == (0, 0)
    assert report["errors"] == []
    assert report["answers"] == list(range(30)), "a connection cut off mid-query was reused"
    assert report["size"] <= 3 and report["in_use"] == 0
    # Cut off inside a query (three timed out, three killed, and any queued one served as a
    # connection came back before its own Timeout struck): came back mid-call, discarded
    assert report["inside"] >= 6
    assert report["discards"] == {"reset_failed": report["inside"]}


def test_close_tells_waiting_greenlets_and_waits_for_leases(
    gevent_python: str, server: tuple[str, Any]
) -> None:
    name, params = server
    report = run_script(
        gevent_python,
        _CONNECT[name]
        + """
pool = dbpool.Pool(connect, min_size=2, max_size=2, name="gevent-close")
held = [pool.connection(), pool.connection()]

def wait():
    try:
        with pool.connection(timeout=20):
            return "served"
    except dbpool.PoolClosed:
        return "PoolClosed"

waiters = [gevent.spawn(wait) for _ in range(20)]
gevent.sleep(0)

def give_back():
    gevent.sleep(0.05)
    for lease in held:
        lease.close()

returner = gevent.spawn(give_back)
pool.close(timeout=10)  # waits for the two leases, given back by another greenlet
gevent.joinall(waiters + [returner])
gevent.sleep(0)
s = pool.stats()
report(outcomes=sorted({g.value for g in waiters}), size=s.size, closed=s.created - s.closed,
       threads=sorted(t.name for t in threading.enumerate() if t.name.startswith("dbpool-reaper")))
""",
        params=params,
    )
    assert report["outcomes"] == ["PoolClosed"]
    assert report["size"] == 0 and report["closed"] == 0
    assert report["threads"] == [], "the maintenance thread outlived close()"


# -- dbpool imported before the patching ------------------------------------------------------


def test_transaction_deadlines_work_when_dbpool_was_imported_first(
    gevent_python: str, mysql_params: dict[str, Any]
) -> None:
    # The watchdog's lock, made as dbpool was imported, is then an OS lock.  Its first watch()
    # held it while starting the watchdog thread, a greenlet that takes it first thing: the
    # first transaction with a timeout froze the process.
    report = run_script(
        gevent_python,
        _CONNECT["mysql"]
        + """
pool = dbpool.Pool(connect, min_size=1, max_size=4, name="gevent-early-deadline")

def short(i):
    with pool.transaction(timeout=10) as conn:
        cur = conn.cursor()
        cur.execute("SELECT %s", (i,))
        return cur.fetchall()[0][0]

def overdue():
    try:
        with pool.transaction(timeout=0.2) as conn:
            conn.cursor().execute(SLEEP, (5,))
    except dbpool.TransactionTimeout:
        return "TransactionTimeout"

greenlets = [gevent.spawn(short, i) for i in range(20)] + [gevent.spawn(overdue)]
gevent.joinall(greenlets)
report(
    values=[g.value for g in greenlets],
    errors=[repr(g.exception) for g in greenlets if g.exception],
    in_use=pool.stats().in_use,
)
pool.close()
""",
        imported_first=True,
        params=mysql_params,
    )
    assert report["errors"] == []
    assert report["values"] == [*range(20), "TransactionTimeout"]
    assert report["in_use"] == 0


_SQLITE_POOL = """
import os, sqlite3, tempfile
_files = tempfile.TemporaryDirectory()  # removed as the script exits
_path = os.path.join(_files.name, "pool.sqlite3")
pool = dbpool.Pool(
    lambda: sqlite3.connect(_path, check_same_thread=False), min_size=0, max_size=2
)
"""


def test_a_greenlet_is_told_of_its_own_leases_when_dbpool_was_imported_first(
    gevent_python: str,
) -> None:
    # Leases recorded their borrower with the get_ident of the import, the OS thread's, and
    # the check compared it with the greenlet's: drain() by a greenlet holding a lease waited
    # forever, for a lease it would never give back, and a nested acquire's PoolTimeout did
    # not say why.
    report = run_script(
        gevent_python,
        _SQLITE_POOL
        + """
def nested():
    with pool.connection(), pool.connection():
        try:
            pool.connection(timeout=0.01)
        except dbpool.PoolTimeout as exc:
            return "this thread itself holds 2" in str(exc)

def drain_holding_a_lease():
    with pool.connection():
        try:
            pool.drain()
        except dbpool.PoolError as exc:
            return "this thread holds 1" in str(exc)

told_nested = gevent.spawn(nested).get()
told_drain = gevent.spawn(drain_holding_a_lease).get()
report(told_nested=told_nested, told_drain=told_drain)
pool.close()
""",
        imported_first=True,
    )
    assert report == {"told_nested": True, "told_drain": True}


def test_one_greenlets_listener_does_not_refuse_another_greenlets_close(
    gevent_python: str,
) -> None:
    # Which hooks and listeners a thread runs was kept in a threading.local made as dbpool was
    # imported: all the greenlets shared it, and close() by one was refused as if called from
    # the checkout listener another one was running.
    report = run_script(
        gevent_python,
        _SQLITE_POOL
        + """
def slow_listener(event):
    gevent.sleep(0.05)  # a listener doing I/O: other greenlets run meanwhile

pool.add_listener("checkout", slow_listener)

def borrow():
    with pool.connection():
        pass

borrower = gevent.spawn(borrow)
gevent.sleep(0.01)  # the borrower is in the listener
try:
    pool.close(timeout=5)
    refused = None
except dbpool.PoolError as exc:
    refused = str(exc)
borrower.join()
report(refused=refused, closed=pool.closed, borrower=repr(borrower.exception))
""",
        imported_first=True,
    )
    assert report["refused"] is None
    assert report["closed"] and report["borrower"] == "None"
