"""A WSGI application for pre-fork servers such as gunicorn: one pool per worker process.

Run it with the settings in ``gunicorn.conf.py``, from this directory::

    PG_DSN="host=127.0.0.1 dbname=test user=postgres" gunicorn -c gunicorn.conf.py

A pre-fork server starts a master process, which forks the workers that serve requests. A pool
belongs to the process that made it: its connections are sockets, and after ``fork()`` the
parent and the child hold the same sockets. If both used them, their messages would interleave
on one server session. So each worker makes its own pool, after the fork: ``post_fork`` in
``gunicorn.conf.py`` calls :func:`get_pool` (and so does the first request, if no hook did).

The sessions are named ``<PG_APP_NAME>-<pid>`` (``application_name``; ``PG_APP_NAME`` defaults
to ``gunicorn-worker``), so ``pg_stat_activity`` shows which worker holds which.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from typing import Any, Callable

import psycopg

import dbpool

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"
DEFAULT_APP_NAME = "gunicorn-worker"

StartResponse = Callable[..., Any]

# (pid, pool): the pool of the process whose pid it is. One tuple, replaced at once, so that a
# thread never sees the pid of one pool with another pool.
_state: tuple[int, dbpool.Pool[Any]] | None = None
_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # A thread of the parent may have held the lock at the moment of the fork; the child has
    # no such thread, so it starts with a lock of its own.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def make_pool(dsn: str | None = None, **options: Any) -> dbpool.Pool[Any]:
    dsn = dsn or os.environ.get("PG_DSN", DEFAULT_DSN)
    app_name = os.environ.get("PG_APP_NAME", DEFAULT_APP_NAME)
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 4,  # the worker's threads: gunicorn.conf.py passes its `threads`
        "acquire_timeout": 5.0,
        "name": f"worker-{os.getpid()}",
    }
    settings.update(options)

    def connect() -> psycopg.Connection[Any]:
        # The worker's pid in application_name: pg_stat_activity shows whose session it is.
        # Read at connect time, so a pool inherited across fork() names the child's sessions.
        return psycopg.connect(dsn, connect_timeout=5, application_name=f"{app_name}-{os.getpid()}")

    return dbpool.Pool(connect, **settings)


def get_pool(**options: Any) -> dbpool.Pool[Any]:
    """This process's pool, made on first use in each process; ``options`` go to
    :func:`make_pool` when it is made."""
    global _state
    pid = os.getpid()
    state = _state
    if state is not None and state[0] == pid:
        return state[1]
    with _lock:
        state = _state
        if state is not None and state[0] == pid:
            return state[1]
        pool = make_pool(**options)
        _state = (pid, pool)
    if state is not None:
        # A pool made in the parent before the fork (with preload_app, say). In this process
        # it has already dropped the parent's connections without closing them (closing would
        # end the parent's sessions); closing it here closes only what this process opened and
        # stops its maintenance thread.
        state[1].close()
    return pool


def close_pool() -> None:
    """Close this process's pool, if it made one (gunicorn.conf.py calls it at worker exit)."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is not None and state[0] == os.getpid():
        state[1].close()


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """``/healthz``: the pool's health report; any other path: which worker and which server
    session answered."""
    pool = get_pool()
    if environ.get("PATH_INFO") == "/healthz":
        report = pool.health(timeout=2.0)
        status = "200 OK" if report["ok"] else "503 Service Unavailable"
        body: dict[str, Any] = report
    else:
        with pool.connection() as conn:
            cur = conn.cursor()
            cur.execute("SELECT pg_backend_pid()")
            (backend_pid,) = cur.fetchone()
        status, body = "200 OK", {"worker_pid": os.getpid(), "backend_pid": backend_pid}
    payload = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    )
    return [payload]
