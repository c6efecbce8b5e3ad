"""Row and cursor factories a borrower sets on the driver's connection (psycopg's row_factory,
cursor_factory, server_cursor_factory and prepare_threshold; psycopg2's cursor_factory) are put
back on return, as autocommit is: they decide what the next borrower's cursors return, or
(prepare_threshold=None) whether the connection works behind PgBouncer's transaction mode."""

from __future__ import annotations

from typing import Any

import pytest

import dbpool

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def one_connection_pool() -> Any:
    pools: list[dbpool.Pool[Any]] = []

    def make(connect: Any) -> dbpool.Pool[Any]:
        pool = dbpool.Pool(connect, min_size=0, max_size=1)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(timeout=5)


def first_row(conn: Any) -> Any:
    cursor = conn.cursor()
    try:
        cursor.execute("SELECT 1 AS one")
        return cursor.fetchone()
    finally:
        cursor.close()


@pytest.mark.parametrize("through", ["lease", "raw"])
def test_psycopg_factories_a_borrower_set_are_put_back(
    one_connection_pool: Any, postgresql_dsn: str, through: str
) -> None:
    import psycopg
    from psycopg.rows import dict_row

    class TaggedServerCursor(psycopg.ServerCursor[Any]):
        pass

    pool = one_connection_pool(lambda: psycopg.connect(postgresql_dsn))
    with pool.connection() as conn:
        target = conn if through == "lease" else conn.raw
        target.row_factory = dict_row
        target.cursor_factory = psycopg.ClientCursor
        target.server_cursor_factory = TaggedServerCursor
        target.prepare_threshold = None
        assert first_row(conn) == {"one": 1}
    with pool.connection() as conn:
        assert first_row(conn) == (1,)
        raw = conn.raw
        assert raw.cursor_factory is psycopg.Cursor
        assert raw.server_cursor_factory is psycopg.ServerCursor
        assert raw.prepare_threshold == 5
    assert pool.stats().created == 1  # put back, not replaced


def test_psycopg_factories_given_at_connect_are_kept(
    one_connection_pool: Any, postgresql_dsn: str
) -> None:
    import psycopg
    from psycopg.rows import dict_row

    pool = one_connection_pool(
        lambda: psycopg.connect(postgresql_dsn, row_factory=dict_row, prepare_threshold=None)
    )
    for _ in range(2):
        with pool.connection() as conn:
            assert first_row(conn) == {"one": 1}
            assert conn.raw.prepare_threshold is None


@pytest.mark.parametrize("through", ["lease", "raw"])
def test_psycopg2_cursor_factory_a_borrower_set_is_put_back(
    one_connection_pool: Any, postgresql_dsn: str, through: str
) -> None:
    import psycopg2
    import psycopg2.extras

    pool = one_connection_pool(lambda: psycopg2.connect(postgresql_dsn))
    with pool.connection() as conn:
        target = conn if through == "lease" else conn.raw
        target.cursor_factory = psycopg2.extras.RealDictCursor
        assert first_row(conn) == {"one": 1}
    with pool.connection() as conn:
        assert first_row(conn) == (1,)
    assert pool.stats().created == 1


def test_sqlite3_factories_a_borrower_set_are_put_back(
    one_connection_pool: Any, tmp_path: Any
) -> None:
    import sqlite3

    path = str(tmp_path / "factories.sqlite3")
    pool = one_connection_pool(lambda: sqlite3.connect(path, check_same_thread=False))
    with pool.connection() as conn:
        conn.raw.row_factory = sqlite3.Row
        conn.raw.text_factory = bytes
        row = first_row(conn)
        assert isinstance(row, sqlite3.Row) and row["one"] == 1
    with pool.connection() as conn:
        assert first_row(conn) == (1,)
        cursor = conn.cursor()
        cursor.execute("SELECT 'text'")
        assert cursor.fetchall() == [("text",)]
    assert pool.stats().created == 1


@pytest.mark.parametrize("driver", ["pymysql", "mysqlclient"])
def test_mysql_cursor_class_a_borrower_set_is_put_back(
    one_connection_pool: Any, mysql_params: dict[str, Any], driver: str
) -> None:
    if driver == "pymysql":
        import pymysql
        import pymysql.cursors

        connect, dict_cursor = pymysql.connect, pymysql.cursors.DictCursor
    else:
        import MySQLdb
        import MySQLdb.cursors

        connect, dict_cursor = MySQLdb.connect, MySQLdb.cursors.DictCursor
    params = {k: v for k, v in mysql_params.items() if k != "connect_timeout"}
    pool = one_connection_pool(lambda: connect(**params))
    with pool.connection() as conn:
        conn.raw.cursorclass = dict_cursor
        assert first_row(conn) == {"one": 1}
    with pool.connection() as conn:
        assert first_row(conn) == (1,)
    assert pool.stats().created == 1


def test_psycopg_settings_read_from_fields_are_those_the_properties_give(
    postgresql_dsn: str,
) -> None:
    # The return path reads psycopg's private fields behind its properties, for speed: they
    # must say what the properties say, as a borrower changes each (a psycopg that stored
    # them otherwise would make this fail, where the pool would miss a change).
    import psycopg
    from psycopg.rows import dict_row

    from dbpool.dialects.psycopg import PsycopgDialect, settings_through_properties

    dialect = PsycopgDialect()
    changes: list[tuple[str, Any]] = [
        ("autocommit", True),
        ("isolation_level", psycopg.IsolationLevel.SERIALIZABLE),
        ("read_only", True),
        ("deferrable", False),
        ("row_factory", dict_row),
        ("cursor_factory", psycopg.ClientCursor),
        ("server_cursor_factory", psycopg.ServerCursor),
        ("prepare_threshold", None),
    ]
    with psycopg.connect(postgresql_dsn) as conn:
        seen = [dialect.client_settings(conn)]
        for name, value in changes:
            setattr(conn, name, value)
            conn.add_notice_handler(print)
            settings = dialect.client_settings(conn)
            assert settings == settings_through_properties(conn, settings[-1])  # type: ignore[index]
            assert settings != seen[-1], name
            seen.append(settings)


def test_psycopg_settings_are_read_through_the_properties_where_the_fields_are_missing() -> None:
    from types import SimpleNamespace

    from dbpool.dialects.psycopg import PsycopgDialect

    names = [
        "autocommit",
        "isolation_level",
        "read_only",
        "deferrable",
        "row_factory",
        "cursor_factory",
        "server_cursor_factory",
        "prepare_threshold",
    ]
    conn = SimpleNamespace(**{name: f"<{name}>" for name in names})
    expected = (*(f"<{name}>" for name in names), (), (), 0, (0, None))
    assert PsycopgDialect().client_settings(conn) == expected
