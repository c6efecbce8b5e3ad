"""A timed PostgreSQL block's first statement belongs to the block, on every path dbpool takes.

The deadline's statement_timeout, lock_timeout and idle_in_transaction_session_timeout used to
be set by a ``SELECT set_config(...)`` as the transaction's first statement.  A SELECT takes
a snapshot: in a REPEATABLE READ or SERIALIZABLE transaction that fixed the snapshot before
the block's own first statement, so ``SET TRANSACTION ISOLATION LEVEL`` / ``SET TRANSACTION
SNAPSHOT`` there were refused ("must be called before any query"), and a ``LOCK TABLE`` meant
to wait before the snapshot (PostgreSQL's documented way to read after another session's
work) read from a snapshot taken before its wait.  The limits are now read with SHOW (or a
SELECT of psycopg2's own before BEGIN) and set with SET LOCAL, which take no snapshot.

Each test runs for psycopg 3 and psycopg2, in a ``pool.transaction()`` block and in
``pool.run_transaction()``, on every way a connection can come to the block: psycopg2 sends
BEGIN itself (the limits read before it), or dbpool sends BEGIN as SQL on an autocommit
connection (the limits read with SHOW after it); psycopg 3 likewise, and inside the caller's
``conn.pipeline()``, where each SHOW and SET LOCAL is a query of its own.  The deadline still
only tightens the session's limits, and leaves them as they were once the block is over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import CONNECT_TIMEOUT, Caller, Connector, rows, unavailable, wait_until

pytestmark = [pytest.mark.timeout(20), pytest.mark.postgresql]

LIMITS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
LIMITS_SQL = "select " + ", ".join(f"current_setting('{name}')" for name in LIMITS)

HOWS = ["transaction", "run_transaction"]

# How the pool's connections come to a block (set by the configure hook, so every return puts
# them back): "plain" leaves BEGIN to the driver; "autocommit" has dbpool send BEGIN as SQL
# (psycopg) or turn autocommit off for the block (psycopg2); "autocommit+isolation" has an
# isolation level of the connection's own, kept in the session in autocommit mode, so that
# dbpool sends BEGIN as SQL with both drivers and reads the limits with SHOW inside it.
MODES = [
    pytest.param("psycopg", "plain", id="psycopg-plain"),
    pytest.param("psycopg", "autocommit", id="psycopg-autocommit"),
    pytest.param("psycopg", "autocommit+isolation", id="psycopg-autocommit+isolation"),
    pytest.param("psycopg2", "plain", id="psycopg2-plain"),
    pytest.param("psycopg2", "autocommit", id="psycopg2-autocommit"),
    pytest.param("psycopg2", "autocommit+isolation", id="psycopg2-autocommit+isolation"),
]


# -- connections and pools ---------------------------------------------------------------------


@pytest.fixture
def connectors(postgresql_dsn: str) -> Iterator[Callable[..., Connector]]:
    """``make(driver, options="")``: a connect callable for psycopg or psycopg2, whose sessions
    start with the server options ``options`` (``-c name=value``); every connection it made is
    closed at the end of the test."""
    made: list[Connector] = []

    def make(driver: str, options: str = "") -> Connector:
        extra: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": "pg_snapshot_first",
        }
        if options:
            extra["options"] = options
        if driver == "psycopg":
            import psycopg

            connector = Connector(lambda: psycopg.connect(postgresql_dsn, **extra))
        else:
            try:
                import psycopg2
            except ImportError as exc:
                unavailable(f"psycopg2 is not installed: {exc}")
            connector = Connector(lambda: psycopg2.connect(postgresql_dsn, **extra))
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close_all()


def configure_for(mode: str, sets: dict[str, str] | None = None) -> Callable[[Any], None]:
    """The configure hook of a pool whose connections come to blocks in ``mode``, after the
    session ran ``SET name = value`` for each of ``sets``."""

    def configure(raw: Any) -> None:
        for name, value in (sets or {}).items():
            rows(raw, f"set {name} = '{value}'")
        raw.commit()
        if mode != "plain":
            raw.autocommit = True
        if mode == "autocommit+isolation":
            if hasattr(raw, "set_session"):  # psycopg2: SET default_transaction_isolation
                raw.set_session(isolation_level="REPEATABLE READ")
            else:
                import psycopg

                raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ

    return configure


def new_pool(connect: Callable[[], Any], mode: str, **options: Any) -> dbpool.Pool[Any]:
    """One connection: every block and lease of a test is on the same server session."""
    configure = options.pop("configure", None) or configure_for(mode)
    return dbpool.Pool(
        connect, min_size=0, max_size=1, acquire_timeout=5, configure=configure, **options
    )


def run_block(pool: dbpool.Pool[Any], how: str, fn: Callable[[Any], Any], **options: Any) -> Any:
    """``fn(tx)`` in a ``pool.transaction()`` block or through ``pool.run_transaction()``
    (never retried: a failure shows as it happened)."""
    if how == "transaction":
        with pool.transaction(**options) as tx:
            return fn(tx)
    return pool.run_transaction(fn, retries=0, **options)


def backend_pid(raw: Any) -> int:
    info = getattr(raw, "info", None)
    pid: int = info.backend_pid if info is not None else raw.get_backend_pid()
    return pid


def session_limits(pool: dbpool.Pool[Any]) -> tuple[tuple[Any, ...], int]:
    """The limits the pool's connection has outside any block, and its server process."""
    with pool.connection() as conn:
        [limits] = rows(conn, LIMITS_SQL)
        return limits, backend_pid(conn.raw)


