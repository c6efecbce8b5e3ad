"""Structural types for what the pool handles: DB-API 2.0 connections."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar


class DBAPIConnection(Protocol):
    """The part of a PEP 249 connection the pool relies on."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any: ...

    def commit(self) -> Any: ...

    def rollback(self) -> Any: ...

    def close(self) -> Any: ...


#: The driver's connection type, which a Pool and its leases are generic over.
C = TypeVar("C", bound=DBAPIConnection)
