"""The programs under ``examples/``, run for real: the code the how-to guides show is tested here.

Each example is imported by path (as a module named after its file) and its functions called
against the test servers; each is also run once as a script, in a subprocess with a timeout,
its server given through the environment variable it reads. Tables get names of their own and
are dropped at the end.

SQL Server: there is none in this project's test environment. ``mssql_pymssql.py`` runs on the
fake pymssql flavour of ``tests/fakedb.py``, and against a real server only when
``DBPOOL_TEST_MSSQL_DSN`` is set (skipped otherwise, with that reason).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import traceback
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import pytest

import dbpool
from tests.conftest import (
    MSSQL_ENV,
    MYSQL_DEFAULT,
    MYSQL_ENV,
    Connector,
    child_report,
    rows,
    scalar,
    wait_until,
)
from tests.pgbouncer import PgBouncer, pgbouncer  # noqa: F401 - pgbouncer is the fixture

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPT_TIMEOUT = 45  # seconds for one example run as a script


# -- helpers -----------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"not strict JSON: {name}")


def load(name: str) -> ModuleType:
    """The example ``examples/<name>.py``, imported once as the module ``name``."""
    module = sys.modules.get(name)
    path = EXAMPLES / f"{name}.py"
    if module is not None and Path(getattr(module, "__file__", "")) == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Flask finds its root path through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_config(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_gunicorn_conf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name: str, cwd: Path, **env: str) -> str:
    """Run ``examples/<name>.py`` as a script; its standard output. Fails on a non-zero exit."""
    environ = {**os.environ, **env}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert done.returncode == 0, (
        f"{name}.py exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def pg_admin(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def pg_table_exists(dsn: str, table: str) -> bool:
    with pg_admin(dsn) as admin:
        return bool(scalar(admin, "SELECT to_regclass(%s) IS NOT NULL", (table,)))


def pg_drop(dsn: str, table: str) -> None:
    with pg_admin(dsn) as admin:
        admin.execute(f"DROP TABLE IF EXISTS {table}")


def pg_sessions(dsn: str, application_name: str) -> list[int]:
    """The backend pids of the server sessions with this application_name."""
    with pg_admin(dsn) as admin:
        found = rows(
            admin,
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            (application_name,),
        )
    return [pid for (pid,) in found]


def no_lease_out(pool: dbpool.Pool[Any]) -> bool:
    stats = pool.stats()
    return stats.in_use == 0 and stats.waiting == 0


# -- 1. Flask ------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def flask_backend(request: pytest.FixtureRequest) -> Iterator[SimpleNamespace]:
    """A connect callable for the Flask example, and a way to drop its table afterwards."""
    table = unique("flask_notes")
    if request.param == "sqlite":
        connect: Connector = request.getfixturevalue("sqlite_connect")
        backend = SimpleNamespace(name="sqlite", connect=connect, table=table)
        yield backend
        return  # the file is in the test's temporary directory
    connect = request.getfixturevalue("pg_connect")
    dsn = request.getfixturevalue("postgresql_dsn")
    backend = SimpleNamespace(name="postgresql", connect=connect, table=table)
    try:
        yield backend
    finally:
        connect.close_all()
        pg_drop(dsn, table)


def test_flask_app_reads_writes_and_reports_health(flask_backend: SimpleNamespace) -> None:
    flask_app = load("flask_app")
    app = flask_app.create_app(
        flask_backend.connect, table=flask_backend.table, min_size=0, max_size=2
    )
    pool = app.extensions["dbpool"]
    try:
        client = app.test_client()
        for body in ("first", "second"):
            response = client.post("/notes", json={"body": body})
            assert response.status_code == 201, response.get_data(as_text=True)
        assert client.post("/notes", json={"nobody": 1}).status_code == 400

        response = client.get("/notes")
        assert response.status_code == 200
        assert [note["body"] for note in response.get_json()] == ["first", "second"]

        response = client.get("/healthz")
        assert response.status_code == 200
        report = json.loads(response.get_data(as_text=True), parse_constant=_refuse_constant)
        assert report["ok"] is True and report["reachable"] is True and report["error"] is None
        assert report["pool"] == "flask" and report["stats"]["in_use"] == 0
        assert no_lease_out(pool)
    finally:
        pool.close()


def test_flask_app_under_concurrent_requests(flask_backend: SimpleNamespace) -> None:
    """8 threads x 20 requests, half of them writes, on a pool of 2: every request served,
    every lease back."""
    flask_app = load("flask_app")
    app = flask_app.create_app(
        flask_backend.connect, table=flask_backend.table, min_size=0, max_size=2, acquire_timeout=20
    )
    pool = app.extensions["dbpool"]
    threads, requests = 8, 20
    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def client_thread(number: int) -> None:
        try:
            client = app.test_client()  # one client per thread
            start.wait(timeout=10)
            for i in range(requests):
                if i % 2:
                    response = client.get("/notes")
                else:
                    response = client.post("/notes", json={"body": f"t{number}-{i}"})
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code >= 400:
                        errors.append(response.get_data(as_text=True))
        except BaseException:
            with lock:
                errors.append(traceback.format_exc())

    workers = [
        threading.Thread(target=client_thread, args=(n,), daemon=True) for n in range(threads)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=50)
        assert not any(worker.is_alive() for worker in workers), "a client thread hung"
        assert not errors, errors[0]
        assert sorted(set(statuses)) == [200, 201] and len(statuses) == threads * requests

        written = threads * requests // 2
        notes = app.test_client().get("/notes").get_json()
        assert len(notes) == written
        stats = pool.stats()
        assert stats.in_use == 0 and stats.waiting == 0
        assert stats.size <= 2 and stats.created <= 2 and stats.timeouts == 0
        assert stats.acquired >= threads * requests
    finally:
        pool.close()


def test_flask_healthz_is_503_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    flask_app = load("flask_app")
    missing = tmp_path / "no-such-directory" / "db.sqlite3"
    app = flask_app.create_app(
        lambda: sqlite3.connect(str(missing), check_same_thread=False),
        create_schema=False,
        min_size=0,
        max_size=1,
    )
    pool = app.extensions["dbpool"]
    try:
        response = app.test_client().get("/healthz")
        assert response.status_code == 503
        report = json.loads(response.get_data(as_text=True))
        assert report["ok"] is False and report["reachable"] is False
        assert "OperationalError" in report["error"]
        assert no_lease_out(pool)
    finally:
        pool.close()
    response = app.test_client().get("/healthz")  # a closed pool is not healthy either
    assert response.status_code == 503 and response.get_json()["closed"] is True


def test_flask_pool_timeout_is_503_with_retry_after(sqlite_connect: Connector) -> None:
    flask_app = load("flask_app")
    app = flask_app.create_app(
        sqlite_connect, table=unique("notes"), min_size=0, max_size=1, acquire_timeout=0.2
    )
    pool = app.extensions["dbpool"]
    try:
        with pool.connection():  # the only connection is busy
            response = app.test_client().get("/notes")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert app.test_client().get("/notes").status_code == 200
        assert no_lease_out(pool)
    finally:
        pool.close()


def test_flask_app_from_database_url_closes_its_pool_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import atexit

    flask_app = load("flask_app")
    registered: list[Callable[..., Any]] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'app.sqlite3'}")
    app = flask_app.create_app()
    pool = app.extensions["dbpool"]
    try:
        assert registered == [pool.close]
        client = app.test_client()
        assert client.post("/notes", json={"body": "from the URL"}).status_code == 201
        assert client.get("/notes").get_json() == [{"id": 1, "body": "from the URL"}]
    finally:
        registered[0]()
    assert pool.closed


# -- 2. gunicorn -----------------------------------------------------------------------------------


@pytest.fixture
def gunicorn_app(postgresql_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The example application, with PG_DSN pointing at the test server; its pool closed after."""
    monkeypatch.setenv("PG_DSN", postgresql_dsn)
    monkeypatch.delenv("PG_APP_NAME", raising=False)
    module = load("gunicorn_app")
    module.close_pool()
    try:
        yield module
    finally:
        module.close_pool()


