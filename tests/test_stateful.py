"""A stateful property test: random sequences of calls on a small pool, checked against a
reference model after every step.

The machine drives a pool of 1 to 3 connections on the fake driver: acquire, release (once, then
again), statements and commits, transactions left open on release, failing rollbacks, statements
and connects, killed connections, the server going down and up, leases dropped without release,
and closing the pool.  The model says what each call must do (a lease, PoolTimeout, the driver's
error, PoolClosed, LeaseReleased) and which driver connections must be open; after every step the
pool's stats and the fake server must agree with it:

* ``size == idle + in_use + opening``, ``size <= max_size``, nobody waiting, nothing opening;
* ``in_use`` is the number of leases held, ``idle`` the model's idle connections, and the
  server's open connections are exactly the held and idle ones;
* no borrower ever gets a connection in a transaction, a killed one, or one that fails
  validation (``validate_after=0``: every checkout pings);
* once closed, nothing is open and every call raises PoolClosed; close is idempotent.

Which idle connection the pool picks, and which unfit ones it discards on the way, is its own
choice: the model accepts any choice that follows the rules and learns it from the lease's
connection id and the server.  Everything runs in the test's thread, with settings that leave the
pool nothing to do on its own (min_size=0, no idle timeout or lifetime, no backoff delay), so
runs are deterministic.  The one exception is a lease dropped without release: its connection
comes back at the next acquire or close, or earlier through the pool's maintenance thread, so the
model waits for it where it must.

``DBPOOL_STATEFUL_EXAMPLES`` and ``DBPOOL_STATEFUL_STEPS`` raise the number of runs and steps.
"""

from __future__ import annotations

import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dbpool
from tests import fakedb
from tests.conftest import wait_until

EXAMPLES = int(os.environ.get("DBPOOL_STATEFUL_EXAMPLES", "200"))
STEPS = int(os.environ.get("DBPOOL_STATEFUL_STEPS", "30"))
ACQUIRE_TIMEOUT = 0.05  # what a caller waits for when the pool is full
PATIENT = 5.0  # a call the model expects to succeed at once gets this long, so load cannot fail it
STATEMENT = "update t set v = 1"

