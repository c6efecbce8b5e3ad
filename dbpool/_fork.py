"""Fork safety: a child process drops the connections it inherited, without closing them.

Closing an inherited connection would send a goodbye on a socket the parent still uses and end
the parent's session.  The child keeps the inherited driver objects referenced for the rest of
its life, so that their finalizers never run, after each dialect has made them harmless.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dialects import Dialect
    from .pool import Pool

logger = logging.getLogger("dbpool")

_pools: weakref.WeakSet[Pool[Any]] = weakref.WeakSet()
_inherited: list[Any] = []


def register(pool: Pool[Any]) -> None:
    _pools.add(pool)


def keep_forever(dialect: Dialect, raw: Any) -> None:
    try:
        dialect.detach_after_fork(raw)
    except Exception as exc:  # the reference below still keeps it from being finalized
        logger.debug("detaching an inherited connection failed: %r", exc)
    _inherited.append(raw)


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
