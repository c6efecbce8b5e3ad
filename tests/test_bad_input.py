"""Wrong configurations and wrong calls, as one table.

Every row proves three things: the mistake raises at once with the right exception type; the
message names the parameter or the problem and says what to do instead; and the mistake leaves
no trace (``pool.stats()`` and the driver calls are the same before and after, and the pool still
hands out working connections).

Narrower checks live next to the code they test: the configuration table and acquire timeouts in
``test_pool.py``, isolation / timeout / readonly / retries in ``test_transactions.py``, and
malformed URLs in ``test_url.py`` (only a few are repeated here, through ``create_pool``).
Everything here runs on the fake driver or on SQLite: no server is needed.
"""

# mypy: disable-error-code="arg-type, call-arg"
# (wrong types and wrong arguments are what this module passes, on purpose)

from __future__ import annotations

import math
import sqlite3
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import dbpool
from tests import fakedb
from tests.conftest import Connector, wait_until

pytestmark = pytest.mark.timeout(30)

NAN = math.nan
INF = math.inf
# What the message of a time too large adds where infinity is accepted
UNLIMITED = "or float('inf') for no limit"
SHORT = 0.2  # seconds: an acquire deadline that is meant to pass
NO_HANG = 10.0  # seconds: far above SHORT; a call that takes longer was hanging


def refused(
    call: Callable[[], object], error: type[Exception], words: tuple[str, ...]
) -> Exception:
    """Run ``call``, which must raise exactly ``error`` with each of ``words`` in its message."""
    try:
        call()
    except Exception as raised:
        exc = raised
        # Drop the tracebacks of the chain: their frames would keep a half-built Pool alive in
        # a reference cycle, where the leak guard finds it.
        link: BaseException | None = exc
        while link is not None:
            link.__traceback__ = None
            link = link.__cause__ or link.__context__
    else:
        pytest.fail(f"no {error.__name__} was raised", pytrace=False)
    assert type(exc) is error, f"expected {error.__name__}, got {type(exc).__name__}: {exc}"
    message = str(exc)
    missing = [word for word in words if word not in message]
    assert not missing, f"the message {message!r} does not say {missing!r}"
    return exc


def works(pool: dbpool.Pool[Any]) -> None:
    """The pool still hands out a connection that runs a statement, and takes it back."""
    assert not pool.closed
    with pool.connection(timeout=1) as conn:
        cur = conn.cursor()
        cur.execute("select 1")
        assert cur.fetchall() == [(1,)]
    s = pool.stats()
    assert (s.in_use, s.waiting, s.size) == (0, 0, s.idle + s.opening)


def dbpool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("dbpool")}


@dataclass
class Snapshot:
    """What a refused call must leave as it found: the pool's counters and the driver's log."""

    stats: dbpool.PoolStats
    calls: int

    @classmethod
    def of(cls, pool: dbpool.Pool[Any], server: fakedb.Server) -> Snapshot:
        return cls(pool.stats(), len(server.calls))

    def unchanged(self, pool: dbpool.Pool[Any], server: fakedb.Server) -> None:
        assert pool.stats() == self.stats
        assert server.calls[self.calls :] == [], "the refused call reached the driver"


@pytest.fixture
def pool(fake_server: fakedb.Server) -> Iterator[dbpool.Pool[Any]]:
    """A pool of at most 2 with one idle connection, so a stray checkout would show."""
    with dbpool.Pool(
        fake_server.connect, name="orders", min_size=0, max_size=2, acquire_timeout=5
    ) as pool:
        works(pool)
        yield pool


# -- Pool(): every parameter, every kind of wrong --------------------------------------------------


def option(name: str, value: Any, error: type[Exception], *hint: str, **others: Any) -> Any:
    """A row: ``Pool(connect, name=value, **others)`` raises ``error``; the message names
    ``name`` and says each of ``hint``."""
    options = {**others, name: value}
    if isinstance(value, types.ModuleType):
        label = value.__name__
    elif isinstance(value, int) and value.bit_length() > 64:  # too long to show, or to repr
        label = f"an int of {value.bit_length()} bits"
    else:
        label = repr(value)
    return pytest.param(options, error, (name, *hint), id=f"{name}={label}")


