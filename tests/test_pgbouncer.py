"""dbpool with psycopg 3 (and psycopg2) through PgBouncer in transaction pooling mode.

In transaction mode PgBouncer lends a server connection to a client for one transaction only.
These tests prove that dbpool works on top of that, and pin down where the mode bites:

* many threads over a dbpool pool larger than PgBouncer's server pool commit every row, each
  transaction on one server session, over no more than PgBouncer's ``default_pool_size``;
* ``pool.transaction(isolation=..., readonly=..., timeout=...)`` takes effect, because dbpool
  puts the level in BEGIN and the timeouts in transaction-scoped settings, and nothing of it
  is left in the server session afterwards;
* a transaction deadline cancels the running statement through PgBouncer (the cancel request
  reaches the right server), and the connection and PgBouncer stay usable; a deadline that
  passes while the transaction still queues in PgBouncer for a server (where PgBouncer ignores
  cancel requests) still ends the block in time, and touches no other client's work;
* psycopg's automatic prepared statements break across server sessions unless
  ``prepare_threshold=None`` (or PgBouncer >= 1.21 with ``max_prepared_statements``);
  psycopg2, which prepares nothing, needs no setting;
* a plain ``SET`` outlives its transaction and reaches other clients, ``SET LOCAL`` does not;
* an autocommit lease holds no server connection between its statements;
* the ``validate_after`` ping talks to PgBouncer: it catches a client connection PgBouncer
  dropped, while a server session killed behind PgBouncer never reaches dbpool at all.

The fixture's ``test_pinned`` database has a single server connection, so effects that depend
on which server session a client lands on happen every time there, not by chance.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Iterator
from time import monotonic
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import unavailable, wait_until
from tests.pgbouncer import (  # noqa: F401 - pgbouncer is the fixture
    DATABASE,
    PINNED,
    POOL_SIZE,
    QUERY_WAIT_TIMEOUT,
    PgBouncer,
    pgbouncer,
)

try:
    import psycopg
except ImportError:  # the pgbouncer fixture reports it, through postgresql_dsn
    psycopg = None  # type: ignore[assignment]

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(60)]

THREADS = 16  # dbpool connections, against POOL_SIZE server connections
ROUNDS = int(os.environ.get("DBPOOL_PGBOUNCER_ROUNDS", "10"))  # transactions per thread
TABLE = "dbpool_pgbouncer_rows"
QUERY = "SELECT %s::int + 1"  # one parametrized statement, run again and again
DEFAULT_THRESHOLD: Any = object()  # keep psycopg's own prepare_threshold (5)

PoolFactory = Callable[..., "dbpool.Pool[Any]"]


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def bouncer_pool(pgbouncer: PgBouncer) -> Iterator[PoolFactory]:
    """Make dbpool pools of psycopg connections through PgBouncer; closed after the test.

    ``prepare_threshold=None`` unless the test asks for psycopg's default; other keyword
    arguments go to :class:`dbpool.Pool`.
    """
    pools: list[dbpool.Pool[Any]] = []

    def make(
        dbname: str = DATABASE,
        *,
        max_size: int,
        prepare_threshold: Any = None,
        autocommit: bool = False,
        **pool_options: Any,
    ) -> dbpool.Pool[Any]:
        options: dict[str, Any] = {"autocommit": autocommit}
        if prepare_threshold is not DEFAULT_THRESHOLD:
            options["prepare_threshold"] = prepare_threshold
        dsn = pgbouncer.dsn(dbname)
        pool: dbpool.Pool[Any] = dbpool.Pool(
            lambda: psycopg.connect(dsn, **options),
            min_size=0,
            max_size=max_size,
            acquire_timeout=20.0,
            name=f"pgbouncer-{dbname}-{len(pools) + 1}",
            **pool_options,
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def table(pg_connect: Any) -> Iterator[str]:
    """An empty table made directly on PostgreSQL, dropped after the test."""
    admin = pg_connect()
    admin.autocommit = True
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
    admin.execute(
        f"CREATE TABLE {TABLE} (thread int, round int, k int, backend int, "
        "PRIMARY KEY (thread, round, k))"
    )
    yield TABLE
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")


@pytest.fixture
def direct(pg_connect: Any) -> Any:
    """A connection straight to PostgreSQL, in autocommit mode, to check from outside."""
    conn = pg_connect()
    conn.autocommit = True
    return conn


@pytest.fixture
def clean_pinned(pgbouncer: PgBouncer) -> Iterator[None]:
    """Close the pinned server session after the test, with whatever the test left in it."""
    yield
    pgbouncer.command(f"RECONNECT {PINNED}")
    wait_until(
        lambda: not pgbouncer.servers(PINNED),
        timeout=10,
        message="PgBouncer kept the pinned server connection after RECONNECT",
    )


def show(tx: Any, setting: str) -> str:
    [(value,)] = tx.execute(f"SHOW {setting}").fetchall()
    return str(value)


def backend_pid(tx: Any) -> int:
    [(pid,)] = tx.execute("SELECT pg_backend_pid()").fetchall()
    return int(pid)


def milliseconds(value: str) -> float:
    """A PostgreSQL duration setting as SHOW prints it ('0', '1998ms', '2s', '1min')."""
    for unit, factor in (("ms", 1), ("min", 60_000), ("s", 1000), ("h", 3_600_000)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value)


def servers_in_use(pool_row: dict[str, Any]) -> int:
    return sum(
        int(pool_row.get(key, 0))
        for key in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
    )


# -- many threads, few server connections ------------------------------------------------------


def test_threads_over_a_larger_pool_commit_everything(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory, table: str, direct: Any
) -> None:
    pool = bouncer_pool(max_size=THREADS)
    all_leased = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    insert = f"INSERT INTO {table} VALUES (%s, %s, %s, pg_backend_pid())"

    def work(thread: int) -> None:
        try:
            for round_ in range(ROUNDS):
                with pool.transaction() as tx:
                    if round_ == 0:
                        # Every thread holds a dbpool connection at once, but none has sent a
                        # statement yet, so none holds a PgBouncer server connection.
                        all_leased.wait(timeout=10)
                    tx.execute(insert, (thread, round_, 1))
                    tx.execute(insert, (thread, round_, 2))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(THREADS)]
    for worker in workers:
        worker.start()
    deadline = monotonic() + 40
    for worker in workers:
        worker.join(timeout=max(deadline - monotonic(), 0))
    assert not [w for w in workers if w.is_alive()], "workers still running"
    assert not errors, [
        "".join(traceback.format_exception(type(e), e, e.__traceback__)) for e in errors[:3]
    ]

    rows = direct.execute(f"SELECT thread, round, backend FROM {table}").fetchall()
    assert len(rows) == THREADS * ROUNDS * 2
    assert {(t, r) for t, r, _ in rows} == {(t, r) for t in range(THREADS) for r in range(ROUNDS)}
    by_transaction: dict[tuple[int, int], set[int]] = {}
    for thread, round_, backend in rows:
        by_transaction.setdefault((thread, round_), set()).add(backend)
    assert all(len(b) == 1 for b in by_transaction.values()), "a transaction spanned two servers"
    backends = {backend for _, _, backend in rows}
    assert 1 <= len(backends) <= POOL_SIZE  # 16 clients shared at most 4 server sessions

    stats = pool.stats()
    assert stats.created == THREADS and stats.discarded == 0 and stats.timeouts == 0
    assert stats.acquired == THREADS * ROUNDS
    assert servers_in_use(pgbouncer.pool(DATABASE)) <= POOL_SIZE
    assert int(pgbouncer.pool(DATABASE)["cl_waiting"]) == 0


# -- isolation, read-only and timeouts live in the transaction ---------------------------------


def test_isolation_readonly_and_timeout_apply_and_end_with_the_transaction(
    bouncer_pool: PoolFactory, clean_pinned: None
) -> None:
    pool = bouncer_pool(PINNED, max_size=1)
    with pool.transaction(isolation="SERIALIZABLE", readonly=True, timeout=2) as tx:
        server = backend_pid(tx)
        assert show(tx, "transaction_isolation") == "serializable"
        assert show(tx, "transaction_read_only") == "on"
        for setting in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"):
            assert 0 < milliseconds(show(tx, setting)) <= 2000, setting
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), tx.savepoint():
            tx.execute("CREATE TEMPORARY TABLE dbpool_pgbouncer_ro (x int)")

    # Another client, on the same (only) server session: nothing of the above is left there.
    other = bouncer_pool(PINNED, max_size=1)
    with other.transaction() as tx:
        assert backend_pid(tx) == server
        assert show(tx, "transaction_isolation") == "read committed"
        assert show(tx, "transaction_read_only") == "off"
        for setting in ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"):
            assert milliseconds(show(tx, setting)) == 0, setting
    # And the first client's next transaction is back to the defaults too.
    with pool.transaction() as tx:
        assert show(tx, "transaction_isolation") == "read committed"
        assert show(tx, "transaction_read_only") == "off"


# -- deadlines ---------------------------------------------------------------------------------


def test_transaction_timeout_cancels_through_pgbouncer(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory
) -> None:
    pool = bouncer_pool(max_size=1)

    started = monotonic()
    with pytest.raises(dbpool.TransactionTimeout):
        with pool.transaction(timeout=0.5) as tx:
            tx.execute("SELECT pg_sleep(5)")
    assert monotonic() - started < 4.5, "the statement ran to its end: nothing stopped it"

    # With the server's own statement_timeout switched off, only dbpool's cancel request,
    # sent to PgBouncer, can stop the statement; PostgreSQL says who cancelled it.
    with pytest.raises(dbpool.TransactionTimeout) as info:
        with pool.transaction(timeout=0.5) as tx:
            tx.execute("SET LOCAL statement_timeout = 0")
            tx.execute("SELECT pg_sleep(5)")
    cause = info.value.__cause__
    assert isinstance(cause, psycopg.errors.QueryCanceled), repr(cause)
    assert "user request" in str(cause)

    # The same dbpool connection, through the same PgBouncer, works on.
    with pool.transaction(timeout=2) as tx:
        assert tx.execute("SELECT 1").fetchall() == [(1,)]
    stats = pool.stats()
    assert stats.created == 1 and stats.discarded == 0
    wait_until(
        lambda: int(pgbouncer.pool(DATABASE).get("sv_active", 1)) == 0,
        timeout=10,
        message="a server connection stayed busy after the cancel",
    )


def test_deadline_while_queued_for_a_server_ends_the_block(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory, table: str, direct: Any
) -> None:
    holder = bouncer_pool(PINNED, max_size=1)
    pool = bouncer_pool(PINNED, max_size=1)
    with holder.transaction() as busy:
        # The holder's open transaction keeps the only server connection of PINNED.
        busy.execute(f"INSERT INTO {table} VALUES (0, 0, 1, pg_backend_pid())")
        started = monotonic()
        with pytest.raises(dbpool.TransactionTimeout):
            with pool.transaction(timeout=0.5) as tx:
                tx.execute("SELECT 1")  # waits in PgBouncer's queue: no server to run on
        waited = monotonic() - started
        # PgBouncer drops cancel requests for a client that has no server yet; the block still
        # ended long before PgBouncer's own query_wait_timeout would have failed the query.
        assert waited < QUERY_WAIT_TIMEOUT / 2, waited
        assert int(pgbouncer.pool(PINNED)["sv_active"]) == 1  # the holder's, untouched
        busy.execute(f"INSERT INTO {table} VALUES (0, 0, 2, pg_backend_pid())")
    assert direct.execute(f"SELECT count(*) FROM {table}").fetchall() == [(2,)]
    with pool.transaction(timeout=2) as tx:  # the pool recovered, on a new connection if needed
        assert tx.execute("SELECT 1").fetchall() == [(1,)]


# -- prepared statements -----------------------------------------------------------------------


def pgbouncer_keeps_prepared_statements(pgbouncer: PgBouncer) -> bool:
    """PgBouncer 1.21 and later re-prepare protocol-level prepared statements on whichever
    server a client lands on, when max_prepared_statements is above 0 (the default since
    1.24). Earlier versions pass them through to one server session."""
    if pgbouncer.version < (1, 21):
        return False
    return int(pgbouncer.setting("max_prepared_statements") or 0) > 0


def run_query(lease: Any, times: int, failures: list[str]) -> None:
    """Run QUERY ``times`` times, one transaction each; note the SQLSTATE of each failure."""
    for i in range(times):
        try:
            with lease.transaction() as tx:
                assert tx.execute(QUERY, (i,)).fetchall() == [(i + 1,)]
        except psycopg.Error as exc:
            failures.append(str(exc.sqlstate))


@pytest.mark.parametrize("prepare_threshold", [DEFAULT_THRESHOLD, None], ids=["default", "None"])
def test_prepared_statements_need_prepare_threshold_none(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory, clean_pinned: None, prepare_threshold: Any
) -> None:
    pool = bouncer_pool(PINNED, max_size=2, prepare_threshold=prepare_threshold)
    failures: list[str] = []
    with pool.connection() as first, pool.connection() as second:
        # psycopg prepares a statement on its 6th run, as "_pg3_0", on the server session of
        # that transaction. Both connections reach the one pinned server session.
        run_query(first, 6, failures)
        run_query(second, 6, failures)  # "_pg3_0" again, on the same server session
        pgbouncer.command(f"RECONNECT {PINNED}")  # the next transaction gets a new session
        wait_until(lambda: not pgbouncer.servers(PINNED), timeout=10)
        run_query(first, 1, failures)  # "_pg3_0" is not prepared on the new session

    if prepare_threshold is None or pgbouncer_keeps_prepared_statements(pgbouncer):
        assert failures == []
    else:
        # 42P05: prepared statement "_pg3_0" already exists;
        # 26000: prepared statement "_pg3_0" does not exist.
        assert failures == ["42P05", "26000"], (pgbouncer.version, failures)


def test_psycopg2_needs_no_setting(pgbouncer: PgBouncer, clean_pinned: None) -> None:
    try:
        import psycopg2
    except ImportError as exc:
        unavailable(f"psycopg2 is not installed: {exc}")
    dsn = pgbouncer.dsn(PINNED)
    with dbpool.Pool(lambda: psycopg2.connect(dsn), min_size=0, max_size=2) as pool:
        with pool.connection() as first, pool.connection() as second:
            for lease in (first, second, first):  # the same statement, many times, both leases
                for i in range(7):
                    with lease.transaction() as tx:
                        assert tx.execute(QUERY, (i,)).fetchall() == [(i + 1,)]
                pgbouncer.command(f"RECONNECT {PINNED}")
                wait_until(lambda: not pgbouncer.servers(PINNED), timeout=10)
            # Isolation, read-only and timeouts are transaction-scoped with psycopg2 too.
            with first.transaction(isolation="SERIALIZABLE", readonly=True, timeout=2) as tx:
                server = backend_pid(tx)
                assert show(tx, "transaction_isolation") == "serializable"
                assert show(tx, "transaction_read_only") == "on"
                assert 0 < milliseconds(show(tx, "statement_timeout")) <= 2000
            with second.transaction() as tx:
                assert backend_pid(tx) == server
                assert show(tx, "transaction_isolation") == "read committed"
                assert show(tx, "transaction_read_only") == "off"
                assert milliseconds(show(tx, "statement_timeout")) == 0
            # A server-side cursor WITHOUT HOLD lives and dies inside one transaction: fine.
            with first.transaction() as tx:
                named = tx.cursor("dbpool_pgbouncer_cursor")
                named.execute("SELECT generate_series(1, 10)")
                assert len(named.fetchmany(4)) == 4
                named.close()


# -- session state crosses clients -------------------------------------------------------------


def test_plain_set_leaks_to_other_clients_and_set_local_does_not(
    bouncer_pool: PoolFactory, clean_pinned: None
) -> None:
    pool = bouncer_pool(PINNED, max_size=2)
    with pool.connection() as first, pool.connection() as second:
        with first.transaction() as tx:
            server = backend_pid(tx)
            tx.execute("SET statement_timeout = '4321ms'")  # session-wide, once committed
            tx.execute("SET LOCAL lock_timeout = '1234ms'")  # ends with the transaction
        with second.transaction() as tx:
            assert backend_pid(tx) == server
            assert show(tx, "statement_timeout") == "4321ms"  # another client's SET
            assert show(tx, "lock_timeout") == "0"
    # Returning the connections to dbpool did not undo it either: dbpool resets its own
    # connection to PgBouncer, and cannot reach the server session behind it.
    with pool.transaction() as tx:
        assert show(tx, "statement_timeout") == "4321ms"


# -- autocommit leases -------------------------------------------------------------------------


def test_autocommit_lease_holds_no_server_between_statements(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory, table: str, direct: Any
) -> None:
    pool = bouncer_pool(PINNED, max_size=2, autocommit=True)
    with pool.connection() as conn:
        cursor = conn.cursor()
        cursor.execute(f"INSERT INTO {table} VALUES (0, 0, 1, pg_backend_pid())")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        # Committed already, and the only server connection is free for other clients
        # while this lease is still held.
        assert direct.execute(f"SELECT count(*) FROM {table}").fetchall() == [(1,)]
        wait_until(lambda: int(pgbouncer.pool(PINNED).get("sv_active", 1)) == 0, timeout=10)
        with pool.connection() as other:
            other.cursor().execute(f"INSERT INTO {table} VALUES (1, 0, 1, pg_backend_pid())")
        cursor.execute(f"SELECT count(*) FROM {table}")
        assert cursor.fetchall() == [(2,)]
    stats = pool.stats()
    assert stats.created == 2 and stats.discarded == 0


# -- validation pings --------------------------------------------------------------------------


def test_validation_ping_goes_to_pgbouncer(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory, direct: Any
) -> None:
    pool = bouncer_pool(PINNED, max_size=1)
    with pool.transaction() as tx:
        server = backend_pid(tx)
    # A server session killed behind PgBouncer while no client used it: PgBouncer opens
    # another one for the next transaction, and the dbpool connection never notices.
    direct.execute("SELECT pg_terminate_backend(%s)", (server,))
    wait_until(
        lambda: (
            not direct.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (server,)
            ).fetchall()
        ),
        timeout=10,
    )
    with pool.transaction() as tx:
        assert backend_pid(tx) != server
    assert pool.stats().discarded == 0

    # PgBouncer drops its client connections: the checkout ping (validate_after=0) finds the
    # dead one and the pool replaces it before the caller sees it.
    checked = bouncer_pool(PINNED, max_size=1, validate_after=0)
    with checked.transaction() as tx:
        tx.execute("SELECT 1")
    pgbouncer.command(f"KILL {PINNED}")
    try:
        wait_until(lambda: not pgbouncer.pool(PINNED).get("cl_active"), timeout=10)
    finally:
        pgbouncer.command(f"RESUME {PINNED}")
    with checked.transaction() as tx:
        assert tx.execute("SELECT 1").fetchall() == [(1,)]
    stats = checked.stats()
    assert stats.created == 2 and stats.discarded == 1


def test_validation_ping_waits_for_a_server_within_acquire_timeout(
    pgbouncer: PgBouncer, bouncer_pool: PoolFactory
) -> None:
    pool = bouncer_pool(PINNED, max_size=1, validate_after=0)
    with pool.transaction() as tx:
        tx.execute("SELECT 1")
    holder = bouncer_pool(PINNED, max_size=1)
    with holder.transaction() as busy:
        busy.execute("SELECT 1")  # the only server connection is taken until the block ends
        # The ping is a statement like any other: PgBouncer queues it until a server is free.
        started = monotonic()
        with pytest.raises(dbpool.PoolTimeout):
            pool.connection(timeout=0.5)
        assert monotonic() - started < QUERY_WAIT_TIMEOUT / 2  # not PgBouncer's own timeout
    with pool.transaction() as tx:
        assert tx.execute("SELECT 1").fetchall() == [(1,)]
