"""A transaction's deadline reaches what the block does besides statements: fetches from its
cursors, closing them, and the end of a savepoint.

Past the deadline a fetch raises :exc:`dbpool.TransactionTimeout` before it reads on (from a
server-side cursor, each fetch is one more statement on the server, too short for a cancel to
catch); a cursor's close, which may wait for the server, is cancelled or cut off as a fetch is;
and leaving a savepoint sends nothing, since the block's end rolls the whole transaction back.
The deadlines are short and the tests wait for them to pass with ``wait_until``; nothing relies
on a sleep to order threads.
"""

from __future__ import annotations

import threading
from time import monotonic
from typing import Any

import pytest

import dbpool
from dbpool import TransactionTimeout
from tests import fakedb
from tests.conftest import Link, wait_until
from tests.faultproxy import Mode

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 0.2  # the blocks' deadline; every test waits for it to pass
SLACK = 3.0  # the sever grace, the wait for a hung cancel, and a loaded machine's scheduling


class Boom(Exception):
    pass


def _past(tx: dbpool.Transaction[Any]) -> None:
    deadline = tx.deadline
    assert deadline is not None
    wait_until(lambda: monotonic() >= deadline, timeout=TIMEOUT + SLACK)


# == fetches ======================================================================================


@pytest.mark.parametrize("fetch", ["fetchone", "fetchmany", "fetchall", "iteration"])
def test_a_fetch_past_the_deadline_raises_instead_of_reading_on(
    fake_server: fakedb.Server, fetch: str
) -> None:
    fake_server.set_result("select n from t", [(1,), (2,), (3,)], ["n"])
    got: list[Any] = []
    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=TIMEOUT) as tx:
                cur = tx.execute("select n from t")
                _past(tx)
                if fetch == "iteration":  # the generic dialect's cursors may fetch as they go
                    got.extend(cur)
                else:
                    got.append(getattr(cur, fetch)())
        assert got == [], f"{fetch}() past the deadline returned {got}"
        assert pool.stats().in_use == 0


@pytest.mark.parametrize("fetch", ["iteration", "scroll"])
def test_a_server_side_cursor_past_the_deadline_sends_no_fetch(pg_connect: Any, fetch: str) -> None:
    # Each FETCH is quick: the watchdog's cancel, sent every 50 ms, reached the server between
    # two of them and was dropped, so a loop over the cursor went on reading rows until the
    # connection was cut off a second past the deadline (and the pool discarded it).  Whatever
    # the server does meanwhile (its idle_in_transaction_session_timeout ends the session at
    # about the deadline), the fetch raises the timeout before it sends anything.
    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        got: list[Any] = []
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=TIMEOUT) as tx:
                cur = tx.connection.cursor("dbpool_deadline_reach")
                cur.itersize = 1
                cur.execute("select generate_series(1, 1000000)")
                rows = iter(cur)
                _past(tx)
                try:
                    got.append(cur.scroll(1) if fetch == "scroll" else next(rows))
                except Exception as exc:
                    got.append(exc)
        assert len(got) == 1 and isinstance(got[0], TransactionTimeout), got
        assert pool.stats().in_use == 0


# == closing a cursor ===========================================================================


class _SlowCloseConnection:
    """A fakedb connection whose cursors' close() waits for the server, as a server-side
    cursor's does (psycopg's named cursor sends CLOSE, PyMySQL's SSCursor reads the rest of its
    rows), until the connection is closed under it: the generic dialect's cancel."""

    def __init__(self, raw: fakedb.FakeConnection) -> None:
        self._raw = raw
        self.cut = threading.Event()

    def cursor(self) -> _SlowCloseCursor:
        return _SlowCloseCursor(self, self._raw.cursor())

    def close(self) -> None:
        self.cut.set()
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _SlowCloseCursor:
    def __init__(self, conn: _SlowCloseConnection, raw: fakedb.FakeCursor) -> None:
        self._conn = conn
        self._raw = raw

    def close(self) -> None:
        if self._conn.cut.wait(TIMEOUT + SLACK):  # bounded: a broken test fails, never hangs
            raise fakedb.OperationalError("fakedb: server closed the connection unexpectedly")
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def test_a_cursor_close_that_waits_for_the_server_is_stopped_at_the_deadline(
    fake_server: fakedb.Server,
) -> None:
    closed: list[BaseException | None] = []
    with dbpool.Pool(lambda: _SlowCloseConnection(fake_server.connect()), max_size=1) as pool:
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=TIMEOUT) as tx:
                cur = tx.execute("select 1")
                try:
                    cur.close()
                    closed.append(None)
                except fakedb.OperationalError as exc:
                    closed.append(exc)
        assert closed and closed[0] is not None, (
            "the cursor's close ran its whole wait: the deadline's cancel never reached it"
        )
        s = pool.stats()
        assert (s.in_use, s.discarded) == (0, 1), s


