"""Soak: many threads lease, transact and misbehave against PostgreSQL (psycopg 3) and MariaDB
(PyMySQL) while another thread kills their sessions and cancels their statements at random.

Workers mix plain leases (commit, leave a transaction open on purpose, raise inside the block,
change autocommit, isolation or read-only mode through the lease), transactions on the pool and
on a lease (random isolation, read-only mode and deadline, statements that outlive the deadline,
savepoints, exceptions) and ``run_transaction`` on a few contended rows.  The test proves, per
server:

* no slot is lost: ``size <= max_size`` and ``size == idle + in_use + opening`` all along;
  afterwards nothing is counted in use, the pool hands out ``max_size`` working connections at
  once, and once closed it leaves no session behind on the server;
* no connection is handed out inside a transaction or with a borrower's settings: every
  checkout reads the driver's local state, a sample of them also asks the server (an open
  transaction or read snapshot, a transaction-local marker, the session's timeouts, autocommit,
  isolation and read-only mode), and at the end every row written by work that was
  rolled back, abandoned or undone by a savepoint is absent while every row whose commit
  returned is present; the contended counters moved by exactly the committed increments;
* deadlines hold: a statement that would run a second past its transaction's deadline is
  stopped, and no transaction whose block ended past its deadline commits;
* callers see only errors they can expect: the driver's OperationalError, InterfaceError or
  InternalError (a killed session, a cancelled statement, a deadlock), TransactionTimeout,
  CommitOutcomeUnknown, ConnectionUnusable (a lease whose transaction could not be undone
  cleanly, say a KILL QUERY landing on the statement that restores a timeout), PoolTimeout,
  and their own exceptions.

``DBPOOL_SOAK_SECONDS`` (default 60) and ``DBPOOL_SOAK_THREADS`` (default 64) size the run; the
summary line is printed (``pytest -s`` shows it).  Marked ``slow``; CI runs it.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from time import monotonic
from typing import Any, Optional, Union

import pytest

import dbpool
from dbpool import (
    CommitOutcomeUnknown,
    ConnectionUnusable,
    Isolation,
    PoolTimeout,
    TransactionRolledBack,
    TransactionTimeout,
)
from tests.conftest import CONNECT_TIMEOUT, Connector, rows, wait_until

SECONDS = float(os.environ.get("DBPOOL_SOAK_SECONDS") or 60)
THREADS = int(os.environ.get("DBPOOL_SOAK_THREADS") or 64)

MAX_SIZE = 12
MIN_SIZE = 4
ACQUIRE_TIMEOUT = 5.0
JOIN = 60.0  # seconds: bound on the workers finishing their last operation after the stop
SETTLE = 30.0  # seconds: bound on the pool serving max_size leases once the chaos stopped
CHAOS_PAUSE = (0.1, 0.3)  # seconds between two strikes
CANCEL_SHARE = 0.25  # strikes that cancel the running statement instead of killing the session
SERVER_CHECK_SHARE = 0.3  # checkouts that also ask the server about the session's state
LONGEST_DEADLINE = 1.0  # seconds: transaction deadlines are drawn up to this
OUTLIVER = 2.0  # seconds a statement sleeps to outlive its transaction's deadline
HOT_KEYS = (1, 2, 3, 4)  # rows of the contended counters table
ISOLATIONS: list[Isolation | None] = [None, *Isolation]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS) + 180)]


class AppError(Exception):
    """Raised on purpose by a worker inside a block."""


Source = Union[dbpool.Connection[Any], dbpool.Transaction[Any]]
Params = Optional[tuple[Any, ...]]
Rows = list[tuple[Any, ...]]


# -- the servers ---------------------------------------------------------------------------


class Target:
    """One server as the soak sees it: connections for the pool (and a way to find their
    sessions), an admin connection of its own, and the checks that read a session's state."""

    name: str
    driver: Any
    sleep_sql: str
    text_type: str
    table_suffix = ""

    def __init__(self) -> None:
        self.connector = Connector(self._connect_for_pool)
        self.table = f"dbpool_soak_{self.name}_{os.getpid()}"
        self.hot = f"{self.table}_hot"
        self._admin: Any = None

    # connections
    def _connect_for_pool(self) -> Any:
        raise NotImplementedError

    def admin_connect(self) -> Any:
        """An autocommit connection that is not the pool's (so never a chaos victim)."""
        raise NotImplementedError

    def admin(self, sql: str, params: Params = None) -> Rows:
        if self._admin is None:
            self._admin = self.admin_connect()
        return rows(self._admin, sql, params)

    # chaos
    def sessions(self, admin: Any) -> list[int]:
        """The server ids of the pool's live sessions."""
        raise NotImplementedError

    def kill(self, admin: Any, session: int) -> None:
        raise NotImplementedError

    def cancel(self, admin: Any, session: int) -> None:
        raise NotImplementedError

    # what a borrower may find
    def lost(self, lease: dbpool.Connection[Any]) -> bool:
        """Whether the driver found the session gone (killed, or closed by a failed cancel)."""
        raise NotImplementedError

    def local_problem(self, lease: dbpool.Connection[Any]) -> str | None:
        """What is wrong with a lease's state as the driver knows it, without a round trip."""
        raise NotImplementedError

    def server_state(self, lease: dbpool.Connection[Any]) -> tuple[Any, ...]:
        """The session's state as the server reports it, to compare with a fresh session's.
        Leaves a transaction for the caller to roll back."""
        raise NotImplementedError

    def mark_transaction(self, lease: dbpool.Connection[Any]) -> None:
        """Set a marker that lives as long as the current transaction, where the server has
        one: a later borrower that sees it got the transaction."""

    def change_settings(self, lease: dbpool.Connection[Any], rng: random.Random) -> str:
        """Change a driver-level setting through the lease; returns "autocommit", "readonly"
        or "transactional" (statements open a transaction that may write)."""
        raise NotImplementedError

    # tables
    def create_tables(self) -> None:
        self.drop_tables()
        self.admin(
            f"create table {self.table} (id bigint primary key, v {self.text_type})"
            f"{self.table_suffix}"
        )
        self.admin(
            f"create table {self.hot} (id int primary key, n bigint not null){self.table_suffix}"
        )
        for key in HOT_KEYS:
            self.admin(f"insert into {self.hot} (id, n) values (%s, 0)", (key,))

    def drop_tables(self) -> None:
        for table in (self.table, self.hot):
            self.admin(f"drop table if exists {table}")

    def cleanup(self) -> None:
        self.connector.close_all()
        try:
            self.drop_tables()
        finally:
            if self._admin is not None:
                self._admin.close()