BAD_OPTIONS = [
    # sizes: ints only; bool, str, float and None are refused, not coerced
    option("min_size", "1", TypeError, "must be an int", "'1'"),
    option("min_size", True, TypeError, "must be an int"),
    option("min_size", None, TypeError, "must be an int"),
    option("min_size", 1.0, TypeError, "must be an int"),
    option("min_size", -1, ValueError, "must be 0 or more", "-1"),
    option("max_size", "10", TypeError, "must be an int"),
    option("max_size", False, TypeError, "must be an int"),
    option("max_size", None, TypeError, "must be an int"),
    option("max_size", 2.5, TypeError, "must be an int"),
    option("max_size", 0, ValueError, "must be 1 or more"),
    option("max_size", -3, ValueError, "must be 1 or more"),
    option(
        "min_size",
        3,
        ValueError,
        "(3)",
        "max_size (2)",
        "raise max_size or lower min_size",
        max_size=2,
    ),
    option("max_waiting", "3", TypeError, "must be an int"),
    option("max_waiting", True, TypeError, "must be an int"),
    option("max_waiting", None, TypeError, "must be an int"),
    option("max_waiting", 1.5, TypeError, "must be an int"),
    option("max_waiting", -1, ValueError, "must be 0 or more"),
    # times: numbers of seconds; NaN and the wrong sign are refused
    option("acquire_timeout", "30", TypeError, "must be a number of seconds"),
    option("acquire_timeout", True, TypeError, "must be a number of seconds"),
    option("acquire_timeout", None, TypeError, "must be a number of seconds"),
    option("acquire_timeout", -1, ValueError, "must be 0 or more", "-1"),
    option("acquire_timeout", NAN, ValueError, "must be 0 or more", "nan"),
    option("acquire_timeout", -INF, ValueError, "must be 0 or more"),
    # an int too large for a float is refused with the limit that holds: infinity where the
    # option takes it, threading.TIMEOUT_MAX where it must be finite
    option("acquire_timeout", 10**400, ValueError, "0 or more and at most 1e+300", UNLIMITED),
    option("idle_timeout", 10**400, ValueError, "at most 1e+300 seconds", UNLIMITED, "or None"),
    option("max_lifetime", -(10**5000), ValueError, "at most 1e+300", UNLIMITED, "or None"),
    option("validate_after", 10**400, ValueError, "at most 1e+300", UNLIMITED, "or None"),
    option("leak_timeout", 10**301, ValueError, "at most 9.22337e+09 seconds", "or None"),
    option("reconnect_delay", 10**301, ValueError, "than 0 and at most 9.22337e+09 seconds"),
    option("reconnect_max_delay", 10**400, ValueError, "at most 9.22337e+09 seconds"),
    option("reconnect_max_delay", 10**10, ValueError, "at most 9.22337e+09 seconds"),
    option("idle_timeout", "600", TypeError, "must be a number of seconds or None"),
    option("idle_timeout", True, TypeError, "must be a number of seconds or None"),
    option("idle_timeout", 0, ValueError, "must be greater than 0", "None"),
    option("idle_timeout", -1, ValueError, "must be greater than 0"),
    option("idle_timeout", NAN, ValueError, "must be greater than 0"),
    option("max_lifetime", "3600", TypeError, "must be a number of seconds or None"),
    option("max_lifetime", False, TypeError, "must be a number of seconds or None"),
    option("max_lifetime", 0, ValueError, "must be greater than 0", "None"),
    option("max_lifetime", -5, ValueError, "must be greater than 0"),
    option("max_lifetime", NAN, ValueError, "must be greater than 0"),
    option("validate_after", "1", TypeError, "must be a number of seconds or None"),
    option("validate_after", True, TypeError, "must be a number of seconds or None"),
    option("validate_after", -1, ValueError, "must be 0 or more"),
    option("validate_after", NAN, ValueError, "must be 0 or more"),
    option("validate_after", -INF, ValueError, "must be 0 or more"),
    option("reconnect_delay", None, TypeError, "must be a number of seconds"),
    option("reconnect_delay", "0.1", TypeError, "must be a number of seconds"),
    option("reconnect_delay", 0, ValueError, "must be greater than 0"),
    option("reconnect_delay", -0.1, ValueError, "must be greater than 0"),
    option("reconnect_delay", NAN, ValueError, "must be greater than 0"),
    option("reconnect_delay", INF, ValueError, "must be at most", "inf"),
    option("reconnect_max_delay", None, TypeError, "must be a number of seconds"),
    option("reconnect_max_delay", -1, ValueError, "must be greater than 0"),
    option("reconnect_max_delay", NAN, ValueError, "must be greater than 0"),
    option("reconnect_max_delay", INF, ValueError, "must be at most"),
    option("reconnect_max_delay", 1, ValueError, "(1)", "reconnect_delay (2)", reconnect_delay=2),
    option("leak_timeout", "30", TypeError, "must be a number of seconds or None"),
    option("leak_timeout", True, TypeError, "must be a number of seconds or None"),
    option("leak_timeout", 0, ValueError, "must be greater than 0", "None"),
    option("leak_timeout", NAN, ValueError, "must be greater than 0"),
    option("leak_timeout", INF, ValueError, "must be at most", "(or None to disable it)", "inf"),
    # session_reset: a str of the two names, or None
    option("session_reset", 1, TypeError, "must be None, 'discard' or 'reconnect'", "got 1"),
    option("session_reset", True, TypeError, "must be None, 'discard' or 'reconnect'"),
    option("session_reset", ["discard"], TypeError, "must be None, 'discard' or 'reconnect'"),
    option("session_reset", "DISCARD", ValueError, "must be None, 'discard' or 'reconnect'"),
    option("session_reset", "", ValueError, "must be None, 'discard' or 'reconnect'"),
    # the rest
    option(
        "dialect", "oracle", ValueError, "unknown dialect 'oracle'", "sqlite3", "Dialect instance"
    ),
    option("dialect", "", ValueError, "unknown dialect ''", "use one of"),
    option("dialect", 3, TypeError, "must be a dbpool.dialects.Dialect", "a dialect name or None"),
    option("dialect", sqlite3, TypeError, "must be a dbpool.dialects.Dialect"),
    option("name", 7, TypeError, "must be a str or None"),
    option("name", b"orders", TypeError, "must be a str or None"),
    # an empty name made threads "dbpool-reaper-" and metrics labelled pool=""
    option("name", "", ValueError, "must not be empty", "None"),
    option("name", " \t\n", ValueError, "must not be empty", "None"),
]