def call_wsgi(app: Callable[..., Any], path: str) -> tuple[str, Any]:
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    started: list[str] = []
    body = b"".join(app(environ, lambda status, headers: started.append(status)))
    return started[0], json.loads(body)


def test_gunicorn_config_hooks_open_and_close_the_worker_pool(gunicorn_app: ModuleType) -> None:
    config = load_config(EXAMPLES / "gunicorn.conf.py")
    assert config.wsgi_app == "gunicorn_app:app"
    assert config.preload_app is False
    assert config.worker_class == "gthread"
    assert Path(config.chdir) == EXAMPLES

    worker = SimpleNamespace(
        pid=os.getpid(), cfg=SimpleNamespace(threads=3), log=logging.getLogger("test.gunicorn")
    )
    config.post_fork(None, worker)
    pool = gunicorn_app.get_pool()
    assert pool.max_size == 3  # as many connections as the worker has threads
    assert gunicorn_app.get_pool() is pool

    status, body = call_wsgi(gunicorn_app.app, "/")
    assert status == "200 OK" and body["worker_pid"] == os.getpid()
    status, report = call_wsgi(gunicorn_app.app, "/healthz")
    assert status == "200 OK" and report["ok"] is True
    assert no_lease_out(pool)

    config.worker_exit(None, worker)
    assert pool.closed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
@pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork.*:DeprecationWarning")
def test_gunicorn_worker_forked_after_the_pool_was_made(
    gunicorn_app: ModuleType, postgresql_dsn: str
) -> None:
    """A pool made in the parent (as with preload_app and a pool opened at import): in the
    child it opens sessions of its own, and closing it there leaves the parent's sessions
    alone; the example's get_pool() gives the child a pool of its own."""
    parent_pool = gunicorn_app.get_pool(min_size=1, max_size=2, validate_after=None)
    parent_pool.wait(timeout=10)
    status, body = call_wsgi(gunicorn_app.app, "/")
    parent_backend = body["backend_pid"]
    parent_name = f"gunicorn-worker-{os.getpid()}"
    assert pg_sessions(postgresql_dsn, parent_name) == [parent_backend]
    before = parent_pool.stats()

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code, report = 1, {}
        try:
            os.close(read_fd)
            # 1. The inherited pool object: it dropped the parent's connection at the fork.
            with parent_pool.connection() as conn:
                report["inherited_pool_backend"] = scalar(conn, "SELECT pg_backend_pid()")
            # 2. The example's get_pool(): a new pool for this process; the inherited one is
            # closed, which closes only the session this process opened.
            own_pool = gunicorn_app.get_pool()
            report["new_pool"] = own_pool is not parent_pool
            report["inherited_closed"] = parent_pool.closed
            status, body = call_wsgi(gunicorn_app.app, "/")
            report["status"], report["backend"] = status, body["backend_pid"]
            report["parent_sessions_seen"] = pg_sessions(postgresql_dsn, parent_name)
            gunicorn_app.close_pool()
            code = 0
        except BaseException as exc:
            report["error"] = "".join(traceback.format_exception(exc))[-4000:]
        finally:
            try:
                os.write(write_fd, json.dumps(report).encode())
            finally:
                os._exit(code)

    os.close(write_fd)
    code, report = child_report(pid, read_fd, timeout=30)
    assert code == 0, report.get("error") or f"child exited {code}: {report}"
    assert report["new_pool"] and report["inherited_closed"] and report["status"] == "200 OK"
    assert parent_backend not in (report["inherited_pool_backend"], report["backend"])
    assert report["parent_sessions_seen"] == [parent_backend]

    # The parent's session is still there and still works; the child's are gone.
    child_name = f"gunicorn-worker-{pid}"
    wait_until(lambda: not pg_sessions(postgresql_dsn, child_name), timeout=10)
    assert pg_sessions(postgresql_dsn, parent_name) == [parent_backend]
    assert gunicorn_app.get_pool() is parent_pool and not parent_pool.closed
    assert parent_pool.stats() == before
    status, body = call_wsgi(gunicorn_app.app, "/")
    assert status == "200 OK" and body["backend_pid"] == parent_backend