def shown_ms(shown: str) -> int:
    """A time limit as SHOW writes it (``0``, ``300ms``, ``5s``, ``10min``), in ms."""
    for unit, factor in (("ms", 1), ("s", 1000), ("min", 60_000), ("h", 3_600_000)):
        if shown.endswith(unit) and shown[: -len(unit)].isdigit():
            return int(shown[: -len(unit)]) * factor
    return int(shown)


def assert_deadline_limits(limits: tuple[Any, ...], timeout: float) -> None:
    """Every limit in force is the deadline's (the session's are all looser: none)."""
    assert all(0 < shown_ms(value) <= timeout * 1000 for value in limits), limits


@pytest.fixture
def table(pg_connect: Connector) -> Iterator[str]:
    """A table ``(id int primary key, v int)`` holding ``(1, 0)``; dropped after the test.
    Named after this process: a CI run may share the server."""
    name = f"snapshot_first_{os.getpid()}"
    admin = pg_connect()
    admin.autocommit = True
    rows(admin, "set lock_timeout = '5s'")
    rows(admin, f"drop table if exists {name}")
    rows(admin, f"create table {name} (id int primary key, v int)")
    rows(admin, f"insert into {name} values (1, 0)")
    try:
        yield name
    finally:
        rows(admin, f"drop table if exists {name}")
        admin.close()


