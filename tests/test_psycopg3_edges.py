"""Edge cases of the psycopg 3 dialect, as used through the pool, against the real PostgreSQL
server: what a transaction block, a session reset and the return path must leave for the
block's own work and for the next borrower.  Each docstring says what psycopg does that makes
the case hard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import dbpool
from tests.conftest import Caller, Connector, rows

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(30)]

try:
    import psycopg
except ImportError:  # the tests are skipped without a server anyway
    psycopg = None


def _since(version: str, feature: str, present: bool) -> pytest.MarkDecorator:
    """Skip on a psycopg without ``feature``, which came with ``version``."""
    return pytest.mark.skipif(
        psycopg is not None and not present, reason=f"psycopg before {version} has no {feature}"
    )


def _psycopg_version() -> tuple[int, ...]:
    return tuple(int(part) for part in psycopg.__version__.split(".")[:3] if part.isdigit())


# The notifications received while no notifies() runs, queued for the next one: without the
# queue they are dropped, and a notifies() generator has none to stop at.  (Its generator
# holds the connection's lock while suspended from 3.2, its timeout= too.)
NOTIFIES_QUEUED = _since(
    "3.2.4",
    "queue of notifications for notifies()",
    psycopg is not None and _psycopg_version() >= (3, 2, 4),
)

TABLE = "dbpool_pg3_edges"


def new_pool(connect: Any, **options: Any) -> dbpool.Pool[Any]:
    settings: dict[str, Any] = {"min_size": 0, "max_size": 1, "acquire_timeout": 5}
    settings.update(options)
    return dbpool.Pool(connect, **settings)


@pytest.fixture
def table(pg_connect: Connector) -> Iterator[Any]:
    """An empty table ``TABLE (x int)``, and an autocommit connection to read it with."""
    admin = pg_connect()
    admin.autocommit = True
    admin.execute("SET lock_timeout = '5s'")
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
    admin.execute(f"CREATE TABLE {TABLE} (x int)")
    yield admin
    pg_connect.close_all()  # first: a transaction left open would hold up the DROP
    admin = pg_connect()
    admin.autocommit = True
    admin.execute(f"DROP TABLE IF EXISTS {TABLE}")
    admin.close()


def count(admin: Any) -> int:
    return int(admin.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])


def connect_with(pg_connect: Connector, **attributes: Any) -> Any:
    """A connect callable whose connections have these attributes set."""

    def connect() -> Any:
        conn = pg_connect()
        for name, value in attributes.items():
            setattr(conn, name, value)
        return conn

    return connect


# -- transaction blocks ------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [None, 10.0])
def test_psycopg_transaction_inside_a_block_nests_and_rolls_back_with_it(
    pg_connect: Connector, table: Any, timeout: float | None
) -> None:
    """psycopg's own ``conn.transaction()`` is a savepoint when a transaction is open, and
    BEGIN ... COMMIT when psycopg sees none.  Code written for psycopg uses it inside a pool
    block (``tx.connection.raw`` handed to a helper): it must nest in the block, so that the
    block rolling back undoes its work, with a deadline or without one."""
    pool = new_pool(pg_connect)
    try:
        with pytest.raises(LookupError), pool.transaction(timeout=timeout) as tx:
            raw = tx.connection.raw
            with raw.transaction():
                raw.execute(f"INSERT INTO {TABLE} VALUES (1)")
            raise LookupError("the block fails after the helper's work")
        assert count(table) == 0, "the block's work was committed half-way"
    finally:
        pool.close()


@_since(
    "3.2",
    "set_autocommit()",
    hasattr(psycopg, "Connection") and hasattr(psycopg.Connection, "set_autocommit"),
)
def test_psycopg_set_autocommit_inside_a_block_is_refused(
    pg_connect: Connector, table: Any
) -> None:
    """Setting ``autocommit`` through the lease inside a block is refused; psycopg's
    ``set_autocommit()`` method must not get around that, or the block's statements commit
    one by one and its rollback undoes nothing."""
    pool = new_pool(pg_connect)
    try:
        with pytest.raises(LookupError), pool.transaction() as tx:
            try:
                tx.connection.set_autocommit(True)
            except (dbpool.PoolError, tx.connection.raw.ProgrammingError):
                pass  # refused: the block stays one transaction
            tx.execute(f"INSERT INTO {TABLE} VALUES (1)")
            raise LookupError("the block fails")
        assert count(table) == 0, "the block's statement was committed on its own"
        with pool.connection() as conn:
            assert conn.raw.autocommit is False  # as the connection was made
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("attribute", "setting", "expected"),
    [
        ("read_only", "transaction_read_only", "on"),
        ("isolation_level", "transaction_isolation", "serializable"),
    ],
)
@pytest.mark.parametrize("autocommit", [True, False])
def test_block_runs_with_the_connection_transaction_characteristics(
    pg_connect: Connector, attribute: str, setting: str, expected: str, autocommit: bool
) -> None:
    """psycopg's ``read_only`` and ``isolation_level`` are the characteristics of the
    transactions started on the connection, its own ``conn.transaction()`` included in
    autocommit mode: a pool block that asks for none of its own runs with them, autocommit on
    or off."""
    import psycopg

    value = {"read_only": True, "isolation_level": psycopg.IsolationLevel.SERIALIZABLE}
    pool = new_pool(
        connect_with(pg_connect, autocommit=autocommit, **{attribute: value[attribute]})
    )
    try:
        with pool.transaction() as tx:
            assert rows(tx, f"SHOW {setting}") == [(expected,)]
    finally:
        pool.close()


# -- what the next borrower gets ---------------------------------------------------------------


@NOTIFIES_QUEUED
def test_discard_reset_hides_queued_notifications_from_the_next_borrower(
    pg_connect: Connector,
) -> None:
    """psycopg (3.2 and later) queues the notifications that arrive while nobody iterates
    ``conn.notifies()``, on the connection, and hands them to the next ``notifies()`` call.
    DISCARD ALL (UNLISTEN *) does not reach that queue: with session_reset="discard" it is
    emptied, or the next borrower reads the previous one's messages."""
    pool = new_pool(pg_connect, session_reset="discard")
    try:
        with pool.connection() as conn:
            conn.execute("LISTEN dbpool_pg3_edges_chan")
            conn.commit()
            conn.execute("NOTIFY dbpool_pg3_edges_chan, 'tenant A payload'")
            conn.commit()  # delivered to this session as the commit returns
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first  # reused: the reset ran, no reconnect
            leftover = [n.payload for n in conn.notifies(timeout=0)]
        assert leftover == [], f"the next borrower reads {leftover!r}"
    finally:
        pool.close()


