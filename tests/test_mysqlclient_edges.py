"""mysqlclient (MySQLdb) against the real MariaDB server: what a borrower leaves on a
connection through the driver's own calls, and a connection lost inside a lease.

Each pool has max_size=1, so the second lease gets the connection the first one returned.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import Caller, Connector, rows, scalar, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def admin(mysqlclient_connect: Callable[[], Any]) -> Iterator[Any]:
    conn = mysqlclient_connect()
    conn.autocommit(True)
    yield conn
    conn.close()


def _pool(connect: Callable[[], Any]) -> dbpool.Pool[Any]:
    return dbpool.Pool(connect, min_size=0, max_size=1, acquire_timeout=5)


def _kill(admin: Any, session: int) -> None:
    """End a session from the server's side, and wait until it is gone."""
    rows(admin, f"KILL CONNECTION {int(session)}")
    gone = "SELECT id FROM information_schema.processlist WHERE id = %s"
    wait_until(lambda: not rows(admin, gone, (session,)))


# -- a reply send_query() left unread ------------------------------------------------------------


def _tuples(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    """The rows of one statement, as tuples whatever the connection's cursor class."""
    import MySQLdb.cursors

    cursor = conn.cursor(MySQLdb.cursors.Cursor)
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


@pytest.mark.parametrize("via", ["lease", "raw"])
def test_a_reply_left_unread_by_send_query_never_shifts_the_next_borrowers_results(
    mysqlclient_connect: Callable[[], Any], mysql_params: dict[str, Any], via: str
) -> None:
    """send_query() sends a statement and leaves its reply to read_query_result(); unread, the
    driver still takes the connection for idle, so every later call reads the reply of the call
    before it, with no error: the next borrower's SELECT would return the previous reply.  A
    lease that read its replies keeps its connection (rows as dicts, here: a common setting)."""
    import MySQLdb.cursors

    def connect() -> Any:
        return MySQLdb.connect(**mysql_params, cursorclass=MySQLdb.cursors.DictCursor)

    with _pool(connect) as pool:
        with pool.connection() as conn:
            target = conn if via == "lease" else conn.raw
            target.send_query("SELECT 2")
            target.read_query_result()
            target.store_result()
            [(session,)] = _tuples(conn, "SELECT connection_id()")
        with pool.connection() as conn:
            assert _tuples(conn, "SELECT connection_id()") == [(session,)]
            target = conn if via == "lease" else conn.raw
            target.send_query("DO 1")  # an OK reply, never read
        with pool.connection() as conn:
            got = [_tuples(conn, "SELECT 'first'"), _tuples(conn, "SELECT 'second'")]
        assert got == [[("first",)], [("second",)]]
        assert pool.stats().discards["reset_failed"] == 1


# -- a connection lost inside a lease ------------------------------------------------------------


def test_a_connection_lost_inside_a_lease_is_discarded_as_broken(
    mysqlclient_connect: Callable[[], Any], admin: Any
) -> None:
    """mysqlclient keeps `open` true once the server is gone (PyMySQL's turns false): the
    connection is discarded all the same, for being broken, not for a failed reset."""
    import MySQLdb

    with _pool(mysqlclient_connect) as pool:
        with pool.connection() as conn:
            _kill(admin, scalar(conn, "SELECT connection_id()"))
            with pytest.raises(MySQLdb.OperationalError):
                rows(conn, "SELECT 1")
            assert conn.open  # the driver's own flag
        assert pool.stats().discards == {**pool.stats().discards, "broken": 1, "reset_failed": 0}
        with pool.connection() as conn:  # a new one
            assert scalar(conn, "SELECT 1") == 1


# -- inside a transaction block ------------------------------------------------------------------


def test_change_user_is_refused_inside_a_transaction_block(
    mysqlclient_connect: Callable[[], Any], mysql_params: dict[str, Any], admin: Any
) -> None:
    """change_user() resets the server session: the block's transaction is rolled back, and
    what the block runs next is committed statement by statement, in the server's autocommit,
    even when the block ends in a rollback."""
    table = "myc_edges_change_user"
    rows(admin, f"DROP TABLE IF EXISTS {table}")
    rows(admin, f"CREATE TABLE {table} (x INT) ENGINE=InnoDB")
    try:
        with _pool(mysqlclient_connect) as pool:
            with pytest.raises(dbpool.PoolError, match="change_user"):
                with pool.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} VALUES (1)")
                    params = mysql_params
                    tx.connection.change_user(
                        params["user"], params["password"], params.get("database", "")
                    )
                    tx.execute(f"INSERT INTO {table} VALUES (2)")
            assert rows(admin, f"SELECT x FROM {table}") == []
    finally:
        rows(admin, f"DROP TABLE IF EXISTS {table}")


