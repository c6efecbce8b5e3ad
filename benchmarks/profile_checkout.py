"""Where a checkout's time goes: dbpool's hot path, line by line.

    python benchmarks/profile_checkout.py [--quick] [--runs N] [--cycles N] [--out DIR]

A pool of one no-I/O connection (``NullConnection``, as in compare.py), filled, and two cycles:

- ``bare``: ``conn = pool.connection(); conn.close()``;
- ``statement``: ``conn = pool.connection(); conn.cursor().execute("SELECT 1"); conn.commit();
  conn.close()``.

First each cycle is timed with no profiler, in interleaved runs with its raw floor (a
``threading.Lock`` and a ``deque``, take then put, with the same driver calls for the statement
cycle); the figures are medians of the runs.  Then each cycle runs under line_profiler with
every dbpool function it calls registered: the functions are found by tracing a few cycles
(``sys.setprofile``), which also records which line calls which function, so that a line's own
time can be told from the time of the functions it calls.  Calibration functions, profiled in
turns with the cycle, give what the profiler charges for a trivial line and a trivial call (the
baseline), so that the lines can be ranked by their time above it.  The tables come from the
profiler's ``LineStats``.  Writes ``profile.md`` and ``profile.inc`` (the reStructuredText that
docs/benchmarks.rst includes) into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import linecache
import os
import platform
import statistics
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter
from types import CodeType, FrameType, ModuleType
from typing import Any, Callable

from _harness import Batch, Contender, Outcome, run_interleaved
from _libraries import NULL_SOURCE, RawFloor, cycle_raw
from _report import fmt_us
from compare import ROOT, cpu_model, dbpool_revision, log, version_of

import dbpool

SQL = "SELECT 1"
PACKAGE_DIR = str(Path(dbpool.__file__).resolve().parent) + os.sep

#: A function, as line_profiler's LineStats name it: (file, first line).
Key = tuple[str, int]


@dataclass(frozen=True)
class Config:
    runs: int  # interleaved runs without the profiler
    seconds: float  # length of one run
    cycles: int  # cycles run under the profiler
    segments: int  # ... in this many segments, whose medians are taken


FULL = Config(runs=15, seconds=0.2, cycles=50_000, segments=10)
QUICK = Config(runs=3, seconds=0.02, cycles=2_000, segments=4)


# -- the cycles ----------------------------------------------------------------------------------


def open_pool() -> dbpool.Pool[Any]:
    pool = dbpool.Pool(NULL_SOURCE.connect, min_size=1, max_size=1, name="profile")
    pool.wait()
    return pool


def bare_dbpool(pool: dbpool.Pool[Any], n: int) -> None:
    for _ in range(n):
        conn = pool.connection()
        conn.close()


def statement_dbpool(pool: dbpool.Pool[Any], n: int) -> None:
    for _ in range(n):
        conn = pool.connection()
        conn.cursor().execute(SQL)
        conn.commit()
        conn.close()


def statement_raw(floor: RawFloor, n: int) -> None:
    lock, idle = floor.lock, floor.idle
    for _ in range(n):
        with lock:
            conn = idle.pop()
        cursor = conn.cursor()
        cursor.execute(SQL)
        conn.commit()
        cursor.close()  # dbpool closes the cursors a lease left open when it comes back
        with lock:
            idle.append(conn)


@dataclass(frozen=True)
class Cycle:
    name: str
    title: str
    code: str  # the cycle, as written
    floor: str  # what the raw floor does
    dbpool_loop: Callable[[dbpool.Pool[Any], int], None]
    raw_loop: Callable[[RawFloor, int], None]


BARE = Cycle(
    name="bare",
    title="A bare checkout and return",
    code="conn = pool.connection(); conn.close()",
    floor="a threading.Lock and a deque: take, put back",
    dbpool_loop=bare_dbpool,
    raw_loop=cycle_raw,
)
STATEMENT = Cycle(
    name="statement",
    title="With a statement",
    code='conn = pool.connection(); conn.cursor().execute("SELECT 1"); conn.commit(); conn.close()',
    floor="the lock and deque, with the same driver calls: cursor(), execute(), commit(), "
    "and the cursor's close() (which dbpool does on return)",
    dbpool_loop=statement_dbpool,
    raw_loop=statement_raw,
)
CYCLES = (BARE, STATEMENT)


# -- timing without the profiler -----------------------------------------------------------------


def _close(subject: Any) -> None:
    subject.close()


def time_cycles(cfg: Config) -> dict[str, Outcome]:
    """Median µs per cycle, dbpool and floor, every cycle in the same interleaved runs."""

    def contender(name: str, open_subject: Callable[[], Any], loop: Any) -> Contender:
        return Contender(name, lambda: Batch(open_subject(), loop, _close, cfg.seconds))

    contenders = []
    for cycle in CYCLES:
        contenders.append(contender(f"{cycle.name} dbpool", open_pool, cycle.dbpool_loop))
        contenders.append(
            contender(f"{cycle.name} raw", lambda: RawFloor(NULL_SOURCE, 1), cycle.raw_loop)
        )
    outcomes = run_interleaved(contenders, cfg.runs, log)
    for name, outcome in outcomes.items():
        if outcome.error:
            raise RuntimeError(f"{name}: {outcome.error}")
    return outcomes


# -- the path: which dbpool functions a cycle calls, and from which line -------------------------


@dataclass
class Trace:
    """What tracing a few cycles saw."""

    cycles: int
    calls: Counter[Key] = field(default_factory=Counter)  # calls of each dbpool function
    #: (caller, caller's line, callee) -> calls, between dbpool functions
    edges: Counter[tuple[Key, int, Key]] = field(default_factory=Counter)
    codes: dict[Key, CodeType] = field(default_factory=dict)
    order: list[Key] = field(default_factory=list)  # first call first


def key_of(code: CodeType) -> Key:
    return code.co_filename, code.co_firstlineno


def trace_path(cycle: Cycle, pool: dbpool.Pool[Any], cycles: int) -> Trace:
    seen = Trace(cycles)

    def hook(frame: FrameType, event: str, arg: object) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return
        key = key_of(frame.f_code)
        if key not in seen.codes:
            seen.codes[key] = frame.f_code
            seen.order.append(key)
        seen.calls[key] += 1
        caller = frame.f_back
        if caller is not None and caller.f_code.co_filename.startswith(PACKAGE_DIR):
            seen.edges[key_of(caller.f_code), caller.f_lineno, key] += 1

    sys.setprofile(hook)
    try:
        cycle.dbpool_loop(pool, cycles)
    finally:
        sys.setprofile(None)
    return seen


def _functions_in(obj: object, module: ModuleType) -> Iterator[Any]:
    if inspect.isfunction(obj):
        yield obj
    elif isinstance(obj, type) and obj.__module__ == module.__name__:
        for attr in vars(obj).values():
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if inspect.isfunction(attr):
                yield attr
            elif isinstance(attr, property):
                yield from (f for f in (attr.fget, attr.fset, attr.fdel) if f is not None)


def functions_of(keys: Sequence[Key]) -> dict[Key, Any]:
    """The function objects of the traced code, looked up in dbpool's modules."""
    found: dict[Key, Any] = {}
    for name, module in list(sys.modules.items()):
        if name == "dbpool" or name.startswith("dbpool."):
            for obj in list(vars(module).values()):
                for function in _functions_in(obj, module):
                    found.setdefault(key_of(function.__code__), function)
    return {key: found[key] for key in keys if key in found}


