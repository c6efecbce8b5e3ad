"""The command line.

``python -m dbpool check URL`` connects, pings, and prints the server version and pool stats.
``python -m dbpool bench [URL]`` runs short transactions from many threads through one pool and
prints throughput, acquire-wait percentiles and the final stats.  URLs are those of
:func:`dbpool.create_pool`; the password is shown as ``***``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import os
import random
import sys
import threading
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from time import perf_counter
from types import ModuleType
from typing import IO, Any, NoReturn

from dbpool.pool import Pool
from dbpool.redact import mask_credentials, scrub_text, secret_forms
from dbpool.url import DatabaseURL, create_pool, load_driver, parse_url

DEFAULT_BENCH_URL = "sqlite:///dbpool-bench.sqlite3"
BENCH_TABLE = "dbpool_bench"
BENCH_ROWS = 100

EXIT_OK = 0
EXIT_FAILED = 1  # could not connect, or no operation succeeded
EXIT_USAGE = 2  # bad arguments or URL (argparse uses 2 as well)
EXIT_INTERRUPTED = 130

# The longest --timeout: a day is more than any connect needs, and drivers refuse some longer
# connect timeouts only when they connect (PyMySQL: over a year).
MAX_TIMEOUT = 86400.0
# The most --threads: far beyond what one pool's bench needs; each is an OS thread.
MAX_THREADS = 10_000
# The most --max-size: each connection is a server session (PostgreSQL allows 100 by default,
# MariaDB 151) or an open file, all opened before the run; more ran out of file descriptors
# and was reported as a database that cannot be connected to.
MAX_SIZE = 1_000
# Seconds the bench waits, once stopped, for its threads to finish their last operation.
JOIN_GRACE = 5.0

# The query parameter that bounds connecting (for sqlite3: waiting for a lock), per scheme.
_TIMEOUT_PARAMETERS = {
    "postgresql": "connect_timeout",
    "mysql": "connect_timeout",
    "mssql": "login_timeout",
    "sqlite": "timeout",
}


# --- pure helpers ------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending values, by nearest rank; NaN if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"a percentile is between 0 and 100, got {q}")
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds for a report: ``0.0123`` -> ``'12.300 ms'``."""
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.3f} ms"


def format_stats(stats: Any) -> str:
    """``name=value`` pairs for every field of a :class:`dbpool.PoolStats`, each without
    spaces: seconds to 6 significant digits, sequences comma-separated, and the discards as
    ``reason:count`` for the reasons that occurred (``-`` for none)."""
    return " ".join(
        f"{f.name}={_stat_text(getattr(stats, f.name))}" for f in dataclasses.fields(stats)
    )


def _stat_text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return ",".join(_stat_text(item) for item in value)
    if isinstance(value, dict):
        return ",".join(f"{key}:{count}" for key, count in value.items() if count) or "-"
    return str(value)


def format_progress(elapsed: float, ops: int, rate: float, errors: int, stats: Any) -> str:
    return (
        f"{elapsed:6.1f} s  {ops} ops  {rate:.0f} ops/s  errors={errors}  size={stats.size} "
        f"in_use={stats.in_use} idle={stats.idle} waiting={stats.waiting}"
    )


def placeholder(paramstyle: str) -> str:
    """The marker for a statement's single parameter, in a driver's ``paramstyle``."""
    markers = {"qmark": "?", "format": "%s", "pyformat": "%s", "numeric": ":1", "named": ":id"}
    try:
        return markers[paramstyle]
    except KeyError:
        raise ValueError(f"unknown DB-API paramstyle {paramstyle!r}") from None


def bench_params(paramstyle: str, value: int) -> Any:
    return {"id": value} if paramstyle == "named" else (value,)


def bench_report(
    *,
    url: DatabaseURL,
    threads: int,
    elapsed: float,
    ops: int,
    errors: Counter[str],
    waits: Sequence[float],
    stats: Any,
    interrupted: bool,
) -> list[str]:
    """The summary lines the bench prints; ``waits`` in seconds, ascending."""
    rate = ops / elapsed if elapsed > 0 else 0.0
    total_errors = sum(errors.values())
    lines = [
        f"url:               {url.masked}",
        f"threads:           {threads}",
        f"max_size:          {stats.max_size}",
        f"seconds:           {elapsed:.2f}" + ("  (interrupted)" if interrupted else ""),
        f"operations:        {ops}",
        f"throughput:        {rate:.1f} ops/s",
        f"errors:            {total_errors}",
    ]
    lines += [f"  {kind}: {count}" for kind, count in errors.most_common()]
    lines += [
        f"acquire wait p50:  {format_ms(percentile(waits, 50))}",
        f"acquire wait p99:  {format_ms(percentile(waits, 99))}",
        f"acquire wait max:  {format_ms(waits[-1] if waits else math.nan)}",
        "pool stats:",
    ]
    lines += [f"  {f.name}: {getattr(stats, f.name)}" for f in dataclasses.fields(stats)]
    return lines


