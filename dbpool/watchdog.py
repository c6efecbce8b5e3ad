"""One thread for every deadline in the process: transactions, and driver calls that must not
outlive a caller's deadline.

Transactions register a deadline and a callback; the thread sleeps until the earliest one is due
and hands its callback to a short-lived worker thread (a cancel does I/O and may hang: it must not
hold up the other deadlines).  The callback may ask to run again a little later, to cancel a
statement that started after the first cancel.  A transaction that ends in time unwatches its
entry, which then holds nothing.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import threading
from time import monotonic
from types import TracebackType
from typing import Callable, Optional

logger = logging.getLogger("dbpool")

_START_AGAIN = 0.05  # seconds before a deadline whose worker thread could not start is retried

#: A callback returns None when done, or seconds after which to call it again.
Callback = Callable[[], Optional[float]]


class _Entry:
    __slots__ = ("when", "order", "callback", "active", "queued")

    def __init__(self, when: float, order: int, callback: Callback) -> None:
        self.when = when
        self.order = order
        self.callback: Callback | None = callback
        self.active = True
        self.queued = True  # in the heap: not while taken out to fire (under the lock)

    def __lt__(self, other: _Entry) -> bool:
        return (self.when, self.order) < (other.when, other.order)


class Watchdog:
    def __init__(self) -> None:
        self._setup()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._setup)

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        # --- guarded by self._lock: a heap of entries, earliest first; the thread, started on
        # the first watch() and never stopped (it sleeps while nothing is due).  Should it
        # ever die, it sets _thread back to None on its way out, and the next watch() (or the
        # dying thread itself) starts another.
        self._heap: list[_Entry] = []
        self._dead = 0  # unwatched entries still in the heap
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, when: float, callback: Callback) -> _Entry:
        """Call ``callback`` in the watchdog thread at monotonic time ``when``."""
        entry = thread = None
        try:
            with self._lock:
                entry = _Entry(when, next(self._order), callback)
                heapq.heappush(self._heap, entry)
                if self._heap[0] is entry:
                    self._wakeup.notify()
                if self._thread is not None:
                    return entry
                thread = self._thread = self._new_thread()
            thread.start()
        except BaseException:
            # Nothing of this call stays queued (an entry left behind would fire once a later
            # watch() starts the thread), and the next watch() tries again.
            if thread is not None:
                self._forget_thread(thread)
            if entry is not None:
                self.unwatch(entry)
            raise
        return entry

    def _new_thread(self) -> threading.Thread:
        # Started by the caller once it let go of the lock, which the new thread takes first
        # thing: Thread.start() waits for the new thread to begin.  Under gevent's monkey-
        # patching threads are greenlets, and the lock an OS lock if dbpool was imported
        # before the patching: held across start(), it would block the new thread forever,
        # and the process with it.  (Calls meanwhile find the thread recorded, and queue.)
        return threading.Thread(target=self._run, name="dbpool-watchdog", daemon=True)

    def _forget_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            if self._thread is thread:
                self._thread = None

    def unwatch(self, entry: _Entry) -> None:
        """Forget ``entry``; its callback is not called again (it may be running now)."""
        with self._lock:
            if not entry.active:
                return
            entry.active = False
            entry.callback = None  # let the transaction go now, not at its deadline
            if not entry.queued:
                return  # taken out to fire: not in the heap, which has no dead one more
            self._dead += 1
            if self._dead > 64 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e.active]
                heapq.heapify(self._heap)
                self._dead = 0

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            # Not expected (the loop handles its own failures): let a new thread take over.
            thread = None
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                    if self._heap:
                        thread = self._thread = self._new_thread()
            if thread is not None:
                try:
                    thread.start()
                except Exception as exc:
                    self._forget_thread(thread)
                    logger.error("the deadline watchdog thread could not restart: %s", exc)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    while self._heap and not self._heap[0].active:
                        heapq.heappop(self._heap)
                        self._dead -= 1
                    if self._heap and self._heap[0].when <= monotonic():
                        entry = heapq.heappop(self._heap)
                        entry.queued = False
                        break
                    wait = self._heap[0].when - monotonic() if self._heap else None
                    self._wakeup.wait(None if wait is None else min(wait, threading.TIMEOUT_MAX))
            worker = threading.Thread(
                target=self._fire, args=(entry,), name="dbpool-watchdog-cancel", daemon=True
            )
            started = False
            try:
                worker.start()
                started = True
            except Exception as exc:
                # "can't start new thread": threads or memory ran short.  The callback may
                # block (a cancel does I/O), so it is not run here, where it would hold up every
                # other deadline: it is tried again shortly.
                logger.warning(
                    "could not start a thread to handle a deadline, trying again in %g s: %s",
                    _START_AGAIN,
                    exc,
                )
            finally:
                if not started:  # whatever went wrong, the deadline is not dropped
                    with self._lock:
                        if entry.active:
                            entry.when = monotonic() + _START_AGAIN
                            entry.queued = True
                            heapq.heappush(self._heap, entry)

    def _fire(self, entry: _Entry) -> None:
        callback = entry.callback
        if callback is None:
            return
        try:
            again = callback()
        except BaseException:  # a worker's failure must not go unnoticed, nor go further
            logger.exception("deadline handler failed")
            again = None
        with self._lock:
            if again is None or not entry.active:
                return
            entry.when = monotonic() + again
            entry.queued = True
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._wakeup.notify()


watchdog = Watchdog()


class Overdue:
    """Calls ``interrupt`` from the watchdog if the block it guards is still running at
    ``when``: ``with Overdue(deadline, lambda: dialect.sever(raw)) as guard: ...``.

    ``interrupt`` must not block (shutting a socket down, ``sqlite3.interrupt``).  It runs at
    most once, and never after the block ended; ``fired`` tells whether it ran.
    """

    __slots__ = ("_lock", "_running", "_interrupt", "_entry", "fired")

    def __init__(self, when: float, interrupt: Callable[[], object]) -> None:
        self._lock = threading.Lock()
        self._running = True
        self._interrupt = interrupt
        self.fired = False
        self._entry = None if when == math.inf else watchdog.watch(when, self._fire)

    def _fire(self) -> None:
        with self._lock:
            if self._running:
                self.fired = True
                try:
                    self._interrupt()
                except Exception as exc:
                    logger.info("interrupting a call past its deadline failed: %s", exc)

    def __enter__(self) -> Overdue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._running = False
        if self._entry is not None:
            watchdog.unwatch(self._entry)