# -- (a) SET TRANSACTION ISOLATION LEVEL as the first statement ---------------------------------


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("driver", "mode"), MODES)
def test_set_transaction_isolation_level_first_in_a_timed_block(
    connectors: Callable[..., Connector], driver: str, mode: str, how: str
) -> None:
    """PostgreSQL takes SET TRANSACTION ISOLATION LEVEL only before the transaction's first
    query: with the old SELECT set_config() before it, the block's own SET was refused
    ("must be called before any query").  It now works, and the deadline's limits are still
    in force."""

    def fn(tx: Any) -> tuple[str, tuple[Any, ...]]:
        rows(tx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        [(level,)] = rows(tx, "show transaction_isolation")
        [limits] = rows(tx, LIMITS_SQL)
        return level, limits

    with new_pool(connectors(driver), mode) as pool:
        level, limits = run_block(pool, how, fn, timeout=5)
        assert pool.stats().discarded == 0
    assert level == "serializable"
    assert_deadline_limits(limits, 5)


# -- (b) SET TRANSACTION SNAPSHOT as the first statement ----------------------------------------


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("driver", "mode"), MODES)
def test_set_transaction_snapshot_first_reads_exactly_that_snapshot(
    connectors: Callable[..., Connector],
    pg_connect: Connector,
    table: str,
    driver: str,
    mode: str,
    how: str,
) -> None:
    """SET TRANSACTION SNAPSHOT, too, must come before any query.  The timed REPEATABLE READ
    block imports a snapshot another session exported, and reads exactly its data: not the
    row a third session committed after the export, which a block without the import sees."""
    exporter = pg_connect()
    writer = pg_connect()
    writer.autocommit = True
    rows(exporter, "begin isolation level repeatable read")
    [(snapshot,)] = rows(exporter, "select pg_export_snapshot()")
    rows(writer, f"insert into {table} values (2, 0)")  # committed after the export

    def fn(tx: Any) -> tuple[list[tuple[Any, ...]], tuple[Any, ...]]:
        rows(tx, f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        seen = rows(tx, f"select id from {table} order by id")
        [limits] = rows(tx, LIMITS_SQL)
        return seen, limits

    def now_visible(tx: Any) -> list[tuple[Any, ...]]:
        return rows(tx, f"select id from {table} order by id")

    with new_pool(connectors(driver), mode) as pool:
        seen, limits = run_block(pool, how, fn, isolation="REPEATABLE READ", timeout=5)
        # the premise: the row is there for a block that takes a snapshot of its own
        latest = run_block(pool, how, now_visible, isolation="REPEATABLE READ", timeout=5)
        assert pool.stats().discarded == 0
    assert seen == [(1,)]
    assert latest == [(1,), (2,)]
    assert_deadline_limits(limits, 5)


# -- (c) LOCK TABLE before the snapshot ----------------------------------------------------------


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("driver", "mode"), MODES)
def test_lock_table_first_waits_before_the_snapshot(
    connectors: Callable[..., Connector],
    pg_connect: Connector,
    table: str,
    driver: str,
    mode: str,
    how: str,
    isolation: str,
) -> None:
    """PostgreSQL's way to read after another session's work under snapshot isolation: LOCK
    TABLE as the first statement, whose wait comes before the snapshot.  A holder locks the
    table and updates the row; it commits only once pg_locks shows the block's LOCK waiting
    (no sleep: the order is certain).  The block's SELECT must see the update; with the old
    SELECT set_config() first, its snapshot predated the wait, and it read v = 0."""
    holder = pg_connect()
    watcher = pg_connect()
    watcher.autocommit = True
    rows(holder, f"lock table {table} in exclusive mode")
    rows(holder, f"update {table} set v = 1 where id = 1")

    with new_pool(connectors(driver), mode) as pool:
        _, backend = session_limits(pool)  # the block's session (max_size 1)

        def commit_once_waited_on() -> None:
            try:
                wait_until(
                    lambda: rows(
                        watcher,
                        "select 1 from pg_locks where pid = %s and relation = %s::regclass"
                        " and not granted",
                        (backend, table),
                    ),
                    timeout=4,
                    message="the block never waited for the table's lock",
                )
                holder.commit()
            finally:
                holder.rollback()  # (after a failed wait: lets the block go on)

        def fn(tx: Any) -> tuple[list[tuple[Any, ...]], int, tuple[Any, ...]]:
            rows(tx, f"lock table {table} in exclusive mode")
            seen = rows(tx, f"select v from {table} where id = 1")
            [(pid,)] = rows(tx, "select pg_backend_pid()")
            [limits] = rows(tx, LIMITS_SQL)
            return seen, pid, limits

        committer = Caller(commit_once_waited_on, name="holder-commit")
        try:
            seen, pid, limits = run_block(pool, how, fn, isolation=isolation, timeout=5)
        finally:
            error = committer.outcome(timeout=6)
        assert error is None, error
        assert pool.stats().discarded == 0
    assert pid == backend
    assert seen == [(1,)]
    assert_deadline_limits(limits, 5)