def pg_sessions_named(dsn: str, prefix: str) -> dict[str, set[int]]:
    """The backend pids of the server sessions whose application_name starts with ``prefix``,
    by application_name."""
    with pg_admin(dsn) as admin:
        found = rows(
            admin,
            "SELECT application_name, pid FROM pg_stat_activity "
            "WHERE starts_with(application_name, %s)",
            (prefix,),
        )
    sessions: dict[str, set[int]] = {}
    for name, pid in found:
        sessions.setdefault(name, set()).add(pid)
    return sessions


def gunicorn_has_setting(name: str) -> bool:
    import gunicorn.config

    return any(setting.name == name for setting in gunicorn.config.KNOWN_SETTINGS)


def http_get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.postgresql
@pytest.mark.timeout(20)
@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
def test_gunicorn_serves_from_one_pool_per_worker(
    postgresql_dsn: str, tmp_path: Path, preload: bool
) -> None:
    """gunicorn itself, with gunicorn.conf.py and two workers: each worker answers from sessions
    of its own (a pool made after the fork), the master holds none, and every session is gone
    once gunicorn has stopped."""
    prefix = unique("gunicorn_test")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # a free port, held until gunicorn has it: no race
    host, port = listener.getsockname()
    base = f"http://{host}:{port}"
    env = {**os.environ, "PG_DSN": postgresql_dsn, "PG_APP_NAME": prefix}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("GUNICORN_CMD_ARGS", None)
    command = [
        sys.executable, "-m", "gunicorn",
        "--config", str(EXAMPLES / "gunicorn.conf.py"),
        "--bind", f"fd://{listener.fileno()}",
        "--workers", "2",
    ]  # fmt: skip
    if preload:
        command.append("--preload")
    if gunicorn_has_setting("control_socket_disable"):
        command.append("--no-control-socket")  # else newer gunicorns open one under ~/.gunicorn
    log_path = tmp_path / "gunicorn.log"

    def log() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=[listener.fileno()],
                start_new_session=True,  # its own process group: the workers too can be killed
            )
    finally:
        listener.close()  # gunicorn has its own copy
    try:

        def answers() -> Any:
            assert process.poll() is None, f"gunicorn exited {process.returncode}:\n{log()}"
            try:
                return http_get_json(f"{base}/healthz")
            except OSError:
                return None  # not listening yet

        report = wait_until(answers, timeout=10, interval=0.05, message=f"no answer:\n{log()}")
        assert report["ok"] is True, report

        # Concurrent requests until both workers have answered: which worker accepts a
        # connection is up to the kernel.
        backends: dict[int, set[int]] = {}

        def both_workers_answer() -> bool:
            with ThreadPoolExecutor(max_workers=8) as executor:
                for body in executor.map(http_get_json, [f"{base}/"] * 16):
                    backends.setdefault(body["worker_pid"], set()).add(body["backend_pid"])
            return len(backends) >= 2

        wait_until(both_workers_answer, timeout=10, interval=0, message=f"{backends}\n{log()}")
        assert len(backends) == 2 and process.pid not in backends, backends
        first, second = backends.values()
        assert not first & second, f"a server session shared by two workers: {backends}"

        # On the server: one set of sessions per worker, none for the master, and each worker
        # answered from sessions named after it.
        sessions = pg_sessions_named(postgresql_dsn, prefix)
        assert set(sessions) == {f"{prefix}-{pid}" for pid in backends}, (sessions, backends)
        for worker_pid, used in backends.items():
            assert used <= sessions[f"{prefix}-{worker_pid}"], (sessions, backends)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log()
        assert "Traceback" not in log(), log()  # worker_exit included
        wait_until(
            lambda: not pg_sessions_named(postgresql_dsn, prefix),
            timeout=10,
            message=f"sessions left after gunicorn stopped: {sessions}",
        )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# -- 3. a DB-API script ----------------------------------------------------------------------------


@pytest.fixture
def mysql_url(mysql_params: dict[str, Any]) -> str:
    return os.environ.get(MYSQL_ENV, MYSQL_DEFAULT)