@pytest.mark.parametrize(("options", "error", "words"), BAD_OPTIONS)
def test_bad_option_is_refused_before_anything_starts(
    fake_server: fakedb.Server,
    options: dict[str, Any],
    error: type[Exception],
    words: tuple[str, ...],
) -> None:
    threads = dbpool_threads()
    refused(lambda: dbpool.Pool(fake_server.connect, **options), error, words)
    assert fake_server.connect_attempts == 0
    assert dbpool_threads() <= threads, "a background thread was started for a refused pool"


@pytest.mark.parametrize(
    ("connect", "words"),
    [
        pytest.param(
            "host=db dbname=app", ("connect must be a callable", "lambda"), id="dsn-string"
        ),
        # psycopg_pool's pools take a URL or connection string where dbpool takes a function
        pytest.param(
            "postgresql://app@db/app",
            ("got a str", "dbpool.create_pool(url)", "lambda: psycopg.connect(dsn)"),
            id="url-string",
        ),
        pytest.param(None, ("connect must be a callable",), id="None"),
        pytest.param(fakedb.Server().connect(), ("connect must be a callable",), id="a-connection"),
    ],
)
def test_connect_that_is_not_callable_is_refused(connect: Any, words: tuple[str, ...]) -> None:
    threads = dbpool_threads()
    refused(lambda: dbpool.Pool(connect), TypeError, words)
    assert dbpool_threads() <= threads


def test_a_driver_connection_given_for_connect_is_refused_though_callable(
    tmp_path: Path,
) -> None:
    # sqlite3's connections are callable (they make statements): Pool(sqlite3.connect(...))
    # would otherwise fail only at the first connect, with "function takes exactly 1 argument"
    conn = sqlite3.connect(tmp_path / "app.sqlite3", check_same_thread=False)
    try:
        threads = dbpool_threads()
        refused(
            lambda: dbpool.Pool(conn),
            TypeError,
            ("connect must be a callable", "sqlite3 connection", "lambda: sqlite3.connect("),
        )
        assert dbpool_threads() <= threads
        assert conn.total_changes == 0 and not conn.in_transaction
    finally:
        conn.close()


def test_connect_that_returns_none_fails_the_connect_and_holds_no_place() -> None:
    """A connect callable that forgets its ``return``.  The pool marks a slot still being
    opened with None: its connection handed to a waiter was taken for a place to open one
    in, and opened again over it (``in_use`` 2 and ``opening`` -1 with ``max_size=1``)."""
    with dbpool.Pool(lambda: None, min_size=0, max_size=1, acquire_timeout=NO_HANG) as pool:
        refused(pool.connection, TypeError, ("connect returned None", "return"))
        s = pool.stats()
        assert (s.size, s.idle, s.in_use, s.opening, s.connect_errors) == (0, 0, 0, 0, 1), s


def test_misspelled_or_positional_option_is_refused(fake_server: fakedb.Server) -> None:
    threads = dbpool_threads()
    refused(
        lambda: dbpool.Pool(fake_server.connect, max_sise=3),
        TypeError,
        ("'max_sise'", "did you mean 'max_size'?", "acquire_timeout, check"),
    )
    refused(
        lambda: dbpool.Pool(fake_server.connect, 3),
        TypeError,
        ("only positional argument", "by name", "Pool(connect, max_size=10)"),
    )
    refused(lambda: dbpool.Pool(fake_server.connect, frobnicate=1), TypeError, ("'frobnicate'",))
    assert fake_server.connect_attempts == 0
    assert dbpool_threads() <= threads
    with dbpool.Pool(connect=fake_server.connect, min_size=0) as pool:  # by name, as written
        assert pool.stats().max_size == 10


