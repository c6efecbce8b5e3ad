"""Transaction isolation levels, and the parsing of what callers pass for them."""

from __future__ import annotations

import enum

__all__ = ["Isolation"]


class Isolation(enum.Enum):
    """The four ANSI isolation levels.  The value is the SQL spelling."""

    READ_UNCOMMITTED = "READ UNCOMMITTED"
    READ_COMMITTED = "READ COMMITTED"
    REPEATABLE_READ = "REPEATABLE READ"
    SERIALIZABLE = "SERIALIZABLE"

    @classmethod
    def parse(cls, value: Isolation | str) -> Isolation:
        """An :class:`Isolation` from itself or from a name in any case, with spaces or
        underscores (``"repeatable read"``, ``"REPEATABLE_READ"``); ``ValueError`` otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.isascii():  # upper() would map "ſ" to "S"
            key = "_".join(value.replace("_", " ").split()).upper()
            member = cls.__members__.get(key)
            if member is not None:
                return member
        choices = ", ".join(repr(m.value) for m in cls)
        raise ValueError(
            f"unknown isolation level {value!r}: use one of {choices}, or dbpool.Isolation"
        )

    __module__ = "dbpool"