def mysql_table_exists(params: dict[str, Any], table: str) -> bool:
    import pymysql

    conn = pymysql.connect(**params)
    try:
        return bool(
            scalar(
                conn,
                "SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name = %s",
                (table,),
            )
        )
    finally:
        conn.close()


def test_script_leases_are_dbapi_connections(mysql_url: str, mysql_params: dict[str, Any]) -> None:
    script = load("script_dbapi")
    table = unique("dbpool_example_tasks")
    pool = dbpool.create_pool(mysql_url, min_size=0, max_size=2)
    try:
        conn = pool.connect()
        try:
            script.create_tasks(conn, table, count=10)
            assert script.archive_done(conn, table) == 5
            assert pool.stats().in_use == 1
        finally:
            conn.close()
        conn.close()  # a second close does nothing
        stats = pool.stats()
        assert (stats.in_use, stats.idle, stats.created) == (0, 1, 1)  # returned, not closed
        with pytest.raises(dbpool.LeaseReleased):
            conn.cursor()

        assert script.count_archived(pool.connect, table) == 5
        stats = pool.stats()
        assert (stats.in_use, stats.created) == (0, 1)  # the same connection, lent again
    finally:
        with pool.connection() as conn:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {table}")
        pool.close()
    assert not mysql_table_exists(mysql_params, table)


def test_script_main(mysql_url: str, mysql_params: dict[str, Any], tmp_path: Path) -> None:
    script = load("script_dbapi")
    table = unique("dbpool_example_tasks")
    assert script.main(url=mysql_url, table=table) == 0
    assert not mysql_table_exists(mysql_params, table)
    out = run_script("script_dbapi", tmp_path, MYSQL_URL=mysql_url)
    assert "archived 50 tasks" in out


# -- 4. SQLAlchemy Core ----------------------------------------------------------------------------


def test_sqlalchemy_core_on_postgresql(pg_connect: Connector, postgresql_dsn: str) -> None:
    example = load("sqlalchemy_core")
    table = unique("dbpool_example_items")
    with dbpool.Pool(pg_connect, min_size=0, max_size=2) as pool:
        engine = example.postgresql_engine(pool)
        assert example.demo(engine, pool, table) == [("apple", 3), ("plum", 7)]
        stats = pool.stats()
        assert stats.in_use == 0 and stats.created == 1  # one lease at a time, one connection

        # SQLAlchemy's isolation levels are set through the lease, so they do not outlive it.
        import sqlalchemy as sa

        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            assert conn.connection.dbapi_connection.autocommit is True
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
            assert conn.execute(sa.text("SHOW transaction_isolation")).scalar() == "serializable"
        with pool.connection() as lease:
            assert lease.raw.autocommit is False
            assert scalar(lease, "SHOW transaction_isolation") == "read committed"
        assert no_lease_out(pool)
    assert not pg_table_exists(postgresql_dsn, table)


def test_sqlalchemy_core_on_sqlite(sqlite_connect: Connector) -> None:
    example = load("sqlalchemy_core")
    with dbpool.Pool(sqlite_connect, min_size=0, max_size=2) as pool:
        engine = example.sqlite_engine(pool)
        assert example.demo(engine, pool, unique("items")) == [("apple", 3), ("plum", 7)]
        assert no_lease_out(pool)


