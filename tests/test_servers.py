"""The fixtures reach the real servers, and their helpers do what the pool tests rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_ENV, REQUIRE_ENV, Backend, mysql_kwargs


def query(conn: Any, sql: str, params: Any = ()) -> list[Any]:
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []
    finally:
        cur.close()


def test_postgresql_reachable(pg_connect: Any) -> None:
    conn = pg_connect()
    assert query(conn, "select current_database(), current_user") == [("test", "postgres")]
    assert conn.info.backend_pid > 0


def test_mysql_reachable(mysql_connect: Any) -> None:
    conn = mysql_connect()
    assert query(conn, "select database()") == [("test",)]
    assert "mariadb" in conn.get_server_info().lower()


def test_kill_breaks_the_session_and_a_new_one_works(db: Backend) -> None:
    victim = db.connect()
    assert query(victim, "select 1") == [(1,)]
    victim.rollback()
    old_id = db.backend_id(victim)

    db.kill(victim)

    with pytest.raises(db.driver.Error):
        query(victim, "select 1")
    fresh = db.connect()
    assert query(fresh, "select 1") == [(1,)]
    assert db.backend_id(fresh) != old_id


def test_fresh_table_isolates_uncommitted_rows(db: Backend) -> None:
    table = db.fresh_table("dbpool_fixture_check")
    writer, reader = db.connect(), db.connect()
    query(
        writer, f"insert into {table} (id, v) values ({db.placeholder}, {db.placeholder})", (1, "a")
    )
    assert query(reader, f"select count(*) from {table}") == [(0,)]
    reader.rollback()
    writer.commit()
    assert query(reader, f"select v from {table} where id = {db.placeholder}", (1,)) == [("a",)]
    reader.rollback()
    assert db.fresh_table(table) == table  # made afresh: empty again
    assert query(reader, f"select count(*) from {table}") == [(0,)]


def test_mysql_dsn_parsing() -> None:
    kwargs = mysql_kwargs(
        "mysql://app%40x:p%3Ass@db.example:3307/shop?charset=utf8mb4&read_timeout=7"
    )
    assert kwargs == {
        "host": "db.example",
        "port": 3307,
        "user": "app@x",
        "password": "p:ss",
        "database": "shop",
        "charset": "utf8mb4",
        "read_timeout": 7,
        "connect_timeout": 10,
    }
    assert mysql_kwargs("mysql://root@127.0.0.1/")["password"] == ""
    with pytest.raises(ValueError):
        mysql_kwargs("postgresql://x@y/z")


@pytest.mark.parametrize("required, outcome", [("0", "1 skipped"), ("1", "1 error")])
def test_unreachable_server_skips_or_fails(required: str, outcome: str) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        PG_ENV: "host=127.0.0.1 port=1 dbname=test user=postgres connect_timeout=2",
        REQUIRE_ENV: required,
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_servers.py::test_postgresql_reachable",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    assert (result.returncode == 0) == (required == "0")
