"""Database URLs: parse them, keep their password out of sight, and make a pool from one.

::

    pool = dbpool.create_pool("postgresql://app:s3cret@db.example:5432/app?sslmode=require",
                              max_size=20)

Supported forms (user, password, host and database name are percent-decoded, so a password
containing ``@ / ? # %`` is written ``%40 %2F %3F %23 %25``)::

    postgresql://user:password@host:port/dbname?param=value     psycopg (3)
    postgres://...                                              the same
    mysql://user:password@host:port/database?param=value        PyMySQL
    mssql://user:password@host:port/database?param=value        pymssql
    sqlite:///relative/path.sqlite3?param=value                 sqlite3
    sqlite:////absolute/path.sqlite3?param=value

Query parameters go to the driver's ``connect()`` as keyword arguments: libpq connection
parameters for PostgreSQL (``sslmode``, ``connect_timeout``, ``application_name``, ...,
plus psycopg's ``autocommit`` and ``prepare_threshold``), and the ``connect()`` keywords of
PyMySQL, pymssql and sqlite3 (``timeout``, ``isolation_level``, ...).  Values that the driver
wants as numbers or booleans are converted.  A parameter that names a part of the URL (``host``,
``port``, ``user``, ``password``, the database) fills that part when the URL leaves it empty,
as in ``postgresql:///app?host=/run/postgresql``.

The driver module is imported by :func:`create_pool`, not when dbpool is imported.  The password
never appears in a repr, a ``str``, or an error raised here, and it is scrubbed from the errors a
driver raises while connecting.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable
from urllib.parse import quote, unquote

from dbpool.pool import Pool
from dbpool.redact import (
    MASK,
    KnownSecrets,
    is_secret_key,
    scrub_exception,
    scrub_text,
    secret_forms,
)

__all__ = ["DatabaseURL", "URLConnector", "create_pool", "load_driver", "parse_url"]

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# ASCII digits only: int(), float() and str.isdigit() also take other scripts' digits, '²',
# '1_000', and float() takes "nan" and "inf"
_INT_RE = re.compile(r"[+-]?[0-9]+")
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PORT_RE = re.compile(r"[0-9]{1,5}")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


# --- converting query values ------------------------------------------------------------------


def _to_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("true or false (also 1/0, yes/no, on/off)")


def _to_int(value: str) -> int:
    if not _INT_RE.fullmatch(value.strip()):
        raise ValueError("a whole number")
    return int(value)


def _to_number(value: str) -> float:
    """A number of seconds: an int when the value is whole (some drivers insist), else a float."""
    text = value.strip()
    if _INT_RE.fullmatch(text):
        return int(text)
    # nan and inf would reach the driver, which fails on them only when it connects
    if not _NUMBER_RE.fullmatch(text):
        infinite = text.lower().lstrip("+-") in ("nan", "inf", "infinity")
        raise ValueError("a finite number" if infinite else "a number")
    number = float(text)
    if not math.isfinite(number):  # 1e400
        raise ValueError("a finite number")
    return number


def _to_positive_number(value: str) -> float:
    number = _to_number(value)
    if number <= 0:
        raise ValueError("a number of seconds above 0 (leave it out for no timeout)")
    return number


def _to_mysql_connect_timeout(value: str) -> float:
    number = _to_number(value)
    if not 0 < number <= 31536000:  # PyMySQL's bounds, checked when it connects
        raise ValueError("a number of seconds above 0 and at most 31536000 (a year)")
    return number


def _to_optional_int(value: str) -> int | None:
    if value.strip().lower() in ("", "none", "null"):
        return None
    return _to_int(value)


def _to_optional_str(value: str) -> str | None:
    return None if value.strip().lower() == "none" else value


def _only_false(reason: str) -> Callable[[str], bool]:
    """A boolean that may only be false, for the ``reason`` given."""

    def convert(value: str) -> bool:
        if _to_bool(value):
            raise ValueError(f"false ({reason})")
        return False

    return convert


# --- what each scheme means --------------------------------------------------------------------


@dataclass(frozen=True)
class _Scheme:
    """How one URL scheme maps onto a driver's ``connect()`` keywords."""

    name: str
    module: str  # the driver module to import
    extra: str  # the dbpool extra that installs it ("" for the standard library)
    # URL part -> the connect() keyword it becomes ("" = not accepted in this scheme)
    host_kw: str
    database_kw: str
    # query keys that name a URL part: key -> "host" | "port" | "user" | "password" | "database"
    part_keys: Mapping[str, str]
    converters: Mapping[str, Callable[[str], Any]]
    # the query keys the driver accepts; None = let the driver check them at connect time
    allowed_keys: frozenset[str] | None = None
    # keywords the driver takes only as Python objects: key -> what to do instead
    objects: Mapping[str, str] = field(default_factory=dict)


