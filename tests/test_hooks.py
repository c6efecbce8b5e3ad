"""The connection hooks (``configure``, ``check``, ``reset``) and the event listeners.

Each rule is driven through the fake driver for exact control (gates, scripted faults, call
logs), and where it involves what a real server or driver reports (transaction state, client
settings, session state) against SQLite, PostgreSQL and MariaDB too.

Every wait is bounded: threads are run through :class:`tests.conftest.Caller` and joined with a
timeout, conditions are polled with :func:`tests.conftest.wait_until`, and a hook that blocks
does so on an Event the test sets.  A deadlock therefore fails a test instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from dbpool.dialects import Dialect, TxState
from tests import fakedb
from tests.conftest import (
    DISCARD_REASONS,
    Backend,
    Caller,
    Recorder,
    assert_accounting,
    probe,
    rows,
    scalar,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

#: How long a test waits for something that should happen at once, before calling it a hang.
BOUND = 10.0

#: How far past a deadline a bounded call may return (the ping's floor, the sever grace, thread
#: scheduling on a loaded machine): a hang is unbounded, so this still tells them apart.
SLACK = 3.0

EVENT_NAMES = {"connect", "checkout", "checkin", "discard", "close"}
# -- helpers ---------------------------------------------------------------------------------------


def use(conn: Any) -> None:
    """Run one statement on a lease, so that the return path has something to look at."""
    cur = conn.cursor()
    cur.execute("SELECT 2")  # not the fake driver's ping statement
    cur.fetchall()
    cur.close()


def open_transaction(backend: str, raw: Any) -> None:
    """Leave ``raw`` (a driver connection) inside a transaction, as the driver reports it."""
    if backend == "postgresql":
        raw.execute("SELECT 1")  # psycopg, autocommit off: BEGIN is sent first
    elif backend == "mysql":
        cur = raw.cursor()
        cur.execute("START TRANSACTION")
        cur.close()
    else:
        raw.execute("BEGIN")


def driver_in_transaction(backend: str, raw: Any) -> bool:
    """Whether the driver says ``raw`` is inside a transaction (read locally, no round trip)."""
    if backend == "postgresql":
        import psycopg

        return raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    if backend == "mysql":
        return bool((raw.server_status or 0) & 0x0001)  # SERVER_STATUS_IN_TRANS
    return bool(raw.in_transaction)


def dbpool_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dbpool" or r.name.startswith("dbpool.")]


def once(action: Callable[[Any], None]) -> Callable[[Any], None]:
    """A hook that runs ``action`` on its first call only."""
    done = threading.Event()

    def hook(raw: Any) -> None:
        if not done.is_set():
            done.set()
            action(raw)

    return hook


# == configure =====================================================================================


def test_configure_runs_once_per_new_connection_on_the_driver_connection(make_pool, server):
    configured: list[Any] = []
    pool = make_pool(max_size=3, configure=configured.append)
    leases = [pool.connection() for _ in range(3)]
    for lease in leases:
        use(lease)
        lease.close()
    for _ in range(10):  # reuse: no configure again
        with pool.connection() as conn:
            use(conn)
    s = assert_accounting(pool)
    assert s.created == 3 == server.connects
    assert len(configured) == 3
    assert all(isinstance(raw, fakedb.FakeConnection) for raw in configured), configured
    assert {raw.id for raw in configured} == {raw.id for raw in server.connections}


def test_configure_runs_before_anyone_uses_the_connection(make_pool, server):
    order: list[str] = []

    def configure(raw: Any) -> None:
        cur = raw.cursor()
        cur.execute("SET configured = 1")
        raw.commit()
        order.append("configure")

    pool = make_pool(max_size=1, configure=configure)
    pool.add_listener("connect", lambda e: order.append("connect-event"))
    pool.add_listener("checkout", lambda e: order.append("checkout-event"))
    with pool.connection() as conn:
        order.append("lease")
        cur = conn.cursor()
        cur.execute("SELECT 'work'")
    # CONNECT and CHECKOUT run in different threads: only their order after configure is fixed.
    assert order[0] == "configure", order
    assert order.index("checkout-event") < order.index("lease"), order
    assert sorted(order) == sorted(["configure", "connect-event", "checkout-event", "lease"])
    assert server.statements()[0] == "SET configured = 1"


def test_configure_runs_in_the_thread_that_connects(make_pool, server):
    configure_threads: list[int] = []
    connect_event_threads: list[int] = []
    pool = make_pool(
        max_size=1, configure=lambda raw: configure_threads.append(threading.get_ident())
    )
    pool.add_listener("connect", lambda e: connect_event_threads.append(threading.get_ident()))
    with pool.connection():
        pass
    assert len(configure_threads) == 1
    assert connect_event_threads == configure_threads


def test_configure_once_per_connection_under_concurrent_checkouts(make_pool, server):
    configured: list[int] = []
    lock = threading.Lock()

    def configure(raw: Any) -> None:
        with lock:
            configured.append(raw.id)

    pool = make_pool(max_size=3, configure=configure, validate_after=0)

    def worker() -> None:
        for _ in range(30):
            with pool.connection(timeout=BOUND) as conn:
                use(conn)

    callers = [Caller(worker, name=f"worker-{i}") for i in range(6)]
    for caller in callers:
        assert caller.outcome(30) is None
    s = assert_accounting(pool)
    assert sorted(configured) == sorted(set(configured)), "a connection was configured twice"
    assert len(configured) == s.created == server.connects


def test_a_raising_configure_fails_the_connect_with_its_own_exception(make_pool, server):
    boom = RuntimeError("configure says no")
    failing = threading.Event()
    failing.set()

    def configure(raw: Any) -> None:
        if failing.is_set():
            raise boom

    pool = make_pool(
        max_size=2, configure=configure, reconnect_delay=0.01, reconnect_max_delay=0.02
    )
    with pytest.raises(RuntimeError) as info:
        pool.connection()
    assert info.value is boom, "the caller must get the hook's own exception"
    s = assert_accounting(pool)
    assert s.connect_errors == 1
    assert (s.size, s.in_use, s.idle, s.opening) == (0, 0, 0, 0), s
    assert s.created == 0, "a connection configure refused was counted as created"
    assert server.connects == 1
    wait_until(
        lambda: not server.open_connections,
        timeout=BOUND,
        message="the connection configure failed on was left open",
    )

    failing.clear()
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    s = assert_accounting(pool)
    assert s.connect_errors == 1 and s.created == 1
    assert (s.size, s.idle) == (1, 1)


def test_a_raising_configure_starts_the_reconnect_backoff(make_pool, server):
    calls: list[Any] = []

    def configure(raw: Any) -> None:
        calls.append(raw)
        raise RuntimeError("configure fails")

    # A delay of 2.5 to 5 s (jittered): no second connect may start within the next 0.1 s.
    pool = make_pool(max_size=2, configure=configure, reconnect_delay=5.0, reconnect_max_delay=5.0)
    with pytest.raises(RuntimeError):
        pool.connection()
    with pytest.raises(dbpool.PoolTimeout):
        pool.connection(timeout=0.1)
    assert server.connect_attempts == 1, "configure failed, yet the pool connected again at once"
    assert len(calls) == 1
    assert_accounting(pool)


def test_a_raising_configure_in_the_refill_is_counted_and_reported_by_wait(make_pool, server):
    def configure(raw: Any) -> None:
        raise LookupError("no such setting")

    pool = make_pool(
        min_size=1, max_size=2, configure=configure, reconnect_delay=0.01, reconnect_max_delay=0.05
    )
    with pytest.raises(dbpool.PoolTimeout) as info:
        pool.wait(timeout=0.5)
    assert isinstance(info.value.__cause__, LookupError), info.value.__cause__
    s = assert_accounting(pool)
    assert s.connect_errors >= 1 and s.created == 0
    wait_until(
        lambda: not server.open_connections,
        timeout=BOUND,
        message="connections configure failed on were left open",
    )


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_configure_raising_a_base_exception_keeps_the_accounting(make_pool, server, exc):
    interrupting = threading.Event()
    interrupting.set()

    def configure(raw: Any) -> None:
        if interrupting.is_set():
            raise exc("interrupted inside configure")

    pool = make_pool(
        max_size=2, configure=configure, reconnect_delay=0.01, reconnect_max_delay=0.02
    )
    caller = Caller(lambda: pool.connection(timeout=2))
    error = caller.outcome(BOUND)
    # The interruption may reach the caller, or the caller may time out: never a lease.
    assert error is not None, "a lease was handed out although configure never finished"
    assert isinstance(error, (exc, dbpool.PoolTimeout)), repr(error)
    wait_until(lambda: pool.stats().opening == 0, timeout=BOUND)
    s = assert_accounting(pool)
    assert (s.size, s.in_use, s.idle) == (0, 0, 0), s
    wait_until(
        lambda: not server.open_connections,
        timeout=BOUND,
        message="the connection configure was interrupted on was left open",
    )

    interrupting.clear()
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    assert_accounting(pool)


def test_configure_runs_outside_the_pool_lock(make_pool, server):
    entered = threading.Event()
    proceed = threading.Event()

    def configure(raw: Any) -> None:
        if raw.id == 2:  # the second connection: the first is idle by then
            entered.set()
            assert proceed.wait(BOUND)

    pool = make_pool(max_size=2, configure=configure)
    first = pool.connection()
    blocked = Caller(lambda: pool.connection(timeout=BOUND), name="connecting")
    try:
        assert entered.wait(BOUND), "configure of the second connection did not start"
        first.close()
        # While configure is blocked: stats, a checkout and a return work in other threads.
        assert Caller(pool.stats, name="stats").outcome(BOUND) is None
        other = Caller(lambda: pool.connection(timeout=BOUND).close(), name="other")
        assert other.outcome(BOUND) is None
    finally:
        proceed.set()
    assert blocked.outcome(BOUND) is None
    blocked.value.close()
    assert_accounting(pool)


def test_a_non_callable_hook_is_refused(server):
    for hook in ("configure", "check", "reset"):
        with pytest.raises(TypeError, match=hook):
            dbpool.Pool(server.connect, min_size=0, **{hook: 42})


# -- configure against real servers ----------------------------------------------------------------


def session_marker(db: Backend, tag: str) -> tuple[Callable[[Any], None], Callable[[Any], Any]]:
    """A configure hook that leaves ``tag`` in the session state, and a query reading it back."""
    if db.name == "postgresql":

        def configure(raw: Any) -> None:
            raw.execute(f"SET application_name = '{tag}'")  # the tag is hex: no quoting needed
            raw.commit()

        return configure, lambda conn: scalar(conn, "SHOW application_name")
    if db.name == "mysql":

        def configure(raw: Any) -> None:
            cur = raw.cursor()
            cur.execute("SET @dbpool_tag = %s", (tag,))
            cur.close()

        return configure, lambda conn: scalar(conn, "SELECT @dbpool_tag")

    def configure(raw: Any) -> None:
        raw.create_function("dbpool_tag", 0, lambda: tag)

    return configure, lambda conn: scalar(conn, "SELECT dbpool_tag()")


def test_configure_sets_session_state_every_lease_sees(db: Backend) -> None:
    tag = f"dbpool-cfg-{uuid.uuid4().hex[:12]}"
    marker, read = session_marker(db, tag)
    configured: list[Any] = []

    def configure(raw: Any) -> None:
        configured.append(raw)
        marker(raw)

    with dbpool.Pool(db.connect, min_size=2, max_size=3, configure=configure) as pool:
        pool.wait(timeout=BOUND)
        leases = [pool.connection(timeout=BOUND) for _ in range(3)]
        try:
            for lease in leases:
                assert read(lease) == tag
        finally:
            for lease in leases:
                lease.close()
        for _ in range(5):
            with pool.connection(timeout=BOUND) as conn:
                assert read(conn) == tag
        s = assert_accounting(pool)
        assert len(configured) == s.created == 3


@pytest.mark.parametrize("culprit", ["configure", "connect"])
def test_a_transaction_left_open_on_a_new_connection_fails_the_connect(
    db: Backend, culprit: str
) -> None:
    """configure, or the connect callable itself: a SET left in an open transaction would be
    rolled back at the first borrower's return, or committed by that borrower."""
    leave_open = threading.Event()
    leave_open.set()

    def open_one(raw: Any) -> Any:
        if leave_open.is_set():
            open_transaction(db.name, raw)
        return raw

    hooks: dict[str, Any] = (
        {"configure": open_one}
        if culprit == "configure"
        else {"connect": lambda: open_one(db.connect())}
    )
    with dbpool.Pool(
        **{"connect": db.connect, **hooks},
        min_size=0,
        max_size=2,
        reconnect_delay=0.01,
        reconnect_max_delay=0.02,
    ) as pool:
        with pytest.raises(dbpool.PoolError) as info:
            pool.connection(timeout=BOUND)
        message = str(info.value)
        assert f"{culprit} left the new connection in transaction" in message, message
        assert "commit()" in message, message
        s = assert_accounting(pool)
        assert s.connect_errors == 1
        assert (s.size, s.idle, s.in_use) == (0, 0, 0), s

        leave_open.clear()
        with pool.connection(timeout=BOUND) as conn:
            assert rows(conn, "SELECT 1") == [(1,)]
        assert_accounting(pool)


