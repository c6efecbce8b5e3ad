"""The common harness: contenders measured in interleaved rounds, failures kept per contender.

Round 1 runs the contenders in order (A B C), round 2 in reverse (C B A), and so on, so that
drift on a shared machine (another process waking up, CPU frequency changes) falls on every
contender alike.  A contender that fails is reported with its error and dropped from the
remaining rounds; the others carry on.
"""

from __future__ import annotations

import math
import resource
import statistics
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any, Callable, Protocol

#: One round's figures for one contender, e.g. ``{"us": 1.9}``.
Metrics = dict[str, float]


class Subject(Protocol):
    """A contender ready to be measured: its pool is open, filled and warmed up."""

    def sample(self) -> Metrics: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Contender:
    name: str
    open: Callable[[], Subject]


@dataclass
class Outcome:
    """What one contender produced: one :data:`Metrics` per round completed, or why not."""

    name: str
    rounds: list[Metrics] = field(default_factory=list)
    error: str | None = None

    def median(self, key: str) -> float:
        values = [m[key] for m in self.rounds if key in m]
        return statistics.median(values) if values else math.nan


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_interleaved(
    contenders: Sequence[Contender], rounds: int, log: Callable[[str], None]
) -> dict[str, Outcome]:
    """Open every contender, sample each once per round in alternating order, close them."""
    outcomes = {c.name: Outcome(c.name) for c in contenders}
    subjects: dict[str, Subject] = {}
    for contender in contenders:
        try:
            subjects[contender.name] = contender.open()
        except Exception as exc:
            outcomes[contender.name].error = f"setup failed: {describe(exc)}"
            log(f"  {contender.name}: {outcomes[contender.name].error}")
    try:
        for number in range(rounds):
            order = contenders if number % 2 == 0 else list(reversed(contenders))
            for contender in order:
                subject = subjects.get(contender.name)
                if subject is None:
                    continue
                try:
                    outcomes[contender.name].rounds.append(subject.sample())
                except Exception as exc:
                    outcomes[contender.name].error = f"round {number + 1} failed: {describe(exc)}"
                    log(f"  {contender.name}: {outcomes[contender.name].error}")
                    del subjects[contender.name]
                    _close_quietly(subject, outcomes[contender.name], log)
            log(f"  round {number + 1}/{rounds} done")
    finally:
        for name, subject in subjects.items():
            _close_quietly(subject, outcomes[name], log)
    return outcomes


def _close_quietly(subject: Subject, outcome: Outcome, log: Callable[[str], None]) -> None:
    try:
        subject.close()
    except Exception as exc:
        log(f"  {outcome.name}: close failed: {describe(exc)}")
        if outcome.error is None:
            outcome.error = f"close failed: {describe(exc)}"


def paired_ratio(a: Outcome, b: Outcome, key: str) -> float:
    """Median over rounds of ``a[key] / b[key]``, pairing the figures of the same round."""
    pairs = zip(a.rounds, b.rounds)  # both lists are prefixes of the same sequence of rounds
    ratios = [x[key] / y[key] for x, y in pairs if key in x and key in y and y[key] > 0]
    return statistics.median(ratios) if ratios else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ascending values; NaN when there are none."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- subjects shared by the scenarios ----------------------------------------------------------


class Batch:
    """Times ``loop(pool, n)``: microseconds per operation, single-threaded, in wall-clock time
    (``us``) and in this process's CPU time (``cpu_us``: the client's own work and system calls,
    not the time it sleeps waiting for the server).

    ``n`` is calibrated once, while warming up, so that a sample lasts about ``seconds``.
    """

    def __init__(
        self,
        pool: Any,
        loop: Callable[[Any, int], None],
        close: Callable[[Any], None],
        seconds: float,
    ) -> None:
        self._pool = pool
        self._loop = loop
        self._close = close
        n, elapsed = 16, 0.0
        while elapsed < seconds / 5:
            n *= 2
            started = perf_counter()
            loop(pool, n)
            elapsed = perf_counter() - started
        self._n = max(1, round(n * seconds / elapsed))

    def sample(self) -> Metrics:
        cpu_started = process_time()
        started = perf_counter()
        self._loop(self._pool, self._n)
        elapsed = perf_counter() - started
        cpu = process_time() - cpu_started
        return {"us": elapsed / self._n * 1e6, "cpu_us": cpu / self._n * 1e6}

    def close(self) -> None:
        self._close(self._pool)


#: A contention worker: runs operations until ``stop`` is set, appends each acquire wait (s)
#: to ``waits``, and returns how many operations it completed.
Worker = Callable[[threading.Event, "array[float]"], int]


def run_threads(
    worker: Worker, threads: int, seconds: float, join_timeout: float = 60.0
) -> Metrics:
    """Run ``worker`` in ``threads`` threads released at once, for about ``seconds``."""
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    waits = [array("d") for _ in range(threads)]
    ops = [0] * threads
    errors: list[BaseException] = []

    def body(index: int) -> None:
        barrier.wait()
        try:
            ops[index] = worker(stop, waits[index])
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    pool = [
        threading.Thread(target=body, args=(i,), name=f"bench-{i}", daemon=True)
        for i in range(threads)
    ]
    for thread in pool:
        thread.start()
    barrier.wait()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = perf_counter()
    stop.wait(seconds)  # the measurement window; a failing worker ends it early
    stop.set()
    _join_all(pool, join_timeout)
    elapsed = perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise errors[0]
    every_wait = sorted(w for per_thread in waits for w in per_thread)
    done = max(sum(ops), 1)
    return {
        "ops_per_s": sum(ops) / elapsed,
        # The whole process's CPU time (user, and system: the kernel's side of the wake-ups)
        # and its threads' context switches, voluntary (blocking) and not, per operation.
        "user_us": (after.ru_utime - before.ru_utime) / done * 1e6,
        "system_us": (after.ru_stime - before.ru_stime) / done * 1e6,
        "switches": (after.ru_nvcsw - before.ru_nvcsw + after.ru_nivcsw - before.ru_nivcsw) / done,
        "wait_p50": percentile(every_wait, 50),
        "wait_p99": percentile(every_wait, 99),
        "wait_max": every_wait[-1] if every_wait else math.nan,
        "ops_min": float(min(ops)),
        "ops_max": float(max(ops)),
    }


def _join_all(threads: Sequence[threading.Thread], timeout: float) -> None:
    deadline = perf_counter() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - perf_counter()))
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        raise RuntimeError(f"{stuck} threads still running after {timeout:g} s: a hang?")


def storm(task: Callable[[], None], threads: int, join_timeout: float = 60.0) -> Metrics:
    """Release ``threads`` threads at once, each running ``task`` once.

    Returns the seconds from the release until the last one finished and how many succeeded.
    """
    barrier = threading.Barrier(threads + 1)
    finished = [0.0] * threads
    served = [False] * threads

    def body(index: int) -> None:
        barrier.wait()
        try:
            task()
            served[index] = True
        except Exception:
            pass  # counted as not served
        finally:
            finished[index] = perf_counter()

    pool = [
        threading.Thread(target=body, args=(i,), name=f"storm-{i}", daemon=True)
        for i in range(threads)
    ]
    for thread in pool:
        thread.start()
    barrier.wait()
    started = perf_counter()
    _join_all(pool, join_timeout)
    return {"seconds": max(finished) - started, "served": float(sum(served))}
