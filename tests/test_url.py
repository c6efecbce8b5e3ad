"""dbpool.url: parsing database URLs, masking their secrets, and create_pool()."""

from __future__ import annotations

import contextlib
import logging
import pickle
import sqlite3
import subprocess
import sys
import threading
import traceback
import types
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest

import dbpool
from dbpool.url import DatabaseURL, URLConnector, create_pool, parse_url
from tests import _urls

CANARY = "canary-Pw-7f3a9c"
# a canary that needs percent-encoding in a URL: @ / ? # % : and a space
ODD_CANARY = "c@n/ary?#%: 9"
ODD_CANARY_ENCODED = "c%40n%2Fary%3F%23%25%3A%209"


def text_of(exc: BaseException) -> str:
    """Everything a user could see of an exception: repr, str and the whole traceback."""
    formatted = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"{exc!r}\n{exc}\n{formatted}"


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets or (CANARY, ODD_CANARY, ODD_CANARY_ENCODED):
        assert secret not in text


@pytest.fixture
def pg_url(postgresql_dsn: str) -> str:
    return _urls.postgresql_url(postgresql_dsn, password=CANARY)


@pytest.fixture
def mysql_canary_url(mysql_params: dict[str, Any]) -> str:
    return _urls.mysql_url(mysql_params, password=CANARY)


# -- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fields", "kwargs"),
    [
        (
            "postgresql://app:pw@db.example:5433/appdb?sslmode=require&application_name=web",
            dict(
                scheme="postgresql",
                host="db.example",
                port=5433,
                user="app",
                password="pw",
                database="appdb",
                query=(("sslmode", "require"), ("application_name", "web")),
            ),
            dict(
                host="db.example",
                port=5433,
                user="app",
                password="pw",
                dbname="appdb",
                sslmode="require",
                application_name="web",
            ),
        ),
        (
            "postgres://u@127.0.0.1/test",
            dict(
                scheme="postgresql",
                host="127.0.0.1",
                port=None,
                user="u",
                password=None,
                database="test",
                query=(),
            ),
            dict(host="127.0.0.1", user="u", dbname="test"),
        ),
        (
            "POSTGRESQL://[::1]:5432/test?autocommit=true&prepare_threshold=none",
            dict(scheme="postgresql", host="::1", port=5432, user=None, database="test"),
            dict(host="::1", port=5432, dbname="test", autocommit=True, prepare_threshold=None),
        ),
        (
            "postgresql:///test?host=/var/run/postgresql&port=5433",
            dict(host="/var/run/postgresql", port=5433, database="test", query=()),
            dict(host="/var/run/postgresql", port=5433, dbname="test"),
        ),
        (
            "postgresql://",
            dict(scheme="postgresql", host=None, port=None, user=None, database=None, query=()),
            {},
        ),
        (
            "mysql://root:pw@127.0.0.1:3306/test?connect_timeout=5&read_timeout=2.5"
            "&autocommit=on&charset=utf8mb4",
            dict(
                scheme="mysql",
                host="127.0.0.1",
                port=3306,
                user="root",
                password="pw",
                database="test",
            ),
            dict(
                host="127.0.0.1",
                port=3306,
                user="root",
                password="pw",
                database="test",
                connect_timeout=5,
                read_timeout=2.5,
                autocommit=True,
                charset="utf8mb4",
            ),
        ),
        (
            "mysql://localhost?db=shop&passwd=pw&user=me",
            dict(host="localhost", user="me", password="pw", database="shop", query=()),
            dict(host="localhost", user="me", password="pw", database="shop"),
        ),
        (
            "mssql://sa:pw@sql.example:1433/master?login_timeout=5&tds_version=7.4",
            dict(scheme="mssql", host="sql.example", port=1433, user="sa", database="master"),
            dict(
                server="sql.example",
                port="1433",
                user="sa",
                password="pw",
                database="master",
                login_timeout=5,
                tds_version="7.4",
            ),
        ),
        (
            "sqlite:///relative/app.sqlite3",
            dict(scheme="sqlite", host=None, database="relative/app.sqlite3", query=()),
            dict(database="relative/app.sqlite3", check_same_thread=False),
        ),
        (
            "sqlite:////var/lib/app.sqlite3?timeout=2.5&isolation_level=none&detect_types=1",
            dict(scheme="sqlite", database="/var/lib/app.sqlite3"),
            dict(
                database="/var/lib/app.sqlite3",
                check_same_thread=False,
                timeout=2.5,
                isolation_level=None,
                detect_types=1,
            ),
        ),
        (
            "sqlite:///app.sqlite3?check_same_thread=false",
            dict(database="app.sqlite3"),
            dict(database="app.sqlite3", check_same_thread=False),
        ),
    ],
)
def test_parse(url: str, fields: dict[str, Any], kwargs: dict[str, Any]) -> None:
    parsed = parse_url(url)
    for name, value in fields.items():
        assert getattr(parsed, name) == value, name
    assert parsed.connect_kwargs() == kwargs


def test_percent_decoding() -> None:
    parsed = parse_url(
        f"postgresql://us%40er%3Ax:{ODD_CANARY_ENCODED}@%2Frun%2Fpostgresql/my%2Fdb%20x"
        "?options=-c%20search_path%3Dapp&application_name=a+b"
    )
    assert parsed.user == "us@er:x"
    assert parsed.password == ODD_CANARY
    assert parsed.host == "/run/postgresql"
    assert parsed.database == "my/db x"
    # '+' is a plus, as in libpq URIs; only %20 is a space
    assert parsed.query == (("options", "-c search_path=app"), ("application_name", "a+b"))
    assert parse_url("sqlite:///data/my%20db%23.sqlite3").database == "data/my db#.sqlite3"


def test_password_with_unescaped_at_and_colon() -> None:
    # the host cannot contain '@' and the first ':' ends the user: no ambiguity
    parsed = parse_url("mysql://me:p@ss:w@rd@db:3306/x")
    assert (parsed.user, parsed.password, parsed.host, parsed.port) == (
        "me",
        "p@ss:w@rd",
        "db",
        3306,
    )


def test_empty_password_is_a_password() -> None:
    parsed = parse_url("postgresql://me:@db/x")
    assert parsed.password == ""
    assert parsed.connect_kwargs()["password"] == ""