# -- (d) the tighter of the session's limits and the deadline's ---------------------------------

# A deadline whose milliseconds have a fraction: the limit is 30001 ms, rounded up (the server
# must never stop a statement before the caller's deadline).  With the transaction module's
# clock stopped, the time left at BEGIN is exactly the timeout.
DEADLINE = 30.0003
DEADLINE_SHOWN = "30001ms"
# What the session had, as SHOW writes it: tighter than the deadline (stays in force), looser
# (replaced), none (replaced).  Tighter is 1.5 s, not less: it is also the session's
# idle_in_transaction_session_timeout, which a slow machine must not reach between two
# statements of a block.
SESSION_VALUES = {"tighter": "1500ms", "looser": "10min", "none": "0"}
KINDS = ("tighter", "looser", "none")


def session_for(rotation: int) -> dict[str, str]:
    """Each of the three limits gets a kind of its own; the three rotations give every limit
    every kind."""
    return {name: SESSION_VALUES[KINDS[(i + rotation) % 3]] for i, name in enumerate(LIMITS)}


def expected_inside(session: dict[str, str]) -> tuple[str, ...]:
    return tuple(
        value if value == SESSION_VALUES["tighter"] else DEADLINE_SHOWN
        for value in session.values()
    )


@pytest.fixture
def stopped_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transaction module's clock stopped: the deadline's limits are exactly its timeout
    (no time passes between the deadline's start and SET LOCAL).  The watchdog keeps its own
    clock, so a block that hangs is still cut off."""
    import time

    import dbpool.transaction

    now = time.monotonic()
    monkeypatch.setattr(dbpool.transaction, "monotonic", lambda: now)


@pytest.mark.usefixtures("stopped_clock")
@pytest.mark.parametrize("source", ["options", "set"])
@pytest.mark.parametrize("rotation", [0, 1, 2])
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(("driver", "mode"), MODES)
def test_the_session_keeps_its_tighter_limits_and_gets_them_back(
    connectors: Callable[..., Connector],
    driver: str,
    mode: str,
    how: str,
    rotation: int,
    source: str,
) -> None:
    """The rewrite of how the limits are read and set keeps the rule: a limit the session has
    (from the connect options, or a SET the session ran) tighter than the deadline stays in
    force in the block; a looser one, or none (0), is the deadline's milliseconds, rounded up.
    After the block, on the same session, all three are the session's own again (SET LOCAL
    ends with the transaction).  The block's first statement is SET TRANSACTION, which the
    reads of the limits must leave possible on every path."""
    session = session_for(rotation)
    if source == "options":
        options = " ".join(f"-c {name}={value}" for name, value in session.items())
        connect, configure = connectors(driver, options), configure_for(mode)
    else:
        connect, configure = connectors(driver), configure_for(mode, session)

    def fn(tx: Any) -> tuple[tuple[Any, ...], str, int]:
        rows(tx, "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        [limits] = rows(tx, LIMITS_SQL)
        [(level,)] = rows(tx, "show transaction_isolation")
        [(pid,)] = rows(tx, "select pg_backend_pid()")
        return limits, level, pid

    with new_pool(connect, mode, configure=configure) as pool:
        before, backend = session_limits(pool)
        inside, level, pid = run_block(pool, how, fn, timeout=DEADLINE)
        after, backend_after = session_limits(pool)
        assert pool.stats().discarded == 0
    assert before == tuple(session.values())
    assert inside == expected_inside(session)
    assert level == "serializable"
    assert after == before
    assert pid == backend == backend_after  # one session throughout: nothing was reset


@pytest.mark.usefixtures("stopped_clock")
@pytest.mark.parametrize("rotation", [0, 1, 2])
@pytest.mark.parametrize("mode", ["plain", "autocommit"])
def test_psycopg_block_inside_the_callers_pipeline(
    connectors: Callable[..., Connector], mode: str, rotation: int
) -> None:
    """A block on a lease inside the borrower's ``conn.pipeline()`` (psycopg 3), where a query
    holds one statement: each SHOW and SET LOCAL goes on its own, with the same outcome.  The
    session's limits here come from SETs the borrower ran on the lease before the block; they
    are in force again once the block is over, still in the pipeline and after it."""
    session = session_for(rotation)
    with new_pool(connectors("psycopg"), mode) as pool:
        with pool.connection() as conn:
            for name, value in session.items():
                conn.execute(f"set {name} = '{value}'")
            if mode == "plain":
                conn.commit()
            with conn.pipeline():
                with conn.transaction(timeout=DEADLINE) as tx:
                    in_pipeline = conn.raw.pgconn.pipeline_status != 0
                    tx.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                    # fetched at once: in pipeline mode a cursor has no description before
                    [inside] = [tuple(r) for r in tx.execute(LIMITS_SQL).fetchall()]
                    [(level,)] = tx.execute("show transaction_isolation").fetchall()
                [still_in_pipeline] = [tuple(r) for r in conn.execute(LIMITS_SQL).fetchall()]
            [after] = rows(conn, LIMITS_SQL)
            if mode == "plain":
                conn.rollback()
        assert pool.stats().discarded == 0
    assert in_pipeline
    assert inside == expected_inside(session)
    assert level == "serializable"
    assert still_in_pipeline == after == tuple(session.values())


@pytest.mark.parametrize("timeout", [None, 5])
def test_psycopg_autocommit_block_in_a_pipeline_commits(
    connectors: Callable[..., Connector],
    pg_connect: Connector,
    table: str,
    timeout: float | None,
) -> None:
    """With or without a deadline: a block on an autocommit psycopg connection, inside the
    borrower's ``conn.pipeline()``, that fetched a result, commits.  psycopg's conn.commit()
    sends COMMIT only if libpq's transaction status, known as of the last sync in pipeline
    mode, says a transaction is open: it said idle, and the pool's rollback at the lease's
    return dropped the block's write, with no error."""
    reader = pg_connect()
    reader.autocommit = True
    with new_pool(connectors("psycopg"), "autocommit") as pool:
        with pool.connection() as conn:
            with conn.pipeline():
                with conn.transaction(timeout=timeout) as tx:
                    tx.execute(f"insert into {table} values (2, 0)")
                    tx.execute("select 1").fetchall()
                committed = rows(reader, f"select id from {table} order by id")
        kept = rows(reader, f"select id from {table} order by id")
    assert committed == kept == [(1,), (2,)]


def test_rotations_give_every_limit_every_kind() -> None:
    """The rotations above cover the nine cases: each limit tighter, looser and absent."""
    cases = {(name, value) for r in range(3) for name, value in session_for(r).items()}
    assert cases == {(name, value) for name in LIMITS for value in SESSION_VALUES.values()}


@pytest.mark.parametrize("shown", ["0", "250ms", "2s", "1min", "3h", "1d"])
def test_every_unit_postgresql_shows_is_read(
    connectors: Callable[..., Connector], shown: str
) -> None:
    """SHOW writes a limit in its largest whole unit: each must be read as the session's
    limit, kept when tighter than the deadline, replaced when looser (or 0)."""
    from dbpool.dialects.psycopg import shown_ms

    deadline_ms = 90_000
    connect = connectors("psycopg", f"-c statement_timeout={shown}")
    with new_pool(connect, "plain") as pool:
        with pool.transaction(timeout=deadline_ms / 1000) as tx:
            [(inside,)] = rows(tx, "show statement_timeout")
    session_ms = shown_ms(shown)
    assert shown_ms(inside) == (session_ms if 0 < session_ms < deadline_ms else deadline_ms)
