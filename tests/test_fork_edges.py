"""fork() with real drivers: what a child does with the driver objects of a lease it inherited.

A child process shares the parent's sockets.  A lease taken before the fork refuses use in the
child, and releasing it there does nothing; leaving the blocks the forking thread was inside
(``sys.exit()`` in the child unwinds them) must likewise send nothing on the parent's session.

A child's pool starts its maintenance thread at the child's first use of it, never at the
fork (a child about to exec() gets none).

Each child reports through a pipe and always ends with ``os._exit()``; the parent waits for it
with a timeout.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Connector, in_child, rows, scalar

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()"),
    pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning"),
]


# -- 1. A cursor of an inherited lease, closed in the child --------------------------------------


def _psycopg_named(request: pytest.FixtureRequest) -> tuple[Connector, Callable[[Any], Any], str]:
    connect = request.getfixturevalue("pg_connect")
    return connect, lambda lease: lease.cursor("dbpool_fork_cursor"), _SERIES_PG


def _psycopg2_named(request: pytest.FixtureRequest) -> tuple[Connector, Callable[[Any], Any], str]:
    connect = request.getfixturevalue("psycopg2_connect")
    return connect, lambda lease: lease.cursor("dbpool_fork_cursor"), _SERIES_PG


def _pymysql_unbuffered(
    request: pytest.FixtureRequest,
) -> tuple[Connector, Callable[[Any], Any], str]:
    import pymysql
    import pymysql.cursors

    params = request.getfixturevalue("mysql_params")
    # A parent whose rows were read by the child would wait for them: bounded here.
    connect = Connector(lambda: pymysql.connect(**{**params, "read_timeout": 5}))
    request.addfinalizer(connect.close_all)
    return connect, lambda lease: lease.cursor(pymysql.cursors.SSCursor), _SERIES_MYSQL


_SERIES_PG = "SELECT generate_series(1, 200000)"  # more than the socket buffers hold
_SERIES_MYSQL = "SELECT seq FROM seq_1_to_200000"
_ROWS = 200000


@pytest.mark.parametrize(
    "case",
    [_psycopg_named, _psycopg2_named, _pymysql_unbuffered],
    ids=["psycopg-named", "psycopg2-named", "pymysql-sscursor"],
)
def test_closing_an_inherited_cursor_in_the_child_leaves_the_parents_cursor_alone(
    request: pytest.FixtureRequest, case: Callable[..., Any]
) -> None:
    """A server-side cursor of a lease held across the fork, closed in the child (as leaving
    its ``with`` block does): nothing goes to the parent's session, where the cursor is still
    being read (psycopg would send CLOSE, PyMySQL would read the rest of the rows off the
    parent's socket), and the child's close raises nothing."""
    connect, make_cursor, sql = case(request)
    pool = dbpool.Pool(connect, min_size=0, max_size=1, name="fork-cursor")
    try:
        with pool.connection() as lease:
            cur = make_cursor(lease)
            cur.execute(sql)
            assert cur.fetchone()[0] == 1

            def child() -> bool:
                cur.close()
                return True

            report = in_child(child)
            assert report.get("result") is True, report.get("error")
            assert cur.fetchone()[0] == 2, "the parent's cursor lost its place"
            assert len(cur.fetchall()) == _ROWS - 2
            cur.close()
            assert scalar(lease, "SELECT 3") == 3
    finally:
        pool.close(timeout=1)


def test_a_cursor_block_left_in_the_child_by_sys_exit_keeps_the_parents_cursor(
    pg_connect: Connector,
) -> None:
    """The forking thread was inside ``with lease.cursor(name) as cur:``; the child ends with
    ``sys.exit()``, which unwinds that block there: the parent's cursor and session go on."""
    pool = dbpool.Pool(pg_connect, min_size=0, max_size=1, name="fork-exit")
    try:
        with pool.connection() as lease:
            backend = scalar(lease, "SELECT pg_backend_pid()")
            lease.commit()
            with lease.cursor("dbpool_fork_exit") as cur:
                cur.execute("SELECT generate_series(1, 10)")
                assert cur.fetchone() == (1,)

                def child() -> str:
                    try:
                        with cur:
                            sys.exit(0)
                    except SystemExit:
                        return "exited"
                    return "not exited"

                assert in_child(child) == {"result": "exited"}
                assert cur.fetchall() == [(n,) for n in range(2, 11)]
            assert scalar(lease, "SELECT pg_backend_pid()") == backend
    finally:
        pool.close(timeout=1)


def test_an_inherited_cursor_closed_after_its_lease_in_the_child_sends_nothing(
    pg_connect: Connector,
) -> None:
    """In the child, the lease is let go first (which does nothing there), then its cursor:
    the cursor's CLOSE must not reach the parent's session either."""
    pool = dbpool.Pool(pg_connect, min_size=0, max_size=1, name="fork-lease-first")
    try:
        with pool.connection() as lease:
            cur = lease.cursor("dbpool_fork_lease_first")
            cur.execute("SELECT generate_series(1, 10)")
            assert cur.fetchone() == (1,)

            def child() -> bool:
                lease.close()
                cur.close()
                return True

            assert in_child(child) == {"result": True}
            assert cur.fetchall() == [(n,) for n in range(2, 11)]
            cur.close()
    finally:
        pool.close(timeout=1)


# -- 2. A COPY block of an inherited lease, left in the child ------------------------------------


_STATE = "SELECT state FROM pg_stat_activity WHERE pid = %s"


@pytest.fixture
def copy_table(pg_connect: Connector) -> Iterator[str]:
    admin = pg_connect()
    admin.autocommit = True
    admin.execute("DROP TABLE IF EXISTS dbpool_fork_copy")
    admin.execute("CREATE TABLE dbpool_fork_copy (n int)")
    yield "dbpool_fork_copy"
    admin.execute("DROP TABLE IF EXISTS dbpool_fork_copy")


def test_a_copy_block_left_in_the_child_leaves_the_parents_copy_running(
    postgresql_dsn: str, copy_table: str
) -> None:
    """The forking thread was inside ``with cur.copy(...)``; the child leaves the block (as
    ``sys.exit()`` does): it neither finishes nor fails the parent's COPY, nor waits on the
    parent's connection, and exits at once; the parent's COPY goes on and commits."""
    import psycopg

    connect = Connector(lambda: psycopg.connect(postgresql_dsn))
    admin = connect()
    admin.autocommit = True
    pool = dbpool.Pool(connect, min_size=0, max_size=1, name="fork-copy")
    try:
        with pool.connection() as lease:
            backend = lease.info.backend_pid
            block = lease.cursor().copy(f"COPY {copy_table} (n) FROM STDIN")
            with block as copy:
                copy.write_row((1,))

                def child() -> str:
                    try:
                        sys.exit(0)
                    except SystemExit as exc:  # leaving the block, as the unwinding would
                        block.__exit__(SystemExit, exc, exc.__traceback__)
                    return "exited"

                report = in_child(child)
                [(state,)] = rows(admin, _STATE, (backend,))
                if state != "active":  # the COPY ended: the parent would wait forever
                    with socket.socket(fileno=os.dup(lease.fileno())) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                    pytest.fail(f"the child ended the parent's COPY (session {state}): {report}")
                assert report == {"result": "exited"}
                copy.write_row((2,))
            lease.commit()
            assert rows(lease, f"SELECT n FROM {copy_table} ORDER BY n") == [(1,), (2,)]
    finally:
        pool.close(timeout=1)
        connect.close_all()


# -- 3. An unbuffered cursor dropped, and a cut-off lock held, in the child ------------------------


_ROWS = 200000  # more than the socket buffers hold: reading the rest needs the socket


def test_an_inherited_unbuffered_cursor_dropped_in_the_child_reads_nothing(
    mysql_params: dict[str, Any],
) -> None:
    """The child drops the last reference it has to a PyMySQL unbuffered cursor that was open
    in the parent at fork (as unwinding its stack on ``sys.exit()`` does): the driver's
    finalizer, which reads the rest of the rows off the connection, finds nothing to read
    there (the child's copy of the socket is ``/dev/null``: the read failed, and the error was
    printed); the parent goes on reading them."""
    import pymysql
    import pymysql.cursors

    connect = Connector(lambda: pymysql.connect(**{**mysql_params, "read_timeout": 5}))
    pool = dbpool.Pool(connect, min_size=0, max_size=1, name="fork-drop-cursor")
    try:
        box = [pool.cursor(pymysql.cursors.SSCursor)]  # the only reference, dropped in the child
        box[0].execute(f"SELECT seq FROM seq_1_to_{_ROWS}")
        assert box[0].fetchone() == (1,)

        def child() -> list[str]:
            unraisable: list[str] = []
            sys.unraisablehook = lambda hook: unraisable.append(repr(hook.exc_value))
            box.clear()
            gc.collect()
            return unraisable

        assert in_child(child) == {"result": []}
        cur = box[0]
        assert cur.fetchone() == (2,)
        assert len(cur.fetchall()) == _ROWS - 2
        cur.close()
    finally:
        pool.close(timeout=1)
        connect.close_all()


def test_a_block_inherited_while_its_cut_off_lock_was_held_ends_in_the_child(
    make_pool: Any,
) -> None:
    """fork() while the deadline's watchdog held the block's lock (severing its connection, in
    a thread the child does not have): in the child the lock stays held for good, and ending
    the block must not wait for it."""
    pool = make_pool(max_size=1)
    with pool.transaction(timeout=30) as tx:
        tx.execute("UPDATE t SET v = 1")
        tx._sever_lock.acquire()  # as the watchdog's thread holds it while it severs
        try:

            def end_the_block() -> str:
                try:
                    tx.__exit__(None, None, None)
                except dbpool.PoolError as exc:
                    return type(exc).__name__
                return "ended"

            report = in_child(end_the_block, timeout=20)
        finally:
            tx._sever_lock.release()
    assert "error" not in report, report


# -- 4. The child's pools wake up at its first use of them ---------------------------------------


def _pool_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("dbpool-"))


