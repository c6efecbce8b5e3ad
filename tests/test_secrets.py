"""A password never leaks: a unique canary password appears nowhere dbpool writes or hands out.

The canary (``Canary-S3cr3t-<uuid>``, optionally with characters a URL must percent-encode) is the
password of a database URL given to :func:`dbpool.create_pool`, or of the driver arguments inside
a user's own connect callable.  Each row of the tables below makes one thing happen (leases,
cursors and transactions used; connects refused; a login refused; an acquire or a ``wait()``
timing out after failed connects; a lease held past ``leak_timeout``; the command line) and
collects everything a person or a tool could see afterwards:

* ``repr`` and ``str`` of the pool, its stats, leases, cursors and transactions;
* every record of the ``dbpool`` logger at DEBUG, formatted with its arguments, ``exc_info`` and
  ``stack_info`` by a plain :class:`logging.Formatter`, and the record's raw arguments;
* every exception raised, as ``repr``, ``str`` and the rendered traceback with its whole chain;
* warnings, and the command line's stdout and stderr.

The canary's uuid part is what is searched for: it survives percent-encoding, quoting and
escaping, so a leak in any of those forms is caught.

For URLs, dbpool knows the secret and scrubs the driver's connect errors; the attributes of
those errors are checked too, since error trackers and debuggers show them.  A user's connect
callable shows dbpool its secrets when they are written where it can read them (a
``functools.partial``'s password argument, a connection string the function or lambda holds or
names): then the driver's connect errors are scrubbed as for a URL, even those that quote the
password.  Otherwise the property is that dbpool adds the canary nowhere, on drivers whose own
errors do not carry it.

Parsing, masking and scrubbing of URLs themselves are tested in ``test_url.py``, the command
line in ``test_cli.py``; this module is the cross-cutting check.  Rows on the fake driver (a
fake ``pymssql`` module over :mod:`tests.fakedb`) need no server.
"""

from __future__ import annotations

import functools
import gc
import logging
import sqlite3
import subprocess
import sys
import traceback
import types
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote

import pytest

import dbpool
from tests import _urls, fakedb
from tests.conftest import links, wait_until

pytestmark = pytest.mark.timeout(60)

CLOSED_PORT = 1  # nothing listens on port 1 here: connects to it are refused at once
SHORT = 0.2  # seconds: an acquire or wait deadline meant to pass
CLI_TIMEOUT = 45
FORMATTER = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
ODD = "@/?#%: é'x"  # characters a URL must percent-encode, and a quote


# -- the canary and where it is looked for --------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    token: str  # the unique part: found in the password whatever its encoding
    password: str

    @classmethod
    def new(cls, *, odd: bool = False) -> Canary:
        token = uuid.uuid4().hex
        return cls(token, f"Canary-S3cr3t-{token}" + (ODD if odd else ""))

    @property
    def in_url(self) -> str:
        return quote(self.password, safe="")