@pytest.mark.parametrize(
    ("name", "words"),
    [
        # SQLAlchemy's create_engine() and pools
        ("pool_size", ("max_size", "min_size")),
        ("max_overflow", ("max_size", "no overflow")),
        ("pool_recycle", ("max_lifetime",)),
        ("pool_pre_ping", ("validate_after=0",)),
        ("reset_on_return", ("rolled back on return",)),
        ("creator", ("first argument",)),
        ("connect_args", ("connect callable", "functools.partial")),
        ("echo", ("'dbpool' logger",)),
        ("echo_pool", ("'dbpool' logger",)),
        ("logging_name", ("(in dbpool: name)",)),
        ("pool_logging_name", ("(in dbpool: name)",)),
        ("events", ("add_listener()", "hooks")),
        ("pool_events", ("add_listener()", "hooks")),
        ("poolclass", ("one pool", "NullPool")),
        ("isolation_level", ("pool.transaction(isolation=...)", "configure")),
        # psycopg_pool
        ("timeout", ("acquire_timeout",)),
        ("max_idle", ("idle_timeout",)),
        ("kwargs", ("functools.partial",)),
        ("reconnect_failed", ("stats().connect_errors", "health()")),
        ("open", ("open once made", "wait()", "reopen()")),
        ("close_returns", ("always returns",)),
        ("num_workers", ("threads of their own",)),
        # DBUtils' PooledDB
        ("maxconnections", ("max_size",)),
        ("mincached", ("min_size",)),
        ("setsession", ("configure",)),
        ("maxusage", ("max_lifetime", "by age")),
        ("maxshared", ("never lent to two borrowers",)),
        ("failures", ("told broken by its state",)),
        ("isfatal", ("told broken by its state",)),
    ],
)
def test_another_pools_option_is_told_what_to_write_instead(
    fake_server: fakedb.Server, name: str, words: tuple[str, ...]
) -> None:
    """Python's own error named the option only; one from the pools users move from says
    which of dbpool's options does its job (or that none is needed), through create_pool() and
    the presets too, and never guesses a near name (maxusage is no max_size)."""
    threads = dbpool_threads()
    expected = (f"takes no option {name!r} (in dbpool: ", *words)
    exc = refused(lambda: dbpool.Pool(fake_server.connect, **{name: 1}), TypeError, expected)
    assert "did you mean" not in str(exc)
    refused(lambda: dbpool.create_pool("sqlite:///app.db", **{name: 1}), TypeError, expected)
    refused(lambda: dbpool.presets.production(**{name: 1}), TypeError, (*expected[1:], name))
    assert fake_server.connect_attempts == 0
    assert dbpool_threads() <= threads


def test_a_subclass_takes_options_of_its_own(fake_server: fakedb.Server) -> None:
    """The check of Pool()'s options is Pool's: a subclass whose __init__ takes more still
    gets them."""

    class Tagged(dbpool.Pool[Any]):
        def __init__(self, connect: Callable[[], Any], *, tag: str, **options: Any) -> None:
            super().__init__(connect, **options)
            self.tag = tag

    with Tagged(fake_server.connect, tag="reports", min_size=0) as pool:
        assert pool.tag == "reports" and pool.stats().max_size == 10
    with pytest.raises(TypeError, match="max_sise"):
        Tagged(fake_server.connect, tag="reports", max_sise=3)


def test_pools_signature_is_its_options() -> None:
    """help(), IDEs that introspect, and the API docs read a class's signature from __new__
    first: Pool's (the options check) shows Pool's options all the same, and a subclass's own
    __init__ shows its own."""
    import inspect

    parameters = inspect.signature(dbpool.Pool).parameters
    first, *options = parameters
    assert first == "connect" and set(options) == dbpool.pool.POOL_OPTIONS
    assert parameters["max_size"].default == 10

    class Tagged(dbpool.Pool[Any]):
        def __init__(self, connect: Callable[[], Any], *, tag: str) -> None:
            super().__init__(connect)

    assert list(inspect.signature(Tagged).parameters) == ["connect", "tag"]


@pytest.mark.parametrize(
    "name", ["acquire_timeout", "idle_timeout", "max_lifetime", "validate_after"]
)
def test_infinite_times_are_accepted_where_they_mean_no_limit(
    fake_server: fakedb.Server, name: str
) -> None:
    # The contrast to the table above: these read as "wait as long as it takes" / "never",
    # as docs/configuration.rst says; only the reconnect delays, leak_timeout and transaction
    # deadlines must be finite.
    with dbpool.Pool(fake_server.connect, min_size=0, **{name: INF}) as pool:
        works(pool)


# -- wrong calls on a live pool --------------------------------------------------------------------


def call(
    id: str, run: Callable[[dbpool.Pool[Any]], object], error: type[Exception], *words: str
) -> Any:
    return pytest.param(run, error, words, id=id)


def _block(tx: Any) -> None:
    raise AssertionError("the transaction body ran")


