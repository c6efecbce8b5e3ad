"""What every pool goes through when the process forks, and when it exits.

Fork: a child process drops the connections it inherited, without closing them.  Closing an
inherited connection would send a goodbye on a socket the parent still uses and end the
parent's session.  The child keeps the inherited driver objects referenced for the rest of its
life, its interpreter's exit included, so that their finalizers never run, after each dialect
has made them harmless.  Each pool's maintenance thread starts again at the child's first use
of the pool, not here: a child about to exec() a program gets no thread, and no connect.

Exit: the connects still under way in the pools' threads are waited for, a second at most, and
no more are started.  Those are daemon threads, which the interpreter does not wait for; one
still inside a C library as the process exits can crash it (OpenSSL frees its state in exit(),
and recent PyMySQL sets up a TLS context in every connect, TLS or not).
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dialects import Dialect
    from .pool import Pool

logger = logging.getLogger("dbpool")

_pools: weakref.WeakSet[Pool[Any]] = weakref.WeakSet()
_inherited: list[Any] = []
_pinned = False  # _pin(_inherited) was done, here or in the parent

_EXIT_WAIT = 1.0  # seconds the interpreter's exit waits, at most, for connects under way


def register(pool: Pool[Any]) -> None:
    _pools.add(pool)


def keep_forever(dialect: Dialect, raw: Any) -> None:
    global _pinned
    try:
        dialect.detach_after_fork(raw)
    except Exception as exc:  # the reference below still keeps it from being finalized
        logger.debug("detaching an inherited connection failed: %r", exc)
    if not _pinned:
        _pinned = True
        _pin(_inherited)
    _inherited.append(raw)


def _pin(obj: object) -> None:
    """Take a reference to ``obj`` that nothing lets go, not even the interpreter's exit, which
    clears every module's globals: a driver connection they alone held would then be finalized
    in the child.  sqlite3 would close it, rolling the parent's transaction back in the files
    both share; a driver whose socket its dialect cannot reach would say goodbye on it."""
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
    except Exception as exc:  # no ctypes, or not CPython: held until the exit only
        logger.debug("keeping inherited connections past the exit failed: %r", exc)


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    # Registered as dbpool is imported: it runs after the handlers the program registers
    # later (which may still use a pool), and before those it registered earlier.
    deadline = monotonic() + _EXIT_WAIT
    for pool in list(_pools):
        pool._settle_at_exit(deadline)


atexit.register(_at_exit)
