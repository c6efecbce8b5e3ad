"""What an option ``Pool()`` does not take is told as: the option dbpool has for it.

Python's own error names the argument only.  Options of the pools users come from
(psycopg_pool, SQLAlchemy's pools, DBUtils' PooledDB) get what to write instead; a misspelt one
gets the nearest name; anything else, the list of options.
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
    # psycopg_pool
    "conninfo": "dbpool.create_pool(url), or a connect callable as Pool()'s first argument",
    "kwargs": "a connect callable that passes them: functools.partial(psycopg.connect, ...)",
    "connection_class": "a connect callable that makes one: functools.partial(Cls.connect, ...)",
    "max_idle": "idle_timeout",
    "reconnect_timeout": "reconnect_delay and reconnect_max_delay: the pool tries again until "
    "a connect succeeds, and each caller waits up to acquire_timeout",
    # DBUtils' PooledDB
    "mincached": "min_size",
    "maxconnections": "max_size",
    "maxcached": "max_size; idle_timeout closes the idle connections the load no longer needs",
    "blocking": "acquire_timeout: callers wait up to it for a connection",
    "setsession": "configure: a callable given each new connection",
    "ping": "validate_after, the seconds idle before a ping at checkout; or check, a callable",
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