_PG_CONVERTERS: Mapping[str, Callable[[str], Any]] = {
    "autocommit": _to_bool,
    "prepare_threshold": _to_optional_int,
}

# every bool and number keyword of pymysql.connect(): a string "false" would be true to it
_MYSQL_CONVERTERS: Mapping[str, Callable[[str], Any]] = {
    "connect_timeout": _to_mysql_connect_timeout,
    "read_timeout": _to_positive_number,
    "write_timeout": _to_positive_number,
    "client_flag": _to_int,
    "max_allowed_packet": _to_int,
    "autocommit": _to_bool,
    "local_infile": _to_bool,
    "binary_prefix": _to_bool,
    "compress": _to_bool,
    "named_pipe": _to_bool,
    "ssl_disabled": _to_bool,
    "ssl_verify_cert": _to_bool,
    "ssl_verify_identity": _to_bool,
    "use_unicode": _to_bool,
    "defer_connect": _only_false("the pool needs connect() to return a connected connection"),
}

# PyMySQL takes a string for these as well, and fails on it later: at every connect
# ("'str' object has no attribute 'get'") or at every cursor() ('str' object is not callable)
_IN_A_CONNECT_FUNCTION = (
    "pass it to pymysql.connect() in a connect function: "
    "Pool(functools.partial(pymysql.connect, host=..., {key}=...))"
)
_MYSQL_OBJECTS: Mapping[str, str] = {
    "ssl": "use ssl_ca, ssl_cert and ssl_key (file paths), ssl_verify_cert, "
    "ssl_verify_identity or ssl_disabled",
    "conv": _IN_A_CONNECT_FUNCTION,
    "cursorclass": _IN_A_CONNECT_FUNCTION,
    "auth_plugin_map": _IN_A_CONNECT_FUNCTION,
}

_MSSQL_CONVERTERS: Mapping[str, Callable[[str], Any]] = {
    "timeout": _to_int,
    "login_timeout": _to_int,
    "autocommit": _to_bool,
    "as_dict": _to_bool,
    "read_only": _to_bool,
    "use_datetime2": _to_bool,
}

_SQLITE_CONVERTERS: Mapping[str, Callable[[str], Any]] = {
    "timeout": _to_number,
    "detect_types": _to_int,
    "cached_statements": _to_int,
    "uri": _to_bool,
    "autocommit": _to_bool,
    "isolation_level": _to_optional_str,
    "check_same_thread": _only_false("a pool hands each connection to many threads"),
}
# sqlite3.connect() takes autocommit from Python 3.12
_SQLITE_KEYS = frozenset(
    key for key in _SQLITE_CONVERTERS if key != "autocommit" or sys.version_info >= (3, 12)
)

_COMMON_PART_KEYS = {"host": "host", "port": "port", "user": "user", "password": "password"}

_SCHEMES: Mapping[str, _Scheme] = {
    "postgresql": _Scheme(
        name="postgresql",
        module="psycopg",
        extra="postgresql",
        host_kw="host",
        database_kw="dbname",
        part_keys={**_COMMON_PART_KEYS, "dbname": "database"},
        converters=_PG_CONVERTERS,
    ),
    "mysql": _Scheme(
        name="mysql",
        module="pymysql",
        extra="mysql",
        host_kw="host",
        database_kw="database",
        part_keys={
            **_COMMON_PART_KEYS,
            "passwd": "password",
            "database": "database",
            "db": "database",
        },
        converters=_MYSQL_CONVERTERS,
        objects=_MYSQL_OBJECTS,
    ),
    "mssql": _Scheme(
        name="mssql",
        module="pymssql",
        extra="mssql",
        host_kw="server",
        database_kw="database",
        part_keys={**_COMMON_PART_KEYS, "server": "host", "database": "database"},
        converters=_MSSQL_CONVERTERS,
    ),
    "sqlite": _Scheme(
        name="sqlite",
        module="sqlite3",
        extra="",
        host_kw="",
        database_kw="database",
        part_keys={},
        converters=_SQLITE_CONVERTERS,
        allowed_keys=_SQLITE_KEYS,
    ),
}

