"""What each pool costs in instructions: counted by valgrind, the same from one run to the next.

Timings on a small shared machine move by 10 % between runs, which hides the differences a
change to the hot path makes.  ``valgrind --tool=callgrind`` counts the instructions the client
process executes instead (its own code, Python's and the driver's, not the kernel's nor the
server's), whatever else the machine is doing.  For each library and case this script runs a
child process under callgrind twice, with a small and a large number of operations after the
same warm-up; the difference, divided by the difference in operations, is the cost of one
operation, with the set-up and the warm-up cancelled out.

Cases: ``cycle`` (checkout and return, no-I/O connection) and ``short_tx`` (checkout, SELECT 1,
commit, return) on PostgreSQL and MariaDB, and ``contention`` (32 threads sharing the
transactions over 4 PostgreSQL connections), each library as ``compare.py`` runs it.  valgrind
runs one thread at a time, switching as a thread blocks (on the server, on a lock) or its time
slice ends: each one waiting for the server's reply lets the next run, which finds every
connection taken and queues, as under real contention, so the count includes each pool's
queueing and wake-ups (not the kernel's part of them, nor what running in parallel costs).  The
no-I/O cycle repeats to within a few instructions; counts of transactions on a server move by
up to a few per cent between runs (how the replies arrive decides how often the driver reads,
and under contention which thread runs next), so compare libraries within one run and a change
by more than that.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from array import array
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from _libraries import FIFO_FLOOR, LEASE_FLOOR, LIBRARIES, NULL_SOURCE, RAW, Library, Source
from _report import Table, fmt_int, md_table, rst_table, rst_text
from compare import (
    DEFAULT_MYSQL_URL,
    DEFAULT_PG_DSN,
    ROOT,
    cpu_model,
    dbpool_revision,
    log,
    mysql_params,
    mysql_source,
    pg_source,
    probe_mariadb,
    probe_postgresql,
    version_of,
)

POOL_SIZE = 4
WARM_UP = 200
CONTENTION_THREADS = 32
CHILD_TIME = 600  # seconds a counted run may take: ten times the longest seen


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    operations: tuple[int, int]  # (small, large) counts; the cost is their difference's
    quick_operations: tuple[int, int]


#: The table's rows: the lock floor, the same with a lease object (cycle only), the lock floor
#: with a first-in, first-out hand-off (contention only), the pools.
ROWS = (RAW, LEASE_FLOOR, FIFO_FLOOR, *LIBRARIES[1:])

CASES = (
    Case("cycle", "cycle, no-I/O", (10_000, 30_000), (2_000, 6_000)),
    Case("short_tx_pg", "short_tx, PostgreSQL", (1_000, 3_000), (200, 600)),
    Case("short_tx_mariadb", "short_tx, MariaDB", (1_000, 3_000), (200, 600)),
    Case("contention", "contention, PostgreSQL", (500, 1_500), (200, 600)),
)


def source_for(case: str, args: argparse.Namespace) -> Source:
    if case == "cycle":
        return NULL_SOURCE
    if case in ("short_tx_pg", "contention"):
        return pg_source(args.pg_dsn)
    return mysql_source(mysql_params(args.mysql_url))


def library_named(name: str) -> Library:
    return next(lib for lib in ROWS if lib.name == name)


def child(case: str, library: str, operations: int, args: argparse.Namespace) -> None:
    """Run in the process valgrind watches: open the pool, warm up, run ``operations``."""
    lib = library_named(library)
    pool = lib.open(source_for(case, args), POOL_SIZE, True)
    if case == "contention":
        run = partial(contend, lib)
    else:
        run = lib.cycle if case == "cycle" else lib.short_tx
    run(pool, WARM_UP)
    run(pool, operations)
    lib.close(pool)


class _Budget:
    """Stands for the contention workers' stop event: set once ``operations`` have started,
    counted over all the threads."""

    def __init__(self, operations: int) -> None:
        self._tickets = iter(range(operations))  # next() is one C call: atomic under the GIL

    def is_set(self) -> bool:
        return next(self._tickets, None) is None


def contend(lib: Library, pool: object, operations: int) -> None:
    """``operations`` transactions shared by CONTENTION_THREADS threads, started together."""
    budget = _Budget(operations)
    barrier = threading.Barrier(CONTENTION_THREADS, timeout=CHILD_TIME)  # a failed start ends it
    errors: list[BaseException] = []

    def body() -> None:
        barrier.wait()
        try:
            lib.contention(pool, budget, array("d"))  # type: ignore[arg-type]  # is_set() only
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body) for _ in range(CONTENTION_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


_COLLECTED = re.compile(r"Collected : (\d+)")


def count(case: str, library: str, operations: int, args: argparse.Namespace) -> int:
    """Instructions executed by a child process running ``operations`` operations."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--pg-dsn",
        args.pg_dsn,
        "--mysql-url",
        args.mysql_url,
        "--child",
        case,
        library,
        str(operations),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=CHILD_TIME
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{library}, {case}: the counted run took over {CHILD_TIME} s") from None
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{library}, {case}: the counted run failed:\n{tail}")
    return int(found.group(1))


def per_operation(case: Case, library: str, args: argparse.Namespace) -> float:
    small, large = case.quick_operations if args.quick else case.operations
    extra = count(case.name, library, large, args) - count(case.name, library, small, args)
    return extra / (large - small)


