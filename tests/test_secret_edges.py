"""Edge cases of secret handling and URL parsing: passwords in unusual forms (percent-encodings
libpq cannot decode or that are no UTF-8, a query-string password followed by more parameters,
ODBC's doubled braces, a dict in a driver error's args) never show in an error, a log line,
``health()`` or the command line's output, and a URL is decoded as the drivers decode it.

None needs a database server: the connects fail before any network traffic, or go to a closed
port.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

import dbpool
from dbpool import __main__ as cli
from dbpool.url import parse_url
from tests.conftest import links

pytestmark = pytest.mark.timeout(20)

CLOSED_PORT = 1  # nothing listens here: a connect that gets that far is refused at once


def token() -> str:
    return uuid.uuid4().hex


def everything(exc: BaseException) -> str:
    """What a user, a log or an error tracker sees of an exception and its chain."""
    parts = ["".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    for current in links(exc):
        parts += [repr(current), str(current), repr(current.args)]
        parts += [repr(getattr(current, name, None)) for name in ("object", "__dict__")]
    return "\n".join(parts)


def fail_through_pool(connect: Any, caplog: pytest.LogCaptureFixture) -> str:
    """Everything a failing connect through a pool shows: the error, health(), the log."""
    caplog.set_level(logging.DEBUG, logger="dbpool")
    with dbpool.Pool(connect, min_size=0, max_size=1) as pool:
        with pytest.raises(Exception) as info:
            pool.connection(timeout=2)
        health = pool.health(timeout=0.5)
    return "\n".join([everything(info.value), repr(health), caplog.text])


# -- connect callables holding a libpq URI -----------------------------------------------------


def test_a_url_password_libpq_cannot_percent_decode_is_scrubbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # libpq quotes the password as written: 'invalid percent-encoded token: "p%41ss%zz-..."'.
    # secrets_in() keeps only the decoded form "pAss%zz-...", so nothing matches it.
    psycopg = pytest.importorskip("psycopg")
    secret = token()
    dsn = f"postgresql://app:p%41ss%zz-{secret}@127.0.0.1:{CLOSED_PORT}/app?connect_timeout=2"
    shown = fail_through_pool(lambda: psycopg.connect(dsn), caplog)
    assert "percent-encoded" in shown
    assert secret not in shown


def test_a_url_password_with_an_unescaped_at_is_scrubbed_where_libpq_splits_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # libpq ends the password at the first "@" and reads the rest as the host: its error
    # quotes "<second half>@127.0.0.1" as the host it could not resolve.
    psycopg = pytest.importorskip("psycopg")
    first, second = f"Sup3r-{token()}", f"Half-{token()}"
    dsn = f"postgresql://app:{first}@{second}@127.0.0.1:{CLOSED_PORT}/app?connect_timeout=2"
    shown = fail_through_pool(lambda: psycopg.connect(dsn), caplog)
    assert "@127.0.0.1" in shown
    assert first not in shown and second not in shown


def test_a_query_string_password_followed_by_more_parameters_is_scrubbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # secrets_in() reads the value of ?password= up to the next space, "&connect_timeout=2"
    # included, so the password alone, which libpq quotes, is no secret form.
    psycopg = pytest.importorskip("psycopg")
    secret = token()
    dsn = (
        f"postgresql://app@127.0.0.1:{CLOSED_PORT}/app?password=100%pure-{secret}&connect_timeout=2"
    )
    shown = fail_through_pool(lambda: psycopg.connect(dsn), caplog)
    assert "percent-encoded" in shown
    assert secret not in shown


def test_a_url_password_that_is_not_utf8_is_scrubbed_from_the_codec_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # %E4 (latin-1 'ä') is no UTF-8: psycopg raises UnicodeDecodeError holding the raw bytes of
    # the password in .object and args; secrets_in() decoded it with errors='replace'.
    psycopg = pytest.importorskip("psycopg")
    secret = token()
    dsn = f"postgresql://app:%E4-{secret}@127.0.0.1:{CLOSED_PORT}/app?connect_timeout=2"
    shown = fail_through_pool(lambda: psycopg.connect(dsn), caplog)
    assert secret not in shown


# -- parse_url -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "postgresql://app:p%E4ss-{s}@db/app",  # a latin-1 percent-encoding
        "mysql://root:%FF%FE{s}@db/app",
        "postgresql://app@db/app?sslpassword=%C3-{s}",
    ],
)
def test_a_percent_encoding_that_is_not_utf8_is_refused_not_replaced(template: str) -> None:
    # unquote() turns the bytes into U+FFFD: the driver gets another password, silently
    secret = token()
    with pytest.raises(ValueError, match="UTF-8") as info:
        parse_url(template.format(s=secret))
    assert secret not in everything(info.value)


def test_an_ipv6_zone_id_is_percent_decoded_as_libpq_does() -> None:
    # RFC 6874 writes fe80::1%eth0 as [fe80::1%25eth0]; libpq decodes it, dbpool did not
    parsed = parse_url("postgresql://app:pw-12345@[fe80::1%25eth0]:5432/app")
    assert parsed.host == "fe80::1%eth0"
    assert parsed.connect_kwargs()["host"] == "fe80::1%eth0"
    assert parse_url(parsed.masked).host == "fe80::1%eth0"


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["bench", "--url=postgresql://app:{s}@db/app"], id="unknown-option"),
        pytest.param(["bench", "--threads", "postgresql://app:{s}@db/app"], id="option-value"),
        pytest.param(["check", "--timeout", "mysql://root:{s}@db/app"], id="timeout-value"),
        pytest.param(
            ["bench", "sqlite:///x.sqlite3", "postgresql://app:{s}@db/app"], id="extra-argument"
        ),
        # a password with spaces, unescaped: the URL still parses, but no pattern finds its end
        pytest.param(["postgresql://app:{s} two words@db/app"], id="url-as-command-spaces"),
        pytest.param(
            ["check", "--timeout", "mysql://root:a {s} b@db/app"], id="timeout-value-spaces"
        ),
        pytest.param(["bench", "--threads=mysql://root:{s} x@db/app"], id="option-equals-spaces"),
        # a space and an unescaped "/", "?" or "#": no longer a URL that parses
        pytest.param(["postgresql://app:a {s}/b@db/app"], id="url-as-command-space-slash"),
        pytest.param(["check", "--timeout", "postgresql://app:a {s}?b@db/app"], id="space-query"),
        pytest.param(["bench", "--threads", "mysql://root:a {s}#b@db/app"], id="space-fragment"),
    ],
)
def test_a_usage_error_does_not_echo_a_password(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    secret = f"Cli-{token()}"
    with pytest.raises(SystemExit) as info:
        cli.main([arg.replace("{s}", secret) for arg in argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert "error:" in err
    assert secret not in out + err


def test_check_masks_a_password_a_driver_error_quotes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # PyMySQL reads read_default_file with configparser; a file missing its [client] header
    # fails with the offending line quoted.  The pool's own log line keeps the first line
    # only and masks password=...; the check command prints every line, unmasked.
    pytest.importorskip("pymysql")
    secret = f"Cnf-{token()}"
    option_file = tmp_path / "my.cnf"
    option_file.write_text(f"password={secret}\n[client]\nuser=root\n")
    url = f"mysql://root@127.0.0.1:{CLOSED_PORT}/test?read_default_file={option_file}"
    code = cli.main(["check", url, "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED
    assert "MissingSectionHeaderError" in err
    assert secret not in out + err


# -- errors a driver raises -----------------------------------------------------------------------


class DriverError(Exception):
    pass


def test_a_dict_in_a_driver_errors_args_is_scrubbed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # scrub_exception() walks str, bytes, tuples and lists in args, not dicts: the
    # connection parameters a driver attaches to its error keep the password
    def connect(**kwargs: Any) -> Any:
        raise DriverError("login failed", dict(kwargs))

    module = types.ModuleType("pymssql")
    module.connect = connect  # type: ignore[attr-defined]
    module.paramstyle = "pyformat"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pymssql", module)
    caplog.set_level(logging.DEBUG, logger="dbpool")
    secret = f"Dict-{token()}"
    with dbpool.create_pool(f"mssql://sa:{secret}@db.example/app", min_size=0) as pool:
        with pytest.raises(DriverError) as info:
            pool.connection(timeout=2)
    assert secret not in everything(info.value) + caplog.text


def test_an_odbc_password_with_an_escaped_brace_is_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # ODBC writes '}' inside a braced value as '}}': PWD={ab}}cd-...} is the password
    # "ab}cd-...".  The pattern stops at the first '}', so secrets_in() finds "ab" (too short
    # to count) and describe() masks "PWD={ab}" only, leaving the rest of the password.
    secret = token()
    dsn = f"DRIVER={{ODBC Driver 18}};SERVER=db;PWD={{ab}}}}cd-{secret}}};UID=sa"
    assert f"PWD={{ab}}}}cd-{secret}}}" in dsn

    def connect(dsn: str) -> Any:
        raise DriverError(f"cannot connect with {dsn}")

    shown = fail_through_pool(functools.partial(connect, dsn), caplog)
    assert "cannot connect with" in shown
    assert secret not in shown


# -- psycopg's connection object on a connect error ------------------------------------------------


def held_by_pgconn(exc: BaseException) -> str:
    """What the libpq connections that ``exc`` and its chain keep show of their parameters:
    psycopg's ``pgconn`` has a repr that hides them, but ``password`` and ``info`` hold them."""
    parts = []
    for current in links(exc):
        pgconn = getattr(current, "pgconn", None)
        if pgconn is not None:
            parts += [repr(pgconn.password), repr(pgconn.info)]
    return "\n".join(parts)