_ALIASES = {"postgres": "postgresql"}

_SUPPORTED = "postgresql://, postgres://, mysql://, mssql:// or sqlite:///"

# Schemes that other libraries give these databases
_SAME_DATABASE = {"mariadb": "mysql", "sqlite3": "sqlite"}


def _unsupported_scheme(scheme_text: str) -> str:
    """What to write instead of an unknown scheme.  A URL never picks the driver (as
    SQLAlchemy's ``postgresql+psycopg2://`` does): another driver takes a connect function."""
    message = f"unsupported URL scheme {scheme_text + '://'!r}"
    database, plus, driver = scheme_text.lower().partition("+")
    database = _SAME_DATABASE.get(database, _ALIASES.get(database, database))
    scheme = _SCHEMES.get(database)
    if scheme is None:
        return f"{message}: use {_SUPPORTED}"
    written = "sqlite:///" if database == "sqlite" else f"{database}://"
    instead = f"{message}: write {written}"
    if not plus or driver == scheme.module:
        return f"{instead} (it uses {scheme.module})"
    return (
        f"{instead}, which always uses {scheme.module}; a URL cannot pick the driver: for "
        "another, give dbpool.Pool a function that calls that driver's connect()"
    )


# --- the parsed URL ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed database URL.  Its ``repr`` and ``str`` show the password as ``***``.

    ``database`` is the database name, or the file path for ``sqlite``.  ``query`` holds the
    remaining query parameters, percent-decoded and in their original order.
    """

    scheme: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    query: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ValueError(
                f"unsupported scheme {self.scheme!r}: use one of {', '.join(_SCHEMES)}"
            )
        # One built by hand is checked as parse_url() checks what it parses: a wrong type or
        # value failed later, in create_pool() or at every connect, with an error that named
        # neither the field nor the parameter.  No value is quoted: it may be the password.
        for part in ("host", "user", "password", "database"):
            if not isinstance(getattr(self, part), (str, type(None))):
                raise TypeError(f"the URL's {part} must be a str or None")
        port = self.port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
            raise TypeError("the URL's port must be an int or None")
        if port is not None and not 0 < port < 65536:
            raise ValueError("the URL's port must be from 1 to 65535")
        if not isinstance(self.query, tuple) or not all(
            isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in self.query
        ):
            raise TypeError("the URL's query must be a tuple of (name, value) pairs of str")
        for part in ("host", "user", "password", "database"):
            _refuse_nul(getattr(self, part) or "", _PART_NAMES[part])
        if any(char < " " or char == "\x7f" for char in self.host or ""):
            # No host name holds one; it would reach error messages and log lines as it is
            # (a newline there forges a line of its own)
            raise ValueError(
                "the URL's host holds a control character (a newline or a tab, %0A or %09 "
                "percent-encoded): remove it"
            )
        for key, value in self.query:
            _refuse_nul(key, "query parameter name")
            _refuse_nul(value, f"query parameter {key!r}")
        scheme = _SCHEMES[self.scheme]
        for key, value in self.query:
            _check_value(scheme, key, value)
        if self.scheme == "sqlite":
            _check_sqlite_database(self.database or "")
        if self.scheme == "mysql" and (self.host or "").startswith("/"):
            # libpq reads such a host as a socket's directory; PyMySQL looks it up as a name,
            # and every connect failed with "Name or service not known"
            raise ValueError(
                "a mysql:// URL's host is a host name: for a Unix socket, give its path as the "
                "unix_socket parameter (mysql://user@/db?unix_socket=/run/mysqld/mysqld.sock)"
            )

    @property
    def driver(self) -> str:
        """The name of the driver module this URL connects with (``"psycopg"``, ...)."""
        return _SCHEMES[self.scheme].module

    @property
    def masked(self) -> str:
        """The URL with the password (and secret query values) shown as ``***``."""
        query = "&".join(
            f"{quote(key, safe='')}={MASK if is_secret_key(key) else quote(value, safe='/:,')}"
            for key, value in self.query
        )
        tail = f"?{query}" if query else ""
        if self.scheme == "sqlite":
            return f"sqlite:///{quote(self.database or '', safe='/:')}{tail}"
        netloc = ""
        if self.user is not None or self.password is not None:
            netloc = quote(self.user or "", safe="")
            if self.password is not None:
                netloc += ":" + MASK
            netloc += "@"
        if self.host is not None:
            if ":" in self.host and not self.host.startswith("/"):
                netloc += f"[{quote(self.host, safe=':')}]"
            else:
                netloc += quote(self.host, safe="")
        if self.port is not None:
            netloc += f":{self.port}"
        path = f"/{quote(self.database, safe='')}" if self.database is not None else ""
        return f"{self.scheme}://{netloc}{path}{tail}"

    def __str__(self) -> str:
        return self.masked

    def __repr__(self) -> str:
        return f"DatabaseURL({self.masked!r})"

    def connect_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for the driver's ``connect()``, password included (for
        ``mysql://``, a password outside ASCII as its UTF-8 bytes)."""
        scheme = _SCHEMES[self.scheme]
        kwargs: dict[str, Any] = {}
        if self.scheme == "sqlite":
            kwargs["database"] = self.database
        else:
            parts: Iterable[tuple[str, Any]] = (
                (scheme.host_kw, self.host),
                # pymssql takes the port as a string
                ("port", str(self.port) if self.scheme == "mssql" and self.port else self.port),
                ("user", self.user),
                ("password", self._driver_password()),
                (scheme.database_kw, self.database),
            )
            kwargs.update((key, value) for key, value in parts if value is not None)
        for key, value in self.query:
            convert = scheme.converters.get(key)
            kwargs[key] = convert(value) if convert is not None else value
        if self.scheme == "sqlite":
            kwargs["check_same_thread"] = False
        return kwargs

    def _driver_password(self) -> str | bytes | None:
        password = self.password
        if self.scheme == "mysql" and password is not None and not password.isascii():
            # PyMySQL sends a str password encoded as latin-1 (the server, which got it from
            # clients in UTF-8, refused it; past latin-1 it raised UnicodeEncodeError), and
            # sends bytes as they are: the UTF-8 bytes the URL's percent-encoding stands for
            return password.encode()
        return password

    def redact(self, text: str) -> str:
        """``text`` with this URL's password and secret query values replaced by ``***``."""
        return scrub_text(text, self._secrets())

    def _secrets(self) -> tuple[str, ...]:
        values = [self.password] if self.password else []
        values += [value for key, value in self.query if value and is_secret_key(key)]
        return secret_forms(values)


