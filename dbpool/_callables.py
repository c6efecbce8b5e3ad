"""Checks on the callables a pool is given, made when it is given them: a mistake shows at
``Pool(...)`` or ``add_listener()``, not as a connect error or a silent discard later on."""

from __future__ import annotations

import functools
import inspect
from typing import Any


def check_callable(what: str, fn: Any, arguments: int, expected: str) -> None:
    """Raise TypeError unless ``fn`` is a plain (not async) callable that can be called with
    ``arguments`` positional arguments.  ``expected`` says what it should be, for the message:
    "a callable taking the driver's connection"."""
    if not callable(fn):  # by its type only: a DSN given by mistake may hold a password
        raise TypeError(f"{what} must be {expected}, got {type(fn)!r}")
    name = callable_name(fn)
    try:
        is_async = inspect.iscoroutinefunction(fn)
    except Exception:  # an object posing as a function (a Mock with a function as its spec)
        is_async = False
    if is_async:
        raise TypeError(
            f"{what} must be a plain function, but {name} is an async function "
            "(the pool would never await it): dbpool is synchronous"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some built-ins): taken on trust
        return
    try:
        signature.bind(*[None] * arguments)
    except TypeError as exc:
        # A decorator's wrapper (functools.wraps) shows the signature of the function it wraps,
        # which may take an argument the wrapper supplies: the wrapper's own decides.
        try:
            inspect.signature(fn, follow_wrapped=False).bind(*[None] * arguments)
        except (TypeError, ValueError):
            raise TypeError(
                f"{what} must be {expected}, but {name} cannot be called so: {exc}"
            ) from None


def callable_name(fn: Any) -> str:
    """What ``fn`` is called, never its repr: a functools.partial's shows its arguments."""
    if isinstance(fn, functools.partial):
        return f"a functools.partial of {callable_name(fn.func)}"
    return str(getattr(fn, "__qualname__", None) or f"a {type(fn).__qualname__} object")


def is_own_generator(result: Any, fn: Any) -> bool:
    """Whether ``result``, what calling ``fn`` returned, is a generator (or async generator)
    of ``fn``'s own body: ``fn`` is a generator function behind a decorator that passes its
    result on (``functools.wraps``) or a partial, or an object whose ``__call__`` is one,
    which the look at ``fn`` before the call cannot tell.  A generator that ``fn`` made of
    rows it read (a generator expression, say) runs another body, and is not one."""
    if inspect.isgenerator(result):
        code = result.gi_code
    elif inspect.isasyncgen(result):
        code = result.ag_code
    else:
        return False
    while isinstance(fn, functools.partial):
        fn = fn.func
    call = inspect.getattr_static(type(fn), "__call__", None)
    if isinstance(call, (staticmethod, classmethod)):
        call = call.__func__
    for candidate in (fn, call):
        try:
            candidate = inspect.unwrap(candidate)
        except ValueError:  # a cycle of __wrapped__
            pass
        if getattr(candidate, "__code__", None) is code:
            return True
    return False
