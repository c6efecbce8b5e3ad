"""fork() with leases open in the parent: what the child's own references to them may do.

Each child reports through a pipe and always ends with ``os._exit()``; the parent waits for it
with a timeout.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

import pytest

import dbpool
from tests.conftest import Connector, in_child

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()"),
    pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning"),
]

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
