"""The fake driver behaves as its documentation says (the pool tests rely on it)."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest

from tests import fakedb
from tests.conftest import wait_until


def run_in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``target`` in a thread; the list receives its result or the exception it raised."""
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append(target())
        except BaseException as exc:  # the test inspects whatever was raised
            outcome.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def test_module_is_a_dbapi_driver() -> None:
    assert (fakedb.apilevel, fakedb.threadsafety, fakedb.paramstyle) == ("2.0", 2, "format")
    assert issubclass(fakedb.OperationalError, fakedb.DatabaseError)
    assert issubclass(fakedb.DatabaseError, fakedb.Error)
    assert issubclass(fakedb.InterfaceError, fakedb.Error)
    assert type(fakedb.connect(fakedb.Server())).__module__.split(".")[-1] == "fakedb"


def test_statements_open_a_transaction_and_are_logged(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect()
    assert not conn.in_transaction
    cur = conn.cursor()
    cur.execute("select 1")
    assert cur.fetchall() == [(1,)]
    assert conn.in_transaction and fake_server.in_transaction(conn)
    conn.rollback()
    assert not conn.in_transaction

    cur.execute("update t set v = %s", ("x",))
    assert cur.description is None and cur.fetchone() is None
    conn.commit()
    conn.close()
    conn.close()

    assert [(c.verb, c.sql) for c in fake_server.calls] == [
        ("connect", None),
        ("cursor", None),
        ("ping", "select 1"),
        ("rollback", None),
        ("execute", "update t set v = %s"),
        ("commit", None),
        ("close", None),
        ("close", None),
    ]
    assert fake_server.count("ping") == 1 and fake_server.count("execute") == 1
    assert fake_server.count("close", conn=conn) == 2
    assert fake_server.statements() == ["select 1", "update t set v = %s"]
    assert fake_server.open_connections == [] and fake_server.connects == 1


def test_scripted_results_and_autocommit(fake_server: fakedb.Server) -> None:
    fake_server.set_result("SELECT v FROM t", [("a",), ("b",), ("c",)], columns=["v"])
    conn = fake_server.connect()
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("select v from t")
    assert cur.description[0][0] == "v" and cur.rowcount == 3
    assert cur.fetchone() == ("a",)
    assert list(cur) == [("b",), ("c",)]
    assert not conn.in_transaction


def test_kill_breaks_every_call_but_close(fake_server: fakedb.Server) -> None:
    victim, other = fake_server.connect(), fake_server.connect()
    fake_server.kill(victim)
    for call in (victim.cursor, victim.commit, victim.rollback):
        with pytest.raises(fakedb.OperationalError):
            call()
    assert victim.killed and not victim.closed
    other.cursor().execute("select 1")  # the other session is untouched
    victim.close()
    assert victim.closed and fake_server.open_connections == [other]
    assert fake_server.count("rollback", failed=True) == 1

    fake_server.kill_all()
    with pytest.raises(fakedb.OperationalError):
        other.commit()
    with pytest.raises(fakedb.InterfaceError):
        victim.cursor()  # closed now


def test_kill_accepts_anything_with_raw(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect()

    class Lease:
        raw = conn

    fake_server.kill(Lease())
    assert conn.killed
    with pytest.raises(TypeError):
        fake_server.kill(object())


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit(3), fakedb.OperationalError("boom")])
def test_fail_next_raises_once(fake_server: fakedb.Server, exc: Any) -> None:
    fake_server.fail_next("connect", exc)
    expected = exc if isinstance(exc, type) else type(exc)
    with pytest.raises(expected):
        fake_server.connect()
    conn = fake_server.connect()  # only the next one failed
    assert fake_server.connect_attempts == 2 and fake_server.connects == 1
    assert fake_server.calls[0].conn_id is None and isinstance(fake_server.calls[0].error, expected)

    fake_server.fail_next("rollback", KeyboardInterrupt, times=2, conn=conn)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            conn.rollback()
    conn.rollback()