# --- parsing -----------------------------------------------------------------------------------


def parse_url(url: str) -> DatabaseURL:
    """Parse a database URL; ``ValueError`` saying what to change if it is not one.

    No error message quotes the password or any part of the URL that might hold it.
    """
    if not isinstance(url, str):
        raise TypeError(f"a database URL must be a str, not {type(url).__name__}")
    text = url.strip()
    scheme_text, sep, rest = text.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme_text):
        raise ValueError(
            f"not a database URL: it must start with {_SUPPORTED} "
            "(for example postgresql://user:password@host:5432/dbname)"
        )
    name = _ALIASES.get(scheme_text.lower(), scheme_text.lower())
    scheme = _SCHEMES.get(name)
    if scheme is None:
        raise ValueError(_unsupported_scheme(scheme_text))
    if "#" in rest:
        raise ValueError(
            "a database URL has no #fragment: if '#' is part of the password or another value, "
            "write it as %23"
        )

    # RFC 3986: the authority ends at the first '/' or '?'.
    end = len(rest)
    for stop in "/?":
        index = rest.find(stop)
        if index != -1:
            end = min(end, index)
    authority, remainder = rest[:end], rest[end:]
    path, _, query_text = remainder.partition("?")
    if scheme.name == "sqlite":
        return _sqlite_url(authority, path, _parse_query(query_text))
    _refuse_misplaced_userinfo(authority, path, query_text)
    query = _parse_query(query_text)

    parts: dict[str, Any] = {"host": None, "port": None, "user": None, "password": None}
    if "@" in authority:
        # the host cannot hold '@', so the last one ends the user-info
        userinfo, _, hostport = authority.rpartition("@")
        user, has_password, password = userinfo.partition(":")
        parts["user"] = _unquote(user, "user name") if user else None
        parts["password"] = _unquote(password, "password") if has_password else None
    else:
        hostport = authority
    parts["host"], parts["port"] = _parse_hostport(hostport)

    if path in ("", "/"):
        parts["database"] = None
    else:
        database = path[1:]
        if "/" in database:
            raise ValueError(
                "the URL's path must be just the database name: write a '/' inside it as %2F"
            )
        parts["database"] = _unquote(database, "database name")

    remaining = []
    for key, value in query:
        part = scheme.part_keys.get(key)
        if part is None:
            remaining.append((key, value))
            continue
        if parts[part] is not None:
            raise ValueError(
                f"the URL gives the {part} twice, in the URL and as the query parameter "
                f"{key!r}: keep one"
            )
        parts[part] = _parse_port(value) if part == "port" else value

    after_secret = _refuse_split_secret(scheme, query)
    for key, value in remaining:
        _check_value(scheme, key, value, show=key not in after_secret)
    return DatabaseURL(scheme=scheme.name, query=tuple(remaining), **parts)


