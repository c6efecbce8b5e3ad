"""Named sets of pool options for common situations.

Each preset is a function returning the keyword arguments of :class:`dbpool.Pool`, with any
overrides applied::

    pool = dbpool.Pool(connect, **dbpool.presets.production(max_size=20))

A fresh dict is returned on every call; options not named keep ``Pool``'s defaults, and a size
(or reconnect delay) given moves the preset's other one where the two would clash: only where
the preset sets both (the reconnect delays, in ``test()`` only), since ``Pool``'s own default
is not the preset's to move.
"""

from __future__ import annotations

from typing import Any, Callable

from ._options import unknown_options

__all__ = ["production", "development", "test"]


def _pool_options() -> frozenset[str]:
    """Which arguments a preset may override: every option of ``Pool()``."""
    from .pool import POOL_OPTIONS  # (dbpool imports this module before .pool)

    return POOL_OPTIONS


def _preset(name: str, values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - _pool_options()
    if unknown:
        raise TypeError(unknown_options(unknown, _pool_options(), f"presets.{name}()"))
    options = {**values, **overrides}
    # A bound given overrides the preset's other bound where the two would clash: with
    # production(max_size=1), Pool() refused the preset's min_size=2, and with
    # test(reconnect_delay=1) the preset's reconnect_max_delay=0.5, which the caller never gave.
    _move_other_bound(options, overrides, "min_size", "max_size", _is_int)
    _move_other_bound(options, overrides, "reconnect_delay", "reconnect_max_delay", _is_number)
    return options


def _move_other_bound(
    options: dict[str, Any],
    overrides: dict[str, Any],
    low_name: str,
    high_name: str,
    valid: Callable[[object], bool],
) -> None:
    """Where ``options[low_name]`` exceeds ``options[high_name]`` and only one of them was
    given, set the preset's one to the given one.  Both given, or one the preset does not set
    (``Pool``'s default then), are left for ``Pool()`` to check, as the caller wrote them."""
    if low_name not in options or high_name not in options:
        return
    low, high = options[low_name], options[high_name]
    if not (valid(low) and valid(high) and low > high):
        return
    if high_name in overrides and low_name not in overrides:
        options[low_name] = high
    elif low_name in overrides and high_name not in overrides:
        options[high_name] = low


def _is_int(value: object) -> bool:
    return type(value) is int  # a bool or a float is Pool()'s to refuse, as given


def _is_number(value: object) -> bool:
    # A bool, a str or NaN is Pool()'s to refuse, as given (NaN compares false anyway).
    return type(value) in (int, float)


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
