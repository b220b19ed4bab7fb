"""What the PostgreSQL store's parts share: the pool, its transaction, its error mapping, its listing builder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.errors import StoreError
from gateway.store.rows import listing

__all__ = ["Conn", "PostgresBase", "redact"]

Conn = AsyncConnection[tuple[Any, ...]]
LOST_WAIT_S = 0.5  # the wait for a connection while the server seems gone (the pool's own timeout otherwise)


def _listing(select: str, filters: list[tuple[str, object | None]], order: str, limit: int) -> tuple[str, list[object]]:
    return listing(select, filters, order, limit, mark="%s")


def redact(url: str) -> str:
    """`url` without its password, to name it in a message or a log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "(an unparsable URL)"


def _one_line(e: BaseException, url: str) -> str:
    """libpq's message on one line, the password not in it (a malformed URL may be quoted back whole)."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    text = text.replace(url, redact(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


class PostgresBase:
    """The pool and the write-behind flush every part of the store relies on."""

    def __init__(self, pool: AsyncConnectionPool[Conn], url: str) -> None:
        self.pool = pool
        self._url = url  # only to keep its password out of error messages
        self._lost = False  # a connection broke, or none could be made: the server may be down
        self._connect_errors = 0  # the pool's failed connection attempts, when a request last timed out

    @asynccontextmanager
    async def _conn(self, what: str) -> AsyncIterator[Conn]:
        """A connection of the pool in autocommit: each statement its own transaction.

        The pool waits up to its timeout for a connection, as it should when all are busy. With the server
        gone, none is coming: once one is lost, a request waits only LOST_WAIT_S, so that it is answered
        503 at once, not after the timeout, until the server answers again.
        """
        conn: Conn | None = None
        try:
            async with self.pool.connection(LOST_WAIT_S if self._lost else None) as conn:
                yield conn
            self._lost = False
        except psycopg.Error as e:
            if conn is not None:
                self._lost = conn.broken  # a statement refused by a server that answered is no outage
            elif isinstance(e, PoolTimeout):
                # Every connection busy is no outage either; the pool failing to make new ones is.
                errors = self.pool.get_stats().get("connections_errors", 0)
                self._lost = self._lost or errors != self._connect_errors
                self._connect_errors = errors
            raise StoreError(f"the store could not {what}: {_one_line(e, self._url)}") from e

    @asynccontextmanager
    async def _tx(self, what: str) -> AsyncIterator[Conn]:
        """One transaction: committed if the block ends, rolled back if it raises (anything)."""
        async with self._conn(what) as conn, conn.transaction():
            yield conn

    async def _rows(self, what: str, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        async with self._conn(what) as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchall()

    async def _one(self, what: str, sql: str, args: Sequence[object] = ()) -> tuple[Any, ...] | None:
        async with self._conn(what) as conn:
            cur = await conn.execute(sql, args)
            return await cur.fetchone()

    async def _count(self, what: str, sql: str, args: Sequence[object] = ()) -> int:
        async with self._conn(what) as conn:
            cur = await conn.execute(sql, args)
            return cur.rowcount

    async def _flush_audit(self) -> None:
        """Write what was written behind (the command audit and its events); see ``PostgresStore``."""
        raise NotImplementedError