@dataclass
class Exposure:
    """Everything one scenario let a person or a tool see, labelled by where it was seen."""

    canary: Canary
    texts: list[tuple[str, str]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def show(self, **objects: object) -> None:
        for name, obj in objects.items():
            self.add(f"repr({name})", repr(obj))
            self.add(f"str({name})", str(obj))

    def error(self, where: str, exc: BaseException) -> None:
        self.errors.append(exc)
        rendered = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.add(f"{where}: rendered traceback", rendered)
        for link in links(exc):
            name = type(link).__name__
            self.add(f"{where}: repr({name})", repr(link))
            self.add(f"{where}: str({name})", str(link))

    def logs(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            where = f"log {record.levelname} {record.msg!r:.60}"
            self.add(where, FORMATTER.format(record))
            self.add(f"{where}: args", repr(record.args))

    def warned(self, caught: list[warnings.WarningMessage]) -> None:
        for w in caught:
            self.add(
                f"warning {w.category.__name__}",
                warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line),
            )

    def leaks(self) -> list[str]:
        return [where for where, text in self.texts if self.canary.token in text]

    def attribute_leaks(self) -> list[str]:
        """Attributes of the exceptions seen (``exc.pgconn``, ``exc.args``, ...) whose repr
        holds the canary."""
        found = []
        for exc in self.errors:
            for link in links(exc):
                for name, value in attributes(link).items():
                    if self.canary.token in repr(value):
                        found.append(f"{type(link).__name__}.{name}")
        return found


def attributes(exc: BaseException) -> dict[str, Any]:
    """What a debugger shows of an exception: its args, its ``__dict__``, and the fields a
    built-in error keeps apart from both (``UnicodeError.object``, ``ImportError.msg``)."""
    found = {"args": exc.args, **getattr(exc, "__dict__", {})}
    for name in dir(exc):
        if name.startswith("__") or name in found:
            continue
        try:
            value = getattr(exc, name)
        except Exception:  # a property of a driver's error that needs what it no longer has
            continue
        if not callable(value):
            found[name] = value
    return found


def dbpool_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    records = [r for r in caplog.records if r.name == "dbpool" or r.name.startswith("dbpool.")]
    assert records, "dbpool logged nothing: the scenario did not run"
    return records


def assert_clean(exposure: Exposure) -> None:
    leaks = exposure.leaks()
    assert not leaks, "the canary password shows in:\n  " + "\n  ".join(leaks)


# -- a fake pymssql module over tests.fakedb -------------------------------------------------------


class ConnInfo:
    """Connection parameters kept on a driver's error, as psycopg keeps ``pgconn`` on its own."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def __repr__(self) -> str:
        return f"ConnInfo({self.params!r})"


class EchoingDriverError(fakedb.OperationalError):
    """A connect error that quotes the password, in its message, its cause and an attribute."""

    def __init__(self, message: str, info: ConnInfo) -> None:
        super().__init__(message)
        self.info = info


def fake_pymssql(
    server: fakedb.Server, *, echo: bool, received: list[dict[str, Any]]
) -> types.ModuleType:
    def connect(**kwargs: Any) -> Any:
        received.append(kwargs)
        if echo:
            password = kwargs.get("password")
            try:
                raise ConnectionRefusedError(f"no route for login {kwargs.get('user')}:{password}")
            except ConnectionRefusedError as cause:
                raise EchoingDriverError(
                    f"login failed: password {password!r} rejected", ConnInfo(kwargs)
                ) from cause
        return server.connect_mssql()

    module = types.ModuleType("pymssql")
    module.connect = connect  # type: ignore[attr-defined]
    module.paramstyle = "pyformat"  # type: ignore[attr-defined]
    return module


# -- scenes: a URL, its pool, and what happens to it -----------------------------------------------


@dataclass
class Scene:
    canary: Canary
    request: pytest.FixtureRequest
    fake: fakedb.Server
    received: list[dict[str, Any]] = field(default_factory=list)  # the fake driver's connects
    exposure: Exposure = field(init=False)

    def __post_init__(self) -> None:
        self.exposure = Exposure(self.canary)


def _assemble(
    scheme: str,
    user: str,
    hostport: str,
    database: str,
    placement: str,
    secret: str,
    query: dict[str, str],
) -> str:
    query = dict(query)
    if placement == "userinfo":
        netloc = f"{user}:{secret}@{hostport}"
    else:
        netloc = f"{user}@{hostport}"
        query[placement] = secret
    tail = "&".join(f"{key}={value}" for key, value in query.items())
    return f"{scheme}://{netloc}/{database}" + (f"?{tail}" if tail else "")


def url_for(scene: Scene, backend: str, placement: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A URL to ``backend`` with the canary as ``placement`` (userinfo, password, sslpassword)."""
    secret = scene.canary.in_url
    if backend.startswith("fake"):
        module = fake_pymssql(scene.fake, echo=backend == "fake-echo", received=scene.received)
        monkeypatch.setitem(sys.modules, "pymssql", module)
        if backend == "fake-down":
            scene.fake.down()
        return _assemble("mssql", "sa", "db.example:1433", "app", placement, secret, {})
    if backend == "postgresql-down":
        return _assemble(
            "postgresql",
            "app",
            f"127.0.0.1:{CLOSED_PORT}",
            "app",
            placement,
            secret,
            {"connect_timeout": "5"},
        )
    if backend == "mysql-down":
        return _assemble(
            "mysql",
            "root",
            f"127.0.0.1:{CLOSED_PORT}",
            "test",
            placement,
            secret,
            {"connect_timeout": "5"},
        )
    if backend == "postgresql":
        dsn = scene.request.getfixturevalue("postgresql_dsn")
        if placement == "userinfo":
            return _urls.postgresql_url(dsn, password=scene.canary.password)
        url = _urls.postgresql_url(dsn)
        return url + ("&" if "?" in url else "?") + f"{placement}={secret}"
    if backend == "mysql":  # the server checks passwords: the canary is refused
        assert placement == "userinfo"
        params = scene.request.getfixturevalue("mysql_params")
        return _urls.mysql_url(params, password=scene.canary.password)
    raise AssertionError(f"unknown backend {backend!r}")


def use_everything(scene: Scene, pool: dbpool.Pool[Any]) -> None:
    """Leases, cursors, a transaction with a savepoint, a broken connection discarded, a lease
    dropped without release: every object shown, every path logged."""
    x = scene.exposure
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("select 1")
        cur.fetchall()
        x.show(pool=pool, lease=conn, cursor=cur, stats=pool.stats())
    x.show(released_lease=conn, closed_cursor=cur)
    with pool.transaction(isolation="serializable", timeout=10) as tx:
        with tx.savepoint():
            tx.execute("select 1").fetchall()
        x.show(transaction=tx)
    x.show(finished_transaction=tx)
    if scene.received:  # the fake driver: break the idle connection, so the pool discards it
        scene.fake.kill_all()
        with pool.connection() as conn:
            conn.cursor().execute("select 1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dropped = pool.connection()
        del dropped
        gc.collect()
    assert caught, "dropping a lease warns"
    x.warned(caught)
    with pool.connection(timeout=5):  # takes the dropped lease back
        pass


def connect_fails(scene: Scene, pool: dbpool.Pool[Any]) -> None:
    with pytest.raises(Exception) as info:
        pool.connection(timeout=5)
    assert not isinstance(info.value, dbpool.PoolError), "the driver's own error passes through"
    scene.exposure.error("connection()", info.value)


def acquire_times_out(scene: Scene, pool: dbpool.Pool[Any]) -> None:
    connect_fails(scene, pool)  # then connects back off, and the next caller waits
    with pytest.raises(dbpool.PoolTimeout) as info:
        pool.connection(timeout=SHORT)
    assert info.value.__cause__ is not None, "the timeout is chained to the connect error"
    scene.exposure.error("connection() after failed connects", info.value)


def wait_times_out(scene: Scene, pool: dbpool.Pool[Any]) -> None:
    wait_until(lambda: pool.stats().connect_errors >= 1, timeout=10)
    with pytest.raises(dbpool.PoolTimeout) as info:
        pool.wait(SHORT)
    assert info.value.__cause__ is not None, "the timeout is chained to the connect error"
    scene.exposure.error("wait()", info.value)


ACTIONS: dict[str, tuple[Callable[[Scene, dbpool.Pool[Any]], None], dict[str, Any]]] = {
    "use": (use_everything, {"min_size": 1, "max_size": 2, "validate_after": 0}),
    "connect": (connect_fails, {"min_size": 0, "max_size": 1}),
    "acquire-timeout": (
        acquire_times_out,
        {"min_size": 0, "max_size": 1, "reconnect_delay": 5, "reconnect_max_delay": 5},
    ),
    "wait-timeout": (
        wait_times_out,
        {"min_size": 1, "max_size": 1, "reconnect_delay": 5, "reconnect_max_delay": 5},
    ),
}

PG = pytest.mark.postgresql
MY = pytest.mark.mysql


def row(backend: str, placement: str, action: str, *marks: Any, odd: bool = False) -> Any:
    label = f"{backend}-{placement}{'-odd' if odd else ''}-{action}"
    return pytest.param(backend, placement, action, odd, marks=marks, id=label)


URL_ROWS = [
    row("fake", "userinfo", "use"),
    row("fake", "userinfo", "use", odd=True),
    row("fake", "password", "use"),
    row("fake-down", "userinfo", "connect"),
    row("fake-down", "userinfo", "acquire-timeout"),
    row("fake-down", "password", "wait-timeout"),
    row("fake-echo", "userinfo", "connect"),
    row("fake-echo", "userinfo", "acquire-timeout", odd=True),
    row("fake-echo", "password", "wait-timeout"),
    row("postgresql-down", "userinfo", "connect"),
    row("postgresql-down", "userinfo", "connect", odd=True),
    row("postgresql-down", "password", "connect"),
    row("postgresql-down", "sslpassword", "connect"),
    row("postgresql-down", "userinfo", "acquire-timeout"),
    row("postgresql-down", "userinfo", "wait-timeout", odd=True),
    row("postgresql", "userinfo", "use", PG),
    row("postgresql", "userinfo", "use", PG, odd=True),
    row("postgresql", "sslpassword", "use", PG),
    row("mysql", "userinfo", "connect", MY),
    row("mysql", "userinfo", "acquire-timeout", MY, odd=True),
    row("mysql", "userinfo", "wait-timeout", MY),
    row("mysql-down", "userinfo", "connect"),
]
FAILING_URL_ROWS = [r for r in URL_ROWS if r.values[2] != "use"]


def run_url_scene(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fake_server: fakedb.Server,
    backend: str,
    placement: str,
    action: str,
    odd: bool,
) -> Scene:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    scene = Scene(Canary.new(odd=odd), request, fake_server)
    url = url_for(scene, backend, placement, monkeypatch)
    run, options = ACTIONS[action]
    with dbpool.create_pool(url, **options) as pool:
        run(scene, pool)
        scene.exposure.show(pool=pool, stats=pool.stats())
    scene.exposure.show(closed_pool=pool, final_stats=pool.stats())
    scene.exposure.logs(dbpool_records(caplog))
    if backend.startswith("fake"):  # the canary did reach the driver, decoded
        assert scene.received and scene.received[0]["password"] == scene.canary.password
    return scene


@pytest.mark.parametrize(("backend", "placement", "action", "odd"), URL_ROWS)
def test_a_url_password_shows_nowhere(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fake_server: fakedb.Server,
    backend: str,
    placement: str,
    action: str,
    odd: bool,
) -> None:
    scene = run_url_scene(
        request, caplog, monkeypatch, fake_server, backend, placement, action, odd
    )
    assert_clean(scene.exposure)


@pytest.mark.parametrize(("backend", "placement", "action", "odd"), FAILING_URL_ROWS)
def test_a_url_password_stays_out_of_the_attributes_of_connect_errors(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fake_server: fakedb.Server,
    backend: str,
    placement: str,
    action: str,
    odd: bool,
) -> None:
    # Error trackers and debuggers show an exception's attributes, not only its message: the
    # scrubbing create_pool promises must reach them (psycopg keeps the connection's parameters,
    # password included, on exc.pgconn).
    scene = run_url_scene(
        request, caplog, monkeypatch, fake_server, backend, placement, action, odd
    )
    assert scene.exposure.errors
    leaks = scene.exposure.attribute_leaks()
    assert not leaks, "the canary password is held by:\n  " + "\n  ".join(leaks)


# -- a lease held past leak_timeout ----------------------------------------------------------------


def hold_a_lease_past_leak_timeout(
    pool: dbpool.Pool[Any], caplog: pytest.LogCaptureFixture
) -> logging.LogRecord:
    def report() -> logging.LogRecord | None:
        for record in caplog.records:
            if record.levelno == logging.WARNING and "leak_timeout" in record.getMessage():
                return record
        return None

    with pool.connection():
        return wait_until(report, timeout=10, message="no leak report was logged")


def test_the_leak_report_shows_the_borrower_but_not_the_password(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fake_server: fakedb.Server,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    scene = Scene(Canary.new(odd=True), request, fake_server)
    url = url_for(scene, "fake", "userinfo", monkeypatch)
    with dbpool.create_pool(url, min_size=0, max_size=1, name="leaky", leak_timeout=0.05) as pool:
        record = hold_a_lease_past_leak_timeout(pool, caplog)
        scene.exposure.show(pool=pool, stats=pool.stats())
    report = FORMATTER.format(record)
    assert "'leaky'" in report
    assert hold_a_lease_past_leak_timeout.__name__ in report, (
        "the report shows where the lease was taken"
    )
    scene.exposure.logs(dbpool_records(caplog))
    assert scene.received[0]["password"] == scene.canary.password
    assert_clean(scene.exposure)


def borrow_for(pool: dbpool.Pool[Any], dsn: str) -> dbpool.Connection[Any]:
    return pool.connection()


def test_the_leak_report_masks_a_password_in_the_borrowers_source_lines(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fake_server: fakedb.Server,
) -> None:
    """The report quotes the source line of each frame on the borrower's stack: a DSN typed
    into the code there (a literal, as here) or the pool's own password is masked in it."""
    caplog.set_level(logging.DEBUG, logger="dbpool")
    scene = Scene(Canary.new(odd=False), request, fake_server)
    url = url_for(scene, "fake", "userinfo", monkeypatch)
    known = scene.canary.password
    with dbpool.create_pool(url, min_size=0, max_size=1, name="leaky", leak_timeout=0.05) as pool:
        with borrow_for(pool, "postgresql://app:Typed1nCode@db/app" + known):
            record = wait_until(
                lambda: next((r for r in caplog.records if "leak_timeout" in r.getMessage()), None),
                timeout=10,
                message="no leak report was logged",
            )
    report = FORMATTER.format(record)
    assert "borrow_for(pool" in report, report  # the line is quoted...
    assert "Typed1nCode" not in report, report  # ...masked
    assert known not in report, report


# -- a user's own connect callable -----------------------------------------------------------------


def psycopg_conninfo_down(canary: Canary, request: pytest.FixtureRequest) -> Callable[[], Any]:
    import psycopg
    from psycopg.conninfo import make_conninfo

    dsn = make_conninfo(
        host="127.0.0.1",
        port=CLOSED_PORT,
        dbname="app",
        user="app",
        password=canary.password,
        connect_timeout=5,
    )
    return lambda: psycopg.connect(dsn)


def psycopg_kwargs_down(canary: Canary, request: pytest.FixtureRequest) -> Callable[[], Any]:
    import psycopg

    return lambda: psycopg.connect(
        host="127.0.0.1",
        port=CLOSED_PORT,
        dbname="app",
        user="app",
        password=canary.password,
        connect_timeout=5,
    )


def psycopg_trusted(canary: Canary, request: pytest.FixtureRequest) -> Callable[[], Any]:
    import psycopg

    dsn = request.getfixturevalue("postgresql_dsn")  # trust authentication: the password is ignored
    return lambda: psycopg.connect(dsn, password=canary.password, connect_timeout=10)


def pymysql_wrong_password(canary: Canary, request: pytest.FixtureRequest) -> Callable[[], Any]:
    import pymysql

    params = {**request.getfixturevalue("mysql_params"), "password": canary.password}
    return lambda: pymysql.connect(**params)


CALLABLE_ROWS = [
    pytest.param(psycopg_conninfo_down, "connect", id="psycopg-dsn-down-connect"),
    pytest.param(psycopg_conninfo_down, "acquire-timeout", id="psycopg-dsn-down-acquire-timeout"),
    pytest.param(psycopg_kwargs_down, "wait-timeout", id="psycopg-kwargs-down-wait-timeout"),
    pytest.param(psycopg_trusted, "use", marks=PG, id="psycopg-trusted-use"),
    pytest.param(pymysql_wrong_password, "connect", marks=MY, id="pymysql-refused-connect"),
    pytest.param(
        pymysql_wrong_password, "acquire-timeout", marks=MY, id="pymysql-refused-acquire-timeout"
    ),
    pytest.param(
        pymysql_wrong_password, "wait-timeout", marks=MY, id="pymysql-refused-wait-timeout"
    ),
]


@pytest.mark.parametrize(("make_connect", "action"), CALLABLE_ROWS)
def test_dbpool_adds_no_password_to_what_a_connect_callable_raises(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    fake_server: fakedb.Server,
    make_connect: Callable[[Canary, pytest.FixtureRequest], Callable[[], Any]],
    action: str,
) -> None:
    canary = Canary.new(odd=True)
    connect = make_connect(canary, request)
    if action != "use":  # the driver's own error must be clean, or nothing here can be
        try:
            connect().close()
        except Exception as exc:
            own = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            assert canary.token not in own + repr(exc), "the driver's own error shows the password"
        else:
            raise AssertionError("the connect was meant to fail")
    caplog.set_level(logging.DEBUG, logger="dbpool")
    scene = Scene(canary, request, fake_server)
    run, options = ACTIONS[action]
    with dbpool.Pool(connect, **options) as pool:
        run(scene, pool)
        scene.exposure.show(pool=pool, stats=pool.stats())
    scene.exposure.show(closed_pool=pool)
    scene.exposure.logs(dbpool_records(caplog))
    assert_clean(scene.exposure)


def psycopg_split_password_partial(
    canary: Canary, request: pytest.FixtureRequest
) -> Callable[[], Any]:
    """A password with an unquoted space: libpq quotes its second word in the parse error."""
    import psycopg

    dsn = f"host=127.0.0.1 port={CLOSED_PORT} user=app password=Canary-S3cr3t {canary.token}"
    return functools.partial(psycopg.connect, dsn, connect_timeout=5)


def psycopg_split_password_lambda(
    canary: Canary, request: pytest.FixtureRequest
) -> Callable[[], Any]:
    import psycopg

    dsn = f"host=127.0.0.1 port={CLOSED_PORT} user=app password=Canary-S3cr3t {canary.token}"
    return lambda: psycopg.connect(dsn)


def psycopg_password_argument_down(
    canary: Canary, request: pytest.FixtureRequest
) -> Callable[[], Any]:
    """Refused: the message is clean, but the error's ``pgconn`` holds the password."""
    import psycopg

    return functools.partial(
        psycopg.connect,
        host="127.0.0.1",
        port=CLOSED_PORT,
        user="app",
        password=canary.password,
        connect_timeout=5,
    )


def echoing_driver_partial(canary: Canary, request: pytest.FixtureRequest) -> Callable[[], Any]:
    """A driver quoting the password in its message, its cause and an attribute."""
    module = fake_pymssql(request.getfixturevalue("fake_server"), echo=True, received=[])
    return functools.partial(module.connect, server="db", user="sa", password=canary.password)


READABLE_CALLABLE_ROWS = [
    pytest.param(psycopg_split_password_partial, "connect", id="psycopg-split-password-partial"),
    pytest.param(
        psycopg_split_password_lambda, "acquire-timeout", id="psycopg-split-password-lambda"
    ),
    pytest.param(psycopg_password_argument_down, "connect", id="psycopg-refused-connect"),
    pytest.param(psycopg_password_argument_down, "wait-timeout", id="psycopg-refused-wait"),
    pytest.param(echoing_driver_partial, "connect", id="echoing-driver-connect"),
    pytest.param(echoing_driver_partial, "acquire-timeout", id="echoing-driver-acquire-timeout"),
]


@pytest.mark.parametrize(("make_connect", "action"), READABLE_CALLABLE_ROWS)
def test_dbpool_scrubs_the_secrets_it_can_read_in_a_connect_callable(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    make_connect: Callable[[Canary, pytest.FixtureRequest], Callable[[], Any]],
    action: str,
) -> None:
    canary = Canary.new()
    connect = make_connect(canary, request)
    try:  # the driver's own error shows the password: the test can fail
        connect().close()
    except Exception as exc:
        seen = Exposure(canary)
        seen.error("the driver", exc)
        assert seen.leaks() or seen.attribute_leaks(), "the driver's error was clean already"
    else:
        raise AssertionError("the connect was meant to fail")
    caplog.set_level(logging.DEBUG, logger="dbpool")
    scene = Scene(canary, request, request.getfixturevalue("fake_server"))
    run, options = ACTIONS[action]
    with dbpool.Pool(connect, **options) as pool:
        run(scene, pool)
        scene.exposure.show(pool=pool, stats=pool.stats(), health=pool.health())
    scene.exposure.logs(dbpool_records(caplog))
    assert_clean(scene.exposure)
    assert not scene.exposure.attribute_leaks()


MODULE_DSN = "host=db user=app password=module-Secret-1 dbname=app"


def _closure_connect() -> Callable[[], Any]:
    dsn = "postgresql://app:closure%2FSecret-2@db/app"
    return lambda: dsn


def _factory_connect(password: str) -> Callable[[], Any]:
    return lambda: dict(host="db", user="app", password=password)


@pytest.mark.parametrize(
    ("connect", "secrets"),
    [
        pytest.param(lambda: MODULE_DSN, {"module-Secret-1"}, id="module-level-name"),
        pytest.param(_closure_connect(), {"closure%2FSecret-2", "closure/Secret-2"}, id="closure"),
        pytest.param(_factory_connect("factory-Secret-7"), {"factory-Secret-7"}, id="factory"),
        pytest.param(
            lambda: "host=db password='quo\\'ted Secret-3' user=app",
            {"quo'ted Secret-3", "Secret-3"},
            id="quoted-constant",
        ),
        pytest.param(
            functools.partial(functools.partial(dict, passwd="kw-Secret-4"), token="tok-5678"),
            {"kw-Secret-4", "tok-5678"},
            id="nested-partial",
        ),
        pytest.param(lambda: "host=db user=app", set(), id="no-password"),
        pytest.param(dict, set(), id="builtin"),
    ],
)
def test_secrets_in_a_connect_callable(connect: Callable[[], Any], secrets: set[str]) -> None:
    from dbpool.redact import secrets_in

    found = secrets_in(connect)
    assert secrets <= set(found)
    # and nothing else: each is a secret, a piece of one, or one as a URL would write it
    assert all(any(unquote(s) in secret for secret in secrets) for s in found)
    assert list(found) == sorted(found, key=len, reverse=True)


def test_what_looks_like_a_password_is_masked_in_what_dbpool_writes() -> None:
    from dbpool.redact import mask_credentials

    text = "bad password=abc here; see postgresql://u:p%40w@db/x and PWD='a b' then"
    assert mask_credentials(text) == (
        "bad password=*** here; see postgresql://u:***@db/x and PWD=*** then"
    )

    def connect() -> Any:
        raise ValueError("cannot parse 'host=db sslpassword=Hidden-6789 user=app'")

    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pytest.raises(ValueError):
            pool.connection(timeout=1)
        assert "sslpassword=***" in str(pool.health())
        assert "Hidden-6789" not in str(pool.health())


PARAMS = {"host": "db", "user": "app", "passwd": "dict-Secret-7"}


@pytest.mark.parametrize(
    ("connect", "secrets"),
    [
        pytest.param(lambda: dict(**PARAMS), {"dict-Secret-7"}, id="module-level-dict"),
        pytest.param(
            functools.partial(dict, dsn="Driver=x;Server=db", PWD="odbc-Secret-8"),
            {"odbc-Secret-8"},
            id="pwd-keyword",
        ),
        pytest.param(lambda: "host=db password=pg", set(), id="too-short"),
        pytest.param(lambda: "host=db password={} user=%s", set(), id="placeholder"),
    ],
)
def test_secrets_in_more_shapes(connect: Callable[[], Any], secrets: set[str]) -> None:
    from dbpool.redact import secrets_in

    assert {unquote(s) for s in secrets_in(connect)} == secrets


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ('login password="two words" refused', "login password=*** refused"),
        ("DRIVER=x;PWD={a b;c};SERVER=db", "DRIVER=x;PWD=***;SERVER=db"),
        ("see postgresql://u:p@ss/w@db/x now", "see postgresql://u:***@db/x now"),
        ("bypass=true max_tokens=5 compass=N", "bypass=true max_tokens=5 compass=N"),
    ],
)
def test_masking_keeps_what_is_no_password(text: str, masked: str) -> None:
    from dbpool.redact import mask_credentials

    assert mask_credentials(text) == masked


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unit", ["pass-", "password", "a://b:", "x=", "pass=pass "])
def test_masking_a_long_hostile_line_ends(unit: str) -> None:
    """The search is linear: a backtracking pattern took 27 s on 4 KB of "pass-"."""
    from dbpool.redact import describe, mask_credentials

    mask_credentials(unit * 20_000)
    assert len(describe(ValueError(unit * 20_000))) < 1100


def test_a_long_line_is_masked_before_it_is_cut() -> None:
    from dbpool.redact import describe

    secret = "straddle-Secret-12"
    line = "x" * 990 + secret + " and postgresql://u:" + "y" * 990 + "@db"
    assert "Secret-12" not in describe(ValueError(line), (secret,))
    assert "straddle" not in describe(ValueError(line), (secret,))
    assert "yyy" not in describe(ValueError("z" * 980 + line[990:]))


def test_a_connect_callable_dbpool_cannot_read_leaves_the_pool_working() -> None:
    class Proxy:  # a lazy proxy: asking for its class runs code
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            raise RuntimeError("not configured")

    proxy = Proxy()

    def connect() -> Any:
        return sqlite3.connect(":memory:", check_same_thread=False, database=proxy)  # type: ignore[call-overload]

    from dbpool.redact import secrets_in

    assert secrets_in(connect) == ()  # the proxy in its closure is left alone
    with dbpool.Pool(connect, min_size=0, max_size=1, name="proxied") as pool:
        assert pool.name == "proxied"


def test_an_error_dbpool_cannot_scrub_still_gives_the_place_back(tmp_path: Path) -> None:
    looped: list[Any] = ["password=loop-Secret-9"]
    looped.append(looped)  # endless nesting
    calls = []

    def connect(password: str) -> Any:
        calls.append(password)
        if len(calls) == 1:
            raise ValueError("refused", looped)
        return sqlite3.connect(tmp_path / "db.sqlite3", check_same_thread=False)

    # min_size=0: the only connects are the caller's, the first of which fails
    with dbpool.Pool(
        functools.partial(connect, password="loop-Secret-9"), min_size=0, max_size=1
    ) as pool:
        with pytest.raises(ValueError):
            pool.connection(timeout=5)
        stats = pool.stats()
        assert (stats.size, stats.opening) == (0, 0)
        with pool.connection(timeout=5):
            pass


def test_error_arguments_of_any_shape_are_scrubbed() -> None:
    import collections

    Pair = collections.namedtuple("Pair", "code detail")
    secret = "shape-Secret-10"
    errors: list[BaseException] = [ValueError(f"login with {secret} failed", Pair(1, secret))]
    if sys.version_info >= (3, 11):
        errors.append(ExceptionGroup("connects", [ValueError(f"pw {secret}")]))  # noqa: F821

    for error in errors:

        def connect(password: str, error: BaseException = error) -> Any:
            raise error

        with dbpool.Pool(
            functools.partial(connect, password=secret), min_size=0, max_size=1
        ) as pool:
            with pytest.raises(BaseException) as info:
                pool.connection(timeout=5)
        seen = Exposure(Canary("Secret-10", secret))
        seen.error("connection()", info.value)
        assert not seen.leaks() + seen.attribute_leaks()
        for link in links(info.value):
            assert "Secret-10" not in repr([link.args, getattr(link, "exceptions", None)])


@pytest.mark.mysql
def test_a_cancel_that_cannot_connect_logs_no_password(
    mysql_params: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MySQL cancels a statement from a second connection; when that connect fails, the
    warning quotes the scrubbed error."""
    import pymysql

    from dbpool.dialects.pymysql import _MySQLTransactions

    # Without the server's own limit (MariaDB's max_statement_time bounds DO SLEEP too), which
    # would otherwise race the cancel and could end the statement before the watchdog looks.
    monkeypatch.setattr(_MySQLTransactions, "limit_time", lambda self, conn, seconds: None)
    monkeypatch.setattr(_MySQLTransactions, "unlimit_time", lambda self, conn, token: None)

    secret = "cancel-Secret-11"
    params = {k: v for k, v in mysql_params.items() if k != "password"}
    calls = []

    def connect(password: str) -> Any:
        calls.append(password)
        if len(calls) > 1:
            raise pymysql.err.OperationalError(1040, f"too many connections (password={password})")
        return pymysql.connect(**params, password=mysql_params["password"])

    caplog.set_level(logging.DEBUG, logger="dbpool")
    with dbpool.Pool(functools.partial(connect, password=secret), max_size=1) as pool:
        with pytest.raises(dbpool.PoolError):
            with pool.transaction(timeout=0.5) as tx:
                tx.execute("DO SLEEP(3)")
    records = dbpool_records(caplog)
    assert any("cancelling a statement" in r.getMessage() for r in records)
    assert not [r for r in records if "Secret-11" in FORMATTER.format(r)]


# -- a password the driver cannot encode ----------------------------------------------------------


def encoding_driver(canary: Canary, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fake pymssql that sends the password in latin-1, as PyMySQL does."""

    def connect(**kwargs: Any) -> Any:
        return kwargs["password"].encode("latin-1")

    module = types.ModuleType("pymssql")
    module.connect = connect  # type: ignore[attr-defined]
    module.paramstyle = "pyformat"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pymssql", module)
    return f"mssql://sa:{canary.in_url}@db.example/app"


def pymysql_down(canary: Canary, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Any]:
    # A mysql:// URL gives PyMySQL such a password as its UTF-8 bytes; a connect callable
    # gives it the str, which it encodes before connecting: no server needed.
    pymysql = pytest.importorskip("pymysql")
    return functools.partial(
        pymysql.connect, host="127.0.0.1", port=CLOSED_PORT, password=canary.password
    )


@pytest.mark.parametrize(
    "make_source", [encoding_driver, pymysql_down], ids=["fake", "pymysql-callable"]
)
def test_a_password_the_driver_cannot_encode_shows_nowhere(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    make_source: Callable[[Canary, pytest.MonkeyPatch], Any],
) -> None:
    # The UnicodeEncodeError holds the whole password in .object, and its str() quotes the
    # character it failed on and where it is, from .object, .start and .end, not from args.
    caplog.set_level(logging.DEBUG, logger="dbpool")
    token = uuid.uuid4().hex
    canary = Canary(token, f"Canary-S3cr3t-{token}\u20ac-x")  # the euro sign is not latin-1
    exposure = Exposure(canary)
    source = make_source(canary, monkeypatch)
    make = dbpool.create_pool if isinstance(source, str) else dbpool.Pool
    with make(source, min_size=0, max_size=1) as pool:
        with pytest.raises(UnicodeEncodeError) as info:
            pool.connection(timeout=5)
        exposure.error("connection()", info.value)
        exposure.show(pool=pool, health=pool.health(timeout=5))
    exposure.logs(dbpool_records(caplog))
    assert_clean(exposure)
    assert not exposure.attribute_leaks()
    assert "u20ac" not in str(info.value), "a character of the password is quoted"


def test_a_password_libpq_cuts_at_a_nul_shows_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    # libpq reads the password as a C string: psycopg's error keeps the part before the NUL.
    # A URL holding one is refused (what follows the NUL would be dropped); a connect callable
    # passes it on.
    psycopg = pytest.importorskip("psycopg")
    caplog.set_level(logging.DEBUG, logger="dbpool")
    token = uuid.uuid4().hex
    canary = Canary(token, f"Canary-S3cr3t-{token}\x00rest")
    exposure = Exposure(canary)
    url = f"postgresql://app:{canary.in_url}@127.0.0.1:{CLOSED_PORT}/app?connect_timeout=5"
    with pytest.raises(ValueError, match="NUL") as refused:
        dbpool.create_pool(url, min_size=0, max_size=1)
    exposure.error("create_pool()", refused.value)

    def connect() -> Any:
        return psycopg.connect(
            host="127.0.0.1", port=CLOSED_PORT, user="app", password=canary.password
        )

    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pytest.raises(Exception) as info:
            pool.connection(timeout=5)
        exposure.error("connection()", info.value)
        exposure.show(pool=pool, health=pool.health(timeout=5))
    exposure.logs(dbpool_records(caplog))
    assert_clean(exposure)
    assert not exposure.attribute_leaks()


# -- the command line ------------------------------------------------------------------------------


CLI_ROWS = [
    pytest.param(("check",), "postgresql-down", "userinfo", False, 1, id="check-postgresql-down"),
    pytest.param(
        ("check",), "postgresql-down", "password", True, 1, id="check-postgresql-down-odd-query"
    ),
    pytest.param(("check",), "postgresql", "userinfo", True, 0, marks=PG, id="check-postgresql"),
    pytest.param(
        ("check",),
        "postgresql",
        "sslpassword",
        False,
        0,
        marks=PG,
        id="check-postgresql-sslpassword",
    ),
    pytest.param(("check",), "mysql", "userinfo", True, 1, marks=MY, id="check-mysql-refused"),
    pytest.param(("check",), "mysql-down", "userinfo", False, 1, id="check-mysql-down"),
    pytest.param(
        ("bench", "--seconds", "0.5", "--threads", "2", "--max-size", "1"),
        "mysql",
        "userinfo",
        False,
        1,
        marks=MY,
        id="bench-mysql-refused",
    ),
    pytest.param(
        ("bench", "--seconds", "0.5", "--threads", "2", "--max-size", "1"),
        "postgresql-down",
        "userinfo",
        True,
        1,
        id="bench-postgresql-down",
    ),
]


@pytest.mark.parametrize(("command", "backend", "placement", "odd", "exit_code"), CLI_ROWS)
def test_the_command_line_never_prints_the_password(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    fake_server: fakedb.Server,
    tmp_path: Path,
    command: tuple[str, ...],
    backend: str,
    placement: str,
    odd: bool,
    exit_code: int,
) -> None:
    scene = Scene(Canary.new(odd=odd), request, fake_server)
    url = url_for(scene, backend, placement, monkeypatch)
    # -vv: the pool's DEBUG log goes to stderr as well
    result = subprocess.run(
        [sys.executable, "-m", "dbpool", "-vv", command[0], url, *command[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    assert result.returncode == exit_code, result.stderr
    assert "***" in result.stdout + result.stderr, "the masked URL is shown"
    assert " dbpool: " in result.stderr, "the pool's log is on"
    scene.exposure.add("stdout", result.stdout)
    scene.exposure.add("stderr", result.stderr)
    assert_clean(scene.exposure)


# -- the collector itself --------------------------------------------------------------------------


def test_the_collector_finds_a_canary_wherever_it_is_put() -> None:
    """Guards the guard: every surface the tests above read does report a canary put there."""
    canary = Canary.new(odd=True)
    logger = logging.getLogger("dbpool.selftest")

    def record(
        msg: str, args: Any = None, exc_info: Any = None, sinfo: str | None = None
    ) -> logging.LogRecord:
        return logger.makeRecord(
            logger.name, logging.WARNING, __file__, 1, msg, args, exc_info, sinfo=sinfo
        )

    try:
        try:
            raise KeyError(canary.password)
        except KeyError as inner:
            raise RuntimeError("could not connect") from inner
    except RuntimeError as exc:
        chained = exc
    surfaces: dict[str, Callable[[Exposure], None]] = {
        "log arguments": lambda x: x.logs([record("password %s", (canary.in_url,))]),
        "log stack_info": lambda x: x.logs(
            [record("held", sinfo=f"  connect({canary.password!r})")]
        ),
        "log exc_info": lambda x: x.logs(
            [record("failed", exc_info=(RuntimeError, chained, chained.__traceback__))]
        ),
        "exception chain": lambda x: x.error("raised", chained),
        "object repr": lambda x: x.show(thing=ConnInfo({"password": canary.password})),
    }
    for name, put in surfaces.items():
        exposure = Exposure(canary)
        put(exposure)
        assert exposure.leaks(), name
    error = ValueError("a clean message")
    error.info = ConnInfo({"password": canary.password})  # type: ignore[attr-defined]
    exposure = Exposure(canary)
    exposure.error("raised", error)
    assert exposure.leaks() == [] and exposure.attribute_leaks() == ["ValueError.info"]
    codec = UnicodeEncodeError("latin-1", canary.password, 0, 1, "ordinal not in range(256)")
    codec.args = ("latin-1", "***", 0, 1, "ordinal not in range(256)")
    exposure = Exposure(canary)
    exposure.error("raised", codec)
    assert exposure.leaks() == [] and exposure.attribute_leaks() == ["UnicodeEncodeError.object"]
