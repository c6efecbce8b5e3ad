"""What the documentation promises, checked against the pool where a page states it.

docs/behaviour.rst, "What the lease records": handing out the driver's connection or cursor
(``conn.raw``, a cursor's ``raw``) counts as a statement that may have left a transaction open.
A reference to either outlives a ``conn.commit()``, ``conn.rollback()`` or transaction block on
the lease, so work done through it afterwards must still be rolled back on return on the drivers
that keep no local transaction flag (mysqlclient, pymssql, the generic dialect).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import rows, scalar

pytestmark = pytest.mark.timeout(30)

TABLE = "docs_claims_kept_raw"


@pytest.fixture
def mysqlclient_table(mysqlclient_connect: Callable[[], Any]) -> Iterator[Any]:
    """An InnoDB table; yields an autocommit admin connection (mysqlclient)."""
    admin = mysqlclient_connect()
    admin.autocommit(True)
    # a failed test must never leave the teardown waiting long for a lock
    rows(admin, "SET SESSION lock_wait_timeout = 2, innodb_lock_wait_timeout = 2")
    rows(admin, f"DROP TABLE IF EXISTS {TABLE}")
    rows(admin, f"CREATE TABLE {TABLE} (x INT) ENGINE=InnoDB")
    try:
        yield admin
    finally:
        rows(admin, f"DROP TABLE IF EXISTS {TABLE}")


def _use_after_end(conn: Any, how: str) -> None:
    """Insert a row through a driver object kept from before the lease's commit, rollback or
    transaction block."""
    if how == "raw after commit":
        raw = conn.raw
        conn.commit()
        cur = raw.cursor()
    elif how == "cursor raw after rollback":
        cur = conn.cursor().raw
        conn.rollback()
    else:  # "raw after a transaction block"
        with conn.transaction():
            raw = conn.raw
        cur = raw.cursor()
    cur.execute(f"INSERT INTO {TABLE} VALUES (1)")
    cur.close()


@pytest.mark.parametrize(
    "how", ["raw after commit", "cursor raw after rollback", "raw after a transaction block"]
)
def test_mysqlclient_work_through_a_kept_driver_object_is_rolled_back_on_return(
    mysqlclient_connect: Callable[[], Any], mysqlclient_table: Any, how: str
) -> None:
    """An insert made through a driver object kept from before a commit is not handed to the
    next borrower (who would commit it with their own work)."""
    with dbpool.Pool(mysqlclient_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            _use_after_end(conn, how)
        with pool.connection() as conn:  # the same session: max_size=1
            cur = conn.cursor()
            cur.execute(f"SELECT COUNT(*) FROM {TABLE}")
            assert cur.fetchone()[0] == 0
            conn.commit()
    assert scalar(mysqlclient_table, f"SELECT COUNT(*) FROM {TABLE}") == 0


def test_generic_dialect_rolls_back_work_through_a_kept_driver_connection() -> None:
    """The generic dialect, which cannot read the transaction state, rolls back a connection
    whose driver connection was handed out, even if the lease committed afterwards."""
    server = fakedb.Server()
    with dbpool.Pool(server.connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            conn.commit()
            raw.cursor().execute("INSERT INTO t VALUES (1)")
            assert server.in_transaction(raw)
        assert not server.in_transaction(raw)