def test_a_server_side_cursor_close_on_a_stalled_network_ends_by_the_deadline(
    link: Link,
) -> None:
    # psycopg's named cursor sends CLOSE, PyMySQL's SSCursor reads the rest of its rows: on a
    # network that stopped answering, either waited forever, past the block's timeout.
    with dbpool.Pool(link.connect, min_size=0, max_size=1) as pool:
        started = monotonic()
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=TIMEOUT) as tx:
                if link.name == "postgresql":
                    cur = tx.connection.cursor("dbpool_deadline_reach")
                    cur.execute("select generate_series(1, 1000000)")
                else:
                    import pymysql.cursors

                    cur = tx.connection.cursor(pymysql.cursors.SSCursor)
                    cur.execute("select seq from seq_1_to_1000000")
                cur.fetchone()
                link.proxy.set_mode(Mode.BLACKHOLE)
                cur.close()
        elapsed = monotonic() - started
        assert elapsed < TIMEOUT + SLACK, f"a {TIMEOUT} s transaction ran {elapsed:.1f} s"
        s = pool.stats()
        assert (s.in_use, s.discarded) == (0, 1), f"the cut-off connection was kept: {s}"


# == before BEGIN ================================================================================


@pytest.mark.timeout(20)  # it hung for ever before BEGIN: fail sooner than the module's limit
def test_the_look_at_a_handed_out_connection_before_begin_ends_by_the_deadline(
    link: Link,
) -> None:
    # The lease handed out the driver's connection: what ran on it is unknown, so the block
    # reads its state again before BEGIN, a round trip with PyMySQL (a ping, for its flags).
    # That ping ran before the deadline was set, and on a network that stopped answering it
    # waited as long as the driver does (this link sets no read_timeout: for ever).
    with dbpool.Pool(link.connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            conn.raw  # noqa: B018 (handed out, unused)
            link.proxy.set_mode(Mode.BLACKHOLE)
            with pytest.raises(TransactionTimeout):
                with conn.transaction(timeout=TIMEOUT) as tx:
                    tx.execute("select 1")
            with pytest.raises(dbpool.ConnectionUnusable):
                conn.cursor()  # cut off: it refuses further use
        s = pool.stats()
        assert (s.in_use, s.discarded) == (0, 1), f"the cut-off connection was kept: {s}"


# == savepoints =================================================================================


def test_leaving_a_savepoint_past_the_deadline_sends_nothing(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TransactionTimeout):
            with pool.transaction(timeout=TIMEOUT) as tx:
                with tx.savepoint():
                    tx.execute("insert into t values (1)")
                    _past(tx)
        sent = fake_server.statements()
        assert not [s for s in sent if "RELEASE" in s.upper()], sent
        assert fake_server.count("rollback") == 1 and fake_server.count("commit") == 0


def test_a_savepoint_left_by_an_error_past_the_deadline_sends_nothing(
    fake_server: fakedb.Server,
) -> None:
    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TransactionTimeout) as info:
            with pool.transaction(timeout=TIMEOUT) as tx:
                with tx.savepoint():
                    tx.execute("insert into t values (1)")
                    _past(tx)
                    raise Boom
        assert isinstance(info.value.__cause__, Boom), repr(info.value.__cause__)
        sent = fake_server.statements()
        assert not [s for s in sent if "ROLLBACK TO" in s.upper()], sent
        assert fake_server.count("rollback") == 1 and fake_server.count("commit") == 0