# -- profiling -----------------------------------------------------------------------------------


@dataclass
class Line:
    number: int
    source: str
    hits: int
    ns: float  # total, callees included
    callees: list[tuple[str, float]] = field(default_factory=list)  # (label, calls per cycle)
    own_ns: float = 0.0  # total, without the profiled functions it calls
    excess_ns: float = 0.0  # own, less the profiler's baseline (see Baseline)


@dataclass
class Function:
    key: Key
    label: str
    file: str
    calls_per_cycle: float
    lines: list[Line]
    top_level: bool  # called from the cycle itself, not from another dbpool function

    @property
    def ns(self) -> float:
        return sum(line.ns for line in self.lines)

    @property
    def own_ns(self) -> float:
        return sum(line.own_ns for line in self.lines)

    @property
    def excess_ns(self) -> float:
        return sum(line.excess_ns for line in self.lines)


@dataclass(frozen=True)
class Baseline:
    """What the profiler charges for next to nothing, measured under the same profiler.

    Part of the profiler's work on each line falls outside the line's own span, into the span
    of the line that called its function: a line that calls a profiled function is charged for
    the call and for a share of the profiler's work on each of the callee's lines.
    """

    line_ns: float  # a line that does almost nothing (``x = None``), per hit
    call_ns: float  # a line that only calls an empty function: its own time, per call
    leak_ns: float  # the caller's extra per line the callee runs beyond the first

    def of(self, line: Line, cycles: int, hits_per_call: dict[str, float]) -> float:
        """The baseline of ``line``, all hits: a trivial line's, plus for each profiled call
        it makes, a trivial call's extra and the callee's share."""
        ns = self.line_ns * line.hits
        for label, per_cycle in line.callees:
            extra_lines = max(0.0, hits_per_call.get(label, 1.0) - 1)
            ns += per_cycle * cycles * (self.call_ns - self.line_ns + self.leak_ns * extra_lines)
        return ns


