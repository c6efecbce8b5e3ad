"""``conn.released`` tells whether a lease is over, whatever ended it: given back, its
connection closed by ``pool.close()`` past its timeout, or inherited across ``fork()``.  Code
that keeps a lease and takes a new one once the old is over (a thread-local, a module global
made before gunicorn forks) relies on it; a lease the pool ended itself is not reported as
leaked when it is dropped."""

from __future__ import annotations

import gc
import sys
import warnings
from typing import Any

import pytest

import dbpool
from tests.conftest import in_child

pytestmark = pytest.mark.timeout(30)


def test_a_lease_the_pool_closed_past_its_timeout_is_released(sqlite_connect: Any) -> None:
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        kept = pool.connection()
        kept.cursor().execute("SELECT 1")
        pool.close(timeout=0)  # closes the connection under the lease
        assert kept.released
        with pytest.raises(dbpool.LeaseReleased):
            kept.cursor()
        pool.reopen()
        if kept.released:  # what keeping code does: take a new one
            kept = pool.connection()
        assert kept.cursor().execute("SELECT 2").fetchall() == [(2,)]
        kept.close()
    finally:
        pool.close()


def test_iterating_in_a_block_stops_once_the_pool_closed_the_connection(
    sqlite_connect: Any,
) -> None:
    # Inside a block a SQLite cursor is iterated one watched step at a time: each step checks
    # the lease, as fetchone() does, rather than reading from a connection no longer its own.
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        kept = pool.connection()
        step_error: list[Exception] = []
        with pytest.raises(dbpool.LeaseReleased):  # the block's end says so whatever the step did
            with kept.transaction():
                rows = iter(kept.cursor().execute("SELECT 1 UNION ALL SELECT 2"))
                assert next(rows) == (1,)
                pool.close(timeout=0)  # closes the connection under the lease
                try:
                    next(rows)
                except Exception as exc:
                    step_error.append(exc)
                    raise
        assert isinstance(step_error[0], dbpool.LeaseReleased), repr(step_error)
    finally:
        pool.close()


class NoWarning:
    """Fails if a warning is issued in the block, a finaliser's (unraisable) included."""

    def __enter__(self) -> None:
        self._hook = sys.unraisablehook
        self.unraisable: list[Any] = []
        sys.unraisablehook = self.unraisable.append
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc_info: object) -> None:
        self._catch.__exit__(*exc_info)
        sys.unraisablehook = self._hook
        assert not self.caught, [str(w.message) for w in self.caught]
        assert not self.unraisable


def test_dropping_a_lease_the_pool_closed_is_not_a_leak(sqlite_connect: Any) -> None:
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        kept = pool.connection()
        pool.close(timeout=0)
        pool.reopen()
        with NoWarning():
            del kept
            gc.collect()
        with pool.connection(timeout=5):
            pass
        pool.close()  # takes back whatever a finaliser queued
        assert pool.stats().leaked == 0
    finally:
        pool.close()


def test_a_lease_inherited_across_fork_is_released_in_the_child(sqlite_connect: Any) -> None:
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        with pool.connection() as conn:

            def child() -> list[bool]:
                return [conn.released, not conn.released]

            assert in_child(child) == {"result": [True, False]}
            assert not conn.released  # the parent's lease goes on
    finally:
        pool.close()


def test_a_lease_taken_before_reopen_is_not_released_until_given_back(
    sqlite_connect: Any,
) -> None:
    pool = dbpool.Pool(sqlite_connect, min_size=0, max_size=1)
    try:
        kept = pool.connection()
        with pytest.raises(dbpool.PoolTimeout):
            pool.drain(timeout=0)
        pool.reopen()
        assert not kept.released  # still usable: a drain lets leases finish
        assert kept.cursor().execute("SELECT 3").fetchall() == [(3,)]
        kept.close()
        assert kept.released
    finally:
        pool.close()
