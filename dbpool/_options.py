"""What an option ``Pool()`` does not take is told as: the option dbpool has for it.

Python's own error names the argument only.  Options of the pools users come from
(psycopg_pool, SQLAlchemy's pools and create_engine(), DBUtils' PooledDB) get what to write
instead, or why none is needed: a nearest-name guess would mislead them (maxusage is no
max_size).  A misspelt one gets the nearest name; anything else, the list of options.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_EVERY_CHECKOUT = "validate_after=0, a ping at every checkout of an idle connection"
_ROLLED_BACK = (
    "none needed: a transaction left open is always rolled back on return; session_reset or "
    "reset undo more"
)
_LIFO = "none needed: checkouts always take from the most recently returned idle connections"
_LOGGER = "the 'dbpool' logger: set its level with logging.getLogger('dbpool').setLevel()"
_LISTENERS = "pool.add_listener() to observe; the configure, check and reset hooks to act"
_CONNECT_ARGS = "a connect callable that passes them: functools.partial(psycopg.connect, ...)"
_BROKEN_BY_STATE = (
    "none needed: a connection is told broken by its state when it comes back, not by the "
    "exception's class"
)

# Another pool's option, and what to write in dbpool instead.
PEER_OPTIONS = {
    # SQLAlchemy (create_engine's pool_* names, and the pool classes' own)
    "pool_size": "max_size, and min_size for the connections kept open",
    "max_overflow": "max_size, the cap on all connections: there is no overflow beyond it",
    "pool_timeout": "acquire_timeout",
    "timeout": "acquire_timeout",  # psycopg_pool's and QueuePool's
    "pool_recycle": "max_lifetime",
    "recycle": "max_lifetime",
    "pool_pre_ping": _EVERY_CHECKOUT,
    "pre_ping": _EVERY_CHECKOUT,
    "pool_reset_on_return": _ROLLED_BACK,
    "reset_on_return": _ROLLED_BACK,
    "creator": "the connect callable, as Pool()'s first argument",
    "pool_use_lifo": _LIFO,
    "use_lifo": _LIFO,
    "echo": _LOGGER,
    "echo_pool": _LOGGER,
    "logging_name": "name",
    "pool_logging_name": "name",
    "events": _LISTENERS,
    "pool_events": _LISTENERS,
    "poolclass": "none: dbpool has one pool; min_size=0, session_reset='reconnect' comes "
    "closest to NullPool",
    "connect_args": _CONNECT_ARGS,
    "isolation_level": "pool.transaction(isolation=...) per transaction, or the connect "
    "callable or configure setting the driver's level (each return restores it)",
    # psycopg_pool
    "conninfo": "dbpool.create_pool(url), or a connect callable as Pool()'s first argument",
    "kwargs": _CONNECT_ARGS,
    "connection_class": "a connect callable that makes one: functools.partial(Cls.connect, ...)",
    "max_idle": "idle_timeout",
    "reconnect_timeout": "reconnect_delay and reconnect_max_delay: the pool tries again until "
    "a connect succeeds, and each caller waits up to acquire_timeout",
    "reconnect_failed": "none: the pool never gives up reconnecting; watch "
    "stats().connect_errors or health()",
    "open": "none needed: a pool is open once made; wait() blocks until min_size connections "
    "are open, reopen() opens it again after drain() or close()",
    "close_returns": "none needed: close() on a lease always returns its connection",
    "num_workers": "none: connects run in threads of their own, started as needed",
    # DBUtils' PooledDB
    "mincached": "min_size",
    "maxconnections": "max_size",
    "maxcached": "max_size; idle_timeout closes the idle connections the load no longer needs",
    "blocking": "acquire_timeout: callers wait up to it for a connection",
    "setsession": "configure: a callable given each new connection",
    "ping": "validate_after, the seconds idle before a ping at checkout; or check, a callable",
    "maxusage": "max_lifetime: connections are retired by age, not by a count of uses",
    "maxshared": "none: a connection is never lent to two borrowers at once",
    "failures": _BROKEN_BY_STATE,
    "isfatal": _BROKEN_BY_STATE,
}


def unknown_options(names: Iterable[str], valid: Iterable[str], where: str = "Pool()") -> str:
    """The message for ``names``, options ``where`` does not take (``valid`` are those it does)."""
    valid = sorted(valid)
    told: list[str] = []
    for name in sorted(names):
        if name in PEER_OPTIONS:
            told.append(f"{name!r} (in dbpool: {PEER_OPTIONS[name]})")
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        told.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return f"{where} takes no option {', '.join(told)}; its options: {', '.join(valid)}"