def test_a_child_that_never_uses_the_pool_starts_no_thread_and_opens_nothing(
    make_pool: Any, server: Any
) -> None:
    """The pool's maintenance starts with the child's first use of the pool, not at the fork:
    a child that only runs code of its own (or is about to exec) gets no thread of the pool's,
    and so no refill to ``min_size``."""
    pool = make_pool(min_size=2, max_size=2, name="fork-unused")
    pool.wait(timeout=5)
    connects = server.connect_attempts

    def child() -> list[Any]:
        return [_pool_threads(), server.connect_attempts - connects]

    assert in_child(child) == {"result": [[], 0]}
    assert pool.stats().size == 2


def test_a_program_started_with_preexec_fn_gets_no_pool_thread_before_its_exec(
    make_pool: Any,
) -> None:
    """subprocess runs ``preexec_fn`` in the forked child, after the at-fork handlers: no
    thread of the pool's may be there, connecting as the program is about to start."""
    make_pool(min_size=1, max_size=1, name="fork-exec").wait(timeout=5)

    def no_pool_thread() -> None:
        threads = _pool_threads()
        if threads:
            raise RuntimeError(f"threads in the child: {threads}")

    done = subprocess.run(
        [sys.executable, "-c", "pass"], preexec_fn=no_pool_thread, timeout=20, check=False
    )
    assert done.returncode == 0