def with_timeout(url: DatabaseURL, seconds: float) -> DatabaseURL:
    """``url`` with its scheme's connect timeout set to ``seconds``, unless the URL sets it."""
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(
            f"the timeout must be above 0 and at most {MAX_TIMEOUT:g} seconds (a day), "
            f"got {seconds:g}"
        )
    key = _TIMEOUT_PARAMETERS[url.scheme]
    if any(name == key for name, _ in url.query):
        return url
    # libpq and pymssql take whole seconds
    value = f"{seconds:g}" if url.scheme in ("sqlite", "mysql") else str(max(1, math.ceil(seconds)))
    return dataclasses.replace(url, query=(*url.query, (key, value)))


def describe(exc: BaseException, url: DatabaseURL) -> str:
    """One line about a failure, the root cause included, with the URL's secrets masked."""
    cause = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    if cause is not None and str(cause) not in str(exc):
        text += f" (caused by {type(cause).__name__}: {cause})"
    return mask_credentials(" ".join(url.redact(text).split()))


_DISTRIBUTIONS = {"pymysql": "PyMySQL"}


@contextlib.contextmanager
def _pool_of_one(url: DatabaseURL, timeout: float, name: str) -> Iterator[Pool[Any]]:
    """A pool of one connection, for a command's first connect.

    Closed without waiting for a connect the command gave up on (past ``timeout``, or on
    Ctrl-C): against a server that accepts and never answers (PyMySQL's handshake has no
    timeout), close() waited its 5 s more; the exit waits for it a second at most.
    """
    pool = create_pool(url, min_size=0, max_size=1, acquire_timeout=timeout, name=name)
    try:
        yield pool
    finally:
        pool.close(timeout=0)


# --- check -------------------------------------------------------------------------------------


_CHECK_SQLITE = "select count(*) from sqlite_master"


def _server_version(url: DatabaseURL, driver: ModuleType, conn: Any) -> str:
    if url.scheme == "sqlite":
        return f"SQLite {driver.sqlite_version}"
    query = {
        "postgresql": "show server_version",
        "mysql": "select version()",
        "mssql": "select @@version as version",  # named: pymssql's as_dict refuses none
    }[url.scheme]
    cur = conn.cursor()
    try:
        cur.execute(query)
        row = cur.fetchone()
    finally:
        cur.close()
    version = str(_first_value(row)).strip().splitlines()[0] if row else "unknown"
    return f"PostgreSQL {version}" if url.scheme == "postgresql" else version


def _first_value(row: Any) -> Any:
    """A row's first column, from a tuple or from a dict (pymssql's ``as_dict=true``)."""
    return next(iter(row.values())) if isinstance(row, dict) else row[0]


def _driver_version(driver: ModuleType) -> str:
    if driver.__name__ == "sqlite3":
        return "sqlite3 (standard library)"
    try:  # the installed release (PyMySQL's __version__ imitates mysqlclient's)
        version = importlib.metadata.version(_DISTRIBUTIONS.get(driver.__name__, driver.__name__))
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(driver, "__version__", ""))
    return f"{driver.__name__} {version}".strip()


def check(url: DatabaseURL, *, timeout: float, out: IO[str], err: IO[str]) -> int:
    driver = load_driver(url)
    # sqlite3 would create an empty database, and the check would pass on a typo
    if (
        url.scheme == "sqlite"
        and not url.connect_kwargs().get("uri")
        and not os.path.exists(url.database or "")
    ):
        print(f"dbpool: cannot connect to {url.masked}: no such file", file=err)
        return EXIT_FAILED
    with _pool_of_one(with_timeout(url, timeout), timeout, "check") as pool:
        try:
            started = perf_counter()
            with pool.connection() as conn:
                connected = perf_counter()
                cur = conn.cursor()
                try:
                    # SQLite: "select 1" never reads the file, so any file would pass
                    cur.execute(_CHECK_SQLITE if url.scheme == "sqlite" else "select 1")
                    cur.fetchone()
                finally:
                    cur.close()
                pinged = perf_counter()
                version = _server_version(url, driver, conn)
        except Exception as exc:
            print(f"dbpool: cannot connect to {url.masked}: {describe(exc, url)}", file=err)
            return EXIT_FAILED
        lines = [
            f"url:      {url.masked}",
            f"driver:   {_driver_version(driver)}",
            f"server:   {version}",
            f"connect:  {format_ms(connected - started)}",
            f"ping:     {format_ms(pinged - connected)}",
            f"stats:    {format_stats(pool.stats())}",
        ]
    print("\n".join(lines), file=out)
    return EXIT_OK