def test_query_values_that_name_url_parts_fill_them() -> None:
    parsed = parse_url(f"postgresql://db/x?user=me&password={CANARY}")
    assert (parsed.user, parsed.password, parsed.query) == ("me", CANARY, ())
    assert CANARY not in repr(parsed)


# -- bad URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "must start with"),
        ("db.example:5432/x", "must start with"),
        (f"postgresql:/me:{CANARY}@db/x", "must start with"),
        (f"oracle://me:{CANARY}@db/x", "unsupported URL scheme 'oracle://'"),
        # other libraries' schemes: the driver is chosen by a connect function, not the URL
        (f"postgresql+psycopg2://me:{CANARY}@db/x", "write postgresql://, which always uses"),
        (f"postgresql+psycopg2://me:{CANARY}@db/x", "a function that calls that driver's"),
        (f"postgres+psycopg://me:{CANARY}@db/x", "write postgresql:// (it uses psycopg)"),
        (f"mysql+mysqldb://me:{CANARY}@db/x", "write mysql://, which always uses pymysql"),
        (f"mysql+pymysql://me:{CANARY}@db/x", "write mysql:// (it uses pymysql)"),
        (f"mariadb://me:{CANARY}@db/x", "write mysql:// (it uses pymysql)"),
        ("sqlite3:///x.sqlite3", "write sqlite:/// (it uses sqlite3)"),
        (f"postgresql://me:{CANARY}", "port must be a number"),
        (f"postgresql://me:{CANARY}/x", "port must be a number"),
        (f"postgresql://me:{CANARY}/x@db/x", "percent-encode"),
        (f"postgresql://me:{CANARY}@db:5432/x/y", "just the database name"),
        ("postgresql://me:can/ary-Pw-7f3a9c@db/x", "percent-encode"),
        ("postgresql://me:can?ary-Pw-7f3a9c@db/x", "percent-encode"),
        ("postgresql://me:can#ary-Pw-7f3a9c@db/x", "%23"),
        (f"postgresql://me:{CANARY}@db:99999/x", "port must be a number"),
        (f"postgresql://me:{CANARY}@db:0/x", "port must be a number"),
        (f"postgresql://me:{CANARY}@db:54x/x", "port must be a number"),
        # other scripts' digits and '²' pass str.isdigit(); int() quotes what it cannot read
        (f"postgresql://me:{CANARY}@db:\u0665\u0664\u0663\u0662/x", "port must be a number"),
        (f"postgresql://me:{CANARY}@db:\u00b2/x", "port must be a number"),
        (f"postgresql://me:{CANARY}@db/x?port=\u0665\u0664\u0663\u0662", "port must be a number"),
        (f"postgresql://me:{CANARY}@[::1/x", "closing ']'"),
        # an IPv6 address without brackets reads as a host and a bad port
        (f"postgresql://me:{CANARY}@::1/x", "an IPv6 address goes in brackets: [::1]:5432"),
        (f"postgresql://me:{CANARY}@fe80::1:5432/x", "an IPv6 address goes in brackets"),
        (f"postgresql://me:{CANARY}@h1:5432,h2:5432/x", "several hosts"),
        (f"postgresql://me:{CANARY}@db/x?sslmode", "name=value"),
        (f"postgresql://me:{CANARY}@db/x?a=1&a=2", "given twice"),
        (f"postgresql://me:{CANARY}@db/x?password=other", "password twice"),
        (f"postgresql://me:{CANARY}@db:5432/x?port=5433", "port twice"),
        (f"postgresql://me:{CANARY}@db/x?autocommit=maybe", "'autocommit' must be true or false"),
        (f"mysql://me:{CANARY}@db/x?connect_timeout=soon", "'connect_timeout' must be a number"),
        # a driver takes these, or float() does, and the connect fails (or never times out)
        (f"mysql://me:{CANARY}@db/x?read_timeout=nan", "'read_timeout' must be a finite number"),
        (f"mysql://me:{CANARY}@db/x?write_timeout=inf", "'write_timeout' must be a finite"),
        (f"mysql://me:{CANARY}@db/x?read_timeout=1e400", "'read_timeout' must be a finite"),
        ("sqlite:///x.sqlite3?timeout=nan", "'timeout' must be a finite number"),
        ("sqlite:///x.sqlite3?timeout=-Infinity", "'timeout' must be a finite number"),
        ("sqlite:///x.sqlite3?timeout=1_0", "'timeout' must be a number"),
        ("sqlite:///x.sqlite3?timeout=\u0665", "'timeout' must be a number"),
        (f"mysql://me:{CANARY}@db/x?read_timeout=0", "'read_timeout' must be a number of seconds"),
        (f"mysql://me:{CANARY}@db/x?connect_timeout=1e8", "at most 31536000"),
        (f"mysql://me:{CANARY}@db/x?defer_connect=true", "'defer_connect' must be false"),
        (f"mysql://me:{CANARY}@db/x?db=y", "database twice"),
        # PyMySQL looked the socket's path up as a host name, at every connect
        (f"mysql://me:{CANARY}@%2Frun%2Fmysqld%2Fmysqld.sock/x", "?unix_socket=/run/mysqld"),
        (f"mysql://me:{CANARY}@/x?host=/run/mysqld/mysqld.sock", "give its path as the unix"),
        # PyMySQL takes these as Python objects, and failed on a string later: at every
        # connect ('str' object has no attribute 'get'), or at every cursor()
        (f"mysql://me:{CANARY}@db/x?ssl=true", "cannot give: use ssl_ca, ssl_cert"),
        (f"mysql://me:{CANARY}@db/x?cursorclass=DictCursor", "functools.partial(pymysql"),
        (f"mysql://me:{CANARY}@db/x?conv=x", "'conv' takes a Python object"),
        (f"mysql://me:{CANARY}@db/x?auth_plugin_map=x", "'auth_plugin_map' takes a Python"),
        (f"mssql://me:{CANARY}@db/x?login_timeout=1.5", "whole number"),
        (f"sqlite://me:{CANARY}@host/x.sqlite3", "no host"),
        ("sqlite://", "names no file"),
        ("sqlite:///", "names no file"),
        ("sqlite:///:memory:", "separate, empty database"),
        ("sqlite:///file::memory:?uri=true", "in-memory database"),
        ("sqlite:///FILE::memory:?uri=yes", "in-memory database"),
        ("sqlite:///file:%3Amemory%3A?uri=1", "in-memory database"),
        ("sqlite:///file:app%3Fmode%3Dmemory?uri=true", "in-memory database"),
        ("sqlite:///file:app%3Fmode%3Dmemory%26cache%3Dprivate?uri=on", "in-memory database"),
        # shared, but only while a connection to it is open: the pool replaces its connections
        ("sqlite:///file::memory:%3Fcache%3Dshared?uri=true", "in-memory database"),
        ("sqlite:///file:db%3Fmode%3Dmemory%26cache%3Dshared?uri=true", "in-memory database"),
        ("sqlite:///file:/db%3Fvfs%3Dmemdb?uri=true", "in-memory database"),
        ("sqlite:///file:db%3Fmode%3Drwc%26mode%3Dmemory?uri=true", "in-memory database"),
        ("sqlite:///file:?uri=true", "names no file"),
        ("sqlite:///file::memory:", "in-memory database"),  # a URI even so, on some builds
        ("sqlite:///file://localhost?uri=true", "names no file"),
        ("sqlite:///file:%3Fmode%3Drw?uri=true", "names no file"),
        ("sqlite:///x.sqlite3?check_same_thread=true", "must be false"),
        ("sqlite:///x.sqlite3?mode=ro", "unknown sqlite URL parameter 'mode'"),
    ],
)
def test_bad_url_says_what_to_change_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert says in str(info.value)
    assert_no_secret(text_of(info.value), CANARY, "can/ary", "can?ary", "can#ary")


