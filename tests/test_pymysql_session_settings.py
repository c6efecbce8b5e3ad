"""What a PyMySQL borrower changes with the driver's own calls, and what the next borrower gets:
the character set (which is also the encoding PyMySQL sends statements in) is restored on every
return, and ``session_reset="discard"`` also brings back the connection's database."""

from __future__ import annotations

from typing import Any

import pytest

import dbpool

pytestmark = pytest.mark.timeout(30)


def session(conn: Any) -> tuple[Any, ...]:
    """The server's view of a lease's session, and the encoding PyMySQL writes in."""
    cursor = conn.cursor()
    try:
        cursor.execute("SELECT DATABASE(), @@character_set_client, @@character_set_connection")
        (row,) = cursor.fetchall()
    finally:
        cursor.close()
    return (*row, conn.raw.encoding)


@pytest.fixture
def pymysql_pool(mysql_params: dict[str, Any]) -> Any:
    import pymysql

    pools: list[dbpool.Pool[Any]] = []

    def make(**options: Any) -> dbpool.Pool[Any]:
        params = {**mysql_params, **options.pop("connect", {})}
        pool = dbpool.Pool(lambda: pymysql.connect(**params), min_size=0, max_size=1, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(timeout=5)


@pytest.mark.parametrize("session_reset", [None, "discard"])
@pytest.mark.parametrize("through", ["lease", "raw"])
def test_the_character_set_a_borrower_set_is_put_back(
    pymysql_pool: Any, session_reset: str | None, through: str
) -> None:
    pool = pymysql_pool(session_reset=session_reset)
    with pool.connection() as conn:
        before = session(conn)
        target = conn if through == "lease" else conn.raw
        target.set_character_set("latin1")
        assert session(conn)[1:] == ("latin1", "latin1", "cp1252")
    with pool.connection() as conn:
        assert session(conn) == before
        # The text reaches the server as written: no mojibake from the old encoding.
        cursor = conn.cursor()
        cursor.execute("SELECT CHAR_LENGTH(%s)", ("€😀",))
        assert cursor.fetchall() == ((2,),)
    assert pool.stats().created == 1  # put back, not replaced


def test_session_reset_brings_back_the_connections_database(pymysql_pool: Any) -> None:
    pool = pymysql_pool(session_reset="discard")
    with pool.connection() as conn:
        database = session(conn)[0]
        conn.select_db("mysql")
        assert session(conn)[0] == "mysql"
    with pool.connection() as conn:
        assert session(conn)[0] == database
    assert pool.stats().created == 1


def test_session_reset_of_a_connection_made_without_a_database(
    pymysql_pool: Any, mysql_params: dict[str, Any]
) -> None:
    """No statement takes a session back to no database: one a borrower gave a database is
    replaced; one nobody did is reset and kept."""
    pool = pymysql_pool(session_reset="discard", connect={"database": None})
    with pool.connection() as conn:
        conn.cursor().execute("SELECT 1")
    with pool.connection() as conn:
        assert session(conn)[0] is None
        conn.select_db(mysql_params["database"])
    assert pool.stats().created == 1
    with pool.connection() as conn:
        assert session(conn)[0] is None
    stats = pool.stats()
    assert stats.created == 2
    assert stats.discards["reset_failed"] == 1


def converted(conn: Any) -> tuple[type, Any]:
    """What a lease's results and parameters are made of: the type of a DECIMAL result, and
    an integer parameter as the server got it."""
    cursor = conn.cursor()
    try:
        cursor.execute("SELECT 1.5, %s", (5,))
        ((decimal, echoed),) = cursor.fetchall()
    finally:
        cursor.close()
    return type(decimal), echoed


@pytest.mark.parametrize("session_reset", [None, "discard"])
@pytest.mark.parametrize("through", ["lease", "raw"])
def test_converters_a_borrower_changed_in_place_are_put_back(
    pymysql_pool: Any, session_reset: str | None, through: str
) -> None:
    from decimal import Decimal

    from pymysql.constants import FIELD_TYPE

    pool = pymysql_pool(session_reset=session_reset)
    with pool.connection() as conn:
        target = conn if through == "lease" else conn.raw
        target.decoders[FIELD_TYPE.NEWDECIMAL] = float
        target.encoders[int] = lambda value, mapping=None: "-1"
        assert converted(conn) == (float, -1)
    with pool.connection() as conn:
        assert converted(conn) == (Decimal, 5)
    assert pool.stats().created == 1  # put back, not replaced


def test_an_encoding_set_on_the_driver_connection_is_put_back(pymysql_pool: Any) -> None:
    pool = pymysql_pool()
    with pool.connection() as conn:
        before = session(conn)
        conn.raw.encoding = "latin1"
    with pool.connection() as conn:
        assert session(conn) == before
        cursor = conn.cursor()
        cursor.execute("SELECT CHAR_LENGTH(%s)", ("€😀",))
        assert cursor.fetchall() == ((2,),)


def test_text_as_bytes_set_on_the_driver_connection_is_put_back(pymysql_pool: Any) -> None:
    """PyMySQL reads conn.use_unicode as it reads each result."""
    pool = pymysql_pool()
    with pool.connection() as conn:
        conn.raw.use_unicode = False
        cursor = conn.cursor()
        cursor.execute("SELECT 'text'")
        assert cursor.fetchall() == ((b"text",),)
    with pool.connection() as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT 'text'")
        assert cursor.fetchall() == (("text",),)
    assert pool.stats().created == 1  # put back, not replaced


def test_the_session_reset_replays_the_connect_time_setup_whatever_a_borrower_set(
    pymysql_pool: Any,
) -> None:
    """sql_mode and init_command, which the reset applies again, changed on the driver's
    connection by a borrower: the next borrower's session is set up as the connection was."""
    pool = pymysql_pool(
        session_reset="discard",
        connect={"sql_mode": "ANSI_QUOTES", "init_command": "SET @setup = 'as connected'"},
    )
    with pool.connection() as conn:
        conn.raw.sql_mode = "NO_BACKSLASH_ESCAPES"
        conn.raw.init_command = "SET @setup = 'as a borrower left it'"
    with pool.connection() as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT @@session.sql_mode, @setup")
        assert cursor.fetchall() == (("ANSI_QUOTES", "as connected"),)
    assert pool.stats().created == 1
