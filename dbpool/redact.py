"""Keeping passwords out of errors and log lines.

A pool made from a URL knows its secrets (:meth:`DatabaseURL._secrets`), through its connect
callable, a :class:`KnownSecrets`.  A pool given another connect callable learns what it can
from it with :func:`secrets_in`: the secret-looking
keyword arguments of a ``functools.partial`` or of a dict of them, and the passwords written
into the connection strings it holds, whether as ``password=...`` or in a URL.  Both turn
their passwords into the strings to search for with :func:`secret_forms`.  Errors from
connecting are then scrubbed in place (:func:`scrub_exception`), keeping their class, before
anything quotes them; :func:`describe` writes an error's first line for a log line or a
message, with those secrets and whatever still looks like a password masked.
"""

from __future__ import annotations

import functools
import re
import types
from collections.abc import Iterable
from typing import Any, cast
from urllib.parse import quote, unquote

MASK = "***"

_SECRET_KEY_RE = re.compile(r"pass|pwd|secret|token|scram_", re.IGNORECASE)

# password=... in text, quoted or not; user:password@ in a URL.  A match starts only where a
# run of word characters starts (the look-behinds), which keeps the search linear in the text.
_KEY = (
    r"(?<![\w-])(?P<key>(?:[\w-]*(?:password|passwd|passphrase|pwd|secret|token)"
    r"|(?:[\w-]*[_-])?pass)\s*=\s*)"
)
_QUOTED = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\{(?:[^}]|\}\})*\}"""  # ODBC: }} is }
_KEYWORD_SECRET_RE = re.compile(_KEY + rf"""(?P<value>{_QUOTED}|[^\s'",;]+)""", re.IGNORECASE)
# In a connection string, the bare words after an unquoted password are its rest, which the
# driver refuses to parse (and quotes): "password=two words" reads as "words" lacking an "=".
_CONNINFO_SECRET_RE = re.compile(
    _KEY + rf"""(?P<value>{_QUOTED}|[^\s'"]\S*(?:\s+[^\s=]+(?=\s|$))*)""", re.IGNORECASE
)
_WORD_RE = re.compile(r"\S+")

# An error line longer than this is cut in what the pool writes: a log line needs no more.
_MAX_TEXT = 1000
# A secret shorter than this is not searched for, whole or as a piece of one: replacing "pg"
# everywhere would garble every message and point at the password.
_MIN_SECRET = 4
# Template placeholders written where a password goes ("password={}"): not secrets.
_PLACEHOLDER_RE = re.compile(r"\{[^{}]*\}|%(?:\([^)]*\))?[sdr]")
# How deep scrub_exception looks into nested tuples and lists of an error's arguments.
_MAX_DEPTH = 8


def is_secret_key(key: str) -> bool:
    """Whether a parameter's value is masked like the password (sslpassword, pwd, token...)."""
    return bool(_SECRET_KEY_RE.search(key))


def mask_credentials(text: str) -> str:
    """``text`` with what looks like a password (``password=...``, ``user:password@`` in a
    URL) shown as ``***``."""
    text = _KEYWORD_SECRET_RE.sub(lambda m: m["key"] + MASK, text)
    parts, done = [], 0
    for start, end in _url_passwords(text):
        parts += [text[done:start], MASK]
        done = end
    return "".join([*parts, text[done:]])


def _url_passwords(text: str) -> Iterable[tuple[int, int]]:
    """Where the passwords of the URLs in ``text`` are: from the colon after the user name
    to the word's last "@" (an unescaped "@" or "/" may be part of the password).  Read word
    by word, not with one pattern: a pattern that backtracks took seconds on a long line."""
    for word in _WORD_RE.finditer(text):
        value = word.group()
        scheme_end = value.find("://")
        at = value.rfind("@")
        if scheme_end < 0 or at < scheme_end:
            continue
        colon = value.find(":", scheme_end + 3, at)
        if colon < 0 or "/" in value[scheme_end + 3 : colon]:
            continue
        yield word.start() + colon + 1, word.start() + at


def describe(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """An error's class and first line, for a log line or a message: ``secrets`` and what
    looks like a password masked, then cut to ``_MAX_TEXT`` characters (masked first: a cut
    could leave the start of a password that no longer matches)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = mask_credentials(scrub_text(lines[0], secrets))
    if len(text) > _MAX_TEXT:
        text = text[:_MAX_TEXT] + "..."
    return f"{type(exc).__name__}: {text}"


class KnownSecrets:
    """A connect callable that knows its passwords (:class:`dbpool.url.URLConnector`):
    :func:`secrets_in` takes them as they are, rather than guessing at what it holds."""

    __slots__ = ()

    def _known_secrets(self) -> tuple[str, ...]:
        """The strings to replace, as :func:`secret_forms` makes them."""
        raise NotImplementedError


def secrets_in(connect: object) -> tuple[str, ...]:
    """The passwords a connect callable holds where the pool can see them, longest first.

    Looked at: the arguments of a ``functools.partial`` (nested ones too), the defaults,
    closure and string constants of a function or lambda, and the module-level strings and
    dicts it names (``lambda: psycopg.connect(dsn)``, ``lambda: pymysql.connect(**PARAMS)``).
    A secret-looking keyword argument or dict key names a secret as a whole; a string is
    searched for ``password=...`` and ``user:password@``.  Each whitespace-separated piece of
    a secret counts too: a driver that cannot parse a connection string quotes the piece it
    stopped at.  Nothing else is looked into: reading an attribute of an arbitrary object may
    run code.
    """
    # type(), not isinstance(), which reads __class__ (a lazy proxy computes it)
    if issubclass(type(connect), KnownSecrets):
        return cast(KnownSecrets, connect)._known_secrets()
    found: list[str] = []
    for key, value in _candidates(connect):
        if key is not None and is_secret_key(key):
            found.append(value)
        for match in _CONNINFO_SECRET_RE.finditer(value):
            found.append(_unquote_keyword_value(match["value"]))
            if match["value"].startswith("{"):  # ODBC, also as written: each '}' doubled
                found.append(match["value"][1:-1])
            if "://" in value:  # a URL's query: the value ends at '&' and is percent-encoded
                found += _url_forms(match["value"].partition("&")[0])
        for start, end in _url_passwords(value):
            found += _url_forms(value[start:end])
    return secret_forms(found, guessed=True)


def _url_forms(raw: str) -> tuple[str, ...]:
    """A password as written in a URL (libpq quotes it so when it cannot decode it), decoded,
    and decoded to the bytes it stands for when they are no UTF-8 (a driver's codec error
    holds those)."""
    return raw, unquote(raw), unquote(raw, errors="surrogateescape")


def _encoded(secret: str) -> bytes:
    """``secret`` as bytes; a byte that was no UTF-8 (kept as a surrogate) as itself."""
    try:
        return secret.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return secret.encode("utf-8", "replace")


def secret_forms(values: Iterable[str], *, guessed: bool = False) -> tuple[str, ...]:
    """The strings to replace to hide the passwords ``values``, longest first: each as given
    and as it may have been written in a URL, and its part before a NUL character, none
    shorter than ``_MIN_SECRET``.

    ``guessed``: the values were read out of code and connection strings, not given as
    passwords.  Each whitespace-separated piece then counts too (a driver that cannot parse a
    connection string quotes the piece it stopped at), and so does each piece between two
    "@" (libpq ends a URL's password at its first "@" and quotes the rest as the host), and
    a template placeholder (``"{}"``, ``"%s"``) is no secret.  A password given as one is
    never left out for looking like a placeholder: ``{Tr0ub4dor}`` is a password.
    """
    found: set[str] = set()
    for value in values:
        # a C library reads a string up to its first NUL: libpq keeps that much on its errors
        pieces = {value, value.partition("\x00")[0]}
        if guessed:
            for word in value.split():
                pieces.add(word)
                pieces.update(word.split("@"))
        for piece in pieces:
            if len(piece) < _MIN_SECRET or (guessed and _PLACEHOLDER_RE.fullmatch(piece)):
                continue
            found.update(
                (
                    piece,
                    quote(piece, safe="", errors="surrogateescape"),
                    quote(piece, errors="surrogateescape"),
                )
            )
    # longest first, so that no shorter secret splits a longer one before it is replaced
    return tuple(sorted(found, key=len, reverse=True))


def _candidates(connect: object) -> Iterable[tuple[str | None, str]]:
    """(keyword or None, string) pairs a connect callable holds.  Types are tested with
    type(), never isinstance(), which reads ``__class__`` (a lazy proxy computes it)."""
    seen: set[int] = set()
    pending: list[tuple[str | None, Any]] = [(None, connect)]
    while pending:
        key, current = pending.pop()
        kind = type(current)
        if kind is str:
            yield key, current
            continue
        if id(current) in seen:
            continue
        seen.add(id(current))
        if kind is dict:
            pending += [(k, v) for k, v in current.items() if type(k) is str and type(v) is str]
        elif issubclass(kind, functools.partial):
            pending += [(None, current.func), *((None, a) for a in current.args)]
            pending += current.keywords.items()
        elif kind is types.MethodType:
            pending.append((None, current.__func__))
        elif kind is types.FunctionType:
            code = current.__code__
            pending += [(None, value) for value in code.co_consts]
            pending += [(None, value) for value in current.__defaults__ or ()]
            pending += (current.__kwdefaults__ or {}).items()
            # A closure's variables by name (one for each of co_freevars, in order): the
            # factory "def make(password): return lambda: connect(password=password)".
            for name, cell in zip(code.co_freevars, current.__closure__ or ()):
                try:
                    pending.append((name, cell.cell_contents))
                except ValueError:  # an empty cell
                    pass
            for name in code.co_names:
                value = current.__globals__.get(name)
                if type(value) is str or type(value) is dict:
                    pending.append((name, value))


def _unquote_keyword_value(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    if len(value) >= 2 and value[0] == "{" and value[-1] == "}":
        return value[1:-1].replace("}}", "}")
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
        if isinstance(current, UnicodeError):
            try:
                _scrub_codec_error(current, secrets)
            except Exception:  # a subclass that computes its fields: the scrub below still runs
                pass
        # Kept outside args and __dict__, and str() reads some of them rather than args:
        # OSError.strerror, ImportError.msg, SyntaxError.msg and .text, __slots__.
        for attr in _member_attributes(type(current)):
            if type(getattr(current, attr, None)) not in (int, bool, type(None)):
                _scrub_attribute(current, attr, secrets)
        for attr in list(getattr(current, "__dict__", {})):
            _scrub_attribute(current, attr, secrets)
        pending.extend((current.__cause__, current.__context__))
        grouped = getattr(current, "exceptions", None)  # an ExceptionGroup's
        if type(grouped) is tuple:
            pending.extend(e for e in grouped if isinstance(e, BaseException))


def _member_attributes(cls: type) -> list[str]:
    """The attributes an exception class stores in slots (C members of the built-in errors,
    ``__slots__`` of others), but not the sub-errors of a group: they are scrubbed as errors."""
    return [
        name
        for klass in cls.__mro__
        for name, value in vars(klass).items()
        if type(value) is types.MemberDescriptorType
        and not name.startswith("__")
        and name != "exceptions"
    ]


def _scrub_codec_error(exc: UnicodeError, secrets: Iterable[str]) -> None:
    """Scrub a codec error's ``object``, the text it failed on.  Its str() quotes
    ``object[start]`` and the positions, not ``args``: the span moves onto the mask when it
    fell in a secret, so that neither a character of the secret nor its place is shown."""
    error: Any = exc  # UnicodeEncodeError, UnicodeDecodeError or UnicodeTranslateError
    text = getattr(error, "object", None)  # a UnicodeError raised by hand has none
    start, end = getattr(error, "start", None), getattr(error, "end", None)
    if type(start) is not int or type(end) is not int:
        return
    # longest first: at each place, the longest secret there is the one replaced
    ordered = sorted((secret for secret in secrets if secret), key=len, reverse=True)
    if not ordered:
        return
    if isinstance(text, str):
        spans = [m.span() for m in re.finditer("|".join(map(re.escape, ordered)), text)]
        mask: str | bytes = MASK
    elif isinstance(text, (bytes, bytearray)):
        encoded = [re.escape(_encoded(secret)) for secret in ordered]
        spans = [m.span() for m in re.finditer(b"|".join(encoded), text)]
        mask = MASK.encode()
    else:
        return
    if not spans:
        return
    pieces: list[Any] = []
    done = 0
    for first, last in spans:
        pieces += [text[done:first], mask]
        done = last
    pieces.append(text[done:])
    error.object = text[:0].join(pieces)
    error.start = _moved(start, spans, len(mask), is_end=False)
    error.end = _moved(end, spans, len(mask), is_end=True)
    args = error.args
    if len(args) in (4, 5):  # the constructor's ([encoding,] object, start, end, reason)
        error.args = (*args[:-4], error.object, error.start, error.end, args[-1])


def _moved(position: int, spans: list[tuple[int, int]], mask_length: int, *, is_end: bool) -> int:
    """Where ``position`` is once each of ``spans`` is replaced by a mask: a start inside a
    span moves to the start of its mask, an end inside one to the end of its mask."""
    shift = 0
    for first, last in spans:
        if position < first or (is_end and position == first):
            break
        if position < last or (is_end and position == last):
            return first + shift + (mask_length if is_end else 0)
        shift += mask_length - (last - first)
    return position + shift


def _scrub_value(value: Any, secrets: Iterable[str], depth: int = 0) -> Any:
    """``value`` with each secret replaced by ``***``: str, bytes, and tuples/lists of them
    (a tuple subclass that cannot be rebuilt, a namedtuple, becomes a plain tuple), and
    the keys and values of dicts."""
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, (bytes, bytearray)):
        for secret in secrets:
            if secret:
                value = value.replace(_encoded(secret), MASK.encode())
        return value
    if isinstance(value, dict) and depth < _MAX_DEPTH:
        pairs = {
            _scrub_value(k, secrets, depth + 1): _scrub_value(v, secrets, depth + 1)
            for k, v in value.items()
        }
        try:
            return type(value)(pairs)
        except Exception:
            return pairs
    if isinstance(value, (tuple, list)) and depth < _MAX_DEPTH:
        items = [_scrub_value(item, secrets, depth + 1) for item in value]
        try:
            return type(value)(items)
        except Exception:
            return tuple(items) if isinstance(value, tuple) else items
    return value


def _shows_secret(text: str, secrets: Iterable[str]) -> bool:
    """Whether ``text`` (a repr) shows a secret, as text or as escaped bytes."""
    return any(
        secret and (secret in text or repr(_encoded(secret))[2:-1] in text) for secret in secrets
    )


def _scrub_attribute(obj: object, attr: str, secrets: tuple[str, ...]) -> None:
    try:
        value = getattr(obj, attr)
        scrubbed = _scrub_value(value, secrets)
        if scrubbed is not value and scrubbed != value:
            setattr(obj, attr, scrubbed)
        elif _shows_secret(repr(value), secrets) or _keeps_secret(value, secrets):
            # An object that holds the secret and cannot be scrubbed (psycopg's pgconn keeps
            # the connection parameters): drop it rather than let a debugger show it.
            setattr(obj, attr, None)
    except Exception:  # a read-only or computed attribute: nothing to do about it
        pass


def _keeps_secret(value: object, secrets: Iterable[str]) -> bool:
    """Whether ``value`` keeps a secret behind a repr that hides it: the live PGconn psycopg
    puts on an error when libpq refuses the parameters at once ("connection is bad: invalid
    sslmode value") shows none, but its ``password`` and ``info`` hold them all."""
    if type(value) in (str, bytes, bytearray, int, float, bool, type(None), tuple, list, dict):
        return False  # scrubbed as values, or holding nothing
    return any(
        _shows_secret(repr(getattr(value, name, None)), secrets) for name in ("password", "info")
    )