@pytest.mark.parametrize(
    "make_pool",
    [
        pytest.param(
            lambda secret: dbpool.create_pool(
                f"postgresql://app:{secret}@127.0.0.1:{CLOSED_PORT}/app?sslmode=bogus",
                min_size=0,
            ),
            id="url-password",
        ),
        pytest.param(
            lambda secret: dbpool.create_pool(
                f"postgresql://app@127.0.0.1:{CLOSED_PORT}/app?sslmode=bogus&sslpassword={secret}",
                min_size=0,
            ),
            id="url-sslpassword",
        ),
        pytest.param(
            lambda secret: dbpool.Pool(
                functools.partial(
                    sys.modules["psycopg"].connect,
                    host="127.0.0.1",
                    port=CLOSED_PORT,
                    password=secret,
                    sslmode="bogus",
                ),
                min_size=0,
            ),
            id="partial-password",
        ),
    ],
)
def test_a_connect_libpq_refuses_at_once_keeps_no_password_on_the_error(
    make_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # libpq refuses a bad parameter value before it connects ("connection is bad: invalid
    # sslmode value"); psycopg's error then keeps the live connection object, whose repr shows
    # no parameters while its password and info attributes hold them all.
    psycopg = pytest.importorskip("psycopg")
    secret = f"Bad-{token()}"
    with pytest.raises(psycopg.OperationalError) as raw:
        psycopg.connect(host="127.0.0.1", port=CLOSED_PORT, password=secret, sslmode="bogus")
    assert secret in held_by_pgconn(raw.value), "psycopg's error was clean already"
    caplog.set_level(logging.DEBUG, logger="dbpool")
    with make_pool(secret) as pool:
        with pytest.raises(psycopg.OperationalError) as info:
            pool.connection(timeout=2)
    assert "invalid sslmode" in str(info.value)
    assert secret not in everything(info.value) + held_by_pgconn(info.value) + caplog.text


# -- what a pool made from a URL reports besides connect errors ------------------------------------

TYPED_PASSWORD = "Typed-S3cret-in-code"  # as a password written into the code would be


def fake_mssql_url(
    monkeypatch: pytest.MonkeyPatch, fake_server: Any, password: str = TYPED_PASSWORD
) -> str:
    module = types.ModuleType("pymssql")
    module.connect = lambda **kwargs: fake_server.connect_mssql()  # type: ignore[attr-defined]
    module.paramstyle = "pyformat"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pymssql", module)
    return f"mssql://sa:{password}@db.example/app"


def test_a_url_pool_scrubs_its_password_from_what_its_configure_hook_raises(
    monkeypatch: pytest.MonkeyPatch, fake_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A failing configure fails the connect: the pool scrubs what it knows of the error, as
    # it does for a connect callable holding the password.
    secret = f"Hook-{token()}"

    def configure(conn: Any) -> None:
        raise DriverError(f"cannot set up the session of sa:{secret}")

    caplog.set_level(logging.DEBUG, logger="dbpool")
    url = fake_mssql_url(monkeypatch, fake_server, secret)
    with dbpool.create_pool(url, min_size=0, max_size=1, configure=configure) as pool:
        with pytest.raises(DriverError) as info:
            pool.connection(timeout=2)
        health = pool.health(timeout=0.5)
    assert "cannot set up the session" in str(info.value)
    assert secret not in everything(info.value) + repr(health) + caplog.text


def borrow(pool: dbpool.Pool[Any], password: str) -> dbpool.Connection[Any]:
    return pool.connection()


def test_a_url_pools_leak_report_masks_its_password_in_the_borrowers_source_lines(
    monkeypatch: pytest.MonkeyPatch, fake_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import wait_until

    caplog.set_level(logging.DEBUG, logger="dbpool")
    url = fake_mssql_url(monkeypatch, fake_server)
    with dbpool.create_pool(url, min_size=0, max_size=1, leak_timeout=0.05) as pool:
        with borrow(pool, "Typed-S3cret-in-code"):
            report = wait_until(
                lambda: next((r for r in caplog.records if "leak_timeout" in r.getMessage()), None),
                timeout=10,
                message="no leak report was logged",
            )
    text = logging.Formatter().format(report)
    assert 'with borrow(pool, "***")' in text, text
    assert TYPED_PASSWORD not in caplog.text


# -- a callable refused by with_connection() and run_transaction() --------------------------------


async def handle(tx: Any, token: str) -> None:
    """An async handler: refused by the synchronous pool."""


@pytest.mark.parametrize(
    ("call", "says"),
    [
        pytest.param(
            lambda pool, secret: pool.with_connection(functools.partial(handle, token=secret)),
            "a functools.partial of handle is an async function",
            id="with_connection-async-partial",
        ),
        pytest.param(
            lambda pool, secret: pool.run_transaction(functools.partial(handle, token=secret)),
            "a functools.partial of handle returns an awaitable",
            id="run_transaction-async-partial",
        ),
        pytest.param(
            lambda pool, secret: pool.run_transaction(
                functools.partial(lambda tx, token: handle(tx, token), token=secret)
            ),
            "returns an awaitable",
            id="run_transaction-partial-returning-a-coroutine",
        ),
        pytest.param(
            lambda pool, secret: pool.with_connection(f"alter role app password '{secret}'"),
            "got <class 'str'>",
            id="with_connection-sql-string",
        ),
        pytest.param(
            lambda pool, secret: pool.run_transaction(f"alter role app password '{secret}'"),
            "got <class 'str'>",
            id="run_transaction-sql-string",
        ),
    ],
)
def test_a_refused_fn_is_named_not_shown_with_its_arguments(
    fake_server: Any, call: Any, says: str
) -> None:
    # check_callable() names a hook, never quoting its repr: a partial's shows its arguments.
    # These two quoted it, and a value given in place of the function.
    secret = f"Fn-{token()}"
    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        with pytest.raises(TypeError) as info:
            call(pool, secret)
    assert says in str(info.value)
    assert secret not in everything(info.value)


def test_removing_a_listener_that_does_not_listen_names_it_without_its_arguments(
    fake_server: Any,
) -> None:
    secret = f"Hook-{token()}"

    def send(event: Any, token: str) -> None:
        pass

    with dbpool.Pool(fake_server.connect, min_size=0, max_size=1) as pool:
        with pytest.raises(ValueError) as info:
            pool.remove_listener("checkout", functools.partial(send, token=secret))
    assert "a functools.partial of" in str(info.value)
    assert "is not listening to 'checkout' events" in str(info.value)
    assert secret not in everything(info.value)
