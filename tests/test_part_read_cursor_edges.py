"""A cursor left part-read when its transaction ends, against MariaDB and PostgreSQL: an
unbuffered result (MySQL's SSCursor, psycopg's cursor.stream()) is ended before COMMIT or
ROLLBACK, so that a block, ``conn.commit()`` and ``conn.rollback()`` do what they say on every
driver, and the connection stays in the pool; a server-side cursor is left to the server
(closed by COMMIT, or kept WITH HOLD)."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Caller, assert_accounting, scalar, wait_until

pytestmark = pytest.mark.timeout(30)

# One per process: runs of this file side by side (other checkouts, other Python versions)
# must not drop each other's table.
TABLE = f"sscursor_rows_{os.getpid()}"
MYSQL_SERIES = "SELECT seq FROM seq_1_to_100000"
PG_SERIES = "SELECT generate_series(1, 100000)"


def _discards(pool: dbpool.Pool[Any]) -> int:
    return sum(pool.stats().discards.values())


def _table(pool: dbpool.Pool[Any]) -> None:
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
        cur.execute(f"CREATE TABLE {TABLE} (i int)")
        cur.close()
        conn.commit()


def _count(pool: dbpool.Pool[Any]) -> int:
    with pool.connection() as conn:
        return int(scalar(conn, f"SELECT count(*) FROM {TABLE}"))


@pytest.fixture
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
        _table(pool)
        yield pool, sscursor
        with pool.connection() as conn:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {TABLE}")
    finally:
        pool.close(timeout=1)


@pytest.fixture
def pg_pool(pg_connect: Any) -> Iterator[dbpool.Pool[Any]]:
    pool = dbpool.Pool(pg_connect, min_size=0, max_size=1)
    try:
        _table(pool)
        yield pool
        with pool.connection() as conn:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.commit()
    finally:
        pool.close(timeout=1)


MYSQL_DRIVERS = pytest.mark.parametrize(
    "mysql_pool", ["pymysql", "mysqlclient"], indirect=True, ids=["pymysql", "mysqlclient"]
)


# -- MySQL's SSCursor ----------------------------------------------------------------------------


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_a_block_commits_with_an_sscursor_left_part_read(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyMySQL warns as it reads the rest itself
        with pool.transaction() as conn:
            conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
            cur = conn.cursor(sscursor)
            cur.execute(MYSQL_SERIES)
            assert cur.fetchone() == (1,)
    assert _count(pool) == 1, "the block's work was lost"
    assert _discards(pool) == 0
    assert_accounting(pool)


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_commit_through_a_lease_with_an_sscursor_left_part_read(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
        cur = conn.cursor(sscursor)
        cur.execute(MYSQL_SERIES)
        cur.fetchmany(10)
        conn.commit()
        assert scalar(conn, "SELECT 42") == 42  # the connection is in step
    assert _count(pool) == 1
    assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_rollback_through_a_lease_with_an_sscursor_left_part_read(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
        cur = conn.cursor(sscursor)
        cur.execute(MYSQL_SERIES)
        cur.fetchone()
        conn.rollback()
    assert _count(pool) == 0
    assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_a_failing_block_with_an_sscursor_left_part_read_keeps_its_connection(
    mysql_pool: Any,
) -> None:
    pool, sscursor = mysql_pool
    with pytest.raises(LookupError):
        with pool.transaction() as conn:
            conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
            cur = conn.cursor(sscursor)
            cur.execute(MYSQL_SERIES)
            cur.fetchone()
            raise LookupError
    assert _count(pool) == 0
    assert _discards(pool) == 0, "the rollback failed on the unread result"


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("fails", [False, True], ids=["released", "rolled-back-to"])
def test_a_savepoint_ends_with_an_sscursor_left_part_read(mysql_pool: Any, fails: bool) -> None:
    """RELEASE SAVEPOINT and ROLLBACK TO cannot be sent while rows are still to come
    (mysqlclient: "Commands out of sync"): the savepoint's end reads the rest first, as the
    block's end does, and the transaction goes on and commits."""
    pool, sscursor = mysql_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyMySQL warns as it reads the rest itself
        with pool.transaction() as tx:
            tx.execute(f"INSERT INTO {TABLE} VALUES (1)")
            try:
                with tx.savepoint():
                    tx.execute(f"INSERT INTO {TABLE} VALUES (2)")
                    cur = tx.cursor(sscursor)
                    cur.execute(MYSQL_SERIES)
                    assert cur.fetchone() == (1,)
                    if fails:
                        raise LookupError
            except LookupError:
                pass
            tx.execute(f"INSERT INTO {TABLE} VALUES (3)")
    assert _count(pool) == (2 if fails else 3), "the transaction's work was lost"
    assert _discards(pool) == 0
    assert_accounting(pool)


