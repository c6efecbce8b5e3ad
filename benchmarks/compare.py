"""Compare dbpool with psycopg_pool, SQLAlchemy's QueuePool and DBUtils' PooledDB, side by side.

    python benchmarks/compare.py [--quick] [--rounds N] [--scenarios cycle,short_tx,...]
                                 [--out docs/benchmarks]

Every library runs in this one process, in interleaved rounds (A B C, then C B A, ...), and the
report gives medians over the rounds.  Scenarios:

- ``cycle``: checkout + checkin, single thread, with a no-I/O DB-API connection (the pool's own
  cost) and with real psycopg connections;
- ``short_tx``: checkout, ``SELECT 1``, commit, checkin, single thread, on PostgreSQL and on
  MariaDB, against a raw floor with no pool, with the round trips each library sends per
  transaction counted on the wire;
- ``contention``: 32 threads over 4 connections: throughput, acquire-wait percentiles, fairness;
- ``storm``: 200 threads at once on an empty pool of 10: time until all are served, connects
  attempted, peak of connections open.

A scenario whose server is unreachable is skipped with the reason; a library that fails is
reported with its error while the others carry on.  Writes ``results.md``, ``results.png`` and
``results.inc`` (the reStructuredText that docs/benchmarks.rst includes) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from _harness import (
    Batch,
    Contender,
    Metrics,
    Outcome,
    Subject,
    describe,
    paired_ratio,
    run_interleaved,
    run_threads,
    storm,
)
from _libraries import (
    DBPOOL,
    FIFO_FLOOR,
    LEASE_FLOOR,
    LIBRARIES,
    NULL_SOURCE,
    PEERS,
    POOLEDDB,
    PSYCOPG_POOL,
    RAW,
    Library,
    Source,
    Tally,
)
from _report import (
    NOT_MEASURED,
    Panel,
    Report,
    Table,
    Target,
    fmt_int,
    fmt_ms,
    fmt_ratio,
    fmt_us,
    plot,
    to_markdown,
    to_rst,
)
from _wire import MySQLWire, PgWire

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("cycle", "short_tx", "contention", "storm")
DEFAULT_PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/test"

Log = Callable[[str], None]

#: The contention table's rows: both floors first, the barging one then the fair one.
CONTENTION_ROWS = (RAW, FIFO_FLOOR, *LIBRARIES[1:])
#: The cycle table's rows: the lock floor, then the same with a lease object, then the pools.
CYCLE_ROWS = (RAW, LEASE_FLOOR, *LIBRARIES[1:])


def log(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Config:
    rounds: int
    cycle_seconds: float  # per sample
    tx_seconds: float  # per sample
    contention_seconds: float  # per sample
    counted_txs: int  # transactions whose round trips are counted, per library
    pool_size: int = 4  # cycle and short_tx
    contention_threads: int = 32
    contention_size: int = 4
    storm_threads: int = 200
    storm_size: int = 10


FULL = Config(rounds=9, cycle_seconds=0.2, tx_seconds=0.3, contention_seconds=1.5, counted_txs=200)
QUICK = Config(rounds=3, cycle_seconds=0.05, tx_seconds=0.1, contention_seconds=0.3, counted_txs=50)


@dataclass(frozen=True)
class Server:
    name: str
    version: str | None = None
    unreachable: str | None = None  # why, when it is


@dataclass(frozen=True)
class Env:
    pg_dsn: str
    mysql: dict[str, Any]
    pg: Server
    mariadb: Server


@dataclass
class Section:
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    panels: list[Panel] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# -- servers -------------------------------------------------------------------------------------


def mysql_params(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/") or "test",
    }


def probe_postgresql(dsn: str) -> Server:
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        return Server("PostgreSQL", version=f"PostgreSQL {version}")
    except Exception as exc:
        return Server("PostgreSQL", unreachable=f"PostgreSQL unreachable ({describe(exc)})")


def probe_mariadb(params: dict[str, Any]) -> Server:
    try:
        import pymysql

        conn = pymysql.connect(connect_timeout=3, **params)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT VERSION()")
                version = cursor.fetchone()[0]
        finally:
            conn.close()
        return Server("MariaDB", version=f"MariaDB/MySQL {version}")
    except Exception as exc:
        return Server("MariaDB", unreachable=f"MariaDB unreachable ({describe(exc)})")


def pg_source(dsn: str) -> Source:
    def connect() -> Any:
        import psycopg

        return psycopg.connect(dsn)

    return Source(connect=connect, dsn=dsn)


def mysql_source(params: dict[str, Any]) -> Source:
    def connect() -> Any:
        import pymysql

        return pymysql.connect(**params)

    return Source(connect=connect)


def applicable(source: Source) -> list[Library]:
    """The libraries that can pool these connections (psycopg_pool: psycopg only)."""
    return [lib for lib in LIBRARIES if not (lib.psycopg_only and source.dsn is None)]


# -- subjects ------------------------------------------------------------------------------------


def batch_contender(
    lib: Library, source: Source, size: int, loop: Callable[[Any, int], None], seconds: float
) -> Contender:
    def open_subject() -> Subject:
        pool = lib.open(source, size, True)
        try:
            return Batch(pool, loop, lib.close, seconds)
        except BaseException:
            lib.close(pool)
            raise

    return Contender(lib.name, open_subject)


class ContentionSubject:
    def __init__(self, lib: Library, source: Source, cfg: Config) -> None:
        self._lib = lib
        self._pool = lib.open(source, cfg.contention_size, True)
        self._threads = cfg.contention_threads
        self._seconds = cfg.contention_seconds
        try:
            self._run(min(0.2, self._seconds))  # warm up: threads, prepared statements
        except BaseException:
            lib.close(self._pool)
            raise

    def _run(self, seconds: float) -> Metrics:
        return run_threads(partial(self._lib.contention, self._pool), self._threads, seconds)

    def sample(self) -> Metrics:
        return self._run(self._seconds)

    def close(self) -> None:
        self._lib.close(self._pool)


class StormSubject:
    """Each sample opens an empty pool, lets the storm hit it, then closes it."""

    def __init__(self, lib: Library, dsn: str, cfg: Config) -> None:
        self._lib = lib
        self._dsn = dsn
        self._threads = cfg.storm_threads
        self._size = cfg.storm_size
        self._storm(threads=2)  # warm up: imports, first connects

    def _storm(self, threads: int) -> Metrics:
        tally = Tally()
        connection_class = tally.psycopg_class()
        dsn = self._dsn
        source = Source(
            connect=lambda: connection_class.connect(dsn),
            dsn=dsn,
            connection_class=connection_class,
        )
        pool = self._lib.open(source, self._size, False)
        try:
            metrics = storm(partial(self._lib.short_tx, pool, 1), threads)
        finally:
            self._lib.close(pool)
        metrics["connects"] = float(tally.attempts)
        metrics["peak_open"] = float(tally.peak)
        return metrics

    def sample(self) -> Metrics:
        return self._storm(self._threads)

    def close(self) -> None:
        pass


# -- reading outcomes ----------------------------------------------------------------------------


def cell(outcomes: dict[str, Outcome], lib: Library, text: Callable[[Outcome], str]) -> str:
    outcome = outcomes.get(lib.name)
    if outcome is None:
        return "n/a"
    if not outcome.rounds:
        return "failed"
    return text(outcome)


def error_notes(label: str, outcomes: dict[str, Outcome]) -> list[str]:
    return [f"{label}, {o.name}: {o.error}" for o in outcomes.values() if o.error is not None]


def ratio(outcomes: dict[str, Outcome], a: Library, b: Library, key: str) -> float:
    """Median per-round ratio a/b, NaN when either is missing."""
    if a.name not in outcomes or b.name not in outcomes:
        return math.nan
    return paired_ratio(outcomes[a.name], outcomes[b.name], key)


def ratio_to_best(
    outcomes: dict[str, Outcome], lib: Library, peers: Sequence[Library], key: str
) -> float:
    """Median over rounds of ``lib``'s figure over the best other peer's in the same round."""
    mine = outcomes.get(lib.name)
    others = [outcomes[p.name] for p in peers if p is not lib and p.name in outcomes]
    if mine is None or not others:
        return math.nan
    ratios = []
    for index, metrics in enumerate(mine.rounds):
        best = max((o.rounds[index][key] for o in others if len(o.rounds) > index), default=0.0)
        if best > 0:
            ratios.append(metrics[key] / best)
    ratios.sort()
    return ratios[len(ratios) // 2] if ratios else math.nan


def unmeasured(goals: Sequence[str], *args: object) -> list[Target]:
    return [Target(goal.format(*args), NOT_MEASURED, None) for goal in goals]


def target(goal: str, value: float, measured: str, ok: Callable[[float], bool]) -> Target:
    if math.isnan(value):
        return Target(goal, NOT_MEASURED, None)
    return Target(goal, measured, ok(value))


def values_of(outcomes: dict[str, Outcome], key: str) -> dict[str, float]:
    return {name: o.median(key) for name, o in outcomes.items() if o.rounds}


# -- scenarios -----------------------------------------------------------------------------------


def scenario_cycle(cfg: Config, env: Env) -> Section:
    section = Section()
    variants: list[tuple[str, Source]] = [("no-I/O", NULL_SOURCE)]
    if env.pg.unreachable is None:
        variants.append(("psycopg", pg_source(env.pg_dsn)))
    else:
        section.skipped.append(f"cycle with psycopg connections: {env.pg.unreachable}")
    results: dict[str, dict[str, Outcome]] = {}
    for label, source in variants:
        log(f"cycle ({label}): checkout + checkin, pools of {cfg.pool_size}")
        contenders = [
            batch_contender(lib, source, cfg.pool_size, lib.cycle, cfg.cycle_seconds)
            for lib in [*applicable(source), LEASE_FLOOR]
        ]
        results[label] = run_interleaved(contenders, cfg.rounds, log)

    headers = ["library"]
    for label in results:
        headers += [f"{label}: µs/cycle", "× raw floor", "× PooledDB"]
    rows = []
    for lib in CYCLE_ROWS:
        row = [lib.name]
        for outcomes in results.values():
            row += [
                cell(outcomes, lib, lambda o: fmt_us(o.median("us"))),
                cell(outcomes, lib, lambda o: fmt_ratio(ratio(outcomes, lib, RAW, "us"))),
                cell(outcomes, lib, lambda o: fmt_ratio(ratio(outcomes, lib, POOLEDDB, "us"))),
            ]
        rows.append(row)
    notes = [
        "Median µs per checkout + checkin (lower is better); ratios are medians of per-round "
        "ratios of times (below 1: faster than the reference). The lease floor is the raw "
        "floor's lock and deque behind a function that returns a lease object for a with "
        "block, with no clock, check or count: the least any pool that hands out leases costs."
    ]
    for label, outcomes in results.items():
        notes += error_notes(f"cycle {label}", outcomes)
    section.tables.append(Table("cycle: checkout + checkin, single thread", headers, rows, notes))

    null = results["no-I/O"]
    vs_dbutils = ratio(null, DBPOOL, POOLEDDB, "us")
    vs_raw = ratio(null, DBPOOL, RAW, "us")
    section.targets += [
        target(
            "cycle (no-I/O): dbpool at most 0.5× DBUtils PooledDB's time",
            vs_dbutils,
            f"{fmt_ratio(vs_dbutils, 3)} ({fmt_us(null[DBPOOL.name].median('us'))} µs vs "
            f"{fmt_us(null[POOLEDDB.name].median('us'))} µs)",
            lambda v: v <= 0.5,
        ),
        target(
            "cycle (no-I/O): dbpool within 2× the raw lock floor",
            vs_raw,
            f"{fmt_ratio(vs_raw, 3)} ({fmt_us(null[DBPOOL.name].median('us'))} µs vs "
            f"{fmt_us(null[RAW.name].median('us'))} µs)",
            lambda v: v <= 2.0,
        ),
    ]
    lease_vs_raw = ratio(null, LEASE_FLOOR, RAW, "us")
    lease_vs_dbutils = ratio(null, LEASE_FLOOR, POOLEDDB, "us")
    if not math.isnan(lease_vs_raw):
        section.targets.append(
            Target(
                "cycle (no-I/O): what a lease object alone costs, the lease floor (reported)",
                f"{fmt_ratio(lease_vs_raw, 3)} the raw lock floor, "
                f"{fmt_ratio(lease_vs_dbutils, 3)} PooledDB "
                f"({fmt_us(null[LEASE_FLOOR.name].median('us'))} µs)",
                None,
            )
        )
    section.panels.append(
        Panel(
            "cycle: µs per checkout + checkin (lower is better)",
            "µs",
            {label: values_of(outcomes, "us") for label, outcomes in results.items()},
            labels={
                label: {n: fmt_us(v) for n, v in values_of(outcomes, "us").items()}
                for label, outcomes in results.items()
            },
        )
    )
    return section


def count_round_trips(lib: Library, wire: Any, cfg: Config) -> Counter[str]:
    """What the server receives during ``cfg.counted_txs`` transactions through ``lib``."""
    pool = lib.open(wire.source(), cfg.pool_size, True)
    try:
        # Warm up as the timed rounds did: every connection past psycopg's prepare threshold.
        lib.short_tx(pool, 10 * cfg.pool_size)
        wire.start()
        lib.short_tx(pool, cfg.counted_txs)
        return wire.stop()  # type: ignore[no-any-return]
    finally:
        lib.close(pool)


def describe_round_trips(counts: Counter[str], txs: int) -> tuple[float, str]:
    total = sum(counts.values()) / txs
    parts = [label if n == txs else f"{label} ×{n / txs:.2g}" for label, n in counts.items()]
    return total, " + ".join(parts) or "nothing"


SHORT_TX_GOALS = (
    "short_tx on {}: dbpool at least 0.97× the raw floor's throughput",
    "short_tx on {}: no round trip beyond the raw floor's on a clean checkout and return",
)
CONTENTION_GOALS = (
    "contention: dbpool throughput at least 1.1× the best peer's",
    "contention: dbpool's max acquire wait no worse than psycopg_pool's",
)
STORM_GOALS = (
    "storm: dbpool never opens more than max_size={}",
    "storm: everyone served",
    "storm: time until all served (reported)",
)


def scenario_short_tx(cfg: Config, env: Env) -> Section:
    section = Section()
    variants: list[tuple[str, Source, Callable[[], Any]]] = []
    if env.pg.unreachable is None:
        variants.append(("PostgreSQL", pg_source(env.pg_dsn), partial(PgWire, env.pg_dsn)))
    else:
        section.skipped.append(f"short_tx on PostgreSQL: {env.pg.unreachable}")
        section.targets += unmeasured(SHORT_TX_GOALS, "PostgreSQL")
    if env.mariadb.unreachable is None:
        variants.append(("MariaDB", mysql_source(env.mysql), partial(MySQLWire, env.mysql)))
    else:
        section.skipped.append(f"short_tx on MariaDB: {env.mariadb.unreachable}")
        section.targets += unmeasured(SHORT_TX_GOALS, "MariaDB")
    if not variants:
        return section

    results: dict[str, dict[str, Outcome]] = {}
    trips: dict[str, dict[str, tuple[float, str]]] = {}
    notes = [
        "Median µs per transaction (checkout, SELECT 1, fetch, commit, checkin); "
        "“× raw” is throughput relative to the raw floor, median of per-round ratios "
        "(1.00 = no pool overhead at all). “CPU µs/tx” is this process's CPU time per "
        "transaction (the client's own work and its system calls, not its waits for the "
        "server): the median, like the times. Round trips are counted on the wire in a separate "
        f"pass of {cfg.counted_txs} transactions per library. The raw floor spreads the "
        "transactions over all its connections, as the FIFO pools (psycopg_pool, QueuePool, "
        "PooledDB) do; dbpool's idle stack hands out the most recently returned connection, "
        "rotating through the four most recent ones under load."
    ]
    for label, source, make_wire in variants:
        log(f"short_tx ({label}): SELECT 1 + commit, pools of {cfg.pool_size}")
        contenders = [
            batch_contender(lib, source, cfg.pool_size, lib.short_tx, cfg.tx_seconds)
            for lib in applicable(source)
        ]
        results[label] = outcomes = run_interleaved(contenders, cfg.rounds, log)
        notes += error_notes(f"short_tx {label}", outcomes)
        log(f"short_tx ({label}): counting round trips")
        trips[label] = {}
        for lib in applicable(source):
            try:
                counts = count_round_trips(lib, make_wire(), cfg)
                trips[label][lib.name] = describe_round_trips(counts, cfg.counted_txs)
            except Exception as exc:
                notes.append(f"round trips on {label}, {lib.name}: {describe(exc)}")

    headers = ["library"]
    for label in results:
        headers += [f"{label}: µs/tx", "× raw", "CPU µs/tx", "round trips/tx"]
    rows = []
    for lib in LIBRARIES:
        row = [lib.name]
        for label, outcomes in results.items():
            counted = trips[label].get(lib.name)
            row += [
                cell(outcomes, lib, lambda o: fmt_us(o.median("us"))),
                cell(outcomes, lib, lambda o: fmt_ratio(ratio(outcomes, RAW, lib, "us"))),
                cell(outcomes, lib, lambda o: fmt_us(o.median("cpu_us"))),
                "n/a" if lib.name not in outcomes else f"{counted[0]:.3g}" if counted else "failed",
            ]
        rows.append(row)
    section.tables.append(Table("short_tx: one transaction, single thread", headers, rows, notes))

    what = [
        [lib.name] + [trips[label].get(lib.name, (0.0, "n/a"))[1] for label in results]
        for lib in LIBRARIES
    ]
    section.tables.append(
        Table(
            "short_tx: what the server receives per transaction",
            ["library", *results],
            what,
            [
                "Counted from libpq's protocol trace (PostgreSQL) and PyMySQL's command packets "
                "(MariaDB): PING is a round trip without SQL."
            ],
        )
    )

    panel = Panel(
        "short_tx: throughput relative to the raw floor (higher is better)", "× raw", {}, hline=0.97
    )
    for label, outcomes in results.items():
        rel = {
            lib.name: ratio(outcomes, RAW, lib, "us") for lib in LIBRARIES if lib.name in outcomes
        }
        panel.groups[label] = {n: v for n, v in rel.items() if not math.isnan(v)}
        panel.labels[label] = {
            n: f"{fmt_ratio(v)}\n{trips[label][n][0]:.3g} rt" if n in trips[label] else fmt_ratio(v)
            for n, v in panel.groups[label].items()
        }
        value = rel.get(DBPOOL.name, math.nan)
        section.targets.append(
            target(SHORT_TX_GOALS[0].format(label), value, fmt_ratio(value, 3), lambda v: v >= 0.97)
        )
        mine, floor = trips[label].get(DBPOOL.name), trips[label].get(RAW.name)
        extra = mine[0] - floor[0] if mine and floor else math.nan
        section.targets.append(
            target(
                SHORT_TX_GOALS[1].format(label),
                extra,
                f"dbpool {mine[0]:.3g} ({mine[1]}), raw {floor[0]:.3g}" if mine and floor else "",
                lambda v: v <= 0,
            )
        )
    section.panels.append(panel)
    return section


def scenario_contention(cfg: Config, env: Env) -> Section:
    section = Section()
    if env.pg.unreachable is not None:
        section.skipped.append(f"contention (PostgreSQL): {env.pg.unreachable}")
        section.targets += unmeasured(CONTENTION_GOALS)
        return section
    source = pg_source(env.pg_dsn)
    log(f"contention: {cfg.contention_threads} threads over {cfg.contention_size} connections")
    contenders = [
        Contender(lib.name, partial(ContentionSubject, lib, source, cfg))
        for lib in [*applicable(source), FIFO_FLOOR]
    ]
    outcomes = run_interleaved(contenders, cfg.rounds, log)
    pools = [lib for lib in LIBRARIES if lib.is_pool]
    rows = []
    for lib in CONTENTION_ROWS:
        rows.append(
            [
                lib.name,
                cell(outcomes, lib, lambda o: fmt_int(o.median("ops_per_s"))),
                "–"
                if not lib.is_pool
                else cell(
                    outcomes,
                    lib,
                    lambda o: fmt_ratio(ratio_to_best(outcomes, lib, pools, "ops_per_s")),
                ),
                cell(outcomes, lib, lambda o: fmt_ms(o.median("wait_p50"))),
                cell(outcomes, lib, lambda o: fmt_ms(o.median("wait_p99"))),
                cell(outcomes, lib, lambda o: fmt_ms(o.median("wait_max"))),
                cell(
                    outcomes,
                    lib,
                    lambda o: f"{fmt_int(o.median('ops_min'))}–{fmt_int(o.median('ops_max'))}",
                ),
                cell(
                    outcomes,
                    lib,
                    lambda o: f"{o.median('user_us'):.0f} + {o.median('system_us'):.0f}",
                ),
                cell(outcomes, lib, lambda o: f"{o.median('switches'):.1f}"),
            ]
        )
    notes = [
        f"Each op: checkout, SELECT 1, commit, checkin on PostgreSQL; {cfg.contention_seconds:g} s "
        "per round. Acquire wait is the time from asking for a connection to holding it; "
        "each figure is the median over rounds of that round's figure. “× best other pool” "
        "compares with the fastest other pool in the same round. Ops per thread: the least "
        "and the most any one thread completed in a round (fairness). CPU µs/op: the "
        "process's user + system CPU time per operation; switches/op: its threads' context "
        "switches per operation. The raw floor lets a returning thread take its connection "
        "straight back (a Condition, as QueuePool and PooledDB do); the FIFO floor hands each "
        "returned connection to the oldest waiter, as dbpool and psycopg_pool do, with no "
        "other work: what strict fairness costs on this machine before any pool logic.",
        *error_notes("contention", outcomes),
    ]
    section.tables.append(
        Table(
            f"contention: {cfg.contention_threads} threads over {cfg.contention_size} connections",
            [
                "library",
                "ops/s",
                "× best other pool",
                "wait p50 (ms)",
                "wait p99 (ms)",
                "wait max (ms)",
                "ops per thread (min–max)",
                "CPU µs/op (user + system)",
                "switches/op",
            ],
            rows,
            notes,
        )
    )
    vs_best = ratio_to_best(outcomes, DBPOOL, PEERS, "ops_per_s")
    section.targets.append(
        target(CONTENTION_GOALS[0], vs_best, fmt_ratio(vs_best, 3), lambda v: v >= 1.1)
    )
    max_ratio = ratio(outcomes, DBPOOL, PSYCOPG_POOL, "wait_max")
    section.targets.append(
        target(
            CONTENTION_GOALS[1],
            max_ratio,
            f"{fmt_ratio(max_ratio, 3)} ({fmt_ms(outcomes[DBPOOL.name].median('wait_max'))} ms vs "
            f"{fmt_ms(outcomes[PSYCOPG_POOL.name].median('wait_max'))} ms)"
            if not math.isnan(max_ratio)
            else "",
            lambda v: v <= 1.0,
        )
    )
    throughput = values_of(outcomes, "ops_per_s")
    section.panels.append(
        Panel(
            "contention: ops/s, 32 threads over 4 connections (label: max wait)",
            "ops/s",
            {"ops/s": throughput},
            labels={
                "ops/s": {n: f"max {fmt_ms(outcomes[n].median('wait_max'))} ms" for n in throughput}
            },
        )
    )
    return section


def scenario_storm(cfg: Config, env: Env) -> Section:
    section = Section()
    if env.pg.unreachable is not None:
        section.skipped.append(f"storm (PostgreSQL): {env.pg.unreachable}")
        section.targets += unmeasured(STORM_GOALS, cfg.storm_size)
        return section
    log(f"storm: {cfg.storm_threads} threads at once on an empty pool of {cfg.storm_size}")
    source = pg_source(env.pg_dsn)
    contenders = [
        Contender(lib.name, partial(StormSubject, lib, env.pg_dsn, cfg))
        for lib in applicable(source)
        if lib.is_pool
    ]
    outcomes = run_interleaved(contenders, cfg.rounds, log)

    def worst(o: Outcome, key: str, pick: Callable[..., float]) -> float:
        return pick(m[key] for m in o.rounds)

    rows = [
        [
            lib.name,
            cell(outcomes, lib, lambda o: fmt_ms(o.median("seconds"))),
            cell(outcomes, lib, lambda o: fmt_int(worst(o, "connects", max))),
            cell(outcomes, lib, lambda o: fmt_int(worst(o, "peak_open", max))),
            cell(
                outcomes, lib, lambda o: f"{fmt_int(worst(o, 'served', min))}/{cfg.storm_threads}"
            ),
        ]
        for lib in LIBRARIES
        if lib.is_pool
    ]
    notes = [
        "Each thread runs one transaction (checkout, SELECT 1, commit, checkin) on PostgreSQL. "
        "Time: median over rounds, from releasing the threads to the last one done. Connects, "
        "peak open: the most in any round; served: the fewest in any round.",
        *error_notes("storm", outcomes),
    ]
    section.tables.append(
        Table(
            f"storm: {cfg.storm_threads} threads at once on an empty pool of {cfg.storm_size}",
            ["library", "time until all served (ms)", "connects attempted", "peak open", "served"],
            rows,
            notes,
        )
    )
    mine = outcomes.get(DBPOOL.name)
    if mine is not None and mine.rounds:
        peak = worst(mine, "peak_open", max)
        served = worst(mine, "served", min)
        section.targets += [
            Target(
                STORM_GOALS[0].format(cfg.storm_size),
                f"peak {peak:.0f}, {worst(mine, 'connects', max):.0f} connects",
                peak <= cfg.storm_size,
            ),
            Target(
                STORM_GOALS[1], f"{served:.0f}/{cfg.storm_threads}", served >= cfg.storm_threads
            ),
            Target(STORM_GOALS[2], f"{fmt_ms(mine.median('seconds'))} ms", None),
        ]
    else:
        section.targets += unmeasured(STORM_GOALS, cfg.storm_size)
    times = {n: v * 1000 for n, v in values_of(outcomes, "seconds").items()}
    section.panels.append(
        Panel(
            f"storm: ms until {cfg.storm_threads} threads served, empty pool of {cfg.storm_size} "
            "(label: connects)",
            "ms",
            {"ms": times},
            labels={
                "ms": {n: f"{worst(outcomes[n], 'connects', max):.0f} connects" for n in times}
            },
        )
    )
    return section


RUNNERS: dict[str, Callable[[Config, Env], Section]] = {
    "cycle": scenario_cycle,
    "short_tx": scenario_short_tx,
    "contention": scenario_contention,
    "storm": scenario_storm,
}


# -- the machine and the versions ----------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dbpool_revision() -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never refresh the index
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "dbpool"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (commit {commit}{', with local changes' if changed else ''})"


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_line(env: Env) -> str:
    parts = [f"dbpool {version_of('dbpool')}{dbpool_revision()}"]
    for dist in ("psycopg", "psycopg-pool", "PyMySQL", "SQLAlchemy", "DBUtils"):
        text = f"{dist} {version_of(dist)}"
        if dist == "psycopg":
            try:
                from psycopg import pq

                v = pq.version()
                text += f" ({pq.__impl__}, libpq {v // 10000}.{v % 10000})"
            except Exception:
                pass
        parts.append(text)
    servers = [s.version or s.unreachable or s.name for s in (env.pg, env.mariadb)]
    return "Versions: " + ", ".join(parts) + ". Servers: " + "; ".join(servers) + "."


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare dbpool with psycopg_pool, SQLAlchemy QueuePool and DBUtils "
        "PooledDB in interleaved rounds.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short samples and 3 rounds: a smoke run, not a measurement",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds (default {FULL.rounds}, --quick {QUICK.rounds})",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where results.md, results.png and results.inc go (default: docs/benchmarks)",
    )
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get("DBPOOL_TEST_POSTGRESQL_DSN", DEFAULT_PG_DSN),
        help="libpq DSN (default: $DBPOOL_TEST_POSTGRESQL_DSN or the local test server)",
    )
    parser.add_argument(
        "--mysql-url",
        default=os.environ.get("DBPOOL_TEST_MYSQL_DSN", DEFAULT_MYSQL_URL),
        help="mysql://user:password@host:port/db (default: "
        "$DBPOOL_TEST_MYSQL_DSN or the local test server)",
    )
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown or not scenarios:
        parser.error(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    args.scenarios = [s for s in SCENARIOS if s in scenarios]
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.rounds is not None:
        cfg = replace(cfg, rounds=args.rounds)
    mysql = mysql_params(args.mysql_url)
    env = Env(args.pg_dsn, mysql, probe_postgresql(args.pg_dsn), probe_mariadb(mysql))
    for server in (env.pg, env.mariadb):
        if server.unreachable:
            log(f"{server.unreachable}: its scenarios are skipped")

    started = datetime.datetime.now(datetime.timezone.utc)
    sections = []
    for name in args.scenarios:
        try:
            sections.append(RUNNERS[name](cfg, env))
        except Exception as exc:  # a bug in one scenario must not lose the others
            log(f"{name}: failed: {describe(exc)}")
            sections.append(Section(skipped=[f"{name}: the scenario failed: {describe(exc)}"]))

    command = "python benchmarks/compare.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    report = Report(
        title="dbpool and its peers, side by side",
        intro=[
            f"Measured {started:%Y-%m-%d %H:%M} UTC with `{command}`: {cfg.rounds} interleaved "
            "rounds (A B C, C B A, ...) in one process. Every figure is the median over the "
            "rounds, every ratio the median of the per-round ratios.",
            f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
            f"{platform.release()}; {platform.python_implementation()} "
            f"{platform.python_version()}.",
            versions_line(env),
            "Every pool holds the same number of connections, opened before the measurement "
            "(except in `storm`, which starts empty); everything else is each library's "
            "default, listed under Settings. The defaults differ in what they check and "
            "reset: dbpool pings only a connection idle for over 1 s and rolls back only "
            "when a transaction is open; QueuePool and PooledDB call rollback() on every "
            "return; PooledDB also pings at every checkout when the driver has ping().",
        ],
        tables=[t for s in sections for t in s.tables],
        targets=[t for s in sections for t in s.targets],
        skipped=[r for s in sections for r in s.skipped],
        settings=[(lib.name, lib.settings) for lib in (*LIBRARIES, LEASE_FLOOR, FIFO_FLOOR)]
        + [("scenarios", scenario_settings(cfg))],
        panels=[p for s in sections for p in s.panels],
    )
    write_outputs(report, args.out, cfg, started)
    return 0


def scenario_settings(cfg: Config) -> str:
    return (
        f"cycle and short_tx: pools of {cfg.pool_size}, samples of about "
        f"{cfg.cycle_seconds:g} s (cycle) and {cfg.tx_seconds:g} s (short_tx) per library per "
        f"round, {cfg.counted_txs} transactions counted for round trips; contention: "
        f"{cfg.contention_threads} threads, {cfg.contention_size} connections, "
        f"{cfg.contention_seconds:g} s per round; storm: {cfg.storm_threads} threads, pools of "
        f"{cfg.storm_size} starting empty (QueuePool max_overflow=0, PooledDB mincached=0)"
    )


def write_outputs(report: Report, out: Path, cfg: Config, started: datetime.datetime) -> None:
    out.mkdir(parents=True, exist_ok=True)
    image = out / "results.png"
    (out / "results.md").write_text(to_markdown(report, image.name), encoding="utf-8")
    (out / "results.inc").write_text(to_rst(report), encoding="utf-8")
    try:
        plot(
            report.panels,
            image,
            [lib.name for lib in CONTENTION_ROWS],
            DBPOOL.name,
            f"dbpool benchmarks, {started:%Y-%m-%d}, {cpu_model()}, Python "
            f"{platform.python_version()}: medians of {cfg.rounds} interleaved rounds",
        )
    except ImportError as exc:
        log(f"no plot: {describe(exc)} (install the bench extra: pip install -e '.[bench]')")
    log(f"wrote {out / 'results.md'}, {out / 'results.inc'} and {image}")


if __name__ == "__main__":
    sys.exit(main())
