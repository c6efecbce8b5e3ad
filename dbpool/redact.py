"""Keeping passwords out of errors and log lines.

A pool made from a URL knows its secrets (:meth:`DatabaseURL._secrets`).  A pool given a
connect callable learns what it can from it with :func:`secrets_in`: the secret-looking
keyword arguments of a ``functools.partial``, and the passwords written into the connection
strings it holds, whether as ``password=...`` or in a URL.  Errors from connecting are then
scrubbed in place (:func:`scrub_exception`), keeping their class, before anything quotes them;
:func:`mask_credentials` masks what still looks like a password in text the pool writes.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

MASK = "***"

_SECRET_KEY_RE = re.compile(r"pass|secret|token|scram_", re.IGNORECASE)

# password=... in text, quoted or not; user:password@ in a URL.
_KEY = r"(?P<key>\b[\w-]*(?:pass|pwd|secret|token)[\w-]*\s*=\s*)"
_QUOTED = r"'(?:[^'\\]|\\.)*'"
_KEYWORD_SECRET_RE = re.compile(_KEY + rf"""(?P<value>{_QUOTED}|[^\s'",;]+)""", re.IGNORECASE)
# In a connection string, the bare words after an unquoted password are its rest, which the
# driver refuses to parse (and quotes): "password=two words" reads as "words" lacking an "=".
_CONNINFO_SECRET_RE = re.compile(
    _KEY + rf"""(?P<value>{_QUOTED}|[^\s'"]\S*(?:\s+[^\s=]+(?=\s|$))*)""", re.IGNORECASE
)
_URL_PASSWORD_RE = re.compile(
    r"(?P<key>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<value>[^\s@/]+)(?=@)"
)

# A piece of a password shorter than this is not searched for on its own (see secrets_in).
_MIN_PIECE = 4


def is_secret_key(key: str) -> bool:
    """Whether a parameter's value is masked like the password (sslpassword, token, ...)."""
    return bool(_SECRET_KEY_RE.search(key))


def mask_credentials(text: str) -> str:
    """``text`` with what looks like a password (``password=...``, ``user:password@`` in a
    URL) shown as ``***``."""
    text = _KEYWORD_SECRET_RE.sub(lambda m: m["key"] + MASK, text)
    return _URL_PASSWORD_RE.sub(lambda m: m["key"] + MASK, text)


def secrets_in(connect: object) -> tuple[str, ...]:
    """The passwords a connect callable holds where the pool can see them, longest first.

    Looked at: the arguments of a ``functools.partial`` (nested ones too), the defaults,
    closure and string constants of a function or lambda, and the module-level strings it
    names (``lambda: psycopg.connect(dsn)``).  A secret-looking keyword argument is a secret
    as a whole; a string is searched for ``password=...`` and ``user:password@``.  Each
    whitespace-separated piece of a secret counts too: a driver that cannot parse a
    connection string quotes the piece it stopped at.
    """
    found: set[str] = set()
    for key, value in _candidates(connect):
        if not isinstance(value, str) or not value:
            continue
        if key is not None and is_secret_key(key):
            _add_secret(found, value)
        for match in _CONNINFO_SECRET_RE.finditer(value):
            _add_secret(found, _unquote_keyword_value(match["value"]))
        for match in _URL_PASSWORD_RE.finditer(value):
            _add_secret(found, unquote(match["value"]))
    # longest first, so that no shorter secret splits a longer one before it is replaced
    return tuple(sorted(found, key=len, reverse=True))


def _candidates(connect: object) -> Iterable[tuple[str | None, object]]:
    """(keyword or None, value) pairs a connect callable holds."""
    seen: set[int] = set()
    pending = [connect]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, functools.partial):
            pending.append(current.func)
            yield from ((None, arg) for arg in current.args)
            yield from current.keywords.items()
            continue
        if isinstance(current, types.MethodType):
            pending.append(current.__func__)
            continue
        if not isinstance(current, types.FunctionType):
            continue  # nothing else is looked into: an attribute read may run code
        code = current.__code__
        yield from ((None, const) for const in code.co_consts)
        yield from ((None, value) for value in current.__defaults__ or ())
        yield from (current.__kwdefaults__ or {}).items()
        for cell in current.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            pending.append(value)
            yield None, value
        for name in code.co_names:
            value = current.__globals__.get(name)
            if isinstance(value, str):
                yield name, value


def _add_secret(found: set[str], value: str) -> None:
    pieces = [value, *(piece for piece in value.split() if len(piece) >= _MIN_PIECE)]
    for piece in pieces:
        # as given, and as it may have been written in a URL
        found.update((piece, quote(piece, safe=""), quote(piece)))


def _unquote_keyword_value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def scrub_exception(exc: BaseException, secrets: tuple[str, ...]) -> None:
    """Scrub ``exc`` and the exceptions chained to it in place, keeping their classes."""
    seen = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        try:
            current.args = _scrub_value(current.args, secrets)
        except (AttributeError, TypeError):
            pass
        if isinstance(current, OSError):
            for attr in ("strerror", "filename", "filename2"):
                _scrub_attribute(current, attr, secrets)
        for attr in list(getattr(current, "__dict__", {})):
            _scrub_attribute(current, attr, secrets)
        pending.extend((current.__cause__, current.__context__))


def _scrub_value(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` with each secret replaced by ``***``: str, bytes, and tuples/lists of them."""
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, (bytes, bytearray)):
        for secret in secrets:
            if secret:
                value = value.replace(secret.encode("utf-8", "replace"), MASK.encode())
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_scrub_value(item, secrets) for item in value)
    return value


def _shows_secret(text: str, secrets: Iterable[str]) -> bool:
    """Whether ``text`` (a repr) shows a secret, as text or as escaped bytes."""
    return any(
        secret and (secret in text or repr(secret.encode("utf-8", "replace"))[2:-1] in text)
        for secret in secrets
    )


def _scrub_attribute(obj: object, attr: str, secrets: tuple[str, ...]) -> None:
    try:
        value = getattr(obj, attr)
        scrubbed = _scrub_value(value, secrets)
        if scrubbed is not value and scrubbed != value:
            setattr(obj, attr, scrubbed)
        elif _shows_secret(repr(value), secrets):
            # An object that holds the secret and cannot be scrubbed (psycopg's pgconn keeps
            # the connection parameters): drop it rather than let a debugger show it.
            setattr(obj, attr, None)
    except Exception:  # a read-only or computed attribute: nothing to do about it
        pass