class PostgresTarget(Target):
    """psycopg 3.  The pool's sessions carry an application_name of this process's own."""

    name = "postgresql"
    sleep_sql = "select pg_sleep(%s)"
    text_type = "text"

    def __init__(self, dsn: str) -> None:
        import psycopg

        self.driver = psycopg
        self.dsn = dsn
        self.tag = f"dbpool-soak-{os.getpid()}"
        super().__init__()

    def _connect_for_pool(self) -> Any:
        return self.driver.connect(
            self.dsn, application_name=self.tag, connect_timeout=CONNECT_TIMEOUT
        )

    def admin_connect(self) -> Any:
        conn = self.driver.connect(self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        conn.execute("set lock_timeout = '10s'")
        return conn

    def sessions(self, admin: Any) -> list[int]:
        found = rows(
            admin,
            "select pid from pg_stat_activity "
            "where application_name = %s and pid <> pg_backend_pid()",
            (self.tag,),
        )
        return [int(r[0]) for r in found]

    def kill(self, admin: Any, session: int) -> None:
        rows(admin, "select pg_terminate_backend(%s)", (session,))

    def cancel(self, admin: Any, session: int) -> None:
        rows(admin, "select pg_cancel_backend(%s)", (session,))

    def lost(self, lease: dbpool.Connection[Any]) -> bool:
        return bool(lease.closed or lease.broken)

    def local_problem(self, lease: dbpool.Connection[Any]) -> str | None:
        status = lease.info.transaction_status
        if status != self.driver.pq.TransactionStatus.IDLE:
            return f"transaction status {status.name}"
        settings = (lease.autocommit, lease.isolation_level, lease.read_only, lease.deferrable)
        if settings != (False, None, None, None):
            return f"autocommit, isolation_level, read_only, deferrable are {settings}"
        return None

    def server_state(self, lease: dbpool.Connection[Any]) -> tuple[Any, ...]:
        [state] = rows(
            lease,
            "select txid_current_if_assigned(), "
            "coalesce(current_setting('dbpool_soak.open_tx', true), ''), "
            "current_setting('statement_timeout'), current_setting('lock_timeout'), "
            "current_setting('idle_in_transaction_session_timeout'), "
            "current_setting('transaction_isolation'), current_setting('transaction_read_only')",
        )
        return state

    def mark_transaction(self, lease: dbpool.Connection[Any]) -> None:
        rows(lease, "select set_config('dbpool_soak.open_tx', 'left open', true)")

    def change_settings(self, lease: dbpool.Connection[Any], rng: random.Random) -> str:
        choice = rng.randrange(3)
        if choice == 0:
            lease.autocommit = True
            return "autocommit"
        level = rng.choice(list(self.driver.IsolationLevel))
        lease.isolation_level = level
        if choice == 1:
            lease.read_only = True
            # SERIALIZABLE READ ONLY DEFERRABLE waits for a safe snapshot: not under this load.
            lease.deferrable = level is not self.driver.IsolationLevel.SERIALIZABLE
            return "readonly"
        return "transactional"


class MariaDBTarget(Target):
    """PyMySQL.  Every session shares user and database with other test runs, so the pool's
    sessions are told apart by the thread ids its connections got."""

    name = "mysql"
    sleep_sql = "select sleep(%s)"
    text_type = "varchar(40)"
    table_suffix = " engine=InnoDB"
    _UNKNOWN_THREAD = 1094  # ER_NO_SUCH_THREAD: the session ended before the KILL

    def __init__(self, params: dict[str, Any]) -> None:
        import pymysql

        self.driver = pymysql
        self.params = params
        self._ids_lock = threading.Lock()
        self._ids: set[int] = set()  # guarded by _ids_lock
        super().__init__()

    def _connect_for_pool(self) -> Any:
        conn = self.driver.connect(**self.params)
        with self._ids_lock:
            self._ids.add(conn.thread_id())
        return conn

    def admin_connect(self) -> Any:
        conn = self.driver.connect(**self.params)
        conn.autocommit(True)
        rows(conn, "set session lock_wait_timeout = 10")
        return conn

    def sessions(self, admin: Any) -> list[int]:
        with self._ids_lock:
            ours = set(self._ids)
        live = {
            int(r[0])
            for r in rows(
                admin, "select id from information_schema.processlist where id <> connection_id()"
            )
        }
        with self._ids_lock:
            self._ids -= ours - live  # thread ids are never reused while the server runs
        return sorted(ours & live)

    def _kill(self, admin: Any, what: str, session: int) -> None:
        try:
            rows(admin, f"kill {what} %s", (session,))
        except self.driver.OperationalError as exc:
            if exc.args[0] != self._UNKNOWN_THREAD:
                raise

    def kill(self, admin: Any, session: int) -> None:
        self._kill(admin, "connection", session)

    def cancel(self, admin: Any, session: int) -> None:
        self._kill(admin, "query", session)

    def lost(self, lease: dbpool.Connection[Any]) -> bool:
        return not lease.open

    def local_problem(self, lease: dbpool.Connection[Any]) -> str | None:
        if not lease.open:
            return "connection closed"
        status = lease.server_status or 0
        if status & 0x0001:  # SERVER_STATUS_IN_TRANS
            return f"server_status {status:#x}: in a transaction"
        if status & 0x0002:  # SERVER_STATUS_AUTOCOMMIT: PyMySQL connects with it off
            return f"server_status {status:#x}: autocommit on"
        return None

    def server_state(self, lease: dbpool.Connection[Any]) -> tuple[Any, ...]:
        # A plain read leaves a snapshot open that server_status does not show; in_transaction
        # does.  (information_schema.innodb_trx would too, but it is a cache up to 0.1 s old.)
        [state] = rows(
            lease,
            "select @@session.in_transaction, @@session.max_statement_time, "
            "@@session.innodb_lock_wait_timeout, @@session.autocommit, @@session.tx_read_only, "
            "@@session.tx_isolation",
        )
        return state

    def change_settings(self, lease: dbpool.Connection[Any], rng: random.Random) -> str:
        lease.autocommit(True)
        return "autocommit"


# -- what the workers saw ------------------------------------------------------------------


class Tally:
    """One worker's record, merged with the others' at the end."""

    def __init__(self) -> None:
        self.done: Counter[str] = Counter()  # operations that ended without an error
        self.errors: Counter[str] = Counter()  # expected errors, by type
        self.unexpected: list[str] = []
        self.violations: list[str] = []
        self.present: set[int] = set()  # rows whose commit returned: must be in the table
        self.absent: set[int] = set()  # rows rolled back or never committed: must not be
        self.unknown: set[int] = set()  # rows whose commit failed half-way: either
        self.hot_ok = 0  # run_transaction calls that returned
        self.hot_unknown = 0  # ... that failed after their last attempt's body ended

    def merge(self, other: Tally) -> None:
        self.done += other.done
        self.errors += other.errors
        self.unexpected += other.unexpected
        self.violations += other.violations
        self.present |= other.present
        self.absent |= other.absent
        self.unknown |= other.unknown
        self.hot_ok += other.hot_ok
        self.hot_unknown += other.hot_unknown


class Work:
    """The rows one operation wrote, and what must become of them."""

    def __init__(self, tally: Tally, keys: Iterator[int], table: str) -> None:
        self._tally = tally
        self._keys = keys
        self._table = table
        self._pending: list[int] = []
        self._committing = False

    def write(self, source: Source, kind: str) -> int:
        key = next(self._keys)
        self._pending.append(key)
        rows(source, f"insert into {self._table} (id, v) values (%s, %s)", (key, kind))
        return key

    def commit_starts(self) -> None:
        self._committing = True

    def committed(self) -> None:
        self._tally.present.update(self._pending)
        self._pending.clear()
        self._committing = False

    def undone(self, key: int) -> None:
        """A savepoint rolled back this row; the rest of the transaction goes on."""
        self._pending.remove(key)
        self._tally.absent.add(key)

    def settle(self, error: BaseException | None) -> None:
        """Rows still pending were never committed, unless the error came from the commit
        (and says neither that the deadline passed nor that the session was gone before it)."""
        known = (TransactionTimeout, TransactionRolledBack)
        if self._committing and error is not None and not isinstance(error, known):
            self._tally.unknown.update(self._pending)
        else:  # a deadline that passed means a rollback, never a commit
            self._tally.absent.update(self._pending)
        self._pending.clear()


def error_name(exc: BaseException) -> str:
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    return type(exc).__name__ if code is None else f"{type(exc).__name__}({code})"


# -- the soak ------------------------------------------------------------------------------


class Soak:
    """The workers' operations, the chaos thread, and the checks a lease must pass."""

    def __init__(self, target: Target, pool: dbpool.Pool[Any], baseline: tuple[Any, ...]) -> None:
        self.target = target
        self.pool = pool
        self.baseline = baseline
        self.stop = threading.Event()
        self.keys = itertools.count(1)  # row ids; next() on it is atomic
        driver = target.driver
        self.expected: tuple[type[BaseException], ...] = (
            driver.OperationalError,
            driver.InterfaceError,
            driver.InternalError,
            TransactionTimeout,
            CommitOutcomeUnknown,
            ConnectionUnusable,
            PoolTimeout,
            TransactionRolledBack,  # the session killed before COMMIT, found by the narrowing
            AppError,
        )
        self.tallies = [Tally() for _ in range(THREADS)]
        self.chaos_tally = Tally()
        self.strikes: Counter[str] = Counter()
        self.operations: list[tuple[Callable[[Work, Tally, random.Random], None], int]] = [
            (self.lease_commit, 3),
            (self.lease_left_open, 2),
            (self.lease_raises, 1),
            (self.lease_settings, 2),
            (self.lease_transaction, 2),
            (self.pool_transaction, 4),
            (self.counters, 2),
        ]

    # -- threads --------------------------------------------------------------------------

    def worker(self, index: int) -> None:
        tally = self.tallies[index]
        rng = random.Random(index)
        operations = [op for op, _ in self.operations]
        weights = [w for _, w in self.operations]
        while not self.stop.is_set():
            [op] = rng.choices(operations, weights)
            work = Work(tally, self.keys, self.target.table)
            try:
                op(work, tally, rng)
            except Exception as exc:
                work.settle(exc)
                if isinstance(exc, self.expected):
                    tally.errors[error_name(exc)] += 1
                else:
                    tally.unexpected.append(f"{op.__name__}: {traceback.format_exc()}")
            else:
                work.settle(None)
                tally.done[op.__name__] += 1

    def chaos(self) -> None:
        """Kill a random session of the pool's, or cancel its statement, every 100-300 ms."""
        rng = random.Random(-1)
        try:
            admin = self.target.admin_connect()
        except Exception:
            self.chaos_tally.unexpected.append(f"chaos: {traceback.format_exc()}")
            return
        try:
            while not self.stop.wait(rng.uniform(*CHAOS_PAUSE)):
                self.check_books()
                sessions = self.target.sessions(admin)
                if not sessions:
                    continue
                victim = rng.choice(sessions)
                if rng.random() < CANCEL_SHARE:
                    self.target.cancel(admin, victim)
                    self.strikes["cancels"] += 1
                else:
                    self.target.kill(admin, victim)
                    self.strikes["kills"] += 1
        except Exception:
            self.chaos_tally.unexpected.append(f"chaos: {traceback.format_exc()}")
        finally:
            admin.close()

    # -- checks ---------------------------------------------------------------------------

    def check_books(self) -> None:
        """The pool's counts balance at every moment, not only at the end."""
        s = self.pool.stats()
        if not (s.size <= s.max_size and s.size == s.idle + s.in_use + s.opening):
            self.chaos_tally.violations.append(f"during the soak: {s}")

    def check_session(
        self, conn: dbpool.Connection[Any], tally: Tally, rng: random.Random, when: str
    ) -> None:
        """The lease must look like a fresh session: locally always, to the server sometimes."""
        problem = self.target.local_problem(conn)
        if problem is not None:
            tally.violations.append(f"{when}: {problem}")
        if rng.random() < SERVER_CHECK_SHARE:
            state = self.target.server_state(conn)
            conn.rollback()
            if state != self.baseline:
                tally.violations.append(
                    f"{when}: the server reports {state!r}, a fresh session {self.baseline!r}"
                )

    # -- operations -----------------------------------------------------------------------

    def lease_commit(self, work: Work, tally: Tally, rng: random.Random) -> None:
        with self.pool.connection() as conn:
            self.check_session(conn, tally, rng, "checkout")
            for _ in range(rng.randint(1, 3)):
                work.write(conn, "committed")
            if rng.random() < 0.2:
                rows(conn, self.target.sleep_sql, (rng.uniform(0.005, 0.05),))
            work.commit_starts()
            conn.commit()
            work.committed()

    def lease_left_open(self, work: Work, tally: Tally, rng: random.Random) -> None:
        """Return the lease inside a transaction: the pool must roll it back."""
        with self.pool.connection() as conn:
            self.check_session(conn, tally, rng, "checkout")
            self.target.mark_transaction(conn)
            if rng.random() < 0.5:
                work.write(conn, "left open")
            rows(conn, f"select count(*) from {self.target.table}")  # a read snapshot at least

    def lease_raises(self, work: Work, tally: Tally, rng: random.Random) -> None:
        with self.pool.connection() as conn:
            self.check_session(conn, tally, rng, "checkout")
            work.write(conn, "raised")
            raise AppError("raised inside a lease block")

    def lease_settings(self, work: Work, tally: Tally, rng: random.Random) -> None:
        """Change autocommit, isolation or read-only mode through the lease: the pool must
        put them back."""
        with self.pool.connection() as conn:
            self.check_session(conn, tally, rng, "checkout")
            mode = self.target.change_settings(conn, rng)
            if mode == "autocommit":
                work.commit_starts()  # each statement commits
                work.write(conn, "autocommit")
                work.committed()
                return
            if mode == "transactional":
                work.write(conn, "settings")
            rows(conn, f"select count(*) from {self.target.table}")
            if rng.random() < 0.5:
                work.commit_starts()
                conn.commit()
                work.committed()
            # else: returned inside the transaction

    def transaction_options(
        self, rng: random.Random
    ) -> tuple[Isolation | None, float | None, bool]:
        isolation = rng.choice(ISOLATIONS)
        timeout = rng.uniform(0.05, LONGEST_DEADLINE) if rng.random() < 0.5 else None
        return isolation, timeout, rng.random() < 0.2

    def transaction_body(
        self,
        tx: dbpool.Transaction[Any],
        work: Work,
        tally: Tally,
        rng: random.Random,
        readonly: bool,
    ) -> bool:
        """Work inside a transaction; returns whether the block ended past its deadline."""
        if not readonly:
            work.write(tx, "transaction")
            if rng.random() < 0.3:
                key = -1
                try:
                    with tx.savepoint():
                        key = work.write(tx, "savepoint")
                        if rng.random() < 0.5:
                            raise AppError("undo the savepoint")
                except AppError:
                    work.undone(key)
        if tx.deadline is not None and rng.random() < 0.3:
            rows(tx, self.target.sleep_sql, (OUTLIVER,))
            tally.violations.append(
                f"a {OUTLIVER:g} s statement ran to its end in a transaction with a "
                f"{LONGEST_DEADLINE:g} s deadline at most"
            )
        elif rng.random() < 0.2:
            rows(tx, self.target.sleep_sql, (rng.uniform(0.005, 0.05),))
        # A statement after the savepoint: psycopg's commit of a failed transaction does not
        # raise, so an error swallowed above must surface here.
        rows(tx, f"select count(*) from {self.target.table}")
        if rng.random() < 0.1:
            raise AppError("raised inside a transaction block")
        late = tx.deadline is not None and monotonic() >= tx.deadline
        work.commit_starts()
        return late

    def lease_transaction(self, work: Work, tally: Tally, rng: random.Random) -> None:
        isolation, timeout, readonly = self.transaction_options(rng)
        with self.pool.connection() as conn:
            self.check_session(conn, tally, rng, "checkout")
            with conn.transaction(isolation=isolation, timeout=timeout, readonly=readonly) as tx:
                late = self.transaction_body(tx, work, tally, rng, readonly)
            work.committed()
            if late:
                tally.violations.append("a transaction on a lease committed past its deadline")
            # A session killed after the COMMIT fails the statements that put it back: the
            # transaction still succeeded, and the pool discards the connection on return.
            if not self.target.lost(conn):
                self.check_session(conn, tally, rng, "after a transaction on the lease")

    def pool_transaction(self, work: Work, tally: Tally, rng: random.Random) -> None:
        isolation, timeout, readonly = self.transaction_options(rng)
        with self.pool.transaction(isolation=isolation, timeout=timeout, readonly=readonly) as tx:
            late = self.transaction_body(tx, work, tally, rng, readonly)
        work.committed()
        if late:
            tally.violations.append("a pool transaction committed past its deadline")

    def counters(self, work: Work, tally: Tally, rng: random.Random) -> None:
        """Two contended increments in run_transaction: deadlocks and serialization failures
        are retried; at the end the counters hold exactly the committed increments."""
        attempts: list[bool] = []  # per call of the body: whether it got to its end

        def body(tx: dbpool.Transaction[Any]) -> None:
            attempts.append(False)
            for key in rng.sample(HOT_KEYS, 2):
                rows(tx, f"update {self.target.hot} set n = n + 1 where id = %s", (key,))
            attempts[-1] = True

        try:
            self.pool.run_transaction(
                body,
                isolation=rng.choice(ISOLATIONS),
                retries=5,
                timeout=rng.choice([None, 1.0, 3.0]),
            )
        except Exception as exc:
            if attempts and attempts[-1] and not isinstance(exc, TransactionTimeout):
                tally.hot_unknown += 1
            raise
        tally.hot_ok += 1


def stacks_of(threads: list[threading.Thread]) -> str:
    frames = sys._current_frames()
    return "\n".join(
        f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
        for t in threads
        if t.ident in frames
    )


def serves_max_size(pool: dbpool.Pool[Any], target: Target, violations: list[str]) -> bool:
    """Hold max_size leases at once, each one working.  A lease killed before the chaos stopped
    fails its statement and is discarded: False, try again.  PoolTimeout means a lost slot."""
    leases: list[dbpool.Connection[Any]] = []
    try:
        for _ in range(pool.max_size):
            leases.append(pool.connection(timeout=ACQUIRE_TIMEOUT))
        for lease in leases:
            problem = target.local_problem(lease)
            if problem is not None:
                violations.append(f"after the soak: {problem}")
            rows(lease, "select 1")
            lease.rollback()
        return pool.stats().in_use == pool.max_size
    except (
        target.driver.OperationalError,
        target.driver.InterfaceError,
        target.driver.InternalError,
    ):
        return False
    finally:
        for lease in leases:
            lease.close()


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    server: Target
    if request.param == "postgresql":
        server = PostgresTarget(request.getfixturevalue("postgresql_dsn"))
    else:
        server = MariaDBTarget(request.getfixturevalue("mysql_params"))
    server.create_tables()
    try:
        yield server
    finally:
        server.cleanup()


def test_soak(target: Target) -> None:
    pool: dbpool.Pool[Any] = dbpool.Pool(
        target.connector,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        acquire_timeout=ACQUIRE_TIMEOUT,
        name=f"soak-{target.name}",
    )
    try:
        with pool.connection() as conn:  # what a fresh session reports
            baseline = target.server_state(conn)
            conn.rollback()
        soak = Soak(target, pool, baseline)
        workers = [
            threading.Thread(target=soak.worker, args=(i,), name=f"soak-worker-{i}", daemon=True)
            for i in range(THREADS)
        ]
        chaos = threading.Thread(target=soak.chaos, name="soak-chaos", daemon=True)
        started = monotonic()
        chaos.start()
        for thread in workers:
            thread.start()
        soak.stop.wait(SECONDS)  # the soak itself: nothing to wait for but the time
        soak.stop.set()
        deadline = monotonic() + JOIN
        for thread in [*workers, chaos]:
            thread.join(timeout=max(0.0, deadline - monotonic()))
        hung = [t for t in [*workers, chaos] if t.is_alive()]
        assert not hung, f"threads still running {JOIN:g} s after the stop:\n{stacks_of(hung)}"
        elapsed = monotonic() - started

        total = Tally()
        for tally in [*soak.tallies, soak.chaos_tally]:
            total.merge(tally)

        # No slot lost: nothing counted in use, the books balance, max_size leases at once.
        after = pool.stats()
        assert after.in_use == 0, after
        assert after.waiting == 0, after
        assert after.size <= after.max_size, after
        assert after.size == after.idle + after.in_use + after.opening, after
        wait_until(
            lambda: serves_max_size(pool, target, total.violations),
            timeout=SETTLE,
            interval=0.05,
            message=f"the pool did not serve {MAX_SIZE} leases at once: {pool.stats()}",
        )
        served = pool.stats()
        pool.close(timeout=10.0)
        closed = pool.stats()
        assert (closed.size, closed.in_use, closed.idle) == (0, 0, 0), closed

        # Closed, the pool leaves no session behind on the server.
        admin = target.admin_connect()
        try:
            wait_until(
                lambda: not target.sessions(admin),
                timeout=15,
                message=f"sessions left on the server: {target.sessions(admin)}",
            )
        finally:
            admin.close()

        # Rows: what was rolled back, abandoned or undone is absent, what committed is present.
        present = {int(r[0]) for r in target.admin(f"select id from {target.table}")}
        leaked = sorted(total.absent & present)
        lost = sorted(total.present - present)
        outcome: list[str] = []
        if leaked:
            kinds = target.admin(
                f"select v, count(*) from {target.table} where id in "
                f"({', '.join(str(k) for k in leaked[:1000])}) group by v"
            )
            outcome.append(
                f"{len(leaked)} rows that were rolled back, abandoned or undone are committed "
                f"(by kind: {kinds}); ids {leaked[:20]}"
            )
        if lost:
            outcome.append(f"{len(lost)} rows whose commit returned are missing: {lost[:20]}")
        [(increments,)] = target.admin(f"select sum(n) from {target.hot}")
        if not 2 * total.hot_ok <= int(increments) <= 2 * (total.hot_ok + total.hot_unknown):
            outcome.append(
                f"the counters moved by {increments}; {total.hot_ok} increments of 2 committed, "
                f"{total.hot_unknown} more may have"
            )
        violations = outcome + total.violations

        ops = sum(total.done.values()) + sum(total.errors.values()) + len(total.unexpected)
        summary = (
            f"soak {target.name}: {elapsed:.0f} s, {THREADS} threads, {ops} operations "
            f"({sum(total.done.values())} clean); errors {dict(total.errors.most_common())}; "
            f"chaos {dict(soak.strikes)}; pool created {served.created}, discarded "
            f"{served.discarded}, acquired {served.acquired}, timeouts {served.timeouts}, "
            f"connect errors {served.connect_errors}; rows committed {len(total.present)}, "
            f"rolled back {len(total.absent)}, unknown {len(total.unknown)}; counters "
            f"{increments} ({total.hot_ok} ok, {total.hot_unknown} unknown); "
            f"unexpected {len(total.unexpected)}, violations {len(violations)}"
        )
        print(f"\n{summary}")

        assert total.unexpected == [], (
            f"{summary}\n{len(total.unexpected)} unexpected errors; the first ones:\n"
            + "\n".join(total.unexpected[:5])
        )
        assert violations == [], (
            f"{summary}\n{len(violations)} violations; the first ones:\n"
            + "\n".join(violations[:20])
        )
        assert soak.strikes["kills"] > 0, "the chaos thread killed no session: nothing was tested"
        assert total.done and total.present and total.absent, total.done
    finally:
        pool.close(timeout=5.0)