def _unquote(text: str, part: str) -> str:
    """``text`` percent-decoded; ``ValueError`` naming ``part``, not quoting it, if the bytes
    are no UTF-8 (unquote() would put U+FFFD in their place: another password, silently) or
    hold a NUL (see _refuse_nul)."""
    try:
        decoded = unquote(text, errors="strict")
    except UnicodeDecodeError:
        pass  # raised outside the handler: the codec error, holding the bytes, is not chained
    else:
        _refuse_nul(decoded, part)
        return decoded
    raise ValueError(
        f"the URL's {part} is not UTF-8 once percent-decoded: percent-encode the UTF-8 bytes "
        "of each character (for example 'ä' as %C3%A4)"
    )


# What the message calls each part of a URL.
_PART_NAMES = {
    "host": "host",
    "user": "user name",
    "password": "password",
    "database": "database name",
}


def _refuse_nul(value: str, part: str) -> None:
    """Libpq reads a connection string only up to a NUL: every setting after it, an
    sslmode=require say, would be dropped, silently; the other C libraries end a value there.
    ``part`` is named, never quoted."""
    if "\0" in value:
        raise ValueError(
            f"the URL's {part} holds a NUL character (%00), which a driver's C library reads "
            "as the end of the value: remove it"
        )


def _refuse_misplaced_userinfo(authority: str, path: str, query_text: str) -> None:
    """Catch a '/' or '?' left unescaped in a user name or password.

    It would end the host part early and put the rest of the password into the path or the
    query, where an error message or the masked URL could show it.  The '@' that ends the
    user-info then comes after the host: in the database name, or in a query right after the
    host (``app:2024?Tok=Zq9@db/app``, ``app:p@ss/w0rd@db``).  Either is refused, even with
    an '@' before the host: that one may be part of the password too.
    """
    if "@" in path or ("@" in query_text and not path):
        misplaced = True
    elif "@" in query_text and "@" not in authority:
        # a "port" that is no number is the start of a password a '/' cut off
        _, colon, port = authority.rpartition(":")
        misplaced = bool(colon) and not _PORT_RE.fullmatch(port) and not authority.endswith("]")
    else:
        misplaced = False
    if misplaced:
        raise ValueError(
            "the URL cannot be split into user, password and host: percent-encode "
            "'/', '?', '#' and '@' in the user name, password, database name and query values "
            "(as %2F, %3F, %23 and %40)"
        )