# Calibration: a function of one trivial line, one of eleven, and a loop that calls both.


def _one_line() -> None:
    return None


def _eleven_lines() -> None:
    x = None
    x = None
    x = None
    x = None
    x = None
    x = None
    x = None
    x = None
    x = None
    x = None
    return x


def _calibration_loop(n: int) -> None:
    one, eleven = _one_line, _eleven_lines
    for _ in range(n):
        one()
        eleven()


@dataclass
class Profile:
    cycle: Cycle
    cycles: int
    wall_us: float  # per cycle, under the profiler
    functions: list[Function]
    baseline: Baseline
    missing: list[str]  # traced code no function object was found for (not profiled)

    @property
    def profiled_us(self) -> float:
        """Per cycle, inside dbpool's functions, as the profiler timed them."""
        return sum(f.ns for f in self.functions if f.top_level) / self.cycles / 1000

    @property
    def excess_us(self) -> float:
        """Per cycle, inside dbpool's functions, less the profiler's baseline on every line."""
        return sum(f.excess_ns for f in self.functions) / self.cycles / 1000

    @property
    def hits_per_cycle(self) -> float:
        return sum(line.hits for f in self.functions for line in f.lines) / self.cycles

    @property
    def calls_per_cycle(self) -> float:
        return sum(f.calls_per_cycle for f in self.functions)


def label_of(code: CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)


Rows = dict[Key, list[tuple[int, int, float]]]  # function -> [(line, hits, ns), ...]


def line_rows(stats: Any) -> Rows:
    """line_profiler's LineStats as {function: [(line, hits, ns), ...]}, in line order."""
    to_ns = stats.unit * 1e9
    return {
        (file, first): sorted((number, hits, total * to_ns) for number, hits, total in rows)
        for (file, first, _name), rows in stats.timings.items()
    }


