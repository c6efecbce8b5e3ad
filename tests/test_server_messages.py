"""psycopg2 keeps the server's messages on the connection (``conn.notices``, ``conn.notifies``),
psycopg 3 the notifications received outside ``conn.notifies()``:
those a lease received are its borrower's, and the next borrower must not read them."""

from __future__ import annotations

import collections
import os
from typing import Any

import pytest

import dbpool

pytestmark = pytest.mark.timeout(30)

NOTICE = "DO $$ BEGIN RAISE NOTICE 'account 42 overdrawn'; END $$"
# This process's own channel: another test run on the same server notifies its own
CHANNEL = f"dbpool_messages_{os.getpid()}"


def test_a_leases_notices_and_notifications_do_not_reach_the_next_borrower(
    psycopg2_connect: Any,
) -> None:
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            cursor = conn.cursor()
            cursor.execute(NOTICE)
            cursor.execute(f"LISTEN {CHANNEL}")
            cursor.execute(f"NOTIFY {CHANNEL}, 'payload'")
            conn.commit()
            raw.poll()  # psycopg2 before 2.9.10 takes in what came with commit() only here
            assert any("overdrawn" in notice for notice in raw.notices)
            assert [n.payload for n in raw.notifies] == ["payload"]
            cursor.execute("UNLISTEN *")
            conn.commit()
        with pool.connection() as conn:
            assert conn.raw is raw
            assert raw.notices == []
            assert raw.notifies == []


@pytest.mark.parametrize("arrival", ["commit", "rollback on return"])
def test_a_notification_that_came_with_a_leases_last_call_does_not_reach_the_next_borrower(
    psycopg2_connect: Any, arrival: str
) -> None:
    """The server sends a notification as the transaction it came in ends: with the lease's
    own commit(), or with the rollback the pool runs as the lease comes back.  psycopg2 before
    2.9.10 leaves what came with commit() and rollback() with libpq, and takes it in at the
    connection's next statement: the next borrower's."""
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            cursor = conn.cursor()
            cursor.execute(f"LISTEN {CHANNEL}")
            if arrival == "commit":
                cursor.execute(f"NOTIFY {CHANNEL}, 'payload'")
            else:
                conn.commit()
                cursor.execute("SELECT 1")  # a transaction: the notification waits for its end
                other = psycopg2_connect()
                other.autocommit = True
                other.cursor().execute(f"NOTIFY {CHANNEL}, 'payload'")
                other.close()
            if arrival == "commit":
                conn.commit()
        with pool.connection() as conn:
            assert conn.raw is raw
            cursor = conn.cursor()
            cursor.execute(f"UNLISTEN {CHANNEL}")
            conn.commit()
            assert [n.payload for n in raw.notifies] == []
        assert pool.stats().discarded == 0