BAD_CALLS = [
    call(
        "connection-timeout=-1",
        lambda p: p.connection(timeout=-1),
        ValueError,
        "timeout must be 0 or more",
        "-1",
    ),
    call(
        "connection-timeout='x'",
        lambda p: p.connection(timeout="x"),
        TypeError,
        "timeout must be a number of seconds",
        "'x'",
    ),
    call(
        "connection-timeout=10**400",
        lambda p: p.connection(timeout=10**400),
        ValueError,
        "timeout must be 0 or more and at most 1e+300 seconds",
        UNLIMITED,
    ),
    call(
        "wait-timeout=10**400",
        lambda p: p.wait(timeout=10**400),
        ValueError,
        "timeout must be 0 or more and at most 1e+300 seconds",
        UNLIMITED,
    ),
    call(
        "health-timeout=10**400",
        lambda p: p.health(timeout=10**400),
        ValueError,
        "timeout must be 0 or more and at most 1e+300 seconds",
        UNLIMITED,
    ),
    call(
        "connection-timeout=nan",
        lambda p: p.connection(timeout=NAN),
        ValueError,
        "timeout must be 0 or more",
        "nan",
    ),
    call(
        "connection-timeout=-inf",
        lambda p: p.connection(timeout=-INF),
        ValueError,
        "timeout must be 0 or more",
    ),
    call(
        "connection-timeout=True",
        lambda p: p.connection(timeout=True),
        TypeError,
        "timeout must be a number of seconds",
    ),
    call(
        "connect-timeout='x'",
        lambda p: p.connect(timeout="x"),
        TypeError,
        "timeout must be a number of seconds",
    ),
    call("wait-timeout=-1", lambda p: p.wait(timeout=-1), ValueError, "timeout must be 0 or more"),
    call(
        "wait-timeout='x'",
        lambda p: p.wait(timeout="x"),
        TypeError,
        "timeout must be a number of seconds",
    ),
    call(
        "wait-timeout=nan", lambda p: p.wait(timeout=NAN), ValueError, "timeout must be 0 or more"
    ),
    call(
        "wait-timeout=None",
        lambda p: p.wait(timeout=None),
        TypeError,
        "timeout must be a number of seconds",
        "None",
    ),
    call(
        "close-timeout=-1", lambda p: p.close(timeout=-1), ValueError, "timeout must be 0 or more"
    ),
    call(
        "close-timeout='x'",
        lambda p: p.close(timeout="x"),
        TypeError,
        "timeout must be a number of seconds or None",
    ),
    call(
        "close-timeout=nan", lambda p: p.close(timeout=NAN), ValueError, "timeout must be 0 or more"
    ),
    call(
        "transaction-isolation='NOT A LEVEL'",
        lambda p: p.transaction(isolation="NOT A LEVEL"),
        ValueError,
        "unknown isolation level 'NOT A LEVEL'",
        "use one of",
        "'SERIALIZABLE'",
        "dbpool.Isolation",
    ),
    call(
        "transaction-isolation=42",
        lambda p: p.transaction(isolation=42),
        ValueError,
        "unknown isolation level 42",
        "use one of",
    ),
    call(
        "transaction-timeout=0",
        lambda p: p.transaction(timeout=0),
        ValueError,
        "timeout must be a finite number of seconds above 0",
    ),
    call(
        "transaction-timeout=-1",
        lambda p: p.transaction(timeout=-1),
        ValueError,
        "timeout must be a finite number of seconds above 0",
    ),
    call(
        "transaction-timeout=10**400",
        lambda p: p.transaction(timeout=10**400),
        ValueError,
        "timeout must be a finite number",
    ),
    call(
        "run_transaction-timeout=-10**5000",
        lambda p: p.run_transaction(_block, timeout=-(10**5000)),
        ValueError,
        "timeout must be a finite number",
    ),
    call(
        "transaction-timeout=nan",
        lambda p: p.transaction(timeout=NAN),
        ValueError,
        "timeout must be a finite number",
    ),
    call(
        "transaction-timeout=inf",
        lambda p: p.transaction(timeout=INF),
        ValueError,
        "timeout must be a finite number",
    ),
    call(
        "transaction-timeout='5'",
        lambda p: p.transaction(timeout="5"),
        TypeError,
        "timeout must be a number of seconds or None",
    ),
    call(
        "transaction-readonly='yes'",
        lambda p: p.transaction(readonly="yes"),
        TypeError,
        "readonly must be True or False",
        "'yes'",
    ),
    call(
        "transaction-readonly=1",
        lambda p: p.transaction(readonly=1),
        TypeError,
        "readonly must be True or False",
    ),
    call(
        "run_transaction-retries=-1",
        lambda p: p.run_transaction(_block, retries=-1),
        ValueError,
        "retries",
        "0 or more",
        "-1",
    ),
    call(
        "run_transaction-retries='3'",
        lambda p: p.run_transaction(_block, retries="3"),
        TypeError,
        "retries must be an int",
    ),
    call(
        "run_transaction-retries=1.5",
        lambda p: p.run_transaction(_block, retries=1.5),
        TypeError,
        "retries must be an int",
    ),
    call(
        "run_transaction-isolation",
        lambda p: p.run_transaction(_block, isolation="NOT A LEVEL"),
        ValueError,
        "unknown isolation level",
    ),
    call(
        "run_transaction-timeout=0",
        lambda p: p.run_transaction(_block, timeout=0),
        ValueError,
        "timeout must be a finite number",
    ),
    # the function is checked like the options: before a connection is taken
    call(
        "run_transaction-fn='SELECT 1'",
        lambda p: p.run_transaction("SELECT 1"),
        TypeError,
        "callable",
        "<class 'str'>",  # the type, not the value: a statement may hold a password
    ),
    call(
        "run_transaction-fn=None", lambda p: p.run_transaction(None), TypeError, "callable", "None"
    ),
    call(
        "release('not a lease')",
        lambda p: p.release("not a lease"),
        TypeError,
        "release() takes the dbpool.Connection",
        "str",
    ),
    call(
        "release(None)",
        lambda p: p.release(None),
        TypeError,
        "release() takes the dbpool.Connection",
    ),
    call(
        "release(conn.raw)",
        lambda p: p.release(fakedb.Server().connect()),
        TypeError,
        "release() takes the dbpool.Connection",
        "FakeConnection",
    ),
]