def test_a_secret_query_value_is_not_quoted_in_errors() -> None:
    with pytest.raises(ValueError) as info:
        parse_url(f"mysql://db/x?ssl_key_password={CANARY}&ssl_key_password=again")
    assert_no_secret(text_of(info.value), CANARY)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app@db/app?password=Zq9&Xk7Wv=Pm4",
        "postgresql://app@db/app?sslmode=disable&password=Zq9&Xk7Wv=Pm4&connect_timeout=5",
        "postgresql://app:pw@db/app?sslpassword=Zq9&Xk7Wv=Pm4",
        "mysql://app@db/app?password=Zq9&Xk7Wv=Pm4",
        "mysql://app@db/app?passwd=Zq9&Xk7Wv=Pm4",
        "mysql://app:pw@db/app?ssl_key_password=Zq9&Xk7Wv=Pm4",
    ],
)
def test_an_unescaped_ampersand_in_a_query_password_is_refused_unshown(url: str) -> None:
    # The rest of the password reads as another parameter, which the driver does not take:
    # the error said so, quoting its name, a piece of the password.
    driver = "psycopg" if url.startswith("postgresql") else "pymysql"
    pytest.importorskip(driver)
    for make in (parse_url, create_pool):
        with pytest.raises(ValueError, match="write it as %26") as info:
            make(url)
        assert_no_secret(text_of(info.value), "Zq9", "Xk7Wv", "Pm4")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://app@db/app?password=Zq9&Xk7Wv", "write an '&' inside a value"),
        ("mysql://app@db/app?password=Zq9&autocommit=Xk7Wv", "must be true or false"),
        ("postgresql://app@db/app?password=Zq9&prepare_threshold=Xk7Wv", "a whole number"),
    ],
)
def test_the_rest_of_a_query_password_cut_at_an_ampersand_is_not_quoted(
    url: str, says: str
) -> None:
    # What follows the '&' is no name=value, or a parameter the driver takes with a value
    # that does not convert, which the error quoted: a piece of the password.
    pytest.importorskip("psycopg" if url.startswith("postgresql") else "pymysql")
    with pytest.raises(ValueError, match=says) as info:
        parse_url(url)
    assert_no_secret(text_of(info.value), "Zq9", "Xk7Wv")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "postgresql://app@db/app?connect_timout=5",
            "'connect_timout' (did you mean 'connect_timeout'?)",
        ),
        ("postgresql://app@db/app?ssl_mode=require", "'ssl_mode' (did you mean 'sslmode'?)"),
        (
            "mysql://app@db/app?conect_timeout=5",
            "'conect_timeout' (did you mean 'connect_timeout'?)",
        ),
        ("mysql://app@db/app?zzzz=1", "parameter 'zzzz': correct it or remove it"),
    ],
)
def test_a_misspelt_driver_parameter_is_told_with_the_name_it_misspells(
    url: str, says: str
) -> None:
    pytest.importorskip("psycopg" if url.startswith("postgresql") else "pymysql")
    with pytest.raises(ValueError) as info:
        create_pool(url)
    assert says in str(info.value)


def test_parameters_after_a_query_password_that_the_driver_takes_are_read() -> None:
    pytest.importorskip("psycopg")
    parsed = parse_url(f"postgresql://app@db/app?password={CANARY}&sslmode=require")
    assert (parsed.password, parsed.query) == (CANARY, (("sslmode", "require"),))


@pytest.mark.parametrize(
    ("url", "pieces"),
    [
        # a '?' in a password of digits before it: "app:2024" reads as host and port
        ("postgresql://app:2024?Tok=Zq9@db.example/app", ("Tok", "Zq9")),
        ("mysql://app:2024?Tok=Zq9@db.example:3306/app", ("Tok", "Zq9")),
        ("postgresql://app:2024?Tok=Zq9@db.example", ("Tok", "Zq9")),
        # an '@' and a '/' or '?' in a password: the '@' ends the user-info too early
        ("postgresql://app:p@ss/w0rd@db.example", ("w0rd",)),
        ("postgresql://app:p@ss/w0rd@db.example/app", ("w0rd",)),
        ("postgresql://app:p@ss?w0rd=1@db.example/app", ("w0rd",)),
    ],
)
def test_a_password_with_unescaped_separators_is_refused_unshown(
    url: str, pieces: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="percent-encode") as info:
        parse_url(url)
    assert_no_secret(text_of(info.value), *pieces)