def test_two_phase_transaction_left_open_is_rolled_back_not_discarded(
    pg_connect: Connector, table: Any
) -> None:
    """psycopg's rollback() refuses a two-phase transaction ("rollback() cannot be used during
    a two-phase transaction"): a lease returned inside one is ended with tpc_rollback(), its
    work undone, rather than failing its reset and costing a reconnect."""
    pool = new_pool(pg_connect)
    try:
        with pool.connection() as conn:
            conn.tpc_begin(conn.xid(1, "dbpool-pg3-edges", "branch"))
            conn.execute(f"INSERT INTO {TABLE} VALUES (1)")
            first = conn.raw
        with pool.connection() as conn:
            conn.execute(f"INSERT INTO {TABLE} VALUES (2)")
            conn.commit()  # psycopg no longer believes it is in a two-phase transaction
            again = conn.raw
        assert again is first
        assert pool.stats().discards["reset_failed"] == 0
        assert [r for (r,) in table.execute(f"SELECT x FROM {TABLE}")] == [2]
    finally:
        pool.close()


def test_connection_returned_in_pipeline_mode_is_not_handed_out(pg_connect: Connector) -> None:
    """A pipeline entered on the lease and not left (``conn.pipeline().__enter__()``) keeps the
    connection in pipeline mode with nothing pending: its transaction status says IDLE.  The
    Pipeline object, the only way out of that mode, is the borrower's: the connection is
    discarded, or the next borrower gets one where COPY fails and results come late."""
    pool = new_pool(pg_connect)
    try:
        with pool.connection() as conn:
            pipeline = conn.pipeline()  # kept: a context manager collected would leave it
            pipeline.__enter__()
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is not first
            assert conn.raw.pgconn.pipeline_status == 0
            with conn.cursor().copy("COPY (SELECT 1) TO STDOUT") as copy:
                assert [bytes(block) for block in copy] == [b"1\n"]
        assert pool.stats().discarded == 1
    finally:
        pool.close()