# --- bench -------------------------------------------------------------------------------------

_CREATE = {
    "mssql": (
        f"if object_id('{BENCH_TABLE}') is null create table {BENCH_TABLE} "
        "(id integer primary key, n integer not null)"
    ),
}
_CREATE_PORTABLE = (
    f"create table if not exists {BENCH_TABLE} (id integer primary key, n integer not null)"
)


def _prepare(url: DatabaseURL, paramstyle: str, conn: Any) -> None:
    """Create the bench table with its rows (if missing); WAL journal for SQLite."""
    cur = conn.cursor()
    try:
        if url.scheme == "sqlite":
            cur.execute("pragma journal_mode=wal")
            cur.fetchall()
        cur.execute(_CREATE.get(url.scheme, _CREATE_PORTABLE))
        cur.execute(f"select id from {BENCH_TABLE}")
        present = {_first_value(row) for row in cur.fetchall()}
        missing = [i for i in range(1, BENCH_ROWS + 1) if i not in present]
        if missing:
            cur.executemany(
                f"insert into {BENCH_TABLE} (id, n) values ({placeholder(paramstyle)}, 0)",
                [bench_params(paramstyle, i) for i in missing],
            )
        conn.commit()
    finally:
        cur.close()


class _Worker(threading.Thread):
    """Loops short transactions until told to stop; keeps its own tallies (no shared lock)."""

    def __init__(self, number: int, pool: Pool[Any], paramstyle: str, stop: threading.Event):
        super().__init__(name=f"dbpool-bench-{number}", daemon=True)
        self.pool = pool
        self.stop = stop
        mark = placeholder(paramstyle)
        self.update = f"update {BENCH_TABLE} set n = n + 1 where id = {mark}"
        self.select = f"select n from {BENCH_TABLE} where id = {mark}"
        self.paramstyle = paramstyle
        self.random = random.Random(number)
        self.ops = 0
        self.done_at = 0.0  # when its last operation ended (perf_counter)
        self.waits = array("d")
        self.errors: Counter[str] = Counter()
        self.first_errors: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            params = bench_params(self.paramstyle, self.random.randint(1, BENCH_ROWS))
            try:
                started = perf_counter()
                with self.pool.connection() as conn:
                    self.waits.append(perf_counter() - started)
                    cur = conn.cursor()
                    try:
                        cur.execute(self.update, params)
                        cur.execute(self.select, params)
                        cur.fetchone()
                    finally:
                        cur.close()
                    conn.commit()
                self.done_at = perf_counter()
                self.ops += 1
            except Exception as exc:
                kind = type(exc).__name__
                self.errors[kind] += 1
                self.first_errors.setdefault(kind, " ".join(str(exc).split()))
                self.stop.wait(0.01)  # no busy loop while the database refuses


def bench(
    url: DatabaseURL,
    *,
    threads: int,
    max_size: int,
    seconds: float,
    timeout: float,
    out: IO[str],
    err: IO[str],
) -> int:
    driver = load_driver(url)
    given, url = url, with_timeout(url, timeout)
    paramstyle = driver.paramstyle
    # One connection first, through a pool of one: a server that is down shows its own error
    # at once, instead of a pool timeout later.
    with _pool_of_one(url, timeout, "bench-setup") as setup:
        try:
            conn = setup.connection()
        except Exception as exc:
            print(f"dbpool: cannot connect to {given.masked}: {describe(exc, url)}", file=err)
            return EXIT_FAILED
        with conn:
            try:
                _prepare(url, paramstyle, conn)
            except Exception as exc:
                print(
                    f"dbpool: cannot prepare the table {BENCH_TABLE} in {given.masked}: "
                    f"{describe(exc, url)}",
                    file=err,
                )
                return EXIT_FAILED
    pool = create_pool(
        url, min_size=max_size, max_size=max_size, acquire_timeout=timeout, name="bench"
    )
    try:
        try:
            pool.wait(timeout)
        except Exception as exc:
            print(f"dbpool: cannot connect to {given.masked}: {describe(exc, url)}", file=err)
            return EXIT_FAILED
        print(
            f"dbpool bench: {given.masked}, {threads} threads, max_size={max_size}, {seconds:g} s",
            file=err,
        )
        return _run(given, pool, paramstyle, threads=threads, seconds=seconds, out=out, err=err)
    finally:
        pool.close(timeout=1.0)


