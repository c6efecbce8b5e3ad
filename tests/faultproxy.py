"""An in-process TCP proxy that injects network faults between a client and a database server.

The proxy listens on 127.0.0.1 (an ephemeral port) and relays every connection it accepts to one
upstream address, which must be 127.0.0.1 too: it never touches any other address. Tests point a
driver or a pool at ``proxy.port`` and switch faults on and off while connections are in use::

    with FaultProxy(upstream=("127.0.0.1", 5432)) as proxy:
        conn = psycopg.connect(host="127.0.0.1", port=proxy.port, dbname="test",
                               user="postgres", sslmode="disable")
        proxy.set_mode(Mode.BLACKHOLE)    # the next query hangs
        proxy.drop_all()                  # ... until its connection is dropped
        proxy.stats().open                # 0, once both ends are closed

As a fixture (in ``conftest.py``)::

    @pytest.fixture
    def pg_proxy():
        with FaultProxy(upstream=("127.0.0.1", 5432)) as proxy:
            yield proxy

Modes (:class:`Mode`, switched at any time with :meth:`FaultProxy.set_mode`):

``PASS``
    Relay both ways.
``BLACKHOLE``
    A network stall: nothing is relayed either way and nothing is answered. Bytes that arrive on
    open connections are read and held back (counted in ``stats().bytes_held``); new connections
    are accepted but not connected upstream. Leaving BLACKHOLE delivers what was held, in order,
    so the stall heals; use :meth:`~FaultProxy.drop_all` or :meth:`~FaultProxy.stop` to break the
    hung connections instead. A client only gets out of a blackhole by its own timeout.
``REFUSE``
    New connections fail at once with "connection refused": the listening socket stops
    listening (pending connections are reset) and listens again, on the same port, when the mode
    changes. Connections already open keep working.
``CUT_AFTER_COMMIT``
    Relay, but when a client sends a COMMIT statement, send it to the server, then cut that
    connection before any reply reaches the client: the client socket is closed at once and the
    server sees end-of-file right after the COMMIT, so the server commits (or not) while the
    client cannot know. What the server sends afterwards is read and discarded until it closes
    its end; only then does the connection leave ``stats().open``, so waiting for ``open == 0``
    means the server has finished with the COMMIT. The mode stays on for later connections until
    it is changed; ``stats().commits_cut`` counts the cuts.

A slow link is a setting, not a mode: with ``proxy.latency = 0.3`` every reply the server sends
is held that long before it is relayed, so each round trip takes at least that long (in every
mode but BLACKHOLE, which holds replies anyway).

Dropping connections is an action, not a mode: :meth:`FaultProxy.drop_all` closes both sockets
of every open connection now (the client and the server each see the other side close) and
leaves the mode as it is, so new connections are relayed as before.

COMMIT detection reads the client's protocol (detected per connection, or forced with
``protocol="postgresql"`` / ``"mysql"``), so message and packet boundaries never fool it:

* PostgreSQL: a simple Query message (psycopg's ``commit()``) whose SQL is COMMIT, cut right
  after that message; or a Parse message whose SQL is COMMIT (the extended protocol), cut after
  the next Sync.
* MySQL / MariaDB: a COM_QUERY packet whose SQL is COMMIT (PyMySQL's and mysqlclient's
  ``commit()``), cut right after it.

"SQL is COMMIT" means a statement of the text starts with the word COMMIT (any case, after
optional whitespace, at the start or after a ``;``): ``COMMIT``, ``commit work``,
``COMMIT PREPARED 'x'``, ``insert ...; commit``. Limits: PostgreSQL's ``END``, a COMMIT after a
leading comment, a ``;`` followed by "commit" inside a string literal (a false cut), a prepared
statement executed again without a new Parse (psycopg after ``prepare_threshold`` executions),
COMMIT inside a procedure, MySQL prepared statements and query attributes are not understood, and
an encrypted connection (TLS, GSS) cannot be read at all: connect with ``sslmode=disable`` /
``gssencmode=disable`` (PostgreSQL) and no ``ssl`` options (PyMySQL).

Threads (all daemon, named ``faultproxy-<port>-...``): one accepts connections; each connection
has two pumps, one per direction. Every socket operation has a short timeout, so the threads see
mode changes and :meth:`~FaultProxy.stop` within a fraction of a second; ``stop()`` closes every
socket, joins every thread within its timeout, and may be called more than once.

REFUSE relies on Linux letting a listening socket stop (``shutdown``) and listen again while it
keeps its port; where that fails, the proxy closes the socket and binds the port again.
"""

from __future__ import annotations