def test_a_connection_the_server_dropped_while_leased_is_counted_broken_where_poll_finds_it(
    psycopg2_connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On psycopg2 before 2.9.10 the return takes in the notifications received (poll()),
    which is where a session the server ended unseen is first noticed: the connection is
    discarded as broken (idle ones opened before it are validated at checkout), not as one
    whose reset failed."""
    from dbpool.dialects import psycopg2 as dialect_module

    monkeypatch.setattr(dialect_module, "_notifications_taken_in_late", lambda: True)
    admin = psycopg2_connect()
    admin.autocommit = True
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, validate_after=60) as pool:
        with pool.connection() as conn:
            pid = conn.raw.get_backend_pid()
            with admin.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        # The first poll() reads the server's farewell, the next one finds the socket closed
        with pool.connection() as conn:
            conn.cursor()  # no statement, but used: its return looks
        stats = pool.stats()
        assert (stats.discards["broken"], stats.discards["reset_failed"]) == (1, 0), stats


def test_messages_from_before_the_first_lease_stay(psycopg2_connect: Any) -> None:
    """A configure hook's own (in a deque of its choosing, as psycopg2's docs suggest)."""

    def configure(raw: Any) -> None:
        raw.notices = collections.deque(maxlen=10)
        cursor = raw.cursor()
        cursor.execute(NOTICE.replace("account 42 overdrawn", "configured"))
        raw.commit()

    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            conn.cursor().execute(NOTICE)
            assert len(raw.notices) == 2
        with pool.connection() as conn:
            assert [notice for notice in raw.notices if "configured" in notice]
            assert len(raw.notices) == 1


def test_a_psycopg_leases_notifications_do_not_reach_the_next_borrower(
    postgresql_dsn: str,
) -> None:
    """psycopg 3 keeps the notifications received outside conn.notifies() for its next call."""
    import psycopg

    def connect() -> Any:
        return psycopg.connect(postgresql_dsn, autocommit=True)

    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(f"NOTIFY {CHANNEL}, 'payload'")
            conn.execute("UNLISTEN *")
            if not getattr(raw, "_notifies_backlog", None):
                pytest.skip("this psycopg keeps no notifications for a later notifies()")
        with pool.connection() as conn:
            assert conn.raw is raw
            assert list(conn.notifies(timeout=0)) == []


def test_a_notices_sink_of_the_borrowers_own_is_left_alone(psycopg2_connect: Any) -> None:
    """psycopg2 takes any object with an append() as conn.notices."""

    class Sink:
        def __init__(self) -> None:
            self.received: list[str] = []

        def append(self, notice: str) -> None:
            self.received.append(notice)

    sink = Sink()

    def configure(raw: Any) -> None:
        raw.notices = sink

    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            conn.cursor().execute(NOTICE)
        with pool.connection() as conn:
            assert conn.raw is raw  # reused, not discarded
        assert pool.stats().discarded == 0
    assert any("overdrawn" in notice for notice in sink.received)


@pytest.mark.parametrize("replaced", ["notices", "notifies"])
def test_a_messages_sink_a_borrower_put_on_the_driver_connection_is_put_back(
    psycopg2_connect: Any, replaced: str
) -> None:
    """psycopg2's docs suggest replacing conn.notices with a deque: one that a borrower put
    there, on conn.raw, goes with its lease, even when it compares equal (a new, empty list),
    and the next borrower's messages reach the connection's own."""
    sink: collections.deque[Any] = collections.deque(maxlen=10)
    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            own = getattr(raw, replaced)
            setattr(raw, replaced, [])  # equal to the connection's own: empty
            setattr(raw, replaced, sink)
        with pool.connection() as conn:
            assert conn.raw is raw
            cursor = conn.cursor()
            cursor.execute(NOTICE)
            cursor.execute(f"LISTEN {CHANNEL}")
            cursor.execute(f"NOTIFY {CHANNEL}, 'payload'")
            conn.commit()
            cursor.execute("UNLISTEN *")
            conn.commit()
            assert list(sink) == []  # what the first borrower's code still holds
            assert getattr(raw, replaced) is own
        with pool.connection() as conn:
            lent = []
            setattr(conn.raw, replaced, lent)  # the same, equal to the connection's own
        with pool.connection() as conn:
            assert getattr(conn.raw, replaced) is own
        assert pool.stats().discarded == 0


def test_a_leases_notices_are_dropped_after_it_read_those_from_before(
    psycopg2_connect: Any,
) -> None:
    """A configure hook's own notice stays for the next borrowers, counted as it was; a
    borrower that takes it off the front (psycopg2's docs do so with conn.notifies.pop(0))
    leaves as many of its own in its place, and those are its, not configure's."""

    def configure(raw: Any) -> None:
        raw.cursor().execute(NOTICE.replace("account 42 overdrawn", "configured"))
        raw.commit()

    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            assert [notice for notice in raw.notices if "configured" in notice]
            while raw.notices:
                raw.notices.pop(0)
            conn.cursor().execute(NOTICE)
        with pool.connection() as conn:
            assert conn.raw is raw
            assert not [notice for notice in raw.notices if "overdrawn" in notice]


@pytest.mark.parametrize("queue", ["list", "deque"])
def test_a_leases_notices_are_dropped_after_psycopg2_dropped_the_oldest(
    psycopg2_connect: Any, queue: str
) -> None:
    """psycopg2 keeps the newest 50 notices of a list (a deque, as many as its maxlen): a lease
    that received more pushed those from before out, and what it leaves in their place is
    its own."""

    def configure(raw: Any) -> None:
        if queue == "deque":
            raw.notices = collections.deque(maxlen=10)
        raw.cursor().execute(NOTICE.replace("account 42 overdrawn", "configured"))
        raw.commit()

    with dbpool.Pool(psycopg2_connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            cursor = conn.cursor()
            for _ in range(60):
                cursor.execute(NOTICE)
            conn.commit()
            assert not [notice for notice in raw.notices if "configured" in notice]
        with pool.connection() as conn:
            assert conn.raw is raw
            assert not [notice for notice in raw.notices if "overdrawn" in notice]


def test_a_psycopg_leases_notifications_are_dropped_after_it_read_those_from_before(
    postgresql_dsn: str,
) -> None:
    """psycopg's conn.notifies() takes the notifications it kept off the front, those from
    before the lease included: those the lease received afterwards are its own."""
    import psycopg

    def connect() -> Any:
        return psycopg.connect(postgresql_dsn, autocommit=True)

    def configure(raw: Any) -> None:
        raw.execute(f"LISTEN {CHANNEL}")
        raw.execute(f"NOTIFY {CHANNEL}, 'configured'")

    with dbpool.Pool(connect, min_size=0, max_size=1, configure=configure) as pool:
        with pool.connection() as conn:
            raw = conn.raw
            if not getattr(raw, "_notifies_backlog", None):
                pytest.skip("this psycopg keeps no notifications for a later notifies()")
            assert [n.payload for n in conn.notifies(timeout=0)] == ["configured"]
            conn.execute(f"NOTIFY {CHANNEL}, 'payload'")
        with pool.connection() as conn:
            assert conn.raw is raw
            assert list(conn.notifies(timeout=0)) == []
            conn.execute("UNLISTEN *")