def _parse_hostport(hostport: str) -> tuple[str | None, int | None]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close == -1:
            raise ValueError("the URL's IPv6 host has no closing ']'")
        host = _unquote(hostport[1:close], "host")  # a zone id: [fe80::1%25eth0]
        after = hostport[close + 1 :]
        if after and not after.startswith(":"):
            raise ValueError("after an IPv6 host in [brackets] only ':port' may follow")
        port_text = after[1:]
        unbracketed_ipv6 = False
    else:
        host, _, port_text = hostport.partition(":")
        if "," in hostport:
            raise ValueError(
                "the URL names several hosts: a URL takes one host; for several, build the "
                "pool from a connect function: Pool(lambda: driver.connect(...))"
            )
        host = _unquote(host, "host")
        # "::1" or "fe80::1:5432": an IPv6 address without its brackets reads as host ""
        # and port ":1"; the port's error then says where it goes
        unbracketed_ipv6 = hostport.count(":") > 1
    port = _parse_port(port_text, ipv6_hint=unbracketed_ipv6) if port_text else None
    return (host or None), port


def _refuse_split_secret(scheme: _Scheme, query: list[tuple[str, str]]) -> frozenset[str]:
    """Catch an '&' left unescaped in a secret given as a query parameter (``?password=``).

    It ends the value early, and the rest of the secret reads as more parameters, whose names
    the driver's parameter check (and the driver) would quote.  A parameter right after a
    secret that the driver does not take is refused here, without naming it.  Returns the
    names that follow a secret: their values are not quoted either.
    """
    after = {
        key: before for (before, _), (key, _) in zip(query, query[1:]) if is_secret_key(before)
    }
    if not after:
        return frozenset()
    known = _known_keys(scheme)
    for key, secret_key in after.items():
        if known is not None and key not in known:
            raise ValueError(
                f"the URL's query parameter after {secret_key!r} is not one the {scheme.module} "
                f"driver takes: if {secret_key!r} holds an '&', write it as %26; "
                "else remove that parameter"
            )
    return frozenset(after)


def _known_keys(scheme: _Scheme) -> frozenset[str] | None:
    """The query keys ``scheme``'s driver takes, or ``None`` where they cannot be known (the
    driver is missing, or checks them itself): only here does parsing import the driver."""
    if scheme.allowed_keys is not None:
        return scheme.allowed_keys
    try:
        driver = importlib.import_module(scheme.module)
    except ImportError:  # create_pool() says what to install
        return None
    keys = _driver_keys(scheme.name, driver)
    return None if keys is None else keys | frozenset(scheme.part_keys)


def _parse_port(text: str, *, ipv6_hint: bool = False) -> int:
    # never quoted in the message: with an unescaped '/' in the password, the "port" is
    # the start of the password
    if not _PORT_RE.fullmatch(text) or not 0 < int(text) < 65536:
        hint = "; an IPv6 address goes in brackets: [::1]:5432" if ipv6_hint else ""
        raise ValueError(
            "the URL's port must be a number from 1 to 65535 "
            f"(a password goes before the host: user:password@host:port{hint})"
        )
    return int(text)


def _parse_query(text: str) -> list[tuple[str, str]]:
    """``a=1&b=2`` percent-decoded; '+' stays '+' (as in libpq's URIs, unlike HTML forms)."""
    pairs: list[tuple[str, str]] = []
    seen = set()
    for item in text.split("&"):
        if not item:
            continue
        raw_key, has_value, raw_value = item.partition("=")
        key = _unquote(raw_key, "query parameter name")
        if not key or not has_value:
            raise ValueError(
                "each query parameter of the URL must read name=value, joined by '&': write an "
                "'&' inside a value (a password, say) as %26"
            )
        if key in seen:
            raise ValueError(f"the query parameter {key!r} is given twice: keep one")
        seen.add(key)
        pairs.append((key, _unquote(raw_value, f"query parameter {key!r}")))
    return pairs


