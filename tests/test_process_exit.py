"""How a process that uses dbpool ends.

Each program runs in a subprocess of its own (``sys.executable``, a small script, a timeout):
what is checked is what its exit leaves behind, in its exit code, its stderr and on the server.
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

from tests.conftest import rows, wait_until

SCRIPT_TIMEOUT = 20  # seconds: a script still running then is hung
ROOT = Path(__file__).resolve().parent.parent


def python(code: str, *flags: str, **popen: Any) -> subprocess.Popen[str]:
    """Start ``code`` in a new interpreter, with dbpool from this tree; the caller waits for
    it, with a timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` to its end (killed past SCRIPT_TIMEOUT: the test then fails)."""
    process = python(code, *flags)
    try:
        out, err = process.communicate(timeout=SCRIPT_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# == fork: a child that outlives its parent ======================================================

_CONNECT = {  # one line each: they go into an indented script
    "psycopg": "import psycopg; connect = lambda: psycopg.connect(PARAMS)",
    "psycopg2": "import psycopg2; connect = lambda: psycopg2.connect(PARAMS)",
    "pymysql": "import pymysql; connect = lambda: pymysql.connect(**PARAMS)",
    "mysqlclient": "import MySQLdb; connect = lambda: MySQLdb.connect(**PARAMS)",
}
_SESSION_ID = {
    "psycopg": "select pg_backend_pid()",
    "psycopg2": "select pg_backend_pid()",
    "pymysql": "select connection_id()",
    "mysqlclient": "select connection_id()",
}
_POSTGRESQL = ("psycopg", "psycopg2")


@pytest.fixture(params=["psycopg", "psycopg2", "pymysql", "mysqlclient"])
def server(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    """(driver, its connect parameters, a driver connection of the test's own)."""
    driver = request.param
    if driver == "psycopg2":
        request.getfixturevalue("psycopg2_connect")  # skipped without the driver
    elif driver == "mysqlclient":
        request.getfixturevalue("mysqlclient_connect")
    if driver in _POSTGRESQL:
        params = request.getfixturevalue("postgresql_dsn")
        connect = request.getfixturevalue("pg_connect")
    else:
        params = request.getfixturevalue("mysql_params")
        connect = request.getfixturevalue("mysql_connect")
    own = connect()
    if driver in _POSTGRESQL:
        own.autocommit = True  # each look at pg_stat_activity a fresh one
    else:
        own.autocommit(True)
    return driver, params, own


def _session_alive(driver: str, own: Any, session: int) -> bool:
    if driver in _POSTGRESQL:
        sql = "select count(*) from pg_stat_activity where pid = %s"
    else:
        sql = "select count(*) from information_schema.processlist where id = %s"
    return bool(rows(own, sql, (session,))[0][0])


def _ends_with_its_parent(server: tuple[str, Any, Any], start_child: str) -> None:
    """A parent leaves a transaction open on a lease, runs ``start_child`` (a child that lives
    on until the test closes the stdin it shares), and ends with os._exit(), as a crash or a
    kill would: the parent's session must end with it, whatever the child holds."""
    driver, params, own = server
    code = textwrap.dedent(
        f"""
        import json, os, signal, subprocess, sys
        import dbpool
        PARAMS = json.loads({json.dumps(json.dumps(params))})
        {_CONNECT[driver]}
        pool = dbpool.Pool(connect, min_size=0, max_size=1)
        lease = pool.connection()
        cur = lease.cursor()
        cur.execute({_SESSION_ID[driver]!r})  # a transaction left open
        print(cur.fetchone()[0], flush=True)
        """
    ) + textwrap.dedent(start_child).format(timeout=SCRIPT_TIMEOUT)
    _session_ends_with_the_parent(driver, own, code + "os._exit(0)\n")


def _session_ends_with_the_parent(driver: str, own: Any, code: str) -> None:
    """Run ``code``, a parent that prints its session's id, leaves a child running until the
    test closes the stdin they share, and ends with os._exit(): that session must end with
    the parent."""
    parent = python(code, stdin=subprocess.PIPE)
    assert parent.stdin is not None and parent.stdout is not None
    try:
        session = int(parent.stdout.readline())
        assert parent.wait(SCRIPT_TIMEOUT) == 0
        wait_until(
            lambda: not _session_alive(driver, own, session),
            timeout=10,
            message=f"the parent is gone, and its session {session} is still open",
        )
    finally:
        parent.stdin.close()  # the child ends
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stdout.close()
        assert parent.stderr is not None
        parent.stderr.close()


def test_a_forked_child_does_not_hold_its_parents_sessions_open_once_the_parent_is_gone(
    server: tuple[str, Any, Any],
) -> None:
    # The child's copy of the socket kept the server session, and the transaction's locks,
    # until the child ended too.
    _ends_with_its_parent(
        server,
        """
        if os.fork() == 0:
            signal.alarm({timeout})  # ends even if the test never closes our stdin
            os.read(0, 1)  # until the test closes our stdin
            os._exit(0)
        """,
    )


def test_a_child_forked_while_a_connect_is_under_way_does_not_hold_that_session_open(
    server: tuple[str, Any, Any],
) -> None:
    # The fork came as the pool's refill thread ran the configure hook on a new connection,
    # not counted by the pool yet: the child kept that socket, and the parent's session with
    # it, until the child ended too.
    driver, params, own = server
    code = textwrap.dedent(
        f"""
        import json, os, signal, threading
        import dbpool
        PARAMS = json.loads({json.dumps(json.dumps(params))})
        {_CONNECT[driver]}
        inside, forked = threading.Event(), threading.Event()
        def configure(raw):
            cur = raw.cursor()
            cur.execute({_SESSION_ID[driver]!r})
            print(cur.fetchone()[0], flush=True)
            cur.close()
            raw.commit()
            inside.set()
            forked.wait({SCRIPT_TIMEOUT})
        pool = dbpool.Pool(connect, min_size=1, max_size=1, configure=configure)
        assert inside.wait({SCRIPT_TIMEOUT})
        if os.fork() == 0:
            signal.alarm({SCRIPT_TIMEOUT})  # ends even if the test never closes our stdin
            os.read(0, 1)  # until the test closes our stdin
            os._exit(0)
        os._exit(0)
        """
    )
    _session_ends_with_the_parent(driver, own, code)


def test_a_program_started_by_the_parent_does_not_hold_its_sessions_open_once_it_is_gone(
    server: tuple[str, Any, Any],
) -> None:
    # A program started with the parent's descriptors open (subprocess with close_fds=False,
    # os.system(), os.posix_spawn()) inherited mysqlclient's socket, which libmariadb leaves
    # inheritable: it kept the session, and the transaction's locks, until it ended too.
    _ends_with_its_parent(
        server,
        """
        child = "import os, signal; signal.alarm({timeout}); os.read(0, 1)"
        subprocess.Popen([sys.executable, "-c", child], close_fds=False)
        """,
    )


# The start of a script that forks a child which exits as a program ends (sys.exit(), not
# os._exit(): the interpreter's exit clears every global), and waits for it.
FORK_AND_EXIT = textwrap.dedent(
    f"""
    import os, signal, sys
    import dbpool
    def fork_and_exit():
        pid = os.fork()
        if pid == 0:
            signal.alarm({SCRIPT_TIMEOUT})
            sys.exit(0)
        assert os.waitpid(pid, 0)[1] == 0
    """
)


def test_a_child_exiting_normally_leaves_the_parents_sqlite_transaction_alone(
    tmp_path: Path,
) -> None:
    # The child left the block (which does nothing there), and its exit then finalized the
    # inherited connection: sqlite3 closed it, rolling the parent's transaction back in the
    # files both share (it deleted the journal), and the parent's commit() failed with "disk
    # I/O error".
    database = str(tmp_path / "fork.db")
    done = run(
        FORK_AND_EXIT
        + textwrap.dedent(
            f"""
        import sqlite3
        setup = sqlite3.connect({database!r})
        setup.execute("CREATE TABLE t (n integer)")
        setup.commit()
        setup.close()
        pool = dbpool.Pool(
            lambda: sqlite3.connect({database!r}, check_same_thread=False), max_size=1
        )
        with pool.connection() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            fork_and_exit()
            conn.commit()
        print(pool.execute("SELECT n FROM t"), flush=True)
        pool.close()
        """
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[(1,)]\n", (done.stdout, done.stderr)


def test_a_child_exiting_normally_never_finalizes_an_inherited_connection() -> None:
    # A driver with no socket dbpool can reach (pymssql's FreeTDS): finalized in the child as
    # its interpreter exited, it would say goodbye on the parent's session.
    done = run(
        FORK_AND_EXIT
        + textwrap.dedent(
            """
        PARENT = os.getpid()

        class Connection:  # a driver connection whose finalizer talks to the server
            def cursor(self): raise AssertionError("not used")
            def commit(self): pass
            def rollback(self): pass
            def close(self): pass
            def __del__(self):
                if os.getpid() != PARENT:
                    os.write(1, b"finalized in the child\\n")

        pool = dbpool.Pool(Connection, max_size=1, dialect="generic")
        pool.connection().close()  # idle at the fork; the child opens none
        fork_and_exit()
        print("parent done", flush=True)
        pool.close()
        """
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "parent done\n", (done.stdout, done.stderr)


# == a pool left open at exit ====================================================================


def test_a_pool_left_open_at_exit_closes_its_idle_connections_when_warnings_are_errors(
    postgresql_dsn: str,
) -> None:
    # Pool.__del__ warned first: with -W error the warning raised, and the idle connections
    # were left for psycopg's finaliser ("... was deleted while still open").
    done = run(
        f"""
        import psycopg
        import dbpool
        pool = dbpool.Pool(lambda: psycopg.connect({postgresql_dsn!r}), min_size=2)
        pool.wait()
        """,
        "-W",
        "error::ResourceWarning",
    )
    assert done.returncode == 0, done.stderr
    assert "garbage-collected while open" in done.stderr  # dbpool's own warning, asked for
    assert "deleted while still open" not in done.stderr, done.stderr


def test_the_interpreter_exit_waits_for_a_connect_under_way(tmp_path: Path) -> None:
    # dbpool's threads are daemon threads, stopped wherever they are as the process exits; one
    # still inside a C library then can crash the process (OpenSSL, set up by PyMySQL in each
    # connect, frees its state in exit()).  A handler registered before dbpool was imported
    # runs after dbpool's: by then the connect has ended.
    database = str(tmp_path / "exit.db")
    done = run(
        f"""
        import atexit, sqlite3, threading
        atexit.register(lambda: print("after dbpool:", pool.stats().opening, flush=True))
        import dbpool, dbpool._fork
        dbpool._fork._EXIT_WAIT = {SCRIPT_TIMEOUT}  # the waiting on trial, not its bound
        started, go = threading.Event(), threading.Event()
        def connect():
            started.set()
            go.wait({SCRIPT_TIMEOUT})
            return sqlite3.connect({database!r}, check_same_thread=False)
        pool = dbpool.Pool(connect, min_size=1)
        started.wait()
        atexit.register(go.set)  # registered after dbpool's handler: runs before it
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "after dbpool: 0\n", (done.stdout, done.stderr)
