"""Which idle connections idle_timeout closes when it may close only some of them.

Time is moved with a fake clock (the pool module's ``monotonic``, shifted by the test), the
interleaving is forced with a fakedb gate, and the test waits on conditions, never on sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests import fakedb
from tests.conftest import Caller, FakeClock, wait_until

pytestmark = pytest.mark.timeout(60)


def test_idle_reaping_closes_the_least_recently_used_after_a_check(
    make_pool: Any, server: fakedb.Server, clock: FakeClock
) -> None:
    """docs/behaviour.rst: idle connections past idle_timeout are closed "least recently used
    first, never going below min_size".  check() takes the idle connections out to ping them
    and puts them back on top of the idle stack, above a connection returned meanwhile, which
    was used more recently than they were: the reaper, which walked the stack from the bottom,
    then closed that one and kept an older one."""
    pool = make_pool(min_size=1, max_size=3, idle_timeout=10.0, validate_after=None)
    first, second, third = pool.connection(), pool.connection(), pool.connection()
    recent = third.raw
    first.close()
    second.close()  # both last used now
    clock.advance(1)
    gate = server.block("ping")  # check()'s first ping
    checker = Caller(lambda: pool.check(timeout=5), name="check")
    try:
        assert gate.entered.wait(5)
        third.close()  # used 1 s later than the other two, returned while they are pinged
    finally:
        gate.release()
    assert checker.outcome() is None and checker.value == 0
    clock.advance(20)  # all three idle past idle_timeout; min_size keeps one
    pool._reaper_wakeup.set()
    wait_until(lambda: pool.stats().discards["idle"] == 2)
    assert not recent.closed, "kept a connection used earlier than the one it closed"