def _fails_to_close(sscursor: Any) -> Any:
    """``sscursor``'s subclass whose close() reads the rest as the driver does, then raises."""

    class FailsToClose(sscursor):  # type: ignore[misc, valid-type]
        def close(self) -> None:
            super().close()
            raise RuntimeError("close failed")

    return FailsToClose


def _says_cursor_closed() -> bool:
    """Whether mysqlclient's SSCursor, closed under a loop iterating it, raises "cursor closed"
    (2.3 and later; before, it yields nothing more, and the pool watches such loops)."""
    import MySQLdb

    return bool(MySQLdb.version_info >= (2, 3))


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_loop_that_ends_the_transaction_as_it_reads_an_sscursor_is_told(
    mysql_pool: Any, end: str
) -> None:
    """A loop that commits every so many rows on the connection it reads from: the rest of
    the result goes before COMMIT (or ROLLBACK), and the loop hears it, instead of ending as
    if all was read."""
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        cur = conn.cursor(sscursor)
        cur.execute(MYSQL_SERIES)
        read = 0
        if sscursor.__module__.startswith("MySQLdb") and _says_cursor_closed():
            error, match = conn.ProgrammingError, "cursor closed"  # iterated as it is, for speed
        else:
            error, match = dbpool.PoolError, f"cut short by {end.upper()}"
        with pytest.raises(error, match=match):
            for _row in cur:
                read += 1
                if read % 100 == 0:
                    getattr(conn, end)()
        assert read == 100
        assert scalar(conn, "SELECT 42") == 42  # the connection is in step
    assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("read", ["fetchone", "fetchmany", "fetchall", "next"])