# -- outside a transaction block -----------------------------------------------------------------


def test_change_user_outside_a_block_does_not_reach_the_next_borrower(
    mysqlclient_connect: Callable[[], Any], mysql_params: dict[str, Any]
) -> None:
    """change_user() starts the server session afresh (as another user, maybe): what configure
    set in it is gone, and the next borrower would run without it, with the other user's
    privileges.  The connection is discarded instead, as for psycopg2's reset()."""

    def configure(raw: Any) -> None:
        rows(raw, "SET @dbpool_configured = 7")

    pool = dbpool.Pool(
        mysqlclient_connect, min_size=0, max_size=1, acquire_timeout=5, configure=configure
    )
    with pool:
        with pool.connection() as conn:
            params = mysql_params
            conn.change_user(params["user"], params["password"], params.get("database", ""))
            assert scalar(conn, "SELECT @dbpool_configured") is None  # the session is new
        with pool.connection() as conn:
            assert scalar(conn, "SELECT @dbpool_configured") == 7
        s = pool.stats()
        assert (s.created, s.discards["reset_failed"]) == (2, 1), s


# -- closed while another thread is inside a call on it ------------------------------------------


def _wait_inside(admin: Any, session: int) -> None:
    """Wait until the server runs the SLEEP() that ``session`` sent."""
    running = (
        "SELECT id FROM information_schema.processlist WHERE id = %s AND info LIKE 'SELECT SLEEP%%'"
    )
    wait_until(lambda: bool(rows(admin, running, (session,))))


@pytest.mark.parametrize("ending", ["given back by another thread", "pool closed"])
def test_a_connection_ended_while_another_thread_is_inside_a_call_is_closed(
    mysqlclient_connect: Callable[[], Any], admin: Any, ending: str
) -> None:
    """mysqlclient refuses close() while another thread is inside a call on the connection
    ("already in use from another thread"): closed under the call, the connection stayed open
    until garbage-collected (given back by another thread: with its server session, idle).  It
    is cut off instead, and closed once the call has ended."""
    pool = _pool(mysqlclient_connect)
    try:
        conn = pool.connection()
        raw = conn.raw
        session = scalar(conn, "SELECT connection_id()")
        cursor = conn.cursor()
        runner = Caller(lambda: cursor.execute("SELECT SLEEP(10)"), name="runner")
        _wait_inside(admin, session)
        if ending == "pool closed":
            pool.close(timeout=0)
        else:
            conn.close()
        assert runner.outcome() is not None  # cut off
        if ending == "pool closed":
            assert raw.open  # left to the borrower, who gives it back
            conn.close()
        assert not raw.open
        s = pool.stats()
        assert (s.size, s.in_use, s.closed) == (0, 0, 1), s
    finally:
        pool.close()


# -- results of further statements still to come at COMMIT ----------------------------------------