def _run(
    url: DatabaseURL,
    pool: Pool[Any],
    paramstyle: str,
    *,
    threads: int,
    seconds: float,
    out: IO[str],
    err: IO[str],
) -> int:
    stop = threading.Event()
    workers = [_Worker(i, pool, paramstyle, stop) for i in range(threads)]
    interactive = err.isatty()
    started = perf_counter()
    running: list[_Worker] = []  # those started: a Ctrl-C or a refusal may stop the starting
    interrupted = False
    try:
        try:
            for worker in workers:
                worker.start()
                running.append(worker)
        except RuntimeError as exc:  # can't start new thread: more --threads than allowed
            stop.set()
            for worker in running:
                worker.join(5.0)
            print(
                f"dbpool: cannot start {threads} threads ({len(running)} started): {exc}", file=err
            )
            return EXIT_FAILED
        _show_progress(workers, pool, started, started + seconds, interactive, err)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stop.set()
        stopped = perf_counter()
        if interactive:
            err.write("\n")
    try:
        join_by = perf_counter() + JOIN_GRACE
        for worker in running:
            worker.join(max(0.0, join_by - perf_counter()))
    except KeyboardInterrupt:  # a second Ctrl-C: report what there is
        interrupted = True
    # The run ends when it is stopped, or when the last operation under way then ends: the
    # wait for a thread that never finishes (a lost server) is no run time.
    elapsed = max(stopped, *(w.done_at for w in workers)) - started
    stats = pool.stats()
    busy = sum(w.is_alive() for w in running)
    if busy:
        print(
            f"dbpool bench: {busy} thread{'s' if busy > 1 else ''} still busy {JOIN_GRACE:g} s "
            "after the end, left out of the time",
            file=err,
        )

    ops = sum(w.ops for w in workers)
    errors: Counter[str] = Counter()
    first_errors: dict[str, str] = {}
    waits: list[float] = []
    for worker in workers:
        errors.update(worker.errors)
        for kind, message in worker.first_errors.items():
            first_errors.setdefault(kind, message)
        waits.extend(worker.waits)
    waits.sort()
    for kind, message in first_errors.items():
        message = mask_credentials(url.redact(message))
        print(f"dbpool bench: first {kind}: {message}", file=err)
    report = bench_report(
        url=url,
        threads=threads,
        elapsed=elapsed,
        ops=ops,
        errors=errors,
        waits=waits,
        stats=stats,
        interrupted=interrupted,
    )
    print("\n".join(report), file=out)
    if ops == 0:
        failed = "every operation failed" if errors else "no operation completed"
        print(f"dbpool bench: {failed}", file=err)
        return EXIT_FAILED
    return EXIT_OK


def _show_progress(
    workers: list[_Worker],
    pool: Pool[Any],
    started: float,
    deadline: float,
    interactive: bool,
    err: IO[str],
) -> None:
    last_ops, last_at, width = 0, started, 0
    while True:
        now = perf_counter()
        if now >= deadline:
            return
        time.sleep(min(1.0, deadline - now))
        now = perf_counter()
        ops = sum(w.ops for w in workers)
        errors = sum(sum(w.errors.values()) for w in workers)
        rate = (ops - last_ops) / (now - last_at) if now > last_at else 0.0
        line = format_progress(now - started, ops, rate, errors, pool.stats())
        last_ops, last_at = ops, now
        if interactive:
            err.write("\r" + line.ljust(width))
            width = len(line)
        else:
            err.write(line + "\n")
        err.flush()


# --- the command line --------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _thread_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"at most {MAX_THREADS}, got {value}")
    return value