def test_each_read_of_an_sscursor_cut_short_by_commit_says_so(mysql_pool: Any, read: str) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        cur = conn.cursor(sscursor)
        cur.execute(MYSQL_SERIES)
        assert cur.fetchone() == (1,)
        conn.commit()
        with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
            next(cur) if read == "next" else getattr(cur, read)()
        # A result read to its end is no concern of it, nor another cursor's
        other = conn.cursor(sscursor)
        other.execute("SELECT seq FROM seq_1_to_3")
        assert list(other.fetchall()) == [(1,), (2,), (3,)]
        assert other.fetchone() is None
        conn.commit()
        assert other.fetchone() is None
    assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_an_sscursor_kept_past_its_block_says_the_block_cut_it_short(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        with conn.transaction():
            cur = conn.cursor(sscursor)
            cur.execute(MYSQL_SERIES)
            cur.fetchmany(10)
        with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
            cur.fetchmany(10)
        with pytest.raises(LookupError):
            with conn.transaction():
                cur = conn.cursor(sscursor)
                cur.execute(MYSQL_SERIES)
                cur.fetchone()
                raise LookupError
        with pytest.raises(dbpool.PoolError, match="cut short by ROLLBACK"):
            cur.fetchone()
    assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_rollback_through_a_lease_goes_out_when_ending_a_read_fails(mysql_pool: Any) -> None:
    """As at the end of a block: ROLLBACK is sent all the same, and undoes the work."""
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
        cur = conn.cursor(_fails_to_close(sscursor))
        cur.execute(MYSQL_SERIES)
        cur.fetchone()
        conn.rollback()
        assert scalar(conn, f"SELECT count(*) FROM {TABLE}") == 0, "ROLLBACK was not sent"
    assert _count(pool) == 0


@pytest.mark.mysql
def test_a_stream_of_an_sscursor_cut_short_by_commit_says_so(
    mysql_connect: Any,
) -> None:
    import pymysql.cursors

    with dbpool.Pool(mysql_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor(pymysql.cursors.SSCursor)
            cur.execute(MYSQL_SERIES)
            rows = cur.fetchall_unbuffered()
            assert next(rows) == (1,)
            conn.commit()
            with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
                next(rows)
            assert scalar(conn, "SELECT 42") == 42
        assert _discards(pool) == 0


TWO_SETS = "sscursor_two_sets"  # a procedure whose CALL returns two result sets
ONE_SET = "sscursor_one_set"  # and one with one (its CALL's own status follows it)


@pytest.fixture
def procedures(mysql_pool: Any) -> Iterator[None]:
    pool, _ = mysql_pool
    with pool.connection() as conn:
        cur = conn.cursor()
        for name, body in [
            (TWO_SETS, "BEGIN SELECT seq FROM seq_1_to_3; SELECT 42; END"),
            (ONE_SET, "SELECT seq FROM seq_1_to_3"),
        ]:
            cur.execute(f"DROP PROCEDURE IF EXISTS {name}")
            cur.execute(f"CREATE PROCEDURE {name}() {body}")
    yield
    with pool.connection() as conn:
        for name in (TWO_SETS, ONE_SET):
            conn.cursor().execute(f"DROP PROCEDURE IF EXISTS {name}")


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("end", ["commit", "rollback", "a block"])
@pytest.mark.parametrize("read", ["nextset", "fetchone"])
def test_an_sscursor_with_result_sets_still_to_come_is_cut_short(
    mysql_pool: Any, procedures: None, end: str, read: str
) -> None:
    """A CALL's first result set read to its end, a second still to come: the end of the
    transaction drops the second, and a read on says so (PyMySQL's nextset() said there was
    none; mysqlclient's COMMIT failed, out of sync)."""
    pool, sscursor = mysql_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PyMySQL warns as it reads the rest itself
        with pool.connection() as conn:
            if end == "a block":
                with conn.transaction():
                    cur = conn.cursor(sscursor)
                    cur.execute(f"CALL {TWO_SETS}()")
                    assert list(cur.fetchall()) == [(1,), (2,), (3,)]
                how = "COMMIT"
            else:
                cur = conn.cursor(sscursor)
                cur.execute(f"CALL {TWO_SETS}()")
                assert list(cur.fetchall()) == [(1,), (2,), (3,)]
                getattr(conn, end)()
                how = end.upper()
            with pytest.raises(dbpool.PoolError, match=f"cut short by {how}"):
                getattr(cur, read)()
            assert scalar(conn, "SELECT 42") == 42  # the connection is in step
    assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_an_sscursor_whose_call_returned_one_result_set_is_not_cut_short(
    mysql_pool: Any, procedures: None, end: str
) -> None:
    """Only the CALL's own status follows its one result set: nothing is dropped, and the
    cursor runs the next statement."""
    pool, sscursor = mysql_pool
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pool.connection() as conn:
            cur = conn.cursor(sscursor)
            cur.execute(f"CALL {ONE_SET}()")
            assert list(cur.fetchall()) == [(1,), (2,), (3,)]
            getattr(conn, end)()
            assert cur.fetchone() is None
            assert not cur.nextset()
            cur.execute("SELECT seq FROM seq_1_to_2")
            assert list(cur.fetchall()) == [(1,), (2,)]
    assert _discards(pool) == 0


@pytest.mark.mysql
@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_an_sscursor_with_statements_of_a_string_still_to_come_is_cut_short(
    mysql_params: dict[str, Any], driver: str
) -> None:
    """A multi-statement string: a result set after the first one read, or not."""
    if driver == "pymysql":
        import pymysql
        from pymysql.constants import CLIENT

        sscursor: Any = pymysql.cursors.SSCursor
        connect: Any = functools.partial(
            pymysql.connect, **mysql_params, client_flag=CLIENT.MULTI_STATEMENTS
        )
    else:
        import MySQLdb
        import MySQLdb.cursors

        sscursor = MySQLdb.cursors.SSCursor
        connect = functools.partial(
            MySQLdb.connect, **mysql_params, client_flag=MySQLdb.constants.CLIENT.MULTI_STATEMENTS
        )
    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor(sscursor)
            cur.execute("SELECT 1; DO 2; SELECT 3")
            assert list(cur.fetchall()) == [(1,)]
            conn.commit()
            with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
                cur.nextset()
            cur = conn.cursor(sscursor)
            cur.execute("SELECT 1; DO 2")
            assert list(cur.fetchall()) == [(1,)]
            conn.commit()
            assert cur.fetchone() is None
            assert scalar(conn, "SELECT 42") == 42
        assert _discards(pool) == 0


def _fails_to_look(sscursor: Any, error: Callable[[], BaseException]) -> Any:
    """``sscursor``'s subclass whose fetchone() raises ``error()`` once armed."""

    class FailsToLook(sscursor):  # type: ignore[misc, valid-type]
        armed = False

        def fetchone(self) -> Any:
            if self.armed:
                raise error()
            return super().fetchone()

    return FailsToLook


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("end", ["commit", "rollback", "a block"])
def test_an_interrupt_in_the_look_at_an_sscursor_dooms_the_connection(
    mysql_pool: Any, end: str
) -> None:
    """The read that tells a result read to its end from one with more to come is a driver
    call like any other: interrupted, it may leave a reply unread."""
    pool, sscursor = mysql_pool
    failing = _fails_to_look(sscursor, KeyboardInterrupt)
    with pool.connection() as conn:
        with pytest.raises(KeyboardInterrupt):
            if end == "a block":
                with conn.transaction():
                    cur = conn.cursor(failing)
                    cur.execute(MYSQL_SERIES)
                    assert cur.fetchone() == (1,)
                    cur.raw.armed = True
            else:
                cur = conn.cursor(failing)
                cur.execute(MYSQL_SERIES)
                assert cur.fetchone() == (1,)
                cur.raw.armed = True
                getattr(conn, end)()
        with pytest.raises(dbpool.ConnectionUnusable):
            conn.cursor()
    assert _discards(pool) == 1
    assert_accounting(pool)


@pytest.mark.mysql
@MYSQL_DRIVERS
def test_a_connection_lost_in_the_look_at_an_sscursor_is_discarded(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        lost = functools.partial(conn.OperationalError, 2013, "Lost connection to server")
        cur = conn.cursor(_fails_to_look(sscursor, lost))
        cur.execute(MYSQL_SERIES)
        assert cur.fetchone() == (1,)
        cur.raw.armed = True
        with pytest.raises(conn.OperationalError, match="Lost connection"):
            conn.commit()
    assert _discards(pool) == 1
    assert_accounting(pool)


# -- several SSCursors, one part-read: the server sends one statement's results at a time, so
# the cursor still reading is ended first, whatever order the cursors were made in, and one
# read to its end is neither cut short nor made to read another's results


def _one_read_one_reading(conn: Any, sscursor: Any, reading_made: str) -> tuple[Any, Any]:
    """Two SSCursors of ``conn``: one read to its end, then one (made ``reading_made``) left
    part-read on the latest statement.  Returns (reading, read)."""
    made = [conn.cursor(sscursor), conn.cursor(sscursor)]
    reading, read = made if reading_made == "first" else made[::-1]
    read.execute("SELECT seq FROM seq_1_to_3")
    assert list(read.fetchall()) == [(1,), (2,), (3,)]
    reading.execute(MYSQL_SERIES)
    assert reading.fetchone() == (1,)
    return reading, read


@MYSQL_DRIVERS
@pytest.mark.parametrize("end", ["commit", "rollback"])
@pytest.mark.parametrize("reading_made", ["first", "last"])
def test_a_cursor_read_to_its_end_and_one_part_read(
    mysql_pool: Any, end: str, reading_made: str
) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        reading, read = _one_read_one_reading(conn, sscursor, reading_made)
        getattr(conn, end)()
        with pytest.raises(dbpool.PoolError, match=f"cut short by {end.upper()}"):
            reading.fetchone()
        assert read.fetchone() is None  # read to its end: nothing was cut short
        assert scalar(conn, "SELECT 42") == 42  # the connection is in step
    assert _discards(pool) == 0


@MYSQL_DRIVERS
def test_a_block_ends_with_a_cursor_read_to_its_end_and_one_part_read(mysql_pool: Any) -> None:
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        with conn.transaction():
            reading, read = _one_read_one_reading(conn, sscursor, "last")
        with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
            reading.fetchmany(10)
        assert read.fetchone() is None
        assert scalar(conn, "SELECT 42") == 42
    assert _discards(pool) == 0


@MYSQL_DRIVERS
@pytest.mark.parametrize("reading_made", ["first", "last"])
def test_a_lease_returned_with_a_cursor_read_to_its_end_and_one_part_read(
    mysql_pool: Any, reading_made: str
) -> None:
    # No COMMIT or ROLLBACK through the lease: the return closes both cursors itself
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        _one_read_one_reading(conn, sscursor, reading_made)
        first = conn.raw
    with pool.connection() as conn:
        assert conn.raw is first  # kept, not discarded
        assert scalar(conn, "SELECT 42") == 42
    assert _discards(pool) == 0


# -- psycopg's cursor.stream() -------------------------------------------------------------------


@pytest.mark.postgresql
def test_a_block_commits_with_a_stream_left_part_read(pg_pool: dbpool.Pool[Any]) -> None:
    with pg_pool.transaction() as conn:
        conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
        stream = conn.cursor().stream(PG_SERIES)
        assert next(stream) == (1,)
    # read to its end before COMMIT: reading on says so, rather than end as if read
    with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
        next(stream)
    assert _count(pg_pool) == 1
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_ending_a_transaction_through_a_lease_with_a_stream_left_part_read(
    pg_pool: dbpool.Pool[Any], end: str
) -> None:
    conn = pg_pool.connection()
    try:
        conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
        stream = conn.cursor().stream(PG_SERIES)
        next(stream)
        # psycopg's connection lock, held by the suspended stream, would make it wait forever
        ending = Caller(getattr(conn, end), name=end)
        assert ending.outcome(timeout=5) is None
        assert scalar(conn, "SELECT 42") == 42
    finally:
        conn.close()
    assert _count(pg_pool) == (1 if end == "commit" else 0)
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("end", ["commit", "rollback", "a block"])
def test_ending_a_transaction_with_a_stream_left_part_read_after_its_cursor_was_closed(
    pg_pool: dbpool.Pool[Any], end: str
) -> None:
    # cur.close() leaves psycopg's stream suspended, holding the connection's lock: the lease
    # no longer keeps the closed cursor, but must still end the stream first.
    streams = []

    def run(conn: dbpool.Connection[Any]) -> None:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {TABLE} VALUES (1)")
        cur = conn.cursor()
        streams.append(cur.stream(PG_SERIES))  # referenced: else collected, and closed
        assert next(streams[0]) == (1,)
        cur.close()
        if end != "a block":
            getattr(conn, end)()

    def block() -> None:
        with conn.transaction():
            run(conn)

    conn = pg_pool.connection()
    try:
        ending = Caller(block if end == "a block" else lambda: run(conn), name=end)
        assert ending.outcome(timeout=5) is None  # not waiting on the lock forever
        with pytest.raises(dbpool.PoolError, match="cut short"):
            list(streams[0])  # read to its end, or closed, and says so
        assert scalar(conn, "SELECT 42") == 42
    finally:
        conn.close()
    assert _count(pg_pool) == (0 if end == "rollback" else 1)
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_loop_that_ends_the_transaction_as_it_reads_a_stream_is_told(
    pg_pool: dbpool.Pool[Any], end: str
) -> None:
    with pg_pool.connection() as conn:
        read = 0
        with pytest.raises(dbpool.PoolError, match=f"cut short by {end.upper()}"):
            for _row in conn.cursor().stream(PG_SERIES):
                read += 1
                if read % 100 == 0:
                    getattr(conn, end)()
        assert read == 100
        assert scalar(conn, "SELECT 42") == 42
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_stream_not_yet_read_runs_after_the_transaction_ends(
    pg_pool: dbpool.Pool[Any], end: str
) -> None:
    """It holds nothing yet: its statement runs as it is first read, as psycopg's would."""
    with pg_pool.connection() as conn:
        stream = conn.cursor().stream(f"INSERT INTO {TABLE} VALUES (7) RETURNING i")
        getattr(conn, end)()
        assert scalar(conn, f"SELECT count(*) FROM {TABLE}") == 0, "it ran before the end"
        assert list(stream) == [(7,)]
        conn.commit()
    assert _count(pg_pool) == 1


def _statement(conn: Any, how: str) -> None:
    if how == "cursor.execute":
        conn.cursor().execute("SELECT 1")
    elif how == "cursor.executemany":
        conn.cursor().executemany("SELECT %s", [(1,), (2,)])
    else:
        conn.execute("SELECT 1")  # psycopg's own shortcut


STATEMENTS = pytest.mark.parametrize(
    "how", ["cursor.execute", "cursor.executemany", "conn.execute"]
)


@pytest.mark.postgresql
@STATEMENTS
def test_a_statement_on_a_lease_with_a_stream_left_part_read_is_refused(
    pg_pool: dbpool.Pool[Any], how: str
) -> None:
    # The suspended stream holds psycopg's connection lock: the statement would wait for it
    # forever in this thread.
    conn = pg_pool.connection()
    try:
        stream = conn.cursor().stream(PG_SERIES)
        assert next(stream) == (1,)
        statement = Caller(lambda: _statement(conn, how), name=how)
        error = statement.outcome(timeout=5)
        assert isinstance(error, conn.OperationalError)
        assert "cursor.stream() left part-read" in str(error)
        assert next(stream) == (2,)  # untouched: read to its end, then run the statement
        assert len(list(stream)) == 99_998
        _statement(conn, how)
        assert scalar(conn, "SELECT 42") == 42
    finally:
        conn.close()
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
@STATEMENTS
def test_a_statement_in_a_block_with_a_stream_left_part_read_is_refused(
    pg_pool: dbpool.Pool[Any], how: str
) -> None:
    def block() -> None:
        with pg_pool.transaction() as conn:
            conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
            stream = conn.cursor().stream(PG_SERIES)  # referenced: else collected, and closed
            next(stream)
            _statement(conn, how)

    error = Caller(block, name=how).outcome(timeout=5)
    assert error is not None and "cursor.stream() left part-read" in str(error)
    assert _count(pg_pool) == 0  # the block rolled back
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
def test_a_failing_block_with_a_stream_left_part_read_keeps_its_connection(
    pg_pool: dbpool.Pool[Any],
) -> None:
    with pytest.raises(LookupError):
        with pg_pool.transaction() as conn:
            conn.cursor().execute(f"INSERT INTO {TABLE} VALUES (1)")
            next(conn.cursor().stream(PG_SERIES))
            raise LookupError
    assert _count(pg_pool) == 0
    assert _discards(pg_pool) == 0


# -- server-side cursors: the transaction's end is the server's business --------------------------


def _named(driver: str, request: pytest.FixtureRequest) -> Callable[..., Any]:
    return request.getfixturevalue("pg_connect" if driver == "psycopg" else "psycopg2_connect")


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("withhold", [False, True], ids=["without-hold", "with-hold"])
def test_a_block_commits_with_a_named_cursor_left_part_read(
    request: pytest.FixtureRequest, driver: str, withhold: bool
) -> None:
    with dbpool.Pool(_named(driver, request), min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            with conn.transaction():
                cur = conn.cursor(name="sscursor_named", withhold=withhold)
                cur.execute(PG_SERIES)
                assert cur.fetchone() == (1,)
            if withhold:  # kept by the server past COMMIT, as WITH HOLD asks
                assert cur.fetchone() == (2,)
                cur.close()
            else:  # closed by COMMIT: the driver says so (the return path closes it)
                with pytest.raises(conn.Error):
                    cur.fetchone()
                conn.rollback()  # psycopg's FETCH began a transaction, which failed
        assert _discards(pool) == 0


# -- what the end of a transaction did not cut short ----------------------------------------------


@pytest.mark.postgresql
@pytest.mark.parametrize("end", ["commit", "rollback", "a block"])
def test_a_stream_cut_short_once_leaves_later_commits_alone(pg_connect: Any, end: str) -> None:
    """A stream the end of one transaction cut short, still referenced: the ends of the
    transactions after it go through, and reading it still says what happened."""
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            if end == "a block":
                with conn.transaction():
                    stream = conn.cursor().stream(PG_SERIES)
                    assert next(stream) == (1,)
            else:
                stream = conn.cursor().stream(PG_SERIES)
                assert next(stream) == (1,)
                getattr(conn, end)()
            assert scalar(conn, "SELECT 42") == 42
            conn.commit()
            with conn.transaction():
                assert scalar(conn, "SELECT 43") == 43
            conn.rollback()
            with pytest.raises(dbpool.PoolError, match="cut short"):
                next(stream)
        assert _discards(pool) == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("end", ["commit", "a block"])
def test_a_stream_whose_rows_were_all_read_is_not_cut_short_by_commit(
    pg_connect: Any, end: str
) -> None:
    """Its last row read, but not yet its end: COMMIT drops no row, and the stream ends as
    it would have; one with a row still to read is cut short, and says so."""
    query = "SELECT generate_series(1, 3)"
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            for rows, outcome in ((3, StopIteration), (2, dbpool.PoolError)):
                if end == "a block":
                    with conn.transaction():
                        stream = conn.cursor().stream(query)
                        read = [next(stream) for _ in range(rows)]
                else:
                    stream = conn.cursor().stream(query)
                    read = [next(stream) for _ in range(rows)]
                    conn.commit()
                assert read == [(1,), (2,), (3,)][:rows]
                with pytest.raises(outcome):
                    next(stream)
            read = []
            for row in conn.cursor().stream(query):
                read.append(row)
                if row == (3,):
                    conn.commit()
            assert read == [(1,), (2,), (3,)]
        assert _discards(pool) == 0


@pytest.mark.mysql
@MYSQL_DRIVERS
@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_an_sscursor_whose_rows_were_all_read_is_not_cut_short(mysql_pool: Any, end: str) -> None:
    """Its last row read, but not yet the server's end of it: the end of the transaction
    drops no row, a read on finds the result's end, and the cursor runs the next statement."""
    pool, sscursor = mysql_pool
    with pool.connection() as conn:
        cur = conn.cursor(sscursor)
        cur.execute("SELECT seq FROM seq_1_to_3")
        assert [cur.fetchone() for _ in range(3)] == [(1,), (2,), (3,)]
        getattr(conn, end)()
        assert cur.fetchone() is None
        cur.execute("SELECT seq FROM seq_1_to_2")
        assert cur.fetchall() in ([(1,), (2,)], ((1,), (2,)))
        read = []
        cur.execute("SELECT seq FROM seq_1_to_3")
        for row in cur:
            read.append(row)
            if row == (3,):
                getattr(conn, end)()
        assert read == [(1,), (2,), (3,)]
    assert _discards(pool) == 0


@pytest.mark.mysql
def test_a_stream_not_yet_read_of_an_sscursor_cut_short_says_so(mysql_connect: Any) -> None:
    """fetchall_unbuffered() taken from a cursor part-read, read only after COMMIT cut the
    cursor's result short: it says so, rather than end as if the result were read."""
    import pymysql.cursors

    with dbpool.Pool(mysql_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor(pymysql.cursors.SSCursor)
            cur.execute(MYSQL_SERIES)
            assert cur.fetchone() == (1,)
            rows = cur.fetchall_unbuffered()
            conn.commit()
            with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):
                next(rows)
            assert scalar(conn, "SELECT 42") == 42
        assert _discards(pool) == 0


@pytest.mark.postgresql
def test_a_stream_first_read_while_another_stream_is_left_part_read_is_refused(
    pg_pool: dbpool.Pool[Any],
) -> None:
    # Its first read sends its statement, for which it would wait forever on the connection
    # lock the first stream holds.
    with pg_pool.connection() as conn:
        first = conn.cursor().stream(PG_SERIES)
        assert next(first) == (1,)
        second = conn.cursor().stream("SELECT 7")
        error = Caller(lambda: next(second), name="second stream").outcome(timeout=5)
        assert isinstance(error, conn.OperationalError)
        assert "cursor.stream() left part-read" in str(error)
        assert next(first) == (2,)  # untouched
        assert len(list(first)) == 99_998
        assert list(conn.cursor().stream("SELECT 7")) == [(7,)]
    assert _discards(pg_pool) == 0


@pytest.mark.postgresql
def test_a_statement_waits_for_another_threads_call_once_the_lease_made_a_stream(
    pg_pool: dbpool.Pool[Any], postgresql_dsn: str
) -> None:
    # A stream read to its end holds nothing: a statement while another thread's call holds
    # the connection waits for that call, as on a lease that made no stream.
    import psycopg

    key = 947_113
    admin = psycopg.connect(postgresql_dsn, autocommit=True, application_name="lock_holder")
    released = False
    try:
        admin.execute("SELECT pg_advisory_lock(%s)", (key,))

        class Releasing(psycopg.Cursor[Any]):
            # Lets the other thread's call end once this statement is past the lease's checks
            def execute(self, *args: Any, **kwargs: Any) -> Any:
                nonlocal released
                admin.execute("SELECT pg_advisory_unlock(%s)", (key,))
                released = True
                return super().execute(*args, **kwargs)

        with pg_pool.connection() as conn:
            assert list(conn.cursor().stream("SELECT 1")) == [(1,)]
            pid = conn.info.backend_pid
            other = conn.cursor()
            waiting = Caller(
                lambda: other.execute(
                    "SELECT pg_advisory_lock(%s), pg_advisory_unlock(%s)", (key, key)
                ),
                name="waiting on the lock",
            )
            wait_until(
                lambda: (
                    scalar(
                        admin, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
                    )
                    == "Lock"
                )
            )
            conn.cursor_factory = Releasing
            cur = conn.cursor()
            cur.execute("SELECT 42")
            assert cur.fetchone() == (42,)
            assert waiting.outcome() is None
            assert released
    finally:
        if not released:
            admin.execute("SELECT pg_advisory_unlock(%s)", (key,))
        admin.close()
    assert _discards(pg_pool) == 0