@pytest.mark.parametrize(
    ("url", "query"),
    [
        (
            "postgresql://me:pw@db/app?application_name=ops@corp",
            (("application_name", "ops@corp"),),
        ),
        ("postgresql://db:5432/app?application_name=ops@corp", (("application_name", "ops@corp"),)),
        ("postgresql://me:pw@db?application_name=ops%40corp", (("application_name", "ops@corp"),)),
    ],
)
def test_an_at_sign_in_a_query_value_after_the_database_is_a_value(
    url: str, query: tuple[tuple[str, str], ...]
) -> None:
    assert parse_url(url).query == query


def test_not_a_string() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        parse_url(b"sqlite:///x.sqlite3")  # type: ignore[arg-type]


# -- masking ---------------------------------------------------------------------------------------


def test_repr_and_str_mask_the_password() -> None:
    parsed = parse_url(f"postgresql://user:{ODD_CANARY_ENCODED}@host:5432/test?sslmode=require")
    assert parsed.masked == "postgresql://user:***@host:5432/test?sslmode=require"
    assert str(parsed) == parsed.masked
    assert repr(parsed) == "DatabaseURL('postgresql://user:***@host:5432/test?sslmode=require')"
    assert parsed.password == ODD_CANARY
    for shown in (repr(parsed), str(parsed), f"{parsed}", f"{parsed!r}", repr([parsed])):
        assert_no_secret(shown)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgres://u@h/d", "postgresql://u@h/d"),
        ("postgresql://u:@h/d", "postgresql://u:***@h/d"),
        ("postgresql://[::1]:5432/d", "postgresql://[::1]:5432/d"),
        ("postgresql://%2Frun%2Fpg/d", "postgresql://%2Frun%2Fpg/d"),
        (
            "mysql://root@127.0.0.1:3306/test?connect_timeout=5",
            "mysql://root@127.0.0.1:3306/test?connect_timeout=5",
        ),
        ("sqlite:///rel/x.sqlite3", "sqlite:///rel/x.sqlite3"),
        ("sqlite:////abs/my%20x.sqlite3?timeout=3", "sqlite:////abs/my%20x.sqlite3?timeout=3"),
        (
            f"postgresql://h/d?sslpassword={CANARY}&sslmode=verify-full",
            "postgresql://h/d?sslpassword=***&sslmode=verify-full",
        ),
    ],
)
def test_masked_form(url: str, masked: str) -> None:
    assert parse_url(url).masked == masked


def test_masked_form_parses_back_to_the_same_url_but_the_password() -> None:
    parsed = parse_url(f"mysql://me:{CANARY}@db.example:3307/shop?charset=utf8mb4&autocommit=1")
    again = parse_url(parsed.masked)
    assert again.password == "***"
    assert (again.user, again.host, again.port, again.database, again.query) == (
        parsed.user,
        parsed.host,
        parsed.port,
        parsed.database,
        parsed.query,
    )


def test_redact_replaces_every_form_of_the_secrets() -> None:
    parsed = parse_url(f"postgresql://u:{ODD_CANARY_ENCODED}@h/d?sslpassword={CANARY}")
    text = f"a {ODD_CANARY} b {ODD_CANARY_ENCODED} c {CANARY} d"
    assert parsed.redact(text) == "a *** b *** c *** d"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:o@127.0.0.1:1/test",
        "postgresql://postgres:pg@127.0.0.1:1/test",
        "mysql://root:ion@127.0.0.1:1/test",
        "postgresql://127.0.0.1:1/test?sslpassword=ab",
    ],
)
def test_a_secret_too_short_to_search_for_leaves_messages_alone(url: str) -> None:
    # Replacing "o" or "pg" everywhere garbles every message and shows the password: as for
    # the passwords read in a connect callable, one shorter than 4 characters is not searched.
    message = 'connection to server at "127.0.0.1", port 1 failed: unable to log in (pg_hba)'
    parsed = parse_url(url)
    assert parsed.redact(message) == message
    connector = URLConnector(parsed, fake_driver(lambda **kwargs: _raise(FakeDriverError(message))))
    with pytest.raises(FakeDriverError) as info:
        connector()
    assert str(info.value) == message


@pytest.mark.parametrize("password", ["o", "pg", "ion", "s3cr", "c@n/ary?#%: 9", "{Tr0ub4dor}"])
def test_a_url_and_a_connect_callable_hide_a_password_alike(password: str) -> None:
    from functools import partial

    from dbpool.redact import scrub_text, secrets_in

    url = parse_url(f"postgresql://u:{quote(password, safe='')}@h/d")
    read = secrets_in(partial(dict, password=password))
    for text in (
        f"refused: {password} on port 1 for session",
        f"refused: {quote(password, safe='')} at on",
    ):
        expected = scrub_text(text, read)
        if password == "{Tr0ub4dor}":  # a template placeholder only where passwords are guessed
            expected = text.replace(password, "***").replace(quote(password, safe=""), "***")
        assert url.redact(text) == expected


@pytest.mark.parametrize(
    "url, part",
    [
        ("postgresql://u:Tr0ub%00adour@h/d?sslmode=require", "password"),
        ("postgresql://u%00x:secret@h/d", "user name"),
        ("postgresql://u@h/d%00b?sslmode=require", "database name"),
        ("postgresql://u@h%00x/d", "host"),
        ("postgresql://u@h/d?application_name=a%00b&sslmode=require", "query parameter"),
        ("postgresql://u@h/d?a%00b=1", "query parameter name"),
        ("mysql://u:Tr0ub\x00adour@h/d", "password"),
        ("sqlite:///tmp/a%00b.db", "file path"),
    ],
)
def test_a_nul_anywhere_in_a_url_is_refused(url: str, part: str) -> None:
    """libpq reads a connection string only up to a NUL, and the other drivers' C libraries
    read each value so: what follows would be dropped, an ``sslmode=require`` with it, and the
    pool would connect in plain text.  Refused, naming the part, never quoting it."""
    with pytest.raises(ValueError, match=f"URL's {part}.* NUL") as info:
        parse_url(url)
    assert "Tr0ub" not in str(info.value) and "secret" not in str(info.value)