import enum
import errno
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["FaultProxy", "Mode", "ProxyStats", "commit_scanner"]

LOOPBACK = "127.0.0.1"
POLL = 0.05  # seconds: how often blocked threads look at the mode and the stop flag
CONNECT_TIMEOUT = 3.0  # seconds, for each connection to the upstream server
CHUNK = 65536
HOLD_LIMIT = 1 << 20  # bytes held per direction in BLACKHOLE before reading stops


class Mode(enum.Enum):
    """What the proxy does with traffic; see the module documentation."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"
    CUT_AFTER_COMMIT = "cut_after_commit"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since start; ``open`` is a current count, the others only grow."""

    accepted: int = 0  # client connections accepted
    open: int = 0  # connections with a socket not yet closed
    bytes_to_server: int = 0  # relayed client -> server (counted as they are handed on)
    bytes_to_client: int = 0  # relayed server -> client (counted as they are handed on)
    bytes_held: int = 0  # read while BLACKHOLE was on (delivered later, or lost on a drop)
    commits_cut: int = 0  # connections cut after a COMMIT
    dropped: int = 0  # connections closed by drop_all()
    upstream_failures: int = 0  # connections closed because the server could not be reached


# -- COMMIT detection --------------------------------------------------------------------------

_COMMIT = re.compile(rb"(?:\A|;)\s*COMMIT\b", re.IGNORECASE)


def _is_commit(sql: bytes) -> bool:
    return _COMMIT.search(sql) is not None


class _Framer:
    """Splits one direction of a stream into messages, buffering only the interesting ones.

    Subclasses say how long a header is, how long the message it starts is, and whether to
    keep it; :meth:`feed` returns the offset just past the first message in ``data`` after which
    the connection should be cut, or None.
    """

    def __init__(self) -> None:
        self.opaque = False  # the stream cannot be read (encrypted, or not this protocol)
        self._buf = bytearray()
        self._total = 0  # length of the message being read, header included
        self._skip = 0  # bytes of an uninteresting message still to pass over

    def feed(self, data: bytes) -> int | None:
        cut: int | None = None
        i = 0
        while not self.opaque:
            if self._skip:
                if i == len(data):
                    break
                n = min(self._skip, len(data) - i)
                self._skip -= n
                i += n
                continue
            size = self._header_size()
            if len(self._buf) < size:
                if i == len(data):
                    break
                n = min(size - len(self._buf), len(data) - i)
                self._buf += data[i : i + n]
                i += n
                if len(self._buf) < size:
                    break
                total = self._message_size(bytes(self._buf))
                if total is None:
                    self.opaque = True
                    break
                self._total = total
                if not self._keep(bytes(self._buf)):
                    self._skip = total - size
                    self._buf.clear()
                    continue
            if len(self._buf) < self._total:
                if i == len(data):
                    break
                n = min(self._total - len(self._buf), len(data) - i)
                self._buf += data[i : i + n]
                i += n
                if len(self._buf) < self._total:
                    break
            message = bytes(self._buf)
            self._buf.clear()
            if self._message(message) and cut is None:
                cut = i
        return cut

    def _header_size(self) -> int:
        raise NotImplementedError

    def _message_size(self, header: bytes) -> int | None:
        raise NotImplementedError

    def _keep(self, header: bytes) -> bool:
        raise NotImplementedError

    def _message(self, message: bytes) -> bool:
        raise NotImplementedError


_PG_REQUESTS = {80877102, 80877103, 80877104}  # CancelRequest, SSLRequest, GSSENCRequest


class _PostgresFramer(_Framer):
    """Client -> server PostgreSQL: untyped startup messages, then typed messages."""

    def __init__(self) -> None:
        super().__init__()
        self._startup = True
        self._parsed_commit = False  # a Parse of COMMIT was seen: cut after the next Sync

    def _header_size(self) -> int:
        return 4 if self._startup else 5

    def _message_size(self, header: bytes) -> int | None:
        if self._startup:
            if header[0] == 0x16:  # a TLS handshake after SSLRequest (or direct TLS)
                return None
            (length,) = struct.unpack("!I", header)
            return length if 8 <= length <= 10000 else None
        (length,) = struct.unpack("!I", header[1:])
        return length + 1 if length >= 4 else None

    def _keep(self, header: bytes) -> bool:
        return self._startup or header[:1] in (b"Q", b"P", b"S")

    def _message(self, message: bytes) -> bool:
        if self._startup:
            (code,) = struct.unpack("!I", message[4:8])
            if code not in _PG_REQUESTS:
                self._startup = False  # StartupMessage: typed messages follow
            return False
        kind, body = message[:1], message[5:]
        if kind == b"Q":
            return _is_commit(body.rstrip(b"\0"))
        if kind == b"P":
            name_end = body.find(b"\0")
            sql = body[name_end + 1 : body.find(b"\0", name_end + 1)]
            if _is_commit(sql):
                self._parsed_commit = True
            return False
        if self._parsed_commit:  # Sync
            self._parsed_commit = False
            return True
        return False


