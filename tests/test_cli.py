"""python -m dbpool: the check and bench commands, and the pure helpers behind them."""

from __future__ import annotations

import dataclasses
import io
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import dbpool
from dbpool import __main__ as cli
from dbpool.url import parse_url
from tests import _urls

CANARY = "canary-secret-51d0"
TIMEOUT = 45  # seconds for any one command; the suite's per-test timeout is 60


def run(*args: str, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dbpool", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fields(stdout: str) -> dict[str, str]:
    """``name: value`` lines of a report as a dict (indented lines keep their name)."""
    result = {}
    for line in stdout.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            result[name] = value.strip()
    return result


STATS_FIELDS = [f.name for f in dataclasses.fields(dbpool.PoolStats)]


# -- bench -----------------------------------------------------------------------------------------


def test_bench_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.sqlite3"
    result = run("bench", url, "--threads", "4", "--max-size", "2", "--seconds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = fields(result.stdout)
    assert report["url"] == url
    assert report["threads"] == "4"
    assert int(report["operations"]) > 0
    assert report["errors"] == "0"
    rate, unit = report["throughput"].split()
    assert float(rate) > 0 and unit == "ops/s"
    for name in ("acquire wait p50", "acquire wait p99", "acquire wait max"):
        value, unit = report[name].split()
        assert float(value) >= 0 and unit == "ms"
    assert float(report["acquire wait p50"].split()[0]) <= float(
        report["acquire wait max"].split()[0]
    )
    for name in STATS_FIELDS:
        assert name in report
    assert (report["size"], report["max_size"], report["min_size"]) == ("2", "2", "2")
    assert report["in_use"] == "0"
    assert int(report["acquired"]) >= int(report["operations"])
    # progress on stderr, as plain lines since stderr is not a terminal
    progress = [line for line in result.stderr.splitlines() if "ops/s" in line]
    assert progress and "\r" not in result.stderr
    assert "in_use=" in progress[0] and "waiting=" in progress[0]
    assert (tmp_path / "b.sqlite3").exists()


def test_bench_default_url_is_a_sqlite_file_in_the_working_directory(tmp_path: Path) -> None:
    result = run("bench", "--threads", "2", "--max-size", "1", "--seconds", "0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert fields(result.stdout)["url"] == "sqlite:///dbpool-bench.sqlite3"
    assert (tmp_path / "dbpool-bench.sqlite3").exists()
    # a second run reuses the table
    again = run("bench", "--threads", "2", "--max-size", "1", "--seconds", "0.5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_bench_cannot_connect(tmp_path: Path) -> None:
    result = run("bench", f"postgresql://u:{CANARY}@127.0.0.1:1/x", "--seconds", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot connect to postgresql://u:***@127.0.0.1:1/x" in result.stderr
    assert "Traceback" not in result.stderr
    assert CANARY not in result.stdout + result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_bench_ctrl_c_still_prints_the_summary(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dbpool",
            "bench",
            "--threads",
            "4",
            "--max-size",
            "2",
            "--seconds",
            "30",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait for the first progress line: the workers are running
            seen.append(line)
            if "ops/s" in line:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(seen) + stderr
    assert "(interrupted)" in fields(stdout)["seconds"]
    assert int(fields(stdout)["operations"]) > 0
    assert "Traceback" not in stderr


def test_bench_progress_on_a_terminal_is_one_updating_line(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, err = io.StringIO(), Terminal()
    code = cli.bench(
        parse_url(f"sqlite:///{tmp_path}/t.sqlite3"),
        threads=2,
        max_size=1,
        seconds=1.5,
        timeout=10,
        out=out,
        err=err,
    )
    assert code == 0
    header, _, progress = err.getvalue().partition("\n")
    assert header.startswith("dbpool bench:")
    assert progress.startswith("\r") and progress.endswith("\n")
    assert progress.count("\n") == 1  # one line, rewritten in place
    assert "throughput" in out.getvalue()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_dbpool_without_extras(tmp_path: Path) -> None:
    # The demo needs sqlite3 only. It installed the test extras, and with them mysqlclient,
    # which builds from source (a compiler, pkg-config and the MySQL client headers): on a
    # fresh machine without those, `make demo` failed before running anything.
    repo = Path(__file__).resolve().parent.parent
    venv = tmp_path / "venv"
    dry_run = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", "demo", f"VENV={venv}"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    installs = [line for line in dry_run.stdout.splitlines() if " install " in line]
    assert installs, dry_run.stdout
    assert all("[" not in line for line in installs), installs
    assert f"{venv}/bin/python -m dbpool bench" in dry_run.stdout
    assert not venv.exists()


# -- check -----------------------------------------------------------------------------------------


def test_check_sqlite(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "c.sqlite3").close()
    url = f"sqlite:///{tmp_path}/c.sqlite3"
    result = run("check", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = fields(result.stdout)
    assert report["url"] == url
    assert report["driver"] == "sqlite3 (standard library)"
    assert report["server"].startswith("SQLite 3.")
    assert report["ping"].endswith(" ms") and report["connect"].endswith(" ms")
    stats = dict(pair.split("=", 1) for pair in report["stats"].split())
    assert list(stats) == STATS_FIELDS
    assert (stats["size"], stats["max_size"], stats["in_use"]) == ("1", "1", "0")


def test_check_sqlite_missing_file_is_not_created(tmp_path: Path) -> None:
    result = run("check", "sqlite:///typo.sqlite3", cwd=tmp_path)
    assert result.returncode == 1
    assert "no such file" in result.stderr
    assert not (tmp_path / "typo.sqlite3").exists()


def test_check_unreachable(tmp_path: Path) -> None:
    result = run("check", f"postgresql://u:{CANARY}@127.0.0.1:1/x", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot connect to postgresql://u:***@127.0.0.1:1/x" in result.stderr
    assert "Traceback" not in result.stderr
    assert CANARY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (f"postgresql://u:{CANARY}@db:port/x", "port must be a number"),
        (f"oracle://u:{CANARY}@db/x", "unsupported URL scheme"),
        (f"postgresql://u:{CANARY}@127.0.0.1:1/x?no_such_option=1", "'no_such_option'"),
        # a '?' unescaped in the password, digits before it: the rest read as a query
        (f"postgresql://u:2024?{CANARY}=1@127.0.0.1:1/x", "percent-encode"),
        # an '&' unescaped in a password given as a parameter: the rest read as a parameter
        (f"postgresql://u@127.0.0.1:1/x?password=Pw&{CANARY}=1", "write it as %26"),
        # PyMySQL failed at the connect: "'NoneType' object has no attribute 'encoding'"
        (f"mysql://u:{CANARY}@127.0.0.1:1/x?charset=utf-8", "such as utf8mb4"),
    ],
)
def test_check_bad_url(tmp_path: Path, url: str, says: str) -> None:
    result = run("check", url, cwd=tmp_path)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert CANARY not in result.stdout + result.stderr


def test_usage_errors(tmp_path: Path) -> None:
    assert run(cwd=tmp_path).returncode == 2
    assert run("bench", "--threads", "0", cwd=tmp_path).returncode == 2
    assert run("bench", "--seconds", "-1", cwd=tmp_path).returncode == 2
    assert run("check", cwd=tmp_path).returncode == 2
    help_text = run("bench", "--help", cwd=tmp_path)
    assert help_text.returncode == 0 and "--max-size" in help_text.stdout


def test_check_help_says_what_the_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser(["check", "--help"]).parse_args(["check", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    assert "ping the database" in help_text and "the server's version" in help_text
    assert "URL database URL" in help_text  # the argument is described, not just named


@pytest.mark.parametrize("command", ["check", "bench"])
def test_a_timeout_above_a_day_is_a_usage_error(tmp_path: Path, command: str) -> None:
    # PyMySQL refuses a connect timeout over a year, and only when it connects: that was
    # "cannot connect" (exit 1) rather than a usage error
    url = "mysql://root@127.0.0.1:1/test"
    result = run(command, url, "--timeout", "1e8", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--timeout: must be at most 86400 seconds" in result.stderr
    assert run(command, url, "--timeout", "86401", cwd=tmp_path).returncode == 2


def test_check_postgresql(tmp_path: Path, postgresql_dsn: str) -> None:
    url = _urls.postgresql_url(postgresql_dsn, password=CANARY)
    result = run("check", url, cwd=tmp_path)
    # trust authentication ignores the password; password authentication refuses it
    assert CANARY not in result.stdout + result.stderr
    assert result.returncode in (0, 1), result.stderr
    if result.returncode == 0:
        report = fields(result.stdout)
        assert report["server"].startswith("PostgreSQL ")
        assert report["driver"].startswith("psycopg ")
        assert ":***@" in report["url"]


def test_check_mysql(tmp_path: Path, mysql_params: dict[str, Any]) -> None:
    result = run("check", _urls.mysql_url(mysql_params), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = fields(result.stdout)
    assert report["driver"].startswith("pymysql ")
    assert report["server"][0].isdigit()  # e.g. 10.11.6-MariaDB-0+deb12u1


def test_check_mysql_wrong_password(tmp_path: Path, mysql_params: dict[str, Any]) -> None:
    result = run("check", _urls.mysql_url(mysql_params, password=CANARY), cwd=tmp_path)
    assert CANARY not in result.stdout + result.stderr
    if result.returncode != 0:  # the account checks passwords
        assert result.returncode == 1
        assert "cannot connect to mysql://" in result.stderr
        assert "Traceback" not in result.stderr


# -- pure helpers ----------------------------------------------------------------------------------


def test_percentile() -> None:
    values = [float(i) for i in range(1, 101)]
    assert cli.percentile(values, 50) == 50.0
    assert cli.percentile(values, 99) == 99.0
    assert cli.percentile(values, 100) == 100.0
    assert cli.percentile(values, 0) == 1.0
    assert cli.percentile([7.0], 99) == 7.0
    assert cli.percentile([1.0, 2.0], 50) == 1.0
    assert math.isnan(cli.percentile([], 50))
    with pytest.raises(ValueError):
        cli.percentile(values, 101)


def test_format_ms() -> None:
    assert cli.format_ms(0.0123) == "12.300 ms"
    assert cli.format_ms(0) == "0.000 ms"
    assert cli.format_ms(math.nan) == "n/a"


def stats(**changes: Any) -> dbpool.PoolStats:
    required = [
        f.name
        for f in dataclasses.fields(dbpool.PoolStats)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    defaults = dbpool.PoolStats(**dict.fromkeys(required, 0))
    base = {name: getattr(defaults, name) for name in STATS_FIELDS}
    base.update(name="bench", min_size=2, max_size=2, size=2, idle=2)
    base.update(changes)
    return dbpool.PoolStats(**base)


def test_format_stats_lists_every_field() -> None:
    pairs = [pair.split("=", 1) for pair in cli.format_stats(stats()).split()]
    assert [name for name, _ in pairs] == STATS_FIELDS
    shown = dict(pairs)
    assert (shown["name"], shown["size"], shown["wait_time"]) == ("bench", "2", "0")
    assert shown["wait_buckets"].split(",")[-1] == "inf"
    assert shown["wait_histogram"] == ",".join(["0"] * len(dbpool.WAIT_BUCKETS))
    assert shown["discards"] == "-"


def test_format_stats_shows_the_discards_that_occurred() -> None:
    discards = dict.fromkeys((reason.value for reason in dbpool.DiscardReason), 0)
    discards.update(broken=2, idle=1)
    shown = dict(pair.split("=", 1) for pair in cli.format_stats(stats(discards=discards)).split())
    assert shown["discards"] == "broken:2,idle:1"


def test_bench_report() -> None:
    lines = cli.bench_report(
        url=parse_url(f"postgresql://u:{CANARY}@h/d"),
        threads=8,
        elapsed=2.0,
        ops=1000,
        errors=Counter({"PoolTimeout": 3}),
        waits=[0.001, 0.002, 0.003, 0.010],
        stats=stats(acquired=1000),
        interrupted=False,
    )
    text = "\n".join(lines)
    assert CANARY not in text
    report = fields(text)
    assert report["url"] == "postgresql://u:***@h/d"
    assert report["throughput"] == "500.0 ops/s"
    assert report["errors"] == "3" and report["PoolTimeout"] == "3"
    assert report["acquire wait p50"] == "2.000 ms"
    assert report["acquire wait p99"] == "10.000 ms"
    assert report["acquire wait max"] == "10.000 ms"
    assert report["acquired"] == "1000"


def test_bench_report_without_samples() -> None:
    lines = cli.bench_report(
        url=parse_url("sqlite:///x.sqlite3"),
        threads=1,
        elapsed=0.0,
        ops=0,
        errors=Counter(),
        waits=[],
        stats=stats(),
        interrupted=True,
    )
    report = fields("\n".join(lines))
    assert report["acquire wait p99"] == "n/a"
    assert report["throughput"] == "0.0 ops/s"
    assert "(interrupted)" in report["seconds"]


@pytest.mark.parametrize(
    ("paramstyle", "marker", "params"),
    [
        ("qmark", "?", (5,)),
        ("format", "%s", (5,)),
        ("pyformat", "%s", (5,)),
        ("numeric", ":1", (5,)),
        ("named", ":id", {"id": 5}),
    ],
)
def test_placeholders(paramstyle: str, marker: str, params: Any) -> None:
    assert cli.placeholder(paramstyle) == marker
    assert cli.bench_params(paramstyle, 5) == params


def test_with_timeout_adds_the_schemes_parameter_unless_given() -> None:
    assert cli.with_timeout(parse_url("postgresql://h/d"), 2.5).query == (("connect_timeout", "3"),)
    assert cli.with_timeout(parse_url("mysql://h/d"), 2.5).query == (("connect_timeout", "2.5"),)
    assert cli.with_timeout(parse_url("mssql://h/d"), 10).query == (("login_timeout", "10"),)
    assert cli.with_timeout(parse_url("sqlite:///x"), 30).query == (("timeout", "30"),)
    given = parse_url("postgresql://h/d?connect_timeout=7")
    assert cli.with_timeout(given, 2) is given


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf, 1e8])
def test_with_timeout_refuses_what_a_driver_would_refuse_when_connecting(seconds: float) -> None:
    with pytest.raises(ValueError, match="at most 86400 seconds"):
        cli.with_timeout(parse_url("mysql://h/d"), seconds)


def test_describe_masks_and_includes_the_cause() -> None:
    url = parse_url(f"postgresql://u:{CANARY}@h/d")
    try:
        try:
            raise OSError(f"refused for {CANARY}")
        except OSError as cause:
            raise dbpool.PoolTimeout("no connection within 1 s") from cause
    except dbpool.PoolTimeout as exc:
        text = cli.describe(exc, url)
    assert text == "PoolTimeout: no connection within 1 s (caused by OSError: refused for ***)"