@pytest.mark.parametrize(
    "fields, part",
    [
        ({"password": "Tr0ub\x00adour"}, "password"),
        ({"user": "u\x00x"}, "user name"),
        ({"host": "h\x00x"}, "host"),
        ({"database": "d\x00b"}, "database name"),
        ({"query": (("application_name", "a\x00b"),)}, "query parameter"),
        ({"query": (("a\x00b", "1"),)}, "query parameter name"),
    ],
)
def test_a_nul_in_a_url_built_by_hand_is_refused(fields: dict[str, Any], part: str) -> None:
    with pytest.raises(ValueError, match=f"URL's {part}.* NUL") as info:
        DatabaseURL(scheme="postgresql", **fields)
    assert "Tr0ub" not in str(info.value)


@pytest.mark.parametrize("host", ["db%0Aevil", "db%09x", "%0D", "db%7F"])
def test_a_control_character_in_a_host_is_refused(host: str) -> None:
    """No host name holds one, and it would reach error messages and log lines as it is."""
    with pytest.raises(ValueError, match="URL's host holds a control character"):
        parse_url(f"postgresql://u@{host}/d")
    with pytest.raises(ValueError, match="URL's host holds a control character"):
        DatabaseURL(scheme="postgresql", host=unquote(host))


def test_parsed_url_is_frozen_and_picklable() -> None:
    parsed = parse_url(f"postgresql://u:{CANARY}@h/d")
    with pytest.raises(AttributeError):
        parsed.password = "other"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(parsed)) == parsed
    assert hash(parsed) == hash(parse_url(f"postgresql://u:{CANARY}@h/d"))