@pytest.mark.parametrize(("run", "error", "words"), BAD_CALLS)
def test_bad_call_is_refused_and_leaves_the_pool_as_it_was(
    pool: dbpool.Pool[Any],
    fake_server: fakedb.Server,
    run: Callable[[dbpool.Pool[Any]], object],
    error: type[Exception],
    words: tuple[str, ...],
) -> None:
    before = Snapshot.of(pool, fake_server)
    refused(lambda: run(pool), error, words)
    before.unchanged(pool, fake_server)
    works(pool)


@pytest.mark.parametrize(
    ("run", "error", "words"),
    [c for c in BAD_CALLS if c.id.startswith(("connection-", "connect-"))],
)
def test_bad_call_while_holding_a_lease_leaves_the_lease_usable(
    pool: dbpool.Pool[Any],
    fake_server: fakedb.Server,
    run: Callable[[dbpool.Pool[Any]], object],
    error: type[Exception],
    words: tuple[str, ...],
) -> None:
    with pool.connection() as conn:
        before = Snapshot.of(pool, fake_server)
        refused(lambda: run(pool), error, words)
        before.unchanged(pool, fake_server)
        conn.cursor().execute("select 1")
    works(pool)


# -- releasing twice, or to the wrong pool ---------------------------------------------------------


def test_closing_a_lease_twice_and_leaving_with_after_close_do_nothing(
    pool: dbpool.Pool[Any], fake_server: fakedb.Server
) -> None:
    conn = pool.connection()
    conn.close()
    after_first = Snapshot.of(pool, fake_server)
    conn.close()
    after_first.unchanged(pool, fake_server)
    with pool.connection() as conn:
        conn.close()
        closed_inside = Snapshot.of(pool, fake_server)
    closed_inside.unchanged(pool, fake_server)  # leaving the block returned nothing twice
    assert conn.released
    works(pool)


@pytest.mark.parametrize("returned_by", ["close", "release", "with"])
def test_explicit_release_of_a_returned_lease_raises(
    pool: dbpool.Pool[Any], fake_server: fakedb.Server, returned_by: str
) -> None:
    if returned_by == "with":
        with pool.connection() as conn:
            pass
    elif returned_by == "close":
        conn = pool.connection()
        conn.close()
    else:
        conn = pool.connection()
        pool.release(conn)
    before = Snapshot.of(pool, fake_server)
    exc = refused(lambda: pool.release(conn), dbpool.LeaseReleased, ())
    assert "already" in str(exc), str(exc)
    before.unchanged(pool, fake_server)
    conn.close()  # close() stays the idempotent way
    before.unchanged(pool, fake_server)
    works(pool)


def test_releasing_to_another_pool_names_both_and_keeps_the_lease(
    pool: dbpool.Pool[Any], fake_server: fakedb.Server
) -> None:
    with dbpool.Pool(fake_server.connect, name="reports", min_size=0, max_size=1) as other:
        conn = pool.connection()
        before = Snapshot.of(pool, fake_server)
        other_before = other.stats()
        refused(
            lambda: other.release(conn),
            dbpool.PoolError,
            ("'orders'", "'reports'", "return it to the pool it came from"),
        )
        before.unchanged(pool, fake_server)
        assert other.stats() == other_before
        assert not conn.released
        cur = conn.cursor()  # still the caller's, still working
        cur.execute("select 1")
        assert cur.fetchall() == [(1,)]
        conn.close()
        s = pool.stats()
        assert (s.in_use, s.idle) == (0, 1)
        assert other.stats() == other_before
    works(pool)


# -- a closed pool ---------------------------------------------------------------------------------


def _enter_transaction(pool: dbpool.Pool[Any]) -> None:
    with pool.transaction():
        raise AssertionError("the transaction body ran on a closed pool")


CLOSED_POOL_CALLS = [
    pytest.param(lambda p: p.connection(), id="connection"),
    pytest.param(lambda p: p.connect(), id="connect"),
    pytest.param(lambda p: p.connection(timeout=0), id="connection-timeout=0"),
    pytest.param(_enter_transaction, id="transaction"),
    pytest.param(lambda p: p.run_transaction(_block), id="run_transaction"),
    pytest.param(lambda p: p.wait(timeout=1), id="wait"),
]


@pytest.mark.parametrize("min_size", [0, 1])
@pytest.mark.parametrize("run", CLOSED_POOL_CALLS)
def test_a_closed_pool_refuses_every_use(
    fake_server: fakedb.Server, run: Callable[[dbpool.Pool[Any]], object], min_size: int
) -> None:
    pool = dbpool.Pool(fake_server.connect, name="closed", min_size=min_size, max_size=1)
    pool.wait(5)
    pool.close()
    before = Snapshot.of(pool, fake_server)
    refused(lambda: run(pool), dbpool.PoolClosed, ("'closed'", "closed"))
    before.unchanged(pool, fake_server)


def test_closing_a_closed_pool_again_is_fine(fake_server: fakedb.Server) -> None:
    pool = dbpool.Pool(fake_server.connect, min_size=1, max_size=1)
    pool.wait(5)
    pool.close()
    before = Snapshot.of(pool, fake_server)
    pool.close()
    pool.close(timeout=0)
    pool.close(timeout=None)
    with pool:
        pass
    before.unchanged(pool, fake_server)
    assert pool.closed