def profile_segments(
    subjects: Sequence[tuple[Any, Callable[[], None]]], segments: int
) -> list[tuple[Rows, float]]:
    """Call each ``run`` ``segments`` times under its ``profiler``, the subjects taking turns.

    Returns for each subject, per line, the hits and a total time that a burst of other work
    on the machine cannot skew: the median over the segments of the time per hit, times the
    hits; and the median wall time of a segment.
    """
    previous: list[dict[tuple[Key, int], tuple[int, float]]] = [{} for _ in subjects]
    samples: list[dict[tuple[Key, int], list[tuple[int, float]]]] = [{} for _ in subjects]
    walls: list[list[float]] = [[] for _ in subjects]
    for _ in range(segments):
        for i, (profiler, run) in enumerate(subjects):
            profiler.enable_by_count()
            try:
                started = perf_counter()
                run()
                walls[i].append(perf_counter() - started)
            finally:
                profiler.disable_by_count()
            for key, rows in line_rows(profiler.get_stats()).items():  # cumulative: the step
                for number, hits, ns in rows:
                    hits_before, ns_before = previous[i].get((key, number), (0, 0.0))
                    if hits > hits_before:
                        step = (hits - hits_before, ns - ns_before)
                        samples[i].setdefault((key, number), []).append(step)
                    previous[i][key, number] = hits, ns
    results = []
    for i in range(len(subjects)):
        result: Rows = {}
        for (key, number), steps in sorted(samples[i].items()):
            hits = sum(h for h, _ in steps)
            per_hit = statistics.median(ns / h for h, ns in steps)
            result.setdefault(key, []).append((number, hits, per_hit * hits))
        results.append((result, statistics.median(walls[i])))
    return results


CALIBRATION = (_one_line, _eleven_lines, _calibration_loop)


def calibration_profiler() -> Any:
    from line_profiler import LineProfiler

    profiler = LineProfiler()
    for function in CALIBRATION:
        profiler.add_function(function)
    return profiler


def baseline_of(rows: Rows, calls: int) -> Baseline:
    """The baseline, from the calibration loop's rows after ``calls`` turns."""
    one, eleven, loop = (key_of(f.__code__) for f in CALIBRATION)
    one_ns = sum(ns for _, _, ns in rows[one]) / calls
    eleven_ns = sum(ns for _, _, ns in rows[eleven]) / calls
    # The loop's two call lines, each run once per turn, in order; their own time per call.
    call_one, call_eleven = (ns / calls for _, hits, ns in rows[loop] if hits == calls)
    call_one -= one_ns
    call_eleven -= eleven_ns
    return Baseline(
        line_ns=statistics.mean(ns / hits for _, hits, ns in rows[eleven][:-1]),
        call_ns=call_one,
        leak_ns=(call_eleven - call_one) / 10,
    )