pytestmark = pytest.mark.timeout(60 + EXAMPLES * STEPS // 20)

index = st.integers(min_value=0, max_value=5)  # picks from a list, modulo its length


@dataclass(eq=False)
class Conn:
    """The model of one driver connection."""

    id: int
    killed: bool = False
    rollback_faults: int = 0
    execute_faults: int = 0

    @property
    def fit(self) -> bool:
        """Whether it passes validation: the ping's rollback fails on a scripted fault."""
        return not self.killed and self.rollback_faults == 0


@dataclass(eq=False)
class Held:
    lease: dbpool.Connection[Any]
    conn: Conn
    dirty: bool = False  # ran a statement since its last commit: rolled back on return


@dataclass(eq=False)
class Orphan:
    """A lease dropped without release (the lease itself is gone)."""

    conn: Conn
    dirty: bool


def forget_frames(server: fakedb.Server) -> None:
    """Drop the tracebacks of the exceptions in the fake server's call log.  Their frames, and
    the frames those were called from, hold the rules' local variables, leases among them: a
    lease could not be garbage-collected by the ``drop`` rule."""
    for call in server.calls:
        if call.error is not None:
            call.error.__traceback__ = None


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = fakedb.Server()
        self.pool: dbpool.Pool[Any] | None = None
        self.max_size = 0
        self.held: list[Held] = []
        self.idle: dict[int, Conn] = {}
        self.orphans: list[Orphan] = []
        self.released: list[dbpool.Connection[Any]] = []  # returned leases, to return again
        self.stale: list[dbpool.Connection[Any]] = []  # leases still out when the pool closed
        self.known: set[int] = set()  # every connection id seen
        self.connect_faults = 0
        self.down = False
        self.closed = False

    # -- helpers ---------------------------------------------------------------------------------

    def raw(self, conn: Conn) -> Any:
        [raw] = [c for c in self.server.connections if c.id == conn.id]
        return raw

    def pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    def live_conns(self) -> list[Conn]:
        """Connections the model knows to be open and not in a dropped lease."""
        return [h.conn for h in self.held] + list(self.idle.values())

    def take_back(self, conn: Conn, dirty: bool) -> Callable[[], None]:
        """What returning a lease does, in the model: roll back if it ran something, and
        discard the connection if that fails; else keep it idle.  Returns the check that the
        pool did so, to run once it has."""
        raw = self.raw(conn)
        if dirty and (conn.killed or conn.rollback_faults):

            def discarded() -> None:
                # Closed by whichever thread returned it (for a dropped lease, maybe another).
                wait_until(
                    lambda: raw.closed, timeout=2, message=f"{raw!r} failed its reset, still open"
                )

            return discarded
        self.idle[conn.id] = conn

        def kept() -> None:
            if conn.id not in self.idle and all(h.conn is not conn for h in self.held):
                return  # then failed validation at the acquire that returned it (checked there)
            assert not raw.closed, f"{raw!r} was closed on return for no reason"
            assert not self.server.in_transaction(raw), f"{raw!r} came back in a transaction"

        return kept

    def absorb_orphans(self) -> list[Callable[[], None]]:
        """The model's side of returning the dropped leases; returns the checks."""
        orphans, self.orphans = self.orphans, []
        return [self.take_back(orphan.conn, orphan.dirty) for orphan in orphans]

    def check(self, checks: list[Callable[[], None]]) -> None:
        for check in checks:
            check()

    def forget_discarded_idle(self) -> None:
        """Drop from the model the idle connections the pool closed (failed validation)."""
        for conn in list(self.idle.values()):
            if self.raw(conn).closed:
                assert not conn.fit, f"connection {conn.id} was fit, and discarded"
                del self.idle[conn.id]

    # -- the pool --------------------------------------------------------------------------------

    @initialize(max_size=st.integers(min_value=1, max_value=3))
    def open_pool(self, max_size: int) -> None:
        self.max_size = max_size
        self.pool = dbpool.Pool(
            self.server.connect,
            min_size=0,
            max_size=max_size,
            acquire_timeout=ACQUIRE_TIMEOUT,
            idle_timeout=None,
            max_lifetime=None,
            validate_after=0,
            reconnect_delay=1e-9,  # no backoff: after a failed connect the next one goes ahead
            reconnect_max_delay=1e-9,
        )

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.close(timeout=0)
        for lease in [h.lease for h in self.held] + self.stale:
            lease.close()  # so that no finaliser warns later, in another test
        self.server.release_all()

    # -- rules -------------------------------------------------------------------------------

    @rule(via=st.sampled_from(["connection", "connect"]), wait=st.booleans())
    def acquire(self, via: str, wait: bool) -> None:
        assert self.pool is not None
        get = getattr(self.pool, via)
        if self.closed:
            event("acquire: PoolClosed")
            with pytest.raises(dbpool.PoolClosed):
                get(timeout=0)
            return
        if self.orphans:
            # The maintenance thread returns dropped leases, woken by the next acquire (not by
            # the finaliser, which must take no lock); here it has done so before the acquire.
            self.pool._reaper_wakeup.set()
            held = len(self.held)
            wait_until(lambda: self.pool.stats().in_use == held, timeout=2)
        returns = self.absorb_orphans()
        fit = [c for c in self.idle.values() if c.fit]
        unfit = len(self.idle) - len(fit)
        if not fit and len(self.held) == self.max_size:
            event("acquire: PoolTimeout")
            with pytest.raises(dbpool.PoolTimeout):
                get(**({} if wait else {"timeout": 0}))
            self.check(returns)
            return
        if not fit and (self.connect_faults or self.down):
            event("acquire: connect fails")
            with pytest.raises(fakedb.OperationalError):
                get(timeout=PATIENT)
            if self.connect_faults:
                self.connect_faults -= 1  # scripted faults come before the refusal
            self.forget_discarded_idle()
            assert not self.idle, "the pool connected while idle connections were left to try"
            self.check(returns)
            return
        past = f"{unfit} unfit" if unfit < 2 else "2+ unfit"
        event(f"acquire: {'an idle' if fit else 'a new'} connection, past {past}")
        lease = get(timeout=PATIENT)
        conn_id = lease.id
        self.forget_discarded_idle()
        if conn_id in self.idle:
            conn = self.idle.pop(conn_id)
            assert conn.fit, f"handed out connection {conn_id}, which fails validation"
        else:
            assert not fit, "connected while a fit connection was idle"
            assert not self.idle, "connected while idle connections were left to try"
            assert conn_id not in self.known, f"connection {conn_id} is back from the dead"
            conn = Conn(conn_id)
            self.known.add(conn_id)
        self.held.append(Held(lease, conn))
        self.check(returns)
        assert not lease.in_transaction, "a borrower got someone else's transaction"
        assert not self.server.in_transaction(self.raw(conn))

    @precondition(lambda self: self.held)
    @rule(i=index, how=st.sampled_from(["close", "release", "exit"]))
    def release(self, i: int, how: str) -> None:
        assert self.pool is not None
        held = self.pick(self.held, i)
        self.held.remove(held)
        if how == "close":
            held.lease.close()
        elif how == "release":
            self.pool.release(held.lease)
        else:
            held.lease.__exit__(None, None, None)
        assert held.lease.released
        self.take_back(held.conn, held.dirty)()
        self.released.append(held.lease)

    @precondition(lambda self: self.released)
    @rule(i=index, how=st.sampled_from(["close", "exit"]))
    def release_again(self, i: int, how: str) -> None:
        lease = self.pick(self.released, i)
        if how == "close":
            lease.close()  # does nothing: closing is idempotent
        else:
            lease.__exit__(None, None, None)

    @precondition(lambda self: self.released)
    @rule(i=index)
    def pool_release_again(self, i: int) -> None:
        assert self.pool is not None
        with pytest.raises(dbpool.LeaseReleased):
            self.pool.release(self.pick(self.released, i))

    @precondition(lambda self: self.held)
    @rule(i=index, commit=st.booleans())
    def run_statement(self, i: int, commit: bool) -> None:
        held = self.pick(self.held, i)
        conn = held.conn
        if conn.killed:
            with pytest.raises(fakedb.OperationalError):
                held.lease.cursor()
            return
        cursor = held.lease.cursor()
        held.dirty = True  # even when the statement fails: the pool cannot know its effect
        if conn.execute_faults:
            conn.execute_faults -= 1
            with pytest.raises(fakedb.OperationalError):
                cursor.execute(STATEMENT)
            return
        cursor.execute(STATEMENT)
        assert held.lease.in_transaction
        if commit:
            held.lease.commit()
            held.dirty = False
            assert not held.lease.in_transaction

    @precondition(lambda self: self.held)
    @rule(i=index)
    def release_in_transaction(self, i: int) -> None:
        """A statement left uncommitted, then release: the next borrower must not see it."""
        held = self.pick(self.held, i)
        if not held.conn.killed and not held.conn.execute_faults:
            held.lease.cursor().execute(STATEMENT)
            held.dirty = True
            assert held.lease.in_transaction
        self.release(i, "close")

    @precondition(lambda self: not self.closed and (self.held or self.idle))
    @rule(i=index)
    def fail_next_rollback(self, i: int) -> None:
        conn = self.pick(self.live_conns(), i)
        self.server.fail_next(
            "rollback", fakedb.OperationalError("rollback failed (test)"), conn=self.raw(conn)
        )
        conn.rollback_faults += 1

    @precondition(lambda self: self.held)
    @rule(i=index)
    def fail_next_statement(self, i: int) -> None:
        conn = self.pick(self.held, i).conn
        self.server.fail_next(
            "execute", fakedb.OperationalError("statement failed (test)"), conn=self.raw(conn)
        )
        conn.execute_faults += 1

    @rule()
    def fail_next_connect(self) -> None:
        self.server.fail_next("connect", fakedb.OperationalError("connect failed (test)"))
        self.connect_faults += 1

    @precondition(lambda self: not self.closed and (self.held or self.idle))
    @rule(i=index)
    def kill(self, i: int) -> None:
        conn = self.pick(self.live_conns(), i)
        self.server.kill(self.raw(conn))
        conn.killed = True

    @rule(down=st.booleans())
    def server_down_or_up(self, down: bool) -> None:
        if down:
            self.server.down()
        else:
            self.server.up()
        self.down = down

    @precondition(lambda self: self.held)
    @rule(i=index)
    def drop(self, i: int) -> None:
        held = self.pick(self.held, i)
        self.held.remove(held)
        orphan = Orphan(held.conn, held.dirty)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del held  # the only reference to the lease, with the frames below
            forget_frames(self.server)
            gc.collect()
        assert any(issubclass(w.category, ResourceWarning) for w in caught), (
            "the lease was not collected"
        )
        self.orphans.append(orphan)

    @rule(now=st.integers(min_value=0, max_value=3))
    def close_pool(self, now: int) -> None:
        if now and not self.closed:
            return  # three draws in four do nothing: runs stay open long enough to matter
        assert self.pool is not None
        # Leases still out would be waited for: with none, the default timeout returns at once.
        self.pool.close(timeout=0 if self.held or self.orphans else 5.0)
        self.pool.close()  # idempotent
        self.closed = True
        self.stale.extend(h.lease for h in self.held)
        self.held.clear()
        self.idle.clear()
        self.orphans.clear()
        wait_until(
            lambda: not self.server.open_connections,
            timeout=2,
            message="connections left open after close()",
        )

    @precondition(lambda self: self.closed)
    @rule()
    def calls_after_close(self) -> None:
        assert self.pool is not None
        with pytest.raises(dbpool.PoolClosed):
            self.pool.connect(timeout=PATIENT)
        with pytest.raises(dbpool.PoolClosed):
            with self.pool.transaction():
                pass
        with pytest.raises(dbpool.PoolClosed):
            self.pool.run_transaction(lambda tx: None)

    @precondition(lambda self: self.stale)
    @rule(i=index)
    def use_after_close(self, i: int) -> None:
        lease = self.pick(self.stale, i)
        with pytest.raises(dbpool.LeaseReleased):
            lease.cursor()
        lease.close()  # does nothing

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def accounting_matches_the_model(self) -> None:
        if self.pool is None:
            return
        s = self.pool.stats()
        assert s.size == s.idle + s.in_use + s.opening, s
        assert 0 <= s.size <= s.max_size == self.max_size, s
        assert (s.opening, s.waiting) == (0, 0), s
        if self.closed:
            assert (s.size, s.idle, s.in_use) == (0, 0, 0), s
            assert not self.server.open_connections
            return
        held = len(self.held)
        if self.orphans and s.in_use > held:
            # Dropped leases not returned yet (the maintenance thread, woken by the next
            # acquire, or close() returns them).
            assert s.in_use <= held + len(self.orphans), s
            return
        if self.orphans:
            self.check(self.absorb_orphans())  # the maintenance thread returned them
            s = self.pool.stats()
        assert s.in_use == held, f"{s}; the model holds {held}"
        assert s.idle == len(self.idle), f"{s}; the model has {len(self.idle)} idle"
        open_ids = sorted(c.id for c in self.server.open_connections)
        model_ids = sorted(c.id for c in self.live_conns())
        assert open_ids == model_ids, f"open at the server: {open_ids}, the model: {model_ids}"


PoolMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
)
TestPoolMachine = PoolMachine.TestCase
