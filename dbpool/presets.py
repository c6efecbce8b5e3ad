"""Named sets of pool options for common situations.

Each preset is a function returning the keyword arguments of :class:`dbpool.Pool`, with any
overrides applied::

    pool = dbpool.Pool(connect, **dbpool.presets.production(max_size=20))

A fresh dict is returned on every call; options not named keep ``Pool``'s defaults, and a size
given moves the preset's other size where the two would clash.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["production", "development", "test"]

# Which arguments a preset may override: every keyword of Pool.__init__.
_OPTIONS: frozenset[str] | None = None


def _pool_options() -> frozenset[str]:
    global _OPTIONS
    if _OPTIONS is None:
        from .pool import Pool

        parameters = inspect.signature(Pool.__init__).parameters.values()
        _OPTIONS = frozenset(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
    return _OPTIONS


def _preset(name: str, values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - _pool_options())
    if unknown:
        valid = ", ".join(sorted(_pool_options()))
        raise TypeError(
            f"presets.{name}() got unknown Pool options {', '.join(unknown)}; valid: {valid}"
        )
    options = {**values, **overrides}
    # A size given overrides the preset's other size where the two would clash: with
    # production(max_size=1), Pool() refused the preset's min_size=2, which the caller never gave.
    low, high = options["min_size"], options["max_size"]
    if _is_int(low) and _is_int(high) and low > high:
        if "max_size" in overrides and "min_size" not in overrides:
            options["min_size"] = high
        elif "min_size" in overrides and "max_size" not in overrides:
            options["max_size"] = low
    return options


def _is_int(value: object) -> bool:
    return type(value) is int  # a bool or a float is Pool()'s to refuse, as given


def production(**overrides: Any) -> dict[str, Any]:
    """A long-running service: a couple of warm connections, short waits, bounded queues.

    ``acquire_timeout=10`` fails a request rather than letting it hang behind a saturated pool;
    ``max_waiting=100`` sheds load beyond that many queued callers; ``max_lifetime=1800`` and
    ``idle_timeout=300`` keep connections fresh without churn; ``validate_after=1.0`` pings a
    connection idle for more than a second (one round trip, only after a pause).
    """
    return _preset(
        "production",
        {
            "min_size": 2,
            "max_size": 10,
            "acquire_timeout": 10.0,
            "idle_timeout": 300.0,
            "max_lifetime": 1800.0,
            "validate_after": 1.0,
            "max_waiting": 100,
            "session_reset": None,
            "leak_timeout": None,
        },
        overrides,
    )


def development(**overrides: Any) -> dict[str, Any]:
    """Local development: catch mistakes early at some cost per checkout.

    ``validate_after=0`` pings at every checkout (a round trip each), so a restarted database
    is never noticed late; ``leak_timeout=30`` logs where a lease held too long was taken (a
    stack capture per checkout); ``session_reset="discard"`` resets server session state after
    each used lease (a round trip), so code relying on leftovers fails here, not in production.
    """
    return _preset(
        "development",
        {
            "min_size": 0,
            "max_size": 5,
            "acquire_timeout": 5.0,
            "validate_after": 0.0,
            "leak_timeout": 30.0,
            "session_reset": "discard",
        },
        overrides,
    )


def test(**overrides: Any) -> dict[str, Any]:
    """Test suites: small, strict and quick to fail.

    ``max_size=2`` and ``acquire_timeout=2`` turn two leaked leases, or a lease taken while two
    are held, into a prompt ``PoolTimeout``; no connection expires mid-test;
    ``leak_timeout=5`` names the test that held a lease; reconnects retry quickly while a test
    restarts its server.
    """
    return _preset(
        "test",
        {
            "min_size": 0,
            "max_size": 2,
            "acquire_timeout": 2.0,
            "idle_timeout": None,
            "max_lifetime": None,
            "validate_after": 0.0,
            "leak_timeout": 5.0,
            "session_reset": "discard",
            "reconnect_delay": 0.05,
            "reconnect_max_delay": 0.5,
        },
        overrides,
    )


test.__test__ = False  # type: ignore[attr-defined]  # not a test for pytest to collect
