"""A transaction block whose connection was closed or lost before its COMMIT: the outcome is
known (nothing was committed, as no COMMIT could go out), so the block raises
TransactionRolledBack rather than CommitOutcomeUnknown, which says to check before doing the work
again."""

from __future__ import annotations

from typing import Any

import pytest

import dbpool
from tests import fakedb
from tests.conftest import assert_accounting

pytestmark = pytest.mark.timeout(30)


def test_a_block_whose_raw_connection_was_closed_was_not_committed(
    make_pool: Any, server: fakedb.Server
) -> None:
    pool = make_pool(max_size=1)
    with pytest.raises(dbpool.TransactionRolledBack, match="before COMMIT"):
        with pool.transaction() as tx:
            tx.execute("UPDATE t SET v = 1")
            tx.connection.raw.close()
    assert server.count("commit") == 0
    s = assert_accounting(pool)
    assert (s.size, s.discarded) == (0, 1)


def test_a_psycopg2_block_whose_raw_connection_was_closed_was_not_committed(
    psycopg2_connect: Any,
) -> None:
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pytest.raises(dbpool.TransactionRolledBack, match="before COMMIT"):
            with pool.transaction() as tx:
                tx.execute("SELECT 1")
                tx.connection.raw.close()
        with pool.connection() as conn:  # a new connection
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            assert cursor.fetchall() == [(1,)]
