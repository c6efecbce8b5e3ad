"""Credentials that change while the pool runs: short-lived tokens, rotated passwords.

The pool calls its connect callable with no arguments each time it opens a connection, so the
callable can fetch the credential at that moment: from a secrets manager, a cloud provider's
token endpoint (an IAM database token, say), a file a sidecar rewrites. Nothing about the
credential is given to the pool, so none of it is kept, shown or logged by the pool.

A server checks the credential only when a session starts: an open connection keeps working
after its password has been rotated away. ``max_lifetime`` bounds how long a session opened
with an old credential lives; it should be shorter than the time a credential stays valid
after the next one is issued, so that connects made to replace expired connections always
find a valid credential.

``TokenSource`` below stands in for the secrets service. The connection's ``application_name``
carries the token's id, so the server shows which credential each session was opened with
(``SHOW application_name``, or ``pg_stat_activity``).

Run it (against a server with trust authentication the password is not checked, but the
example shows each connection opened with the token current at that moment)::

    PG_DSN="host=127.0.0.1 dbname=test user=postgres" python rotating_credentials.py
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg

import dbpool

DEFAULT_DSN = "host=127.0.0.1 dbname=test user=postgres"


@dataclass(frozen=True)
class Token:
    id: int
    secret: str = field(repr=False)  # never in a repr, a log line or an error message
    expires_at: float  # time.monotonic()


class TokenSource:
    """Hands out the current token, and a new one once it is within ``refresh_margin`` seconds
    of expiring. A real source would call the secrets service in ``_issue()``."""

    def __init__(self, ttl: float = 900.0, refresh_margin: float = 60.0) -> None:
        self._ttl = ttl
        self._margin = refresh_margin
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # connects run in several threads at once
        self._token = self._issue()

    def _issue(self) -> Token:
        return Token(next(self._ids), secrets.token_urlsafe(24), time.monotonic() + self._ttl)

    def current(self) -> Token:
        with self._lock:
            if self._token.expires_at - time.monotonic() < self._margin:
                self._token = self._issue()
            return self._token

    def rotate(self) -> Token:
        """Issue a new token now, as a rotation by the secrets service would."""
        with self._lock:
            self._token = self._issue()
            return self._token


def make_connect(dsn: str, tokens: TokenSource) -> Callable[[], psycopg.Connection[Any]]:
    def connect() -> psycopg.Connection[Any]:
        token = tokens.current()  # fetched per connection, never cached by the pool
        return psycopg.connect(
            dsn,
            password=token.secret,
            application_name=f"rotating-token-{token.id}",
            connect_timeout=5,
        )

    return connect


def make_pool(
    dsn: str | None = None, tokens: TokenSource | None = None, **options: Any
) -> dbpool.Pool[Any]:
    dsn = dsn or os.environ.get("PG_DSN", DEFAULT_DSN)
    tokens = tokens or TokenSource()
    settings: dict[str, Any] = {
        "min_size": 1,
        "max_size": 4,
        # Sessions live at most 10 minutes: a credential revoked after a rotation stops being
        # used within that time, and the replacement connects use the current one.
        "max_lifetime": 600.0,
        "name": "rotating",
    }
    settings.update(options)
    return dbpool.Pool(make_connect(dsn, tokens), **settings)


def session_token(pool: dbpool.Pool[Any]) -> str:
    """The application_name, so the token id, of the session a lease gets."""
    with pool.connection() as conn:
        cur = conn.cursor()
        cur.execute("SHOW application_name")
        (name,) = cur.fetchone()
        return str(name)


def main() -> int:
    tokens = TokenSource()
    # A lifetime of a second or two, so that the example shows a renewal; use minutes in real
    # life (each renewal is a connect).
    with make_pool(tokens=tokens, min_size=1, max_size=1, max_lifetime=2.0) as pool:
        print("first session:", session_token(pool))
        new = tokens.rotate()
        print("rotated to token", new.id, "; the open session keeps working:", session_token(pool))
        deadline = time.monotonic() + 10
        while session_token(pool) != f"rotating-token-{new.id}" and time.monotonic() < deadline:
            time.sleep(0.2)  # the old session reaches its max_lifetime and is replaced
        print("after max_lifetime:", session_token(pool), pool.stats())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