def test_a_lease_the_pool_closed_under_its_borrower_refuses_use(fake_server: fakedb.Server) -> None:
    pool = dbpool.Pool(fake_server.connect, min_size=0, max_size=1)
    conn = pool.connection()
    pool.close(timeout=0)  # closes the leased connection under the borrower
    before = Snapshot.of(pool, fake_server)
    refused(conn.cursor, dbpool.LeaseReleased, ("pool.connection()",))
    conn.close()  # harmless
    before.unchanged(pool, fake_server)


# -- a released lease, and its cursors -------------------------------------------------------------


def use(id: str, run: Callable[[Any, Any], object]) -> Any:
    """A row: ``run(lease, cursor)`` after the lease went back; ``id`` starts with what is used."""
    return pytest.param(
        run, "cursor" if id.startswith(("cursor", "iter(cursor")) else "connection", id=id
    )


LEASE_USES = [
    use("conn.cursor", lambda conn, cur: conn.cursor()),
    use("conn.commit", lambda conn, cur: conn.commit()),
    use("conn.rollback", lambda conn, cur: conn.rollback()),
    use("conn.raw", lambda conn, cur: conn.raw),
    use("conn.execute", lambda conn, cur: conn.execute("select 1")),  # sqlite3's own method
    use("conn.in_transaction", lambda conn, cur: conn.in_transaction),
    use("conn.isolation_level=None", lambda conn, cur: setattr(conn, "isolation_level", None)),
    use("conn.transaction", lambda conn, cur: conn.transaction().__enter__()),
    use("cursor.execute", lambda conn, cur: cur.execute("select 1")),
    use("cursor.executemany", lambda conn, cur: cur.executemany("select ?", [(1,)])),
    use("cursor.fetchone", lambda conn, cur: cur.fetchone()),
    use("cursor.fetchmany", lambda conn, cur: cur.fetchmany(2)),
    use("cursor.fetchall", lambda conn, cur: cur.fetchall()),
    use("iter(cursor)", lambda conn, cur: iter(cur)),
    use("cursor.rowcount", lambda conn, cur: cur.rowcount),
    use("cursor.arraysize=5", lambda conn, cur: setattr(cur, "arraysize", 5)),
    use("cursor.raw", lambda conn, cur: cur.raw),
]


