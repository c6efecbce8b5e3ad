"""Edge cases of ``python -m dbpool``: check on a SQLite file that is no database, and bench when
its threads cannot all be started (the system refuses one, or Ctrl-C comes meanwhile)."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dbpool
from dbpool import __main__ as cli
from dbpool.url import parse_url
from tests import fakedb
from tests.conftest import wait_until


def _bench_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, cli._Worker) and t.is_alive()]


@pytest.fixture
def stop_stray_workers() -> Iterator[None]:
    """Whatever a test shows, stop bench workers it leaves running (they are daemons)."""
    yield
    for worker in _bench_threads():
        assert isinstance(worker, cli._Worker)
        worker.stop.set()
        worker.join(2.0)


def test_check_sqlite_refuses_a_file_that_is_not_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `select 1` never reads the file, so a text file (a typo'd path to notes, a config file,
    # an encrypted database) passes the check; sqlite3 says "file is not a database" as soon
    # as anything reads the schema, and bench then fails on the same URL.
    (tmp_path / "notes.txt").write_text("not a database\n" * 20)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["check", "sqlite:///notes.txt"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_FAILED, out
    assert "cannot connect to sqlite:///notes.txt" in err


def _bench_with_the_third_start_raising(
    exc: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[threading.Thread]]:
    """Run a small bench whose third thread.start() raises ``exc``; its exit code, and the
    workers still running once it returned (it joins those it started)."""
    real_start = cli._Worker.start
    started = []

    def start(self: Any) -> None:
        if len(started) == 2:
            raise exc
        started.append(self)
        real_start(self)

    monkeypatch.setattr(cli._Worker, "start", start)
    argv = ["bench", f"sqlite:///{tmp_path}/b.sqlite3", "--threads", "4", "--max-size", "1"]
    try:
        code = cli.main([*argv, "--seconds", "0.3", "--timeout", "2"])
    finally:
        leftover = _bench_threads()
    return code, leftover


def test_bench_thread_start_failure_is_an_error_not_a_traceback_and_stops_the_workers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stop_stray_workers: None,
) -> None:
    # `--threads N` beyond what the system allows (ulimit -v / -u, threads-max): CPython's
    # thread.start() raises RuntimeError("can't start new thread").
    refused = RuntimeError("can't start new thread")
    try:
        code, leftover = _bench_with_the_third_start_raising(refused, tmp_path, monkeypatch)
    except RuntimeError as exc:  # the traceback `python -m dbpool` prints
        pytest.fail(f"bench raised {exc!r} instead of reporting it")
    assert code == cli.EXIT_FAILED
    assert "can't start new thread" in capsys.readouterr().err
    assert not leftover, f"workers still running after bench returned: {leftover}"


def test_bench_ctrl_c_while_starting_the_threads_stops_those_started(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stop_stray_workers: None,
) -> None:
    # Ctrl-C right after the "dbpool bench: ..." line, while --threads N are being started
    # (a visible window with many threads on a busy machine).
    code, leftover = _bench_with_the_third_start_raising(KeyboardInterrupt(), tmp_path, monkeypatch)
    capsys.readouterr()
    assert code in (cli.EXIT_OK, cli.EXIT_INTERRUPTED)
    assert not leftover, f"workers still running after bench returned: {leftover}"


def test_output_to_a_closed_pipe_is_no_traceback(tmp_path: Path) -> None:
    # `python -m dbpool check URL | head -0`: the reader is gone before the report is written.
    sqlite3.connect(tmp_path / "app.sqlite3").close()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dbpool", "check", f"sqlite:///{tmp_path}/app.sqlite3"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == cli.EXIT_FAILED, (done.returncode, done.stderr)


def test_bench_that_completes_nothing_without_errors_does_not_say_every_operation_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Workers that never get to run one operation (a run cut short, a machine too loaded to
    # schedule them) failed nothing: the message says what happened.
    monkeypatch.setattr(cli._Worker, "run", lambda self: None)
    argv = ["bench", f"sqlite:///{tmp_path}/b.sqlite3", "--threads", "2", "--max-size", "1"]
    code = cli.main([*argv, "--seconds", "0.1", "--timeout", "2"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED
    assert "no operation completed" in err, err
    assert "every operation failed" not in err, err


@pytest.mark.parametrize("threads", [str(cli.MAX_THREADS + 1), "100000000"])
def test_bench_refuses_more_threads_than_it_can_run_before_making_any(
    threads: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli, "_Worker", None)  # any worker made would fail the test
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", f"sqlite:///{tmp_path}/b.sqlite3", "--threads", threads])
    assert info.value.code == cli.EXIT_USAGE
    assert f"at most {cli.MAX_THREADS}" in capsys.readouterr().err


@pytest.mark.parametrize("max_size", [str(cli.MAX_SIZE + 1), "100000"])
def test_bench_refuses_a_pool_larger_than_it_can_open_before_connecting(
    max_size: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--max-size 100000 ran out of file descriptors opening the pool, then said it could not
    connect; it is a usage error, as too many --threads is."""
    monkeypatch.setattr(cli, "create_pool", None)  # any pool made would fail the test
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", f"sqlite:///{tmp_path}/b.sqlite3", "--max-size", max_size])
    assert info.value.code == cli.EXIT_USAGE
    assert f"--max-size: at most {cli.MAX_SIZE}, got {max_size}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_and_bench_read_rows_made_as_dicts(fake_server: fakedb.Server) -> None:
    """``mssql://...?as_dict=true`` makes pymssql's rows dicts: the version and the bench
    table's ids are read from them too (a dict row has no ``[0]``), and the version's column
    is named (pymssql refuses dicts for a column without a name)."""
    url = parse_url("mssql://sa@db.example/app?as_dict=true")
    fake_server.set_result("select @@version as version", [("Microsoft SQL Server 2022\nx",)])
    fake_server.set_result(f"select id from {cli.BENCH_TABLE}", [(1,), (2,)], columns=("id",))
    conn = fake_server.connect_mssql()
    conn.as_dict = True
    try:
        assert cli._server_version(url, sqlite3, conn) == "Microsoft SQL Server 2022"
        cli._prepare(url, "pyformat", conn)
    finally:
        conn.close()
    # ids 1 and 2 were read as present: the rest were inserted, in one batch
    assert [s for s in fake_server.statements() if s.startswith("insert")] == [
        f"insert into {cli.BENCH_TABLE} (id, n) values (%s, 0)"
    ]