def _pool_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"at most {MAX_SIZE}, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _timeout(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_TIMEOUT:g} seconds (a day), got {text}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """Its usage errors quote what was typed: a URL in the wrong place shows its password.

    ``secrets``: the passwords of the URLs on the command line, scrubbed from those errors
    whatever they hold (``mask_credentials`` reads a URL up to a space, which an unescaped
    password may contain).
    """

    def __init__(self, *args: Any, secrets: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._secrets = secrets

    def error(self, message: str) -> NoReturn:
        super().error(mask_credentials(scrub_text(message, self._secrets)))


def _secrets_on(argv: Sequence[str]) -> tuple[str, ...]:
    """The passwords of the arguments that are database URLs (``--option=URL`` too), and of
    those that look like one but do not parse: from the colon after the user name to the last
    "@", whatever it holds (an unescaped space, "/", "?" or "#")."""
    found: list[str] = []
    for arg in argv:
        for text in (arg, arg.partition("=")[2]):
            try:
                found += parse_url(text)._secrets()
            except (TypeError, ValueError):
                scheme_end, at = text.find("://"), text.rfind("@")
                colon = text.find(":", scheme_end + 3, at) if at > scheme_end >= 0 else -1
                if colon >= 0:
                    found += secret_forms([text[colon + 1 : at]], guessed=True)
    return tuple(sorted(set(found), key=len, reverse=True))


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The command line's parser; ``argv``, the arguments it will parse, for the passwords to
    keep out of its usage errors."""
    secrets = _secrets_on(argv)
    parser = _Parser(
        secrets=secrets,
        prog="python -m dbpool",
        description="Check a database URL, or benchmark a dbpool pool against it.",
        epilog="URLs: postgresql://user:password@host:5432/dbname, mysql://..., mssql://..., "
        "sqlite:///relative/path or sqlite:////absolute/path; percent-encode special "
        "characters in the password.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log pool events to stderr (-vv: debug)"
    )
    # each command's parser is a _Parser too (argparse makes them of the parent's class)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check_cmd = commands.add_parser(
        "check",
        secrets=secrets,
        help="connect, ping, print server version and stats",
        description="Connect to URL through a pool of one connection, ping the database, and "
        "print the driver, the server's version, the connect and ping times and the pool's "
        "statistics; exit 1 if the database cannot be reached.",
    )
    check_cmd.add_argument("url", metavar="URL", help="database URL")
    check_cmd.add_argument(
        "--timeout",
        type=_timeout,
        default=10.0,
        help=f"seconds to connect, at most {MAX_TIMEOUT:g} (default 10)",
    )

    bench_cmd = commands.add_parser(
        "bench",
        secrets=secrets,
        help="run a concurrent short-transaction workload",
        description=f"Run short transactions (update one row, read it, commit) from --threads "
        f"threads through one pool of --max-size connections, on a table {BENCH_TABLE} of "
        f"{BENCH_ROWS} rows that is created if missing.",
    )
    bench_cmd.add_argument(
        "url",
        metavar="URL",
        nargs="?",
        default=DEFAULT_BENCH_URL,
        help=f"database URL (default {DEFAULT_BENCH_URL}, in the working directory)",
    )
    bench_cmd.add_argument(
        "--threads", type=_thread_count, default=32, help=f"default 32, at most {MAX_THREADS}"
    )
    bench_cmd.add_argument(
        "--max-size", type=_pool_size, default=8, help=f"pool size, default 8, at most {MAX_SIZE}"
    )
    bench_cmd.add_argument("--seconds", type=_positive_float, default=10.0, help="default 10")
    bench_cmd.add_argument(
        "--timeout",
        type=_timeout,
        default=10.0,
        help=f"seconds to connect and to wait for a connection, at most {MAX_TIMEOUT:g} "
        "(default 10)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    else:  # the command reports failures itself; without -v the pool's log stays quiet
        logging.getLogger("dbpool").addHandler(logging.NullHandler())
    try:
        url = parse_url(args.url)
        if args.command == "check":
            return check(url, timeout=args.timeout, out=sys.stdout, err=sys.stderr)
        return bench(
            url,
            threads=args.threads,
            max_size=args.max_size,
            seconds=args.seconds,
            timeout=args.timeout,
            out=sys.stdout,
            err=sys.stderr,
        )
    except ValueError as exc:  # a bad URL, or its driver is not installed
        print(f"dbpool: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dbpool: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): no traceback, nothing more sent
        _silence_stdout()
        return EXIT_FAILED


def _silence_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it at exit and would meet the pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (captured): nothing is flushed to a pipe
        pass


if __name__ == "__main__":
    sys.exit(main())