def reachable_cases(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    cases, skipped = [CASES[0]], []
    postgresql = probe_postgresql(args.pg_dsn)
    for case, server in (
        (CASES[1], postgresql),
        (CASES[2], probe_mariadb(mysql_params(args.mysql_url))),
        (CASES[3], postgresql),
    ):
        if server.unreachable:
            skipped.append(f"{case.label}: {server.unreachable}")
        else:
            cases.append(case)
    return cases, skipped


def libraries_for(case: Case) -> list[Library]:
    if case.name == "cycle":
        return [lib for lib in ROWS if not lib.psycopg_only and lib is not FIFO_FLOOR]
    if case.name == "contention":
        return [lib for lib in ROWS if lib is not LEASE_FLOOR]
    return [lib for lib in LIBRARIES if not (lib.psycopg_only and case.name != "short_tx_pg")]


def measure(cases: Sequence[Case], args: argparse.Namespace) -> dict[tuple[str, str], float]:
    jobs = [(case, lib.name) for case in cases for lib in libraries_for(case)]
    # One job per CPU: valgrind runs a process on one at a time.
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as executor:
        futures = {
            (case.name, name): executor.submit(per_operation, case, name, args)
            for case, name in jobs
        }
        results = {}
        for key, future in futures.items():
            results[key] = future.result()
            log(f"{key[0]}, {key[1]}: {fmt_int(results[key])} instructions per operation")
    return results


def table(cases: Sequence[Case], results: dict[tuple[str, str], float]) -> Table:
    headers = ["library"]
    for case in cases:
        headers += [f"{case.label}: instructions", "beyond the raw floor"]
    rows = []
    for lib in ROWS:
        row = [lib.name]
        for case in cases:
            value = results.get((case.name, lib.name))
            floor = results[(case.name, RAW.name)]
            if value is None:
                row += ["n/a", "n/a"]
            else:
                beyond = "–" if lib is RAW else f"{value - floor:+,.0f}"
                row += [fmt_int(value), beyond]
        rows.append(row)
    return Table(
        title="Instructions per operation",
        headers=headers,
        rows=rows,
        notes=[
            "Client instructions per operation counted by valgrind's callgrind: the Python "
            "interpreter, the driver and the pool, not the kernel nor the server. “Beyond the raw "
            "floor” is the pool's own cost: what it adds to the same work done with no pool. "
            "The lease floor (cycle only) is the raw floor behind a function that returns a "
            "lease object for a with block: the least any pool that hands out leases costs. "
            "cycle: checkout + return with a no-I/O connection; short_tx: checkout, SELECT 1, "
            "fetch, commit, return; contention: the same transaction, its operations shared by "
            f"{CONTENTION_THREADS} threads over the pool's connections. The FIFO floor "
            "(contention only) is the raw floor handing each returned connection to the oldest "
            "waiter, as dbpool and psycopg_pool do; the raw floor there is a Condition that "
            "lets a returning thread take its connection straight back. valgrind runs one "
            "thread at a time, switching as one blocks or its time slice ends: callers queue "
            "and are woken as under contention, but never run in parallel, and the kernel's "
            f"part of the wake-ups is not counted. Pools of {POOL_SIZE}, filled, each "
            "library's defaults, as in compare.py (QueuePool and PooledDB roll back on every "
            "return, PooledDB also pings PyMySQL connections at checkout: round trips the "
            "client pays for too).",
        ],
    )


def to_markdown(header: str, result: Table, skipped: list[str]) -> str:
    lines = ["# Instructions per operation", "", header, ""]
    lines += [*md_table(result.headers, result.rows), "", *result.notes, ""]
    lines += [f"Skipped: {reason}." for reason in skipped]
    return "\n".join(lines) + "\n"


def to_rst(header: str, result: Table, skipped: list[str]) -> str:
    """The body of the counts, without a section title: docs/benchmarks.rst provides it."""
    lines = [".. This file is generated by benchmarks/instructions.py: do not edit it.", ""]
    lines += [rst_text(header), "", *rst_table(result.title, result.headers, result.rows)]
    lines += [rst_text(note) for note in result.notes]
    lines += ["", *[f"Skipped: {rst_text(reason)}." for reason in skipped]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Count the instructions each pool executes per operation, with valgrind."
    )
    parser.add_argument("--quick", action="store_true", help="fewer operations: a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument(
        "--pg-dsn", default=os.environ.get("DBPOOL_TEST_POSTGRESQL_DSN", DEFAULT_PG_DSN)
    )
    parser.add_argument(
        "--mysql-url", default=os.environ.get("DBPOOL_TEST_MYSQL_DSN", DEFAULT_MYSQL_URL)
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("CASE", "LIBRARY", "N"), help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        case, library, operations = args.child
        child(case, library, int(operations), args)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    cases, skipped = reachable_cases(args)
    results = measure(cases, args)
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout
    header = (
        f"Counted {started:%Y-%m-%d %H:%M} UTC with `python benchmarks/instructions.py"
        f"{' --quick' if args.quick else ''}`: {valgrind.strip()}, CPython "
        f"{platform.python_version()}, {cpu_model()}; dbpool {version_of('dbpool')}"
        f"{dbpool_revision()}."
    )
    result = table(cases, results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "instructions.md").write_text(to_markdown(header, result, skipped))
    (args.out / "instructions.inc").write_text(to_rst(header, result, skipped))
    log(f"wrote {args.out / 'instructions.md'} and instructions.inc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