def test_cursor_of_conn_execute_does_not_reach_the_next_borrower(pg_connect: Connector) -> None:
    """``conn.execute()`` through the lease returns psycopg's own cursor, not one of the
    lease's: kept after the lease, it would run its statements in the next borrower's session
    (here: into its transaction).  The return closes it; the connection is kept."""
    pool = new_pool(pg_connect)
    try:
        with pool.connection() as conn:
            stale = conn.execute("SELECT 1")
            assert stale.fetchall() == [(1,)]
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first
            conn.execute("SELECT 1")  # the next borrower's transaction
            with pytest.raises(psycopg.InterfaceError, match="closed"):
                stale.execute("SET LOCAL statement_timeout = 1")
            assert rows(conn, "SELECT current_setting('statement_timeout')") == [("0",)]
        assert pool.stats().closed == 0
    finally:
        pool.close()


def test_connection_that_prepares_every_statement_takes_the_pools_own(
    pg_connect: Connector,
) -> None:
    """With ``prepare_threshold=0`` psycopg prepares every statement, and PostgreSQL refuses
    to prepare a query of several statements: the pool's own (a deadline's limits, the
    BEGIN, the ping, the session reset) are run unprepared, and none is left prepared on the
    session."""

    def configure(raw: Any) -> None:
        raw.prepare_threshold = 0

    pool = new_pool(pg_connect, configure=configure, validate_after=0, session_reset="discard")
    try:
        with pool.transaction(timeout=5, isolation="SERIALIZABLE") as tx:
            assert rows(tx, "SELECT current_setting('statement_timeout')") == [("5s",)]
            with tx.savepoint():
                rows(tx, "SELECT 1")
        assert pool.run_transaction(lambda tx: rows(tx, "SELECT 2"), timeout=5) == [(2,)]
        with pool.connection() as conn:
            with conn.transaction(timeout=5):
                rows(conn, "SET LOCAL statement_timeout = 1000")
                assert rows(conn, "SELECT 3") == [(3,)]
            conn.raw.prepare_threshold = None  # the check below, unprepared
            prepared = rows(conn, "SELECT statement FROM pg_prepared_statements")
            borrowers = {"SET LOCAL statement_timeout = 1000", "SELECT 3"}
            assert {text for (text,) in prepared} <= borrowers
        assert pool.stats().closed == 0
    finally:
        pool.close()


@pytest.mark.parametrize("reached", ["conn.raw", "a cursor's connection"])
def test_driver_transaction_block_left_suspended_is_not_handed_out(
    pg_connect: Connector, reached: str
) -> None:
    """psycopg's own ``transaction()`` block of the driver's connection (``conn.raw``, or the
    ``connection`` of the cursor ``conn.execute()`` returns), suspended in a generator the
    borrower keeps after SQL committed its transaction: libpq says IDLE, nothing to roll
    back, but psycopg counts the block as open and refuses the next borrower's ``commit()``
    until it exits.  The connection is discarded instead."""
    pool = new_pool(pg_connect)
    kept = []
    try:
        with pool.connection() as conn:
            via_cursor = reached != "conn.raw"
            driver = conn.execute("SELECT 1").connection if via_cursor else conn.raw

            def work() -> Iterator[None]:
                with driver.transaction():
                    driver.execute("COMMIT")
                    yield

            kept.append(work())
            next(kept[0])
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is not first
            conn.execute("SELECT 1")
            conn.commit()
        assert pool.stats().discards["reset_failed"] == 1
    finally:
        pool.close()


def test_handlers_a_borrower_adds_do_not_outlive_its_lease(pg_connect: Connector) -> None:
    """psycopg calls every notice and notify handler ever added to a connection: one a
    borrower adds (through the lease or ``conn.raw``) is removed on return, so that the next
    borrower's messages do not reach it and handlers do not pile up; those that configure
    added stay."""
    kept: list[str] = []

    def configure(raw: Any) -> None:
        raw.add_notice_handler(lambda diag: kept.append(diag.message_primary))

    pool = new_pool(pg_connect, configure=configure)
    seen_by_first: list[str] = []
    try:
        with pool.connection() as conn:
            conn.add_notice_handler(lambda diag: seen_by_first.append(diag.message_primary))
            conn.raw.add_notify_handler(lambda notify: seen_by_first.append(notify.payload))
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first  # reused
            conn.execute("DO $$ BEGIN RAISE NOTICE 'second borrower'; END $$")
            conn.execute("LISTEN dbpool_pg3_edges_chan")
            conn.execute("NOTIFY dbpool_pg3_edges_chan, 'second borrower'")
            conn.commit()
            conn.execute("UNLISTEN *")
            conn.commit()
        assert seen_by_first == []
        assert kept == ["second borrower"]
        assert pool.stats().closed == 0  # nothing discarded: the handlers went on return
    finally:
        pool.close()