def _check_value(scheme: _Scheme, key: str, value: str, *, show: bool = True) -> None:
    if scheme.allowed_keys is not None and key not in scheme.allowed_keys:
        raise ValueError(
            f"unknown {scheme.name} URL parameter {key!r}: use "
            f"{', '.join(sorted(scheme.allowed_keys))}"
        )
    instead = scheme.objects.get(key)
    if instead is not None:
        raise ValueError(
            f"the {scheme.name} URL parameter {key!r} takes a Python object, which a URL "
            f"cannot give: {instead.format(key=key)}"
        )
    convert = scheme.converters.get(key)
    if convert is None:
        return
    try:
        convert(value)
    except ValueError as exc:
        shown = f", not {value!r}" if show and not is_secret_key(key) else ""
        raise ValueError(f"the URL parameter {key!r} must be {exc}{shown}") from None


def _sqlite_url(authority: str, path: str, query: list[tuple[str, str]]) -> DatabaseURL:
    if authority:
        raise ValueError(
            "a sqlite URL has no host: write sqlite:///relative/path.sqlite3 or "
            "sqlite:////absolute/path.sqlite3 (three or four slashes)"
        )
    database = _unquote(path[1:], "file path")
    _check_sqlite_database(database)
    scheme = _SCHEMES["sqlite"]
    for key, value in query:
        if key == "autocommit" and key not in _SQLITE_KEYS:
            raise ValueError(
                "the sqlite URL parameter 'autocommit' needs Python 3.12 or later, where "
                "sqlite3.connect() takes it: remove it (before 3.12, isolation_level=none "
                "is sqlite3's autocommit mode)"
            )
        _check_value(scheme, key, value)
        if key == "autocommit" and not _to_bool(value):
            # Refused here rather than at the first connect (the sqlite3 dialect's check).
            raise ValueError(
                "the sqlite URL parameter autocommit=false keeps a transaction open at all "
                "times, and the pool begins and ends transactions itself: remove it, or set "
                "autocommit=true"
            )
    return DatabaseURL(scheme="sqlite", database=database, query=tuple(query))


def _check_sqlite_database(database: str) -> None:
    if not database:
        raise ValueError(
            "the sqlite URL names no file: write sqlite:///relative/path.sqlite3 or "
            "sqlite:////absolute/path.sqlite3"
        )
    if database == ":memory:":
        raise ValueError(
            "each sqlite3 connection to ':memory:' is a separate, empty database, so a pool of "
            "them would lose data: use a file, e.g. sqlite:///app.sqlite3"
        )
    _refuse_unshared_sqlite_uri(database)


def _refuse_unshared_sqlite_uri(database: str) -> None:
    """A ``file:`` name is a URI to SQLite with uri=true, and even without it where SQLite was
    built to read URIs always (as Debian's is).  One may give every connection a database of
    its own: refused for the reason ':memory:' is."""
    if database[:5].lower() != "file:":
        return
    rest = database[5:].partition("#")[0]
    path, _, query = rest.partition("?")
    if path.startswith("//"):  # an authority (empty or localhost) before the path
        slash = path.find("/", 2)
        path = "" if slash < 0 else path[slash:]
    params: dict[str, str] = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        params[unquote(name)] = unquote(value)  # SQLite takes a repeated parameter's last value
    path = unquote(path)
    # The memdb VFS keeps the database in memory too, under the name, as mode=memory does
    in_memory = path == ":memory:" or params.get("mode") == "memory" or params.get("vfs") == "memdb"
    if in_memory:
        raise ValueError(
            "this sqlite URI names an in-memory database, which lasts only while a connection "
            "to it is open (each connection gets its own without cache=shared); a pool closes "
            "and replaces its connections (max_lifetime, idle_timeout, discards), so it would "
            "lose data: use a file"
        )
    if not path and not in_memory:
        raise ValueError(
            "this sqlite URI names no file: each connection would get a temporary database of "
            "its own, so a pool of them would lose data: name a file, e.g. file:app.sqlite3"
        )


# --- connecting --------------------------------------------------------------------------------


def load_driver(url: DatabaseURL) -> ModuleType:
    """Import the driver module for ``url``; ``ValueError`` naming what to install if missing."""
    scheme = _SCHEMES[url.scheme]
    try:
        return importlib.import_module(scheme.module)
    except ImportError as exc:
        if scheme.extra:
            hint = f"install it with: pip install 'dbpool[{scheme.extra}]'"
        else:
            hint = "this Python was built without it: use a Python that has the sqlite3 module"
        raise ValueError(
            f"{url.scheme}:// URLs need the {scheme.module} driver, which cannot be imported "
            f"({exc.__class__.__name__}: {exc}); {hint}"
        ) from exc