@pytest.fixture
def procedure_table(admin: Any) -> Iterator[str]:
    """A table of two rows, and a procedure that updates the first and returns both."""
    rows(admin, "DROP TABLE IF EXISTS mysql_more_results")
    rows(admin, "CREATE TABLE mysql_more_results (id INT PRIMARY KEY, v INT) ENGINE=InnoDB")
    rows(admin, "INSERT INTO mysql_more_results VALUES (1, 0), (2, 0)")
    rows(admin, "DROP PROCEDURE IF EXISTS mysql_more_results_bump")
    rows(
        admin,
        "CREATE PROCEDURE mysql_more_results_bump() BEGIN "
        "UPDATE mysql_more_results SET v = v + 1 WHERE id = 1; "
        "SELECT id, v FROM mysql_more_results ORDER BY id; END",
    )
    yield "mysql_more_results"
    rows(admin, "DROP PROCEDURE IF EXISTS mysql_more_results_bump")
    rows(admin, "DROP TABLE IF EXISTS mysql_more_results")


_STILL_TO_COME: dict[str, Callable[[Any], Any]] = {
    # a CALL's final status follows its result set
    "CALL": lambda cursor: cursor.execute("CALL mysql_more_results_bump()"),
    "callproc": lambda cursor: cursor.callproc("mysql_more_results_bump"),
    # the second statement's reply follows the first's result set
    "statements": lambda cursor: cursor.execute(
        "SELECT id, v + 1 FROM mysql_more_results WHERE id = 1 FOR UPDATE; "
        "UPDATE mysql_more_results SET v = v + 1 WHERE id = 1"
    ),
}


@pytest.fixture(params=["2.3", "2.2"])
def flagged_connect(
    request: pytest.FixtureRequest, mysqlclient_connect: Connector, mysql_params: dict[str, Any]
) -> Iterator[Callable[[], Any]]:
    """mysqlclient's connections as they are ("2.3"), and as before 2.3 ("2.2"), where the
    connection has no more_results() to tell whether further results are to come."""
    if request.param == "2.3":
        yield mysqlclient_connect
        return
    import MySQLdb.connections

    class Before23(MySQLdb.connections.Connection):  # type: ignore[misc]
        @property
        def more_results(self) -> Any:
            raise AttributeError("more_results")

    connector = Connector(lambda: Before23(**mysql_params))
    yield connector
    connector.close_all()


@pytest.mark.parametrize("run", list(_STILL_TO_COME))
def test_a_block_commits_with_results_of_further_statements_still_to_come(
    flagged_connect: Callable[[], Any], admin: Any, procedure_table: str, run: str
) -> None:
    """A buffered cursor reads its rows at execute(), and the replies after them (a CALL's
    final status, a multi-statement string's next statement) wait on the connection, where
    COMMIT failed with "Commands out of sync" (2014) and the rollback after it too, which
    discarded the connection.  They are read before COMMIT; the cursor's rows stay."""
    with _pool(flagged_connect) as pool:
        with pool.connection() as conn:
            with conn.transaction() as tx:
                cursor = tx.cursor()
                _STILL_TO_COME[run](cursor)
            assert tuple(cursor.fetchone()) == (1, 1)
            assert rows(admin, f"SELECT v FROM {procedure_table} WHERE id = 1") == [(1,)]
            assert scalar(conn, "SELECT 'next'") == "next"  # in step
        s = pool.stats()
        assert (s.created, s.discarded) == (1, 0), s


def test_a_failed_further_statement_is_the_error_the_block_ends_with(
    flagged_connect: Callable[[], Any], admin: Any, procedure_table: str
) -> None:
    """A statement of a multi-statement string that failed after the first is reported by the
    driver as its reply is read: before COMMIT, which then never goes out.  The block ends
    with that error, rather than "Commands out of sync", and keeps its connection."""
    import MySQLdb

    with _pool(flagged_connect) as pool:
        with pytest.raises(MySQLdb.IntegrityError) as caught:
            with pool.transaction() as tx:
                tx.execute(
                    f"UPDATE {procedure_table} SET v = 5 WHERE id = 2; "
                    f"INSERT INTO {procedure_table} VALUES (1, 0)"
                )
        assert caught.value.args[0] == 1062  # ER_DUP_ENTRY
        assert rows(admin, f"SELECT v FROM {procedure_table} WHERE id = 2") == [(0,)]
        with pool.connection() as conn:
            assert scalar(conn, "SELECT 'next'") == "next"
        s = pool.stats()
        assert (s.created, s.discarded) == (1, 0), s