class _MySQLFramer(_Framer):
    """Client -> server MySQL: 4-byte packet headers; commands are the packets numbered 0."""

    CLIENT_SSL = 0x800
    COM_QUERY = 0x03

    def __init__(self) -> None:
        super().__init__()
        self._first = True  # the first packet: the handshake response, or an SSL request

    def _header_size(self) -> int:
        return 4

    def _message_size(self, header: bytes) -> int | None:
        return int.from_bytes(header[:3], "little") + 4

    def _keep(self, header: bytes) -> bool:
        # sequence 0: a command; 1: the handshake response or an SSL request (checked for TLS)
        return header[3] in (0, 1)

    def _message(self, message: bytes) -> bool:
        payload = message[4:]
        if message[3] == 1:
            caps = int.from_bytes(payload[:4], "little")
            if self._first and len(payload) == 32 and caps & self.CLIENT_SSL:
                self.opaque = True  # an SSL request: TLS follows
            self._first = False
            return False
        return payload[:1] == bytes([self.COM_QUERY]) and _is_commit(payload[1:])


class _AutoFramer:
    """Picks the protocol from the client's first bytes: a PostgreSQL startup-phase message has
    a protocol or request code in bytes 4-8, anything else is taken for MySQL."""

    def __init__(self) -> None:
        self._head = b""
        self._framer: _Framer | None = None

    @property
    def opaque(self) -> bool:
        return self._framer is not None and self._framer.opaque

    def feed(self, data: bytes) -> int | None:
        if self._framer is not None:
            return self._framer.feed(data)
        self._head += data
        if len(self._head) < 8:  # a PostgreSQL client sends at least 8, a MySQL one 32
            return None
        code = self._head[4:8]
        postgres = code[:2] == b"\x00\x03" or int.from_bytes(code, "big") in _PG_REQUESTS
        self._framer = _PostgresFramer() if postgres else _MySQLFramer()
        cut = self._framer.feed(self._head)
        head, self._head = len(self._head), b""
        return None if cut is None else max(0, cut - (head - len(data)))


def commit_scanner(protocol: str | None = None) -> Any:
    """A new COMMIT detector for one client -> server stream.

    Its ``feed(data)`` returns the offset in ``data`` just past the message (PostgreSQL Query or
    Sync, MySQL COM_QUERY) that completes a COMMIT, or None. ``protocol``: "postgresql",
    "mysql", or None to detect it from the first bytes.
    """
    if protocol is None:
        return _AutoFramer()
    if protocol == "postgresql":
        return _PostgresFramer()
    if protocol == "mysql":
        return _MySQLFramer()
    raise ValueError(f"protocol must be 'postgresql', 'mysql' or None, not {protocol!r}")


# -- the proxy ---------------------------------------------------------------------------------


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, number: int, scanner: Any) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.number = number
        self.scanner = scanner
        self.users = 1  # threads still using the sockets; the last one closes them
        self.closing = False  # both sockets shut down: the pumps leave
        self.cut = False  # cut after a COMMIT: the server's replies are discarded

    def shutdown(self) -> None:
        """Shut both sockets down both ways (idempotent); each peer sees end-of-file now."""
        self.closing = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                _quietly(sock.shutdown, socket.SHUT_RDWR)