def test_a_handler_a_borrower_put_in_place_of_configures_does_not_outlive_its_lease(
    pg_connect: Connector,
) -> None:
    """A borrower that removes configure's notice handler and adds its own leaves the
    connection with as many handlers as it had: its own goes on return all the same, and
    configure's is back, for the next borrower's notices."""
    kept: list[str] = []

    def log_notice(diag: Any) -> None:
        kept.append(diag.message_primary)

    pool = new_pool(pg_connect, configure=lambda raw: raw.add_notice_handler(log_notice))
    seen_by_first: list[str] = []
    try:
        with pool.connection() as conn:
            conn.raw.remove_notice_handler(log_notice)
            conn.raw.add_notice_handler(lambda diag: seen_by_first.append(diag.message_primary))
            first = conn.raw
        with pool.connection() as conn:
            assert conn.raw is first  # reused
            conn.execute("DO $$ BEGIN RAISE NOTICE 'second borrower'; END $$")
            conn.commit()
        assert seen_by_first == []
        assert kept == ["second borrower"]
        assert pool.stats().closed == 0
    finally:
        pool.close()


# -- A cursor.stream() left part-read --------------------------------------------------------------

# psycopg 3: a ``cursor.stream()`` left part-read, its iterator still referenced, when the pool
# itself has to talk to the connection.
#
# psycopg's ``stream()`` is a generator that holds the connection's lock (a plain, non-reentrant
# ``threading.Lock``) from its first row until it is exhausted or closed.  Whatever then takes that
# lock in the same thread waits forever: closing a server-side cursor, ``commit()``,
# ``rollback()``, a savepoint statement.  The pool sends those on its own (the return path closes
# the cursors a lease left open; a transaction block's end commits or rolls back; a savepoint's
# end releases or rolls back to it), so none of them may wait for the lock while a result is
# still being read: the return discards such a connection as busy, and a block's end fails with
# psycopg's error, as it does when the lock is free.

ROWS = "SELECT generate_series(1, 100)"


@pytest.fixture
def pool(pg_connect: Connector) -> Iterator[dbpool.Pool[Any]]:
    pool: dbpool.Pool[Any] = dbpool.Pool(pg_connect, min_size=0, max_size=1, acquire_timeout=5)
    yield pool
    pool.close(timeout=1)


def works(pool: dbpool.Pool[Any]) -> None:
    with pool.connection() as conn:
        assert conn.cursor().execute("SELECT 42").fetchone() == (42,)


def test_lease_returned_with_a_stream_part_read_and_a_named_cursor_open(
    pool: dbpool.Pool[Any],
) -> None:
    """The return path sends no CLOSE for the named cursor: the connection is discarded as
    busy, which ends the cursor with it."""
    kept: list[Any] = []

    def borrow() -> None:
        with pool.connection() as conn:
            named = conn.cursor(name="dbpool_mix")
            named.execute(ROWS)
            assert len(named.fetchmany(5)) == 5
            stream = conn.cursor().stream(ROWS)
            assert next(stream) == (1,)
            kept.append(stream)  # still referenced as the lease goes back

    assert Caller(borrow).outcome() is None
    assert pool.stats().discards["reset_failed"] == 1
    works(pool)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_transaction_block_ends_with_a_stream_part_read(
    table: Any, pool: dbpool.Pool[Any], timeout: float | None
) -> None:
    """Neither COMMIT nor ROLLBACK can be sent while the stream holds the connection: the
    block's end reads it to its end (a cancel would abort the transaction), then commits, and
    the connection stays in the pool; the stream, read on, says so."""
    kept: list[Any] = []

    def block() -> None:
        with pool.transaction(timeout=timeout) as tx:
            tx.execute(f"INSERT INTO {TABLE} VALUES (1)")
            stream = tx.cursor().stream(ROWS)
            assert next(stream) == (1,)
            kept.append(stream)

    assert Caller(block).outcome() is None
    assert count(table) == 1
    with pytest.raises(dbpool.PoolError, match="cut short by COMMIT"):  # not as if all read
        list(kept[0])
    assert pool.stats().discards["reset_failed"] == 0
    works(pool)


