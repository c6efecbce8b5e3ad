"""Commit outcome: a connection cut while COMMIT is in flight, through the fault proxy
(tests/faultproxy.py), against PostgreSQL (psycopg 3) and MariaDB (PyMySQL).

The proxy forwards the COMMIT to the server and closes the client's socket before any reply: the
server commits, the client cannot know.  Each test waits on the proxy's counters, never on sleeps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import dbpool
from dbpool import CommitOutcomeUnknown
from tests.conftest import wait_until
from tests.faultproxy import FaultProxy, Mode

pytestmark = pytest.mark.timeout(30)

TABLE = f"tx_commit_outcome_{os.getpid()}"  # other test runs may share the servers


class Cut:
    """One real server behind a fault proxy: connections through it, and straight to it."""

    def __init__(
        self,
        name: str,
        driver: Any,
        proxy: FaultProxy,
        through: Callable[[], Any],
        direct: Callable[[], Any],
    ) -> None:
        self.name = name
        self.driver = driver
        self.proxy = proxy
        self.through = through  # a pool's connect callable
        self._direct = direct
        self.placeholder = "%s"

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run one statement on a new autocommit connection straight to the server."""
        conn = self._direct()
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
        finally:
            conn.close()

    def wait_for_the_server(self) -> None:
        """After a cut, the proxy closes the link once the server has closed its end, that is
        once the server is done with the COMMIT."""
        wait_until(
            lambda: self.proxy.stats().open == 0,
            timeout=10,
            message="the server still holds the cut connection",
        )


def _postgresql(
    request: pytest.FixtureRequest,
) -> tuple[Any, tuple[str, int], Callable[[int], Any], Callable[[], Any]]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    dsn = request.getfixturevalue("postgresql_dsn")
    params = conninfo_to_dict(dsn)
    host = params.pop("hostaddr", None) or params.get("host")
    if host != "127.0.0.1":
        pytest.skip(f"the fault proxy relays to 127.0.0.1 only; PostgreSQL is at {host!r}")
    upstream = ("127.0.0.1", int(params.get("port") or 5432))

    def through(port: int) -> Any:
        # in clear, so that the proxy can read the protocol
        options: dict[str, Any] = {
            **params,
            "host": "127.0.0.1",
            "port": port,
            "sslmode": "disable",
            "gssencmode": "disable",
            "connect_timeout": 10,
        }
        return psycopg.connect(**options)

    return (
        psycopg,
        upstream,
        through,
        lambda: psycopg.connect(dsn, autocommit=True, connect_timeout=10),
    )


def _mysql(
    request: pytest.FixtureRequest,
) -> tuple[Any, tuple[str, int], Callable[[int], Any], Callable[[], Any]]:
    import pymysql

    params = request.getfixturevalue("mysql_params")
    if params["host"] != "127.0.0.1" or "ssl" in params:
        pytest.skip(
            f"the fault proxy relays plain TCP to 127.0.0.1 only; MariaDB is at {params['host']!r}"
        )
    upstream = ("127.0.0.1", int(params["port"]))

    def through(port: int) -> Any:
        return pymysql.connect(
            **{**params, "host": "127.0.0.1", "port": port, "connect_timeout": 10}
        )

    return pymysql, upstream, through, lambda: pymysql.connect(**{**params, "autocommit": True})


@pytest.fixture(
    params=[
        pytest.param("postgresql", marks=pytest.mark.postgresql),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def cut(request: pytest.FixtureRequest) -> Iterator[Cut]:
    driver, upstream, through, direct = (_postgresql if request.param == "postgresql" else _mysql)(
        request
    )
    with FaultProxy(upstream=upstream) as proxy:
        target = Cut(request.param, driver, proxy, lambda: through(proxy.port), direct)
        target.query(f"DROP TABLE IF EXISTS {TABLE}")
        target.query(f"CREATE TABLE {TABLE} (id int primary key, v text)")
        try:
            yield target
        finally:
            proxy.drop_all()  # so that no connection left open by a failed test holds a lock
            wait_until(lambda: proxy.stats().open == 0, timeout=10)
            target.query(f"DROP TABLE IF EXISTS {TABLE}")


def _count(cut: Cut, key: int) -> int:
    return int(cut.query(f"SELECT count(*) FROM {TABLE} WHERE id = {key}")[0][0])


def _assert_discarded(pool: dbpool.Pool[Any]) -> None:
    s = pool.stats()
    assert (s.in_use, s.discarded, s.size) == (0, 1, 0), s
    assert s.created - s.closed == s.size, s


@pytest.mark.parametrize(
    "options", [{}, {"isolation": "SERIALIZABLE", "timeout": 10}], ids=["plain", "deadline"]
)
def test_connection_cut_during_commit_reports_an_unknown_outcome(
    cut: Cut, options: dict[str, Any]
) -> None:
    with dbpool.Pool(cut.through, min_size=0, max_size=1, acquire_timeout=5) as pool:
        with pool.transaction() as tx:  # works through the proxy
            tx.execute(f"INSERT INTO {TABLE} (id, v) VALUES (1, 'before')")
        assert _count(cut, 1) == 1

        cut.proxy.set_mode(Mode.CUT_AFTER_COMMIT)
        with pytest.raises(CommitOutcomeUnknown) as info:
            with pool.transaction(**options) as tx:
                tx.execute(f"INSERT INTO {TABLE} (id, v) VALUES (2, 'cut')")
        assert isinstance(info.value.__cause__, cut.driver.Error), repr(info.value.__cause__)
        assert cut.proxy.stats().commits_cut == 1
        _assert_discarded(pool)

        cut.wait_for_the_server()
        assert _count(cut, 2) == 1, "the server did not commit: the test proves nothing"

        cut.proxy.set_mode(Mode.PASS)
        with pool.transaction() as tx:  # a new connection
            tx.execute(f"INSERT INTO {TABLE} (id, v) VALUES (3, 'after')")
        assert _count(cut, 3) == 1
        s = pool.stats()
        assert (s.in_use, s.created, s.discarded) == (0, 2, 1), s


def test_run_transaction_never_retries_an_unknown_commit_outcome(cut: Cut) -> None:
    calls: list[int] = []

    def fn(tx: dbpool.Transaction[Any]) -> None:
        calls.append(1)
        tx.execute(f"INSERT INTO {TABLE} (id, v) VALUES (%s, 'cut')", (len(calls) + 10,))

    with dbpool.Pool(cut.through, min_size=0, max_size=1, acquire_timeout=5) as pool:
        cut.proxy.set_mode(Mode.CUT_AFTER_COMMIT)
        with pytest.raises(CommitOutcomeUnknown) as info:
            pool.run_transaction(fn, isolation="SERIALIZABLE", retries=5, timeout=10)
        assert calls == [1]
        assert isinstance(info.value.__cause__, cut.driver.Error), repr(info.value.__cause__)
        _assert_discarded(pool)
        cut.wait_for_the_server()
        assert _count(cut, 11) == 1
        assert cut.proxy.stats().commits_cut == 1