def test_sqlalchemy_psycopg_hstore_lookup_needs_a_real_psycopg_connection(
    pg_connect: Connector,
) -> None:
    """Why the example passes use_native_hstore=False: SQLAlchemy's first connect looks the
    hstore type up with psycopg's TypeInfo.fetch(), which refuses anything but a
    psycopg.Connection. If this starts passing, the guide's advice can go."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    with dbpool.Pool(pg_connect, min_size=0, max_size=1) as pool:
        engine = sa.create_engine("postgresql+psycopg://", creator=pool.connect, poolclass=NullPool)
        with pytest.raises(TypeError, match="expected Connection"):
            engine.connect()
        assert no_lease_out(pool)  # SQLAlchemy closed what it got: the lease is back


def test_sqlalchemy_core_script(postgresql_dsn: str, tmp_path: Path) -> None:
    out = run_script("sqlalchemy_core", tmp_path, PG_DSN=postgresql_dsn)
    assert out.count("[('apple', 3), ('plum', 7)]") == 2


# -- 5. pandas -------------------------------------------------------------------------------------


def test_pandas_on_sqlite_through_the_driver_connection(sqlite_connect: Connector) -> None:
    example = load("pandas_read_sql")
    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # pandas warns about nothing
            frame = example.sqlite_roundtrip(pool, unique("prices"))
        assert list(frame["item"]) == ["apple", "pear"]
        assert no_lease_out(pool)


def test_pandas_warns_when_given_a_lease(sqlite_connect: Connector) -> None:
    """A lease is not a sqlite3.Connection, so pandas takes it for an untested DB-API
    connection: it works, with a UserWarning. Hence conn.raw in the example."""
    import pandas as pd

    with dbpool.Pool(sqlite_connect, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            with pytest.warns(UserWarning, match="SQLAlchemy connectable"):
                frame = pd.read_sql("SELECT 1 AS one", conn)
        assert list(frame["one"]) == [1]
        assert no_lease_out(pool)


def test_pandas_on_postgresql_through_sqlalchemy(
    pg_connect: Connector, postgresql_dsn: str
) -> None:
    example = load("pandas_read_sql")
    table = unique("dbpool_example_prices")
    with dbpool.Pool(pg_connect, min_size=0, max_size=2) as pool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                frame = example.postgresql_roundtrip(pool, table)
        finally:
            pg_drop(postgresql_dsn, table)
        assert list(frame["item"]) == ["apple", "pear"]
        assert list(frame["price"]) == [1.5, 2.0]
        assert no_lease_out(pool)
    assert not pg_table_exists(postgresql_dsn, table)


def test_pandas_script(postgresql_dsn: str, tmp_path: Path) -> None:
    out = run_script("pandas_read_sql", tmp_path, PG_DSN=postgresql_dsn)
    assert out.count("apple") == 2


# -- 6. PgBouncer ----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_pgbouncer_example(
    pgbouncer: PgBouncer,  # noqa: F811 - the fixture
    postgresql_dsn: str,
    tmp_path: Path,
) -> None:
    example = load("pgbouncer")
    table = unique("dbpool_example_orders")
    with example.make_pool(pgbouncer.dsn(), min_size=0) as pool:
        try:
            counts = example.run(pool, table, threads=8, orders=10)
        finally:
            pg_drop(postgresql_dsn, table)
        assert counts == {"tenant-0": 40, "tenant-1": 40}
        with pool.connection() as conn:
            assert conn.raw.prepare_threshold is None
            # set_config(..., true) left nothing in any server session
            assert scalar(conn, "SELECT current_setting('app.tenant', true)") in (None, "")
        stats = pool.stats()
        assert stats.in_use == 0 and stats.size <= 4
    run_script("pgbouncer", tmp_path, PGBOUNCER_DSN=pgbouncer.dsn())


# -- 7. rotating credentials -----------------------------------------------------------------------


def test_rotating_credentials_each_new_connection_gets_the_current_token(
    postgresql_dsn: str,
) -> None:
    example = load("rotating_credentials")
    tokens = example.TokenSource()
    first = tokens.current()
    assert first.secret not in repr(first)
    with example.make_pool(postgresql_dsn, tokens, min_size=1, max_size=2) as pool:
        pool.wait(timeout=10)
        with pool.connection() as conn:
            assert scalar(conn, "SHOW application_name") == f"rotating-token-{first.id}"
            assert conn.raw.info.password == first.secret
            second = tokens.rotate()
            assert second.id != first.id
            with pool.connection() as other:  # the first one is busy: a new connection
                assert scalar(other, "SHOW application_name") == f"rotating-token-{second.id}"
                assert other.raw.info.password == second.secret
            # The session opened with the old token keeps working.
            assert scalar(conn, "SELECT 1") == 1
        assert pool.stats().created == 2


def test_rotating_credentials_max_lifetime_renews_sessions(postgresql_dsn: str) -> None:
    example = load("rotating_credentials")
    tokens = example.TokenSource()
    with example.make_pool(
        postgresql_dsn, tokens, min_size=1, max_size=1, max_lifetime=1.0
    ) as pool:
        first = tokens.current()
        assert example.session_token(pool) == f"rotating-token-{first.id}"
        second = tokens.rotate()
        wait_until(
            lambda: example.session_token(pool) == f"rotating-token-{second.id}",
            timeout=15,
            interval=0.1,
            message="the session opened with the old token was not replaced",
        )
        assert pool.stats().discards["expired"] >= 1


def test_rotating_credentials_token_refreshes_before_expiry() -> None:
    example = load("rotating_credentials")
    tokens = example.TokenSource(ttl=10.0, refresh_margin=20.0)  # always inside the margin
    assert tokens.current().id != tokens.current().id
    steady = example.TokenSource(ttl=900.0, refresh_margin=60.0)
    assert steady.current() is steady.current()


def test_rotating_credentials_script(postgresql_dsn: str, tmp_path: Path) -> None:
    out = run_script("rotating_credentials", tmp_path, PG_DSN=postgresql_dsn)
    assert "after max_lifetime: rotating-token-2" in out


# -- 8. SQL Server with pymssql --------------------------------------------------------------------


def test_mssql_example_on_the_fake_pymssql(fake_server: Any) -> None:
    example = load("mssql_pymssql")
    table = "customers"
    select = f"SELECT name FROM {table} ORDER BY id"
    fake_server.set_result(select, [("Ada",), ("Grace",)], columns=("name",))
    with example.make_pool(connect=fake_server.connect_mssql, min_size=0) as pool:
        example.create_table(pool, table)
        example.add_customer(pool, table, 1, "Ada")
        example.add_customer(pool, table, 2, "Grace")
        rollbacks = fake_server.count("rollback")
        assert example.customer_names(pool, table) == ["Ada", "Grace"]
        # pymssql has no local transaction flag: the read ran a statement, so the pool rolled
        # back on return.
        assert fake_server.count("rollback") == rollbacks + 1
        example.drop_table(pool, table)
        assert no_lease_out(pool) and pool.stats().created == 1
    statements = fake_server.statements()
    assert statements[:2] == ["SET LOCK_TIMEOUT 5000", "SET XACT_ABORT ON"]  # configure, once
    assert statements.count("SET XACT_ABORT ON") == 1
    assert any(s.startswith(f"INSERT INTO {table}") for s in statements)


def test_mssql_example_from_a_url_on_the_fake_pymssql(
    fake_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL path of make_pool(): create_pool() hands the URL's parts to pymssql.connect(),
    with the login_timeout the example adds. pymssql stands in as the fake driver."""
    example = load("mssql_pymssql")
    received: list[dict[str, Any]] = []

    def connect(**kwargs: Any) -> Any:
        received.append(kwargs)
        return fake_server.connect_mssql()

    monkeypatch.setitem(sys.modules, "pymssql", SimpleNamespace(connect=connect))
    monkeypatch.setenv("MSSQL_URL", "mssql://app:s%40cret@db.example:1433/shop")
    with example.make_pool(min_size=0) as pool:
        assert "s@cret" not in repr(pool)
        with pool.connection() as conn:
            assert scalar(conn, "SELECT 1") == 1
        assert no_lease_out(pool)
    assert received == [
        {
            "server": "db.example",
            "port": "1433",
            "user": "app",
            "password": "s@cret",
            "database": "shop",
            "login_timeout": 10,
        }
    ]
    assert fake_server.statements()[:2] == ["SET LOCK_TIMEOUT 5000", "SET XACT_ABORT ON"]