@pytest.mark.parametrize("fails", [False, True], ids=["released", "rolled-back-to"])
def test_savepoint_ends_with_a_stream_part_read(
    table: Any, pool: dbpool.Pool[Any], fails: bool
) -> None:
    """Neither RELEASE SAVEPOINT nor ROLLBACK TO can be sent while the stream holds the
    connection: as at the block's end, the savepoint's end reads the stream to its end before
    RELEASE (closes it, cancelling its statement, before ROLLBACK TO), and the transaction
    goes on and commits; the stream, read on, says so."""
    kept: list[Any] = []

    def block() -> None:
        with pool.transaction() as tx:
            tx.execute(f"INSERT INTO {TABLE} VALUES (1)")
            try:
                with tx.savepoint():
                    tx.execute(f"INSERT INTO {TABLE} VALUES (2)")
                    stream = tx.cursor().stream(ROWS)
                    assert next(stream) == (1,)
                    kept.append(stream)
                    if fails:
                        raise LookupError
            except LookupError:
                pass
            tx.execute(f"INSERT INTO {TABLE} VALUES (3)")

    assert Caller(block).outcome() is None
    assert count(table) == (2 if fails else 3)
    how = "ROLLBACK" if fails else "COMMIT"
    with pytest.raises(dbpool.PoolError, match=f"cut short by {how}"):  # not as if all read
        list(kept[0])
    assert pool.stats().discards["reset_failed"] == 0
    works(pool)


@NOTIFIES_QUEUED
def test_lease_returned_with_a_notifies_generator_suspended(pg_connect: Connector) -> None:
    """psycopg's ``conn.notifies()`` generator holds the connection's lock (not reentrant)
    while it is suspended at a notification: left so as the lease goes back, every later call
    on the connection waits for it, the next borrower's included, for as long as the
    generator is referenced.  The return path closes it."""
    pool = new_pool(connect_with(pg_connect, autocommit=True))
    kept: list[Any] = []
    try:
        with pool.connection() as conn:
            conn.execute("LISTEN dbpool_pg3_edges_chan")
            conn.execute("NOTIFY dbpool_pg3_edges_chan, 'one'")
            notifications = conn.notifies(timeout=5)
            assert next(notifications).payload == "one"
            kept.append(notifications)  # still referenced as the lease goes back
            first = conn.raw

        def next_borrower() -> None:
            with pool.connection(timeout=5) as conn:
                assert conn.raw is first  # reused: nothing needed discarding
                conn.execute("SELECT 1")

        assert Caller(next_borrower).outcome(timeout=10) is None
        with pytest.raises(StopIteration):  # over for the previous borrower
            next(kept[0])
    finally:
        pool.close()


# -- the connection's cursor factory ----------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param("RawCursor", marks=_since("3.2", "RawCursor", hasattr(psycopg, "RawCursor"))),
        "ClientCursor",
    ],
)
def test_timed_block_on_a_connection_whose_cursors_take_other_placeholders(
    pg_connect: Connector, table: Any, factory: str
) -> None:
    """A connection made with ``cursor_factory=psycopg.RawCursor`` runs its statements with
    PostgreSQL's own ``$1`` placeholders, which it does not translate from ``%s``: the
    statement that sets a block's server-side limits must not take its values through the
    connection's cursors (nor the one that narrows its lock wait limit before COMMIT), or every
    block with a timeout fails.  Its limits still hold."""
    cursor_factory = getattr(psycopg, factory)
    marker = "$1" if factory == "RawCursor" else "%s"
    pool = new_pool(connect_with(pg_connect, cursor_factory=cursor_factory))
    try:
        with pool.transaction(timeout=30) as tx:
            tx.execute(f"INSERT INTO {TABLE} VALUES ({marker})", (1,))
            (limit,) = tx.execute("SHOW statement_timeout").fetchone()
            # COMMIT then comes long enough after BEGIN for its lock wait limit to be narrowed
            tx.execute("SELECT pg_sleep(0.02)")
        assert count(table) == 1
        assert limit.endswith("s") and limit != "0", limit  # set for the block alone
        with pool.connection() as conn:
            assert conn.raw.cursor_factory is cursor_factory
            assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
    finally:
        pool.close()