@pytest.mark.parametrize("command", ["check", "bench"])
def test_a_connect_given_up_on_is_not_waited_for(
    command: str,
    fake_server: fakedb.Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A server that accepts and never answers (PyMySQL's handshake has no timeout): past
    # --timeout, or on Ctrl-C, closing the pool waited 5 s more for that connect.
    monkeypatch.setattr(cli, "load_driver", lambda url: fakedb)
    monkeypatch.setattr(
        cli, "create_pool", lambda url, **options: dbpool.Pool(fake_server.connect, **options)
    )
    gate = fake_server.block("connect", timeout=3.0)  # gives up before close()'s 5 s
    try:
        code = cli.main([command, "mysql://root@db.example/app", "--timeout", "0.2"])
        still_held = gate.inside
    finally:
        gate.release()
    assert code == cli.EXIT_FAILED
    assert "PoolTimeout" in capsys.readouterr().err
    assert still_held == 1, "the command waited for the connect it had given up on"
    # the connect ends on its own, and its connection is closed: the pool is closed
    wait_until(lambda: fake_server.connects == 1 and not fake_server.open_connections)


def test_bench_time_leaves_out_the_wait_for_a_thread_that_never_finished(
    fake_server: fakedb.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server went away mid-run: a thread is stuck in a statement (or waits for a
    # connection up to --timeout). The wait for it at the end, up to 5 s, was counted as run
    # time, and the throughput divided by it. A fake clock makes the numbers exact.
    clock = [0.0]
    monkeypatch.setattr(cli, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(cli, "JOIN_GRACE", 0.1, raising=False)
    gate = fake_server.block("execute")
    out, err = io.StringIO(), io.StringIO()
    codes = []
    with dbpool.Pool(fake_server.connect, max_size=1) as pool:
        run = threading.Thread(
            target=lambda: codes.append(
                cli._run(
                    parse_url("mysql://root@db.example/app"),
                    pool,
                    "format",
                    threads=1,
                    seconds=0.05,
                    out=out,
                    err=err,
                )
            )
        )
        run.start()
        try:
            assert gate.entered.wait(10)
            (worker,) = _bench_threads()
            assert isinstance(worker, cli._Worker)
            clock[0] = 0.05  # the run's end
            assert worker.stop.wait(10)
            clock[0] = 100.0  # and a long wait for the stuck thread
            run.join(10)
        finally:
            gate.release()
        wait_until(lambda: not worker.is_alive())
    assert not run.is_alive()
    assert codes == [cli.EXIT_FAILED]  # no operation completed
    report = dict(line.strip().split(":", 1) for line in out.getvalue().splitlines() if ":" in line)
    assert report["seconds"].strip() == "0.05", out.getvalue()
    assert "1 thread still busy" in err.getvalue(), err.getvalue()
