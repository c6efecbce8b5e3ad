"""Several unbuffered cursors (MySQL's SSCursor) on one lease, one of them left part-read, as
COMMIT or ROLLBACK comes, against MariaDB: the server sends one statement's results at a time,
so the cursor still reading is ended first, whatever order the cursors were made in, and a
cursor read to its end is neither cut short nor made to read another's results."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import dbpool
from tests.conftest import scalar

pytestmark = [pytest.mark.mysql, pytest.mark.timeout(30)]


@pytest.fixture(params=["pymysql", "mysqlclient"])
def mysql_pool(request: pytest.FixtureRequest) -> Iterator[tuple[dbpool.Pool[Any], Any]]:
    """A pool of one on PyMySQL or mysqlclient, and the driver's SSCursor class."""
    if request.param == "pymysql":
        import pymysql.cursors

        connect, sscursor = request.getfixturevalue("mysql_connect"), pymysql.cursors.SSCursor
    else:
        import MySQLdb.cursors

        connect, sscursor = request.getfixturevalue("mysqlclient_connect"), MySQLdb.cursors.SSCursor
    pool = dbpool.Pool(connect, min_size=0, max_size=1)
    try:
        yield pool, sscursor
    finally:
        pool.close(timeout=1)


@pytest.mark.parametrize("end", ["commit", "rollback"])
@pytest.mark.parametrize("reading_made", ["first", "last"])
def test_a_cursor_read_to_its_end_and_one_part_read(
    mysql_pool: Any, end: str, reading_made: str
) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        made = [conn.cursor(sscursor), conn.cursor(sscursor)]
        reading, read = made if reading_made == "first" else made[::-1]
        read.execute("SELECT seq FROM seq_1_to_3")
        assert list(read.fetchall()) == [(1,), (2,), (3,)]
        reading.execute("SELECT seq FROM seq_1_to_100000")  # the latest statement
        assert reading.fetchone() == (1,)
        getattr(conn, end)()
        with pytest.raises(dbpool.PoolError, match=f"cut short by {end.upper()}"):
            reading.fetchone()
        assert read.fetchone() is None  # read to its end: nothing was cut short
        assert scalar(conn, "SELECT 42") == 42  # the connection is in step
    assert sum(pool.stats().discards.values()) == 0


def test_a_block_ends_with_a_cursor_read_to_its_end_and_one_part_read(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        with conn.transaction():
            read, reading = conn.cursor(sscursor), conn.cursor(sscursor)
            read.execute("SELECT seq FROM seq_1_to_3")
            read.fetchall()
            reading.execute("SELECT seq FROM seq_1_to_100000")
            reading.fetchmany(10)
        with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
            reading.fetchmany(10)
        assert read.fetchone() is None
        assert scalar(conn, "SELECT 42") == 42
    assert sum(pool.stats().discards.values()) == 0


@pytest.mark.parametrize("reading_made", ["first", "last"])
def test_a_lease_returned_with_a_cursor_read_to_its_end_and_one_part_read(
    mysql_pool: Any, reading_made: str
) -> None:
    # No COMMIT or ROLLBACK through the lease: the return closes both cursors itself
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        made = [conn.cursor(sscursor), conn.cursor(sscursor)]
        reading, read = made if reading_made == "first" else made[::-1]
        read.execute("SELECT seq FROM seq_1_to_3")
        read.fetchall()
        reading.execute("SELECT seq FROM seq_1_to_100000")
        reading.fetchone()
        first = conn.raw
    with pool.connection() as conn:
        assert conn.raw is first  # kept, not discarded
        assert scalar(conn, "SELECT 42") == 42
    assert sum(pool.stats().discards.values()) == 0
