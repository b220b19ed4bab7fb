"""What the SQLite store's parts share: its transaction, its error mapping (and the listing builder of rows.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import StoreError
from gateway.store.rows import listing

__all__ = ["SqliteBase", "errors", "listing"]


@contextmanager
def errors(what: str) -> Iterator[None]:
    """Driver errors as :class:`StoreError` naming what the store was doing."""
    try:
        yield
    except sqlite3.Error as e:
        raise StoreError(f"the store could not {what}: {e}") from e


class SqliteBase:
    """The connection and the write-behind flush every part of the store relies on."""

    db: sqlite3.Connection

    @contextmanager
    def _tx(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _flush_audit(self) -> None:
        """Write what was written behind (the command audit and its events); see ``SqliteStore``."""
        raise NotImplementedError