def _autocommit_hooks(
    db: Backend,
) -> tuple[
    Callable[[Any], None], Callable[[Any], Any], Callable[[Any], None], Callable[[Any], None]
]:
    """configure (sets the driver's autocommit-like setting), read it, change it through the
    lease (recorded by the lease), change it on the driver connection (seen only by the
    pool's client-settings restore)."""
    if db.name == "postgresql":

        def configure(raw: Any) -> None:
            raw.autocommit = True

        def through_lease(conn: Any) -> None:
            conn.autocommit = False

        def through_raw(conn: Any) -> None:
            conn.raw.autocommit = False

        return configure, lambda conn: conn.raw.autocommit, through_lease, through_raw
    if db.name == "mysql":

        def configure(raw: Any) -> None:
            raw.autocommit(True)

        def through_lease(conn: Any) -> None:
            conn.autocommit(False)

        def through_raw(conn: Any) -> None:
            conn.raw.autocommit(False)

        return configure, lambda conn: conn.raw.get_autocommit(), through_lease, through_raw

    def configure(raw: Any) -> None:
        raw.isolation_level = None  # sqlite3's autocommit mode (Python < 3.12)

    def through_lease(conn: Any) -> None:
        conn.isolation_level = "DEFERRED"

    def through_raw(conn: Any) -> None:
        conn.raw.isolation_level = "IMMEDIATE"

    return configure, lambda conn: conn.raw.isolation_level, through_lease, through_raw