@pytest.mark.parametrize(("run", "what"), LEASE_USES)
def test_a_released_lease_and_its_cursor_refuse_use(
    sqlite_connect: Connector, run: Callable[[Any, Any], object], what: str
) -> None:
    with dbpool.Pool(sqlite_connect, name="lite", min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select 1")
            raw = conn.raw
        before = pool.stats()
        changes = raw.total_changes
        refused(
            lambda: run(conn, cur),
            dbpool.LeaseReleased,
            (
                "this cursor's connection " if what == "cursor" else "this connection ",
                "went back to the pool",
                "pool.connection()",
            ),
        )
        assert pool.stats() == before
        assert raw.total_changes == changes and not raw.in_transaction
        cur.close()  # closing a cursor again is harmless
        conn.close()
        assert pool.stats() == before
        with pool.connection(timeout=1) as again:
            assert again.cursor().execute("select 2").fetchall() == [(2,)]


def test_setting_an_attribute_the_driver_connection_lacks_names_it_and_the_way_out(
    pool: dbpool.Pool[Any],
) -> None:
    with pool.connection() as conn:
        raw = conn.raw
        refused(
            lambda: setattr(conn, "autocomit", True),  # a typo the driver would accept silently
            AttributeError,
            ("autocomit", "FakeConnection", "has no attribute", "conn.raw"),
        )
        assert not hasattr(raw, "autocomit")
        conn.cursor().execute("select 1")
    works(pool)


# -- nested acquire: a thread waiting for itself ---------------------------------------------------


def test_nested_acquire_on_a_pool_of_one_times_out_and_says_why(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, name="solo", min_size=0, max_size=1) as pool:
        with pool.connection():
            before = pool.stats()
            started = time.monotonic()
            exc = refused(
                lambda: pool.connection(timeout=SHORT),
                dbpool.PoolTimeout,
                ("'solo'", f"{SHORT:g} s", "in_use=1", "this thread"),
            )
            assert time.monotonic() - started < NO_HANG
            assert exc.__cause__ is None
            after = pool.stats()
            assert (after.size, after.in_use, after.idle, after.waiting) == (1, 1, 0, 0)
            assert after.timeouts == before.timeouts + 1
        works(pool)


def test_nested_transaction_on_a_pool_of_one_times_out_and_says_why(
    fake_server: fakedb.Server,
) -> None:
    with dbpool.Pool(
        fake_server.connect, name="solo", min_size=0, max_size=1, acquire_timeout=SHORT
    ) as pool:
        with pool.transaction():
            started = time.monotonic()
            refused(lambda: _enter_transaction(pool), dbpool.PoolTimeout, ("'solo'", "this thread"))
            refused(
                lambda: pool.run_transaction(_block), dbpool.PoolTimeout, ("'solo'", "this thread")
            )
            assert time.monotonic() - started < NO_HANG
        works(pool)


def test_timeout_hint_about_this_thread_only_when_it_is_true(fake_server: fakedb.Server) -> None:
    with dbpool.Pool(fake_server.connect, name="busy", min_size=0, max_size=1) as pool:
        taken, done = threading.Event(), threading.Event()

        def hold() -> None:
            with pool.connection():
                taken.set()
                done.wait(NO_HANG)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        try:
            assert taken.wait(NO_HANG)
            exc = refused(lambda: pool.connection(timeout=SHORT), dbpool.PoolTimeout, ("'busy'",))
            assert "this thread" not in str(exc), "another thread holds the connection"
        finally:
            done.set()
            holder.join(NO_HANG)
        wait_until(lambda: pool.stats().in_use == 0)
        works(pool)


# -- transactions on a lease -----------------------------------------------------------------------


def test_transaction_inside_a_transaction_on_one_lease_points_to_savepoints(
    sqlite_connect: Connector,
) -> None:
    with dbpool.Pool(sqlite_connect, name="lite", min_size=0, max_size=2) as pool:
        with pool.connection() as conn:
            conn.execute("create table t (x integer)")
            conn.commit()
            with conn.transaction() as tx:
                tx.execute("insert into t values (1)")
                before = pool.stats()
                for inner in (
                    lambda: conn.transaction(),
                    lambda: conn.transaction(isolation="serializable"),
                ):
                    with pytest.raises(dbpool.PoolError) as info:
                        with inner():
                            raise AssertionError("the inner block ran")
                    assert type(info.value) is dbpool.PoolError
                    assert "already open" in str(info.value) and "tx.savepoint()" in str(info.value)
                assert pool.stats() == before
                tx.execute("insert into t values (2)")  # the outer transaction goes on
            assert conn.execute("select x from t order by x").fetchall() == [(1,), (2,)]
        works(pool)


def test_a_transaction_used_before_its_with_block_says_so_and_takes_nothing(
    pool: dbpool.Pool[Any], fake_server: fakedb.Server
) -> None:
    tx = pool.transaction()  # the 'with' left out
    before = Snapshot.of(pool, fake_server)
    for use in (lambda: tx.execute("select 1"), tx.cursor, tx.savepoint, lambda: tx.connection):
        refused(use, dbpool.PoolError, ("has not started", "with pool.transaction() as tx:"))
    before.unchanged(pool, fake_server)
    with tx:  # it has not run its block yet
        tx.execute("select 1")
    works(pool)


def test_transaction_on_a_lease_with_pending_work_says_to_end_it_first(
    sqlite_connect: Connector,
) -> None:
    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            conn.execute("create table t (x integer)")
            conn.commit()
            conn.execute("insert into t values (1)")
            before = pool.stats()
            refused(
                lambda: conn.transaction().__enter__(),
                dbpool.PoolError,
                ("pending", "commit or roll back"),
            )
            assert pool.stats() == before
            assert conn.raw.in_transaction, "the pending work was touched"
            conn.rollback()
        works(pool)


# -- create_pool with malformed URLs (the full table is in test_url.py) ----------------------------


@pytest.mark.parametrize(
    ("url", "options", "error", "words"),
    [
        pytest.param(42, {}, TypeError, ("must be a str",), id="not-a-str"),
        pytest.param(
            "localhost:5432/app",
            {},
            ValueError,
            ("must start with", "postgresql://"),
            id="no-scheme",
        ),
        pytest.param(
            "oracle://db/app", {}, ValueError, ("unsupported URL scheme 'oracle://'",), id="scheme"
        ),
        pytest.param(
            "postgresql://app@db:port/app", {}, ValueError, ("port must be a number",), id="port"
        ),
        pytest.param("sqlite:///:memory:", {}, ValueError, ("use a file",), id="sqlite-memory"),
        pytest.param(
            "sqlite:///app.sqlite3?mode=ro",
            {},
            ValueError,
            ("unknown sqlite URL parameter 'mode'",),
            id="sqlite-param",
        ),
        pytest.param(
            "sqlite:///app.sqlite3",
            {"max_size": 0},
            ValueError,
            ("max_size must be 1 or more",),
            id="pool-option",
        ),
        pytest.param(
            "sqlite:///app.sqlite3",
            {"max_sise": 3},
            TypeError,
            ("max_sise",),
            id="misspelled-option",
        ),
        pytest.param(
            "sqlite:///app.sqlite3",
            {"connect": lambda: sqlite3.connect("other.sqlite3")},
            TypeError,
            ("create_pool() takes no connect", "the URL makes", "dbpool.Pool(connect, ...)"),
            id="connect-too",
        ),
    ],
)
def test_create_pool_with_a_bad_url_or_option_makes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: Any,
    options: dict[str, Any],
    error: type[Exception],
    words: tuple[str, ...],
) -> None:
    monkeypatch.chdir(tmp_path)
    threads = dbpool_threads()
    refused(lambda: dbpool.create_pool(url, **options), error, words)
    assert list(tmp_path.iterdir()) == [], "a database file was created"
    assert dbpool_threads() <= threads