def test_sqlite_autocommit_only_where_sqlite3_connect_takes_it(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/ac.sqlite3?autocommit=true"
    if sys.version_info >= (3, 12):
        with create_pool(url, min_size=0, max_size=1) as pool:
            with pool.connection() as conn:
                assert conn.raw.autocommit is True
        # autocommit=False always has a transaction open: the pool could never begin one
        with pytest.raises(ValueError, match=r"autocommit=false keeps a transaction open"):
            create_pool(url.replace("=true", "=false"), min_size=0)
    else:  # sqlite3.connect() would refuse it at every connect
        with pytest.raises(ValueError, match=r"'autocommit' needs Python 3\.12") as info:
            create_pool(url, min_size=0)
        assert "isolation_level=none" in str(info.value)


# every keyword of pymysql.connect() that takes a bool or a number, as PyMySQL 1.x documents them
MYSQL_BOOL_KEYS = (
    "autocommit",
    "binary_prefix",
    "compress",
    "local_infile",
    "named_pipe",
    "ssl_disabled",
    "ssl_verify_cert",
    "ssl_verify_identity",
    "use_unicode",
)
MYSQL_NUMBER_KEYS = (
    "client_flag",
    "connect_timeout",
    "max_allowed_packet",
    "read_timeout",
    "write_timeout",
)


@pytest.mark.parametrize("key", MYSQL_BOOL_KEYS)
def test_mysql_booleans_reach_pymysql_as_booleans(key: str) -> None:
    # a string "false" is true to PyMySQL
    assert parse_url(f"mysql://db/x?{key}=false").connect_kwargs()[key] is False
    assert parse_url(f"mysql://db/x?{key}=on").connect_kwargs()[key] is True


def test_mysql_defer_connect_may_only_be_false() -> None:
    assert parse_url("mysql://db/x?defer_connect=off").connect_kwargs()["defer_connect"] is False
    with pytest.raises(ValueError, match=r"'defer_connect' must be false .*connected connection"):
        parse_url("mysql://db/x?defer_connect=1")


@pytest.mark.parametrize("key", MYSQL_NUMBER_KEYS)
def test_mysql_numbers_reach_pymysql_as_numbers(key: str) -> None:
    assert parse_url(f"mysql://db/x?{key}=5").connect_kwargs()[key] == 5


def test_every_bool_and_number_keyword_of_the_installed_pymysql_is_converted() -> None:
    import inspect

    pymysql = pytest.importorskip("pymysql")
    parameters = inspect.signature(pymysql.connect).parameters.values()
    # those whose default is None (named_pipe, read_timeout, ...) are in the lists above
    names = {p.name for p in parameters}
    assert {*MYSQL_BOOL_KEYS, *MYSQL_NUMBER_KEYS} <= names
    typed = {p.name: p.default for p in parameters if type(p.default) in (bool, int, float)}
    del typed["port"]  # a part of the URL
    assert typed, "the signature shows no defaults: read it again"
    for name, default in typed.items():
        value = parse_url(f"mysql://db/x?{name}={'no' if default is False else '1'}")
        assert value.connect_kwargs()[name] == (False if default is False else 1), name


def test_a_mysql_password_outside_ascii_reaches_pymysql_as_its_utf8_bytes() -> None:
    # PyMySQL encodes a str password as latin-1: "ä" as one byte the server refuses, "€" not at
    # all (UnicodeEncodeError); an ASCII one is the same either way, and stays a str
    assert parse_url("mysql://u:p%C3%A4%E2%82%AC@db/x").connect_kwargs()["password"] == (
        "pä€".encode()
    )
    assert parse_url("mysql://u:pw@db/x").connect_kwargs()["password"] == "pw"
    assert parse_url("postgresql://u:p%C3%A4@db/x").connect_kwargs()["password"] == "pä"


@pytest.mark.mysql
@pytest.mark.parametrize("start", ["Pä-", "P€-"], ids=["latin-1", "past-latin-1"])
def test_a_mysql_password_outside_ascii_logs_in(mysql_params: dict[str, Any], start: str) -> None:
    # "Access denied" for the first (PyMySQL sent it in latin-1), UnicodeEncodeError for the
    # second, though each is the password the server has
    import pymysql

    user, password = f"dbpool_utf8_{uuid.uuid4().hex[:8]}", start + uuid.uuid4().hex
    admin = pymysql.connect(**mysql_params)  # utf8mb4: the password is set in UTF-8
    try:
        try:
            admin.cursor().execute("create user %s@'%%' identified by %s", (user, password))
        except pymysql.Error as exc:
            pytest.skip(f"cannot create a user to log in as: {exc}")
        params = {**mysql_params, "user": user, "database": None}
        url = _urls.mysql_url(params, password=password)
        with create_pool(url, min_size=0, max_size=1) as pool:
            assert pool.execute("select current_user()")[0][0].startswith(user)
    finally:
        with contextlib.suppress(pymysql.Error):
            admin.cursor().execute("drop user if exists %s@'%%'", (user,))
        admin.close()


@pytest.mark.mysql
def test_mysql_false_booleans_connect(mysql_params: dict[str, Any]) -> None:
    url = _urls.mysql_url(mysql_params)
    url += ("&" if "?" in url else "?") + "defer_connect=false&named_pipe=false&compress=no"
    with create_pool(url, min_size=0, max_size=1) as pool:
        assert pool.execute("select 1") == [(1,)]


def test_unknown_scheme_in_constructor() -> None:
    with pytest.raises(ValueError, match="unsupported scheme"):
        DatabaseURL(scheme="oracle")


@pytest.mark.parametrize(
    ("fields", "error", "says"),
    [
        (dict(password=12345678), TypeError, "password must be a str or None"),
        (dict(password=CANARY.encode()), TypeError, "password must be a str or None"),
        (dict(host=("db", 5432)), TypeError, "host must be a str or None"),
        (dict(port="5432"), TypeError, "port must be an int or None"),
        (dict(port=True), TypeError, "port must be an int or None"),
        (dict(port=70000), ValueError, "port must be from 1 to 65535"),
        (dict(query={"sslmode": "require"}), TypeError, "tuple of (name, value) pairs"),
        (dict(query=(("sslpassword", 5),)), TypeError, "tuple of (name, value) pairs"),
        (dict(query=(("autocommit", "maybe"),)), ValueError, "'autocommit' must be true or false"),
        (dict(scheme="mysql", query=(("connect_timeout", "soon"),)), ValueError, "a number"),
        (dict(scheme="sqlite", database=":memory:"), ValueError, "separate, empty database"),
        (dict(scheme="sqlite"), ValueError, "names no file"),
        (dict(scheme="mysql", host="/run/mysqld/mysqld.sock"), ValueError, "unix_socket"),
    ],
)
def test_a_url_built_by_hand_is_checked_as_a_parsed_one(
    fields: dict[str, Any], error: type[Exception], says: str
) -> None:
    # these failed later, in create_pool() or at every connect, naming neither the field nor
    # the parameter ("ValueError: a number", "'int' object has no attribute 'partition'")
    fields = {"scheme": "postgresql", "host": "db", "password": CANARY, **fields}
    with pytest.raises(error) as info:
        DatabaseURL(**fields)
    assert says in str(info.value)
    assert CANARY not in text_of(info.value)


# -- drivers ---------------------------------------------------------------------------------------


class FakeDriverError(Exception):
    pass


def _raise(error: BaseException) -> Any:
    raise error


class FakeConnection:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.closed = False

    def cursor(self) -> Any:
        raise NotImplementedError

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def fake_driver(connect: Any) -> types.ModuleType:
    module = types.ModuleType("pymssql")
    module.connect = connect  # type: ignore[attr-defined]
    module.paramstyle = "pyformat"  # type: ignore[attr-defined]
    return module


@pytest.fixture
def fake_mssql(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """A fake ``pymssql`` whose connect records its arguments and returns a FakeConnection."""
    calls: list[dict[str, Any]] = []

    def connect(**kwargs: Any) -> FakeConnection:
        calls.append(kwargs)
        return FakeConnection(**kwargs)

    monkeypatch.setitem(sys.modules, "pymssql", fake_driver(connect))
    yield calls


def test_importing_dbpool_imports_no_driver() -> None:
    code = (
        "import sys, dbpool, dbpool.url, dbpool.__main__\n"
        "loaded = [m for m in ('psycopg', 'pymysql', 'pymssql', 'psycopg2', 'MySQLdb') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_create_pool_imports_the_driver_and_passes_options(
    fake_mssql: list[dict[str, Any]],
) -> None:
    url = f"mssql://sa:{CANARY}@sql.example:1433/master?login_timeout=5"
    with create_pool(url, min_size=0, max_size=3, name="orders", acquire_timeout=2) as pool:
        assert (pool.name, pool.min_size, pool.max_size) == ("orders", 0, 3)
        with pool.connection() as conn:
            assert isinstance(conn.raw, FakeConnection)
        assert_no_secret(repr(pool) + str(pool) + repr(pool.stats()))
    assert fake_mssql == [
        dict(
            server="sql.example",
            port="1433",
            user="sa",
            password=CANARY,
            database="master",
            login_timeout=5,
        )
    ]


def test_create_pool_default_name_is_the_pools(fake_mssql: list[dict[str, Any]]) -> None:
    with create_pool("mssql://db/x", min_size=0) as pool:
        assert pool.name.startswith("pool-")


def test_create_pool_is_public() -> None:
    assert dbpool.create_pool is create_pool


def test_create_pool_accepts_a_parsed_url(fake_mssql: list[dict[str, Any]]) -> None:
    with create_pool(parse_url("mssql://db/x"), min_size=0) as pool:
        pool.connection().close()
    assert fake_mssql == [dict(server="db", database="x")]


def test_bad_pool_options_are_the_pools_errors(fake_mssql: list[dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="min_size"):
        create_pool("mssql://db/x", min_size=5, max_size=2)
    with pytest.raises(TypeError):
        create_pool("mssql://db/x", no_such_option=1)
    assert fake_mssql == []


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymssql", None)  # makes `import pymssql` fail
    with pytest.raises(ValueError) as info:
        create_pool(f"mssql://sa:{CANARY}@db/x")
    message = str(info.value)
    assert "pymssql" in message and "pip install 'dbpool[mssql]'" in message
    assert isinstance(info.value.__cause__, ImportError)
    assert_no_secret(text_of(info.value))


@pytest.mark.parametrize(
    ("scheme", "module", "extra"),
    [("postgresql", "psycopg", "postgresql"), ("mysql", "pymysql", "mysql")],
)
def test_missing_driver_extras(
    monkeypatch: pytest.MonkeyPatch, scheme: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=rf"pip install 'dbpool\[{extra}\]'"):
        create_pool(f"{scheme}://u:{CANARY}@db/x")


def test_connector_takes_no_arguments_and_hides_the_password() -> None:
    calls = []
    connector = URLConnector(
        parse_url(f"mssql://sa:{CANARY}@db/x"), fake_driver(lambda **kw: calls.append(kw) or "conn")
    )
    assert connector() == "conn"
    assert calls == [dict(server="db", user="sa", password=CANARY, database="x")]
    with pytest.raises(TypeError):
        connector("extra")  # type: ignore[call-arg]
    assert repr(connector) == "<URLConnector mssql://sa:***@db/x>"


@pytest.mark.parametrize("charset", ["utf-8", "bogus"])
def test_a_mysql_charset_pymysql_does_not_know_is_refused_at_create_pool(charset: str) -> None:
    # PyMySQL failed at every connect: "'NoneType' object has no attribute 'encoding'"
    pytest.importorskip("pymysql")
    with pytest.raises(ValueError, match="such as utf8mb4") as info:
        create_pool(f"mysql://u:{CANARY}@127.0.0.1:1/x?charset={charset}")
    assert_no_secret(text_of(info.value))


def test_unknown_driver_parameter_is_refused_at_create_pool() -> None:
    with pytest.raises(ValueError, match="'no_such_option'") as info:
        create_pool(f"postgresql://u:{CANARY}@127.0.0.1:1/x?no_such_option=1")
    assert_no_secret(text_of(info.value))
    with pytest.raises(ValueError, match="'no_such_option'"):
        create_pool(f"mysql://u:{CANARY}@127.0.0.1:1/x?no_such_option=1")


# -- a driver error that quotes the password -----------------------------------------------------


def raising_driver(make_error: Any) -> types.ModuleType:
    def connect(**kwargs: Any) -> Any:
        raise make_error(kwargs["password"])

    return fake_driver(connect)


@pytest.mark.parametrize(
    "make_error",
    [
        pytest.param(
            lambda pw: FakeDriverError(f"login failed: password {pw!r} rejected"), id="str"
        ),
        pytest.param(lambda pw: FakeDriverError(18456, f"bad {pw}".encode()), id="bytes-args"),
        pytest.param(lambda pw: FakeDriverError(("nested", [f"pw={pw}"])), id="nested"),
        pytest.param(lambda pw: OSError(13, f"denied for {pw}", f"/tmp/{pw}"), id="oserror"),
    ],
)
def test_driver_error_is_scrubbed_and_keeps_its_class(make_error: Any) -> None:
    connector = URLConnector(
        parse_url(f"mssql://sa:{ODD_CANARY_ENCODED}@db/x"), raising_driver(make_error)
    )
    with pytest.raises(type(make_error("x"))) as info:
        connector()
    assert "***" in repr(info.value.args) + str(info.value)
    assert_no_secret(text_of(info.value) + repr(info.value.args))


def test_a_codec_error_on_the_password_shows_no_piece_of_it() -> None:
    # PyMySQL encodes the password to latin-1: a character outside it raises an error whose
    # str() is built from .object, .start and .end, not from args
    password = f"{CANARY}\u20ac-rest"
    connector = URLConnector(
        parse_url(f"mssql://sa:{quote(password, safe='')}@db/x"),
        fake_driver(lambda **kwargs: kwargs["password"].encode("latin-1")),
    )
    with pytest.raises(UnicodeEncodeError) as info:
        connector()
    error = info.value
    assert (error.object, error.start, error.end) == ("***", 0, 3)
    # neither the character nor where it is in the password
    assert str(error) == "'latin-1' codec can't encode characters in position 0-2: " + (
        "ordinal not in range(256)"
    )
    assert error.args == ("latin-1", "***", 0, 3, "ordinal not in range(256)")
    assert_no_secret(text_of(error), CANARY, "\\u20ac")


def test_a_codec_error_keeps_its_place_outside_the_password() -> None:
    password = f"{CANARY}\u20ac"

    def connect(**kwargs: Any) -> Any:
        (b"user=sa password=%s \xff" % kwargs["password"].encode()).decode("utf-8")

    connector = URLConnector(
        parse_url(f"mssql://sa:{quote(password, safe='')}@db/x"), fake_driver(connect)
    )
    with pytest.raises(UnicodeDecodeError) as info:
        connector()
    assert info.value.object == b"user=sa password=*** \xff"
    assert str(info.value) == (
        "'utf-8' codec can't decode byte 0xff in position 21: invalid start byte"
    )


class SlottedError(Exception):
    __slots__ = ("detail",)


def _slotted(pw: str) -> SlottedError:
    error = SlottedError("login failed")
    error.detail = f"password {pw}"
    return error


# A SyntaxError's end line and column: 3.10+.
_END = (1, 9) if sys.version_info >= (3, 10) else ()


@pytest.mark.parametrize(
    ("make_error", "fields"),
    [
        pytest.param(
            lambda pw: ImportError(f"no module for {pw}", name=pw, path=f"/x/{pw}"),
            ("msg", "name", "path"),
            id="ImportError",
        ),
        pytest.param(
            lambda pw: SyntaxError(f"bad {pw}", (f"conf {pw}", 1, 4, f"pw = {pw}\n", *_END)),
            ("msg", "filename", "text"),
            id="SyntaxError",
        ),
        pytest.param(
            lambda pw: AttributeError("no attribute", name=pw, obj={"password": pw}),
            ("name", "obj"),
            id="AttributeError",
            marks=pytest.mark.skipif(
                sys.version_info < (3, 10), reason="AttributeError's name and obj are new in 3.10"
            ),
        ),
        pytest.param(_slotted, ("detail",), id="slots"),
    ],
)
def test_error_fields_kept_outside_args_are_scrubbed(
    make_error: Any, fields: tuple[str, ...]
) -> None:
    # str() of an ImportError or SyntaxError reads .msg, not args; a traceback shows .text
    connector = URLConnector(
        parse_url(f"mssql://sa:{ODD_CANARY_ENCODED}@db/x"), raising_driver(make_error)
    )
    with pytest.raises(type(make_error("x"))) as info:
        connector()
    assert_no_secret(text_of(info.value))
    for name in fields:
        assert_no_secret(repr(getattr(info.value, name)))


def test_chained_driver_errors_and_attributes_are_scrubbed() -> None:
    class DetailedError(Exception):
        def __init__(self, message: str, detail: str) -> None:
            super().__init__(message)
            self.detail = detail

    def make_error(pw: str) -> Exception:
        try:
            raise ConnectionRefusedError(f"socket for {pw}")
        except ConnectionRefusedError as inner:
            error = DetailedError(f"cannot log in with {pw}", detail=f"tried {pw}")
            error.__cause__ = inner
            return error

    connector = URLConnector(parse_url(f"mssql://sa:{CANARY}@db/x"), raising_driver(make_error))
    with pytest.raises(DetailedError) as info:
        connector()
    assert info.value.detail == "tried ***"
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert_no_secret(text_of(info.value), CANARY)


def test_pool_logs_and_raises_the_scrubbed_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    monkeypatch.setitem(
        sys.modules,
        "pymssql",
        raising_driver(lambda pw: FakeDriverError(f"password {pw} is wrong")),
    )
    with create_pool(f"mssql://sa:{CANARY}@db/x", min_size=0, max_size=1) as pool:
        with pytest.raises(FakeDriverError) as info:
            pool.connection(timeout=1)
        assert "password *** is wrong" in str(info.value)
        texts = [text_of(info.value), repr(pool), str(pool), repr(pool.stats())]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert caplog.records, "the failed connect is logged"
    assert_no_secret("\n".join(texts), CANARY)


def test_pool_timeout_chains_the_scrubbed_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    monkeypatch.setitem(
        sys.modules,
        "pymssql",
        raising_driver(lambda pw: FakeDriverError(f"password {pw} is wrong")),
    )
    with create_pool(f"mssql://sa:{CANARY}@db/x", min_size=1, max_size=1) as pool:
        with pytest.raises(dbpool.PoolTimeout) as info:
            pool.wait(timeout=0.5)
        assert isinstance(info.value.__cause__, FakeDriverError)
        texts = [text_of(info.value), repr(pool), str(pool)]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert "password *** is wrong" in texts[0]
    assert_no_secret("\n".join(texts), CANARY)


# -- real databases --------------------------------------------------------------------------------


def test_sqlite_pool(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    path = tmp_path / "my db.sqlite3"
    url = f"sqlite:///{str(path).replace(' ', '%20')}?timeout=5"
    assert url.startswith("sqlite:////")
    with create_pool(url, min_size=1, max_size=2, name="lite") as pool:
        with pool.connection() as conn:
            assert isinstance(conn.raw, sqlite3.Connection)
            conn.execute("create table t (x integer)")
            conn.execute("insert into t values (1)")
            conn.commit()
        # usable from another thread: the pool connects with check_same_thread=False
        seen: list[Any] = []

        def other_thread() -> None:
            with pool.connection() as c:
                seen.append(c.execute("select x from t").fetchall())

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(10)
        assert seen == [[(1,)]]
        assert pool.name == "lite"
    assert path.exists()


def test_postgresql_with_a_canary_password(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Trust authentication ignores the password; if it is checked, the failure must not show it."""
    caplog.set_level(logging.DEBUG, logger="dbpool")
    texts = []
    with create_pool(pg_url, min_size=1, max_size=2, acquire_timeout=10) as pool:
        texts += [repr(pool), str(pool)]
        try:
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute("select 1")
                assert cur.fetchone() == (1,)
        except Exception as exc:  # the server checks passwords: the error is what we inspect
            texts.append(text_of(exc))
        texts += [repr(pool), str(pool), repr(pool.stats())]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert_no_secret("\n".join(texts), CANARY)


def test_postgresql_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dbpool")
    psycopg = pytest.importorskip("psycopg")
    url = f"postgresql://u:{CANARY}@127.0.0.1:1/x?connect_timeout=5"
    with create_pool(url, min_size=0, max_size=1) as pool:
        with pytest.raises(psycopg.OperationalError) as info:
            pool.connection(timeout=5)
        texts = [text_of(info.value), repr(pool), str(pool)]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert_no_secret("\n".join(texts), CANARY)


def test_mysql_with_a_canary_password(
    mysql_canary_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """MariaDB checks the password: the access-denied error, logs and repr must not show it."""
    pymysql = pytest.importorskip("pymysql")
    caplog.set_level(logging.DEBUG, logger="dbpool")
    texts = []
    with create_pool(mysql_canary_url, min_size=0, max_size=1) as pool:
        try:
            with pool.connection(timeout=10) as conn:  # only if the account has no password check
                conn.cursor().execute("select 1")
        except pymysql.err.OperationalError as exc:
            texts.append(text_of(exc))
        texts += [repr(pool), str(pool), repr(pool.stats())]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert_no_secret("\n".join(texts), CANARY)


def test_mysql_pool(mysql_params: dict[str, Any]) -> None:
    url = _urls.mysql_url(mysql_params)
    with create_pool(url, min_size=1, max_size=2) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select database()")
            assert cur.fetchone() == (mysql_params.get("database"),)
        assert pool.stats().created >= 1


def test_postgresql_query_parameters_reach_the_server(postgresql_dsn: str) -> None:
    url = _urls.postgresql_url(postgresql_dsn)
    url += ("&" if "?" in url else "?") + "application_name=dbpool%20url%20test"
    with create_pool(url, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("select current_setting('application_name')")
            assert cur.fetchone() == ("dbpool url test",)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///file:{dir}/app.sqlite3?uri=true",
        "sqlite:///file://localhost{dir}/app.sqlite3%3Fmode%3Drwc?uri=true",
        # SQLite reads a repeated parameter's last value: a file, not memory
        "sqlite:///file:{dir}/app.sqlite3%3Fmode%3Dmemory%26mode%3Drwc?uri=true",
    ],
)
def test_sqlite_uris_that_one_database_stands_behind_are_accepted(
    url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pool's connections share, they all see: a row one writes, another reads."""
    monkeypatch.chdir(tmp_path)
    with create_pool(url.format(dir=tmp_path), min_size=2, max_size=2) as pool:
        pool.wait(5)
        with pool.connection() as first, pool.connection() as second:
            first.execute("create table t (n int)")
            first.execute("insert into t values (1)")
            first.commit()
            assert second.execute("select n from t").fetchall() == [(1,)]
