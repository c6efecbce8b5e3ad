"""Structural types for what the pool handles: DB-API 2.0 connections and connect callables."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, TypeVar


class DBAPICursor(Protocol):
    """The part of a PEP 249 cursor the pool relies on."""

    def execute(self, operation: Any, *args: Any, **kwargs: Any) -> Any: ...

    def close(self) -> Any: ...


class DBAPIConnection(Protocol):
    """The part of a PEP 249 connection the pool relies on."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any: ...

    def commit(self) -> Any: ...

    def rollback(self) -> Any: ...

    def close(self) -> Any: ...


C = TypeVar("C", bound=DBAPIConnection)
C_co = TypeVar("C_co", bound=DBAPIConnection, covariant=True)

ConnectFn = Callable[[], C]

Params = Sequence[Any]
