"""A private PgBouncer in transaction pooling mode, in front of the test PostgreSQL server.

The session-scoped ``pgbouncer`` fixture writes a configuration into a temporary directory,
starts ``pgbouncer`` on a free port of 127.0.0.1, waits until its admin console answers, and
stops it when the session ends, whatever the outcome. Import it into a test module with
``from tests.pgbouncer import pgbouncer``.

Two databases are served, both pointing at the database of ``DBPOOL_TEST_POSTGRESQL_DSN``:

* :data:`DATABASE` (``test``): at most :data:`POOL_SIZE` server connections, shared by every
  client;
* :data:`PINNED` (``test_pinned``): exactly one server connection, so every client's
  transaction runs in the same server session, one after the other. What one client leaves in
  that session, the next one finds; tests use it to make such effects deterministic.

PgBouncer refuses to run as root, so when the tests run as root it is started with
``-u postgres``. Clients log in as the DSN's user with no password (``auth_type = trust``); the
same user may use the admin console (``SHOW POOLS``, ``RECONNECT`` ...) through
:meth:`PgBouncer.show` and :meth:`PgBouncer.command`.

Where ``pgbouncer`` is not installed (Debian: ``apt-get install pgbouncer``) the tests that use
the fixture are skipped, or fail under ``DBPOOL_REQUIRE_SERVERS=1``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable, wait_until

DATABASE = "test"
PINNED = "test_pinned"
POOL_SIZE = 4  # server connections per database: fewer than the pools in the tests open
MAX_CLIENTS = 100
QUERY_WAIT_TIMEOUT = 10  # seconds a client may queue for a server before PgBouncer fails it
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
RUN_AS = "postgres"  # pgbouncer will not run as root

_DEBIAN_BINARY = "/usr/sbin/pgbouncer"  # not on a non-root user's PATH


def find_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return _DEBIAN_BINARY if os.access(_DEBIAN_BINARY, os.X_OK) else None


def binary_version(binary: str) -> tuple[int, ...]:
    """``(1, 18, 0)`` from ``pgbouncer --version``'s "PgBouncer 1.18.0"."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise RuntimeError(f"cannot read the version of {binary} from {out!r}")
    return tuple(int(part or 0) for part in match.groups())


class PgBouncer:
    """A running PgBouncer, as the tests see it."""

    def __init__(self, port: int, user: str, version: tuple[int, ...]) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.user = user
        self.version = version

    def __repr__(self) -> str:
        return f"<PgBouncer {'.'.join(map(str, self.version))} on {self.host}:{self.port}>"

    def dsn(self, dbname: str = DATABASE) -> str:
        """A libpq conninfo string for ``dbname`` through PgBouncer."""
        return (
            f"host={self.host} port={self.port} dbname={dbname} user={self.user} "
            "sslmode=disable connect_timeout=10"
        )

    def show(self, what: str) -> list[dict[str, Any]]:
        """The rows of the admin console's ``SHOW <what>`` (POOLS, SERVERS, CONFIG ...)."""
        if not re.fullmatch(r"[A-Za-z_]+", what):
            raise ValueError(f"not a SHOW subject: {what!r}")
        import psycopg

        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True) as admin:
            cur = admin.execute(f"SHOW {what}")
            names = [column.name for column in cur.description or ()]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def command(self, command: str) -> None:
        """Run an admin console command, such as ``RECONNECT test_pinned``."""
        import psycopg

        with psycopg.connect(self.dsn("pgbouncer"), autocommit=True) as admin:
            admin.execute(command)

    def pool(self, dbname: str) -> dict[str, Any]:
        """The ``SHOW POOLS`` row of ``dbname`` (for the fixture's user), or ``{}``."""
        rows = [r for r in self.show("POOLS") if r["database"] == dbname and r["user"] == self.user]
        return rows[0] if rows else {}

    def servers(self, dbname: str) -> list[dict[str, Any]]:
        """The server connections PgBouncer holds open for ``dbname``."""
        return [r for r in self.show("SERVERS") if r["database"] == dbname]

    def setting(self, key: str) -> str | None:
        """A configuration value from ``SHOW CONFIG``; None if this version has no such key."""
        for row in self.show("CONFIG"):
            if row["key"] == key:
                return str(row["value"])
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(port: int, upstream: dict[str, str], user: str, auth_file: Path) -> str:
    target = " ".join(f"{key}={value}" for key, value in upstream.items())
    return f"""\
[databases]
{DATABASE} = {target}
{PINNED} = {target} pool_size=1

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
admin_users = {user}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {MAX_CLIENTS}
query_wait_timeout = {QUERY_WAIT_TIMEOUT}
"""


