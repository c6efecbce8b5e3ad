"""A transaction block interrupted as it begins leaves nothing of its deadline behind.

KeyboardInterrupt (or SystemExit) raised while BEGIN runs ends the block before it started: the
lease stays with its borrower, and refuses further use (BEGIN's reply may be left unread); the
watchdog must not later cut off the connection for a deadline that belonged to the block.
"""

from __future__ import annotations

from typing import Any

import pytest

import dbpool

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_begin_leaves_no_cut_off_armed(
    make_pool: Any, monkeypatch: pytest.MonkeyPatch, interruption: type[BaseException]
) -> None:
    pool = make_pool(max_size=1)
    with pool.connection() as conn:
        dialect = conn._slot.dialect
        severed: list[Any] = []

        def begin(raw: Any, isolation: Any, readonly: bool) -> None:
            raise interruption()

        monkeypatch.setattr(dialect, "begin", begin)
        monkeypatch.setattr(dialect, "sever", severed.append)
        tx = conn.transaction(timeout=30)
        with pytest.raises(interruption):
            with tx:
                pass
        # What the watchdog runs once the deadline and its grace have passed, with the
        # connection in a call (as the interrupted BEGIN left it marked)
        assert tx._on_overdue() is None
        assert severed == []
        with pytest.raises(dbpool.ConnectionUnusable):
            conn.cursor()