def profile_cycle(cycle: Cycle, cfg: Config) -> Profile:
    from line_profiler import LineProfiler

    per_segment = max(1, cfg.cycles // cfg.segments)
    cycles = per_segment * cfg.segments
    calibration = calibration_profiler()
    pool = open_pool()
    try:
        cycle.dbpool_loop(pool, 1000)  # warm: every later checkout finds a fresh connection
        path = trace_path(cycle, pool, 10)
        functions = functions_of(path.order)
        profiler = LineProfiler()
        for function in functions.values():
            profiler.add_function(function)
        cycle.dbpool_loop(pool, 1000)
        (rows, wall), (calibration_rows, _) = profile_segments(
            [
                (profiler, lambda: cycle.dbpool_loop(pool, per_segment)),
                (calibration, lambda: _calibration_loop(per_segment)),
            ],
            cfg.segments,
        )
    finally:
        pool.close()
    baseline = baseline_of(calibration_rows, cycles)
    labels = {key: label_of(path.codes[key]) for key in path.order}
    called_from_dbpool = {callee for _, _, callee in path.edges}

    result = []
    for key in functions:
        file = key[0]
        lines = [
            Line(number, linecache.getline(file, number).strip(), hits, total)
            for number, hits, total in rows.get(key, [])
            if hits
        ]
        for line in lines:
            for (caller, number, callee), count in path.edges.items():
                if caller == key and number == line.number:
                    line.callees.append((labels[callee], count / path.cycles))
        result.append(
            Function(
                key=key,
                label=labels[key],
                file=os.path.relpath(file, ROOT),
                calls_per_cycle=path.calls[key] / path.cycles,
                lines=lines,
                top_level=key not in called_from_dbpool,
            )
        )
    # A line's own time: its time less that of the profiled calls it makes, each at the
    # callee's mean time per call; its excess: its own time less the profiler's baseline.
    per_call = {}
    hits_per_call = {}
    for f in result:
        calls = f.calls_per_cycle * cycles
        per_call[f.label] = f.ns / calls if calls else 0.0
        hits_per_call[f.label] = sum(line.hits for line in f.lines) / calls if calls else 1.0
    for function in result:
        for line in function.lines:
            calls = sum(per_call.get(label, 0.0) * n * cycles for label, n in line.callees)
            line.own_ns = max(0.0, line.ns - calls)
            line.excess_ns = max(0.0, line.own_ns - baseline.of(line, cycles, hits_per_call))
    missing = [labels[key] for key in path.order if key not in functions]
    return Profile(cycle, cycles, wall / per_segment * 1e6, result, baseline, missing)


# -- the report ----------------------------------------------------------------------------------


@dataclass
class Timing:
    dbpool: Outcome
    raw: Outcome

    @property
    def dbpool_us(self) -> float:
        return self.dbpool.median("us")

    @property
    def raw_us(self) -> float:
        return self.raw.median("us")

    def spread(self, outcome: Outcome) -> tuple[float, float]:
        values = [m["us"] for m in outcome.rounds]
        return min(values), max(values)


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    align_right: list[bool]


@dataclass
class Section:
    title: str
    paragraphs: list[str]
    tables: list[Table]


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "–"


def ns(value: float) -> str:
    return f"{value:,.0f}"


def per(value: float) -> str:
    return f"{value:g}"


def code(text: str) -> str:
    return f"`{text}`"


def calls_text(line: Line) -> str:
    if not line.callees:
        return ""
    return " → " + ", ".join(code(label) for label, _ in line.callees)


def function_table(function: Function, cycles: int) -> Table:
    total = function.ns
    calls = function.calls_per_cycle * cycles
    return Table(
        title=(
            f"{function.label} ({function.file}:{function.key[1]}): "
            f"{per(function.calls_per_cycle)} call(s) per cycle, "
            f"{ns(total / calls if calls else 0)} ns per call"
        ),
        headers=["line", "source", "hits", "ns per hit", "% of function"],
        rows=[
            [
                str(line.number),
                code(line.source) + calls_text(line),
                f"{line.hits:,}",
                ns(line.ns / line.hits),
                pct(line.ns, total),
            ]
            for line in function.lines
        ],
        align_right=[True, False, True, True, True],
    )


def summary_table(profile: Profile) -> Table:
    own = sum(f.own_ns for f in profile.functions)
    excess = sum(f.excess_ns for f in profile.functions)
    rows = []
    for f in profile.functions:
        calls = f.calls_per_cycle * profile.cycles
        rows.append(
            [
                code(f.label) + ("" if f.top_level else " (nested)"),
                f"{f.file}:{f.key[1]}",
                per(f.calls_per_cycle),
                ns(f.ns / calls if calls else 0),
                ns(f.own_ns / profile.cycles),
                pct(f.own_ns, own),
                ns(f.excess_ns / profile.cycles),
                pct(f.excess_ns, excess),
            ]
        )
    return Table(
        title="Functions on the path, as profiled",
        headers=[
            "function",
            "where",
            "calls per cycle",
            "ns per call",
            "own ns per cycle",
            "% (own)",
            "above the baseline, ns per cycle",
            "% (above the baseline)",
        ],
        rows=rows,
        align_right=[False, False, True, True, True, True, True, True],
    )


def top_lines(profile: Profile, count: int) -> list[tuple[Function, Line]]:
    """The lines with the most time above their baseline, among those that call no profiled
    function: what a line that calls one costs beyond the call cannot be told apart from the
    profiler's own work on the call and on the callee's lines."""
    every = [(f, line) for f in profile.functions for line in f.lines if not line.callees]
    every.sort(key=lambda fl: fl[1].excess_ns, reverse=True)
    return every[:count]


def top_table(profile: Profile, count: int) -> Table:
    excess = sum(f.excess_ns for f in profile.functions)
    return Table(
        title=(
            f"The {count} lines with the most time above the profiler's baseline (among those "
            "that call no profiled function)"
        ),
        headers=[
            "function",
            "line",
            "source",
            "own ns per cycle",
            "above the baseline, ns per cycle",
            "% (above the baseline)",
        ],
        rows=[
            [
                code(f.label),
                str(line.number),
                code(line.source),
                ns(line.own_ns / profile.cycles),
                ns(line.excess_ns / profile.cycles),
                pct(line.excess_ns, excess),
            ]
            for f, line in top_lines(profile, count)
        ],
        align_right=[False, True, False, True, True, True],
    )


def timing_table(timings: dict[str, Timing]) -> Table:
    rows = []
    for cycle in CYCLES:
        t = timings[cycle.name]
        low, high = t.spread(t.dbpool)
        raw_low, raw_high = t.spread(t.raw)
        rows.append(
            [
                cycle.title,
                fmt_us(t.dbpool_us),
                fmt_us(t.raw_us),
                f"{t.dbpool_us / t.raw_us:.2f}×",
                f"{fmt_us(low)} – {fmt_us(high)}",
                f"{fmt_us(raw_low)} – {fmt_us(raw_high)}",
            ]
        )
    return Table(
        title="Without the profiler: median µs per cycle",
        headers=["cycle", "dbpool", "raw floor", "× floor", "dbpool runs", "floor runs"],
        rows=rows,
        align_right=[False, True, True, True, True, True],
    )


def busy_note(timings: dict[str, Timing], load: tuple[float, float]) -> str | None:
    """A warning when the floor (which should hardly vary) was noisy, or the machine loaded."""
    cpus = os.cpu_count() or 1
    spreads = []
    for t in timings.values():
        low, high = t.spread(t.raw)
        spreads.append((high - low) / t.raw_us)
    worst = max(spreads)
    noisy = worst >= 0.15
    if not noisy and max(load) <= cpus / 2:
        return None
    text = (
        f"These numbers were taken on a busy {cpus}-CPU machine (1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end, this process included)"
    )
    if noisy:
        text += (
            f", and the raw floor, a lock and a deque, varied by up to {100 * worst:.0f}% from "
            "its fastest to its slowest run"
        )
    return text + (
        ": the absolute times are approximate. The per-line shares, and the ratios within "
        "one run, are what to read."
    )


def observations(
    timings: dict[str, Timing], profiles: dict[str, Profile], load: tuple[float, float]
) -> list[str]:
    bare, stmt = timings["bare"], timings["statement"]
    wrappers = (stmt.dbpool_us - bare.dbpool_us) - (stmt.raw_us - bare.raw_us)
    baseline = profiles["bare"].baseline
    out = [
        f"Without the profiler, a bare checkout and return costs {fmt_us(bare.dbpool_us)} µs, "
        f"{bare.dbpool_us / bare.raw_us:.1f}× the raw floor's {fmt_us(bare.raw_us)} µs. "
        f"With a statement the cycle costs {fmt_us(stmt.dbpool_us)} µs against the floor's "
        f"{fmt_us(stmt.raw_us)} µs: the statement's calls through the lease and cursor "
        f"wrappers, and the return path's look at what the lease did, add about "
        f"{fmt_us(wrappers)} µs over the same driver calls made directly.",
        "The profiler inflates every figure. Measured on calibration functions profiled in turns "
        f"with the bare cycle, it charges a line that does next to nothing (`x = None`) about "
        f"{baseline.line_ns:.0f} ns; a line that only calls an empty function about "
        f"{baseline.call_ns:.0f} ns besides the callee's own lines, and another "
        f"{baseline.leak_ns:.0f} ns for each further line the callee runs (part of the "
        "profiler's work on a line lands in the span of the line that called its function). "
        "That is each line's *baseline*. Tracing also slows the bytecode itself, so a line "
        "with more work is inflated more than a trivial one. The per-function tables give the "
        "profiler's figures as they are, a line's time including the profiled functions it "
        "calls; the rankings use each line's time above its baseline. A line that calls a "
        "profiled function keeps more of the profiler's cost than its baseline takes out, the "
        "more so the larger the callee, so the rankings leave such lines out.",
    ]
    for cycle in CYCLES:
        p = profiles[cycle.name]
        unprofiled = timings[cycle.name].dbpool_us
        ranked = top_lines(p, 3)
        excess = sum(f.excess_ns for f in p.functions)
        share = sum(line.excess_ns for _, line in ranked) / excess if excess else 0.0
        named = "; ".join(
            f"{code(line.source)} in {code(f.label)} ({pct(line.excess_ns, excess)}%)"
            for f, line in ranked
        )
        out.append(
            f"{cycle.title}: under line_profiler the cycle takes {fmt_us(p.wall_us)} µs, "
            f"{p.wall_us / unprofiled:.1f}× its {fmt_us(unprofiled)} µs without it; "
            f"{fmt_us(p.profiled_us)} µs of that is inside the profiled functions, over "
            f"{p.hits_per_cycle:.0f} line hits, {fmt_us(p.excess_us)} µs of it above the "
            f"baseline. Of the lines that call no other profiled function, those with the most "
            f"time above the baseline are {named}: "
            f"{100 * share:.0f}% of it between them."
            + (
                " No line dominates: the time is spread over the cycle's "
                f"{p.hits_per_cycle:.0f} line hits and {p.calls_per_cycle:g} calls of dbpool "
                "functions."
                if share < 0.35
                else ""
            )
        )
    note = busy_note(timings, load)
    if note:
        out.append(note)
    return out


def build(
    timings: dict[str, Timing],
    profiles: dict[str, Profile],
    load: tuple[float, float],
    started: datetime.datetime,
    command: str,
    cfg: Config,
) -> tuple[list[str], list[Section]]:
    import line_profiler

    intro = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `{command}`: a dbpool `Pool` of one no-I/O "
        "DB-API connection (`min_size=max_size=1`, filled, defaults otherwise), so that only "
        "dbpool's own cost is left.",
        f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}; {platform.python_implementation()} "
        f"{platform.python_version()}. Load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end. dbpool {version_of('dbpool')}{dbpool_revision()}, "
        f"line_profiler {line_profiler.__version__}.",
        f"Unprofiled: {cfg.runs} interleaved runs of about {cfg.seconds:g} s for each cycle "
        "and its raw floor; medians, with the fastest and slowest run. Profiled: "
        f"{cfg.cycles:,} cycles under line_profiler after a warm-up, every dbpool function "
        "the cycle calls registered (found by tracing the cycle), in "
        f"{cfg.segments} segments: each line's time per hit, and the cycle's time, are the "
        "medians over the segments. In the tables, a line's "
        "time includes the profiled functions it calls (marked →); its *own* time leaves "
        "them out, each at the callee's mean time per call; its time *above the baseline* also "
        "leaves out what the profiler charges even a trivial line or call (below). Lines not "
        "executed on the path are left out.",
    ]
    sections = [
        Section(
            "Where the time goes",
            observations(timings, profiles, load),
            [timing_table(timings)],
        )
    ]
    for cycle in CYCLES:
        p = profiles[cycle.name]
        paragraphs = [
            f"`{cycle.code}`, {p.cycles:,} cycles profiled: {fmt_us(p.wall_us)} µs per cycle "
            f"under the profiler, {fmt_us(timings[cycle.name].dbpool_us)} µs without. Raw "
            f"floor: {cycle.floor}."
        ]
        if p.missing:
            paragraphs.append(
                "Not profiled (no function object found): "
                + ", ".join(code(m) for m in p.missing)
                + "."
            )
        tables = [summary_table(p), top_table(p, 8)]
        tables += [function_table(f, p.cycles) for f in p.functions]
        sections.append(Section(cycle.title, paragraphs, tables))
    return intro, sections


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(intro: list[str], sections: list[Section]) -> str:
    lines = ["# Where a checkout's time goes", ""]
    for paragraph in intro:
        lines += [paragraph, ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for table in section.tables:
            lines += [f"**{table.title}**", ""]
            lines.append("| " + " | ".join(table.headers) + " |")
            lines.append("|" + "|".join("--:" if r else "---" for r in table.align_right) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
            lines.append("")
    return "\n".join(lines)


def _rst_text(text: str) -> str:
    """Our Markdown code spans and emphasis, as reST."""
    return text.replace("`", "``")


def to_rst(intro: list[str], sections: list[Section]) -> str:
    """The body of the page, without its own title: docs/benchmarks.rst provides it."""
    lines = [".. This file is generated by benchmarks/profile_checkout.py: do not edit it.", ""]
    for paragraph in intro:
        lines += [_rst_text(paragraph), ""]
    for section in sections:
        lines += [section.title, "~" * len(section.title), ""]
        for paragraph in section.paragraphs:
            lines += [_rst_text(paragraph), ""]
        for table in section.tables:
            lines += [
                f".. list-table:: {table.title}",
                "   :header-rows: 1",
                "   :widths: auto",
                "",
            ]
            for row in [table.headers, *table.rows]:
                lines.append(f"   * - {_rst_text(row[0]) or '–'}")
                lines += [f"     - {_rst_text(cell) or '–'}" for cell in row[1:]]
            lines.append("")
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Profile dbpool's checkout and return, line by line (line_profiler).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs: a smoke run, not a measurement"
    )
    parser.add_argument(
        "--runs",
        type=int,
        help=f"interleaved unprofiled runs (default {FULL.runs}, --quick {QUICK.runs})",
    )
    parser.add_argument(
        "--cycles",
        type=int,
        help=f"cycles under the profiler (default {FULL.cycles:,}, --quick {QUICK.cycles:,})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where profile.md and profile.inc go (default: docs/benchmarks)",
    )
    args = parser.parse_args(argv)
    for name in ("runs", "cycles"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be 1 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg = replace(cfg, runs=args.runs or cfg.runs, cycles=args.cycles or cfg.cycles)
    if importlib.util.find_spec("line_profiler") is None:
        log("line_profiler is missing: install the bench extra (pip install -e '.[bench]')")
        return 1
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()[0]
    log(f"timing {len(CYCLES)} cycles and their floors, {cfg.runs} interleaved runs")
    outcomes = time_cycles(cfg)
    timings = {
        c.name: Timing(outcomes[f"{c.name} dbpool"], outcomes[f"{c.name} raw"]) for c in CYCLES
    }
    profiles = {}
    for cycle in CYCLES:
        log(f"profiling {cycle.name}: {cfg.cycles:,} cycles")
        profiles[cycle.name] = profile_cycle(cycle, cfg)
    load = (load_start, os.getloadavg()[0])
    command = "python benchmarks/profile_checkout.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    intro, sections = build(timings, profiles, load, started, command, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(to_markdown(intro, sections), encoding="utf-8")
    (args.out / "profile.inc").write_text(to_rst(intro, sections), encoding="utf-8")
    for cycle in CYCLES:
        t = timings[cycle.name]
        log(
            f"{cycle.name}: dbpool {fmt_us(t.dbpool_us)} µs, floor {fmt_us(t.raw_us)} µs, "
            f"profiled {fmt_us(profiles[cycle.name].wall_us)} µs per cycle"
        )
    log(f"wrote {args.out / 'profile.md'} and {args.out / 'profile.inc'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