def test_mssql_example_without_a_url_says_what_to_set(tmp_path: Path) -> None:
    environ = {key: value for key, value in os.environ.items() if key != "MSSQL_URL"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "mssql_pymssql.py")],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert done.returncode == 2 and "MSSQL_URL=" in done.stderr


@pytest.mark.mssql
def test_mssql_example_on_sql_server(mssql_params: dict[str, Any], tmp_path: Path) -> None:
    """Runs only when DBPOOL_TEST_MSSQL_DSN is set: there is no SQL Server in this project's
    test environment (the fixture skips with that reason)."""
    example = load("mssql_pymssql")
    url = os.environ[MSSQL_ENV]
    table = unique("dbpool_example_customers")
    with example.make_pool(url) as pool:
        example.create_table(pool, table)
        try:
            example.add_customer(pool, table, 1, "Ada")
            example.add_customer(pool, table, 2, "Grace")
            assert example.customer_names(pool, table) == ["Ada", "Grace"]
        finally:
            example.drop_table(pool, table)
        assert no_lease_out(pool)
    run_script("mssql_pymssql", tmp_path, MSSQL_URL=url)


# -- hooks and listeners ---------------------------------------------------------------------------


def test_hooks_example(postgresql_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    example = load("hooks_logging")
    caplog.set_level(logging.DEBUG, logger="example.db")
    pool, timings = example.make_pool(postgresql_dsn, min_size=0, max_size=1)
    try:
        with pool.connection() as conn:
            # configure ran before the first borrower
            assert scalar(conn, "SHOW application_name") == example.APPLICATION_NAME
            assert scalar(conn, "SHOW search_path") == "public"
            backend = scalar(conn, "SELECT pg_backend_pid()")
            conn.cursor().execute("SET search_path = pg_catalog")
            conn.cursor().execute("SET statement_timeout = '1s'")
            conn.commit()  # the borrower's changes outlive its transaction ...
        with pool.connection() as conn:
            assert scalar(conn, "SELECT pg_backend_pid()") == backend  # the same session
            assert conn.raw.autocommit is False  # reset() switched it on; the pool restored it
            assert scalar(conn, "SHOW search_path") == "public"  # ... and reset() undid them
            assert scalar(conn, "SHOW statement_timeout") == "30s"
            assert scalar(conn, "SHOW application_name") == example.APPLICATION_NAME
        assert no_lease_out(pool)
        stats = pool.stats()
        assert stats.created == 1 and sum(stats.discards.values()) == 0
    finally:
        pool.close()

    assert timings.count["connect"] == 1
    assert timings.count["checkout"] == timings.count["checkin"] == 2
    assert timings.count["close"] == 1  # at pool close
    assert timings.seconds["checkin"] > 0
    messages = [record.getMessage() for record in caplog.records if record.name == "example.db"]
    assert any(": connect " in message for message in messages)
    assert any(": checkout " in message for message in messages)
    assert any("close (pool_closed)" in message for message in messages)


def test_hooks_example_check_refuses_a_standby(postgresql_dsn: str) -> None:
    """The check hook's verdict decides: a connection it refuses is discarded and the caller
    gets a new one. (The test server is a primary, so the refusal is simulated.)"""
    example = load("hooks_logging")
    refuse = {"next": False}

    def check(conn: Any) -> None:
        if refuse["next"]:
            refuse["next"] = False
            raise example.StandbyError("connected to a read-only standby")
        example.check(conn)

    pool, timings = example.make_pool(postgresql_dsn, min_size=0, max_size=1, check=check)
    try:
        with pool.connection():
            pass
        refuse["next"] = True
        with pool.connection() as conn:
            assert scalar(conn, "SELECT 1") == 1
        stats = pool.stats()
        assert stats.created == 2 and stats.discards["check_failed"] == 1
        assert timings.discards == {"check_failed": 1}
    finally:
        pool.close()


def test_hooks_script(postgresql_dsn: str, tmp_path: Path) -> None:
    out = run_script("hooks_logging", tmp_path, PG_DSN=postgresql_dsn)
    assert "application_name: hooks-example" in out
    assert "search_path after reset: public" in out


# -- the examples' README lists them all -----------------------------------------------------------


def test_examples_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.rst").read_text()
    for path in sorted(EXAMPLES.glob("*.py")):
        assert f"``{path.name}``" in readme, f"{path.name} is missing from examples/README.rst"


def test_every_example_is_shown_in_a_guide() -> None:
    guides = "".join(p.read_text() for p in (ROOT / "docs" / "howto").glob("*.rst"))
    for path in sorted(EXAMPLES.glob("*.py")):
        assert f"../../examples/{path.name}" in guides, f"no guide includes examples/{path.name}"
