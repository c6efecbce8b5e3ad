"""A Flask application sharing one dbpool pool between all its requests.

Run it with Flask's development server, from this directory::

    flask --app flask_app run                        # a SQLite file in the working directory
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test flask --app flask_app run

or with any WSGI server, for example ``gunicorn 'flask_app:create_app()'`` (see
``gunicorn_app.py`` for what changes with pre-fork servers). Then::

    curl -X POST -H 'Content-Type: application/json' -d '{"body": "hello"}' localhost:5000/notes
    curl localhost:5000/notes
    curl localhost:5000/healthz
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Callable

from flask import Flask, Response, current_app, jsonify, request

import dbpool

DEFAULT_URL = "sqlite:///flask-example.sqlite3"

# The statements differ in one point between the two drivers this example runs on: sqlite3 marks
# parameters with ?, psycopg with %s.
SQL = {
    "sqlite3": {
        "schema": "CREATE TABLE IF NOT EXISTS {table} "
        "(id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)",
        "insert": "INSERT INTO {table} (body) VALUES (?) RETURNING id",
        "select": "SELECT id, body FROM {table} ORDER BY id",
    },
    "psycopg": {
        "schema": "CREATE TABLE IF NOT EXISTS {table} (id SERIAL PRIMARY KEY, body TEXT NOT NULL)",
        "insert": "INSERT INTO {table} (body) VALUES (%s) RETURNING id",
        "select": "SELECT id, body FROM {table} ORDER BY id",
    },
}


def create_app(
    connect: Callable[[], Any] | None = None,
    *,
    table: str = "notes",
    create_schema: bool = True,
    **pool_options: Any,
) -> Flask:
    """The application, with a pool of its own.

    ``connect`` is the pool's connect callable; without it the pool connects to
    ``$DATABASE_URL`` (default: a SQLite file). ``pool_options`` go to :class:`dbpool.Pool`.
    """
    app = Flask(__name__)
    options: dict[str, Any] = {
        "min_size": 1,
        "max_size": 4,  # at least the number of threads the WSGI server runs
        # Well below the request timeout of the server or proxy in front: a request that cannot
        # get a connection in time fails with 503 instead of hanging.
        "acquire_timeout": 5.0,
        "name": "flask",
    }
    options.update(pool_options)
    if connect is None:
        pool = dbpool.create_pool(os.environ.get("DATABASE_URL", DEFAULT_URL), **options)
    else:
        pool = dbpool.Pool(connect, **options)
    # One pool per process, made once, closed when the process exits. A pool is not made per
    # request: that would open a connection for every request.
    atexit.register(pool.close)
    app.extensions["dbpool"] = pool
    app.config["NOTES_TABLE"] = table

    if create_schema:
        try:
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute(statement(conn, "schema", table))
                conn.commit()
        except BaseException:
            # No application comes out of this call: left open, the pool would keep trying to
            # connect in the background until the process exits.
            pool.close()
            raise

    app.register_error_handler(dbpool.PoolTimeout, pool_exhausted)
    app.add_url_rule("/notes", view_func=list_notes, methods=["GET"])
    app.add_url_rule("/notes", view_func=add_note, methods=["POST"])
    app.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    return app


def get_pool() -> dbpool.Pool[Any]:
    """The pool of the application handling the current request."""
    pool: dbpool.Pool[Any] = current_app.extensions["dbpool"]
    return pool


def statement(conn: dbpool.Connection[Any], name: str, table: str | None = None) -> str:
    """The SQL statement ``name`` for the driver of ``conn``, on ``table`` (default: the
    current application's)."""
    driver = type(conn.raw).__module__.partition(".")[0]
    return SQL[driver][name].format(table=table or current_app.config["NOTES_TABLE"])


def list_notes() -> Response:
    # One lease per request, returned when the block ends, even on an exception.
    with get_pool().connection() as conn:
        cur = conn.cursor()
        cur.execute(statement(conn, "select"))
        rows = cur.fetchall()
        # Nothing to commit: the pool ends the read transaction when the lease goes back.
    return jsonify([{"id": row[0], "body": row[1]} for row in rows])


def add_note() -> tuple[Response, int]:
    data = request.get_json(silent=True) or {}
    body = data.get("body")
    if not isinstance(body, str) or not body:
        return jsonify({"error": "a JSON object with a non-empty 'body' is required"}), 400
    with get_pool().connection() as conn:
        cur = conn.cursor()
        cur.execute(statement(conn, "insert"), (body,))
        (note_id,) = cur.fetchone()
        # A write is kept only when committed: a lease that goes back with its transaction
        # open is rolled back.
        conn.commit()
    return jsonify({"id": note_id, "body": body}), 201


def healthz() -> tuple[Response, int]:
    # For a load balancer or an orchestrator's readiness probe: 503 takes the process out of
    # rotation while the database cannot be reached; a pool that is only busy (every connection
    # in use, leases coming back) stays ok. health() reports, it never raises.
    report = get_pool().health(timeout=2.0)
    return jsonify(report), 200 if report["ok"] else 503


def pool_exhausted(exc: dbpool.PoolTimeout) -> tuple[Response, int, dict[str, str]]:
    # Every connection stayed busy for acquire_timeout seconds: ask the client to retry later
    # rather than report an internal error.
    return jsonify({"error": "the database is busy, try again"}), 503, {"Retry-After": "1"}


if __name__ == "__main__":
    create_app().run(threaded=True)
