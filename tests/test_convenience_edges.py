"""Edge cases of the convenience API, against SQLite, PostgreSQL and MariaDB: a ``pool.cursor()``
read without being kept in a variable keeps its lease until read; leaving its block after the
pool closed its connection raises LeaseReleased, not the driver's error; ``with_connection()``
refuses what it cannot run before taking a connection."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import assert_accounting, wait_until

pytestmark = pytest.mark.timeout(30)

SQLITE_ROWS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) SELECT i FROM n"
)


def _resource_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def _stream_without_keeping_the_cursor(
    pool: dbpool.Pool[Any], rows: Callable[[], Any], expected: int
) -> None:
    """Iterate ``rows()`` (an iterator straight off ``pool.cursor()``, the cursor itself not
    kept by the caller): while rows are still being read, the cursor is in use and its lease
    must stay out; the pool of one must not hand the connection to anyone else."""
    seen = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _row in rows():
            if seen == 0:
                assert _resource_warnings(caught) == [], (
                    "the cursor being iterated was treated as garbage and its lease given back"
                )
                with pytest.raises(dbpool.PoolTimeout):  # its connection is still being read
                    pool.execute("SELECT 1", timeout=0.2)
            seen += 1
    assert seen == expected
    # Never closed: once the iteration is over, it is garbage, and only then comes back.
    with pool.connection(timeout=2):
        pass
    wait_until(lambda: pool.stats().in_use == 0, timeout=5)
    assert_accounting(pool)


def test_iterating_straight_off_execute_keeps_the_lease_sqlite(sqlite_connect: Any) -> None:
    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        _stream_without_keeping_the_cursor(
            pool, lambda: pool.cursor().execute(SQLITE_ROWS), expected=50
        )


@pytest.mark.postgresql
def test_iterating_a_server_side_cursor_straight_off_execute_keeps_the_lease(
    pg_connect: Any,
) -> None:
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        _stream_without_keeping_the_cursor(
            pool,
            lambda: pool.cursor(name="edge_s").execute("SELECT generate_series(1, 500)"),
            expected=500,
        )


@pytest.mark.postgresql
def test_psycopg_stream_straight_off_pool_cursor_keeps_the_lease(pg_connect: Any) -> None:
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        _stream_without_keeping_the_cursor(
            pool, lambda: pool.cursor().stream("SELECT generate_series(1, 500)"), expected=500
        )


# -- a streaming cursor whose pool closed under it ------------------------------------------------


def _sqlite_case(request: pytest.FixtureRequest) -> tuple[Any, tuple[Any, ...], str]:
    return request.getfixturevalue("sqlite_connect"), (), SQLITE_ROWS


def _mysqlclient_case(request: pytest.FixtureRequest) -> tuple[Any, tuple[Any, ...], str]:
    connect = request.getfixturevalue("mysqlclient_connect")
    import MySQLdb.cursors

    return connect, (MySQLdb.cursors.SSCursor,), "SELECT seq FROM seq_1_to_100000"


@pytest.mark.parametrize("case", [_sqlite_case, _mysqlclient_case], ids=["sqlite", "mysqlclient"])
def test_leaving_a_cursor_block_after_the_pool_closed_under_it_keeps_lease_released(
    request: pytest.FixtureRequest, case: Callable[..., Any]
) -> None:
    connect, args, sql = case(request)
    pool = dbpool.Pool(connect, min_size=0, max_size=1)
    try:
        with pytest.raises(dbpool.LeaseReleased):
            with pool.cursor(*args) as cur:
                cur.execute(sql)
                cur.fetchone()
                pool.close(timeout=0)  # closes the connection under its borrower
                cur.fetchone()  # LeaseReleased: leaving the block must not replace it
        cur.close()  # close() is idempotent: again, nothing to do and nothing raised
        assert pool.stats().in_use == 0
    finally:
        pool.close(timeout=0)


# -- with_connection() ---------------------------------------------------------------------------


def test_with_connection_refuses_a_non_callable_before_taking_a_connection(
    sqlite_connect: Any,
) -> None:
    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TypeError):
            pool.with_connection("SELECT 1")  # type: ignore[arg-type]
        s = pool.stats()
        assert (s.created, s.acquired, s.size) == (0, 0, 0), (
            "a bad argument opened and leased a connection before raising"
        )
        with pool.connection():  # the pool is full: the TypeError must still come first,
            with pytest.raises(TypeError):  # not a PoolTimeout after acquire_timeout
                pool.with_connection(None, timeout=0.2)  # type: ignore[arg-type]


def test_with_connection_refuses_an_async_fn(sqlite_connect: Any) -> None:
    async def fn(conn: Any) -> None:  # would run only after the lease went back
        conn.cursor().execute("SELECT 1")

    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TypeError, match="async function"):
            pool.with_connection(fn)
        assert pool.stats().acquired == 0


def test_with_connection_refuses_a_generator_fn(sqlite_connect: Any) -> None:
    """A generator function's body runs only as its result is iterated, the lease back in the
    pool by then: its statements would fail there, or, never iterated, not run at all."""

    def rows_of(conn: Any) -> Any:
        yield from conn.cursor().execute("SELECT 1").fetchall()

    async def async_rows_of(conn: Any) -> Any:
        yield conn

    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        for fn in (rows_of, async_rows_of, functools.partial(rows_of)):
            with pytest.raises(TypeError, match="generator function"):
                pool.with_connection(fn)
        assert pool.stats().acquired == 0
        # a plain function returning a generator over rows it already read is fine
        read = pool.with_connection(lambda conn: iter(conn.cursor().execute("SELECT 1").fetchall()))
        assert [tuple(row) for row in read] == [(1,)]


def test_with_connection_refuses_a_generator_fn_behind_a_decorator(sqlite_connect: Any) -> None:
    """A generator function behind a decorator (``functools.wraps``), or an object whose
    ``__call__`` is one, looks like a plain function until called: its generator, returned
    unstarted, is refused then, before the lease goes back.  A decorator that reads the
    generator itself returns rows, which are fine."""

    def passes_on(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(conn: Any) -> Any:
            return fn(conn)

        return wrapper

    def collects(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(conn: Any) -> Any:
            return list(fn(conn))

        return wrapper

    def rows_of(conn: Any) -> Any:
        yield from conn.cursor().execute("SELECT 1").fetchall()

    class RowsOf:
        def __call__(self, conn: Any) -> Any:
            yield from conn.cursor().execute("SELECT 1").fetchall()

    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        for fn in (passes_on(rows_of), RowsOf(), functools.partial(passes_on(rows_of))):
            with pytest.raises(TypeError, match="generator function"):
                pool.with_connection(fn)
        assert [tuple(row) for row in pool.with_connection(collects(rows_of))] == [(1,)]
        assert_accounting(pool)