def _upstream(dsn: str) -> dict[str, str]:
    """PgBouncer's connection parameters for the server of a libpq DSN."""
    from psycopg.conninfo import conninfo_to_dict

    params = {key: str(value) for key, value in conninfo_to_dict(dsn).items()}
    upstream = {
        "host": params.get("host", "127.0.0.1"),
        "port": params.get("port", "5432"),
        "dbname": params.get("dbname", "test"),
        "user": params.get("user", "postgres"),
    }
    if params.get("password"):
        upstream["password"] = params["password"]
    for key, value in upstream.items():
        if not re.fullmatch(r"[^\s'\\]+", value):
            raise ValueError(f"{key} of the PostgreSQL DSN cannot be written into pgbouncer.ini")
    return upstream


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Shut PgBouncer down, at once. SIGTERM is an immediate shutdown before 1.23; from 1.23
    on it waits for clients, and a second SIGTERM makes it immediate."""
    if proc.poll() is not None:
        return
    for _ in range(2):
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT / 2)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait(timeout=STOP_TIMEOUT)


def _start(
    binary: str, workdir: Path, port: int, upstream: dict[str, str]
) -> subprocess.Popen[bytes]:
    user = upstream["user"]
    auth_file = workdir / "userlist.txt"
    auth_file.write_text(f'"{user}" ""\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(_config(port, upstream, user, auth_file))
    command = [binary, str(ini)]
    if os.geteuid() == 0:
        owner = pwd.getpwnam(RUN_AS)
        for path in (workdir, auth_file, ini):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        command[1:1] = ["-u", RUN_AS]
    with open(workdir / "pgbouncer.log", "ab") as log:  # it logs to stderr in the foreground
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=workdir
        )


def _answers(bouncer: PgBouncer) -> bool:
    import psycopg

    try:
        with psycopg.connect(bouncer.dsn("pgbouncer"), autocommit=True, connect_timeout=2) as admin:
            admin.execute("SHOW VERSION")
        return True
    except psycopg.OperationalError:
        return False


def _launch(
    binary: str, workdir: Path, upstream: dict[str, str], version: tuple[int, ...]
) -> tuple[PgBouncer, subprocess.Popen[bytes]]:
    """Start PgBouncer and wait until it answers; fail the test with its log if it cannot."""
    for _attempt in range(3):  # the free port may be taken before PgBouncer binds it
        bouncer = PgBouncer(_free_port(), upstream["user"], version)
        proc = _start(binary, workdir, bouncer.port, upstream)
        try:
            # wait_until calls the lambda only during this turn of the loop
            wait_until(
                lambda: proc.poll() is not None or _answers(bouncer),  # noqa: B023
                timeout=START_TIMEOUT,
            )
        except AssertionError:
            _stop(proc)
            break
        if proc.poll() is None:
            return bouncer, proc
    log = (workdir / "pgbouncer.log").read_text(errors="replace")
    pytest.fail(f"pgbouncer did not start; its log:\n{log[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def pgbouncer(postgresql_dsn: str) -> Iterator[PgBouncer]:
    binary = find_binary()
    if binary is None:
        unavailable("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    assert binary is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(RUN_AS)
        except KeyError:
            unavailable(f"pgbouncer refuses to run as root and there is no {RUN_AS!r} user")
    upstream = _upstream(postgresql_dsn)
    version = binary_version(binary)
    workdir = Path(tempfile.mkdtemp(prefix="dbpool-pgbouncer-"))
    try:
        bouncer, proc = _launch(binary, workdir, upstream, version)
        try:
            yield bouncer
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