def _quietly(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except OSError:
        pass  # the socket is already shut down, closed or reset


def _check_loopback(address: Any, what: str) -> tuple[str, int]:
    host, port = address
    if host != LOOPBACK:
        raise ValueError(f"{what} must be on {LOOPBACK}, not {host!r}")
    return host, int(port)


class FaultProxy:
    """A TCP proxy from 127.0.0.1:``port`` to ``upstream`` (on 127.0.0.1) with switchable faults.

    ``protocol``: "postgresql", "mysql", or None (default) to detect it per connection; only
    used to find COMMIT statements.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        mode: Mode = Mode.PASS,
        protocol: str | None = None,
    ) -> None:
        self.upstream = _check_loopback(upstream, "upstream")
        commit_scanner(protocol)  # validates it
        self.protocol = protocol
        self.port = 0
        self.latency = 0.0  # seconds each chunk from the server waits before it is relayed
        self._mode = Mode(mode)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on set_mode() and stop()
        self._stopping = False
        self._listener: socket.socket | None = None
        self._links: set[_Link] = set()
        self._threads: set[threading.Thread] = set()
        self._counts: dict[str, int] = dict.fromkeys(ProxyStats.__dataclass_fields__, 0)

    def __repr__(self) -> str:
        host, port = self.upstream
        return f"<FaultProxy 127.0.0.1:{self.port} -> {host}:{port} {self._mode.name}>"

    # -- public API ----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect: ``("127.0.0.1", port)``."""
        return (LOOPBACK, self.port)

    @property
    def mode(self) -> Mode:
        return self._mode

    def start(self) -> FaultProxy:
        """Bind 127.0.0.1 on a free port and start accepting; returns the proxy."""
        with self._lock:
            if self._listener is not None or self._stopping:
                raise RuntimeError("a FaultProxy can be started only once")
            self._listener = self._bind()
            self.port = self._listener.getsockname()[1]
            if self._mode is Mode.REFUSE:
                self._pause_listener()
            self._spawn(self._accept_loop, f"faultproxy-{self.port}-accept")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every socket and join every thread; idempotent.

        Raises RuntimeError if a thread is still running after ``timeout`` seconds.
        """
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
            links, listener = list(self._links), self._listener
        if listener is not None:
            _quietly(listener.shutdown, socket.SHUT_RDWR)
        for link in links:
            link.shutdown()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            if not threads:
                break
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                alive = [t.name for t in threads if t.is_alive()]
                if alive:
                    raise RuntimeError(f"{self!r}: threads still running after stop(): {alive}")
        if listener is not None:
            listener.close()

    def set_mode(self, mode: Mode | str) -> None:
        """Switch to ``mode`` now; see the module documentation for what each one does."""
        mode = Mode(mode)
        with self._lock:
            old, self._mode = self._mode, mode
            if self._listener is not None and not self._stopping:
                if mode is Mode.REFUSE and old is not Mode.REFUSE:
                    self._pause_listener()
                elif old is Mode.REFUSE and mode is not Mode.REFUSE:
                    self._resume_listener()
            self._changed.notify_all()

    def drop_all(self) -> int:
        """Close both sockets of every open connection now; returns how many were dropped.

        The mode does not change: connections made afterwards are handled as before.
        """
        with self._lock:
            links = [link for link in self._links if not link.closing]
            self._counts["dropped"] += len(links)
        for link in links:
            link.shutdown()
        return len(links)

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(**self._counts)

    def __enter__(self) -> FaultProxy:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- listening socket ----------------------------------------------------------------------

    def _bind(self, port: int = 0) -> socket.socket:
        """A listening socket on 127.0.0.1:``port``, or on a free port when ``port`` is 0.

        The port is always bound by number, never as port 0: Linux keeps an explicitly bound
        port across shutdown() and listen() again, which REFUSE relies on.
        """
        for _ in range(50):
            chosen = port
            if not chosen:
                with socket.socket() as probe:
                    probe.bind((LOOPBACK, 0))
                    chosen = probe.getsockname()[1]
            sock = socket.socket()
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((LOOPBACK, chosen))
                sock.listen(64)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE or port:
                    raise
                continue  # someone took the free port meanwhile: pick another
            sock.settimeout(POLL)
            return sock
        raise OSError(errno.EADDRINUSE, "no free port on 127.0.0.1")

    def _pause_listener(self) -> None:
        assert self._listener is not None
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # stops listening, resets pending connects
        except OSError:
            self._listener.close()  # not Linux: give the port up until the mode changes

    def _resume_listener(self) -> None:
        assert self._listener is not None
        try:
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            self._listener = self._bind(self.port)

    # -- threads -------------------------------------------------------------------------------

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        """Start a daemon thread that unregisters itself when it ends; call with the lock held."""

        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=name, daemon=True)
        self._threads.add(thread)
        thread.start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _wait_while(self, mode: Mode, link: _Link | None = None) -> None:
        """Wait (at most POLL) until the mode is no longer ``mode``, or the proxy stops."""
        with self._lock:
            self._changed.wait_for(
                lambda: (
                    self._mode is not mode or self._stopping or (link is not None and link.closing)
                ),
                timeout=POLL,
            )

    def _accept_loop(self) -> None:
        number = 0
        while not self._stopping:
            if self._mode is Mode.REFUSE:
                self._wait_while(Mode.REFUSE)
                continue
            try:
                client, _ = self._listener.accept()  # type: ignore[union-attr]
            except socket.timeout:
                continue
            except OSError:  # the listener was paused or closed under us
                with self._lock:
                    self._changed.wait(POLL)
                continue
            with self._lock:
                if self._mode is Mode.REFUSE or self._stopping:
                    # accepted just as REFUSE or stop() began: reset it, as the listener would
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    client.close()
                    continue
                number += 1
                client.settimeout(POLL)
                link = _Link(client, number, commit_scanner(self.protocol))
                self._links.add(link)
                self._counts["accepted"] += 1
                self._counts["open"] += 1
                self._spawn(self._serve, f"faultproxy-{self.port}-{number}-up", link)

    def _serve(self, link: _Link) -> None:
        """Connect upstream (not while blackholed), start the server -> client pump, and pump
        client -> server in this thread."""
        try:
            while self._mode is Mode.BLACKHOLE and not (link.closing or self._stopping):
                self._wait_while(Mode.BLACKHOLE, link)
            if link.closing or self._stopping:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT)
            except OSError:
                self._count("upstream_failures")
                return
            upstream.settimeout(POLL)
            with self._lock:
                link.upstream = upstream
                if link.closing or self._stopping:
                    return
                link.users += 1
                self._spawn(self._pump_down, f"faultproxy-{self.port}-{link.number}-down", link)
            self._pump(link, True)
        finally:
            self._release(link)

    def _pump_down(self, link: _Link) -> None:
        try:
            self._pump(link, False)
        finally:
            self._release(link)

    def _release(self, link: _Link) -> None:
        """One thread is done with ``link``; the last one closes its sockets."""
        with self._lock:
            link.users -= 1
            if link.users:
                return
            self._links.discard(link)
            self._counts["open"] -= 1
        link.shutdown()
        for sock in (link.client, link.upstream):
            if sock is not None:
                sock.close()

    def _pump(self, link: _Link, to_server: bool) -> None:
        """Relay one direction until either side closes, the link is dropped or the proxy stops.

        In BLACKHOLE, bytes read are held and relayed once the mode changes.
        """
        src, dst = (link.client, link.upstream) if to_server else (link.upstream, link.client)
        assert src is not None and dst is not None
        held = bytearray()
        eof = False
        try:
            while not (link.closing or self._stopping):
                blackholed = self._mode is Mode.BLACKHOLE
                if held and not blackholed:
                    data = bytes(held)
                    held.clear()
                    if link.cut:
                        continue  # held from before a cut: the client is gone
                    if not self._forward(link, dst, data, to_server):
                        return
                if eof and not held:
                    return  # a peer closed: the finally block closes the other side too
                if eof or len(held) >= HOLD_LIMIT:
                    self._wait_while(Mode.BLACKHOLE, link)
                    continue
                try:
                    data = src.recv(CHUNK)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    eof = True
                elif not link.cut:  # after a cut, the server's replies are discarded
                    held += data
                    if self._mode is Mode.BLACKHOLE:
                        self._count("bytes_held", len(data))
        finally:
            if not (to_server and link.cut):  # after a cut, the other pump drains the server
                link.shutdown()

    def _forward(self, link: _Link, dst: socket.socket, data: bytes, to_server: bool) -> bool:
        """Send ``data`` on; False when the link is finished (send failed, or cut)."""
        if not to_server:
            if self.latency > 0:
                with self._lock:  # woken early by stop()
                    self._changed.wait_for(lambda: self._stopping, self.latency)
            return self._send(link, dst, data, "bytes_to_client")
        cut = link.scanner.feed(data)
        if cut is None or self._mode is not Mode.CUT_AFTER_COMMIT:
            return self._send(link, dst, data, "bytes_to_server")
        link.cut = True  # before the COMMIT goes out, so no reply to it can be relayed
        self._count("commits_cut")  # before the client can see the cut
        if self._send(link, dst, data[:cut], "bytes_to_server"):
            _quietly(dst.shutdown, socket.SHUT_WR)  # the server reads the COMMIT, then EOF
        _quietly(link.client.shutdown, socket.SHUT_RDWR)
        return False

    def _send(self, link: _Link, sock: socket.socket, data: bytes, counter: str) -> bool:
        """Send all of ``data``; False if the link closed first. Counted before it is sent, so
        a peer never sees bytes that the counters do not show yet."""
        self._count(counter, len(data))
        view = memoryview(data)
        while view:
            if link.closing or self._stopping:
                return False
            try:
                sent = sock.send(view)
            except socket.timeout:
                continue
            except OSError:
                return False
            view = view[sent:]
        return True