@NOTIFIES_QUEUED
@pytest.mark.parametrize("named_cursor", [False, True])
def test_lease_returned_with_a_notifies_generator_of_the_driver_connection_suspended(
    pg_connect: Connector, named_cursor: bool
) -> None:
    """A ``conn.raw.notifies()`` generator, taken from the driver's connection where the
    return path cannot close it, holds the connection's lock while it is suspended: the
    connection comes back idle, but every call on it waits for that lock, the return path's
    own (a server-side cursor's CLOSE) and the next borrower's included.  It is discarded
    as busy, with nothing sent."""
    pool = new_pool(connect_with(pg_connect, autocommit=True))
    kept: list[Any] = []
    try:

        def borrow() -> None:
            with pool.connection() as conn:
                if named_cursor:
                    cursor = conn.cursor(name="dbpool_pg3_notifies", withhold=True)
                    cursor.execute(ROWS)
                    assert cursor.fetchone() == (1,)
                raw = conn.raw
                raw.execute("LISTEN dbpool_pg3_edges_chan")
                raw.execute("NOTIFY dbpool_pg3_edges_chan, 'one'")
                notifications = raw.notifies(timeout=5)
                assert next(notifications).payload == "one"
                kept.append(notifications)  # still referenced as the lease goes back

        assert Caller(borrow).outcome(timeout=10) is None

        def next_borrower() -> None:
            works(pool)

        assert Caller(next_borrower).outcome(timeout=10) is None
        assert pool.stats().discards["reset_failed"] == 1
    finally:
        pool.close(timeout=1)


@NOTIFIES_QUEUED
def test_block_on_a_lease_whose_driver_connection_has_a_notifies_generator_suspended(
    pg_connect: Connector,
) -> None:
    """A transaction block started on a lease while a ``conn.raw.notifies()`` generator is
    suspended would wait for the connection's lock at its first statement, forever: it is
    refused at once, as on a connection with a result still being read."""
    pool = new_pool(connect_with(pg_connect, autocommit=True))
    kept: list[Any] = []
    try:

        def block() -> None:
            with pool.connection() as conn:
                raw = conn.raw
                raw.execute("LISTEN dbpool_pg3_edges_chan")
                raw.execute("NOTIFY dbpool_pg3_edges_chan, 'one'")
                notifications = raw.notifies(timeout=5)
                assert next(notifications).payload == "one"
                kept.append(notifications)
                with conn.transaction() as tx:
                    tx.execute("SELECT 1")

        outcome = Caller(block).outcome(timeout=10)
        assert isinstance(outcome, dbpool.PoolError), outcome
        assert "statement running" in str(outcome)
        works(pool)
    finally:
        pool.close(timeout=1)


@pytest.mark.parametrize("fails", [False, True])
def test_block_ends_with_a_copy_not_left(table: Any, pool: dbpool.Pool[Any], fails: bool) -> None:
    """A ``cursor.copy()`` block entered and not left holds psycopg's connection lock: a
    transaction block on the lease that ends meanwhile commits nothing, says that the copy
    was still under way, and the lease refuses further use (its next statement would wait
    for the lock forever); the connection is discarded on return."""
    kept: list[Any] = []
    seen: list[BaseException] = []

    def block() -> None:
        with pool.connection() as conn:
            try:
                with conn.transaction() as tx:
                    manager = tx.cursor().copy(f"COPY {TABLE} FROM STDIN")
                    manager.__enter__().write_row((1,))
                    kept.append(manager)
                    if fails:
                        raise LookupError("the block fails")
            except (dbpool.ConnectionUnusable, LookupError) as exc:
                seen.append(exc)
            with pytest.raises(dbpool.ConnectionUnusable):
                conn.execute("SELECT 1")

    assert Caller(block).outcome() is None
    if fails:
        assert isinstance(seen[0], LookupError)
    else:
        assert "still under way" in str(seen[0]), seen
    assert count(table) == 0
    assert pool.stats().discards["reset_failed"] == 1
    works(pool)
    for manager in kept:  # ended here: collected, psycopg 3.1 reports its closed connection
        try:
            manager.__exit__(None, None, None)
        except psycopg.OperationalError:
            pass
