"""What a mysqlclient borrower changes on the driver's connection object, and what the next
borrower gets: the character set (with the encoding mysqlclient sends statements in), the type
converters and encoders, and ``executemany_fallback`` are put back on return, through the lease
or ``conn.raw``, and a return that finds nothing changed sends nothing.

Each pool has max_size=1, so the second lease gets the connection the first one returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import rows, scalar

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pool(mysqlclient_connect: Callable[[], Any]) -> Iterator[dbpool.Pool[Any]]:
    with dbpool.Pool(mysqlclient_connect, min_size=0, max_size=1, acquire_timeout=5) as pool:
        yield pool


def character_set(conn: Any) -> tuple[Any, ...]:
    """The server's character set for the lease's session, and the driver's two."""
    [row] = rows(conn, "SELECT @@character_set_client, @@character_set_connection")
    return (*row, conn.raw.character_set_name(), conn.raw.encoding)


def statements(conn: Any) -> int:
    """How many statements the lease's session has received (this one included)."""
    return int(rows(conn, "SHOW SESSION STATUS LIKE 'Questions'")[0][1])


def assert_text_round_trips(conn: Any) -> None:
    # In cp1252 the emoji cannot be encoded at all; in UTF-8 to a session reading latin1, '€'
    # arrives as three characters.
    assert rows(conn, "SELECT %s, CHAR_LENGTH(%s)", ("€😀", "€😀")) == [("€😀", 2)]


def returns_cost(pool: dbpool.Pool[Any]) -> int:
    """The statements one return and the next checkout send, beyond the lease's own."""
    with pool.connection() as conn:
        before = statements(conn)
    with pool.connection() as conn:
        return statements(conn) - before - 1


@pytest.mark.parametrize("through", ["lease", "raw"])
@pytest.mark.parametrize("how", ["set_character_set", "SET NAMES"])
def test_the_character_set_a_borrower_set_is_put_back(
    pool: dbpool.Pool[Any], through: str, how: str
) -> None:
    clean = returns_cost(pool)
    with pool.connection() as conn:
        before = character_set(conn)
        target = conn if through == "lease" else conn.raw
        if how == "set_character_set":
            target.set_character_set("latin1")
        else:
            rows(target, "SET NAMES latin1")
            if conn.raw.character_set_name() != "latin1":
                pytest.skip("this client library does not follow a SET NAMES statement")
        assert character_set(conn)[:3] == ("latin1", "latin1", "latin1")
    with pool.connection() as conn:
        assert_text_round_trips(conn)
        assert character_set(conn) == before
    # Put back once: the returns after it cost what a clean one does.
    assert returns_cost(pool) == clean
    assert pool.stats().created == 1  # put back, not replaced


def test_an_encoding_set_on_the_driver_connection_is_put_back(pool: dbpool.Pool[Any]) -> None:
    with pool.connection() as conn:
        before = character_set(conn)
        conn.raw.encoding = "cp1252"  # the lease restores what is set through it already
    with pool.connection() as conn:
        assert_text_round_trips(conn)
        assert character_set(conn) == before
    assert pool.stats().created == 1


@pytest.mark.parametrize("how", ["in place", "replaced on raw"])
def test_the_type_converters_a_borrower_changed_are_put_back(
    pool: dbpool.Pool[Any], how: str
) -> None:
    from decimal import Decimal

    from MySQLdb.constants import FIELD_TYPE

    clean = returns_cost(pool)
    with pool.connection() as conn:
        if how == "in place":
            conn.converter[FIELD_TYPE.NEWDECIMAL] = float
        else:
            conn.raw.converter = {**conn.raw.converter, FIELD_TYPE.NEWDECIMAL: float}
        assert scalar(conn, "SELECT 1.5") == 1.5
        assert type(scalar(conn, "SELECT 1.5")) is float
    with pool.connection() as conn:
        value = scalar(conn, "SELECT 1.5")
        assert type(value) is Decimal and value == Decimal("1.5")
    assert returns_cost(pool) == clean  # nothing sent for it
    assert pool.stats().created == 1


@pytest.mark.parametrize("how", ["in place", "replaced on raw"])
def test_the_encoders_a_borrower_changed_are_put_back(pool: dbpool.Pool[Any], how: str) -> None:
    def zero(value: Any, encoders: Any) -> str:
        return "0"

    with pool.connection() as conn:
        if how == "in place":
            conn.encoders[int] = zero
        else:
            conn.raw.encoders = {**conn.raw.encoders, int: zero}
        assert scalar(conn, "SELECT %s", (5,)) == 0
    with pool.connection() as conn:
        assert scalar(conn, "SELECT %s", (5,)) == 5
    assert pool.stats().created == 1


def test_executemany_fallback_set_on_the_driver_connection_is_put_back(
    pool: dbpool.Pool[Any],
) -> None:
    with pool.connection() as conn:
        before = getattr(conn.raw, "executemany_fallback", None)
        if before is None:
            pytest.skip("this mysqlclient has no executemany_fallback (2.3 and later)")
        conn.raw.executemany_fallback = "multi" if before == "loop" else "loop"
    with pool.connection() as conn:
        assert conn.raw.executemany_fallback == before
