"""A throwaway PostgreSQL cluster on a spare port, for tests that stop and restart the server.

The cluster is made once per test session (``initdb`` takes a second or two; starting and
stopping it afterwards is quick), listens on 127.0.0.1 on a free port with trust
authentication, keeps its unix socket in its own temporary directory, and runs with
``fsync=off``, small memory settings and room for a few prepared (two-phase) transactions:
it holds nothing worth keeping.

``initdb`` and the server refuse to run as root, so under root every ``initdb`` and ``pg_ctl``
runs as the ``postgres`` system user (through ``runuser``); as any other user they run as that
user.  The binaries come from ``/usr/lib/postgresql/<version>/bin`` (Debian's layout, newest
version first), else from ``PATH``.

Use the session fixture ``pg_cluster`` by importing it into a test module::

    from tests.pgcluster import pg_cluster  # noqa: F401

    def test_restart(pg_cluster: PgCluster) -> None:
        pg_cluster.ensure_running()
        conn = psycopg.connect(pg_cluster.dsn, connect_timeout=3)
        pg_cluster.restart(mode="immediate")

A test that stops the cluster need not start it again: the next one calls
:meth:`PgCluster.ensure_running`.  The cluster is stopped and its directory removed at the end of
the session, whatever happened.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from tests.conftest import unavailable

__all__ = ["PgCluster", "StopMode", "find_bindir", "pg_cluster"]

StopMode = Literal["smart", "fast", "immediate"]

SERVER_USER = "postgres"
PG_CTL_WAIT = 30  # seconds pg_ctl waits for a start or stop to complete
_BINARIES = ("initdb", "pg_ctl", "postgres")
_PORT_TRIES = 3  # a free port can be taken by someone else before the server binds it

# Appended to postgresql.conf; the port and socket directory are added per cluster.
_SETTINGS = """
listen_addresses = '127.0.0.1'
max_connections = 60
shared_buffers = 16MB
fsync = off
full_page_writes = off
synchronous_commit = on
max_wal_senders = 0
wal_level = minimal
logging_collector = off
log_min_messages = warning
max_prepared_transactions = 4
"""


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def find_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    Debian's versioned directories come first.  A program found on ``PATH`` is resolved through
    its symlinks first: ``/usr/local/bin`` may hold links or wrappers, and ``pg_ctl`` must sit
    next to the ``postgres`` binary it starts.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    for candidate in candidates:
        if all(os.access(os.path.join(candidate, name), os.X_OK) for name in _BINARIES):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One PostgreSQL cluster in a directory of its own.  Made by :meth:`create`."""

    def __init__(self, bindir: Path, root: Path, run_as: str | None) -> None:
        self.bindir = bindir
        self.root = root  # owned by the server's user; also the unix socket directory
        self.datadir = root / "data"
        self.log_path = root / "postgresql.log"
        self.host = "127.0.0.1"
        self.port = 0
        self._run_as = run_as

    @classmethod
    def create(cls, bindir: Path, run_as: str | None) -> PgCluster:
        """Run ``initdb`` in a new temporary directory.  Nothing is started yet.

        The directory is made with :mod:`tempfile` rather than pytest's ``tmp_path``: pytest's
        base directory is private to the user running the tests (mode 0700), so another user
        could not reach anything inside it.
        """
        root = Path(tempfile.mkdtemp(prefix="dbpool-pgcluster-"))
        try:
            if run_as is not None:
                account = pwd.getpwnam(run_as)
                os.chown(root, account.pw_uid, account.pw_gid)
            cluster = cls(bindir, root, run_as)
            cluster._run(
                "initdb",
                "--pgdata",
                str(cluster.datadir),
                "--username",
                SERVER_USER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            )
            with open(cluster.datadir / "postgresql.conf", "a", encoding="utf-8") as conf:
                conf.write(_SETTINGS)
                conf.write(f"unix_socket_directories = '{root}'\n")
                conf.write("include_if_exists = 'port.conf'\n")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return cluster

    def __repr__(self) -> str:
        return f"<PgCluster {self.host}:{self.port} {self.datadir}>"

    # -- connecting ----------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """A libpq conninfo string for the ``postgres`` database (add ``connect_timeout``)."""
        return (
            f"host={self.host} port={self.port} dbname=postgres user={SERVER_USER} "
            "sslmode=disable gssencmode=disable"
        )

    conninfo = dsn

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it accepts connections (``pg_ctl -w``).

        The first start picks a free port; if someone else binds it first, another is tried.
        """
        if self.port:
            self._pg_ctl("start", "--log", str(self.log_path))
            return
        for attempt in range(1, _PORT_TRIES + 1):
            self.port = _free_port()
            (self.datadir / "port.conf").write_text(f"port = {self.port}\n", encoding="utf-8")
            try:
                self._pg_ctl("start", "--log", str(self.log_path))
                return
            except RuntimeError:
                if attempt == _PORT_TRIES or "could not bind" not in self.log_tail():
                    self.port = 0
                    raise

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it is gone; nothing happens if it is not running.

        ``fast`` ends every session (their clients see an error) and shuts down cleanly;
        ``immediate`` kills everything at once, like a crash, so the next start recovers.
        """
        if self.running:
            self._pg_ctl("stop", "--mode", mode)

    def restart(self, mode: StopMode = "fast") -> None:
        """``pg_ctl restart``: stop in ``mode``, start, and return once it accepts connections."""
        self._pg_ctl("restart", "--mode", mode, "--log", str(self.log_path))

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    @property
    def running(self) -> bool:
        """Whether a server is running on the data directory (``pg_ctl status``)."""
        return self._run("pg_ctl", "status", "--pgdata", str(self.datadir), check=False) == 0

    def destroy(self) -> None:
        """Stop the server however it can be stopped, then remove the directory."""
        try:
            if self.datadir.exists() and self.running:
                try:
                    self.stop("fast")
                except RuntimeError:
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- running the programs ------------------------------------------------------------------

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run(
            "pg_ctl",
            action,
            "--pgdata",
            str(self.datadir),
            "--wait",
            "--timeout",
            str(PG_CTL_WAIT),
            "--silent",
            *options,
        )

    def _run(self, program: str, *args: str, check: bool = True) -> int:
        """Run one of the cluster's programs as the server's user; its exit status."""
        command = [str(self.bindir / program), *args]
        if self._run_as is not None:
            command = ["runuser", "-u", self._run_as, "--", *command]
        # Output goes to a file, not a pipe: a server started by pg_ctl could inherit a pipe and
        # keep it open, and reading it would then wait for the server to exit.
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as output:
            result = subprocess.run(
                command,
                cwd=self.root,  # the server's user may not be allowed into the current directory
                env={**os.environ, "LC_ALL": "C"},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=PG_CTL_WAIT + 30,
                check=False,
            )
            output.seek(0)
            text = output.read()
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited with {result.returncode}:\n{text}\n"
                f"server log:\n{self.log_tail()}"
            )
        return result.returncode


def _server_user() -> str | None:
    """The user to run the server as: ``postgres`` under root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        unavailable(
            f"a throwaway PostgreSQL cluster needs the {SERVER_USER!r} system user "
            "to run as (Debian package postgresql)"
        )
    if shutil.which("runuser") is None:
        unavailable("a throwaway PostgreSQL cluster needs runuser (Debian package util-linux)")
    return SERVER_USER


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running throwaway cluster, shared by the session; stopped and removed at its end."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(
            "a throwaway PostgreSQL cluster needs initdb, pg_ctl and postgres "
            "(Debian package postgresql)"
        )
    assert bindir is not None  # unavailable() raised
    cluster = PgCluster.create(bindir, _server_user())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