def test_fail_on_until_cleared(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect()
    fake_server.fail_on("ping", fakedb.OperationalError)
    cur = conn.cursor()
    for _ in range(3):
        with pytest.raises(fakedb.OperationalError, match="injected failure of ping"):
            cur.execute("SELECT 1;")
    cur.execute("select 2")  # not a ping
    fake_server.clear_faults("ping")
    cur.execute("select 1")
    with pytest.raises(ValueError):
        fake_server.fail_on("pnig", fakedb.OperationalError)
    with pytest.raises(TypeError):
        fake_server.fail_on("ping", "not an exception")


def test_down_refuses_connects_until_up(fake_server: fakedb.Server) -> None:
    existing = fake_server.connect()
    fake_server.down()
    with pytest.raises(fakedb.OperationalError, match="refused"):
        fake_server.connect()
    existing.cursor().execute("select 1")  # down() alone does not kill sessions
    fake_server.up()
    fake_server.connect()
    assert fake_server.count("connect", failed=True) == 1


def test_gate_holds_a_thread_inside_connect(fake_server: fakedb.Server) -> None:
    gate = fake_server.block("connect")
    thread, outcome = run_in_thread(fake_server.connect)
    assert gate.entered.wait(5)
    assert gate.inside == 1 and outcome == []
    other = fake_server.connect()  # the gate caught only one call
    assert fake_server.open_connections == [other]
    gate.release()
    thread.join(5)
    assert isinstance(outcome[0], fakedb.FakeConnection) and gate.inside == 0
    assert fake_server.peak_open == 2


def test_gate_release_with_an_exception(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect()
    gate = fake_server.block("rollback", times=None, conn=conn)
    threads = [run_in_thread(conn.rollback) for _ in range(3)]
    wait_until(lambda: gate.inside == 3)
    gate.release(KeyboardInterrupt)
    for thread, outcome in threads:
        thread.join(5)
        assert isinstance(outcome[0], KeyboardInterrupt)
    conn.rollback()  # a released gate holds nobody


def test_gate_gives_up_after_its_timeout(fake_server: fakedb.Server) -> None:
    fake_server.block("execute", timeout=0.05)
    cur = fake_server.connect().cursor()
    with pytest.raises(RuntimeError, match="not released"):
        cur.execute("update t set v = 1")


def test_connect_delay_keeps_the_thread_inside_connect(fake_server: fakedb.Server) -> None:
    fake_server.connect_delay = 0.2
    thread, _outcome = run_in_thread(fake_server.connect)
    wait_until(lambda: fake_server.connect_attempts == 1)
    assert fake_server.open_connections == []
    thread.join(5)
    assert fake_server.connects == 1


def test_many_threads_count_exactly(fake_server: fakedb.Server) -> None:
    def work() -> None:
        for _ in range(50):
            conn = fake_server.connect()
            conn.cursor().execute("select 1")
            conn.rollback()
            conn.close()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert fake_server.connects == 800
    assert fake_server.count("rollback") == 800 == fake_server.count("close")
    assert fake_server.open_connections == []
    assert len({c.id for c in fake_server.connections}) == 800


def test_mssql_flavour_looks_like_pymssql(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect_mssql()
    assert type(conn).__module__.split(".")[0] == "pymssql"
    assert type(conn._conn).__module__.split(".")[0] == "pymssql"
    assert not hasattr(conn, "in_transaction")
    assert conn._conn.connected and conn.autocommit_state is False

    conn.cursor().execute("insert into t values (1)")
    assert fake_server.in_transaction(conn)
    conn.rollback()
    assert not fake_server.in_transaction(conn)

    conn.autocommit(True)
    conn.autocommit(True)  # no change, no call
    conn.rollback()  # a no-op in autocommit mode
    assert conn.autocommit_state and fake_server.count("autocommit") == 1
    assert fake_server.count("rollback") == 1
    conn.close()
    with pytest.raises(fakedb.InterfaceError):
        _ = conn._conn


def test_mssql_flavour_notices_a_kill_on_next_use(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect_mssql()
    fake_server.kill(conn)
    assert conn._conn.connected  # nothing told the client yet
    cur = conn.cursor()  # no round trip
    with pytest.raises(fakedb.OperationalError):
        cur.execute("select 1")
    assert not conn._conn.connected
    with pytest.raises(fakedb.InterfaceError):
        cur.execute("select 1")
    with pytest.raises(fakedb.MSSQLDriverException) as info:
        conn.rollback()
    assert not isinstance(info.value, fakedb.Error)  # as in pymssql: not a DB-API error
    conn.close()
    assert conn.closed and fake_server.open_connections == []


def test_mssql_flavour_errors_and_dict_cursors_are_shaped_as_pymssqls(
    fake_server: fakedb.Server,
) -> None:
    conn = fake_server.connect_mssql()
    fake_server.kill(conn)
    with pytest.raises(fakedb.OperationalError) as failed:
        conn.cursor().execute("update t set v = 1")
    assert failed.value.args[0] == 20047  # cursor.execute(): the number, then the message
    low = fakedb.MSSQLDatabaseException((1205, b"chosen as deadlock victim"))
    assert low.number == 1205 and low.args == ((1205, b"chosen as deadlock victim"),)

    conn = fake_server.connect_mssql()
    conn.as_dict = True
    with pytest.raises(fakedb.ColumnsWithoutNamesError) as unnamed:
        conn.cursor().execute("SELECT 1")  # SQL Server names no column of it
    assert isinstance(unnamed.value, fakedb.InterfaceError)
    cur = conn.cursor(as_dict=False)
    cur.execute("SELECT 1")
    assert cur.fetchall() == [(1,)]


def test_mssql_flavour_records_a_close_under_a_call(fake_server: fakedb.Server) -> None:
    conn = fake_server.connect_mssql()
    gate = fake_server.block("execute")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn.cursor().execute("select slow()")
        except BaseException as exc:
            errors.append(exc)

    inside = threading.Thread(target=run)
    inside.start()
    try:
        assert gate.entered.wait(10)
        conn.close()
        assert fake_server.closed_under_a_call == [conn.id]
    finally:
        gate.release()
        inside.join(10)
    assert [type(exc) for exc in errors] == [fakedb.InterfaceError]  # closed, once let go
    other = fake_server.connect_mssql()
    other.close()  # nothing running on it
    assert fake_server.closed_under_a_call == [conn.id]


def test_mssql_flavour_keeps_sql_servers_trancount(fake_server: fakedb.Server) -> None:
    """As pymssql over SQL Server: statements that begin and end transactions count as they do
    on the server, with autocommit on too; ROLLBACK TRAN with none open fails."""
    conn = fake_server.connect_mssql()
    assert fake_server.trancount(conn) == 1  # pymssql.connect() sends BEGIN TRAN
    cur = conn.cursor()
    cur.execute("BEGIN TRAN")
    cur.execute("update t set v = 1")
    conn.commit()  # COMMIT TRAN ends the inner one only, then BEGIN TRAN
    assert fake_server.trancount(conn) == 2 and fake_server.in_transaction(conn)
    cur.execute("SAVE TRANSACTION sp")
    cur.execute("ROLLBACK TRANSACTION sp")  # to the savepoint: nothing ends
    assert fake_server.trancount(conn) == 2
    conn.rollback()  # ROLLBACK TRAN ends every level, then BEGIN TRAN
    assert fake_server.trancount(conn) == 1 and not fake_server.in_transaction(conn)

    cur.execute("ROLLBACK")  # as SQL Server does after a deadlock: none open any more
    with pytest.raises(fakedb.OperationalError) as commit:
        conn.commit()
    assert str(commit.value).startswith("Cannot commit transaction: (3902, ")
    with pytest.raises(fakedb.MSSQLDatabaseException) as on:
        conn.autocommit(True)  # ROLLBACK TRAN: the low-level error, not a DB-API one
    assert on.value.number == 3903 and conn.autocommit_state is False
    conn.rollback()  # its error ignored, then BEGIN TRAN
    conn.autocommit(True)
    assert fake_server.trancount(conn) == 0

    cur.execute("BEGIN TRANSACTION")
    cur.execute("update t set v = 2")
    conn.rollback()  # autocommit on: sends nothing
    assert fake_server.trancount(conn) == 1 and fake_server.in_transaction(conn)
    cur.execute("IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION")
    assert fake_server.trancount(conn) == 0 and not fake_server.in_transaction(conn)
    cur.execute("IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION")  # none open: nothing to do
    with pytest.raises(fakedb.OperationalError) as rollback:
        cur.execute("ROLLBACK TRAN")
    assert rollback.value.args[0] == 3903