def test_settings_made_by_configure_are_what_every_return_restores(db: Backend) -> None:
    configure, read, through_lease, through_raw = _autocommit_hooks(db)
    with dbpool.Pool(db.connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection(timeout=BOUND) as conn:
            configured = read(conn)
            session = db.backend_id(conn)
        assert configured in (True, None), configured
        for change in (through_lease, through_raw):
            with pool.connection(timeout=BOUND) as conn:
                change(conn)
                assert read(conn) != configured
                use(conn)
            with pool.connection(timeout=BOUND) as conn:
                assert db.backend_id(conn) == session, "the connection was replaced, not restored"
                assert read(conn) == configured, f"{change.__name__}: the setting was not restored"
        s = assert_accounting(pool)
        assert s.created == 1


# == check =========================================================================================


@pytest.mark.parametrize("validate_after", [0, None, 1000.0])
def test_check_runs_at_every_checkout_instead_of_the_ping(make_pool, server, validate_after):
    checked: list[Any] = []

    def check(raw: Any) -> None:
        checked.append(raw)
        probe(raw)

    pool = make_pool(min_size=1, max_size=1, check=check, validate_after=validate_after)
    pool.wait(timeout=BOUND)
    for _ in range(5):
        with pool.connection() as conn:
            use(conn)
    assert len(checked) == 5, f"check ran {len(checked)} times for 5 checkouts"
    assert all(raw is server.connections[0] for raw in checked)
    assert server.count("ping") == 0, "the built-in ping ran although a check hook is set"
    assert_accounting(pool)


def test_a_raising_check_discards_the_connection_and_the_caller_gets_another(
    make_pool, server, caplog
):
    caplog.set_level(logging.DEBUG, logger="dbpool")
    pool = make_pool(min_size=2, max_size=3, check=probe)
    pool.wait(timeout=BOUND)
    idle = list(server.open_connections)
    assert len(idle) == 2
    for raw in idle:
        server.kill(raw)
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
        assert conn.raw not in idle
        assert not conn.raw.killed
    s = assert_accounting(pool)
    assert s.discards["check_failed"] == 2, s.discards
    assert s.discards["broken"] == 0, s.discards
    assert all(raw.closed for raw in idle), "a connection that failed its check was left open"
    text = "\n".join(
        r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in dbpool_records(caplog)
    )
    assert "server closed the connection unexpectedly" in text, "the check's failure was not logged"


def test_any_exception_from_check_discards(make_pool, server):
    failing = threading.Event()

    def check(raw: Any) -> None:
        if failing.is_set():
            failing.clear()
            raise ValueError("the application does not like this connection")

    pool = make_pool(min_size=1, max_size=2, check=check)
    pool.wait(timeout=BOUND)
    first = server.connections[0]
    failing.set()
    with pool.connection(timeout=BOUND) as conn:
        assert conn.raw is not first
    s = assert_accounting(pool)
    assert s.discards["check_failed"] == 1
    assert first.closed


@pytest.mark.parametrize("hook", [False, True], ids=["ping", "check"])
def test_a_checkout_out_of_time_after_a_failed_validation_names_what_failed(
    make_pool, server, hook
):
    """The PoolTimeout said the connection "failed its ping" after a check hook failed it,
    where no ping ran."""

    def check(raw: Any) -> None:
        raise ValueError("the application does not like this connection")

    # acquire_timeout=0: the deadline has passed once the idle connection failed validation
    options = {"check": check} if hook else {"validate_after": 0}
    pool = make_pool(min_size=1, max_size=1, acquire_timeout=0, **options)
    pool.wait(timeout=BOUND)
    if not hook:
        server.kill(server.connections[0])
    with pytest.raises(dbpool.PoolTimeout) as raised:
        pool.connection()
    message = str(raised.value)
    assert "while an idle connection was being validated" in message
    if hook:
        assert "it failed the check hook" in message and "ping" not in message
        assert server.count("ping") == 0
    else:
        assert "it failed its ping" in message and "check" not in message


def test_check_leaving_a_transaction_open_is_rolled_back_and_kept(db: Backend) -> None:
    check = once(lambda raw: open_transaction(db.name, raw))
    with dbpool.Pool(db.connect, min_size=1, max_size=2, check=check) as pool:
        pool.wait(timeout=BOUND)
        with pool.connection(timeout=BOUND) as conn:
            session = db.backend_id(conn)
            assert not driver_in_transaction(db.name, conn.raw), "handed out inside a transaction"
            assert rows(conn, "SELECT 1") == [(1,)]
        with pool.connection(timeout=BOUND) as conn:
            assert db.backend_id(conn) == session, "the connection was replaced, not kept"
        s = assert_accounting(pool)
        assert sum(s.discards.values()) == 0, s.discards
        assert s.created == 1


class FlagDialect(Dialect):
    """The generic dialect, reading the fake driver's local transaction flag."""

    def transaction_state(self, conn: Any) -> TxState:
        if conn.closed:
            return TxState.BROKEN
        return TxState.IN_TRANSACTION if conn.in_transaction else TxState.IDLE


def test_check_leaving_a_transaction_the_rollback_cannot_end_discards(make_pool, server):
    def check(raw: Any) -> None:
        raw.cursor().execute("SELECT 'opens a transaction'")

    pool = make_pool(min_size=1, max_size=2, check=check, dialect=FlagDialect())
    pool.wait(timeout=BOUND)
    first = server.connections[0]
    server.fail_next("rollback", fakedb.OperationalError, conn=first)
    with pool.connection(timeout=BOUND) as conn:
        assert conn.raw is not first
        assert not conn.raw.in_transaction
    s = assert_accounting(pool)
    assert s.discards["check_failed"] == 1, s.discards
    assert first.closed


def test_check_leaving_a_transaction_on_the_fake_driver_is_rolled_back(make_pool, server):
    def check(raw: Any) -> None:
        raw.cursor().execute("SELECT 'opens a transaction'")

    pool = make_pool(min_size=1, max_size=1, check=check, dialect=FlagDialect())
    pool.wait(timeout=BOUND)
    for _ in range(3):
        with pool.connection(timeout=BOUND) as conn:
            assert not conn.raw.in_transaction, "handed out inside the check's transaction"
    s = assert_accounting(pool)
    assert sum(s.discards.values()) == 0 and s.created == 1, s


def test_check_against_real_servers_discards_killed_sessions(db: Backend) -> None:
    checked: list[Any] = []

    def check(raw: Any) -> None:
        checked.append(raw)
        probe(raw)

    # min_size=0: no refill may slip a fresh connection in front of the second killed one.
    with dbpool.Pool(db.connect, min_size=0, max_size=3, check=check, validate_after=None) as pool:
        leases = [pool.connection(timeout=BOUND) for _ in range(2)]
        victims = [lease.raw for lease in leases]
        for lease in leases:
            lease.close()
        for raw in victims:
            db.kill(raw)
        before = len(checked)
        with pool.connection(timeout=BOUND) as conn:
            assert rows(conn, "SELECT 1") == [(1,)]
            assert conn.raw not in victims
        assert len(checked) - before >= 2, "the check hook did not run on the killed sessions"
        s = assert_accounting(pool)
        assert s.discards["check_failed"] == 2, s.discards


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_check_raising_a_base_exception_keeps_the_accounting(make_pool, server, exc):
    interrupting = threading.Event()

    def check(raw: Any) -> None:
        if interrupting.is_set():
            interrupting.clear()
            raise exc("interrupted inside check")

    pool = make_pool(min_size=1, max_size=2, check=check)
    pool.wait(timeout=BOUND)
    victim = server.connections[0]
    interrupting.set()
    with pytest.raises(exc):
        pool.connection(timeout=BOUND)
    s = assert_accounting(pool)
    assert s.in_use == 0, s
    assert s.discards["interrupted"] == 1, s.discards
    assert victim.closed, "the connection whose check was interrupted was kept or leaked"
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    assert_accounting(pool)


def test_check_runs_outside_the_pool_lock(make_pool, server):
    entered = threading.Event()
    proceed = threading.Event()
    check = once(lambda raw: (entered.set(), proceed.wait(BOUND)))
    pool = make_pool(min_size=1, max_size=2, check=check)
    pool.wait(timeout=BOUND)
    checking = Caller(lambda: pool.connection(timeout=BOUND), name="checking")
    try:
        assert entered.wait(BOUND), "the check did not start"
        assert Caller(pool.stats, name="stats").outcome(BOUND) is None
        other = Caller(lambda: pool.connection(timeout=BOUND).close(), name="other")
        assert other.outcome(BOUND) is None
    finally:
        proceed.set()
    assert checking.outcome(BOUND) is None
    checking.value.close()
    assert_accounting(pool)


# -- a check hung on a blackholed network ----------------------------------------------------------


class Link:
    def __init__(self, name: str, proxy: Any, connect: Callable[[], Any]) -> None:
        self.name = name
        self.proxy = proxy
        self.connect = connect


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def link(request: pytest.FixtureRequest) -> Iterator[Link]:
    from tests.faultproxy import FaultProxy, Mode

    if request.param == "postgresql":
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(request.getfixturevalue("postgresql_dsn"))
        upstream = int(params.get("port", 5432))
        with FaultProxy(upstream=("127.0.0.1", upstream)) as proxy:
            params.update(host="127.0.0.1", port=proxy.port, sslmode="disable")
            params.pop("hostaddr", None)
            params.pop("connect_timeout", None)  # no driver timeout: the pool's bound is on trial
            yield Link("postgresql", proxy, lambda: psycopg.connect(**params))
            proxy.set_mode(Mode.PASS)
            proxy.drop_all()
    else:
        import pymysql

        mysql = dict(request.getfixturevalue("mysql_params"))
        with FaultProxy(upstream=("127.0.0.1", int(mysql.get("port", 3306)))) as proxy:
            mysql.update(host="127.0.0.1", port=proxy.port)
            mysql.pop("read_timeout", None)
            mysql.pop("write_timeout", None)
            yield Link("mysql", proxy, lambda: pymysql.connect(**mysql))
            proxy.set_mode(Mode.PASS)
            proxy.drop_all()


def test_a_check_hung_on_a_blackholed_connection_is_bounded_by_the_acquire_deadline(
    link: Link,
) -> None:
    """The fake driver has no socket for the pool to shut down, so this bound is shown on real
    drivers through the fault proxy."""
    from tests.faultproxy import Mode

    with dbpool.Pool(link.connect, min_size=0, max_size=1, check=probe) as pool:
        with pool.connection(timeout=BOUND) as conn:
            use(conn)
        link.proxy.set_mode(Mode.BLACKHOLE)
        started = time.monotonic()
        with pytest.raises(dbpool.PoolTimeout):
            pool.connection(timeout=0.5).close()
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + SLACK, f"acquire(timeout=0.5) took {elapsed:.1f} s: the check hung"
        s = assert_accounting(pool)
        assert s.in_use == 0
        assert s.discards["check_failed"] == 1, s.discards
        link.proxy.set_mode(Mode.PASS)
        link.proxy.drop_all()
        with pool.connection(timeout=BOUND) as conn:
            use(conn)


# == reset =========================================================================================


def test_reset_runs_only_when_the_lease_used_the_connection(make_pool, server):
    reset: list[Any] = []
    pool = make_pool(max_size=1, reset=reset.append, validate_after=0)
    with pool.connection():
        pass
    with pool.connection():  # validated by the pool's own ping, untouched by the borrower
        pass
    assert reset == [], "reset ran after leases that never touched the connection"

    with pool.connection() as conn:
        use(conn)
    assert len(reset) == 1
    with pool.connection() as conn:
        conn.raw  # noqa: B018 - touching the driver connection counts as use
    assert len(reset) == 2
    with pool.connection() as conn:
        conn.commit()  # a driver method
    assert len(reset) == 3
    # As configuration.rst says: reading a driver attribute through the lease, or making a
    # cursor, counts though nothing reaches the server; the lease's own properties do not.
    with pool.connection() as conn:
        conn.in_transaction  # noqa: B018
    assert len(reset) == 4
    with pool.connection() as conn:
        conn.cursor()
    assert len(reset) == 5
    with pool.connection() as conn:
        assert conn.pool is pool and not conn.released and "leased" in repr(conn)
    assert len(reset) == 5
    assert all(raw is server.connections[0] for raw in reset)
    assert_accounting(pool)


def test_reset_runs_after_the_pools_own_rollback(make_pool, server):
    seen: list[bool] = []

    def reset(raw: Any) -> None:
        seen.append(server.in_transaction(raw))
        cur = raw.cursor()
        cur.execute("SELECT 'reset'")
        raw.rollback()

    pool = make_pool(max_size=1, reset=reset)
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("INSERT INTO t VALUES (1)")  # left uncommitted
    assert seen == [False], "reset saw the borrower's transaction: it ran before the rollback"
    statements = server.statements()
    assert statements.index("SELECT 'reset'") > statements.index("INSERT INTO t VALUES (1)")
    s = assert_accounting(pool)
    assert s.idle == 1 and sum(s.discards.values()) == 0


def test_a_raising_reset_discards_without_troubling_the_borrower(make_pool, server, caplog):
    caplog.set_level(logging.DEBUG, logger="dbpool")

    def reset(raw: Any) -> None:
        raise RuntimeError("reset hook failed on purpose")

    pool = make_pool(max_size=1, reset=reset)
    with pool.connection() as conn:  # leaving the block must not raise
        use(conn)
        first = conn.raw
    s = assert_accounting(pool)
    assert s.discards["reset_failed"] == 1, s.discards
    assert (s.size, s.idle, s.in_use) == (0, 0, 0), s
    assert first.closed
    text = "\n".join(
        r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in dbpool_records(caplog)
    )
    assert "reset hook failed on purpose" in text, "the reset failure was not logged"
    with pool.connection() as conn:
        assert conn.raw is not first


def test_reset_is_not_run_on_a_connection_the_return_path_discards(make_pool, server):
    reset: list[Any] = []
    pool = make_pool(max_size=1, reset=reset.append)
    server.fail_next("rollback", fakedb.OperationalError)
    with pool.connection() as conn:
        use(conn)  # uncommitted: the return path rolls back, and the rollback fails
    s = assert_accounting(pool)
    assert s.discards["reset_failed"] == 1, s.discards
    assert reset == [], "reset ran on a connection already being discarded"


def test_reset_leaving_a_transaction_open_discards(db: Backend) -> None:
    reset = once(lambda raw: open_transaction(db.name, raw))
    with dbpool.Pool(db.connect, min_size=0, max_size=1, reset=reset) as pool:
        with pool.connection(timeout=BOUND) as conn:
            assert rows(conn, "SELECT 1") == [(1,)]
            first = db.backend_id(conn)
        s = assert_accounting(pool)
        assert s.discards["reset_failed"] == 1, s.discards
        assert s.size == 0
        with pool.connection(timeout=BOUND) as conn:
            assert rows(conn, "SELECT 1") == [(1,)]
            if db.name != "sqlite":  # sqlite ids are Python ids, which may be reused
                assert db.backend_id(conn) != first


def test_a_raising_reset_against_real_servers(db: Backend) -> None:
    def reset(raw: Any) -> None:
        raise RuntimeError("no reset today")

    with dbpool.Pool(db.connect, min_size=0, max_size=1, reset=reset) as pool:
        with pool.connection(timeout=BOUND) as conn:
            assert rows(conn, "SELECT 1") == [(1,)]
        s = assert_accounting(pool)
        assert s.discards["reset_failed"] == 1
        assert s.size == 0


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_reset_raising_a_base_exception_keeps_the_accounting(make_pool, server, exc):
    interrupting = threading.Event()
    interrupting.set()

    def reset(raw: Any) -> None:
        if interrupting.is_set():
            interrupting.clear()
            raise exc("interrupted inside reset")

    pool = make_pool(max_size=2, reset=reset)
    conn = pool.connection()
    use(conn)
    victim = conn.raw
    try:
        conn.close()
    except exc:
        pass  # it may reach the thread returning the lease
    s = assert_accounting(pool)
    assert s.in_use == 0, s
    assert s.discards["interrupted"] == 1, s.discards
    assert victim.closed
    assert conn.released
    with pool.connection() as again:
        use(again)
    assert_accounting(pool)


def test_reset_runs_outside_the_pool_lock(make_pool, server):
    entered = threading.Event()
    proceed = threading.Event()
    calls: list[Any] = []

    def reset(raw: Any) -> None:
        calls.append(raw)
        if len(calls) == 1:
            entered.set()
            assert proceed.wait(BOUND)

    pool = make_pool(max_size=2, reset=reset)

    def borrow_and_use() -> None:
        with pool.connection(timeout=BOUND) as conn:
            use(conn)

    returning = Caller(borrow_and_use, name="returning")
    try:
        assert entered.wait(BOUND), "reset did not run"
        # While that reset blocks: stats, and a whole checkout/use/return in another thread.
        assert Caller(pool.stats, name="stats").outcome(BOUND) is None
        other = Caller(borrow_and_use, name="other")
        assert other.outcome(BOUND) is None, "a checkout waited for another lease's reset"
        assert len(calls) == 2
        s = pool.stats()
        assert s.in_use == 1 and s.idle == 1, s
    finally:
        proceed.set()
    assert returning.outcome(BOUND) is None
    s = assert_accounting(pool)
    assert (s.idle, s.in_use) == (2, 0)


# == events ========================================================================================


def test_event_and_discard_reason_enums():
    assert {e.value for e in dbpool.Event} == EVENT_NAMES
    assert {r.value for r in dbpool.DiscardReason} == DISCARD_REASONS
    for e in dbpool.Event:
        assert isinstance(e, str) and e == e.value and dbpool.Event(e.value) is e
    for r in dbpool.DiscardReason:
        assert isinstance(r, str) and r == r.value
    assert dbpool.Event.CHECKOUT == "checkout"
    assert dbpool.DiscardReason.CHECK_FAILED == "check_failed"


def test_each_event_fires_with_its_fields(make_pool, server):
    pool = make_pool(max_size=2, name="evented", validate_after=0)
    rec = Recorder(also=lambda e: getattr(e.connection, "closed", None)).listen_to_all(pool)
    me = threading.get_ident()

    with pool.connection() as conn:
        raw = conn.raw
        use(conn)
    (connect,) = rec.of("connect")
    (checkout,) = rec.of("checkout")
    (checkin,) = rec.of("checkin")
    for event, kind in ((connect, "connect"), (checkout, "checkout"), (checkin, "checkin")):
        assert isinstance(event, dbpool.PoolEvent)
        assert event.event is dbpool.Event(kind)
        assert event.pool == "evented"
        assert event.connection is raw
        assert event.reason is None
        assert isinstance(event.duration, float) and event.duration >= 0, event
    assert rec.threads[rec.events.index(checkout)] == me, "CHECKOUT ran outside the caller's thread"
    assert rec.threads[rec.events.index(checkin)] == me, "CHECKIN ran outside the returning thread"
    assert sorted(rec.kinds()) == ["checkin", "checkout", "connect"]
    assert rec.kinds().index("checkout") < rec.kinds().index("checkin")

    server.kill(raw)  # validate_after=0: the next checkout finds it broken
    with pool.connection() as conn:
        fresh = conn.raw
    (discard,) = rec.of("discard")
    assert discard.event is dbpool.Event.DISCARD
    assert discard.connection is raw and discard.pool == "evented"
    assert discard.reason == "broken" and discard.reason == dbpool.DiscardReason.BROKEN
    assert discard.duration is None
    closes = rec.of("close")
    assert [e.connection for e in closes] == [raw]
    assert closes[0].reason == "broken" and closes[0].duration is None
    assert rec.probed[rec.events.index(closes[0])] is True, "CLOSE fired before the close"
    assert rec.kinds().index("discard") < rec.kinds().index("close")

    pool.close()
    closes = rec.of("close")
    assert [e.connection for e in closes] == [raw, fresh]
    assert closes[1].reason == "pool_closed"
    assert len(rec.of("discard")) == 1, "closing the pool is no discard"
    assert len(rec.of("connect")) == 2 == pool.stats().created


def test_checkin_fires_before_the_connection_is_cleaned(make_pool, server):
    dirty_at_checkin: list[bool] = []
    pool = make_pool(max_size=1)
    pool.add_listener(
        dbpool.Event.CHECKIN, lambda e: dirty_at_checkin.append(server.in_transaction(e.connection))
    )
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("INSERT INTO t VALUES (1)")
    assert dirty_at_checkin == [True]
    assert not server.in_transaction(server.connections[0])


def test_event_durations_measure_the_wait_and_the_hold(make_pool, server):
    pool = make_pool(max_size=1)
    rec = Recorder().listen_to_all(pool)
    hold = 0.05
    with pool.connection():
        time.sleep(hold)  # the hold being measured, not a synchronisation
    (checkin,) = rec.of("checkin")
    assert checkin.duration >= hold

    release = threading.Event()
    taken = threading.Event()

    def holder() -> None:
        with pool.connection(timeout=BOUND):
            taken.set()
            assert release.wait(BOUND)

    holding = Caller(holder, name="holder")
    assert taken.wait(BOUND)
    waiter = Caller(lambda: pool.connection(timeout=BOUND).close(), name="waiter")
    wait_until(lambda: pool.stats().waiting == 1, timeout=BOUND)
    time.sleep(hold)  # makes the wait at least this long; the order comes from `waiting`
    release.set()
    assert holding.outcome(BOUND) is None and waiter.outcome(BOUND) is None
    checkouts = rec.of("checkout")
    assert len(checkouts) == 3
    assert checkouts[-1].duration >= hold


def test_connect_event_duration_includes_configure(make_pool, server):
    pause = 0.05
    pool = make_pool(max_size=1, configure=lambda raw: time.sleep(pause))
    rec = Recorder().listen_to_all(pool)
    with pool.connection():
        pass
    (connect,) = rec.of("connect")
    assert connect.duration >= pause


def test_pool_event_is_frozen(make_pool, server):
    pool = make_pool(max_size=1)
    rec = Recorder().listen_to_all(pool)
    with pool.connection():
        pass
    event = rec.events[0]
    assert dataclasses.is_dataclass(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.reason = "tampered"  # type: ignore[misc]


def test_listeners_by_name_and_by_enum_and_their_removal(make_pool, server):
    pool = make_pool(max_size=1)
    by_name = Recorder()
    by_enum = Recorder()
    pool.add_listener("checkout", by_name)
    pool.add_listener(dbpool.Event.CHECKOUT, by_enum)
    with pool.connection():
        pass
    assert len(by_name.events) == len(by_enum.events) == 1
    pool.remove_listener("checkout", by_name)
    with pool.connection():
        pass
    assert len(by_name.events) == 1 and len(by_enum.events) == 2
    pool.remove_listener(dbpool.Event.CHECKOUT, by_enum)
    with pool.connection():
        pass
    assert len(by_enum.events) == 2
    with pytest.raises(ValueError):
        pool.remove_listener("checkout", by_enum)  # no longer registered
    pool.add_listener("checkin", by_name)
    with pytest.raises(ValueError):
        pool.remove_listener("checkout", by_name)  # registered for another event only


def test_bad_listener_arguments_are_refused(make_pool, server):
    pool = make_pool(max_size=1)
    with pytest.raises(ValueError) as info:
        pool.add_listener("checkedout", lambda e: None)
    message = str(info.value)
    assert all(name in message for name in EVENT_NAMES), f"valid names not listed: {message}"
    with pytest.raises(ValueError):
        pool.remove_listener("nonsense", lambda e: None)
    with pytest.raises(TypeError):
        pool.add_listener("checkout", "not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pool.add_listener("checkout", None)  # type: ignore[arg-type]
    with pool.connection():  # nothing was registered by the refused calls
        pass


def test_a_raising_listener_is_logged_and_the_operation_proceeds(make_pool, server, caplog):
    caplog.set_level(logging.DEBUG, logger="dbpool")

    def bad(event: Any) -> None:
        raise RuntimeError(f"listener failed on {event.event.value}")

    pool = make_pool(max_size=1)
    after = Recorder()
    for event in dbpool.Event:
        pool.add_listener(event, bad)
        pool.add_listener(event, after)
    with pool.connection() as conn:
        use(conn)
    server.kill(server.connections[0])
    pool.check()
    pool.close()
    assert after.kinds().count("checkout") == 1 and after.kinds().count("checkin") == 1
    assert {"connect", "discard", "close"} <= set(after.kinds()), after.kinds()
    failures = [
        r
        for r in dbpool_records(caplog)
        if r.exc_info
        and isinstance(r.exc_info[1], RuntimeError)
        and "listener failed" in str(r.exc_info[1])
    ]
    assert {str(r.exc_info[1]) for r in failures} >= {
        "listener failed on connect",
        "listener failed on checkout",
        "listener failed on checkin",
        "listener failed on discard",
        "listener failed on close",
    }, "a listener's exception was not logged with its traceback"


def test_listeners_run_outside_the_pool_lock(make_pool, server):
    pool = make_pool(max_size=2)
    inside = threading.local()
    reentered: list[str] = []

    def reenter(event: Any) -> None:
        if getattr(inside, "busy", False):
            return
        inside.busy = True
        try:
            pool.stats()
            # Another thread uses the pool while this listener runs.
            other = Caller(lambda: pool.stats(), name=f"stats-in-{event.event.value}")
            assert other.outcome(BOUND) is None
            if event.event is dbpool.Event.CHECKIN:
                with pool.connection(timeout=BOUND) as conn:  # from inside the listener
                    use(conn)
            reentered.append(event.event.value)
        finally:
            inside.busy = False

    for event in dbpool.Event:
        pool.add_listener(event, reenter)

    def scenario() -> None:
        with pool.connection(timeout=BOUND) as conn:
            use(conn)
        server.kill(server.connections[0])
        server.kill(server.connections[-1])
        pool.check()

    run = Caller(scenario, name="scenario")
    assert run.outcome(30) is None, "a listener deadlocked the pool"
    assert {"connect", "checkout", "checkin", "discard", "close"} <= set(reentered), reentered
    closer = Caller(pool.close, name="closer")
    assert closer.outcome(BOUND) is None
    assert_accounting(pool)


def test_a_checkout_listener_taking_a_second_connection_does_not_deadlock(make_pool, server):
    pool = make_pool(max_size=2)
    inside = threading.local()
    nested: list[Any] = []

    def take_another(event: Any) -> None:
        if getattr(inside, "busy", False):
            return
        inside.busy = True
        try:
            with pool.connection(timeout=BOUND) as conn:
                nested.append(conn.raw)
        finally:
            inside.busy = False

    pool.add_listener("checkout", take_another)
    run = Caller(lambda: pool.connection(timeout=BOUND).close(), name="outer")
    assert run.outcome(BOUND) is None, "a CHECKOUT listener using the pool deadlocked"
    assert len(nested) == 1
    assert_accounting(pool)


def test_a_listener_removing_itself_while_called(make_pool, server):
    pool = make_pool(max_size=1)
    calls: list[str] = []

    def one_shot(event: Any) -> None:
        calls.append("one-shot")
        pool.remove_listener("checkout", one_shot)

    pool.add_listener("checkout", one_shot)
    pool.add_listener("checkout", lambda e: calls.append("steady"))
    for _ in range(3):
        with pool.connection():
            pass
    assert calls == ["one-shot", "steady", "steady", "steady"]


def test_listeners_added_and_removed_while_events_fire(make_pool, server):
    pool = make_pool(max_size=3)
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn() -> None:
        listeners = [Recorder() for _ in range(5)]
        while not stop.is_set():
            for kind in EVENT_NAMES:
                for listener in listeners:
                    pool.add_listener(kind, listener)
                for listener in listeners:
                    pool.remove_listener(kind, listener)

    def work() -> None:
        for _ in range(200):
            try:
                with pool.connection(timeout=BOUND) as conn:
                    use(conn)
            except BaseException as exc:  # reported below
                failures.append(exc)
                return

    churner = Caller(churn, name="churn")
    workers = [Caller(work, name=f"work-{i}") for i in range(4)]
    try:
        for worker in workers:
            assert worker.outcome(30) is None
    finally:
        stop.set()
    assert churner.outcome(BOUND) is None
    assert not failures, failures
    assert_accounting(pool)


# The hooks, and the listeners told of a connection the calling thread is handling: drain() or
# close() called from one of them would wait for that very connection.
HANDLING = ["configure", "check", "reset", "connect", "checkout", "checkin"]


@pytest.mark.parametrize("call", ["drain", "close"])
@pytest.mark.parametrize("kind", HANDLING)
def test_drain_or_close_from_a_hook_or_listener_refuses_at_once(make_pool, server, kind, call):
    refused: list[BaseException | None] = []

    def stop(raw_or_event: Any) -> None:
        try:
            getattr(pool, call)(timeout=None)  # with no timeout, a wait that cannot end hangs
        except dbpool.PoolError as exc:
            refused.append(exc)
        else:
            refused.append(None)

    hook = once(stop)
    hooks = {kind: hook} if kind in ("configure", "check", "reset") else {}
    pool = make_pool(max_size=2, **hooks)
    if not hooks:
        pool.add_listener(kind, hook)

    def scenario() -> None:
        for _ in range(2):  # the check runs on the second checkout, on the idle connection
            with pool.connection(timeout=BOUND) as conn:
                use(conn)

    assert Caller(scenario, name="scenario").outcome(BOUND) is None, f"{call}() hung in {kind}"
    assert len(refused) == 1 and refused[0] is not None, refused
    assert f"{call}() called from" in str(refused[0]) and kind in str(refused[0]), refused[0]
    assert not pool.closed, "refused, yet it closed the pool"
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    assert_accounting(pool)


def test_a_checkout_from_configure_that_times_out_says_the_hook_holds_a_connection(
    make_pool, server
):
    timeouts: list[dbpool.PoolTimeout] = []

    def nested(raw: Any) -> None:
        try:
            pool.connection(timeout=0.05).close()
        except dbpool.PoolTimeout as exc:
            timeouts.append(exc)

    pool = make_pool(min_size=0, max_size=1, configure=once(nested))
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    assert len(timeouts) == 1, timeouts
    assert "this thread is running the configure hook on one of them" in str(timeouts[0])
    assert_accounting(pool)


@pytest.mark.parametrize("kind", sorted(EVENT_NAMES))
def test_a_listener_raising_a_base_exception_keeps_the_accounting(make_pool, server, kind):
    armed = threading.Event()
    armed.set()

    def interrupting(event: Any) -> None:
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt(f"interrupted in a {kind} listener")

    pool = make_pool(max_size=2, validate_after=0, reconnect_delay=0.01, reconnect_max_delay=0.02)
    pool.add_listener(kind, interrupting)

    def scenario() -> None:
        with pool.connection(timeout=BOUND) as conn:  # connect, checkout, checkin
            use(conn)
        server.kill(server.connections[-1])
        pool.check()  # discard, close
        with pool.connection(timeout=BOUND) as conn:
            use(conn)

    for _ in range(3):  # the interruption may end one round early; later rounds run clean
        error = Caller(scenario, name="scenario").outcome(BOUND * 2)
        expected = (KeyboardInterrupt, dbpool.PoolTimeout)
        assert error is None or isinstance(error, expected), repr(error)
        if error is None:
            break
    assert not armed.is_set(), "the listener never ran"
    wait_until(lambda: pool.stats().opening == 0, timeout=BOUND)
    s = assert_accounting(pool)
    assert s.in_use == 0, s
    wait_until(
        lambda: len(server.open_connections) == pool.stats().size,
        timeout=BOUND,
        message="a connection is open on the server that the pool no longer counts",
    )
    with pool.connection(timeout=BOUND) as conn:
        use(conn)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_a_connection_told_in_a_connect_event_is_told_closed(make_pool, server, exc):
    """A connect listener raising what is no Exception stops the connect: the connection is
    closed, and listeners that were told it opened are told it closed (reason interrupted),
    so a tracer of open connections by their events keeps no ghost."""
    armed = threading.Event()
    armed.set()
    events: list[Any] = []

    def interrupting(event: Any) -> None:
        events.append(event)
        if armed.is_set():
            armed.clear()
            raise exc("stopped in a connect listener")

    pool = make_pool(max_size=1, reconnect_delay=0.01, reconnect_max_delay=0.02)
    pool.add_listener("connect", interrupting)
    pool.add_listener("close", events.append)
    with pytest.raises(exc):
        pool.connection(timeout=BOUND)
    with pool.connection(timeout=BOUND) as conn:
        use(conn)
    pool.close()
    opened = [e.connection for e in events if e.event is dbpool.Event.CONNECT]
    closed = [e.connection for e in events if e.event is dbpool.Event.CLOSE]
    assert len(opened) == 2 and sorted(map(id, opened)) == sorted(map(id, closed)), events
    first_close = next(e for e in events if e.event is dbpool.Event.CLOSE)
    assert first_close.connection is opened[0]
    assert first_close.reason == dbpool.DiscardReason.INTERRUPTED.value
    assert not server.open_connections
