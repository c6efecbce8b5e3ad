"""gunicorn settings for gunicorn_app.py: ``gunicorn -c gunicorn.conf.py``.

Each worker process opens its own pool after the fork (``post_fork``) and closes it when it
exits (``worker_exit``). Nothing here opens a connection in the master process.
"""

from __future__ import annotations

import os
from typing import Any

# Run from anywhere: gunicorn changes to this directory and imports gunicorn_app from it.
chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "gunicorn_app:app"
bind = os.environ.get("BIND", "127.0.0.1:8000")

# Every worker has a pool of up to `threads` connections: workers * threads connections in
# all, which must fit in the server's max_connections next to every other client.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))

# With preload_app = True the master imports the application before forking, which saves
# memory and start-up time. That is safe here because importing gunicorn_app opens no
# connection: the pool is made in each worker, after the fork. A pool made at import time in
# the master would still be usable in the workers (dbpool drops inherited connections in a
# child and opens new ones), but the master would keep its own connections open for nothing.
preload_app = False


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker, before it serves anything: open its pool."""
    import gunicorn_app

    pool = gunicorn_app.get_pool(max_size=worker.cfg.threads)
    worker.log.info("worker %s: %r", worker.pid, pool)


def worker_exit(server: Any, worker: Any) -> None:
    """In the worker, as it exits: close its connections, so the server ends its sessions now
    rather than when it notices the dead sockets."""
    import gunicorn_app

    gunicorn_app.close_pool()
