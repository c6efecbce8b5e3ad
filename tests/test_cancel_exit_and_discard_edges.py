"""Edges of the psycopg2 deadline cancel, and of pool.discard() and the return of a lease taken
before reopen() under a signal handler that raises.

psycopg2's ``close()`` frees the connection's libpq state (``PQfinish``) with the GIL let go, so a
cancel started from another thread (the watchdog's, while ``close()`` past its timeout closes the
lease's connection) must not read that state: psycopg2's own ``cancel()`` uses a key copied out of
it as it connected.  Shown with a connection whose state is freed right after its address is read,
in a process where glibc fills freed memory (``MALLOC_PERTURB_``): reading it there crashes.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

import pytest

import dbpool
from dbpool.lease import detach
from tests.conftest import in_child
from tests.test_psycopg2_cancel import cancel_a_running_statement, run_script
from tests.test_signal_windows import _leased, _problems, exact_after_each

pytestmark = pytest.mark.timeout(60)

_CLOSED_AS_THE_CANCEL_STARTS = """
import sys
import psycopg2
import dbpool
from dbpool.dialects.psycopg2 import Psycopg2Dialect

class ClosedAsItIsRead(psycopg2.extensions.connection):
    armed = False

    @property
    def pgconn_ptr(self):
        address = super().pgconn_ptr
        if self.armed:  # another thread's close() landing just after the address was read
            self.close()
        return address

pool = dbpool.Pool(
    lambda: psycopg2.connect(sys.argv[1], connection_factory=ClosedAsItIsRead),
    dialect="psycopg2",
)
with pool.connection() as conn:
    raw = conn.raw
    raw.armed = True
    Psycopg2Dialect().cancel(raw, lambda: None)
    print("sent", raw.closed)
pool.close()
"""


def test_a_psycopg2_cancel_reads_nothing_a_close_frees(postgresql_dsn: str) -> None:
    pytest.importorskip("psycopg2")
    child = run_script(_CLOSED_AS_THE_CANCEL_STARTS, postgresql_dsn, env={"MALLOC_PERTURB_": "85"})
    # Without the fix the child reads freed memory and dies of SIGSEGV (-11).
    assert (child.returncode, child.stdout.strip()) == (0, "sent 0"), child.stderr


def test_a_psycopg2_cancel_where_ctypes_cannot_open_the_process_itself(
    postgresql_dsn: str,
) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    from dbpool.dialects import psycopg2 as dialect_module

    def body() -> list[str]:
        # ctypes as on Windows, where CDLL(None) raises TypeError (there is no global scope);
        # the library paths it is given there open as here.
        windows = types.SimpleNamespace(
            _LOAD_LIBRARY_SEARCH_DEFAULT_DIRS=os.RTLD_NOW,
            _LOAD_LIBRARY_SEARCH_DLL_LOAD_DIR=0,
            _getfullpathname=os.path.abspath,
        )
        sys.modules["nt"], os.name = windows, "nt"  # type: ignore[assignment]
        try:
            dialect_module._libpq_cancel.cache_clear()
            dialect_module._libpq_cancel()
        finally:
            del sys.modules["nt"]
            os.name = "posix"
        return cancel_a_running_statement(lambda: psycopg2.connect(postgresql_dsn))

    # Without the fix, looking for the libpq raises TypeError, and every cancel with it.
    assert in_child(body, timeout=30) == {"result": ["cancelled"]}


def test_discard_under_a_signal_handler_that_raises(make_pool: Any) -> None:
    exact_after_each(
        make_pool,
        _leased,
        lambda pool, conn: pool.discard(conn),
        [dbpool.Pool.discard, detach, dbpool.Pool._discard, dbpool.Pool._grant_room_locked],
    )


def _left_out_by_reopen(pool: dbpool.Pool[Any]) -> Any:
    conn = pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.drain(timeout=0)
    pool.reopen()
    return conn


def _drains_and_reopens(pool: dbpool.Pool[Any], max_size: int) -> str:
    try:
        pool.drain(timeout=1)  # waits for the lease from before reopen() too
    except dbpool.PoolTimeout as exc:
        return f"drain() still waits: {exc}"
    pool.reopen()
    return _problems(pool, max_size)


@pytest.mark.parametrize("ending", ["close", "discard"])
def test_return_of_a_lease_from_before_reopen_under_a_signal_handler_that_raises(
    make_pool: Any, ending: str
) -> None:
    def end(pool: dbpool.Pool[Any], conn: Any) -> None:
        if ending == "close":
            conn.close()
        else:
            pool.discard(conn)

    exact_after_each(
        make_pool,
        _left_out_by_reopen,
        end,
        [dbpool.Pool._give_back, dbpool.Pool._close_if_retired],
        problems=_drains_and_reopens,
    )