@pytest.mark.parametrize(
    "first_use",
    [
        lambda pool: pool.connection().close(),
        lambda pool: pool.execute("SELECT 1"),
        lambda pool: pool.stats(),
        lambda pool: pool.health(timeout=5),
        lambda pool: pool.check(),
        lambda pool: pool.resize(min_size=2),
    ],
    ids=["connection", "execute", "stats", "health", "check", "resize"],
)
def test_the_childs_first_use_of_the_pool_starts_its_maintenance(
    make_pool: Any, first_use: Callable[[Any], Any]
) -> None:
    """Once the child uses the pool, it works as the parent's does: refilled to ``min_size``
    in the background, by a maintenance thread of its own."""
    pool = make_pool(min_size=2, max_size=2, name="fork-used")
    pool.wait(timeout=5)

    def child() -> list[Any]:
        first_use(pool)
        reapers = [name for name in _pool_threads() if name.startswith("dbpool-reaper-")]
        pool.wait(timeout=5)
        with pool.connection() as lease:
            lease.cursor().execute("SELECT 1")
        s = pool.stats()
        pool.close()
        return [reapers, s.size, s.created]

    assert in_child(child) == {"result": [["dbpool-reaper-fork-used"], 2, 2]}


def test_the_childs_maintenance_thread_starts_outside_the_pool_lock(make_pool: Any) -> None:
    """As the watchdog's: the new thread takes the lock first thing, and under gevent a lock
    made at the fork (before the child's monkey-patching) held across start() would block the
    process.  Two first uses at once start one thread."""
    pool = make_pool(min_size=1, max_size=2, name="fork-lock")
    pool.wait(timeout=5)

    def child() -> list[Any]:
        from dbpool import reaper

        start = reaper.start
        lock_free: list[bool] = []

        def probe() -> None:  # another thread's try: fails while this one holds the lock
            if pool._lock.acquire(blocking=False):
                pool._lock.release()
                lock_free.append(True)
            else:
                lock_free.append(False)

        def watched_start(*args: Any) -> Any:
            prober = threading.Thread(target=probe)
            prober.start()
            prober.join()
            return start(*args)

        reaper.start = watched_start  # type: ignore[assignment]
        try:
            users = [threading.Thread(target=pool.stats) for _ in range(4)]
            for user in users:
                user.start()
            for user in users:
                user.join()
        finally:
            reaper.start = start  # type: ignore[assignment]
        reapers = [name for name in _pool_threads() if name.startswith("dbpool-reaper-")]
        pool.close()
        return [lock_free, reapers]

    assert in_child(child) == {"result": [[True], ["dbpool-reaper-fork-lock"]]}