class URLConnector(KnownSecrets):
    """The connect callable :func:`create_pool` gives the pool: takes no arguments.

    Errors the driver raises pass through with their class unchanged, the password scrubbed
    from their message first.  The pool learns the URL's secrets from it, to scrub them from
    what else it reports (its hooks' errors, the leak report).
    """

    __slots__ = ("_url", "_connect", "_kwargs", "_secrets")

    def __init__(self, url: DatabaseURL, driver: ModuleType) -> None:
        self._url = url
        self._connect: Callable[..., Any] = driver.connect
        self._kwargs = url.connect_kwargs()
        self._secrets = url._secrets()

    @property
    def url(self) -> DatabaseURL:
        return self._url

    def __call__(self) -> Any:
        try:
            return self._connect(**self._kwargs)
        except Exception as exc:
            if self._secrets:
                scrub_exception(exc, self._secrets)
            raise

    def __repr__(self) -> str:
        return f"<URLConnector {self._url.masked}>"

    def _known_secrets(self) -> tuple[str, ...]:
        return self._secrets


def create_pool(url: str | DatabaseURL, **pool_options: Any) -> Pool[Any]:
    """A :class:`~dbpool.Pool` connecting to ``url``; ``pool_options`` go to ``Pool()``.

    ``ValueError`` if the URL is malformed, its scheme unknown, or its driver not installed.
    The pool's name is ``name=`` if given, else the pool's default.
    """
    if "connect" in pool_options:  # Python's own error would only say it came twice
        raise TypeError(
            "create_pool() takes no connect: the URL makes the connections; to pool those of "
            "a callable of your own, use dbpool.Pool(connect, ...)"
        )
    parsed = url if isinstance(url, DatabaseURL) else parse_url(url)
    driver = load_driver(parsed)
    _check_driver_keys(parsed, driver)
    return Pool(URLConnector(parsed, driver), **pool_options)


def _check_driver_keys(url: DatabaseURL, driver: ModuleType) -> None:
    """Refuse query parameters the driver would refuse, now rather than at every connect."""
    _check_mysql_charset(url, driver)
    allowed = _driver_keys(url.scheme, driver)
    if allowed is None:
        return
    unknown = [key for key, _ in url.query if key not in allowed]
    if unknown:
        raise ValueError(
            f"the {url.driver} driver takes no connection parameter "
            f"{', '.join(_with_spelling(key, allowed) for key in unknown)}: "
            "correct it or remove it from the URL's query"
        )


def _with_spelling(key: str, allowed: Iterable[str]) -> str:
    """``key`` quoted, with the name it most likely misspells: ``'connect_timout' (did you
    mean 'connect_timeout'?)``."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def _check_mysql_charset(url: DatabaseURL, driver: ModuleType) -> None:
    """PyMySQL fails at every connect on a character set it does not know, with
    "'NoneType' object has no attribute 'encoding'"."""
    charset = dict(url.query).get("charset") if url.scheme == "mysql" else None
    if not charset:  # an empty one is PyMySQL's default
        return
    try:
        known = driver.charset.charset_by_name(charset) is not None
    except Exception:  # another PyMySQL: let it check the name at connect time
        return
    if not known:
        # the value is not quoted: after an unescaped '&' in a password, it is a piece of it
        raise ValueError(
            "the URL parameter 'charset' names no character set PyMySQL knows: use a MySQL "
            "character set's name, such as utf8mb4 (not a Python codec's, such as utf-8)"
        )


def _driver_keys(scheme: str, driver: ModuleType) -> frozenset[str] | None:
    if scheme == "postgresql":
        try:
            defaults = driver.pq.Conninfo.get_defaults()
        except Exception:  # an older psycopg: let it check the names at connect time
            return None
        return frozenset(o.keyword.decode() for o in defaults) | frozenset(_PG_CONVERTERS)
    if scheme == "mysql":
        import inspect

        try:
            parameters = inspect.signature(driver.connect).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            return None
        return frozenset(p.name for p in parameters)
    return None
